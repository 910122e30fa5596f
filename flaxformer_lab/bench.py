r"""Training-step speed of any config, optionally against the equivalent Hugging Face model.

  python -m flaxformer_lab.bench --config=configs/gpt2.py:small [--config.x=y ...] [--steps=N]
      [--rounds=R] [--vs_hf] [--hf_modes=eager,compile] [--json=out.json] [--markdown=out.md]
      [--profile=DIR] [--peak_tflops=X]

What it measures, on synthetic batches of the config's shapes (batch_size x data.seq_len, no
padding, MLM: a fixed ceil(mlm_probability * seq_len) scored positions per row):

- steady-state train-step time (median, p10-p90, min) and tokens/s, compile time apart: the lab's
  step is the one `train.make_train_step` builds (the same jitted update training runs: forward,
  backward, clipping, optimizer), lowered and compiled explicitly, then called `--steps` times;
- model FLOPs utilization: 6 x (matmul parameters x the positions they apply to) plus the attention
  term 12 x layers x T x S x (heads x head_dim) per sequence (fwd + bwd), counting the full T x S
  score matrix also for causal attention (no halving: the PaLM / Megatron convention), against
  the device's peak (a table for GPUs/TPUs; on a CPU a measured float32 matmul rate, labelled so);
  XLA's own FLOP count of the compiled step is reported beside it;
- peak memory (GPU: the allocator's peak; otherwise XLA's buffer assignment of the step) and the
  process's peak RSS;
- with `--vs_hf`: the equivalent transformers model (GPT2LMHeadModel for decoders, BertForMaskedLM
  / BertForPreTraining for MLM encoders, T5ForConditionalGeneration for relative-bias
  encoder-decoders) with the same shapes, dropout, AdamW (same betas, eps, weight decay on matrices
  only) and global-norm clipping, trained on the same batches, eager and under `torch.compile`,
  in blocks interleaved with the lab's (`--rounds` rounds, the order rotating), so that load from
  other processes affects all alike; the ratios are tokens/s lab / HF. Parameter counts of both are
  printed so that the equivalence can be checked. bf16 configs use torch.autocast (float32
  weights, as the lab keeps them).

tokens/s counts every input position of a step (batch x seq_len; encoder-decoders: the decoder's
positions, as the train loop's `tokens_key` does). Timings on a machine shared with other jobs are
not comparable between runs: the load average (1 min) is recorded at the start and the end.

`--profile=DIR` writes a jax.profiler trace of a few steps (TensorBoard / Perfetto) and prints the
compiled step's most expensive XLA ops (on accelerators from the device's op line, on XLA CPU from
its thread pool's), each with the model code it came from (the HLO's op_name metadata).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lab import hostmem

# Peak dense matmul FLOP/s by device kind (datasheet numbers, no sparsity).
PEAK_FLOPS = {
    # kind substring: {dtype: flop/s}
    'H200': {'bfloat16': 989e12, 'float16': 989e12, 'float32': 67e12},
    'H100': {'bfloat16': 989e12, 'float16': 989e12, 'float32': 67e12},
    'A100': {'bfloat16': 312e12, 'float16': 312e12, 'float32': 19.5e12},
    'L4': {'bfloat16': 121e12, 'float16': 121e12, 'float32': 30e12},
    'TPU v4': {'bfloat16': 275e12, 'float32': 275e12 / 4},
    'TPU v5 lite': {'bfloat16': 197e12, 'float32': 197e12 / 4},
    'TPU v5': {'bfloat16': 459e12, 'float32': 459e12 / 4},
}


# --------------------------------------------------------------------------------------------------
# Synthetic batches.
# --------------------------------------------------------------------------------------------------
def num_predictions(config) -> int:
  """Scored positions per MLM row: ceil(mlm_probability * seq_len) (BERT's max_predictions)."""
  p = float(config.data.get('mlm_probability', 0.15))
  return max(1, int(math.ceil(p * int(config.data.seq_len))))


def synthetic_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch with the keys the config's objective reads (the objective builds it: see
  `Objective.synthetic_batch`), one sequence per row, no padding."""
  from flaxformer_lab.tasks import get_objective  # pylint: disable=g-import-not-at-top
  return get_objective(config).synthetic_batch(config, np.random.default_rng(seed))


def tokens_per_step(config) -> int:
  """Positions processed per step, as the train loop counts them (its objective's tokens_key)."""
  from flaxformer_lab.tasks import get_objective  # pylint: disable=g-import-not-at-top
  objective = get_objective(config)
  batch = objective.synthetic_batch(config, np.random.default_rng(0))
  return int(np.sum(batch[objective.tokens_key] != 0))


# --------------------------------------------------------------------------------------------------
# The lab's train step: the one place that touches the training API.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LabStep:
  model_cfg: Any
  params_shapes: Any  # the params tree (arrays or ShapeDtypeStructs)
  compiled: Callable[[Any, Any], Any]  # (state, batch) -> (state, metrics)
  state: Any
  batch: Any
  compile_s: float
  lower_s: float
  xla_flops: Optional[float]
  memory_bytes: Optional[int]
  mesh_context: Callable[[], Any]
  hlo_text: Callable[[], str] = lambda: ''  # the compiled step's HLO (names a profile's ops)


def build_lab_step(config, host_batch) -> LabStep:
  """build_setup / create_state / make_train_step, lowered and compiled for `host_batch`.

  Works with the objective API (`make_train_step(config, setup)`, the setup carrying the objective
  and frozen models) and with the older task API (`make_train_step(config, setup, get_task(...))`).
  """
  from flaxformer_lab import sharding as shard_lib  # pylint: disable=g-import-not-at-top
  from flaxformer_lab import train  # pylint: disable=g-import-not-at-top
  setup = train.build_setup(config)
  state = train.create_state(config, setup)
  extra = ()
  if hasattr(setup, 'objective'):
    step = train.make_train_step(config, setup)
    if getattr(setup, 'frozen_models', None):
      extra = (train.place_frozen(setup),)
  else:  # the task API
    from flaxformer_lab import tasks  # pylint: disable=g-import-not-at-top
    if hasattr(tasks, 'get_objective'):
      step = train.make_train_step(config, setup, tasks.get_objective(config))
    else:
      step = train.make_train_step(config, setup, tasks.get_task(config.task))
  mesh_context = lambda: shard_lib.use_mesh(setup.mesh, setup.rules)
  batch = shard_lib.make_global_batch(host_batch, shard_lib.batch_sharding(setup.mesh))
  with mesh_context():
    t0 = time.perf_counter()
    lowered = step.lower(state, batch, *extra)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  return LabStep(setup.model_cfg, state['params'], lambda s, b: compiled(s, b, *extra), state,
                 batch, t2 - t1, t1 - t0, _xla_flops(compiled), _xla_memory(compiled),
                 mesh_context, lambda: _hlo_text(compiled))


def _hlo_text(compiled) -> str:
  try:
    return compiled.as_text() or ''
  except Exception:  # pylint: disable=broad-except
    return ''


def _xla_flops(compiled) -> Optional[float]:
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost['flops']) if cost and 'flops' in cost else None
  except Exception:  # pylint: disable=broad-except
    return None


