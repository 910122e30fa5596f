"""The training loop: `train_and_evaluate(config, workdir)`.

config -> data pipeline -> task (batch -> loss) -> model -> optimizer -> checkpoint / metrics.
The loop knows nothing of a family's internals: the task maps batches to model inputs and scores
the outputs; the model config says everything else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional

from absl import logging
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flaxformer_lab import checkpoint as ckpt_lib
from flaxformer_lab import metrics as metrics_lib
from flaxformer_lab import optim as optim_lib
from flaxformer_lab import sharding as shard_lib
from flaxformer_lab.models.config import ConfigError, ModelConfig
from flaxformer_lab.models.transformer import build_model, dummy_inputs
from flaxformer_lab.tasks import get_task

TOKENIZER_DIR = 'tokenizer'
CONFIG_FILE = 'config.json'


def _say(text: str) -> None:
  """A line for the researcher on stderr (process 0), whatever the log verbosity."""
  if jax.process_index() == 0:
    print(text, file=sys.stderr, flush=True)


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss or gradient; the last good checkpoint is kept."""


# --- validation ------------------------------------------------------------------------------------
TASK_FAMILIES = {'lm': ('decoder',), 'seq2seq': ('encoder_decoder',),
                 'classification': ('encoder', 'decoder'), 'mlm': ('encoder',)}
TASK_HEADS = {'lm': ('lm',), 'seq2seq': ('seq2seq_lm',), 'classification': ('classification',),
              'mlm': ('mlm', 'mlm_nsp')}


def validate_config(config: ml_collections.ConfigDict,
                    num_devices: Optional[int] = None) -> ModelConfig:
  """Rejects impossible configs before anything compiles; each error says what to change."""
  model_cfg = ModelConfig.from_dict(config.model)
  task = config.task
  if task not in TASK_FAMILIES:
    raise ConfigError(f'config.task={task!r} is not one of {", ".join(TASK_FAMILIES)}')
  if model_cfg.family not in TASK_FAMILIES[task]:
    raise ConfigError(f'config.task={task!r} needs model.family in {TASK_FAMILIES[task]}, got '
                      f'{model_cfg.family!r}')
  if model_cfg.head not in TASK_HEADS[task]:
    raise ConfigError(f'config.task={task!r} needs model.head in {TASK_HEADS[task]}, got '
                      f'{model_cfg.head!r}')
  seq_len = config.data.seq_len
  lengths = [seq_len]
  if model_cfg.family == 'encoder_decoder':
    lengths.append(config.data.target_len or seq_len)
  if model_cfg.position in ('learned', 'sinusoidal'):
    longest = max(lengths) + model_cfg.position_offset
    if longest > model_cfg.max_len:
      raise ConfigError(
          f'sequences of {max(lengths)} tokens (data.seq_len/target_len, plus position_offset '
          f'{model_cfg.position_offset}) do not fit the {model_cfg.position} position table of '
          f'model.max_len={model_cfg.max_len}: raise model.max_len or lower data.seq_len')
  num_devices = jax.device_count() if num_devices is None else num_devices
  shape = shard_lib.resolve_mesh_shape(tuple(config.mesh.shape), num_devices)
  batch_shards = shape[0] * shape[1]
  micro = config.optim.grad_accum_steps
  if config.batch_size % (batch_shards * micro * jax.process_count()):
    raise ConfigError(
        f'config.batch_size={config.batch_size} is not divisible by data*fsdp={batch_shards} '
        f'devices x optim.grad_accum_steps={micro} x {jax.process_count()} processes')
  for name in ('num_steps', 'batch_size'):
    if config[name] <= 0:
      raise ConfigError(f'config.{name} must be positive, got {config[name]}')
  return model_cfg


# --- state -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
  """Everything built from the config before the first step."""
  model_cfg: ModelConfig
  model: nn.Module  # training (dropout on)
  eval_model: nn.Module
  tx: Any
  lr_fn: Callable[[Any], Any]
  mesh: jax.sharding.Mesh
  rules: tuple
  state_shardings: Any
  abstract_state: Any  # unboxed ShapeDtypeStructs with shardings


