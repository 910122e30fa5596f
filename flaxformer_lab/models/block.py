"""One transformer layer with a norm-placement switch.

Encoder, decoder and encoder-decoder layers differ only by which sub-layers they have:

  post-LN (paper, BERT):  x = Norm(x + Drop(SelfAttn(x)))   [x = Norm(x + Drop(CrossAttn(x, enc)))]
                          x = Norm(x + Drop(Mlp(x)))
  pre-LN (GPT-2, T5):     x = x + Drop(SelfAttn(Norm(x)))   [x = x + Drop(CrossAttn(Norm(x), enc))]
                          x = x + Drop(Mlp(Norm(x)))        (plus a final norm after the stack)
  DeepNorm (DeepNet):     x = Norm(alpha * x + Drop(SelfAttn(x)))   ... as post-LN, with the
                          residual scaled by alpha, and the value, attention-output and
                          feed-forward kernels initialized scaled by beta (query/key kernels not)

DeepNorm's constants (Wang et al. 2022, "DeepNet", Table 1) depend on the stack:
  encoder-only (N layers) / decoder-only (M layers): alpha = (2N)^(1/4), beta = (8N)^(-1/4)
  encoder-decoder, encoder: alpha = 0.81 (N^4 M)^(1/16), beta = 0.87 (N^4 M)^(-1/16)
  encoder-decoder, decoder: alpha = (3M)^(1/4),          beta = (12M)^(-1/4)
A layer knows its stack from the config's family and whether it has cross-attention (only the
decoder of an encoder-decoder does), so `Stack` needs no extra arguments. Beta multiplies the
library's own kernel initializer (normal, stddev 0.02), not the paper's Xavier-normal.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from flaxformer_lab.models.attention import Attention
from flaxformer_lab.models.config import ModelConfig
from flaxformer_lab.models.dropout import Dropout
from flaxformer_lab.models.layers import Mlp, Norm, constrain, default_kernel_init, normal_init
from flaxformer_lab.models.positions import RelativePositionBias


def deepnorm_constants(cfg: ModelConfig, has_cross: bool) -> tuple[float, float]:
  """(alpha, beta) of DeepNorm for the stack of a layer (`has_cross`: an encoder-decoder's decoder)."""
  if cfg.family == 'encoder_decoder':
    n, m = cfg.num_layers, cfg.decoder_layers
    if has_cross:
      return (3 * m) ** 0.25, (12 * m) ** -0.25
    return 0.81 * (n ** 4 * m) ** (1 / 16), 0.87 * (n ** 4 * m) ** (-1 / 16)
  n = cfg.num_layers
  return (2 * n) ** 0.25, (8 * n) ** -0.25


def _scaled(init, beta: float):
  """`init` with its values multiplied by beta (logical-partitioning boxes are kept)."""
  return lambda *args, **kwargs: jax.tree.map(lambda v: v * beta, init(*args, **kwargs))


class _DeepNormAttention(Attention):
  """Attention whose value and output kernels start scaled by `beta` (names and shapes unchanged).

  With a fused QKV kernel [embed, 3, heads, kv] only its value slice (index 2) is scaled.
  """
  beta: float = 1.0

  def param(self, name, init_fn, *init_args, **init_kwargs):
    if name in ('value_kernel', 'out_kernel'):
      init_fn = _scaled(init_fn, self.beta)
    elif name == 'qkv_kernel':
      base = init_fn
      init_fn = lambda *a, **k: jax.tree.map(lambda v: v.at[:, 2].multiply(self.beta),
                                             base(*a, **k))
    return super().param(name, init_fn, *init_args, **init_kwargs)


class Block(nn.Module):
  """A residual layer: self-attention, optional cross-attention, feed-forward.

  `aux` is a dict of per-stack tensors broadcast to every layer: `mask` [B,1,T,S], `bias`
  [B,H,T,S] or None, `positions` [B,T] (self-attention query positions), `key_positions` [B,S],
  `encoded` [B,Se,D] or None, `cross_mask` [B,1,T,Se] or None. Returns `(x, None)` so that it can be
  the body of `nn.scan`.
  """
  cfg: ModelConfig
  causal: bool = False
  has_cross: bool = False
  deterministic: bool = True
  decode: bool = False

  def _residual(self, x, branch, name, alpha: float = 1.0):
    """Applies one sub-layer with the configured norm placement."""
    cfg = self.cfg
    drop = Dropout(cfg.dropout_rate, cfg.dropout_bits, name=f'{name}_dropout')
    if cfg.norm_position == 'pre':
      y = branch(Norm(cfg, name=f'{name}_norm')(x))
      return x + drop(y, deterministic=self.deterministic)
    y = branch(x)
    if cfg.norm_position == 'deepnorm':
      x = x * alpha
    return Norm(cfg, name=f'{name}_norm')(x + drop(y, deterministic=self.deterministic))

  @nn.compact
  def __call__(self, x_BxTxD, aux: dict[str, Any]):
    cfg = self.cfg
    alpha, beta = 1.0, 1.0
    attn_cls, mlp_init = Attention, None  # None: the Mlp's own init (layers.normal_init)
    if cfg.norm_position == 'deepnorm':
      alpha, beta = deepnorm_constants(cfg, self.has_cross)
      attn_cls = lambda *a, **k: _DeepNormAttention(*a, beta=beta, **k)
      mlp_init = _scaled(default_kernel_init, beta)
    bias = aux.get('bias')
    if cfg.position == 'relative_bias' and not cfg.relative_bias_shared:
      bias = RelativePositionBias(cfg.relative_num_buckets, cfg.relative_max_distance,
                                  cfg.num_heads, bidirectional=not self.causal,
                                  init=normal_init(cfg, cfg.d_model),
                                  name='relative_bias')(aux['positions'], aux['key_positions'])
    self_attn = attn_cls(cfg, use_rope=cfg.position == 'rope', deterministic=self.deterministic,
                         decode=self.decode, name='self_attention')
    x_BxTxD = self._residual(
        x_BxTxD,
        lambda h: self_attn(h, positions_BxT=aux['positions'], mask_Bx1xTxS=aux['mask'],
                            bias_BxHxTxS=bias), 'self_attention', alpha)
    if self.has_cross:
      cross = attn_cls(cfg, is_cross=True, deterministic=self.deterministic, decode=self.decode,
                       name='cross_attention')
      x_BxTxD = self._residual(
          x_BxTxD, lambda h: cross(h, aux.get('encoded'), mask_Bx1xTxS=aux.get('cross_mask')),
          'cross_attention', alpha)
    mlp = Mlp(cfg, deterministic=self.deterministic, kernel_init=mlp_init, name='mlp')
    x_BxTxD = self._residual(x_BxTxD, mlp, 'mlp', alpha)
    x_BxTxD = constrain(x_BxTxD, ('activation_batch', 'activation_length', 'activation_embed'))
    return x_BxTxD, None