def _xla_memory(compiled) -> Optional[int]:
  """Arguments + outputs - donated aliases + temporaries of the compiled step, in bytes."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
               m.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


# --------------------------------------------------------------------------------------------------
# FLOPs and peaks.
# --------------------------------------------------------------------------------------------------
def model_flops_per_step(config, params) -> dict[str, float]:
  """Training FLOPs of one step: 6 x (matmul weights x positions) + attention (see module doc).

  Every `*kernel` parameter is a matmul weight applied at the positions of its stack (encoder:
  source positions, decoder: target positions; heads: the scored positions for MLM, else the
  positions of their stack; pooler/pair/classifier heads: one per row); a tied output table
  (vocab x embed) is a matmul at the head's positions.
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from flaxformer_lab.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig.from_dict(config.model)
  b, l = int(config.batch_size), int(config.data.seq_len)
  lt = int(config.data.get('target_len') or l) if cfg.family == 'encoder_decoder' else l
  enc_pos = b * l
  dec_pos = b * (lt if cfg.family == 'encoder_decoder' else l)
  head_pos = b * num_predictions(config) if cfg.head in ('mlm', 'mlm_nsp') else (
      dec_pos if cfg.family != 'encoder' else enc_pos)
  flat = traverse_util.flatten_dict(params)
  matmul = 0.0
  for path, leaf in flat.items():
    if not str(path[-1]).endswith('kernel'):
      continue
    size = float(np.prod(np.shape(leaf)))
    top = str(path[0])
    if top == 'encoder':
      matmul += size * enc_pos
    elif top == 'decoder':
      matmul += size * dec_pos
    elif top in ('mlm_head', 'lm_head', 'token_classifier'):
      matmul += size * head_pos
    else:  # pooler, pair head, classifier: one position per row
      matmul += size * b
  if cfg.tie_embeddings and cfg.head in ('lm', 'seq2seq_lm', 'mlm', 'mlm_nsp'):
    matmul += float(cfg.vocab_size * cfg.embed_dim) * head_pos
  width = cfg.num_heads * cfg.head_width
  attn = 0.0
  if cfg.family in ('encoder', 'encoder_decoder'):
    attn += 12.0 * cfg.num_layers * l * l * width * b
  if cfg.family == 'decoder':
    attn += 12.0 * cfg.num_layers * l * l * width * b
  if cfg.family == 'encoder_decoder':
    attn += 12.0 * cfg.decoder_layers * (lt * lt + lt * l) * width * b
  return {'matmul': 6.0 * matmul, 'attention': attn, 'total': 6.0 * matmul + attn}


