"""Optimizers, learning-rate schedules, the weight-decay mask and gradient accumulation.

The train loop needs three things from here:

  tx, lr_fn = make_optimizer(config.optim, config.num_steps)
  # tx: an optax.GradientTransformation (clipping + AdamW | Adafactor | LAMB, float32 state);
  # lr_fn(step) -> float32 learning rate of the update that follows `step` completed updates.

  (loss, metrics), grads = accumulate_gradients(
      jax.value_and_grad(loss_fn, has_aux=True), params, batch, config.optim.grad_accum_steps)

`accumulate_gradients` runs inside the jitted train step, so one call of the step is one optimizer
update whatever the number of micro-batches (no optax.MultiSteps).

Schedules (`peak` = optim.learning_rate, `w` = warmup_steps, `N` = num_steps,
`end` = end_lr_fraction * peak; `step` counts completed updates, so the first update uses step 0):

  constant  peak * min(1, step / w)                            (w = 0: peak)
  rsqrt     peak * min(step / w, sqrt(w / step))               (Vaswani et al.; the peak is at step w)
            w = 0 has no warmup and decays from the first step: peak / sqrt(max(step, 1))
  linear    warmup, then peak -> end linearly over steps w..N, then end      (BERT)
  cosine    warmup, then end + (peak - end) * (1 + cos(pi * t)) / 2, t = (step - w) / (N - w) in [0, 1]

When N <= w the decay phase is empty: the warmup is cut off at step N (never reaches the peak) and
the later steps use `end`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from flax.core import meta
import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ('adamw', 'adafactor', 'lamb')
SCHEDULES = ('constant', 'rsqrt', 'linear', 'cosine')

# Leaves with one of these names are never decayed (BERT: biases and LayerNorm weights) ...
NO_DECAY_LEAF_NAMES = ('bias', 'scale')
# ... nor is any leaf below a module whose name contains this (LayerNorm_0, final_norm, rms_norm).
NO_DECAY_MODULE_SUBSTRING = 'norm'

Schedule = Callable[[Any], jax.Array]


def _check_choice(kind: str, value: str, valid: tuple[str, ...]) -> None:
  if value not in valid:
    raise ValueError(f'config.{kind}={value!r} is unknown; valid: {", ".join(valid)}')


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(optim_config) -> None:
  """Raises ValueError naming the `optim.<field>` that cannot work and what to change."""
  o = optim_config
  _check_choice('optim.name', o.name, OPTIMIZERS)
  _check_choice('optim.schedule', o.schedule, SCHEDULES)
  checks = [
      ('learning_rate', lambda v: v >= 0, 'must be >= 0 (the peak learning rate)'),
      ('warmup_steps', lambda v: v >= 0 and float(v).is_integer(), 'must be an integer >= 0'),
      ('grad_accum_steps', lambda v: v >= 1 and float(v).is_integer(),
       'must be an integer >= 1 (micro-batches per update)'),
      ('end_lr_fraction', lambda v: v >= 0, 'must be >= 0 (final lr as a fraction of the peak)'),
      ('weight_decay', lambda v: v >= 0, 'must be >= 0'),
      ('grad_clip_norm', lambda v: v >= 0, 'must be >= 0 (0 = no clipping)'),
  ]
  if o.name in ('adamw', 'lamb'):
    checks += [
        ('b1', lambda v: 0 <= v < 1, 'must be in [0, 1)'),
        ('b2', lambda v: 0 <= v < 1, 'must be in [0, 1)'),
        ('eps', lambda v: v > 0, 'must be > 0 (with eps=0 a parameter that never gets a gradient '
         'becomes 0/0 = NaN); the usual value is 1e-8'),
    ]
  for name, ok, rule in checks:
    value = o.get(name)
    if not _number(value):
      raise ValueError(f'config.optim.{name}={value!r} must be a finite number and {rule[5:]}')
    if not ok(value):
      raise ValueError(f'config.optim.{name}={value!r} {rule}')


def make_schedule(name: str, peak: float, warmup_steps: int, num_steps: int,
                  end_lr_fraction: float = 0.0) -> Schedule:
  """Returns `lr(step) -> float32 array` for one of `SCHEDULES` (formulas in the module docstring)."""
  _check_choice('optim.schedule', name, SCHEDULES)
  if warmup_steps < 0:
    raise ValueError(f'warmup_steps must be >= 0, got {warmup_steps}')
  peak = float(peak)
  end = float(end_lr_fraction) * peak
  w = int(warmup_steps)
  decay_steps = max(int(num_steps) - w, 1)

  def warmup(step):
    return jnp.minimum(1.0, step / w) if w > 0 else jnp.ones_like(step)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if name == 'constant':
      lr = peak * warmup(step)
    elif name == 'rsqrt':
      decay = jnp.sqrt(max(w, 1) / jnp.maximum(step, 1.0))
      lr = peak * jnp.minimum(warmup(step), decay)
    else:
      t = jnp.clip((step - w) / decay_steps, 0.0, 1.0)
      if name == 'linear':
        decayed = peak + (end - peak) * t
      else:  # cosine
        decayed = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * t))
      if w > 0:
        lr = jnp.where(step < w, peak * step / w, decayed)
      else:
        lr = decayed
      if int(num_steps) <= w:  # no decay phase: past num_steps use the end value
        lr = jnp.where(step >= num_steps, end, lr)
    return lr.astype(jnp.float32)

  return schedule


def _path_names(path) -> list[str]:
  names = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return names


def _is_box(x) -> bool:
  # Flax's partitioning boxes (nn.LogicallyPartitioned, nn.Partitioned) are AxisMetadata.
  return isinstance(x, meta.AxisMetadata)


def decays(path_names: list[str]) -> bool:
  """Whether a parameter at this path (module names..., leaf name) gets weight decay.

  Decided by name, never by rank: a scanned kernel [layers, embed, mlp] and a scanned norm scale
  [layers, embed] differ only in their names. Biases and norm parameters are excluded (BERT);
  kernels, embeddings (token, position, relative-position tables) are decayed.
  """
  if not path_names:
    return True
  if path_names[-1] in NO_DECAY_LEAF_NAMES:
    return False
  return not any(NO_DECAY_MODULE_SUBSTRING in n.lower() for n in path_names[:-1])


def decay_mask(params: Any) -> Any:
  """A tree of bools shaped like `params`: True where weight decay applies (see `decays`).

  Accepts boxed (nn.LogicallyPartitioned) or plain params; a box gets one bool.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: decays(_path_names(path)), params, is_leaf=_is_box)


