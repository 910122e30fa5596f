"""Multi-head scaled dot-product attention with GQA/MQA, two backends and a key/value cache.

Shape letters: B batch, T query length, S key length, D d_model, H query heads, G kv heads,
R = H // G query heads per kv head, K head width.

Masks: a stack builds one `AttentionMask` per forward pass (`transformer.attention_mask`) and every
layer reads it, so no layer re-derives the mask: the einsum backend selects with its boolean
`visible` (measured faster on XLA CPU than adding the float `bias`, which stays for callers that
have only a bias); the library backends read `visible`
(booleans, as `jax.nn.dot_product_attention` wants) and, for cuDNN, `causal` (which lets the fused
kernel skip the blocks above the diagonal). A plain boolean array is still accepted wherever a mask
is (True = visible).
"""

from __future__ import annotations

from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lab.models.config import ModelConfig
from flaxformer_lab.models.dropout import apply_dropout
from flaxformer_lab.models.layers import constrain, default_kernel_init, dtype_of, normal_init
from flaxformer_lab.models.layers import param_with_axes
from flaxformer_lab.models.positions import apply_rope

NEG_INF = -1e10  # finite: a fully masked row gives a uniform softmax instead of NaN


@flax.struct.dataclass
class AttentionMask:
  """Which keys each query sees, in the two forms the backends want (XLA drops the unused one).

  visible: bool [B, 1, T, S], True where the key is visible.
  bias:    float32 [B, 1, T, S], 0 where visible and NEG_INF where hidden (added to the scores).
  causal:  static; True when the mask includes "no key after the query" with queries and keys on
           the same positions 0..T-1 (a training/prefill self-attention), so a fused kernel may skip
           the upper triangle. The segment/padding part is still in `visible`/`bias`.
  """
  visible: jax.Array
  bias: jax.Array
  causal: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def from_visible(cls, visible_Bx1xTxS, causal: bool = False) -> 'AttentionMask':
    bias = jnp.where(visible_Bx1xTxS, 0.0, NEG_INF).astype(jnp.float32)
    return cls(visible=visible_Bx1xTxS, bias=bias, causal=causal)


def _mask_parts(mask: Any):
  """(boolean visible, additive float bias, causal) of an AttentionMask, a bool array or None."""
  if mask is None:
    return None, None, False
  if isinstance(mask, AttentionMask):
    return mask.visible, mask.bias, mask.causal
  mask = jnp.asarray(mask)
  if mask.dtype == jnp.bool_:
    return mask, None, False
  raise TypeError(f'an attention mask is an AttentionMask or a boolean array, got {mask.dtype}')


