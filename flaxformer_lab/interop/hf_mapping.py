"""Hugging Face <-> lab mapping, one entry per family: config fields and weight names.

Each `Family` knows, for its Hugging Face classes (`BertModel`, `BertForMaskedLM`, ...):

  * `model_fields(hf, arch, tied)`: the lab `ModelConfig` fields of a Hugging Face config.json dict
    (every structural switch set explicitly, so nothing leaks in from a preset);
  * `hf_config(cfg, arch)`: the reverse, the config.json dict of a lab config;
  * `weights(cfg, arch, prefix)`: a `WeightMap` - one `Rule` per stored tensor (Hugging Face key,
    lab parameter path in the looped `layers_i` layout, and how the tensor is laid out), plus the
    keys Hugging Face may store as exact duplicates of tied weights and the buffers it may store.

Weight layouts (`kind`): Hugging Face's `nn.Linear` stores [out, in]; the lab's kernels are
[in, out] with the heads split out: query/key/value [D, H, K], attention output [H, K, D], GPT-2's
fused qkv [D, 3, H, K]. GPT-2's `Conv1D` already stores [in, out].
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import numpy as np

from flaxformer_lab.models.config import ModelConfig
from flaxformer_lab.models.positions import sinusoidal_table


class UnsupportedError(ValueError):
  """A Hugging Face model or config value the lab cannot reproduce exactly (the message says)."""


# --- tensor layouts ------------------------------------------------------------------------------
# kind -> (Hugging Face shape from the lab shape, lab -> Hugging Face, Hugging Face -> lab).
def _prod(xs) -> int:
  return int(np.prod(xs)) if len(xs) else 1


KINDS: dict[str, tuple[Callable, Callable, Callable]] = {
    # identical layout (embeddings, norms, biases, Conv1D kernels)
    'copy': (lambda s: tuple(s), lambda x: x, lambda x, s: x),
    # nn.Linear [out, in] <-> Dense kernel [in, out]
    'linear': (lambda s: (s[1], s[0]), lambda x: x.T, lambda x, s: x.T),
    # nn.Linear [H*K, D] <-> query/key/value kernel [D, H, K]
    'heads_in': (lambda s: (s[1] * s[2], s[0]), lambda x: x.reshape(x.shape[0], -1).T,
                 lambda x, s: x.T.reshape(s)),
    # bias [H*K] <-> [H, K]; GPT-2's fused bias [3*H*K] <-> [3, H, K]
    'flat': (lambda s: (_prod(s),), lambda x: x.reshape(-1), lambda x, s: x.reshape(s)),
    # nn.Linear [D, H*K] <-> attention output kernel [H, K, D]
    'heads_out': (lambda s: (s[2], s[0] * s[1]), lambda x: x.reshape(-1, x.shape[-1]).T,
                  lambda x, s: x.T.reshape(s)),
    # Conv1D [D, 3*H*K] <-> fused qkv kernel [D, 3, H, K]
    'conv_qkv': (lambda s: (s[0], _prod(s[1:])), lambda x: x.reshape(x.shape[0], -1),
                 lambda x, s: x.reshape(s)),
    # Conv1D [H*K, D] <-> attention output kernel [H, K, D]
    'conv_out': (lambda s: (s[0] * s[1], s[2]), lambda x: x.reshape(-1, x.shape[-1]),
                 lambda x, s: x.reshape(s)),
    # final_logits_bias buffer [1, V] <-> [V]
    'row': (lambda s: (1,) + tuple(s), lambda x: x[None], lambda x, s: x.reshape(s)),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str  # Hugging Face state-dict key
  lab: str  # lab parameter path, '/'-joined, looped (`layers_i`) layout
  kind: str  # a key of KINDS


@dataclasses.dataclass
class WeightMap:
  """Everything a checkpoint of one architecture stores, and how it maps to lab parameters."""
  rules: list[Rule] = dataclasses.field(default_factory=list)
  # Optional keys that Hugging Face ties to another stored key: when present (older checkpoints,
  # pytorch_model.bin) they must equal it exactly, else the checkpoint is not tied.
  tied: dict[str, str] = dataclasses.field(default_factory=dict)
  # Optional buffers: key -> check(array) returning an error message or None.
  buffers: dict[str, Optional[Callable[[np.ndarray], Optional[str]]]] = dataclasses.field(
      default_factory=dict)
  # Buffers Hugging Face writes on save for this architecture: key -> array.
  saved_buffers: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def lin(self, hf: str, lab: str, bias: bool = True, kind: str = 'linear'):
    self.rules.append(Rule(f'{hf}.weight', f'{lab}/kernel', kind))
    if bias:
      self.rules.append(Rule(f'{hf}.bias', f'{lab}/bias', 'copy'))

  def norm(self, hf: str, lab: str, bias: bool = True):
    self.rules.append(Rule(f'{hf}.weight', f'{lab}/scale', 'copy'))
    if bias:
      self.rules.append(Rule(f'{hf}.bias', f'{lab}/bias', 'copy'))

  def attn(self, hf: dict[str, str], lab: str, bias: bool = True):
    """`hf` maps q, k, v, o to the Hugging Face module names of one attention layer."""
    for part, name in (('q', 'query'), ('k', 'key'), ('v', 'value')):
      self.rules.append(Rule(f'{hf[part]}.weight', f'{lab}/{name}_kernel', 'heads_in'))
      if bias:
        self.rules.append(Rule(f'{hf[part]}.bias', f'{lab}/{name}_bias', 'flat'))
    self.rules.append(Rule(f'{hf["o"]}.weight', f'{lab}/out_kernel', 'heads_out'))
    if bias:
      self.rules.append(Rule(f'{hf["o"]}.bias', f'{lab}/out_bias', 'copy'))

  def copy(self, hf: str, lab: str, kind: str = 'copy'):
    self.rules.append(Rule(hf, lab, kind))


def _arange_check(x: np.ndarray) -> Optional[str]:
  want = np.arange(x.shape[-1])
  if not np.array_equal(np.asarray(x).reshape(-1, x.shape[-1])[0], want):
    return 'is not 0, 1, 2, ... (the lab computes position ids itself)'
  return None


def _zeros_check(x: np.ndarray) -> Optional[str]:
  return None if not np.any(x) else 'is not all zeros (the lab uses token type 0 by default)'


# --- activations ---------------------------------------------------------------------------------
HF_TO_LAB_ACT = {'gelu': 'gelu', 'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh',
                 'relu': 'relu', 'silu': 'silu', 'swish': 'silu'}
LAB_TO_HF_ACT = {'gelu': 'gelu', 'gelu_tanh': 'gelu_new', 'relu': 'relu', 'silu': 'silu'}
_GATED = {'gelu': 'geglu', 'gelu_tanh': 'geglu_tanh', 'silu': 'swiglu', 'relu': 'reglu'}


def _act(name: str, where: str) -> str:
  if name not in HF_TO_LAB_ACT:
    raise UnsupportedError(f'{where}={name!r} has no lab equivalent; supported: '
                           f'{", ".join(HF_TO_LAB_ACT)}')
  return HF_TO_LAB_ACT[name]


def _hf_act(lab: str, where: str) -> str:
  if lab not in LAB_TO_HF_ACT:
    raise UnsupportedError(f'model.{where}={lab!r} has no Hugging Face equivalent in this family; '
                           f'supported: {", ".join(LAB_TO_HF_ACT)}')
  return LAB_TO_HF_ACT[lab]


def _num_labels(hf: dict[str, Any]) -> int:
  if isinstance(hf.get('id2label'), dict) and hf['id2label']:
    return len(hf['id2label'])
  return int(hf.get('num_labels', 2))


def _label_fields(cfg: ModelConfig) -> dict[str, Any]:
  return {'id2label': {str(i): f'LABEL_{i}' for i in range(cfg.num_labels)},
          'label2id': {f'LABEL_{i}': i for i in range(cfg.num_labels)}}


@dataclasses.dataclass(frozen=True)
class Arch:
  """One Hugging Face class of a family and the lab head it corresponds to."""
  head: str  # lab head
  # The body has BERT's pooler: True / False, or None where the head does not read it and HF
  # builds the body without one but checkpoints often keep it (bert-base-uncased as
  # BertForMaskedLM, roberta-base): then the lab keeps whatever the checkpoint has.
  pooler: Optional[bool] = False
  base: bool = False  # a base-model class: its keys carry no `base_prefix`
  family: str = ''  # lab model family override (T5EncoderModel: encoder)


class Family:
  """A Hugging Face model family (one `model_type`)."""
  name: str = ''
  model_types: tuple[str, ...] = ()
  preset: str = ''  # configs/<preset>.py gives the non-model config sections
  base_prefix: str = ''  # attribute holding the body in head classes (`bert`, `transformer`, ...)
  archs: dict[str, Arch] = {}

  # Which HF key holds the output-embedding duplicate (untieable LM heads), and its source.
  def tie_keys(self, arch: str, prefix: str) -> Optional[tuple[str, str]]:
    return None

  def model_fields(self, hf: dict[str, Any], arch: str, tied: bool,
                   pooler: Optional[bool] = None) -> dict[str, Any]:
    """`pooler`: whether the body has one, for classes where that is optional (Arch.pooler None)."""
    raise NotImplementedError

  def hf_config(self, cfg: ModelConfig, arch: str) -> dict[str, Any]:
    raise NotImplementedError

  def weights(self, cfg: ModelConfig, arch: str, prefix: str) -> WeightMap:
    raise NotImplementedError

  def arch_for(self, cfg: ModelConfig) -> str:
    """The Hugging Face class for a lab head (and pooler)."""
    options = [a for a, spec in self.archs.items() if spec.head == cfg.head and
               (not spec.family or spec.family == cfg.family)]
    if not options:
      raise UnsupportedError(
          f'model.head={cfg.head!r} has no Hugging Face class in the {self.name} family; '
          f'classes: {", ".join(f"{a} (head {s.head})" for a, s in self.archs.items())}')
    exact = [a for a in options if self.archs[a].pooler in (cfg.pooler, None)]
    return (exact or options)[0]


# --- BERT, RoBERTa, XLM-R ------------------------------------------------------------------------
class Bert(Family):
  name = 'bert'
  model_types = ('bert',)
  preset = 'bert'
  base_prefix = 'bert'
  archs = {
      'BertModel': Arch('none', pooler=True, base=True),
      'BertForMaskedLM': Arch('mlm', pooler=None),
      'BertForPreTraining': Arch('mlm_nsp', pooler=True),
      'BertForSequenceClassification': Arch('classification', pooler=True),
      'BertForTokenClassification': Arch('token_classification', pooler=None),
  }
  roberta = False

  def model_fields(self, hf, arch, tied, pooler=None):
    if not tied:
      raise UnsupportedError(f'{arch}: an MLM decoder untied from the word embeddings')
    if hf.get('position_embedding_type', 'absolute') != 'absolute':
      raise UnsupportedError(f'position_embedding_type={hf["position_embedding_type"]!r} '
                             '(only absolute)')
    if hf.get('is_decoder') or hf.get('add_cross_attention'):
      raise UnsupportedError('a BERT-family decoder (is_decoder / add_cross_attention)')
    if not hf.get('type_vocab_size', 2):
      raise UnsupportedError('type_vocab_size=0')
    act = _act(hf.get('hidden_act', 'gelu'), 'hidden_act')
    drop = float(hf.get('hidden_dropout_prob', 0.1))
    cls_drop = hf.get('classifier_dropout')
    pad = hf.get('pad_token_id')
    pad = (1 if self.roberta else 0) if pad is None else int(pad)
    spec = self.archs[arch]
    return dict(
        family='encoder', vocab_size=int(hf.get('vocab_size', 30522)),
        d_model=int(hf.get('hidden_size', 768)), num_layers=int(hf.get('num_hidden_layers', 12)),
        num_heads=int(hf.get('num_attention_heads', 12)), num_kv_heads=0, head_dim=0,
        mlp_dim=int(hf.get('intermediate_size', 3072)),
        norm_position='post', norm_type='layernorm', norm_use_bias=True, norm_use_scale=True,
        norm_eps=float(hf.get('layer_norm_eps', 1e-12)), final_norm=False,
        position='learned', max_len=int(hf.get('max_position_embeddings', 512)),
        position_offset=pad + 1 if self.roberta else 0, positions_from_padding=self.roberta,
        attention_scale=True, qkv_bias=True, out_bias=True, fused_qkv=False,
        activation=act, mlp_bias=True, emb_dim=0, type_vocab_size=int(hf.get('type_vocab_size', 2)),
        num_languages=0, scale_embedding=False, embedding_norm=True, tie_embeddings=True,
        pad_id=pad, logits_scale_tied=False, logits_bias=False, share_layers=0,
        dropout_rate=drop,
        attention_dropout_rate=float(hf.get('attention_probs_dropout_prob', 0.1)),
        classifier_dropout=drop if cls_drop is None else float(cls_drop),
        head=spec.head, num_labels=_num_labels(hf), pooling='first',
        pooler=bool(pooler) if spec.pooler is None else spec.pooler,
        head_transform=True,
        # RobertaLMHead applies an exact GELU whatever hidden_act says; BERT's uses hidden_act.
        head_activation='gelu' if self.roberta else act,
        classifier_hidden=self.roberta, classifier_activation='tanh')

  def hf_config(self, cfg, arch):
    out = dict(
        model_type=self.model_types[0], architectures=[arch], vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.hidden_dim,
        hidden_act=_hf_act(cfg.activation, 'activation'), hidden_dropout_prob=cfg.dropout_rate,
        attention_probs_dropout_prob=cfg.attention_dropout_rate,
        max_position_embeddings=cfg.max_len, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.norm_eps, pad_token_id=cfg.pad_id,
        classifier_dropout=cfg.classifier_dropout, position_embedding_type='absolute',
        tie_word_embeddings=True, is_decoder=False, add_cross_attention=False)
    if cfg.head in ('classification', 'token_classification'):
      out.update(_label_fields(cfg))
    return out

  def _body(self, w: WeightMap, cfg: ModelConfig, p: str):
    w.copy(f'{p}embeddings.word_embeddings.weight', 'tokens/embedding')
    w.copy(f'{p}embeddings.position_embeddings.weight', 'encoder_embeddings/positions/embedding')
    w.copy(f'{p}embeddings.token_type_embeddings.weight', 'encoder_embeddings/token_types')
    w.norm(f'{p}embeddings.LayerNorm', 'encoder_embeddings/norm')
    w.buffers[f'{p}embeddings.position_ids'] = _arange_check
    w.buffers[f'{p}embeddings.token_type_ids'] = _zeros_check
    for i in range(cfg.num_layers):
      h, lab = f'{p}encoder.layer.{i}', f'encoder/layers_{i}'
      s = f'{h}.attention.self'
      w.attn(dict(q=f'{s}.query', k=f'{s}.key', v=f'{s}.value', o=f'{h}.attention.output.dense'),
             f'{lab}/self_attention')
      w.norm(f'{h}.attention.output.LayerNorm', f'{lab}/self_attention_norm')
      w.lin(f'{h}.intermediate.dense', f'{lab}/mlp/wi')
      w.lin(f'{h}.output.dense', f'{lab}/mlp/wo')
      w.norm(f'{h}.output.LayerNorm', f'{lab}/mlp_norm')
    if cfg.pooler:
      w.lin(f'{p}pooler.dense', 'pooler/dense')

  def weights(self, cfg, arch, prefix):
    w = WeightMap()
    self._body(w, cfg, prefix)
    word = f'{prefix}embeddings.word_embeddings.weight'
    head = cfg.head
    if self.roberta:
      if head == 'mlm':
        w.lin('lm_head.dense', 'mlm_head/transform')
        w.norm('lm_head.layer_norm', 'mlm_head/norm')
        w.copy('lm_head.bias', 'mlm_head/bias')
        w.tied.update({'lm_head.decoder.weight': word, 'lm_head.decoder.bias': 'lm_head.bias'})
      elif head == 'classification':
        w.lin('classifier.dense', 'classifier/hidden')
        w.lin('classifier.out_proj', 'classifier/output')
    else:
      if head in ('mlm', 'mlm_nsp'):
        w.lin('cls.predictions.transform.dense', 'mlm_head/transform')
        w.norm('cls.predictions.transform.LayerNorm', 'mlm_head/norm')
        w.copy('cls.predictions.bias', 'mlm_head/bias')
        w.tied.update({'cls.predictions.decoder.weight': word,
                       'cls.predictions.decoder.bias': 'cls.predictions.bias'})
      if head == 'mlm_nsp':
        w.lin('cls.seq_relationship', 'pair_head/output')
      elif head == 'classification':
        w.lin('classifier', 'classifier/output')
    if head == 'token_classification':
      w.lin('classifier', 'token_classifier/output')
    return w


class Roberta(Bert):
  name = 'roberta'
  model_types = ('roberta',)
  preset = 'roberta'
  base_prefix = 'roberta'
  roberta = True
  archs = {
      'RobertaModel': Arch('none', pooler=True, base=True),
      'RobertaForMaskedLM': Arch('mlm', pooler=None),
      'RobertaForSequenceClassification': Arch('classification'),
      'RobertaForTokenClassification': Arch('token_classification', pooler=None),
  }


class XLMRoberta(Roberta):
  name = 'xlmr'
  model_types = ('xlm-roberta',)
  preset = 'xlmr'
  archs = {
      'XLMRobertaModel': Arch('none', pooler=True, base=True),
      'XLMRobertaForMaskedLM': Arch('mlm', pooler=None),
      'XLMRobertaForSequenceClassification': Arch('classification'),
      'XLMRobertaForTokenClassification': Arch('token_classification', pooler=None),
  }


# --- ALBERT --------------------------------------------------------------------------------------
class Albert(Family):
  name = 'albert'
  model_types = ('albert',)
  preset = 'albert'
  base_prefix = 'albert'
  archs = {
      'AlbertModel': Arch('none', pooler=True, base=True),
      'AlbertForMaskedLM': Arch('mlm', pooler=None),
      'AlbertForPreTraining': Arch('mlm_nsp', pooler=True),
      'AlbertForSequenceClassification': Arch('classification', pooler=True),
      'AlbertForTokenClassification': Arch('token_classification', pooler=None),
  }

  def model_fields(self, hf, arch, tied, pooler=None):
    if not tied:
      raise UnsupportedError(f'{arch}: an MLM decoder untied from the word embeddings')
    if int(hf.get('inner_group_num', 1)) != 1:
      raise UnsupportedError(f'inner_group_num={hf["inner_group_num"]} (only 1)')
    if hf.get('position_embedding_type', 'absolute') != 'absolute':
      raise UnsupportedError(f'position_embedding_type={hf["position_embedding_type"]!r}')
    d = int(hf.get('hidden_size', 4096))
    e = int(hf.get('embedding_size', 128))
    if e >= d:
      raise UnsupportedError(
          f'embedding_size={e} >= hidden_size={d}: the lab projects E -> d_model only when '
          'E < d_model (model.emb_dim)')
    act = _act(hf.get('hidden_act', 'gelu_new'), 'hidden_act')
    spec = self.archs[arch]
    pad = hf.get('pad_token_id')
    return dict(
        family='encoder', vocab_size=int(hf.get('vocab_size', 30000)), d_model=d,
        num_layers=int(hf.get('num_hidden_layers', 12)),
        num_heads=int(hf.get('num_attention_heads', 64)), num_kv_heads=0, head_dim=0,
        mlp_dim=int(hf.get('intermediate_size', 16384)),
        norm_position='post', norm_type='layernorm', norm_use_bias=True, norm_use_scale=True,
        norm_eps=float(hf.get('layer_norm_eps', 1e-12)), final_norm=False,
        position='learned', max_len=int(hf.get('max_position_embeddings', 512)),
        position_offset=0, positions_from_padding=False,
        attention_scale=True, qkv_bias=True, out_bias=True, fused_qkv=False,
        activation=act, mlp_bias=True, emb_dim=e, type_vocab_size=int(hf.get('type_vocab_size', 2)),
        num_languages=0, scale_embedding=False, embedding_norm=True, tie_embeddings=True,
        pad_id=0 if pad is None else int(pad), logits_scale_tied=False, logits_bias=False,
        share_layers=int(hf.get('num_hidden_groups', 1)),
        dropout_rate=float(hf.get('hidden_dropout_prob', 0.0)),
        attention_dropout_rate=float(hf.get('attention_probs_dropout_prob', 0.0)),
        classifier_dropout=float(hf.get('classifier_dropout_prob', 0.1)),
        head=spec.head, num_labels=_num_labels(hf), pooling='first',
        pooler=bool(pooler) if spec.pooler is None else spec.pooler,
        head_transform=True, head_activation=act, classifier_hidden=False,
        classifier_activation='tanh')

  def hf_config(self, cfg, arch):
    out = dict(
        model_type='albert', architectures=[arch], vocab_size=cfg.vocab_size,
        embedding_size=cfg.embed_dim, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
        num_hidden_groups=cfg.share_layers or cfg.num_layers, inner_group_num=1,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.hidden_dim,
        hidden_act=_hf_act(cfg.activation, 'activation'), hidden_dropout_prob=cfg.dropout_rate,
        attention_probs_dropout_prob=cfg.attention_dropout_rate,
        max_position_embeddings=cfg.max_len, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.norm_eps, classifier_dropout_prob=cfg.classifier_dropout,
        pad_token_id=cfg.pad_id, position_embedding_type='absolute', tie_word_embeddings=True)
    if cfg.head in ('classification', 'token_classification'):
      out.update(_label_fields(cfg))
    return out

  def weights(self, cfg, arch, prefix):
    w, p = WeightMap(), prefix
    w.copy(f'{p}embeddings.word_embeddings.weight', 'tokens/embedding')
    w.copy(f'{p}embeddings.position_embeddings.weight', 'encoder_embeddings/positions/embedding')
    w.copy(f'{p}embeddings.token_type_embeddings.weight', 'encoder_embeddings/token_types')
    w.norm(f'{p}embeddings.LayerNorm', 'encoder_embeddings/norm')
    w.buffers[f'{p}embeddings.position_ids'] = _arange_check
    w.buffers[f'{p}embeddings.token_type_ids'] = _zeros_check
    w.lin(f'{p}encoder.embedding_hidden_mapping_in', 'encoder_embeddings/projection')
    for g in range(cfg.share_layers or cfg.num_layers):
      h = f'{p}encoder.albert_layer_groups.{g}.albert_layers.0'
      lab = f'encoder/layers_{g}/layer' if cfg.share_layers else f'encoder/layers_{g}'
      a = f'{h}.attention'
      w.attn(dict(q=f'{a}.query', k=f'{a}.key', v=f'{a}.value', o=f'{a}.dense'),
             f'{lab}/self_attention')
      w.norm(f'{a}.LayerNorm', f'{lab}/self_attention_norm')
      w.lin(f'{h}.ffn', f'{lab}/mlp/wi')
      w.lin(f'{h}.ffn_output', f'{lab}/mlp/wo')
      w.norm(f'{h}.full_layer_layer_norm', f'{lab}/mlp_norm')
    if cfg.pooler:
      w.lin(f'{p}pooler', 'pooler/dense')
    if cfg.head in ('mlm', 'mlm_nsp'):
      w.lin('predictions.dense', 'mlm_head/transform')
      w.norm('predictions.LayerNorm', 'mlm_head/norm')
      w.copy('predictions.bias', 'mlm_head/bias')
      w.tied.update({'predictions.decoder.weight': f'{p}embeddings.word_embeddings.weight',
                     'predictions.decoder.bias': 'predictions.bias'})
    if cfg.head == 'mlm_nsp':
      w.lin('sop_classifier.classifier', 'pair_head/output')
    elif cfg.head == 'classification':
      w.lin('classifier', 'classifier/output')
    elif cfg.head == 'token_classification':
      w.lin('classifier', 'token_classifier/output')
    return w


# --- DistilBERT ----------------------------------------------------------------------------------
class DistilBert(Family):
  name = 'distilbert'
  model_types = ('distilbert',)
  preset = 'distilbert'
  base_prefix = 'distilbert'
  archs = {
      'DistilBertModel': Arch('none', base=True),
      'DistilBertForMaskedLM': Arch('mlm'),
      'DistilBertForSequenceClassification': Arch('classification'),
      'DistilBertForTokenClassification': Arch('token_classification'),
  }

  def model_fields(self, hf, arch, tied, pooler=None):
    if not tied:
      raise UnsupportedError(f'{arch}: a vocab_projector untied from the word embeddings')
    act = _act(hf.get('activation', 'gelu'), 'activation')
    pad = hf.get('pad_token_id')
    return dict(
        family='encoder', vocab_size=int(hf.get('vocab_size', 30522)),
        d_model=int(hf.get('dim', 768)), num_layers=int(hf.get('n_layers', 6)),
        num_heads=int(hf.get('n_heads', 12)), num_kv_heads=0, head_dim=0,
        mlp_dim=int(hf.get('hidden_dim', 3072)),
        norm_position='post', norm_type='layernorm', norm_use_bias=True, norm_use_scale=True,
        norm_eps=1e-12, final_norm=False,  # DistilBERT's LayerNorms hard-code eps=1e-12
        # sinusoidal_pos_embds=True only initializes the stored table: loaded like a learned one.
        position='learned', max_len=int(hf.get('max_position_embeddings', 512)),
        position_offset=0, positions_from_padding=False,
        attention_scale=True, qkv_bias=True, out_bias=True, fused_qkv=False,
        activation=act, mlp_bias=True, emb_dim=0, type_vocab_size=0, num_languages=0,
        scale_embedding=False, embedding_norm=True, tie_embeddings=True,
        pad_id=0 if pad is None else int(pad), logits_scale_tied=False, logits_bias=False,
        share_layers=0, dropout_rate=float(hf.get('dropout', 0.1)),
        attention_dropout_rate=float(hf.get('attention_dropout', 0.1)),
        classifier_dropout=float(hf.get('seq_classif_dropout', 0.2)),
        head=self.archs[arch].head, num_labels=_num_labels(hf), pooling='first', pooler=False,
        head_transform=True, head_activation=act, classifier_hidden=True,
        classifier_activation='relu')

  def hf_config(self, cfg, arch):
    out = dict(
        model_type='distilbert', architectures=[arch], vocab_size=cfg.vocab_size,
        dim=cfg.d_model, n_layers=cfg.num_layers, n_heads=cfg.num_heads,
        hidden_dim=cfg.hidden_dim, activation=_hf_act(cfg.activation, 'activation'),
        dropout=cfg.dropout_rate, attention_dropout=cfg.attention_dropout_rate,
        seq_classif_dropout=cfg.classifier_dropout, max_position_embeddings=cfg.max_len,
        sinusoidal_pos_embds=False, pad_token_id=cfg.pad_id, tie_word_embeddings=True)
    if cfg.head in ('classification', 'token_classification'):
      out.update(_label_fields(cfg))
    return out

  def weights(self, cfg, arch, prefix):
    w, p = WeightMap(), prefix
    w.copy(f'{p}embeddings.word_embeddings.weight', 'tokens/embedding')
    w.copy(f'{p}embeddings.position_embeddings.weight', 'encoder_embeddings/positions/embedding')
    w.norm(f'{p}embeddings.LayerNorm', 'encoder_embeddings/norm')
    w.buffers[f'{p}embeddings.position_ids'] = _arange_check
    for i in range(cfg.num_layers):
      h, lab = f'{p}transformer.layer.{i}', f'encoder/layers_{i}'
      a = f'{h}.attention'
      w.attn(dict(q=f'{a}.q_lin', k=f'{a}.k_lin', v=f'{a}.v_lin', o=f'{a}.out_lin'),
             f'{lab}/self_attention')
      w.norm(f'{h}.sa_layer_norm', f'{lab}/self_attention_norm')
      w.lin(f'{h}.ffn.lin1', f'{lab}/mlp/wi')
      w.lin(f'{h}.ffn.lin2', f'{lab}/mlp/wo')
      w.norm(f'{h}.output_layer_norm', f'{lab}/mlp_norm')
    if cfg.head == 'mlm':
      w.lin('vocab_transform', 'mlm_head/transform')
      w.norm('vocab_layer_norm', 'mlm_head/norm')
      w.copy('vocab_projector.bias', 'mlm_head/bias')
      w.tied['vocab_projector.weight'] = f'{p}embeddings.word_embeddings.weight'
    elif cfg.head == 'classification':
      w.lin('pre_classifier', 'classifier/hidden')
      w.lin('classifier', 'classifier/output')
    elif cfg.head == 'token_classification':
      w.lin('classifier', 'token_classifier/output')
    return w


# --- GPT-2 ---------------------------------------------------------------------------------------
class GPT2(Family):
  name = 'gpt2'
  model_types = ('gpt2',)
  preset = 'gpt2'
  base_prefix = 'transformer'
  archs = {'GPT2Model': Arch('none', base=True), 'GPT2LMHeadModel': Arch('lm')}

  def tie_keys(self, arch, prefix):
    return ('lm_head.weight', f'{prefix}wte.weight') if arch == 'GPT2LMHeadModel' else None

  def model_fields(self, hf, arch, tied, pooler=None):
    if hf.get('scale_attn_by_inverse_layer_idx'):
      raise UnsupportedError('scale_attn_by_inverse_layer_idx=True')
    if hf.get('add_cross_attention'):
      raise UnsupportedError('add_cross_attention=True')
    d = int(hf.get('n_embd', 768))
    pad = hf.get('pad_token_id')
    return dict(
        family='decoder', vocab_size=int(hf.get('vocab_size', 50257)), d_model=d,
        num_layers=int(hf.get('n_layer', 12)), num_heads=int(hf.get('n_head', 12)),
        num_kv_heads=0, head_dim=0, mlp_dim=int(hf.get('n_inner') or 4 * d),
        norm_position='pre', norm_type='layernorm', norm_use_bias=True, norm_use_scale=True,
        norm_eps=float(hf.get('layer_norm_epsilon', 1e-5)), final_norm=True,
        position='learned', max_len=int(hf.get('n_positions', 1024)), position_offset=0,
        positions_from_padding=False,
        attention_scale=bool(hf.get('scale_attn_weights', True)), qkv_bias=True, out_bias=True,
        fused_qkv=True, activation=_act(hf.get('activation_function', 'gelu_new'),
                                        'activation_function'),
        mlp_bias=True, emb_dim=0, type_vocab_size=0, num_languages=0, scale_embedding=False,
        embedding_norm=False, tie_embeddings=tied, pad_id=0 if pad is None else int(pad),
        logits_scale_tied=False, logits_bias=False, share_layers=0,
        dropout_rate=float(hf.get('resid_pdrop', 0.1)),
        attention_dropout_rate=float(hf.get('attn_pdrop', 0.1)),
        head=self.archs[arch].head)

  def hf_config(self, cfg, arch):
    return dict(
        model_type='gpt2', architectures=[arch], vocab_size=cfg.vocab_size, n_embd=cfg.d_model,
        n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.hidden_dim,
        n_positions=cfg.max_len, layer_norm_epsilon=cfg.norm_eps,
        activation_function=_hf_act(cfg.activation, 'activation'),
        resid_pdrop=cfg.dropout_rate, embd_pdrop=cfg.dropout_rate,
        attn_pdrop=cfg.attention_dropout_rate, scale_attn_weights=cfg.attention_scale,
        scale_attn_by_inverse_layer_idx=False, add_cross_attention=False,
        tie_word_embeddings=cfg.tie_embeddings)

  def weights(self, cfg, arch, prefix):
    w, p = WeightMap(), prefix
    w.copy(f'{p}wte.weight', 'tokens/embedding')
    w.copy(f'{p}wpe.weight', 'decoder_embeddings/positions/embedding')
    for i in range(cfg.num_layers):
      h, lab = f'{p}h.{i}', f'decoder/layers_{i}'
      w.norm(f'{h}.ln_1', f'{lab}/self_attention_norm')
      w.copy(f'{h}.attn.c_attn.weight', f'{lab}/self_attention/qkv_kernel', 'conv_qkv')
      w.copy(f'{h}.attn.c_attn.bias', f'{lab}/self_attention/qkv_bias', 'flat')
      w.copy(f'{h}.attn.c_proj.weight', f'{lab}/self_attention/out_kernel', 'conv_out')
      w.copy(f'{h}.attn.c_proj.bias', f'{lab}/self_attention/out_bias')
      w.norm(f'{h}.ln_2', f'{lab}/mlp_norm')
      w.lin(f'{h}.mlp.c_fc', f'{lab}/mlp/wi', kind='copy')
      w.lin(f'{h}.mlp.c_proj', f'{lab}/mlp/wo', kind='copy')
      # Causal-mask buffers of older checkpoints (the lab builds its own masks).
      w.buffers[f'{h}.attn.bias'] = None
      w.buffers[f'{h}.attn.masked_bias'] = None
    w.norm(f'{p}ln_f', 'decoder/final_norm')
    if cfg.head == 'lm':
      if cfg.tie_embeddings:
        w.tied['lm_head.weight'] = f'{p}wte.weight'
      else:
        w.lin('lm_head', 'lm_head/output', bias=False)
    return w


# --- T5 ------------------------------------------------------------------------------------------
_T5_LAB_TO_HF_FF = {'relu': 'relu', 'gelu': 'gelu', 'gelu_tanh': 'gelu_new', 'silu': 'silu',
                    'geglu_tanh': 'gated-gelu', 'swiglu': 'gated-silu', 'reglu': 'gated-relu'}


class T5(Family):
  name = 't5'
  model_types = ('t5',)
  preset = 't5'
  base_prefix = ''
  archs = {
      'T5Model': Arch('none', base=True),
      'T5ForConditionalGeneration': Arch('seq2seq_lm'),
      'T5EncoderModel': Arch('none', base=True, family='encoder'),
  }

  def tie_keys(self, arch, prefix):
    return ('lm_head.weight', 'shared.weight') if arch == 'T5ForConditionalGeneration' else None

  @staticmethod
  def _ff(hf) -> str:
    proj = hf.get('feed_forward_proj', 'relu')
    parts = proj.split('-')
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != 'gated'):
      raise UnsupportedError(f'feed_forward_proj={proj!r}')
    base = 'gelu_new' if proj == 'gated-gelu' else parts[-1]
    act = _act(base, 'feed_forward_proj')
    if len(parts) == 2:
      if act == 'gelu':
        raise UnsupportedError(f'feed_forward_proj={proj!r} (a gated exact GELU)')
      return _GATED[act]
    return act

  def model_fields(self, hf, arch, tied, pooler=None):
    # transformers 5 derives the output scaling from the saved scale_decoder_outputs, else from
    # tie_word_embeddings (v1.0 ties and scales; v1.1 does neither).
    scale = hf.get('scale_decoder_outputs', hf.get('tie_word_embeddings', True) is not False)
    spec = self.archs[arch]
    if spec.head == 'seq2seq_lm' and scale and not tied:
      raise UnsupportedError('an untied T5 lm_head with scaled decoder outputs')
    n = int(hf.get('num_layers', 6))
    drop = float(hf.get('dropout_rate', 0.1))
    pad = hf.get('pad_token_id')
    return dict(
        family=spec.family or 'encoder_decoder', vocab_size=int(hf.get('vocab_size', 32128)),
        d_model=int(hf.get('d_model', 512)), num_layers=n,
        num_decoder_layers=int(hf.get('num_decoder_layers') or n),
        num_heads=int(hf.get('num_heads', 8)), num_kv_heads=0, head_dim=int(hf.get('d_kv', 64)),
        mlp_dim=int(hf.get('d_ff', 2048)),
        decoder_num_heads=0, decoder_mlp_dim=0,  # T5's stacks share heads and width
        norm_position='pre', norm_type='rmsnorm', norm_use_bias=False, norm_use_scale=True,
        norm_eps=float(hf.get('layer_norm_epsilon', 1e-6)), final_norm=True,
        position='relative_bias', relative_bias_shared=True,
        relative_num_buckets=int(hf.get('relative_attention_num_buckets', 32)),
        relative_max_distance=int(hf.get('relative_attention_max_distance', 128)),
        position_offset=0, positions_from_padding=False,
        attention_scale=False, qkv_bias=False, out_bias=False, fused_qkv=False,
        activation=self._ff(hf), mlp_bias=False, emb_dim=0, type_vocab_size=0, num_languages=0,
        scale_embedding=False, embedding_norm=False, share_encoder_decoder_embeddings=True,
        tie_embeddings=tied, logits_scale_tied=bool(scale) and tied, logits_bias=False,
        pad_id=0 if pad is None else int(pad), share_layers=0,
        dropout_rate=drop, attention_dropout_rate=drop, activation_dropout_rate=drop,
        head=spec.head)

  def hf_config(self, cfg, arch):
    if cfg.activation not in _T5_LAB_TO_HF_FF:
      raise UnsupportedError(f'model.activation={cfg.activation!r} has no T5 feed_forward_proj; '
                             f'supported: {", ".join(_T5_LAB_TO_HF_FF)}')
    ff = _T5_LAB_TO_HF_FF[cfg.activation]
    gated = ff.startswith('gated-')
    dense_act = 'gelu_new' if ff == 'gated-gelu' else ff.split('-')[-1]
    tied = cfg.tie_embeddings or cfg.head != 'seq2seq_lm'
    return dict(
        model_type='t5', architectures=[arch], vocab_size=cfg.vocab_size, d_model=cfg.d_model,
        d_kv=cfg.head_width, d_ff=cfg.hidden_dim, num_layers=cfg.num_layers,
        num_decoder_layers=cfg.decoder_layers, num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_num_buckets,
        relative_attention_max_distance=cfg.relative_max_distance,
        dropout_rate=cfg.dropout_rate, layer_norm_epsilon=cfg.norm_eps, feed_forward_proj=ff,
        dense_act_fn=dense_act, is_gated_act=gated, is_encoder_decoder=cfg.family != 'encoder',
        tie_word_embeddings=tied,
        scale_decoder_outputs=bool(cfg.logits_scale_tied and tied),
        pad_token_id=cfg.pad_id, decoder_start_token_id=cfg.pad_id)

  def _stack(self, w: WeightMap, cfg: ModelConfig, side: str, n: int):
    for i in range(n):
      h, lab = f'{side}.block.{i}.layer', f'{side}/layers_{i}'
      a = f'{h}.0.SelfAttention'
      w.attn(dict(q=f'{a}.q', k=f'{a}.k', v=f'{a}.v', o=f'{a}.o'), f'{lab}/self_attention',
             bias=False)
      w.norm(f'{h}.0.layer_norm', f'{lab}/self_attention_norm', bias=False)
      ff = 1
      if side == 'decoder':
        c = f'{h}.1.EncDecAttention'
        w.attn(dict(q=f'{c}.q', k=f'{c}.k', v=f'{c}.v', o=f'{c}.o'), f'{lab}/cross_attention',
               bias=False)
        w.norm(f'{h}.1.layer_norm', f'{lab}/cross_attention_norm', bias=False)
        ff = 2
      d = f'{h}.{ff}.DenseReluDense'
      if cfg.gated:
        w.lin(f'{d}.wi_0', f'{lab}/mlp/wi', bias=False)
        w.lin(f'{d}.wi_1', f'{lab}/mlp/wi_gate', bias=False)
      else:
        w.lin(f'{d}.wi', f'{lab}/mlp/wi', bias=False)
      w.lin(f'{d}.wo', f'{lab}/mlp/wo', bias=False)
      w.norm(f'{h}.{ff}.layer_norm', f'{lab}/mlp_norm', bias=False)
    w.copy(f'{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
           f'{side}_relative_bias/embedding')
    w.norm(f'{side}.final_layer_norm', f'{side}/final_norm', bias=False)
    w.tied[f'{side}.embed_tokens.weight'] = 'shared.weight'

  def weights(self, cfg, arch, prefix):
    w = WeightMap()
    w.copy('shared.weight', 'tokens/embedding')
    self._stack(w, cfg, 'encoder', cfg.num_layers)
    if cfg.family == 'encoder_decoder':
      self._stack(w, cfg, 'decoder', cfg.decoder_layers)
    if cfg.head == 'seq2seq_lm':
      if cfg.tie_embeddings:
        w.tied['lm_head.weight'] = 'shared.weight'
      else:
        w.lin('lm_head', 'lm_head/output', bias=False)
    return w


# --- BART, Marian --------------------------------------------------------------------------------
class Bart(Family):
  name = 'bart'
  model_types = ('bart',)
  preset = 'bart'
  base_prefix = 'model'
  archs = {'BartModel': Arch('none', base=True),
           'BartForConditionalGeneration': Arch('seq2seq_lm')}
  marian = False

  def tie_keys(self, arch, prefix):
    return None if self.archs[arch].base else ('lm_head.weight', f'{prefix}shared.weight')

  def model_fields(self, hf, arch, tied, pooler=None):
    heads = int(hf.get('encoder_attention_heads', 16))
    ffn = int(hf.get('encoder_ffn_dim', 4096))
    dec_heads = int(hf.get('decoder_attention_heads', 16))
    dec_ffn = int(hf.get('decoder_ffn_dim', 4096))
    vocab = int(hf.get('vocab_size', 58101 if self.marian else 50265))
    if self.marian:
      if hf.get('share_encoder_decoder_embeddings', True) is False:
        raise UnsupportedError('share_encoder_decoder_embeddings=False')
      if int(hf.get('decoder_vocab_size') or vocab) != vocab:
        raise UnsupportedError('decoder_vocab_size != vocab_size')
    spec = self.archs[arch]
    mpe = int(hf.get('max_position_embeddings', 1024))
    pad = hf.get('pad_token_id')
    return dict(
        family='encoder_decoder', vocab_size=vocab, d_model=int(hf.get('d_model', 1024)),
        num_layers=int(hf.get('encoder_layers', 12)),
        num_decoder_layers=int(hf.get('decoder_layers', 12)),
        num_heads=heads, num_kv_heads=0, head_dim=0, mlp_dim=ffn,
        # The decoder's own heads and width (0: the encoder's).
        decoder_num_heads=dec_heads if dec_heads != heads else 0,
        decoder_mlp_dim=dec_ffn if dec_ffn != ffn else 0,
        norm_position='post', norm_type='layernorm', norm_use_bias=True, norm_use_scale=True,
        norm_eps=1e-5, final_norm=False,  # torch LayerNorm's default eps
        position='sinusoidal' if self.marian else 'learned', sinusoidal_layout='concat',
        max_len=mpe if self.marian else mpe + 2, position_offset=0 if self.marian else 2,
        positions_from_padding=False,
        attention_scale=True, qkv_bias=True, out_bias=True, fused_qkv=False,
        activation=_act(hf.get('activation_function', 'gelu'), 'activation_function'),
        mlp_bias=True, emb_dim=0, type_vocab_size=0, num_languages=0,
        scale_embedding=bool(hf.get('scale_embedding', False)), embedding_norm=not self.marian,
        share_encoder_decoder_embeddings=True, tie_embeddings=tied, logits_scale_tied=False,
        logits_bias=spec.head == 'seq2seq_lm',
        pad_id=(58100 if self.marian else 1) if pad is None else int(pad), share_layers=0,
        dropout_rate=float(hf.get('dropout', 0.1)),
        attention_dropout_rate=float(hf.get('attention_dropout', 0.0)),
        activation_dropout_rate=float(hf.get('activation_dropout', 0.0)), head=spec.head)

  def hf_config(self, cfg, arch):
    out = dict(
        model_type=self.model_types[0], architectures=[arch], vocab_size=cfg.vocab_size,
        d_model=cfg.d_model, encoder_layers=cfg.num_layers, decoder_layers=cfg.decoder_layers,
        encoder_attention_heads=cfg.num_heads,
        decoder_attention_heads=cfg.decoder_stack.num_heads,
        encoder_ffn_dim=cfg.hidden_dim, decoder_ffn_dim=cfg.decoder_stack.hidden_dim,
        activation_function=_hf_act(cfg.activation, 'activation'), dropout=cfg.dropout_rate,
        attention_dropout=cfg.attention_dropout_rate,
        activation_dropout=cfg.activation_dropout_rate,
        max_position_embeddings=cfg.max_len - (0 if self.marian else 2),
        scale_embedding=cfg.scale_embedding, pad_token_id=cfg.pad_id,
        tie_word_embeddings=cfg.tie_embeddings or cfg.head != 'seq2seq_lm',
        is_encoder_decoder=True)
    if self.marian:
      out.update(decoder_vocab_size=cfg.vocab_size, share_encoder_decoder_embeddings=True,
                 decoder_start_token_id=cfg.pad_id)
    return out

  def _stack(self, w: WeightMap, cfg: ModelConfig, p: str, side: str, n: int):
    lab_emb = f'{side}_embeddings'
    if self.marian:
      table = _marian_table(cfg.max_len, cfg.d_model)
      key = f'{p}{side}.embed_positions.weight'
      w.buffers[key] = _table_check(table)
      if not p:  # MarianModel saves the tables; MarianMTModel has them in _keys_to_ignore_on_save
        w.saved_buffers[key] = table
    else:
      w.copy(f'{p}{side}.embed_positions.weight', f'{lab_emb}/positions/embedding')
      w.norm(f'{p}{side}.layernorm_embedding', f'{lab_emb}/norm')
    for i in range(n):
      h, lab = f'{p}{side}.layers.{i}', f'{side}/layers_{i}'
      a = f'{h}.self_attn'
      w.attn(dict(q=f'{a}.q_proj', k=f'{a}.k_proj', v=f'{a}.v_proj', o=f'{a}.out_proj'),
             f'{lab}/self_attention')
      w.norm(f'{h}.self_attn_layer_norm', f'{lab}/self_attention_norm')
      if side == 'decoder':
        c = f'{h}.encoder_attn'
        w.attn(dict(q=f'{c}.q_proj', k=f'{c}.k_proj', v=f'{c}.v_proj', o=f'{c}.out_proj'),
               f'{lab}/cross_attention')
        w.norm(f'{h}.encoder_attn_layer_norm', f'{lab}/cross_attention_norm')
      w.lin(f'{h}.fc1', f'{lab}/mlp/wi')
      w.lin(f'{h}.fc2', f'{lab}/mlp/wo')
      w.norm(f'{h}.final_layer_norm', f'{lab}/mlp_norm')
    w.tied[f'{p}{side}.embed_tokens.weight'] = f'{p}shared.weight'
    w.buffers[f'{p}{side}.version'] = None  # fairseq leftovers (BartModel ignores them too)

  def weights(self, cfg, arch, prefix):
    w = WeightMap()
    w.copy(f'{prefix}shared.weight', 'tokens/embedding')
    self._stack(w, cfg, prefix, 'encoder', cfg.num_layers)
    self._stack(w, cfg, prefix, 'decoder', cfg.decoder_layers)
    if cfg.head == 'seq2seq_lm':
      w.copy('final_logits_bias', 'lm_head/bias', 'row')
      if cfg.tie_embeddings:
        w.tied['lm_head.weight'] = f'{prefix}shared.weight'
      else:
        w.lin('lm_head', 'lm_head/output', bias=False)
    return w


class Marian(Bart):
  name = 'marian'
  model_types = ('marian',)
  preset = 'marian'
  archs = {'MarianModel': Arch('none', base=True), 'MarianMTModel': Arch('seq2seq_lm')}
  marian = True


def _marian_table(n_pos: int, dim: int) -> np.ndarray:
  """MarianSinusoidalPositionalEmbedding.create_weight, verbatim (float64 math, float32 result)."""
  position_enc = np.array(
      [[pos / np.power(10000, 2 * (j // 2) / dim) for j in range(dim)] for pos in range(n_pos)])
  out = np.empty((n_pos, dim), np.float32)
  sentinel = dim // 2 if dim % 2 == 0 else (dim // 2) + 1
  out[:, 0:sentinel] = np.sin(position_enc[:, 0::2]).astype(np.float32)
  out[:, sentinel:] = np.cos(position_enc[:, 1::2]).astype(np.float32)
  return out


def _table_check(want: np.ndarray):
  def check(x):
    if tuple(x.shape) != want.shape:
      return f'has shape {tuple(x.shape)}, expected the sinusoidal table {want.shape}'
    err = float(np.max(np.abs(np.asarray(x, np.float32) - want))) if want.size else 0.0
    lab = sinusoidal_table(want.shape[0], want.shape[1], 'concat')
    lab_err = float(np.max(np.abs(lab - want))) if want.size else 0.0
    if err > 1e-5 or lab_err > 1e-5:
      return (f'differs from the sinusoidal table the lab computes (max abs diff {err:.3g}); '
              'a learned or modified table cannot be represented')
    return None
  return check


FAMILIES: dict[str, Family] = {
    f.name: f for f in (Bert(), Roberta(), XLMRoberta(), Albert(), DistilBert(), GPT2(), T5(),
                        Bart(), Marian())}


def family_for(model_type: Optional[str] = None, arch: Optional[str] = None) -> Family:
  """The family of a config.json `model_type` (or, failing that, of an architecture name)."""
  for fam in FAMILIES.values():
    if model_type is not None and model_type in fam.model_types:
      return fam
  for fam in FAMILIES.values():
    if arch is not None and arch in fam.archs:
      return fam
  known = sorted(t for f in FAMILIES.values() for t in f.model_types)
  raise UnsupportedError(f'model_type={model_type!r} (architecture {arch!r}) is not supported; '
                         f'supported model types: {", ".join(known)}')


def infer_family(cfg: ModelConfig) -> Family:
  """The Hugging Face family whose structure a lab config has (XLM-R reads as RoBERTa)."""
  if cfg.family == 'decoder':
    return FAMILIES['gpt2']
  if cfg.position == 'relative_bias':
    return FAMILIES['t5']
  if cfg.family == 'encoder_decoder':
    return FAMILIES['marian' if cfg.position == 'sinusoidal' else 'bart']
  if cfg.emb_dim or cfg.share_layers:
    return FAMILIES['albert']
  if cfg.positions_from_padding:
    return FAMILIES['roberta']
  if not cfg.type_vocab_size:
    return FAMILIES['distilbert']
  return FAMILIES['bert']