def _to_float32(x):
  if x is None or not hasattr(x, 'dtype'):
    return x
  return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x


def float32_state(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Runs `inner` in float32: its state is float32 and it sees float32 params and gradients.

  Updates come back in the parameters' dtype, so bfloat16 params or gradients never turn the
  moments into bfloat16.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return inner.init(jax.tree.map(_to_float32, params))

  def update_fn(updates, state, params=None, **extra_args):
    out_dtypes = jax.tree.map(lambda u: getattr(u, 'dtype', None),
                              updates if params is None else params)
    new_updates, new_state = inner.update(
        jax.tree.map(_to_float32, updates), state,
        None if params is None else jax.tree.map(_to_float32, params), **extra_args)
    new_updates = jax.tree.map(
        lambda u, d: u if d is None else u.astype(d), new_updates, out_dtypes)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_optimizer(optim_config, num_steps: int) -> tuple[optax.GradientTransformation, Schedule]:
  """Builds the optimizer of `config.optim` and its learning-rate schedule.

  Args:
    optim_config: the `optim` section (configs/common.py: `optim_config()`).
    num_steps: total number of updates (the end of the linear/cosine decay).

  Returns:
    (tx, schedule): `tx` = clip_by_global_norm (when grad_clip_norm > 0) then the optimizer, with
    decoupled weight decay masked by `decay_mask`, its state in float32; `schedule(step)` is the
    learning rate used by the update after `step` completed updates (log it as 'train/lr').

  AdamW and LAMB use b1, b2, eps. Adafactor uses optax's defaults (factored second moments,
  decay_rate 0.8, update clipping 1.0, parameter-scaled steps: its learning rate is relative to the
  parameter RMS, T5 style, unless `adafactor_param_scale` is False: absolute steps) and the same
  decoupled decay `lr(step) * weight_decay * param`.
  """
  o = optim_config
  validate(o)
  schedule = make_schedule(o.schedule, o.learning_rate, o.warmup_steps, num_steps,
                           o.end_lr_fraction)
  if o.grad_accum_steps < 1:
    raise ValueError(f'optim.grad_accum_steps must be >= 1, got {o.grad_accum_steps}')
  wd = float(o.weight_decay)
  if o.name == 'adamw':
    opt = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=wd, mask=decay_mask)
  elif o.name == 'lamb':
    opt = optax.lamb(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=wd, mask=decay_mask)
  else:
    opt = optax.adafactor(
        schedule, weight_decay_rate=(lambda count: wd * schedule(count)) if wd else None,
        weight_decay_mask=decay_mask,
        multiply_by_parameter_scale=bool(o.get('adafactor_param_scale', True)))
  parts = []
  if o.grad_clip_norm and o.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(o.grad_clip_norm)))
  parts.append(opt)
  return float32_state(optax.chain(*parts)), schedule


