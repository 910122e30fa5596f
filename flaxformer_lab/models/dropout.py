"""Dropout whose randomness costs fewer PRNG calls: `model.dropout_bits` random bits per element.

`flax.linen.Dropout` draws `jax.random.bernoulli`: one 32-bit word per element, turned into a float
and compared with the keep probability. Under the default threefry PRNG (partitionable) every
32-bit word is one threefry2x32 evaluation, and on the CPU those evaluations were the lab's
dropout cost (issue 12: dropout was a quarter of the GPT-2 row's step). With `bits` 16 or 8, one
word is split into 2 or 4 unsigned integers, each compared with an integer threshold: 2x or 4x
fewer PRNG evaluations per element. The threshold is `round(rate * 2**bits)`, so the rate actually
applied is `threshold / 2**bits` (0.1 -> 0.09999 at 16 bits, 0.1016 at 8) and the kept values are
scaled by the inverse of the exact keep probability, so that the expectation is the identity.
`bits=32` is `flax.linen.Dropout` exactly (same mask from the same key).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flaxformer_lab.models.config import DROPOUT_BITS


def applied_rate(rate: float, bits: int) -> float:
  """The dropout probability that `keep_mask(..., rate, bits)` applies."""
  if bits == 32:
    return float(rate)
  return round(rate * 2 ** bits) / 2 ** bits


def keep_mask(rng, rate: float, shape: Sequence[int], bits: int = 32) -> jax.Array:
  """A boolean mask of `shape`, True with probability `1 - applied_rate(rate, bits)`."""
  shape = tuple(shape)
  if bits == 32:
    return jax.random.bernoulli(rng, 1.0 - rate, shape)
  if bits not in DROPOUT_BITS:
    raise ValueError(f'dropout bits must be one of {DROPOUT_BITS}, got {bits}')
  per_word = 32 // bits
  size = math.prod(shape)
  words = jax.random.bits(rng, (-(-size // per_word),), jnp.uint32)
  small = lax.bitcast_convert_type(words, jnp.dtype(f'uint{bits}')).reshape(-1)[:size]
  threshold = round(rate * 2 ** bits)
  return (small >= jnp.asarray(threshold, small.dtype)).reshape(shape)


def apply_dropout(x, rng, rate: float, bits: int = 32):
  """`x` with elements zeroed at `applied_rate(rate, bits)` and the rest scaled to keep the mean."""
  keep = keep_mask(rng, rate, x.shape, bits)
  return lax.select(keep, x / (1.0 - applied_rate(rate, bits)), jnp.zeros_like(x))


class Dropout(nn.Module):
  """`flax.linen.Dropout` (the 'dropout' rng collection, `deterministic` at call) with `bits`."""
  rate: float
  bits: int = 32
  deterministic: Optional[bool] = None

  @nn.compact
  def __call__(self, x, deterministic: Optional[bool] = None):
    deterministic = nn.merge_param('deterministic', self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    return apply_dropout(x, self.make_rng('dropout'), self.rate, self.bits)