_MEASURED_PEAK: dict[str, float] = {}


def device_peak_flops(dtype: str, override_tflops: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s, where the number comes from) for the default device and `dtype`."""
  if override_tflops:
    return override_tflops * 1e12, 'given with --peak_tflops'
  dev = jax.devices()[0]
  kind = getattr(dev, 'device_kind', '') or ''
  for key, table in PEAK_FLOPS.items():
    if key.lower() in kind.lower():
      value = table.get(dtype, table.get('bfloat16'))
      return value, f'{kind} datasheet ({dtype})'
  # No table entry (a CPU): measure a large matmul in the computation dtype.
  if dtype not in _MEASURED_PEAK:
    n = 2048
    dt = jnp.dtype(dtype)
    a = jnp.ones((n, n), dt)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    times = []
    for _ in range(5):
      t = time.perf_counter()
      jax.block_until_ready(f(a))
      times.append(time.perf_counter() - t)
    _MEASURED_PEAK[dtype] = 2.0 * n ** 3 / min(times)
  return _MEASURED_PEAK[dtype], f'measured {dtype} {2048}^3 matmul on {dev.platform} ({kind})'


# --------------------------------------------------------------------------------------------------
# The Hugging Face equivalent.
# --------------------------------------------------------------------------------------------------
def _hf_activation(name: str) -> str:
  return {'gelu': 'gelu', 'gelu_tanh': 'gelu_new', 'relu': 'relu', 'silu': 'silu'}.get(name, name)


def build_hf_model(config):
  """(model, description, loss_fn(model, torch_batch) -> loss) of the transformers equivalent."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from flaxformer_lab.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig.from_dict(config.model)
  seq = int(config.data.seq_len)
  attn_impl = os.environ.get('FLAXFORMER_HF_ATTENTION', 'sdpa')
  common = dict(attn_implementation=attn_impl)
  if cfg.family == 'decoder':
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=max(cfg.max_len, seq), n_embd=cfg.d_model,
        n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.hidden_dim,
        activation_function=_hf_activation(cfg.activation), resid_pdrop=cfg.dropout_rate,
        embd_pdrop=cfg.dropout_rate, attn_pdrop=cfg.attention_dropout_rate,
        layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None, eos_token_id=None, **common)
    model = transformers.GPT2LMHeadModel(hf_cfg)

    def loss_fn(m, tb):
      logits = m(input_ids=tb['inputs']).logits
      return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                               tb['targets'].reshape(-1))
    return model, 'GPT2LMHeadModel', loss_fn
  if cfg.family == 'encoder':
    hf_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.hidden_dim,
        hidden_act=_hf_activation(cfg.activation), hidden_dropout_prob=cfg.dropout_rate,
        attention_probs_dropout_prob=cfg.attention_dropout_rate,
        max_position_embeddings=max(cfg.max_len, seq),
        type_vocab_size=max(cfg.type_vocab_size, 1), layer_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, **common)
    if cfg.head == 'mlm_nsp':
      model = transformers.BertForPreTraining(hf_cfg)
      name = 'BertForPreTraining'
      loss_fn = lambda m, tb: m(input_ids=tb['inputs'], token_type_ids=tb['token_type_ids'],
                                labels=tb['labels'], next_sentence_label=tb['pair_label']).loss
    elif cfg.head == 'mlm':
      model = transformers.BertForMaskedLM(hf_cfg)
      name = 'BertForMaskedLM'
      loss_fn = lambda m, tb: m(input_ids=tb['inputs'], token_type_ids=tb['token_type_ids'],
                                labels=tb['labels']).loss
    else:
      raise ValueError(f'--vs_hf: no Hugging Face equivalent for an encoder with head {cfg.head!r}')
    return model, name, loss_fn
  if cfg.family == 'encoder_decoder' and cfg.position == 'relative_bias':
    gated = cfg.activation in ('geglu', 'geglu_tanh', 'swiglu', 'reglu')
    act = {'relu': 'relu', 'reglu': 'gated-relu', 'gelu': 'gelu', 'gelu_tanh': 'gelu_new',
           'geglu': 'gated-gelu', 'geglu_tanh': 'gated-gelu', 'silu': 'silu',
           'swiglu': 'gated-silu'}[cfg.activation]
    del gated
    hf_cfg = transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_width, d_ff=cfg.hidden_dim,
        num_layers=cfg.num_layers, num_decoder_layers=cfg.decoder_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_num_buckets,
        relative_attention_max_distance=cfg.relative_max_distance,
        dropout_rate=cfg.dropout_rate, layer_norm_epsilon=cfg.norm_eps, feed_forward_proj=act,
        tie_word_embeddings=cfg.tie_embeddings, decoder_start_token_id=0, pad_token_id=0,
        **common)
    model = transformers.T5ForConditionalGeneration(hf_cfg)
    loss_fn = lambda m, tb: m(input_ids=tb['encoder_inputs'],
                              decoder_input_ids=tb['decoder_inputs'],
                              labels=tb['decoder_targets']).loss
    return model, 'T5ForConditionalGeneration', loss_fn
  raise ValueError(f'--vs_hf: no Hugging Face equivalent for model.family={cfg.family!r} with '
                   f'position={cfg.position!r} (GPT-2, BERT MLM and T5 are mapped)')


