"""The model configuration: one frozen dataclass that every module reads.

`configs/*.py` build an `ml_collections.ConfigDict` from these defaults (so every field can be
overridden on the command line as `--config.model.<field>=...`), and `ModelConfig.from_dict` turns the
ConfigDict back into this hashable, validated dataclass before any module is built.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Optional

FAMILIES = ('encoder', 'decoder', 'encoder_decoder')
NORM_POSITIONS = ('pre', 'post', 'deepnorm')
NORM_TYPES = ('layernorm', 'rmsnorm')
POSITIONS = ('learned', 'sinusoidal', 'relative_bias', 'rope', 'alibi', 'none')
ACTIVATIONS = ('gelu', 'gelu_tanh', 'relu', 'silu', 'geglu', 'geglu_tanh', 'swiglu', 'reglu')
HEADS = ('none', 'lm', 'mlm', 'mlm_nsp', 'nsp', 'classification', 'token_classification', 'seq2seq_lm')
POOLINGS = ('first', 'mean', 'last')
ATTENTION_BACKENDS = ('einsum', 'xla', 'cudnn')
DROPOUT_BITS = (8, 16, 32)
AUTO_UNROLL_LAYERS = 6  # model.scan_unroll=0 unrolls stacks of up to this many layer groups
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch', 'save_attention_out')
DTYPES = ('float32', 'bfloat16', 'float16')
INIT_SCHEMES = ('normal', 't5')


class ConfigError(ValueError):
  """An impossible or unknown configuration value; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every architectural switch of the transformer family tree."""

  # --- family and size -------------------------------------------------------------------------
  family: str = 'decoder'  # encoder | decoder | encoder_decoder
  vocab_size: int = 256  # size of the token vocabulary (shared by encoder and decoder)
  d_model: int = 128  # width of the residual stream
  num_heads: int = 4  # query heads
  num_kv_heads: int = 0  # key/value heads (0 = num_heads; 1 = MQA; otherwise GQA)
  head_dim: int = 0  # per-head width (0 = d_model // num_heads)
  mlp_dim: int = 0  # feed-forward hidden width (0 = 4 * d_model)
  num_layers: int = 2  # layers of the encoder (encoder, encoder_decoder) or decoder (decoder)
  num_decoder_layers: int = 0  # decoder layers of an encoder_decoder (0 = num_layers)
  decoder_num_heads: int = 0  # query heads of an encoder_decoder's decoder (0 = num_heads; BART)
  decoder_mlp_dim: int = 0  # feed-forward width of an encoder_decoder's decoder (0 = mlp_dim)

  # --- normalization -----------------------------------------------------------------------------
  norm_position: str = 'pre'  # post: norm after each residual add (paper, BERT); pre: at branch start
  # deepnorm: post-LN with the residual scaled by alpha and v/out/MLP init scaled by beta (DeepNet)
  norm_type: str = 'layernorm'  # layernorm | rmsnorm
  norm_use_bias: bool = True  # LayerNorm with a bias (ignored by rmsnorm, which has none)
  norm_use_scale: bool = True  # learned gain on every norm
  norm_eps: float = 1e-5  # epsilon inside the norms
  final_norm: Optional[bool] = None  # norm after the stack (None = True for pre-LN, False for post-LN)

  # --- positions ---------------------------------------------------------------------------------
  position: str = 'learned'  # learned | sinusoidal | relative_bias | rope | alibi | none
  max_len: int = 512  # rows of a learned position table (also the longest sequence it allows)
  position_offset: int = 0  # added to position ids before lookup (RoBERTa/XLM-R/BART use 2)
  positions_from_padding: bool = False  # RoBERTa-style ids: pad tokens keep `pad_id`, others count on
  relative_num_buckets: int = 32  # T5 relative-position buckets
  relative_max_distance: int = 128  # T5 largest distinguished offset
  relative_bias_shared: bool = True  # T5: bias computed once (first layer) and shared by all layers
  sinusoidal_layout: str = 'interleaved'  # interleaved (the paper) | concat (sin half, cos half: Marian)
  rope_theta: float = 10000.0  # RoPE base frequency
  rope_fraction: float = 1.0  # fraction of each head's dims that rotate (1.0 = all)

  # --- attention -----------------------------------------------------------------------------------
  attention_backend: str = 'einsum'  # einsum (reference) | xla | cudnn (jax.nn.dot_product_attention)
  attention_scale: bool = True  # divide scores by sqrt(head_dim) (T5 does not)
  qkv_bias: bool = True  # biases on the q/k/v projections
  out_bias: bool = True  # bias on the attention output projection
  fused_qkv: bool = False  # one [embed, 3, heads, head_dim] projection (GPT-2's c_attn)
  # Causal self-attention (einsum backend, training/prefill) in up to this many query blocks, each
  # attending only to the keys up to its end (attention.causal_blocked_attention; blocks of at
  # least 64 queries); 1 = one full T x T block. 4 measured 0.92x the GPT-2 CPU row's step time.
  causal_attention_blocks: int = 4

  # --- feed-forward --------------------------------------------------------------------------------
  activation: str = 'gelu'  # gelu (exact) | gelu_tanh | relu | silu | geglu | geglu_tanh | swiglu | reglu
  mlp_bias: bool = True  # biases in the feed-forward layers

  # --- embeddings ----------------------------------------------------------------------------------
  emb_dim: int = 0  # factorized embedding size E (ALBERT); 0 = d_model (no projection)
  type_vocab_size: int = 0  # token-type (segment) embeddings; 0 = none
  num_languages: int = 0  # language embeddings (XLM); 0 = none
  scale_embedding: bool = False  # multiply token embeddings by sqrt(d_model) (the paper, Marian)
  embedding_norm: bool = False  # norm after summing the embeddings (BERT, BART)
  tie_embeddings: bool = True  # output projection reuses the input embedding
  share_encoder_decoder_embeddings: bool = True  # one token table for encoder and decoder
  pad_id: int = 0  # padding token id (masks, RoBERTa positions)
  logits_scale_tied: bool = False  # T5: scale decoder output by d_model**-0.5 before a tied head
  logits_bias: bool = False  # a bias on the LM / seq2seq logits (BART's final_logits_bias)

  # --- stacking ------------------------------------------------------------------------------------
  scan_layers: bool = True  # nn.scan over layers (compile time flat in depth) or a plain loop
  # Layers per scanned-loop iteration (same params; >= num_layers: unrolled). 0 = auto: unrolled
  # up to AUTO_UNROLL_LAYERS layer groups, one per iteration above (issue 12: unrolled, the
  # 4-layer rows of the CPU benchmark took 0.83x (GPT-2) / 0.92x (BERT) the scanned step time, the
  # scan's stacking of residuals costing more than its loop saves; deep stacks keep scan's compile).
  scan_unroll: int = 0
  remat_policy: str = 'none'  # none | full | dots | dots_no_batch | save_attention_out
  share_layers: int = 0  # cross-layer sharing: number of parameter groups (ALBERT: 1); 0 = none

  # --- regularization ------------------------------------------------------------------------------
  dropout_rate: float = 0.1  # dropout on embeddings and residual branches
  attention_dropout_rate: float = 0.1  # dropout on attention weights
  # Dropout on the feed-forward hidden units, after the activation (Hugging Face's
  # `activation_dropout`): T5 and BART drop there, the paper's Transformer, BERT, GPT-2 and Marian
  # do not.
  activation_dropout_rate: float = 0.0
  classifier_dropout: float = 0.1  # dropout before a classification head
  # Random bits per dropout decision (models/dropout.py): 32 is flax's Dropout; 16 and 8 split one
  # PRNG word into 2 or 4 decisions (rate rounded to a multiple of 2**-bits). 16 measured 0.85x
  # the GPT-2 row's step time of 32 on the CPU (issue 12; 8 bits gained nothing more).
  dropout_bits: int = 16

  # --- heads ---------------------------------------------------------------------------------------
  head: str = 'lm'  # none | lm | mlm | mlm_nsp | nsp | classification | token_classification | seq2seq_lm
  num_labels: int = 2  # classes of a (token) classification head
  pooling: str = 'first'  # classification pooling: first token | mean (non-pad) | last (non-pad)
  pooler: bool = False  # BERT pooler (dense + tanh on the first token), part of the body
  head_transform: bool = True  # MLM head: dense + activation + norm before the decoder
  head_activation: str = 'gelu'  # activation of the MLM head transform and of the pooler-free heads
  classifier_hidden: bool = False  # classification head: dense + activation before the output
  classifier_activation: str = 'tanh'  # tanh (RoBERTa, BART) | relu (DistilBERT)

  # --- precision -----------------------------------------------------------------------------------
  dtype: str = 'float32'  # computation dtype (parameters stay float32)

  # --- initialization ------------------------------------------------------------------------------
  # normal: every kernel and table N(0, 0.02) (BERT, GPT-2); t5: Mesh TensorFlow T5's, std
  # fan_in^-0.5 (query (d_model * head_dim)^-0.5, the folded attention scale), token tables and an
  # untied output std 1, relative position bias d_model^-0.5 (layers.normal_init)
  init_scheme: str = 'normal'

  # ------------------------------------------------------------------------------------------------
  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_width(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def hidden_dim(self) -> int:
    return self.mlp_dim or 4 * self.d_model

  @property
  def decoder_layers(self) -> int:
    return self.num_decoder_layers or self.num_layers

  @property
  def decoder_stack(self) -> 'ModelConfig':
    """The config the decoder stack is built from: an encoder_decoder's decoder may have its own
    number of heads and feed-forward width (BART, Marian); otherwise this config."""
    if self.family != 'encoder_decoder' or not (self.decoder_num_heads or self.decoder_mlp_dim):
      return self
    return dataclasses.replace(self, num_heads=self.decoder_num_heads or self.num_heads,
                               mlp_dim=self.decoder_mlp_dim or self.hidden_dim,
                               decoder_num_heads=0, decoder_mlp_dim=0)

  @property
  def embed_dim(self) -> int:
    return self.emb_dim or self.d_model

  @property
  def use_final_norm(self) -> bool:
    if self.final_norm is None:
      return self.norm_position == 'pre'
    return bool(self.final_norm)

  @property
  def gated(self) -> bool:
    return self.activation in ('geglu', 'geglu_tanh', 'swiglu', 'reglu')

  @classmethod
  def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))

  @classmethod
  def from_dict(cls, d: Any) -> 'ModelConfig':
    """Builds from a dict/ConfigDict; unknown keys are an error naming the closest valid keys."""
    if hasattr(d, 'to_dict'):
      d = d.to_dict()
    names = cls.field_names()
    for key in d:
      if key not in names:
        close = difflib.get_close_matches(key, names, n=3)
        hint = f'; did you mean {", ".join(close)}?' if close else ''
        raise ConfigError(f'unknown model config key {key!r}{hint}')
    cfg = cls(**dict(d))
    cfg.validate()
    return cfg

  def replace(self, **kw) -> 'ModelConfig':
    cfg = dataclasses.replace(self, **kw)
    cfg.validate()
    return cfg

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def validate(self) -> None:
    """Rejects impossible combinations with a message that says what to change."""

    def choice(name, options):
      value = getattr(self, name)
      if value not in options:
        raise ConfigError(f'model.{name}={value!r} is not one of {", ".join(map(str, options))}')

    choice('family', FAMILIES)
    choice('norm_position', NORM_POSITIONS)
    choice('norm_type', NORM_TYPES)
    choice('position', POSITIONS)
    choice('activation', ACTIVATIONS)
    choice('head', HEADS)
    choice('pooling', POOLINGS)
    choice('attention_backend', ATTENTION_BACKENDS)
    choice('remat_policy', REMAT_POLICIES)
    choice('dropout_bits', DROPOUT_BITS)
    choice('dtype', DTYPES)
    choice('init_scheme', INIT_SCHEMES)
    choice('head_activation', ACTIVATIONS[:5])
    choice('sinusoidal_layout', ('interleaved', 'concat'))
    choice('classifier_activation', ('tanh', 'relu', 'gelu'))
    if self.attention_backend != 'einsum' and self.attention_dropout_rate > 0:
      raise ConfigError(
          f'model.attention_backend={self.attention_backend!r} has no attention-weight dropout; '
          'set model.attention_dropout_rate=0 or use attention_backend=einsum')
    if self.fused_qkv and self.kv_heads != self.num_heads:
      raise ConfigError('model.fused_qkv needs num_kv_heads == num_heads (no GQA with a fused QKV)')
    for name in ('vocab_size', 'd_model', 'num_heads', 'num_layers'):
      if getattr(self, name) <= 0:
        raise ConfigError(f'model.{name} must be positive, got {getattr(self, name)}')
    if not self.head_dim and self.d_model % self.num_heads:
      raise ConfigError(
          f'model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; '
          'change one of them or set model.head_dim explicitly')
    for name in ('decoder_num_heads', 'decoder_mlp_dim'):
      if getattr(self, name) < 0:
        raise ConfigError(f'model.{name} must be >= 0 (0 = the encoder\'s), got '
                          f'{getattr(self, name)}')
      if getattr(self, name) and self.family != 'encoder_decoder':
        raise ConfigError(f'model.{name} sets the decoder of an encoder_decoder; with '
                          f'family={self.family!r} set it to 0 (use num_heads / mlp_dim)')
    if self.decoder_num_heads and not self.head_dim and self.d_model % self.decoder_num_heads:
      raise ConfigError(
          f'model.d_model={self.d_model} is not divisible by model.decoder_num_heads='
          f'{self.decoder_num_heads}; change one of them or set model.head_dim explicitly')
    if (self.decoder_num_heads and self.num_kv_heads
        and self.decoder_num_heads % self.num_kv_heads):
      raise ConfigError(
          f'model.decoder_num_heads={self.decoder_num_heads} is not a multiple of '
          f'model.num_kv_heads={self.num_kv_heads}; grouped-query attention needs whole groups')
    if self.num_heads % self.kv_heads:
      raise ConfigError(
          f'model.num_heads={self.num_heads} is not a multiple of model.num_kv_heads='
          f'{self.num_kv_heads}; grouped-query attention needs whole groups')
    if self.position == 'rope' and self.head_width % 2:
      raise ConfigError(f'rope needs an even head width, got {self.head_width}')
    if self.position == 'relative_bias' and (
        self.relative_num_buckets < 4
        or self.relative_max_distance <= self.relative_num_buckets // 2):
      # The causal bucketing keeps num_buckets // 2 exact offsets and spaces the rest
      # logarithmically up to max_distance: log(max_distance / max_exact) must be > 0.
      raise ConfigError(
          f'model.relative_max_distance={self.relative_max_distance} must exceed half of '
          f'model.relative_num_buckets={self.relative_num_buckets} (the exact buckets), and '
          'relative_num_buckets must be >= 4')
    if self.causal_attention_blocks < 1:
      raise ConfigError(f'model.causal_attention_blocks must be >= 1 (1 = no blocking), got '
                        f'{self.causal_attention_blocks}')
    if self.scan_unroll < 0:
      raise ConfigError(f'model.scan_unroll must be >= 1, or 0 for auto, got {self.scan_unroll}')
    if self.share_layers:
      for n in {self.num_layers, self.decoder_layers if self.family == 'encoder_decoder' else
                self.num_layers}:
        if n % self.share_layers:
          raise ConfigError(
              f'model.share_layers={self.share_layers} groups do not divide {n} layers evenly')
    if self.emb_dim and self.emb_dim > self.d_model:
      raise ConfigError(f'model.emb_dim={self.emb_dim} must not exceed d_model={self.d_model}')
    head_family = {'lm': ('decoder',), 'seq2seq_lm': ('encoder_decoder',),
                   'mlm': ('encoder',), 'mlm_nsp': ('encoder',), 'nsp': ('encoder',),
                   'token_classification': ('encoder', 'decoder')}
    if self.head in head_family and self.family not in head_family[self.head]:
      raise ConfigError(
          f'model.head={self.head!r} does not fit model.family={self.family!r}; '
          f'use one of the families {", ".join(head_family[self.head])}')
    if self.head in ('mlm_nsp', 'nsp') and not self.pooler:
      raise ConfigError(f'model.head={self.head!r} needs model.pooler=True')
    for name in ('dropout_rate', 'attention_dropout_rate', 'activation_dropout_rate',
                 'classifier_dropout'):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ConfigError(f'model.{name} must be in [0, 1), got {getattr(self, name)}')
    if self.rope_fraction <= 0 or self.rope_fraction > 1:
      raise ConfigError(f'model.rope_fraction must be in (0, 1], got {self.rope_fraction}')
    if self.num_labels <= 0:
      raise ConfigError(f'model.num_labels must be positive, got {self.num_labels}')
