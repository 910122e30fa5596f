"""The training loop: `train_and_evaluate(config, workdir)`.

config -> data pipeline -> objective (batch -> loss) -> model -> optimizer -> checkpoint / metrics.
The loop knows nothing of a family's or an objective's internals: the objective (`config.task`,
flaxformer_lab/tasks) builds the loss from the named models and any frozen parameters it declares,
the evaluations come from `config.evals` (evals.py), and the run directory is read and written by
rundir.py.
"""

from __future__ import annotations

import dataclasses
import difflib
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
from flaxformer_lab import errors
from flaxformer_lab import evals as evals_lib
from flaxformer_lab import metrics as metrics_lib
from flaxformer_lab import optim as optim_lib
from flaxformer_lab import rundir
from flaxformer_lab import sharding as shard_lib
from flaxformer_lab.models.config import ConfigError, ModelConfig
from flaxformer_lab.models.transformer import build_model, dummy_inputs
from flaxformer_lab.tasks import get_objective
from flaxformer_lab.tasks.base import Objective


def _say(text: str) -> None:
  """A line for the researcher on stderr (process 0), whatever the log verbosity."""
  if jax.process_index() == 0:
    print(text, file=sys.stderr, flush=True)


class NonFiniteLossError(errors.Diverged):
  """Training produced a NaN/inf loss, gradient or parameter; nothing non-finite was saved."""


# --- validation ------------------------------------------------------------------------------------
# Loop fields: (name, smallest valid value, what the value means / why the bound).
LOOP_FIELDS = (
    ('num_steps', 1, 'optimizer updates'),
    ('batch_size', 1, 'examples per update'),
    ('log_every', 1, 'steps between training metric lines'),
    ('checkpoint_every', 0, 'steps between checkpoints; 0 = only at the end and on preemption'),
    ('keep_checkpoints', 1, 'checkpoints kept; 0 would keep none and delete the existing ones'),
    ('stop_at_step', 0, 'stop after this step; 0 = run to num_steps'),
)


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_loop_fields(config: ml_collections.ConfigDict) -> None:
  for name, low, meaning in LOOP_FIELDS:
    if name not in config:
      continue
    value = config[name]
    if not _is_int(value) or value < low:
      raise ConfigError(f'config.{name}={value!r} must be an integer >= {low} ({meaning})')


def check_data_source(config: ml_collections.ConfigDict) -> None:
  """The data set exists and, unless it is synthetic, its raw files have a place to come from:
  an existing, non-empty `data.manual_dir` (never a silent download)."""
  from flaxformer_lab.data import sources  # pylint: disable=g-import-not-at-top
  from flaxformer_lab.data import tokenizers  # pylint: disable=g-import-not-at-top
  d = config.data
  kinds = ('byte', *tokenizers.TRAINED_KINDS)
  if d.get('tokenizer', 'byte') not in kinds:
    close = difflib.get_close_matches(str(d.tokenizer), kinds, n=1)
    raise ConfigError(f'config.data.tokenizer={d.tokenizer!r} is not a tokenizer: use one of '
                      f'{", ".join(kinds)}' + (f' (did you mean {close[0]!r}?)' if close else ''))
  if d.name in sources.SYNTHETIC:
    return
  try:
    sources._builder_spec(d)  # pylint: disable=protected-access
  except ValueError as e:
    raise ConfigError(f'config.data.name={d.name!r}: {str(e).splitlines()[0]}') from e
  manual = str(d.get('manual_dir', '') or '')
  if d.get('download', False) and not manual:
    return
  if not manual:
    raise ConfigError(
        f'config.data.manual_dir is empty: point it at the folder of the raw {d.name} files '
        '(or $FLAXFORMER_DATA), or set config.data.download=True to fetch them from the public '
        'source')
  if not os.path.isdir(manual):
    raise ConfigError(f'config.data.manual_dir={manual!r} is not a directory: point it at the '
                      f'folder holding the raw {d.name} files')
  if not os.listdir(manual):
    raise ConfigError(f'config.data.manual_dir={manual!r} is an empty folder: point it at the '
                      f'folder holding the raw {d.name} files (nothing is downloaded in its place)')