def torch_batch(config, host_batch, device):
  import torch  # pylint: disable=g-import-not-at-top
  out = {}
  for k, v in host_batch.items():
    if v.dtype.kind in 'iu':
      out[k] = torch.from_numpy(np.asarray(v, np.int64)).to(device)
  if config.model.head in ('mlm', 'mlm_nsp'):  # HF's masked-LM labels (-100: not scored)
    labels = np.where(host_batch['weights'] > 0, host_batch['targets'], -100).astype(np.int64)
    out['labels'] = torch.from_numpy(labels).to(device)
  return out


class HFRunner:
  """One HF model + AdamW + clipping; `step()` runs one synchronous update."""

  def __init__(self, config, host_batch, compiled: bool, seed: int = 0):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    torch.manual_seed(seed)
    model, self.name, self.loss_fn = build_hf_model(config)
    self.model = model.to(self.device).train()
    self.num_params = sum(p.numel() for p in self.model.parameters())
    o = config.optim
    decay = [p for p in self.model.parameters() if p.ndim >= 2]
    no_decay = [p for p in self.model.parameters() if p.ndim < 2]
    self.opt = torch.optim.AdamW(
        [{'params': decay, 'weight_decay': float(o.weight_decay)},
         {'params': no_decay, 'weight_decay': 0.0}],
        lr=float(o.learning_rate), betas=(float(o.b1), float(o.b2)), eps=float(o.eps))
    self.clip = float(o.get('grad_clip_norm', 0.0))
    self.batch = torch_batch(config, host_batch, self.device)
    self.autocast_dtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16}.get(
        str(config.model.dtype))
    self.forward = torch.compile(self.model) if compiled else self.model
    self.compiled = compiled

  def step(self) -> float:
    torch = self.torch
    self.opt.zero_grad(set_to_none=True)
    ctx = (torch.autocast(self.device, dtype=self.autocast_dtype) if self.autocast_dtype
           else contextlib.nullcontext())
    with ctx:
      loss = self.loss_fn(self.forward, self.batch)
    loss.backward()
    if self.clip > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.opt.step()
    if self.device == 'cuda':
      torch.cuda.synchronize()
    return float(loss.detach())

  def peak_memory(self) -> Optional[int]:
    if self.device == 'cuda':
      return int(self.torch.cuda.max_memory_allocated())
    return None