def init_fn(config, model_cfg: ModelConfig, tx):
  """rng -> boxed train state {'step', 'params', 'opt_state'}."""
  model = build_model(model_cfg)
  length = min(8, config.data.seq_len)

  def init(rng):
    params = model.init(rng, **dummy_inputs(model_cfg, 1, length))['params']
    # Optimizer statistics shaped like their parameter inherit its logical axes (so FSDP shards
    # Adam's moments too); factored ones (Adafactor's row/column statistics) are replicated.
    opt_state = jax.tree.map(_drop_mismatched_box, tx.init(params),
                             is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': opt_state}

  return init


def _drop_mismatched_box(x):
  if isinstance(x, nn.LogicallyPartitioned) and jnp.ndim(x.value) != len(x.names):
    return x.value
  return x


def build_setup(config) -> Setup:
  model_cfg = validate_config(config)
  tx, lr_fn = optim_lib.make_optimizer(config.optim, config.num_steps)
  mesh = shard_lib.make_mesh(config.mesh)
  rules = shard_lib.axis_rules(config)
  init = init_fn(config, model_cfg, tx)
  with shard_lib.use_mesh(mesh, rules):
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = shard_lib.state_shardings(boxed, mesh, rules)
  abstract = shard_lib.abstract_with_shardings(shard_lib.unbox_abstract(boxed), shardings)
  return Setup(model_cfg, build_model(model_cfg, deterministic=False),
               build_model(model_cfg, deterministic=True), tx, lr_fn, mesh, rules, shardings,
               abstract)


def create_state(config, setup: Setup):
  init = init_fn(config, setup.model_cfg, setup.tx)
  with shard_lib.use_mesh(setup.mesh, setup.rules):
    return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=setup.state_shardings)(
        jax.random.PRNGKey(config.seed))


def _replace_params(state, params, setup: Setup):
  """A fresh state (step 0, new optimizer state) around `params`, placed on the mesh."""
  params = jax.device_put(params, setup.state_shardings['params'])
  with shard_lib.use_mesh(setup.mesh, setup.rules):
    opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_shardings['opt_state'])(params)
  return {'step': state['step'], 'params': params, 'opt_state': opt_state}


def init_from(config, setup: Setup, state):
  """Starts from another run's params (`<workdir>`) or a Hugging Face checkpoint (`hf:<dir>`).

  The body must be complete; head parameters absent from the source (e.g. a new classifier)
  keep their fresh initialization, and the log names them.
  """
  source = config.init_from
  if source.startswith('hf:'):
    from flaxformer_lab.interop import huggingface  # pylint: disable=g-import-not-at-top
    loaded, fresh = huggingface.load_params_for_config(source[3:], setup.model_cfg)
  else:
    loaded, fresh = load_params(source), ()
  params = merge_params(jax.device_get(state['params']), loaded, allowed_missing=fresh)
  _say(f'initialized from {source}; freshly initialized: {", ".join(fresh) or "nothing"}')
  return _replace_params(state, params, setup)


def merge_params(target, source, allowed_missing=()):
  """`target` with every leaf taken from `source`; shapes must match; only `allowed_missing`
  top-level paths may be absent from `source`, and `source` may hold nothing unknown."""
  flat_t = traverse_util.flatten_dict(target, sep='/')
  flat_s = traverse_util.flatten_dict(source, sep='/')
  unexpected = sorted(set(flat_s) - set(flat_t))
  if unexpected:
    raise ValueError(f'unexpected weight(s) in the source checkpoint: {", ".join(unexpected[:5])}')
  out = {}
  for key, value in flat_t.items():
    if key in flat_s:
      if tuple(np.shape(flat_s[key])) != tuple(np.shape(value)):
        raise ValueError(f'weight {key} has shape {np.shape(flat_s[key])} in the source, '
                         f'{np.shape(value)} in the model')
      out[key] = np.asarray(flat_s[key], dtype=np.asarray(value).dtype)
    elif any(key == m or key.startswith(m + '/') for m in allowed_missing):
      out[key] = value
    else:
      raise ValueError(f'weight {key} is missing from the source checkpoint')
  return traverse_util.unflatten_dict(out, sep='/')


# --- steps -----------------------------------------------------------------------------------------
def make_train_step(config, setup: Setup, task):
  model, lr_fn = setup.model, setup.lr_fn
  smoothing = float(config.label_smoothing)
  base_rng = jax.random.PRNGKey(config.seed + 1)
  micro = int(config.optim.grad_accum_steps)

  def loss_fn(params, batch, rng):
    outputs = model.apply({'params': params}, **task.model_inputs(batch), rngs={'dropout': rng})
    loss, sums = task.loss(outputs, batch, smoothing)
    return loss, sums

  def step_fn(state, batch):
    rng = jax.random.fold_in(base_rng, state['step'])
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if micro > 1:
      (loss, sums), grads = optim_lib.accumulate_gradients(grad_fn, state['params'], batch, micro,
                                                           rng=rng)
      sums = jax.tree.map(lambda x: x * micro, sums)  # accumulate_gradients averages sums
    else:
      (loss, sums), grads = grad_fn(state['params'], batch, rng)
    updates, opt_state = setup.tx.update(grads, state['opt_state'], state['params'])
    params = jax.tree.map(lambda p, u: p + u, state['params'], updates)
    metrics = dict(sums)
    metrics['grad_norm'] = optax.global_norm(grads)
    metrics['lr'] = lr_fn(state['step'])
    metrics['loss'] = loss
    metrics['tokens'] = jnp.sum(batch[task.tokens_key] != 0).astype(jnp.float32)
    new_state = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}
    return new_state, metrics

  batch_sh = shard_lib.batch_sharding(setup.mesh)
  return jax.jit(step_fn, in_shardings=(setup.state_shardings, batch_sh),
                 out_shardings=(setup.state_shardings, shard_lib.replicated(setup.mesh)),
                 donate_argnums=0)