def split_microbatches(batch: Any, num_micro: int) -> Any:
  """[B, ...] leaves -> [num_micro, B // num_micro, ...]; micro-batch m holds rows m, m+M, m+2M, ...

  The strided split keeps every micro-batch spread over all data-parallel devices (each device's
  contiguous block of rows contributes to every micro-batch), so no resharding is needed.
  """
  def split(x):
    b = x.shape[0]
    if b % num_micro:
      raise ValueError(f'batch dimension {b} is not divisible by grad_accum_steps={num_micro}')
    x = x.reshape((b // num_micro, num_micro) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def accumulate_gradients(loss_and_grad_fn: Callable[..., Any], params: Any, batch: Any,
                         num_micro: int, rng: jax.Array | None = None) -> tuple[Any, Any]:
  """Mean loss, aux metrics and gradients over `num_micro` micro-batches of `batch` (inside jit).

  Args:
    loss_and_grad_fn: `jax.value_and_grad(loss_fn, has_aux=True)`, called as
      `fn(params, micro_batch)` or, when `rng` is given, `fn(params, micro_batch, micro_rng)` with
      `micro_rng = jax.random.fold_in(rng, m)`; returns `((loss, metrics), grads)`.
    params: the parameters (passed through unchanged).
    batch: a pytree whose leaves share the leading batch axis (divisible by `num_micro`).
    num_micro: number of micro-batches (config.optim.grad_accum_steps); 1 calls the function once.
    rng: optional PRNG key (e.g. dropout), folded with the micro-batch index.

  Returns:
    `((loss, metrics), grads)` with the same structure as `loss_and_grad_fn`'s output, each the
    unweighted mean over micro-batches (accumulated in float32; grads cast back to their dtype).
    This equals the full-batch result when the loss is a mean over equally weighted examples; a
    loss normalized per micro-batch by a varying token count is only approximately reproduced.
  """
  def call(micro, m):
    if rng is None:
      return loss_and_grad_fn(params, micro)
    return loss_and_grad_fn(params, micro, jax.random.fold_in(rng, m))

  if num_micro == 1:
    return call(batch, 0)
  micro_batches = split_microbatches(batch, num_micro)
  first = jax.tree.map(lambda x: x[0], micro_batches)
  out_shape = jax.eval_shape(lambda b: call(b, 0), first)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)),
                       out_shape)

  def body(acc, xs):
    m, micro = xs
    out = call(micro, m)
    return jax.tree.map(lambda a, o: a + o.astype(a.dtype), acc, out), None

  total, _ = jax.lax.scan(body, zeros, (jnp.arange(num_micro), micro_batches))
  return jax.tree.map(lambda t, s: (t / num_micro).astype(s.dtype), total, out_shape)
