"""The Transformer: body (embeddings + stacks) and one head, for every family.

  encoder:          tokens -> Embeddings -> Stack(bidirectional) [-> Pooler] -> head
  decoder:          tokens -> Embeddings -> Stack(causal) -> head
  encoder_decoder:  source -> Embeddings -> Stack(bidirectional) = encoded
                    target -> Embeddings -> Stack(causal, cross-attention on encoded) -> head

Inputs follow one convention: `segment_ids` (0 = padding, 1, 2, ... = packed sequences; None = no
padding), `positions` (None = index within the segment). Training/eval and decoding are chosen by the
module fields `deterministic` and `decode`, so the same parameters serve every mode.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from flaxformer_lab.models import heads as heads_lib
from flaxformer_lab.models.attention import AttentionMask
from flaxformer_lab.models.config import ModelConfig
from flaxformer_lab.models.embedding import Embeddings, TokenTable
from flaxformer_lab.models.layers import normal_init
from flaxformer_lab.models.positions import RelativePositionBias, alibi_bias
from flaxformer_lab.models.positions import positions_from_segments
from flaxformer_lab.models.stack import Stack


def visible_keys(q_segments_BxT, k_segments_BxS, causal: bool, q_index_BxT=None,
                 k_index_BxS=None):
  """[B, 1, T, S] boolean: key is real, in the query's segment, and (causal) not in the future.

  A padding query (segment 0) attends to every real key, as Hugging Face's key-only masks do, so
  padded positions stay finite and comparable.
  """
  k_real = (k_segments_BxS != 0)[:, None, :]
  same = (q_segments_BxT[:, :, None] == k_segments_BxS[:, None, :]) | (
      q_segments_BxT[:, :, None] == 0)
  mask = k_real & same
  if causal:
    mask = mask & (k_index_BxS[:, None, :] <= q_index_BxT[:, :, None])
  return mask[:, None]


def attention_mask(q_segments_BxT, k_segments_BxS, causal: bool, q_index_BxT=None,
                   k_index_BxS=None) -> AttentionMask:
  """The `AttentionMask` of `visible_keys`, built once per stack and read by every layer.

  `causal` marks it for fused kernels only when queries and keys share the positions 0..T-1
  (`q_index_BxT` is None or `k_index_BxS` is the same array), as in training and prefill.
  """
  visible = visible_keys(q_segments_BxT, k_segments_BxS, causal, q_index_BxT, k_index_BxS)
  same_positions = q_index_BxT is None or q_index_BxT is k_index_BxS
  return AttentionMask.from_visible(visible, causal=causal and same_positions)


def _default_segments(ids_BxL, segment_ids):
  return jnp.ones_like(ids_BxL) if segment_ids is None else segment_ids


class Transformer(nn.Module):
  """Body + head. Call it Hugging Face style or use `encode` / `decode_step` for generation."""
  config: ModelConfig
  deterministic: bool = True
  decode: bool = False

  def setup(self):
    cfg = self.config
    self.tokens = TokenTable(cfg.vocab_size, cfg.embed_dim, normal_init(cfg))
    if cfg.family == 'encoder_decoder' and not cfg.share_encoder_decoder_embeddings:
      self.decoder_tokens = TokenTable(cfg.vocab_size, cfg.embed_dim, normal_init(cfg))
      dec_tokens = self.decoder_tokens
    else:
      dec_tokens = self.tokens
    if cfg.family in ('encoder', 'encoder_decoder'):
      self.encoder_embeddings = Embeddings(cfg, self.tokens, self.deterministic)
      self.encoder = Stack(cfg, cfg.num_layers, causal=False, deterministic=self.deterministic)
      if cfg.position == 'relative_bias' and cfg.relative_bias_shared:
        self.encoder_relative_bias = RelativePositionBias(
            cfg.relative_num_buckets, cfg.relative_max_distance, cfg.num_heads, True,
            normal_init(cfg, cfg.d_model))
    if cfg.family in ('decoder', 'encoder_decoder'):
      n = cfg.num_layers if cfg.family == 'decoder' else cfg.decoder_layers
      self.decoder_embeddings = Embeddings(cfg, dec_tokens, self.deterministic)
      self.decoder = Stack(cfg.decoder_stack, n, causal=True,
                           has_cross=cfg.family == 'encoder_decoder',
                           deterministic=self.deterministic, decode=self.decode)
      if cfg.position == 'relative_bias' and cfg.relative_bias_shared:
        self.decoder_relative_bias = RelativePositionBias(
            cfg.relative_num_buckets, cfg.relative_max_distance, cfg.decoder_stack.num_heads,
            False, normal_init(cfg, cfg.d_model))
    if cfg.pooler:
      self.pooler = heads_lib.Pooler(cfg)
    head = cfg.head
    if head in ('lm', 'seq2seq_lm'):
      self.lm_head = heads_lib.LMHead(cfg, dec_tokens if cfg.tie_embeddings else None)
    elif head in ('mlm', 'mlm_nsp'):
      self.mlm_head = heads_lib.MLMHead(cfg, self.tokens)
    elif head == 'classification':
      self.classifier = heads_lib.ClassificationHead(cfg, self.deterministic)
    elif head == 'token_classification':
      self.token_classifier = heads_lib.TokenClassificationHead(cfg, self.deterministic)
    if head in ('mlm_nsp', 'nsp'):
      self.pair_head = heads_lib.PairHead(cfg, self.deterministic)

  # ------------------------------------------------------------------------------------------------
  def _positions(self, ids_BxL, segments_BxL, positions):
    cfg = self.config
    if positions is None:
      positions = positions_from_segments(segments_BxL)
    if cfg.positions_from_padding:  # RoBERTa: pads sit at pad_id - position_offset
      positions = jnp.where(segments_BxL != 0, positions, cfg.pad_id - cfg.position_offset)
    return positions.astype(jnp.int32)

  def _bias(self, which: str, q_pos, k_pos, causal: bool):
    cfg = self.config
    if cfg.position == 'relative_bias' and cfg.relative_bias_shared:
      return getattr(self, f'{which}_relative_bias')(q_pos, k_pos)
    if cfg.position == 'alibi':
      heads = cfg.decoder_stack.num_heads if which == 'decoder' else cfg.num_heads
      return alibi_bias(heads, q_pos, k_pos, causal)
    return None

  def encode(self, input_ids, segment_ids=None, positions=None, token_type_ids=None,
             language_ids=None):
    """Bidirectional stack over the source: [B, S] ids -> [B, S, D] hidden states."""
    segments = _default_segments(input_ids, segment_ids)
    positions = self._positions(input_ids, segments, positions)
    x = self.encoder_embeddings(input_ids, positions, token_type_ids, language_ids)
    aux = dict(mask=attention_mask(segments, segments, causal=False), positions=positions,
               key_positions=positions, bias=self._bias('encoder', positions, positions, False),
               encoded=None, cross_mask=None)
    return self.encoder(x, aux)

  @nn.compact  # decode mode creates the 'key_positions' cache variable here, outside setup()
  def decode_hidden(self, input_ids, segment_ids=None, positions=None, encoded=None,
                    encoder_segment_ids=None, token_type_ids=None, language_ids=None):
    """Causal stack over the target (with cross-attention to `encoded` for encoder_decoder).

    In decode mode the inputs are the next chunk of tokens, `positions` their indices in the
    sequence (required), and keys come from the cache; `encoded` is needed on the first call only.
    """
    cfg = self.config
    segments = _default_segments(input_ids, segment_ids)
    if self.decode:
      if positions is None:
        raise ValueError('decode mode needs explicit positions (the index of each new token)')
      positions = positions.astype(jnp.int32)
      cache_pos = self.variable('cache', 'key_positions',
                                lambda: jnp.arange(input_ids.shape[1], dtype=jnp.int32))
      k_pos = jnp.broadcast_to(cache_pos.value[None], (input_ids.shape[0],
                                                       cache_pos.value.shape[0]))
      # Cache slots are positions: a key is visible when written at or before the query's position.
      mask = AttentionMask.from_visible((k_pos[:, None, :] <= positions[:, :, None])[:, None])
    else:
      positions = self._positions(input_ids, segments, positions)
      k_pos = positions
      index = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
      mask = attention_mask(segments, segments, causal=True, q_index_BxT=index, k_index_BxS=index)
    x = self.decoder_embeddings(input_ids, positions, token_type_ids, language_ids)
    cross_mask = None
    if cfg.family == 'encoder_decoder' and encoder_segment_ids is not None:
      # In decode mode pass encoder_segment_ids on every step: source padding stays masked.
      q_seg = jnp.ones_like(input_ids) if self.decode else segments
      cross_mask = attention_mask(q_seg, encoder_segment_ids, causal=False)
    aux = dict(mask=mask, positions=positions, key_positions=k_pos,
               bias=self._bias('decoder', positions, k_pos, True), encoded=encoded,
               cross_mask=cross_mask)
    return self.decoder(x, aux)

  def logits(self, hidden_BxLxD):
    return self.lm_head(hidden_BxLxD)

  def __call__(self, input_ids, *, segment_ids=None, positions=None, token_type_ids=None,
               language_ids=None, decoder_input_ids=None, decoder_segment_ids=None,
               decoder_positions=None, encoded=None, masked_positions=None) -> dict[str, Any]:
    """Returns a dict: 'logits' (the head's output), 'hidden', and where they exist 'pooled',
    'pair_logits' (NSP/SOP) and 'encoded'.

    `masked_positions` (int [B, P], MLM heads only): score only those positions, so 'logits' is
    [B, P, V] (see `heads.MLMHead` for the contract); None scores every position.
    """
    cfg = self.config
    out: dict[str, Any] = {}
    if cfg.family == 'decoder':
      hidden = self.decode_hidden(input_ids, segment_ids, positions, None, None, token_type_ids,
                                  language_ids)
      segments = _default_segments(input_ids, segment_ids)
    else:
      if encoded is None:
        encoded = self.encode(input_ids, segment_ids, positions, token_type_ids, language_ids)
      out['encoded'] = encoded
      segments = _default_segments(input_ids, segment_ids)
      if cfg.family == 'encoder_decoder':
        if decoder_input_ids is None:
          raise ValueError('an encoder_decoder model needs decoder_input_ids')
        hidden = self.decode_hidden(decoder_input_ids, decoder_segment_ids, decoder_positions,
                                    encoded, segments if segment_ids is not None else None)
        segments = _default_segments(decoder_input_ids, decoder_segment_ids)
      else:
        hidden = encoded
    out['hidden'] = hidden
    pooled = None
    if cfg.pooler:
      pooled = self.pooler(hidden)
      out['pooled'] = pooled
    head = cfg.head
    if masked_positions is not None and head not in ('mlm', 'mlm_nsp'):
      raise ValueError(f'masked_positions is for an MLM head, not model.head={head!r}')
    if head in ('lm', 'seq2seq_lm'):
      out['logits'] = self.lm_head(hidden)
    elif head in ('mlm', 'mlm_nsp'):
      out['logits'] = self.mlm_head(hidden, masked_positions)
    elif head == 'classification':
      out['logits'] = self.classifier(hidden, segments != 0, pooled)
    elif head == 'token_classification':
      out['logits'] = self.token_classifier(hidden)
    if head in ('mlm_nsp', 'nsp'):
      out['pair_logits'] = self.pair_head(pooled)
    return out


def build_model(config: Any, *, deterministic: bool = True, decode: bool = False) -> Transformer:
  """From a ModelConfig or an ml_collections model section."""
  cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
  return Transformer(cfg, deterministic=deterministic, decode=decode)


def dummy_inputs(cfg: ModelConfig, batch: int = 1, length: int = 8,
                 target_length: Optional[int] = None) -> dict[str, Any]:
  """Token arrays of the right shapes for `init` / shape evaluation."""
  ids = jnp.zeros((batch, length), jnp.int32)
  kw: dict[str, Any] = {'input_ids': ids}
  if cfg.family == 'encoder_decoder':
    kw['decoder_input_ids'] = jnp.zeros((batch, target_length or length), jnp.int32)
  if cfg.num_languages:
    kw['language_ids'] = jnp.zeros((batch, length), jnp.int32)
  return kw