def make_eval_step(config, setup: Setup, task):
  model = setup.eval_model

  def step_fn(params, batch):
    outputs = model.apply({'params': params}, **task.model_inputs(batch))
    _, sums = task.loss(outputs, batch, 0.0)
    return sums

  return jax.jit(step_fn, in_shardings=(setup.state_shardings['params'],
                                        shard_lib.batch_sharding(setup.mesh)),
                 out_shardings=shard_lib.replicated(setup.mesh))


def evaluate(eval_step, params, data, setup, task, split=None) -> dict[str, float]:
  totals: dict[str, float] = {}
  sh = shard_lib.batch_sharding(setup.mesh)
  with shard_lib.use_mesh(setup.mesh, setup.rules):
    for batch in data.eval_batches(split):
      sums = eval_step(params, shard_lib.make_global_batch(batch, sh))
      for k, v in jax.device_get(sums).items():
        totals[k] = totals.get(k, 0.0) + float(v)
  return task.summarize(totals, 'eval')


def _host_params(params):
  """Parameters as host arrays on every process (gathered across processes when sharded)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(params, tiled=True)
  return jax.device_get(params)


def generation_evals(config, step: int, params, data, writer, final: dict) -> None:
  """Periodic BLEU (encoder_decoder, `bleu_every`) and samples (decoder, `sample_every`).

  BLEU is computed on this process's share of the evaluation split (all of it in one process).
  """
  from flaxformer_lab import decoding  # pylint: disable=g-import-not-at-top
  family = config.model.family
  at = lambda every: every and (step % every == 0 or step == config.num_steps)
  if family == 'encoder_decoder' and at(config.bleu_every):
    score = decoding.bleu_score(config, _host_params(params), data.tokenizer, data.eval_batches())
    writer.write_scalars(step, {'eval/bleu': score})
    final['eval/bleu'] = score
  if family == 'decoder' and at(config.sample_every):
    text = decoding.sample_text(config, _host_params(params), data.tokenizer, '', seed=step)
    writer.write_text(f'sample at step {step}: {text!r}')


# --- helpers for other entry points ----------------------------------------------------------------
def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'no {CONFIG_FILE} in {workdir}: is it a flaxformer_lab run directory?')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_params(workdir: str, step: Optional[int] = None):
  """The params of a run's latest (or given) checkpoint, as host numpy arrays, for inference."""
  config = load_config(workdir)
  config.mesh.shape = (-1, 1, 1)
  setup = build_setup(config)
  ckpt = ckpt_lib.Checkpointer(workdir, every=0, async_save=False)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f'no checkpoint under {ckpt.directory}')
    state, _ = ckpt.restore(step, setup.abstract_state, with_data=False)
  finally:
    ckpt.close()
  return jax.device_get(state['params'])


def save_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))


def _make_data(config, workdir):
  from flaxformer_lab import data as data_lib  # pylint: disable=g-import-not-at-top
  tok_dir = os.path.join(workdir, TOKENIZER_DIR)
  tokenizer = None
  if os.path.exists(os.path.join(tok_dir)) and os.listdir(tok_dir):
    tokenizer = data_lib.load_tokenizer(tok_dir)
  if tokenizer is None and jax.process_count() > 1:
    if jax.process_index() == 0:
      data_lib.prepare(config)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('data_prepared')
  bundle = data_lib.make_datasets(config, process_index=jax.process_index(),
                                  process_count=jax.process_count(), tokenizer=tokenizer)
  bundle.check_vocab_size(config.model.vocab_size)
  if config.task == 'classification' and bundle.num_classes != config.model.num_labels:
    raise ConfigError(f'{config.data.name} has {bundle.num_classes} classes but '
                      f'model.num_labels={config.model.num_labels}: set '
                      f'--config.model.num_labels={bundle.num_classes}')
  if tokenizer is None and jax.process_index() == 0:
    bundle.tokenizer.save(tok_dir)
  return bundle