# --------------------------------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------------------------------
def _stats(times: list[float], tokens: int, flops: float, peak: float) -> dict[str, Any]:
  med = statistics.median(times)
  q = np.percentile(times, [10, 90])
  return dict(step_s_median=med, step_s_p10=float(q[0]), step_s_p90=float(q[1]),
              step_s_min=min(times), steps_timed=len(times), step_s=list(times),
              tokens_per_s=tokens / med,
              mfu=flops / med / peak if peak else None)


def _loadavg() -> float:
  try:
    return os.getloadavg()[0]
  except OSError:
    return float('nan')


def _peak_rss_bytes() -> int:
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run(config, *, steps: int = 20, rounds: int = 5, warmup: int = 3, vs_hf: bool = False,
        hf_modes: tuple[str, ...] = ('eager', 'compile'), profile_dir: str = '',
        peak_tflops: float = 0.0, threads: int = 0, label: str = '') -> dict[str, Any]:
  """Measures the config's train step (and the HF equivalent); returns the result dict."""
  load_start = _loadavg()
  host_batch = synthetic_batch(config)
  tokens = tokens_per_step(config)
  t0 = time.perf_counter()
  lab = build_lab_step(config, host_batch)
  build_s = time.perf_counter() - t0
  flops = model_flops_per_step(config, lab.params_shapes)
  peak, peak_source = device_peak_flops(str(config.model.dtype), peak_tflops)
  state = lab.state

  def lab_step():
    nonlocal state
    t = time.perf_counter()
    state, metrics = lab.compiled(state, lab.batch)
    jax.block_until_ready(state)
    return time.perf_counter() - t, metrics

  with lab.mesh_context():
    first_s, metrics = lab_step()
  first_loss = float(metrics['loss'])

  runners: dict[str, HFRunner] = {}
  hf_info: dict[str, Any] = {}
  if vs_hf:
    import torch  # pylint: disable=g-import-not-at-top
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    hf_info.update(torch=torch.__version__, threads=threads)
    try:
      import transformers  # pylint: disable=g-import-not-at-top
      hf_info['transformers'] = transformers.__version__
    except ImportError:
      pass
    for mode in hf_modes:
      try:
        r = HFRunner(config, host_batch, compiled=mode == 'compile')
        t = time.perf_counter()
        loss = r.step()  # eager: warm-up; compile: the compilation
        first = time.perf_counter() - t
        for _ in range(max(warmup - 1, 0)):
          r.step()
        runners[mode] = r
        hf_info[mode] = dict(model=r.name, params=r.num_params, first_step_s=first,
                             first_loss=loss)
      except Exception as e:  # pylint: disable=broad-except
        hf_info[mode] = dict(error=f'{type(e).__name__}: {str(e).splitlines()[0][:300]}')

  # The lab's warm-up steps run after the HF models are built and compiled: building them
  # reshapes the process's heap, and the lab's first steps after that fault their buffers' pages
  # in again (4-5 s each on issue 12's rows), a start-up transient rather than a steady state.
  with lab.mesh_context():
    for _ in range(max(warmup - 1, 0)):
      lab_step()

  # Interleaved timed blocks.
  per_round = max(1, int(math.ceil(steps / max(rounds, 1))))
  times: dict[str, list[float]] = {'lab': [], **{m: [] for m in runners}}
  names = list(times)
  with lab.mesh_context():
    for r in range(rounds):
      order = names[r % len(names):] + names[:r % len(names)]
      for name in order:
        for _ in range(per_round):
          if name == 'lab':
            times['lab'].append(lab_step()[0])
          else:
            t = time.perf_counter()
            runners[name].step()
            times[name].append(time.perf_counter() - t)
    last_loss = float(lab_step()[1]['loss'])

  lab_stats = _stats(times['lab'], tokens, flops['total'], peak)
  lab_stats.update(compile_s=lab.compile_s, lower_s=lab.lower_s, first_step_s=first_s,
                   build_s=build_s, xla_flops_per_step=lab.xla_flops,
                   xla_memory_bytes=lab.memory_bytes, first_loss=first_loss, last_loss=last_loss,
                   params=int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(
                       lab.params_shapes))))
  dev = jax.devices()[0]
  stats = (dev.memory_stats() or {}) if hasattr(dev, 'memory_stats') else {}
  if stats.get('peak_bytes_in_use'):
    lab_stats['device_peak_bytes'] = int(stats['peak_bytes_in_use'])
  result: dict[str, Any] = dict(
      label=label or _describe(config), config=_config_summary(config), tokens_per_step=tokens,
      model_flops_per_step=flops, peak_flops=peak, peak_source=peak_source, lab=lab_stats,
      hf=hf_info, machine=_machine(), load_start=load_start)
  for mode, r in runners.items():
    s = _stats(times[mode], tokens, flops['total'], peak)
    s['compile_s'] = max(hf_info[mode]['first_step_s'] - s['step_s_median'], 0.0) if (
        mode == 'compile') else None
    s['peak_memory_bytes'] = r.peak_memory()
    s['ratio_lab'] = lab_stats['tokens_per_s'] / s['tokens_per_s']
    hf_info[mode].update(s)
  result['load_end'] = _loadavg()
  result['peak_rss_bytes'] = _peak_rss_bytes()

  if profile_dir:
    result['profile'] = profile(lab, state, profile_dir)
  return result


