"""The fast cross entropy (flaxformer_lab.losses) against the original formulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lab import losses


def _batch(seed=0, b=3, l=7, v=50, scale=3.0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  logits = scale * jax.random.normal(k1, (b, l, v), jnp.float32)
  targets = jax.random.randint(k2, (b, l), 0, v)
  # Every other position's target is its top logit, so accuracy is really compared.
  targets = jnp.where(jnp.arange(l) % 2 == 0, jnp.argmax(logits, -1), targets)
  weights = (jax.random.uniform(k3, (b, l)) > 0.3).astype(jnp.float32)
  return logits, targets, weights


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_values_match_the_original_formulation(smoothing):
  logits, targets, weights = _batch()
  new = losses.cross_entropy(logits, targets, weights, smoothing)
  old = losses.reference_cross_entropy(logits, targets, weights, smoothing)
  for name, a, b in zip(('loss', 'nll', 'correct', 'weight'), new, old):
    assert _rel(a, b) < 1e-5, (name, a, b)
  assert float(new[2]) > 0  # some positions are right, so accuracy is really compared


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_gradients_match_the_original_formulation(smoothing):
  logits, targets, weights = _batch(1)

  def mean_loss(fn):
    return lambda x: (lambda s: s[0] / s[3])(fn(x, targets, weights, smoothing))

  g_new = jax.grad(mean_loss(losses.cross_entropy))(logits)
  g_old = jax.grad(mean_loss(losses.reference_cross_entropy))(logits)
  assert _rel(g_new, g_old) < 1e-5
  # Unscored positions get no gradient at all.
  assert float(jnp.abs(g_new * (1 - weights)[..., None]).max()) == 0.0


def test_gradient_through_a_tied_head_matches():
  """Loss and gradients of hidden states and table through `h @ E^T`, as the LM head does."""
  k = jax.random.split(jax.random.PRNGKey(2), 3)
  h = jax.random.normal(k[0], (2, 5, 16))
  table = 0.3 * jax.random.normal(k[1], (40, 16))
  targets = jax.random.randint(k[2], (2, 5), 0, 40)
  weights = jnp.ones((2, 5))

  def f(fn):
    def loss(h, table):
      s = fn(jnp.einsum('bld,vd->blv', h, table), targets, weights, 0.0)
      return s[0] / s[3]
    return jax.value_and_grad(loss, argnums=(0, 1))(h, table)

  (v_new, (gh_new, gt_new)), (v_old, (gh_old, gt_old)) = f(losses.cross_entropy), f(
      losses.reference_cross_entropy)
  assert _rel(v_new, v_old) < 1e-5
  assert _rel(gh_new, gh_old) < 1e-5
  assert _rel(gt_new, gt_old) < 1e-5


def test_large_logits_stay_finite_and_exact():
  """The max shift keeps exp() in range: logits of 1e4 give the same loss as logits shifted to 0."""
  logits, targets, weights = _batch(3)
  shifted = losses.cross_entropy(logits + 1e4, targets, weights)
  plain = losses.cross_entropy(logits, targets, weights)
  assert np.isfinite(float(shifted[0]))
  assert abs(float(shifted[1]) - float(plain[1])) / float(plain[1]) < 1e-3  # float32 at 1e4


def test_accuracy_counts_argmax_hits_and_is_outside_the_gradient():
  logits = jnp.asarray([[[0.0, 5.0, 1.0], [2.0, 0.0, 1.0]]])
  targets = jnp.asarray([[1, 2]])
  weights = jnp.asarray([[1.0, 1.0]])
  _, _, correct, count = losses.cross_entropy(logits, targets, weights)
  assert float(correct) == 1.0 and float(count) == 2.0
  g = jax.grad(lambda x: losses.cross_entropy(x, targets, weights)[2])(logits)
  assert float(jnp.abs(g).max()) == 0.0


def test_bfloat16_logits_are_computed_in_float32():
  logits, targets, weights = _batch(4)
  low = logits.astype(jnp.bfloat16)
  new = losses.cross_entropy(low, targets, weights, 0.1)
  old = losses.reference_cross_entropy(low, targets, weights, 0.1)
  assert all(x.dtype == jnp.float32 for x in new)
  assert _rel(new[0], old[0]) < 1e-5


def test_the_objectives_use_the_fast_loss_and_match_the_original():
  from flaxformer_lab.tasks import base  # pylint: disable=g-import-not-at-top
  assert base.cross_entropy is losses.cross_entropy
  logits, targets, weights = _batch(5)
  ours = base.cross_entropy(logits, targets, weights, 0.1)
  theirs = losses.reference_cross_entropy(logits, targets, weights, 0.1)
  assert len(ours) == len(theirs) == 4
  for a, b in zip(ours, theirs):
    assert _rel(a, b) < 1e-5
