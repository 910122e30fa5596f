"""Token tables and the embedding layer (positions, token types, languages, scaling, norm).

Order of operations, which covers the whole family tree:
  e = tokens * (sqrt(d_model) if scale_embedding) + positions + token_types + languages   # [B,L,E]
  e = Norm(e) if embedding_norm;  e = Dropout(e);  e = Dense(E -> D)(e) if emb_dim < d_model
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lab.models.config import ModelConfig
from flaxformer_lab.models.dropout import Dropout
from flaxformer_lab.models.layers import Dense, Norm, dtype_of, param_with_axes
from flaxformer_lab.models.positions import LearnedPositions, sinusoidal_table


class TokenTable(nn.Module):
  """A [V, E] table used for lookup and, when tied, as the output projection."""
  vocab_size: int
  features: int
  init: Callable[..., jax.Array] = nn.initializers.normal(0.02)

  def setup(self):
    self.embedding = param_with_axes(self, 'embedding', self.init,
                                     (self.vocab_size, self.features), ('vocab', 'embed'))

  def __call__(self, ids_BxL):
    return jnp.take(self.embedding, ids_BxL, axis=0)

  def attend(self, x_BxLxE, dtype):
    """Logits against the table: x @ E^T."""
    return tied_logits(x_BxLxE.astype(dtype), self.embedding.astype(dtype))


@jax.custom_vjp
def tied_logits(x_BxLxE, table_VxE):
  """x @ E^T ([B, L, V]), with a backward pass that never transposes the [B, L, V] cotangent.

  Autodiff of the einsum asks for dE = dlogits^T @ x, and XLA:CPU lays that out by copying the
  whole [B, L, V] cotangent into a transposed buffer first (4096 x 8192 floats, 128 MB, in the
  GPT-2 benchmark row) before the matmul. Here dE is computed as (x^T @ dlogits)^T: the same
  contraction over (B, L), whose only transpose is of the [E, V] result. Same values (float
  rounding aside; tests/test_perf_equivalence), on every backend.
  """
  return jnp.einsum('ble,ve->blv', x_BxLxE, table_VxE)


def _tied_logits_fwd(x_BxLxE, table_VxE):
  return tied_logits(x_BxLxE, table_VxE), (x_BxLxE, table_VxE)


def _tied_logits_bwd(residuals, dlogits_BxLxV):
  x_BxLxE, table_VxE = residuals
  dlogits_BxLxV = dlogits_BxLxV.astype(x_BxLxE.dtype)
  dx_BxLxE = jnp.einsum('blv,ve->ble', dlogits_BxLxV, table_VxE)
  dtable_ExV = jnp.einsum('ble,blv->ev', x_BxLxE, dlogits_BxLxV)
  return dx_BxLxE, dtable_ExV.T.astype(table_VxE.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


class Embeddings(nn.Module):
  """Everything between token ids and the first layer."""
  cfg: ModelConfig
  tokens: TokenTable
  deterministic: bool = True

  @nn.compact
  def __call__(self, ids_BxL, positions_BxL, token_type_ids_BxL=None, language_ids_BxL=None):
    cfg = self.cfg
    e = cfg.embed_dim
    x = self.tokens(ids_BxL).astype(jnp.float32)  # [B, L, E]
    if cfg.scale_embedding:
      x = x * jnp.sqrt(jnp.float32(cfg.d_model))
    pos_ids = positions_BxL + cfg.position_offset
    if cfg.position == 'learned':
      x = x + LearnedPositions(cfg.max_len, e, name='positions')(pos_ids)
    elif cfg.position == 'sinusoidal':
      table = jnp.asarray(sinusoidal_table(cfg.max_len, e, cfg.sinusoidal_layout))
      x = x + jnp.take(table, pos_ids, axis=0)
    if cfg.type_vocab_size:
      if token_type_ids_BxL is None:
        token_type_ids_BxL = jnp.zeros_like(ids_BxL)
      table = param_with_axes(self, 'token_types', nn.initializers.normal(0.02),
                              (cfg.type_vocab_size, e), ('type_vocab', 'embed'))
      x = x + jnp.take(table, token_type_ids_BxL, axis=0)
    if cfg.num_languages:
      if language_ids_BxL is None:
        raise ValueError('model.num_languages > 0 needs language_ids')
      table = param_with_axes(self, 'languages', nn.initializers.normal(0.02),
                              (cfg.num_languages, e), ('type_vocab', 'embed'))
      x = x + jnp.take(table, language_ids_BxL, axis=0)
    x = x.astype(dtype_of(cfg))
    if cfg.embedding_norm:
      x = Norm(cfg, name='norm')(x)
    x = Dropout(cfg.dropout_rate, cfg.dropout_bits)(x, deterministic=self.deterministic)
    if e != cfg.d_model:
      x = Dense(cfg.d_model, ('factor_embed', 'embed'), True, dtype_of(cfg), name='projection')(x)
    return x