# --- the loop --------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns final metrics."""
  setup = build_setup(config)  # validates before anything is written or compiled
  task = get_task(config.task)
  data = _make_data(config, workdir)
  save_config(config, workdir)

  ckpt = ckpt_lib.Checkpointer.from_config(workdir, config)
  start = ckpt.latest_step()
  if start is not None:
    state, data_state = ckpt.restore(start, setup.abstract_state)
    if data_state is not None:
      data.train_iter.set_state(data_state)
    _say(f'resumed from step {start} ({ckpt.directory})')
  else:
    start = 0
    state = create_state(config, setup)
    if config.init_from:
      state = init_from(config, setup, state)

  train_step = make_train_step(config, setup, task)
  eval_step = make_eval_step(config, setup, task)
  writer = metrics_lib.MetricWriter(workdir, total_steps=config.num_steps,
                                    progress=config.progress, start_step=start or None)
  fetcher = metrics_lib.AsyncFetcher()
  guard = ckpt_lib.PreemptionGuard()
  batch_sh = shard_lib.batch_sharding(setup.mesh)
  totals: dict[str, float] = {}
  window_start, window_tokens, last_log = time.time(), 0.0, start
  final: dict[str, float] = {}

  def flush_metrics():
    """Fetches pushed steps' metrics; logs every `log_every`; stops on a non-finite loss."""
    nonlocal window_start, window_tokens, last_log
    for step_i, m in fetcher.pop():
      if not (math.isfinite(m['loss']) and math.isfinite(m['grad_norm'])):
        raise NonFiniteLossError(
            f'non-finite loss ({m["loss"]}) or gradient norm ({m["grad_norm"]}) at step {step_i}; '
            f'stopped without saving, the last good checkpoint is step {ckpt.latest_step()} in '
            f'{ckpt.directory}: lower optim.learning_rate or raise warmup')
      for k, v in m.items():
        totals[k] = totals.get(k, 0.0) + v
      window_tokens += m['tokens']
      totals['_n'] = totals.get('_n', 0) + 1
      if step_i % config.log_every == 0 or step_i == config.num_steps:
        now = time.time()
        steps = max(step_i - last_log, 1)
        scalars = task.summarize(totals, 'train')
        scalars.update({'train/lr': m['lr'], 'train/grad_norm': m['grad_norm'],
                        'train/tokens_per_s': window_tokens / max(now - window_start, 1e-9),
                        'train/step_time_s': (now - window_start) / steps})
        writer.write_scalars(step_i, scalars)
        final.update(scalars)
        totals.clear()
        window_start, window_tokens, last_log = now, 0.0, step_i

  try:
    with shard_lib.use_mesh(setup.mesh, setup.rules):
      for step in range(start + 1, config.num_steps + 1):
        batch = shard_lib.make_global_batch(next(data.train_iter), batch_sh)
        state, metrics = train_step(state, batch)
        flush_metrics()  # step-1's metrics, fetched after this step was dispatched
        fetcher.push(step, metrics)
        writer.progress(step)
        at_eval = config.eval_every and step % config.eval_every == 0
        at_ckpt = config.checkpoint_every and step % config.checkpoint_every == 0
        stop = guard.should_stop(step) or step == config.get('stop_at_step', 0)
        if at_ckpt or stop or at_eval:
          flush_metrics()  # waits for this step: its loss is checked before anything is saved
        if at_eval and step != config.num_steps:
          scalars = evaluate(eval_step, state['params'], data, setup, task)
          writer.write_scalars(step, scalars)
          final.update(scalars)
        if step != config.num_steps:
          generation_evals(config, step, state['params'], data, writer, final)
        if at_ckpt or stop:
          ckpt.maybe_save(step, state, data.train_iter.get_state, force=stop)
        if stop:
          writer.write_text(f'stopping early: saved step {step}; rerun the command to resume')
          return final
      # End of training.
      step = config.num_steps
      flush_metrics()
      scalars = evaluate(eval_step, state['params'], data, setup, task)
      writer.write_scalars(step, scalars)
      final.update(scalars)
      generation_evals(config, step, state['params'], data, writer, final)
      ckpt.save(step, state, data.train_iter.get_state)
  finally:
    guard.uninstall()
    ckpt.wait_until_finished()
    ckpt.close()
    writer.close()
  if jax.process_index() == 0:
    try:
      metrics_lib.plot_metrics(workdir)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('could not plot metrics: %s', e)
  return final