def check_init_from(config: ml_collections.ConfigDict) -> None:
  """`init_from` exists and, for `hf:<dir>`, its config.json and weight-file headers read (cheap:
  no tensor is loaded), so that a damaged source is refused before any data is prepared."""
  source = str(config.get('init_from', '') or '')
  if not source:
    return
  path = source[3:] if source.startswith('hf:') else source
  if not os.path.isdir(path):
    raise ConfigError(f'config.init_from={source!r}: {path} is not a directory (a lab run '
                      'directory, or hf:<a Hugging Face checkpoint directory>)')
  if source.startswith('hf:'):
    from flaxformer_lab.interop import huggingface  # pylint: disable=g-import-not-at-top
    huggingface.read_hf_config(path)
    huggingface.checkpoint_keys(path)


def validate_config(config: ml_collections.ConfigDict,
                    num_devices: Optional[int] = None) -> ModelConfig:
  """Rejects impossible configs before anything compiles; each error says what to change.

  The one validation pass: the loop fields, the optimizer (optim.validate), the mesh, the data
  source, the model (ModelConfig), the objective's own rules (families, heads, its settings) and
  each evaluation of config.evals. Raises ConfigError (one line).
  """
  check_loop_fields(config)
  try:
    optim_lib.validate(config.optim)
    shard_lib.check_mesh_config(config.mesh)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  check_data_source(config)  # names only: nothing is read or prepared here
  check_init_from(config)
  model_cfg = ModelConfig.from_dict(config.model)
  objective = get_objective(config)
  objective.validate(config, model_cfg)
  evals_lib.build_evaluators(config, objective, model_cfg)
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
  try:
    shape = shard_lib.resolve_mesh_shape(tuple(config.mesh.shape), num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  batch_shards = shape[0] * shape[1]
  micro = config.optim.grad_accum_steps
  if config.batch_size % (batch_shards * micro * jax.process_count()):
    raise ConfigError(
        f'config.batch_size={config.batch_size} is not divisible by data*fsdp={batch_shards} '
        f'devices x optim.grad_accum_steps={micro} x {jax.process_count()} processes')
  return model_cfg


# --- state -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
  """Everything built from the config before the first step."""
  model_cfg: ModelConfig
  model: nn.Module  # training (dropout on)
  eval_model: nn.Module
  objective: Objective
  models: dict[str, nn.Module]  # 'model', 'eval_model' and the frozen models, by name
  frozen_models: dict[str, Any]  # name -> tasks.FrozenModel (host parameters, source)
  frozen_shardings: dict[str, Any]  # name -> parameter shardings on the mesh
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


def build_setup(config, *, load_frozen: bool = True) -> Setup:
  """Validates `config` and builds models, optimizer, mesh and shardings (no arrays allocated
  except the frozen models' host parameters, loaded when `load_frozen`)."""
  model_cfg = validate_config(config)
  objective = get_objective(config)
  tx, lr_fn = optim_lib.make_optimizer(config.optim, config.num_steps)
  mesh = shard_lib.make_mesh(config.mesh)
  rules = shard_lib.axis_rules(config)
  init = init_fn(config, model_cfg, tx)
  with shard_lib.use_mesh(mesh, rules):
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = shard_lib.state_shardings(boxed, mesh, rules)
  abstract = shard_lib.abstract_with_shardings(shard_lib.unbox_abstract(boxed), shardings)
  model = build_model(model_cfg, deterministic=False)
  eval_model = build_model(model_cfg, deterministic=True)
  models = {'model': model, 'eval_model': eval_model}
  frozen_models = objective.frozen_models(config) if load_frozen else {}
  frozen_shardings = {}
  for name, frozen in frozen_models.items():
    models[name] = build_model(frozen.model_config, deterministic=True)
    frozen_shardings[name] = _param_shardings(frozen.model_config, mesh, rules)
  return Setup(model_cfg, model, eval_model, objective, models, frozen_models, frozen_shardings,
               tx, lr_fn, mesh, rules, shardings, abstract)


def _param_shardings(model_cfg: ModelConfig, mesh, rules):
  """Shardings of a model's parameters by the logical axis rules (as the student's are)."""
  module = build_model(model_cfg)
  with shard_lib.use_mesh(mesh, rules):
    boxed = jax.eval_shape(lambda r: module.init(r, **dummy_inputs(model_cfg, 1, 8))['params'],
                           jax.random.PRNGKey(0))
    return shard_lib.state_shardings(boxed, mesh, rules)


def place_frozen(setup: Setup) -> dict[str, Any]:
  """The frozen models' host parameters as global arrays on the mesh (every process holds the
  full host copy and places the shards its devices own)."""
  out = {}
  for name, frozen in setup.frozen_models.items():
    shardings = setup.frozen_shardings[name]
    flat_p = traverse_util.flatten_dict(frozen.params, sep='/')
    flat_s = traverse_util.flatten_dict(shardings, sep='/')
    if set(flat_p) != set(flat_s):
      missing, extra = sorted(set(flat_s) - set(flat_p)), sorted(set(flat_p) - set(flat_s))
      raise ConfigError(f'frozen model {name!r} from {frozen.source} does not match its config: '
                        f'missing {missing[:4]}, unexpected {extra[:4]}')
    placed = {}
    for key, value in flat_p.items():
      value = np.asarray(value)
      placed[key] = jax.make_array_from_callback(value.shape, flat_s[key],
                                                 lambda idx, v=value: v[idx])
    out[name] = traverse_util.unflatten_dict(placed, sep='/')
  return out


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


# Top-level modules that are heads: a source's head the target lacks is dropped (pre-training head
# -> fine-tuning), and a target head the source lacks starts fresh; the body must match exactly.
HEAD_MODULES = ('mlm_head', 'lm_head', 'classifier', 'token_classifier', 'pair_head', 'pooler')


def init_from(config, setup: Setup, state):
  """Starts from another run's params (`<workdir>`) or a Hugging Face checkpoint (`hf:<dir>`).

  The body must be complete; head parameters absent from the source (e.g. a new classifier)
  keep their fresh initialization, the source's heads the model does not have are dropped, and
  the log names both.
  """
  source = config.init_from
  target = jax.device_get(state['params'])
  if source.startswith('hf:'):
    from flaxformer_lab.interop import huggingface  # pylint: disable=g-import-not-at-top
    loaded, fresh = huggingface.load_params_for_config(source[3:], setup.model_cfg)
  else:
    loaded = rundir.RunDir(source).restore_params()
    fresh = tuple(m for m in HEAD_MODULES if m in target and m not in loaded)
  dropped = tuple(m for m in HEAD_MODULES if m in loaded and m not in target)
  loaded = {k: v for k, v in loaded.items() if k not in dropped}
  params = merge_params(target, loaded, allowed_missing=fresh)
  _say(f'initialized from {source}; freshly initialized: {", ".join(fresh) or "nothing"}; '
       f'dropped from the source: {", ".join(dropped) or "nothing"}')
  return _replace_params(state, params, setup)


def merge_params(target, source, allowed_missing=()):
  """`target` with every leaf taken from `source`; shapes must match; only `allowed_missing`
  top-level paths may be absent from `source`, and `source` may hold nothing unknown."""
  flat_t = traverse_util.flatten_dict(target, sep='/')
  flat_s = traverse_util.flatten_dict(source, sep='/')
  unexpected = sorted(set(flat_s) - set(flat_t))
  if unexpected:
    raise ConfigError(f'unexpected weight(s) in the source checkpoint: {", ".join(unexpected[:5])}'
                      " (the model config differs from the source's)")
  out = {}
  for key, value in flat_t.items():
    if key in flat_s:
      if tuple(np.shape(flat_s[key])) != tuple(np.shape(value)):
        raise ConfigError(f'weight {key} has shape {np.shape(flat_s[key])} in the source, '
                        f'{np.shape(value)} in the model')
      out[key] = np.asarray(flat_s[key], dtype=np.asarray(value).dtype)
    elif any(key == m or key.startswith(m + '/') for m in allowed_missing):
      out[key] = value
    else:
      raise ConfigError(f'weight {key} is missing from the source checkpoint')
  return traverse_util.unflatten_dict(out, sep='/')


# --- steps -----------------------------------------------------------------------------------------
def all_finite(tree) -> jax.Array:
  """1.0 when every floating-point leaf of `tree` is finite, else 0.0 (one fused reduction)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not leaves:
    return jnp.ones((), jnp.float32)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])).astype(jnp.float32)


def make_train_step(config, setup: Setup, objective: Optional[Objective] = None):
  """The compiled update: `step(state, batch)`, or `step(state, batch, frozen)` when the objective
  has frozen models (their parameters are a separate, non-donated argument, never
  differentiated and never part of the state)."""
  objective = objective or setup.objective
  lr_fn = setup.lr_fn
  base_rng = jax.random.key(config.seed + 1, impl=config.get('rng_impl') or None)
  micro = int(config.optim.grad_accum_steps)

  def step_fn(state, batch, frozen):
    loss_fn = objective.make_loss(setup.models, frozen, config)
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
    metrics['tokens'] = jnp.sum(batch[objective.tokens_key] != 0).astype(jnp.float32)
    # Checked on the *updated* state, fetched with the metrics: a step that makes a parameter or
    # optimizer statistic non-finite (even with a finite loss, e.g. Adam's 0/0) is never saved.
    metrics['state_finite'] = all_finite((params, opt_state))
    new_state = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}
    return new_state, metrics

  batch_sh = shard_lib.batch_sharding(setup.mesh)
  out_sh = (setup.state_shardings, shard_lib.replicated(setup.mesh))
  if setup.frozen_models:
    return jax.jit(step_fn, in_shardings=(setup.state_shardings, batch_sh,
                                          dict(setup.frozen_shardings)),
                   out_shardings=out_sh, donate_argnums=0)
  return jax.jit(lambda state, batch: step_fn(state, batch, {}),
                 in_shardings=(setup.state_shardings, batch_sh), out_shardings=out_sh,
                 donate_argnums=0)


def source_tokenizer(config):
  """The tokenizer of `config.data.tokenizer_from` (a run directory or hf:<dir> whose tokenizer
  this run reuses), else of the run or checkpoint `config.init_from` starts from (the ids its
  embeddings were trained with); None when neither is set or has one."""
  source = config.data.get('tokenizer_from', '') or config.init_from
  if not source:
    return None
  tok = rundir.source_tokenizer(source)
  if tok is None and source == config.data.get('tokenizer_from', ''):
    raise rundir.RunDirError(f'config.data.tokenizer_from={source} holds no tokenizer; point it '
                             'at a run directory with tokenizer/ or an hf:<dir> with one')
  if tok is not None:
    _say(f'tokenizer: {tok.kind} ({tok.vocab_size} ids) of {source}')
  return tok


def _make_data(config, run: rundir.RunDir, objective: Objective):
  """The data pipeline; the tokenizer is the run's own when it has one (resume), else the
  objective's (a teacher's), else trained/loaded from the data cache."""
  from flaxformer_lab import data as data_lib  # pylint: disable=g-import-not-at-top
  if run.has_tokenizer():
    tokenizer = run.load_tokenizer()
  else:
    tokenizer = objective.tokenizer(config) or source_tokenizer(config)
  if tokenizer is None and jax.process_count() > 1:
    if jax.process_index() == 0:
      data_lib.prepare(config)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('data_prepared')
  bundle = data_lib.make_datasets(config, process_index=jax.process_index(),
                                  process_count=jax.process_count(), tokenizer=tokenizer)
  bundle.check_vocab_size(config.model.vocab_size)
  objective.check_bundle(config, bundle)
  return bundle


def _frozen_meta(setup: Setup) -> dict[str, Any]:
  """What the checkpoints record of the frozen models: source and parameter fingerprint."""
  return {'frozen': {name: {'source': f.source, 'fingerprint': f.fingerprint}
                     for name, f in setup.frozen_models.items()}}


def _check_frozen_meta(ckpt, step: int, setup: Setup) -> None:
  stored = (ckpt.stored_meta(step) or {}).get('frozen', {})
  current = _frozen_meta(setup)['frozen']
  for name in sorted(set(stored) | set(current)):
    old, new = stored.get(name), current.get(name)
    if old != new:
      raise ConfigError(
          f'checkpoint step {step} was trained with {name} '
          f'{old["source"] + " (" + old["fingerprint"] + ")" if old else "absent"} but this run '
          f'has {new["source"] + " (" + new["fingerprint"] + ")" if new else "none"}: resume with '
          f'the same {name}, or start a new workdir')


# --- the loop --------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns final metrics."""
  setup = build_setup(config)  # validates before anything is written or compiled
  objective = setup.objective
  run = rundir.RunDir(workdir)
  data = _make_data(config, run, objective)
  evaluators = evals_lib.build_evaluators(config, objective, setup.model_cfg)
  frozen = place_frozen(setup)

  ckpt = ckpt_lib.Checkpointer.from_config(workdir, config, meta=_frozen_meta(setup))
  start = ckpt.latest_step()
  if start is not None and start > config.num_steps:
    raise ConfigError(f'{ckpt.directory} holds step {start}, past config.num_steps='
                      f'{config.num_steps}: raise num_steps to continue it, or use a new --workdir')
  if start is not None and start == config.num_steps:
    # A finished run: nothing to train or evaluate again, nothing in the run directory changes.
    _say(f'{workdir} already finished at step {start}: nothing to do (raise config.num_steps '
         'to train further)')
    ckpt.close()
    return {}
  if start is not None:
    _check_frozen_meta(ckpt, start, setup)
    state, data_state = ckpt.restore(start, setup.abstract_state)
    if data_state is not None:
      data.train_iter.set_state(data_state)
    _say(f'resumed from step {start} ({ckpt.directory})')
  else:
    start = 0
    state = create_state(config, setup)
    if config.init_from:
      state = init_from(config, setup, state)
    params = objective.initialize(config, lambda: jax.device_get(state['params']),
                                  setup.frozen_models)
    if params is not None:
      state = _replace_params(state, params, setup)
  # The first batch before anything is written: data too small for one batch is a config error
  # that leaves the run directory as it was.
  try:
    first_batch = next(data.train_iter)
  except StopIteration:
    raise ConfigError(
        f'the training data of {config.data.name} (data.manual_dir={config.data.manual_dir!r}) '
        f'does not fill one batch of {config.batch_size} x {config.data.seq_len} tokens: check '
        'the data files, or lower config.batch_size / data.seq_len') from None
  # Written once the state exists: a refused resume leaves the run directory as it was.
  run.save_config(config)
  if not run.has_tokenizer():
    run.save_tokenizer(data.tokenizer)

  train_step = make_train_step(config, setup, objective)
  step_args = (frozen,) if setup.frozen_models else ()
  eval_ctx = evals_lib.EvalContext(config, objective, setup, data, frozen, setup.frozen_shardings)
  # start_step=0 on a fresh start: records of an earlier attempt that died before its first
  # checkpoint are dropped, never appended to.
  writer = metrics_lib.MetricWriter(workdir, total_steps=config.num_steps,
                                    progress=config.progress, start_step=start, config=config)
  fetcher = metrics_lib.AsyncFetcher()
  # Until the first step has compiled, SIGTERM keeps its default action (the process ends at
  # once: there is nothing new to save, and a compilation can outlast a preemption grace period);
  # the guard's save-and-stop handler is installed after the first step is dispatched.
  guard = ckpt_lib.PreemptionGuard(install=False)
  batch_sh = shard_lib.batch_sharding(setup.mesh)
  totals: dict[str, float] = {}
  window_start, window_tokens, last_log = time.time(), 0.0, start
  final: dict[str, float] = {}

  def run_evals(step: int, at_end: bool) -> None:
    for ev in evaluators:
      if ev.due(step, at_end):
        scalars, texts = ev.run(eval_ctx, step, state['params'])
        if scalars:
          writer.write_scalars(step, scalars)
          final.update(scalars)
        for text in texts:
          writer.write_text(text)

  def flush_metrics():
    """Fetches pushed steps' metrics; logs every `log_every`; stops on a non-finite loss."""
    nonlocal window_start, window_tokens, last_log
    for step_i, m in fetcher.pop():
      finite_state = m.pop('state_finite') > 0
      loss_ok = math.isfinite(m['loss']) and math.isfinite(m['grad_norm'])
      if not (loss_ok and finite_state):
        what = ('non-finite parameters or optimizer state after the update (loss and gradient '
                'finite)' if loss_ok else
                f'non-finite loss ({m["loss"]}) or gradient norm ({m["grad_norm"]})')
        ckpt.wait_until_finished()
        last = ckpt.latest_step()
        kept = (f'the last good checkpoint is step {last} in {ckpt.directory}' if last is not None
                else 'no checkpoint was saved yet')
        raise NonFiniteLossError(
            f'{what} at step {step_i}; stopped without saving, {kept}: lower '
            'optim.learning_rate, raise optim.warmup_steps or optim.eps, or clip gradients')
      for k, v in m.items():
        totals[k] = totals.get(k, 0.0) + v
      window_tokens += m['tokens']
      totals['_n'] = totals.get('_n', 0) + 1
      if step_i % config.log_every == 0 or step_i == config.num_steps:
        now = time.time()
        steps = max(step_i - last_log, 1)
        scalars = objective.summarize(totals, 'train')
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
        host_batch = first_batch if step == start + 1 else next(data.train_iter, None)
        if host_batch is None:
          raise ConfigError(f'the training data ran out at step {step}: the data pipeline repeats '
                            f'its data, so {config.data.name} holds less than one batch')
        batch = shard_lib.make_global_batch(host_batch, batch_sh)
        state, metrics = train_step(state, batch, *step_args)
        if step == start + 1:
          guard.install()  # compiled: SIGTERM now saves and stops (see above)
        flush_metrics()  # step-1's metrics, fetched after this step was dispatched
        fetcher.push(step, metrics)
        writer.progress(step)
        at_eval = any(ev.due(step, False) for ev in evaluators)
        at_ckpt = config.checkpoint_every and step % config.checkpoint_every == 0
        stop = guard.should_stop(step) or step == config.get('stop_at_step', 0)
        if at_ckpt or stop or at_eval:
          flush_metrics()  # waits for this step: its loss is checked before anything is saved
        if at_eval and step != config.num_steps:
          run_evals(step, at_end=False)
        if at_ckpt or stop:
          ckpt.maybe_save(step, state, data.train_iter.get_state, force=stop)
        if stop:
          writer.write_text(f'stopping early: saved step {step}; rerun the command to resume')
          return final
      # End of training.
      step = config.num_steps
      flush_metrics()
      run_evals(step, at_end=True)
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
