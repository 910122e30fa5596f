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

The random words themselves: on the CPU, jax lowers its threefry2x32 hash as a rolled loop (five
iterations of a `while`), so every dropout's words are materialized array by array, iteration by
iteration, before the compare and select can read them. `random_words` computes the same words
(bit for bit `jax.random.bits(key, (n,), uint32)` under jax's default partitionable threefry; any
other PRNG implementation or setting goes to `jax.random.bits`) as straight-line integer ops that
XLA fuses into the mask's consumer: the GPT-2 row of the CPU benchmark took 0.90x the step time
(1,011 / 977 -> 900 ms, and 1,065 -> 901 MiB of temporaries) with no change to any mask.
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


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotate_left(x, r: int):
  return lax.shift_left(x, jnp.uint32(r)) | lax.shift_right_logical(x, jnp.uint32(32 - r))


def threefry2x32(k0, k1, x0, x1):
  """The Threefry-2x32 hash (20 rounds; Salmon et al. 2011, as `jax.random` uses it), unrolled:
  uint32 key words `k0, k1` (scalars) and counter words `x0, x1` (arrays) -> two uint32 arrays."""
  ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in _THREEFRY_ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, r) ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
  return x0, x1


def _is_partitionable_threefry(rng) -> bool:
  if not jax.config.jax_threefry_partitionable:
    return False
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return str(jax.random.key_impl(rng)) == 'threefry2x32'
  return rng.shape == (2,) and str(jax.config.jax_default_prng_impl) == 'threefry2x32'


def random_words(rng, n: int) -> jax.Array:
  """`jax.random.bits(rng, (n,), jnp.uint32)`, bit for bit, as fusible straight-line ops when the
  key is a (partitionable) threefry key; other PRNG implementations call `jax.random.bits`."""
  if not _is_partitionable_threefry(rng) or n >= 2 ** 32:
    return jax.random.bits(rng, (n,), jnp.uint32)
  data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
  data = data.astype(jnp.uint32)
  # The counter of word i is the 64-bit index i as (high, low) words: (0, i) below 2**32.
  hi, lo = threefry2x32(data[0], data[1], jnp.zeros((n,), jnp.uint32),
                        lax.iota(jnp.uint32, n))
  return hi ^ lo


def keep_mask(rng, rate: float, shape: Sequence[int], bits: int = 32) -> jax.Array:
  """A boolean mask of `shape`, True with probability `1 - applied_rate(rate, bits)`."""
  shape = tuple(shape)
  if bits == 32:
    return jax.random.bernoulli(rng, 1.0 - rate, shape)
  if bits not in DROPOUT_BITS:
    raise ValueError(f'dropout bits must be one of {DROPOUT_BITS}, got {bits}')
  per_word = 32 // bits
  size = math.prod(shape)
  words = random_words(rng, -(-size // per_word))
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
