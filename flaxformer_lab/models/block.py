"""One transformer layer with a norm-placement switch.

Encoder, decoder and encoder-decoder layers differ only by which sub-layers they have:

  post-LN (paper, BERT):  x = Norm(x + Drop(SelfAttn(x)))   [x = Norm(x + Drop(CrossAttn(x, enc)))]
                          x = Norm(x + Drop(Mlp(x)))
  pre-LN (GPT-2, T5):     x = x + Drop(SelfAttn(Norm(x)))   [x = x + Drop(CrossAttn(Norm(x), enc))]
                          x = x + Drop(Mlp(Norm(x)))        (plus a final norm after the stack)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from flaxformer_lab.models.attention import Attention
from flaxformer_lab.models.config import ModelConfig
from flaxformer_lab.models.layers import Mlp, Norm, constrain
from flaxformer_lab.models.positions import RelativePositionBias


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

  def _residual(self, x, branch, name):
    """Applies one sub-layer with the configured norm placement."""
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout_rate, name=f'{name}_dropout')
    if cfg.norm_position == 'pre':
      y = branch(Norm(cfg, name=f'{name}_norm')(x))
      return x + drop(y, deterministic=self.deterministic)
    y = branch(x)
    return Norm(cfg, name=f'{name}_norm')(x + drop(y, deterministic=self.deterministic))

  @nn.compact
  def __call__(self, x_BxTxD, aux: dict[str, Any]):
    cfg = self.cfg
    bias = aux.get('bias')
    if cfg.position == 'relative_bias' and not cfg.relative_bias_shared:
      bias = RelativePositionBias(cfg.relative_num_buckets, cfg.relative_max_distance,
                                  cfg.num_heads, bidirectional=not self.causal,
                                  name='relative_bias')(aux['positions'], aux['key_positions'])
    self_attn = Attention(cfg, use_rope=cfg.position == 'rope', deterministic=self.deterministic,
                          decode=self.decode, name='self_attention')
    x_BxTxD = self._residual(
        x_BxTxD,
        lambda h: self_attn(h, positions_BxT=aux['positions'], mask_Bx1xTxS=aux['mask'],
                            bias_BxHxTxS=bias), 'self_attention')
    if self.has_cross:
      cross = Attention(cfg, is_cross=True, deterministic=self.deterministic, decode=self.decode,
                        name='cross_attention')
      x_BxTxD = self._residual(
          x_BxTxD, lambda h: cross(h, aux.get('encoded'), mask_Bx1xTxS=aux.get('cross_mask')),
          'cross_attention')
    mlp = Mlp(cfg, deterministic=self.deterministic, name='mlp')
    x_BxTxD = self._residual(x_BxTxD, mlp, 'mlp')
    x_BxTxD = constrain(x_BxTxD, ('activation_batch', 'activation_length', 'activation_embed'))
    return x_BxTxD, None