def profile(lab: LabStep, state, directory: str, steps: int = 3) -> dict[str, Any]:
  """A jax.profiler trace of `steps` lab steps in `directory`; returns where it is."""
  os.makedirs(directory, exist_ok=True)
  with lab.mesh_context():
    with jax.profiler.trace(directory):
      for i in range(steps):
        with jax.profiler.StepTraceAnnotation('train', step_num=i):
          state, _ = lab.compiled(state, lab.batch)
          jax.block_until_ready(state)
  top = _top_ops(directory, hlo_text=lab.hlo_text())
  return dict(directory=directory, top_ops=top)


_CPU_BOOKKEEPING = re.compile(r'ThunkExecutor::|SlinkyThreadPool::|ThreadpoolListener::|end: |'
                              r'while(\.\d+)?$|conditional(\.\d+)?$|call(\.\d+)?$')


def _op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the op_name metadata of the model code it came from."""
  names = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo_text,
                       re.MULTILINE):
    names.setdefault(m.group(1), m.group(2))
  return names


def _top_ops(directory: str, n: int = 15, hlo_text: str = '') -> list[dict[str, Any]]:
  """The most expensive XLA ops of the trace (total time over the traced steps), if readable,
  each with the model code it came from where the compiled HLO names it (`source`)."""
  import glob  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(os.path.join(directory, '**', '*.xplane.pb'), recursive=True))
  if not files:
    return []
  try:
    data = jax.profiler.ProfileData.from_file(files[-1])
  except Exception:  # pylint: disable=broad-except
    return []
  totals: dict[str, float] = {}
  for plane in data.planes:
    for line in plane.lines:
      # Accelerators: an 'XLA Ops' line per device. XLA CPU: its thunks run on the 'XLAEigen'
      # thread pool's lines, between the executor's own bookkeeping events.
      if 'XLA Ops' not in line.name and 'Ops' != line.name and 'XLAEigen' not in line.name:
        continue
      for ev in line.events:
        if _CPU_BOOKKEEPING.match(ev.name):
          continue
        totals[ev.name] = totals.get(ev.name, 0.0) + ev.duration_ns / 1e6
  ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:n]
  names = _op_names(hlo_text) if hlo_text else {}
  return [dict(op=k, ms=v, source=names.get(k, '')) for k, v in ranked]


# --------------------------------------------------------------------------------------------------
# Reporting.
# --------------------------------------------------------------------------------------------------
def _describe(config) -> str:
  m = config.model
  l, b = int(config.data.seq_len), int(config.batch_size)
  return (f'{m.family} {config.task} (d {m.d_model}, {m.num_layers} layers, {m.num_heads} heads, '
          f'mlp {m.mlp_dim or 4 * m.d_model}, vocab {m.vocab_size}, seq {l}, batch {b}, '
          f'{m.norm_position}-LN, {m.dtype})')


def _config_summary(config) -> dict[str, Any]:
  m = config.model
  keys = ('family', 'head', 'd_model', 'num_layers', 'num_heads', 'mlp_dim', 'vocab_size',
          'norm_position', 'position', 'dropout_rate', 'attention_dropout_rate', 'dtype',
          'attention_backend', 'scan_layers', 'scan_unroll', 'remat_policy')
  out = {f'model.{k}': m.get(k) for k in keys if k in m}
  out.update(task=config.task, batch_size=int(config.batch_size),
             seq_len=int(config.data.seq_len), rng_impl=config.get('rng_impl'),
             optimizer=str(config.optim.name))
  return out


_ISA_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'asimd', 'sve')


def cpu_description() -> str:
  """The host CPU's model name and its vector extensions (Linux /proc/cpuinfo), e.g.
  'Intel(R) Xeon(R) Processor (avx2 avx512f amx_bf16)'. Speeds on this project's shared CPU
  hosts differ by host and day; this names which one a measurement came from."""
  try:
    with open('/proc/cpuinfo') as f:
      info = f.read()
  except OSError:
    return platform.processor() or platform.machine()
  name = re.search(r'^(?:model name|Model)\s*:\s*(.+)$', info, re.MULTILINE)
  flags = re.search(r'^(?:flags|Features)\s*:\s*(.+)$', info, re.MULTILINE)
  have = set(flags.group(1).split()) if flags else set()
  isa = ' '.join(f for f in _ISA_FLAGS if f in have)
  return (name.group(1).strip() if name else platform.machine()) + (f' ({isa})' if isa else '')


def _machine() -> dict[str, Any]:
  dev = jax.devices()[0]
  return dict(platform=dev.platform, device_kind=getattr(dev, 'device_kind', ''),
              devices=jax.device_count(), cpu_cores=os.cpu_count(), python=platform.python_version(),
              jax=jax.__version__, host=platform.machine(), cpu=cpu_description(),
              xla_flags=os.environ.get('XLA_FLAGS', ''),
              glibc_tunables=os.environ.get('GLIBC_TUNABLES', ''))


def _fmt_int(x) -> str:
  return f'{x:,.0f}'


def _ms(s) -> str:
  return f'{1e3 * s:.0f}'


def markdown(results: list[dict[str, Any]]) -> str:
  """The summary table (tokens/s and ratios) and a details table, as markdown."""
  lines = ['| model | lab tokens/s | HF eager | HF torch.compile | lab / eager | lab / compiled |',
           '|---|---:|---:|---:|---:|---:|']
  for r in results:
    hf = r.get('hf', {})
    cell = lambda m: _fmt_int(hf[m]['tokens_per_s']) if m in hf and 'tokens_per_s' in hf[m] \
        else ('error' if m in hf else '-')
    ratio = lambda m: f'**{hf[m]["ratio_lab"]:.2f}x**' if m in hf and 'ratio_lab' in hf[m] \
        else '-'
    lines.append(f'| {r["label"]} | {_fmt_int(r["lab"]["tokens_per_s"])} | {cell("eager")} | '
                 f'{cell("compile")} | {ratio("eager")} | {ratio("compile")} |')
  lines += ['', '| model | impl | step ms median (p10-p90) | compile s | MFU | memory | params |',
            '|---|---|---:|---:|---:|---:|---:|']
  for r in results:
    lab = r['lab']
    mem = lab.get('device_peak_bytes') or lab.get('xla_memory_bytes')
    mfu = lambda s: f'{100 * s["mfu"]:.1f}%' if s.get('mfu') is not None else '-'
    lines.append(
        f'| {r["label"]} | lab | {_ms(lab["step_s_median"])} ({_ms(lab["step_s_p10"])}-'
        f'{_ms(lab["step_s_p90"])}) | {lab["compile_s"]:.1f} | {mfu(lab)} | '
        f'{mem / 2**20:.0f} MiB | {_fmt_int(lab["params"])} |' if mem else
        f'| {r["label"]} | lab | {_ms(lab["step_s_median"])} | {lab["compile_s"]:.1f} | '
        f'{mfu(lab)} | - | {_fmt_int(lab["params"])} |')
    for mode, s in r.get('hf', {}).items():
      if not isinstance(s, dict):
        continue
      if 'error' in s:
        lines.append(f'| {r["label"]} | HF {mode} | {s["error"]} | | | | |')
        continue
      comp = f'{s["compile_s"]:.1f}' if s.get('compile_s') is not None else '-'
      mem = f'{s["peak_memory_bytes"] / 2**20:.0f} MiB' if s.get('peak_memory_bytes') else '-'
      lines.append(f'| {r["label"]} | HF {mode} ({s["model"]}) | {_ms(s["step_s_median"])} '
                   f'({_ms(s["step_s_p10"])}-{_ms(s["step_s_p90"])}) | {comp} | {mfu(s)} | '
                   f'{mem} | {_fmt_int(s["params"])} |')
  r0 = results[0]
  m = r0['machine']
  hf = r0.get('hf', {})
  cpu = f' of {m["cpu"]}' if m.get('cpu') else ''
  lines += ['', f'Machine: {m["platform"]} {m["device_kind"]}, {m["cpu_cores"]} CPU cores{cpu}, '
            f'jax {m["jax"]}' + (f', torch {hf["torch"]} ({hf["threads"]} threads)'
                                 if 'torch' in hf else '') +
            (f', transformers {hf["transformers"]}' if 'transformers' in hf else '') +
            f'. GLIBC_TUNABLES={m.get("glibc_tunables") or "(unset)"}'
            f'. Load average (1 min): ' + ', '.join(
                f'{r["load_start"]:.2f} -> {r["load_end"]:.2f}' for r in results) +
            f'. MFU against {r0["peak_source"]} = {r0["peak_flops"] / 1e12:.2f} TFLOP/s; model '
            'FLOPs = 6 x matmul weights x positions + 12 x layers x T x S x width (no causal '
            'halving).']
  return '\n'.join(lines)


# --------------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------------
def main(argv=None):
  hostmem.reexec_with_tunables('flaxformer_lab.bench')  # CPU: malloc reusing pages (hostmem.py)
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv if argv is None else argv)
  fl = flags.FlagValues()
  cfg_flag = config_flags.DEFINE_config_file('config', None, 'configs/<family>.py:<arg>',
                                             flag_values=fl, lock_config=True, sys_argv=argv)
  flags.DEFINE_integer('steps', 20, 'timed steps per implementation', flag_values=fl)
  flags.DEFINE_integer('rounds', 5, 'interleaved rounds the timed steps are split into',
                       flag_values=fl)
  flags.DEFINE_integer('warmup', 3, 'untimed steps (the compiling one included) before timing',
                       flag_values=fl)
  flags.DEFINE_bool('vs_hf', False, 'also time the Hugging Face equivalent', flag_values=fl)
  flags.DEFINE_string('hf_modes', 'eager,compile', 'HF variants: eager, compile', flag_values=fl)
  flags.DEFINE_string('json', '', 'write the result as JSON to this file', flag_values=fl)
  flags.DEFINE_string('markdown', '', 'write the markdown tables to this file', flag_values=fl)
  flags.DEFINE_string('profile', '', 'write a jax.profiler trace of the lab step here',
                      flag_values=fl)
  flags.DEFINE_float('peak_tflops', 0.0, 'peak TFLOP/s for MFU (default: table or measured)',
                     flag_values=fl)
  flags.DEFINE_integer('threads', 0, 'torch threads (default: the CPU count)', flag_values=fl)
  flags.DEFINE_string('label', '', 'row label in the table', flag_values=fl)
  try:
    rest = fl(argv)
  except Exception as e:  # pylint: disable=broad-except
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
  if len(rest) > 1:
    print(f'error: unexpected arguments: {" ".join(rest[1:])}', file=sys.stderr)
    return 2
  config = cfg_flag.value
  if config is None:
    print('error: --config is required (e.g. --config=configs/gpt2.py:tiny)', file=sys.stderr)
    return 2
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')
  result = run(config, steps=fl.steps, rounds=fl.rounds, warmup=fl.warmup, vs_hf=fl.vs_hf,
               hf_modes=tuple(m for m in fl.hf_modes.split(',') if m), profile_dir=fl.profile,
               peak_tflops=fl.peak_tflops, threads=fl.threads, label=fl.label)
  table = markdown([result])
  print(table)
  if result.get('profile', {}).get('top_ops'):
    print(f'\nprofile written to {result["profile"]["directory"]}; most expensive XLA ops:')
    for op in result['profile']['top_ops']:
      print(f'  {op["ms"]:9.2f} ms  {op["op"]:28s} {op.get("source", "")[-90:]}')
  if fl.json:
    with open(fl.json, 'w') as f:
      json.dump(result, f, indent=2, default=str)
  if fl.markdown:
    with open(fl.markdown, 'w') as f:
      f.write(table + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
