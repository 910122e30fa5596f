"""Task heads on the task-independent body.

Each head reads the body's hidden states (and the pooled first token where the body has a pooler)
and, where tied, the body's token table.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lab.models.config import ModelConfig
from flaxformer_lab.models.embedding import TokenTable
from flaxformer_lab.models.layers import Dense, Norm, activation_fn, constrain, dtype_of
from flaxformer_lab.models.layers import normal_init
from flaxformer_lab.models.layers import param_with_axes


def _classifier_activation(name: str):
  return {'tanh': jnp.tanh, 'relu': jax.nn.relu,
          'gelu': lambda x: jax.nn.gelu(x, approximate=False)}[name]


class Pooler(nn.Module):
  """BERT's pooler: dense + tanh on the first token. Part of the body (counted as BertModel does)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, hidden_BxLxD):
    d = self.cfg.d_model
    return jnp.tanh(Dense(d, ('embed', 'mlp'), True, dtype_of(self.cfg), name='dense')(
        hidden_BxLxD[:, 0]))


class LMHead(nn.Module):
  """Next-token logits: tied (x @ E^T, optionally scaled by d_model**-0.5 as T5) or a dense layer."""
  cfg: ModelConfig
  tokens: Optional[TokenTable]

  @nn.compact
  def __call__(self, hidden_BxLxD):
    cfg = self.cfg
    dtype = dtype_of(cfg)
    if cfg.tie_embeddings:
      h = hidden_BxLxD
      if cfg.logits_scale_tied:
        h = h * (cfg.d_model ** -0.5)
      if cfg.embed_dim != cfg.d_model:
        h = Dense(cfg.embed_dim, ('embed', 'factor_embed'), True, dtype, name='projection')(h)
      logits = self.tokens.attend(h, dtype)
    else:
      logits = Dense(cfg.vocab_size, ('embed', 'vocab'), False, dtype, normal_init(cfg),
                     name='output')(hidden_BxLxD)
    if cfg.logits_bias:
      logits = logits + param_with_axes(self, 'bias', nn.initializers.zeros, (cfg.vocab_size,),
                                        ('vocab',)).astype(dtype)
    logits = constrain(logits, ('activation_batch', 'activation_length', 'activation_vocab'))
    return logits.astype(jnp.float32)


def gather_positions(hidden_BxLxD, positions_BxP):
  """hidden_BxLxD[b, positions_BxP[b, p]] as [B, P, D] (a batched gather along the length)."""
  return jnp.take_along_axis(hidden_BxLxD, positions_BxP.astype(jnp.int32)[:, :, None], axis=1)


class MLMHead(nn.Module):
  """BERT/ALBERT/DistilBERT masked-LM head: dense (D -> E), activation, norm, tied decoder + bias.

  Called with `masked_positions` (int [B, P]), the head scores only those positions, as BERT's own
  pre-training code does (`max_predictions_per_seq`): the hidden states are gathered first and the
  transform, norm and vocabulary projection run on [B, P, D], so the logits are [B, P, V]
  (instead of [B, L, V]; with 15% of 128 tokens scored, P = 20, the head does 1/6.4 of the work).
  The contract for the objective and the data pipeline that feed it:
    - `masked_positions[b, p]` is an index into the length axis (0 <= index < L) of row b;
      P is fixed per run (static shapes): rows with fewer selected tokens are padded with any
      valid index (0 is customary) and those slots get weight 0;
    - the targets and weights of the loss are then [B, P] (BERT: `masked_lm_ids`,
      `masked_lm_weights`), aligned with `masked_positions`; a real position appears once;
    - the result equals the full head's logits restricted to those positions
      (`full[b, masked_positions[b, p]]`), so the loss is unchanged (tests/test_perf_equivalence).
  Without `masked_positions` every position is scored ([B, L, V]).
  """
  cfg: ModelConfig
  tokens: TokenTable

  @nn.compact
  def __call__(self, hidden_BxLxD, masked_positions_BxP=None):
    cfg = self.cfg
    dtype = dtype_of(cfg)
    h = hidden_BxLxD
    if masked_positions_BxP is not None:
      h = gather_positions(h, masked_positions_BxP)  # [B, P, D]
    if cfg.head_transform:
      h = Dense(cfg.embed_dim, ('embed', 'factor_embed'), True, dtype, name='transform')(h)
      h = activation_fn(cfg.head_activation)(h)
      h = Norm(cfg, name='norm')(h)
    if cfg.tie_embeddings:
      logits = self.tokens.attend(h, dtype)
    else:
      logits = Dense(cfg.vocab_size, ('factor_embed', 'vocab'), False, dtype, name='decoder')(h)
    logits = logits + param_with_axes(self, 'bias', nn.initializers.zeros, (cfg.vocab_size,),
                                      ('vocab',)).astype(dtype)
    logits = constrain(logits, ('activation_batch', 'activation_length', 'activation_vocab'))
    return logits.astype(jnp.float32)


def pool(cfg: ModelConfig, hidden_BxLxD, valid_BxL):
  """first token, mean over valid tokens, or the last valid token ([B, D])."""
  if cfg.pooling == 'first':
    return hidden_BxLxD[:, 0]
  if cfg.pooling == 'mean':
    w = valid_BxL.astype(hidden_BxLxD.dtype)[..., None]
    return (hidden_BxLxD * w).sum(1) / jnp.maximum(w.sum(1), 1)
  last = jnp.maximum(valid_BxL.astype(jnp.int32).sum(-1) - 1, 0)
  return jnp.take_along_axis(hidden_BxLxD, last[:, None, None], axis=1)[:, 0]


class ClassificationHead(nn.Module):
  """Sequence classification: pooled vector -> dropout -> [dense + activation -> dropout] -> labels.

  With a pooler in the body and first-token pooling, the pooler's output is used (BERT, ALBERT).
  """
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, hidden_BxLxD, valid_BxL, pooled_BxD=None):
    cfg = self.cfg
    dtype = dtype_of(cfg)
    if pooled_BxD is not None and cfg.pooling == 'first':
      x = pooled_BxD
    else:
      x = pool(cfg, hidden_BxLxD, valid_BxL)
    drop = nn.Dropout(cfg.classifier_dropout)
    if cfg.classifier_hidden:
      x = drop(x, deterministic=self.deterministic)
      x = Dense(cfg.d_model, ('embed', 'mlp'), True, dtype, name='hidden')(x)
      x = _classifier_activation(cfg.classifier_activation)(x)
    x = drop(x, deterministic=self.deterministic)
    return Dense(cfg.num_labels, ('embed', 'classes'), True, dtype, name='output')(x).astype(
        jnp.float32)


class TokenClassificationHead(nn.Module):
  """Per-token labels: dropout -> dense."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, hidden_BxLxD):
    x = nn.Dropout(self.cfg.classifier_dropout)(hidden_BxLxD, deterministic=self.deterministic)
    return Dense(self.cfg.num_labels, ('embed', 'classes'), True, dtype_of(self.cfg),
                 name='output')(x).astype(jnp.float32)


class PairHead(nn.Module):
  """NSP (BERT) / SOP (ALBERT) binary classifier on the pooled output."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, pooled_BxD):
    x = nn.Dropout(self.cfg.classifier_dropout)(pooled_BxD, deterministic=self.deterministic)
    return Dense(2, ('embed', 'classes'), True, dtype_of(self.cfg), name='output')(x).astype(
        jnp.float32)
