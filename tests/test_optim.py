"""Tests of flaxformer_lab.optim: schedules, decay mask, clipping, optimizers, accumulation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxformer_lab.presets import common
from flaxformer_lab import optim


def _cfg(**kw):
  return common.optim_config(**kw)


# --- schedules -----------------------------------------------------------------------------------

PEAK, W, N, END = 2e-3, 10, 110, 0.1
STEPS = [0, 1, 5, 10, 11, 50, 109, 110, 200]


def _closed_form(name, step, w):
  end = END * PEAK
  warm = min(1.0, step / w) if w else 1.0
  if name == 'constant':
    return PEAK * warm
  if name == 'rsqrt':
    if w == 0:
      return PEAK / math.sqrt(max(step, 1))
    return PEAK * min(step / w, math.sqrt(w / step) if step else float('inf'))
  if step < w:
    return PEAK * step / w
  t = min(max((step - w) / (N - w), 0.0), 1.0)
  if name == 'linear':
    return PEAK + (end - PEAK) * t
  return end + (PEAK - end) * 0.5 * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize('name', optim.SCHEDULES)
@pytest.mark.parametrize('warmup', [W, 0])
def test_schedule_matches_closed_form(name, warmup):
  fn = optim.make_schedule(name, PEAK, warmup, N, END)
  got = np.asarray(jax.vmap(fn)(jnp.asarray(STEPS)))
  want = np.array([_closed_form(name, s, warmup) for s in STEPS])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
  assert np.all(np.isfinite(got))
  assert got.dtype == np.float32


def test_schedule_landmarks():
  lin = optim.make_schedule('linear', 1.0, 10, 110, 0.0)
  cos = optim.make_schedule('cosine', 1.0, 0, 100, 0.5)
  rsq = optim.make_schedule('rsqrt', 1.0, 100, 1000)
  assert float(lin(0)) == 0.0 and float(lin(10)) == pytest.approx(1.0)
  assert float(lin(60)) == pytest.approx(0.5) and float(lin(110)) == 0.0
  assert float(cos(0)) == pytest.approx(1.0) and float(cos(50)) == pytest.approx(0.75)
  assert float(cos(100)) == pytest.approx(0.5) and float(cos(500)) == pytest.approx(0.5)
  assert float(rsq(100)) == pytest.approx(1.0) and float(rsq(400)) == pytest.approx(0.5)


def test_schedule_shorter_than_warmup_is_finite():
  fn = optim.make_schedule('cosine', 1.0, 100, 5, 0.0)
  vals = [float(fn(s)) for s in range(8)]
  assert vals[:5] == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04])
  assert vals[5:] == [0.0, 0.0, 0.0]


def test_unknown_names_list_valid_ones():
  with pytest.raises(ValueError, match='adamw, adafactor, lamb'):
    optim.make_optimizer(_cfg(name='sgd'), 10)
  with pytest.raises(ValueError, match='constant, rsqrt, linear, cosine'):
    optim.make_optimizer(_cfg(schedule='exp'), 10)


# --- weight-decay mask ---------------------------------------------------------------------------

def _realistic_params(layers=3, d=4, f=8, v=16):
  z = lambda *s: jnp.zeros(s)
  return {
      'embed': {'embedding': z(v, d)},
      'pos_embed': {'embedding': z(32, d)},
      'layers': {  # scanned: leading stacked axis
          'attention': {'query': {'kernel': z(layers, d, 2, 2)}, 'out': {'kernel': z(layers, 2, 2, d),
                                                                         'bias': z(layers, d)}},
          'mlp': {'wi': {'kernel': z(layers, d, f), 'bias': z(layers, f)},
                  'wo': {'kernel': z(layers, f, d)}},
          'pre_attention_norm': {'scale': z(layers, d), 'bias': z(layers, d)},
          'LayerNorm_0': {'scale': z(layers, d)},
      },
      'final_norm': {'scale': z(d)},
      'head': {'kernel': z(d, v), 'bias': z(v)},
  }


def test_decay_mask_by_name_not_rank():
  mask = optim.decay_mask(_realistic_params())
  assert mask['embed']['embedding'] and mask['pos_embed']['embedding']
  assert mask['layers']['attention']['query']['kernel']
  assert mask['layers']['mlp']['wi']['kernel'] and mask['layers']['mlp']['wo']['kernel']
  assert mask['head']['kernel']
  assert not mask['layers']['attention']['out']['bias']   # 2-D (stacked) bias
  assert not mask['layers']['mlp']['wi']['bias']
  assert not mask['layers']['pre_attention_norm']['scale']  # [L, D] norm scale
  assert not mask['layers']['pre_attention_norm']['bias']
  assert not mask['layers']['LayerNorm_0']['scale']
  assert not mask['final_norm']['scale']
  assert not mask['head']['bias']


def test_decay_mask_on_boxed_params():
  import flax.linen as nn
  boxed = {'dense': {'kernel': nn.LogicallyPartitioned(jnp.ones((2, 3)), ('embed', 'mlp')),
                     'bias': nn.LogicallyPartitioned(jnp.ones((3,)), ('mlp',))}}
  assert optim.decay_mask(boxed) == {'dense': {'kernel': True, 'bias': False}}


def test_weight_decay_skips_masked_params():
  # Zero gradients: only decoupled weight decay moves the parameters.
  params = {'w': {'kernel': jnp.ones((2, 2))}, 'norm': {'scale': jnp.ones((2,))}}
  tx, _ = optim.make_optimizer(_cfg(schedule='constant', warmup_steps=0, learning_rate=0.1,
                                    weight_decay=0.5, grad_clip_norm=0.0), 10)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['w']['kernel'], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(updates['norm']['scale'], np.zeros(2))


# --- clipping, optimizers ------------------------------------------------------------------------

def test_clipping_scales_gradient_to_max_norm():
  params = {'a': jnp.zeros((4,)), 'b': jnp.zeros((3,))}
  grads = {'a': jnp.array([6.0, 0, 0, 0]), 'b': jnp.array([0.0, 8.0, 0])}  # global norm 10
  assert float(optax.tree.norm(grads)) == pytest.approx(10.0)
  cfg = _cfg(grad_clip_norm=1.0, weight_decay=0.0, b1=0.9)
  tx, _ = optim.make_optimizer(cfg, 10)
  _, state = tx.update(grads, tx.init(params), params)
  adam_state = state[1][0]  # chain(clip, adamw(chain(scale_by_adam, ...)))
  assert isinstance(adam_state, optax.ScaleByAdamState)
  # mu = (1 - b1) * clipped gradient = 0.1 * g / 10
  np.testing.assert_allclose(adam_state.mu['a'], [0.06, 0, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(adam_state.mu['b'], [0, 0.08, 0], rtol=1e-6)
  # Without clipping the moment keeps the full gradient.
  tx, _ = optim.make_optimizer(_cfg(grad_clip_norm=0.0, weight_decay=0.0), 10)
  _, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(state[0][0].mu['a'], [0.6, 0, 0, 0], rtol=1e-6)


@pytest.mark.parametrize('name,lr', [('adamw', 0.05), ('lamb', 0.05), ('adafactor', 0.1)])
def test_optimizers_reduce_quadratic(name, lr):
  target = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
  params = {'dense': {'kernel': jnp.zeros((3, 4)) + 0.5, 'bias': jnp.zeros((4,))}}
  loss_fn = lambda p: jnp.sum((p['dense']['kernel'] - target) ** 2) + jnp.sum(
      (p['dense']['bias'] - 0.3) ** 2)
  tx, _ = optim.make_optimizer(_cfg(name=name, learning_rate=lr, warmup_steps=5,
                                    schedule='cosine', weight_decay=0.0), 100)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state = tx.init(params)
  first = float(loss_fn(params))
  for _ in range(100):
    params, state, _ = step(params, state)
  assert float(loss_fn(params)) < 0.1 * first, name


@pytest.mark.parametrize('name', optim.OPTIMIZERS)
def test_state_stays_float32_with_bfloat16(name):
  params = {'dense': {'kernel': jnp.ones((4, 6), jnp.bfloat16), 'bias': jnp.ones((6,), jnp.float32)}}
  tx, _ = optim.make_optimizer(_cfg(name=name), 10)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.1, jnp.bfloat16), params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  float_leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert float_leaves and all(x.dtype == jnp.float32 for x in float_leaves)
  assert updates['dense']['kernel'].dtype == jnp.bfloat16
  assert updates['dense']['bias'].dtype == jnp.float32


# --- gradient accumulation -----------------------------------------------------------------------

def _linear_loss(params, batch):
  pred = batch['x'] @ params['w'] + params['b']
  loss = jnp.mean((pred - batch['y']) ** 2)
  return loss, {'abs_err': jnp.mean(jnp.abs(pred - batch['y']))}


def test_accumulate_four_microbatches_equals_full_batch():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {'w': jax.random.normal(k1, (5, 3)), 'b': jnp.zeros((3,))}
  batch = {'x': jax.random.normal(k2, (16, 5)), 'y': jax.random.normal(k3, (16, 3))}
  grad_fn = jax.value_and_grad(_linear_loss, has_aux=True)
  (loss, aux), grads = jax.jit(grad_fn)(params, batch)
  (aloss, aaux), agrads = jax.jit(
      lambda p, b: optim.accumulate_gradients(grad_fn, p, b, 4))(params, batch)
  np.testing.assert_allclose(aloss, loss, rtol=1e-5)
  np.testing.assert_allclose(aaux['abs_err'], aux['abs_err'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(agrads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_accumulate_passes_distinct_rngs_and_checks_divisibility():
  params = {'w': jnp.ones(())}
  batch = {'x': jnp.ones((6, 2))}

  def fn(p, b, rng):
    noise = jax.random.uniform(rng, ())
    return (noise, {'n': noise}), {'w': p['w'] * 0}

  (loss, aux), _ = optim.accumulate_gradients(fn, params, batch, 3, rng=jax.random.key(1))
  want = np.mean([jax.random.uniform(jax.random.fold_in(jax.random.key(1), m), ())
                  for m in range(3)])
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  with pytest.raises(ValueError, match='not divisible by grad_accum_steps=4'):
    optim.accumulate_gradients(fn, params, batch, 4, rng=jax.random.key(1))