def einsum_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, *, mask_Bx1xTxS=None, bias_BxHxTxS=None,
                     scale: float, dropout_rate: float = 0.0, dropout_rng=None,
                     deterministic: bool = True, dtype=jnp.float32, kv_heads_major: bool = False,
                     dropout_bits: int = 32, kv_rows_NxJxS=None):
  """The reference implementation: explicit scores, float32 softmax, optional weight dropout.

  `mask_Bx1xTxS` is an `AttentionMask` (its additive bias is used) or a boolean array.
  `kv_heads_major`: keys and values come as [B, G, S, K] (the decode cache's layout) instead of
  [B, S, G, K].
  `kv_rows_NxJxS` (int, with `kv_heads_major`): the B = N * J rows form N groups of J (row n*J + j)
  and row (n, j)'s key/value at position s is stored in row (n, kv_rows[n, j, s]) of its group: a
  beam-search cache whose beams share history through this small table instead of copies
  (`grouped_scores`, `grouped_values`).
  """
  b, t, h, k = q_BxTxHxK.shape
  g = k_BxSxGxK.shape[1 if kv_heads_major else 2]
  kv = 'bgsk' if kv_heads_major else 'bsgk'
  visible, mask_bias, _ = _mask_parts(mask_Bx1xTxS)
  q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, h // g, k)
  if kv_rows_NxJxS is not None:
    if not kv_heads_major:
      raise ValueError('kv_rows_NxJxS needs keys/values in the heads-major cache layout')
    scores_BxGxRxTxS = grouped_scores(q_BxTxGxRxK, k_BxSxGxK, kv_rows_NxJxS) * scale
  else:
    scores_BxGxRxTxS = jnp.einsum(f'btgrk,{kv}->bgrts', q_BxTxGxRxK, k_BxSxGxK,
                                  preferred_element_type=jnp.float32) * scale
  if bias_BxHxTxS is not None:
    bb = bias_BxHxTxS.shape[0]
    scores_BxGxRxTxS = scores_BxGxRxTxS + bias_BxHxTxS.astype(jnp.float32).reshape(
        bb, g, h // g, t, -1)
  # A select on the stack's one boolean mask measured faster on XLA CPU than adding its float
  # bias (BERT row of issue 12: 0.91x the step time; GPT-2 row 0.98x; the select fuses into the
  # softmax either way), so the bias is used only when no boolean form is at hand.
  if visible is not None:
    scores_BxGxRxTxS = jnp.where(visible[:, :, None], scores_BxGxRxTxS, NEG_INF)
  elif mask_bias is not None:
    scores_BxGxRxTxS = scores_BxGxRxTxS + mask_bias[:, :, None]
  weights = jax.nn.softmax(scores_BxGxRxTxS, axis=-1)
  if not deterministic and dropout_rate > 0.0:
    weights = apply_dropout(weights, dropout_rng, dropout_rate, dropout_bits)
  if kv_rows_NxJxS is not None:
    out = grouped_values(weights.astype(dtype), v_BxSxGxK.astype(dtype), kv_rows_NxJxS)
  else:
    out = jnp.einsum(f'bgrts,{kv}->btgrk', weights.astype(dtype), v_BxSxGxK.astype(dtype))
  return out.reshape(b, t, h, k)


MIN_QUERY_BLOCK = 64  # causal_blocked_attention: shorter query blocks cost more than they save


def causal_query_blocks(t: int, blocks: int):
  """[(start, end)] of the query blocks `causal_blocked_attention` uses for length `t`.

  At most `blocks` blocks, none shorter than MIN_QUERY_BLOCK rows (so short sequences keep one
  block); edges at i * t // n.
  """
  n = max(1, min(blocks, t // MIN_QUERY_BLOCK))
  return [(i * t // n, (i + 1) * t // n) for i in range(n)]


def causal_blocked_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, *, mask_Bx1xTxS: AttentionMask,
                             bias_BxHxTxS=None, blocks: int, dropout_rng=None, **kwargs):
  """`einsum_attention` of a causal self-attention in query blocks that skip the future keys.

  Query block [s, e) can see keys [0, e) only, so it attends to those: with n equal blocks the
  score and value products cover (n + 1) / 2n of the full T x S square (5/8 at n = 4). Outputs and
  gradients equal the full computation for every query with at least one visible key; a query
  that sees no key at all (a left-padding query) gets the finite uniform average over its block's
  keys instead of over all of them, and such rows are never scored. Attention dropout draws
  block i's bits from `fold_in(dropout_rng, i)`: the same rate, another mask than one block's.

  Issue 12's GPT-2 CPU row (seq 256): 4 blocks took 0.92x the step time of one (2: 0.96x,
  8: 0.97x, 16: 1.04x; experiments/cpu_train_speed/ab.py).
  """
  if not mask_Bx1xTxS.causal:
    raise ValueError('causal_blocked_attention needs a causal AttentionMask')
  t, s = q_BxTxHxK.shape[1], k_BxSxGxK.shape[1]
  if t != s:
    raise ValueError(f'causal_blocked_attention needs as many queries as keys, got {t} and {s}')
  edges = causal_query_blocks(t, blocks)
  if len(edges) == 1:
    return einsum_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xTxS=mask_Bx1xTxS,
                            bias_BxHxTxS=bias_BxHxTxS, dropout_rng=dropout_rng, **kwargs)
  outs = []
  for i, (start, end) in enumerate(edges):
    mask = AttentionMask(visible=mask_Bx1xTxS.visible[:, :, start:end, :end],
                         bias=mask_Bx1xTxS.bias[:, :, start:end, :end], causal=False)
    bias = None if bias_BxHxTxS is None else bias_BxHxTxS[:, :, start:end, :end]
    rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
    outs.append(einsum_attention(q_BxTxHxK[:, start:end], k_BxSxGxK[:, :end],
                                 v_BxSxGxK[:, :end], mask_Bx1xTxS=mask, bias_BxHxTxS=bias,
                                 dropout_rng=rng, **kwargs))
  return jnp.concatenate(outs, axis=1)


def _row_one_hot(kv_rows_NxJxS):
  """[N, P, J, S] bool: beam (n, j) reads position s from row (n, p) of its group."""
  j = kv_rows_NxJxS.shape[1]
  return kv_rows_NxJxS[:, None] == jnp.arange(j, dtype=kv_rows_NxJxS.dtype)[:, None, None]


def grouped_scores(q_BxTxGxRxK, k_BxGxSxK, kv_rows_NxJxS):
  """Attention scores [B, G, R, T, S] (float32) with keys read through a group row table.

  Each query row is scored against the keys of every row P of its group (J times the work of
  plain attention, which at beam widths <= 8 costs far less than copying the cache), as a matmul
  batched over (group, row, kv head) so that the cache is read in place, never transposed; each
  position's score is then taken from the row the table names (a select, and a sum over P terms
  of which one is nonzero: the same dot product, exactly).
  """
  n, j, s = kv_rows_NxJxS.shape
  b, t, g, r, k = q_BxTxGxRxK.shape
  q_NxPxGxJRTxK = jnp.broadcast_to(
      jnp.transpose(q_BxTxGxRxK.reshape(n, j, t, g, r, k), (0, 3, 1, 4, 2, 5))[:, None],
      (n, j, g, j, r, t, k)).reshape(n, j, g, j * r * t, k)
  keys_NxPxGxSxK = k_BxGxSxK.reshape(n, j, g, s, k)
  # Keys as the left operand ([S, K] x [K, J*R*T] per batch): 0.6x the time of q @ k^T for these
  # small shapes on XLA CPU (YNNPACK), as fast as plain single-query attention.
  all_NxPxGxSxJxRxT = jnp.einsum('npgsk,npgqk->npgsq', keys_NxPxGxSxK, q_NxPxGxJRTxK,
                                 preferred_element_type=jnp.float32).reshape(n, j, g, s, j, r, t)
  pick = jnp.swapaxes(_row_one_hot(kv_rows_NxJxS), 2, 3)[:, :, None, :, :, None, None]
  scores_NxGxSxJxRxT = jnp.sum(jnp.where(pick, all_NxPxGxSxJxRxT, 0.0), axis=1)
  return jnp.transpose(scores_NxGxSxJxRxT, (0, 3, 1, 4, 5, 2)).reshape(b, g, r, t, s)


def grouped_values(weights_BxGxRxTxS, v_BxGxSxK, kv_rows_NxJxS):
  """sum_s weights[.., s] * value of position s read through the group row table: [B, T, G, R, K].

  The weights are spread over the rows P of the group (zero except at the row the table names)
  and multiplied with each row's values in place (a matmul batched over group, row and kv head),
  then summed over P.
  """
  n, j, s = kv_rows_NxJxS.shape
  b, g, r, t, _ = weights_BxGxRxTxS.shape
  w_NxGxJxRxTxS = jnp.transpose(weights_BxGxRxTxS.reshape(n, j, g, r, t, s), (0, 2, 1, 3, 4, 5))
  pick = _row_one_hot(kv_rows_NxJxS)[:, :, None, :, None, None]  # [N, P, 1, J, 1, 1, S]
  w_NxPxGxJxRxTxS = jnp.where(pick, w_NxGxJxRxTxS[:, None], jnp.zeros((), w_NxGxJxRxTxS.dtype))
  values_NxPxGxSxK = v_BxGxSxK.reshape(n, j, g, s, -1)
  part = jnp.einsum('npgqs,npgsk->npgqk', w_NxPxGxJxRxTxS.reshape(n, j, g, j * r * t, s),
                    values_NxPxGxSxK)
  out_NxGxJxRxTxK = jnp.sum(part, axis=1).reshape(n, g, j, r, t, -1)
  return jnp.transpose(out_NxGxJxRxTxK, (0, 2, 4, 1, 3, 5)).reshape(b, t, g, r, -1)


def library_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, *, mask_Bx1xTxS=None, bias_BxHxTxS=None,
                      scale: float, implementation: Optional[str], causal: Optional[bool] = None):
  """`jax.nn.dot_product_attention` (XLA, or cuDNN flash attention on GPU); GQA handled natively.

  `causal` (default: the mask's own flag, used by cuDNN only) adds is_causal, which the fused
  kernel uses to skip the masked upper triangle; XLA would only build a second mask from it.
  """
  visible, _, mask_causal = _mask_parts(mask_Bx1xTxS)
  causal = mask_causal if causal is None else causal
  is_causal = bool(causal) and implementation == 'cudnn' and (
      q_BxTxHxK.shape[1] == k_BxSxGxK.shape[1])
  return jax.nn.dot_product_attention(
      q_BxTxHxK, k_BxSxGxK, v_BxSxGxK,
      bias=None if bias_BxHxTxS is None else bias_BxHxTxS.astype(q_BxTxHxK.dtype),
      mask=visible, scale=scale, is_causal=is_causal, implementation=implementation)


class Attention(nn.Module):
  """Self- or cross-attention. In decode mode, keys/values live in the 'cache' collection.

  Self-attention cache: keys/values of shape [B, S_max, G, K]; each call writes its chunk at the
  tokens' positions (per example, so prompts of different lengths decode together). Cross-attention
  cache: encoder keys/values, computed once when `x_kv` is given and read back when it is None.
  """
  cfg: ModelConfig
  is_cross: bool = False
  use_rope: bool = False
  deterministic: bool = True
  decode: bool = False

  def _proj(self, name, x, heads, axes):
    cfg = self.cfg
    fan_in = x.shape[-1] * (cfg.head_width if name == 'query' else 1)  # T5 folds 1/sqrt(d_kv)
    kernel = param_with_axes(self, f'{name}_kernel', normal_init(cfg, fan_in),
                             (x.shape[-1], heads, cfg.head_width), ('embed',) + axes)
    y = jnp.einsum('bld,dhk->blhk', x, kernel.astype(x.dtype))
    if cfg.qkv_bias:
      bias = param_with_axes(self, f'{name}_bias', nn.initializers.zeros, (heads, cfg.head_width),
                             axes)
      y = y + bias.astype(x.dtype)
    return y

  def _qkv(self, x_BxTxD, x_kv):
    """Projects queries (and keys/values when `x_kv` is not None)."""
    cfg = self.cfg
    if cfg.fused_qkv and not self.is_cross:
      kernel = param_with_axes(self, 'qkv_kernel', default_kernel_init,
                               (x_BxTxD.shape[-1], 3, cfg.num_heads, cfg.head_width),
                               ('embed', 'qkv', 'heads', 'kv'))
      # Output in the kernel's own order ([B, L, 3, H, K]): a plain [B*L, D] x [D, 3*H*K] matmul,
      # with no per-call transpose of the kernel.
      qkv_BxTx3xHxK = jnp.einsum('bld,dchk->blchk', x_BxTxD, kernel.astype(x_BxTxD.dtype))
      if cfg.qkv_bias:
        bias = param_with_axes(self, 'qkv_bias', nn.initializers.zeros,
                               (3, cfg.num_heads, cfg.head_width), ('qkv', 'heads', 'kv'))
        qkv_BxTx3xHxK = qkv_BxTx3xHxK + bias.astype(x_BxTxD.dtype)
      return qkv_BxTx3xHxK[:, :, 0], qkv_BxTx3xHxK[:, :, 1], qkv_BxTx3xHxK[:, :, 2]
    q = self._proj('query', x_BxTxD, cfg.num_heads, ('heads', 'kv'))
    if x_kv is None:
      return q, None, None
    k = self._proj('key', x_kv, cfg.kv_heads, ('kv_heads', 'kv'))
    v = self._proj('value', x_kv, cfg.kv_heads, ('kv_heads', 'kv'))
    return q, k, v

  @nn.compact
  def __call__(self, x_BxTxD, x_kv_BxSxD=None, *, positions_BxT=None, mask_Bx1xTxS=None,
               bias_BxHxTxS=None):
    cfg = self.cfg
    dtype = dtype_of(cfg)
    x_BxTxD = x_BxTxD.astype(dtype)
    if self.is_cross:
      source = None if x_kv_BxSxD is None else x_kv_BxSxD.astype(dtype)
    else:
      source = x_BxTxD
    if self.is_cross and source is None and not self.decode:
      raise ValueError('cross-attention needs the encoder output outside decode mode')
    q, k, v = self._qkv(x_BxTxD, source)

    if self.use_rope and not self.is_cross:
      q = apply_rope(q, positions_BxT, cfg.rope_theta, cfg.rope_fraction)
      k = apply_rope(k, positions_BxT, cfg.rope_theta, cfg.rope_fraction)

    heads_major = False  # k/v as [B, G, S, K]: the decode cache's layout
    kv_rows = None  # a beam-search cache's row table (`_update_cache`)
    if self.decode:
      k, v, heads_major, kv_rows = self._update_cache(k, v, positions_BxT)

    q = constrain(q, ('activation_batch', 'activation_length', 'activation_heads', 'activation_kv'))
    kv_axes = ('activation_batch', 'activation_length', 'activation_heads', 'activation_kv')
    if heads_major:
      kv_axes = (kv_axes[0], kv_axes[2], kv_axes[1], kv_axes[3])
    k = constrain(k, kv_axes)
    v = constrain(v, kv_axes)
    scale = cfg.head_width ** -0.5 if cfg.attention_scale else 1.0
    if cfg.attention_backend == 'einsum' or kv_rows is not None:
      dropout_rng = None
      if not self.deterministic and cfg.attention_dropout_rate > 0:
        dropout_rng = self.make_rng('dropout')
      common = dict(scale=scale, dropout_rate=cfg.attention_dropout_rate,
                    dropout_rng=dropout_rng, deterministic=self.deterministic, dtype=dtype,
                    dropout_bits=cfg.dropout_bits)
      blocked = (cfg.causal_attention_blocks > 1 and not heads_major and not self.is_cross
                 and isinstance(mask_Bx1xTxS, AttentionMask) and mask_Bx1xTxS.causal
                 and q.shape[1] == k.shape[1])
      if blocked:
        out = causal_blocked_attention(q, k, v, mask_Bx1xTxS=mask_Bx1xTxS,
                                       bias_BxHxTxS=bias_BxHxTxS,
                                       blocks=cfg.causal_attention_blocks, **common)
      else:
        out = einsum_attention(q, k, v, mask_Bx1xTxS=mask_Bx1xTxS, bias_BxHxTxS=bias_BxHxTxS,
                               kv_heads_major=heads_major, kv_rows_NxJxS=kv_rows, **common)
    else:
      if not self.deterministic and cfg.attention_dropout_rate > 0:
        raise ValueError(
            f'attention_backend={cfg.attention_backend!r} has no attention-weight dropout; set '
            'model.attention_dropout_rate=0 or use attention_backend=einsum')
      if heads_major:  # the library wants [B, S, G, K]
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
      out = library_attention(q, k, v, mask_Bx1xTxS=mask_Bx1xTxS, bias_BxHxTxS=bias_BxHxTxS,
                              scale=scale, implementation=cfg.attention_backend)
    out = constrain(out, ('activation_batch', 'activation_length', 'activation_heads',
                          'activation_kv'))
    kernel = param_with_axes(self, 'out_kernel', normal_init(cfg, cfg.num_heads * cfg.head_width),
                             (cfg.num_heads, cfg.head_width, x_BxTxD.shape[-1]),
                             ('heads', 'kv', 'embed'))
    y = jnp.einsum('blhk,hkd->bld', out.astype(dtype), kernel.astype(dtype))
    if cfg.out_bias:
      y = y + param_with_axes(self, 'out_bias', nn.initializers.zeros, (x_BxTxD.shape[-1],),
                              ('embed',)).astype(dtype)
    return y

  def _update_cache(self, k, v, positions_BxT):
    """Writes this call's keys/values into the cache; returns (keys, values, heads_major, rows).

    The cache is stored heads-major, [B, G, S, K], the layout both attention products read
    without a transpose: with [B, S, G, K] XLA CPU transposed every layer's whole cache on every
    decode step (13% of a beam-search step in a profile). The init call returns the given
    [B, S, G, K] keys/values (heads_major False).

    A self-attention cache may also hold `beam_rows` [N, J, S] int32 (put there by the decoding
    loop, `decoding.add_beam_rows`): the B = N * J rows are N groups of J beams, and beam (n, j)'s
    key/value at position s is in row (n, beam_rows[n, j, s]). Each call writes row (n, j)'s new
    keys/values into its own row and points its table there; beam search reorders beams by
    permuting the table (a few hundred integers) instead of gathering the whole cache. `rows` is
    that table, or None.
    """
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # [B, S, G, K] -> [B, G, S, K]
    if self.is_cross:
      initialized = self.has_variable('cache', 'cross_key')
      ck = self.variable('cache', 'cross_key', lambda: heads_major(k))
      cv = self.variable('cache', 'cross_value', lambda: heads_major(v))
      if k is not None:  # prefill: compute once, store
        ck.value, cv.value = heads_major(k), heads_major(v)
      elif not initialized:
        raise ValueError('cross-attention cache is empty: pass the encoder output on the first call')
      return ck.value, cv.value, True, None
    initialized = self.has_variable('cache', 'cached_key')
    ck = self.variable('cache', 'cached_key', lambda: jnp.zeros_like(heads_major(k)))
    cv = self.variable('cache', 'cached_value', lambda: jnp.zeros_like(heads_major(v)))
    if not initialized:  # init call: the cache takes the shape of the (full-length) dummy input
      return k, v, False, None
    start_B = positions_BxT[:, 0].astype(jnp.int32)
    write = jax.vmap(lambda c, x, s: jax.lax.dynamic_update_slice(c, x.astype(c.dtype),
                                                                  (0, s, 0)))
    ck.value = write(ck.value, heads_major(k), start_B)
    cv.value = write(cv.value, heads_major(v), start_B)
    rows = None
    if self.has_variable('cache', 'beam_rows'):
      table = self.variable('cache', 'beam_rows', lambda: None)
      n, j, s = table.value.shape
      pos_S = jnp.arange(s, dtype=jnp.int32)
      start_NxJx1 = start_B.reshape(n, j, 1)
      written = (pos_S >= start_NxJx1) & (pos_S < start_NxJx1 + k.shape[1])
      own = jnp.arange(j, dtype=table.value.dtype)[None, :, None]
      table.value = jnp.where(written, own, table.value)
      rows = table.value
    return ck.value.astype(k.dtype), cv.value.astype(v.dtype), True, rows
