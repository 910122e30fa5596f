"""Positional schemes: absolute (learned, sinusoidal) and relative (T5 bias, RoPE, ALiBi).

Positions are always explicit integer arrays `[B or 1, L]`, so packed sequences (positions restart per
segment) and incremental decoding (positions continue from the cache) need no special cases.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lab.models.layers import param_with_axes


def positions_from_segments(segment_ids_BxL: jax.Array) -> jax.Array:
  """Index of each token inside its segment: restarts at 0 wherever the segment id changes."""
  length = segment_ids_BxL.shape[-1]
  idx = jnp.arange(length, dtype=jnp.int32)
  prev = jnp.pad(segment_ids_BxL[..., :-1], [(0, 0)] * (segment_ids_BxL.ndim - 1) + [(1, 0)],
                 constant_values=-1)
  start = jnp.where(segment_ids_BxL != prev, idx, 0)
  return idx - jax.lax.cummax(start, axis=segment_ids_BxL.ndim - 1)


def sinusoidal_table(length: int, dim: int, layout: str = 'interleaved',
                     max_timescale: float = 10000.0) -> np.ndarray:
  """The paper's table: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)).

  layout 'interleaved' is the paper's; 'concat' puts all sines first then all cosines (Marian, T2T).
  """
  pos = np.arange(length, dtype=np.float64)[:, None]
  inv = max_timescale ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)[None, :]
  angles = pos * inv  # [length, ceil(dim / 2)]
  table = np.zeros((length, dim), dtype=np.float64)
  if layout == 'interleaved':
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles[:, :dim // 2])
  elif layout == 'concat':
    half = (dim + 1) // 2
    table[:, :half] = np.sin(angles)
    table[:, half:] = np.cos(angles[:, :dim - half])
  else:
    raise ValueError(f'unknown sinusoidal layout {layout!r}; use interleaved or concat')
  return table.astype(np.float32)


class LearnedPositions(nn.Module):
  """A learned table of `max_len` rows; looking up a position past the table is an error upstream."""
  max_len: int
  features: int

  @nn.compact
  def __call__(self, positions_BxL):
    table = param_with_axes(self, 'embedding', nn.initializers.normal(0.02),
                            (self.max_len, self.features), ('positions', 'embed'))
    return jnp.take(table, positions_BxL, axis=0)


def t5_relative_bucket(relative_position, bidirectional: bool, num_buckets: int,
                       max_distance: int):
  """T5's bucketing of `memory_position - query_position` (Raffel et al., mesh_tensorflow).

  Half the buckets (per direction when bidirectional) hold exact small offsets; the rest cover
  offsets up to `max_distance` logarithmically; larger offsets share the last bucket.
  """
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  n_safe = jnp.maximum(n, 1).astype(jnp.float32)
  large = max_exact + (jnp.log(n_safe / max_exact) / math.log(max_distance / max_exact) *
                       (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return ret + jnp.where(is_small, n, large)


class RelativePositionBias(nn.Module):
  """T5's learned per-head scalar bias indexed by the bucket of each (query, key) offset."""
  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool
  init: Callable[..., jax.Array] = nn.initializers.normal(0.02)  # of the [buckets, heads] table

  @nn.compact
  def __call__(self, q_positions_BxT, k_positions_BxS):
    table = param_with_axes(self, 'embedding', self.init,
                            (self.num_buckets, self.num_heads), ('relpos_buckets', 'heads'))
    rel_BxTxS = k_positions_BxS[:, None, :] - q_positions_BxT[:, :, None]
    buckets = t5_relative_bucket(rel_BxTxS, self.bidirectional, self.num_buckets,
                                 self.max_distance)
    bias_BxTxSxH = jnp.take(table, buckets, axis=0)
    return jnp.transpose(bias_BxTxSxH, (0, 3, 1, 2))  # [B, H, T, S]


def alibi_slopes(num_heads: int) -> np.ndarray:
  """Press et al.'s head slopes: the geometric sequence 2^(-8/n), 2^(-16/n), ... for n heads.

  For a head count that is not a power of two, the slopes of the nearest lower power of two are
  followed by every other slope of the next power of two (the published recipe).
  """

  def power_of_two(n):
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
    return [start * start ** i for i in range(n)]

  if math.log2(num_heads).is_integer():
    slopes = power_of_two(num_heads)
  else:
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][:num_heads - closest]
  return np.asarray(slopes, dtype=np.float32)


def alibi_bias(num_heads: int, q_positions_BxT, k_positions_BxS, causal: bool):
  """ALiBi: -slope_h * |q - k| added to the scores ([B, H, T, S]); linear in the offset."""
  slopes = jnp.asarray(alibi_slopes(num_heads))
  dist = jnp.abs(q_positions_BxT[:, :, None] - k_positions_BxS[:, None, :]).astype(jnp.float32)
  del causal  # the causal mask removes future keys; the penalty is the same formula
  return -slopes[None, :, None, None] * dist[:, None, :, :]


def apply_rope(x_BxLxHxK, positions_BxL, theta: float = 10000.0, fraction: float = 1.0):
  """Rotary embedding (Su et al.) in the half-split layout; the first `fraction` of dims rotate."""
  k = x_BxLxHxK.shape[-1]
  rot = int(k * fraction) // 2 * 2
  if rot == 0:
    return x_BxLxHxK
  x_rot, x_pass = x_BxLxHxK[..., :rot], x_BxLxHxK[..., rot:]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, rot, 2, dtype=jnp.float32) / rot))  # [rot/2]
  angles = positions_BxL.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]  # [B, L, rot/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x_rot.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return jnp.concatenate([rotated.astype(x_BxLxHxK.dtype), x_pass], axis=-1)
