"""Hugging Face checkpoints in the lab: load, call, save, and initialize training runs.

  loaded = huggingface.load('/path/to/bert')   # config.json + model.safetensors / pytorch_model.bin
  logits = loaded(input_ids=ids, attention_mask=mask)  # a jax array, as the HF model returns
  loaded.config, loaded.model, loaded.params           # training config, linen module, params
  huggingface.save(loaded, '/tmp/out')                 # AutoModel*.from_pretrained('/tmp/out')
  huggingface.save((config, params), '/tmp/out')       # any lab config of a supported family
  params, fresh = huggingface.load_params_for_config(d, model_config)  # init_from=hf:<d>

Supported: BERT, RoBERTa, XLM-R, ALBERT, DistilBERT (the base model, *ForMaskedLM,
*ForSequenceClassification, *ForTokenClassification, Bert/AlbertForPreTraining); GPT-2 (GPT2Model,
GPT2LMHeadModel); T5 v1.0 and v1.1 (T5Model, T5ForConditionalGeneration, T5EncoderModel); BART and
Marian (the base model, BartForConditionalGeneration, MarianMTModel). Each maps to one lab config:
the family preset of `flaxformer_lab/presets/` with the model section from config.json (`hf_mapping.py`).

Loading is strict: a missing, unexpected or mis-shaped weight raises `HFCheckpointError` naming
every such weight. What Hugging Face legitimately omits or duplicates is handled explicitly: tied
weights (GPT-2's lm_head, MLM decoders, T5/BART/Marian embed_tokens) may be absent and, when
present, must equal the weight they are tied to; buffers (position_ids, GPT-2's attn.bias, Marian's
sinusoidal tables) may be absent and, when present, are checked against what the lab computes.
BART/Marian's `final_logits_bias` buffer is the lab's learned `lm_head/bias` and must be present
(unless `zero_fill` names it).

`Loaded.__call__` takes Hugging Face inputs: `attention_mask` becomes `segment_ids` (the mask as
int32); positions are 0, 1, 2, ... for every token, pads included, as Hugging Face computes them;
RoBERTa/XLM-R positions count non-pad token ids as `create_position_ids_from_input_ids` does (the
lab also gives masked tokens the pad position: the same when masked tokens are pad tokens). Outputs
then match Hugging Face at every position, pads included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import re
from typing import Any, Iterator, Optional, Sequence

from absl import logging
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flaxformer_lab import tasks
from flaxformer_lab.interop import hf_mapping as mapping
from flaxformer_lab.data import tokenizers as tok_lib
from flaxformer_lab.interop.hf_mapping import UnsupportedError
from flaxformer_lab.presets import common
from flaxformer_lab.models.config import ModelConfig
from flaxformer_lab.models.stack import convert_layer_params
from flaxformer_lab.models.transformer import Transformer, build_model, dummy_inputs

CONFIG_NAME = 'config.json'
SAFE_WEIGHTS = 'model.safetensors'
TORCH_WEIGHTS = 'pytorch_model.bin'

# Top-level lab modules that are heads (or the pooler, which only some HF classes have): the only
# parameters `load_params_for_config` may leave to fresh initialization.
HEAD_MODULES = ('mlm_head', 'lm_head', 'classifier', 'token_classifier', 'pair_head', 'pooler')
# Model fields that change no parameter and no computation of the body.
_RUNTIME_FIELDS = ('attention_backend', 'scan_layers', 'remat_policy', 'dtype', 'dropout_rate',
                   'attention_dropout_rate', 'classifier_dropout')
_HEAD_FIELDS = ('head', 'num_labels', 'pooling', 'pooler', 'head_transform', 'head_activation',
                'classifier_hidden', 'classifier_activation', 'tie_embeddings',
                'logits_scale_tied', 'logits_bias')
_PRESETS_WITH_TASK_ARG = ('bert', 'roberta', 'albert', 'distilbert', 'xlmr')


class HFCheckpointError(ValueError):
  """A checkpoint whose weights do not match its config: the message names every bad weight."""


# --- reading and writing tensors ------------------------------------------------------------------
def _legacy_name(key: str) -> str:
  """HF's legacy renaming on load: LayerNorm.gamma / .beta are .weight / .bias."""
  return re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', re.sub(r'LayerNorm\.gamma$',
                                                                'LayerNorm.weight', key))


@contextlib.contextmanager
def _reading(file: str) -> Iterator[None]:
  """A weights file the library cannot parse (truncated, garbage, not that format) is an
  HFCheckpointError naming it, not the library's traceback."""
  try:
    yield
  except (HFCheckpointError, FileNotFoundError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise HFCheckpointError(
        f'{file} cannot be read ({type(e).__name__}: {" ".join(str(e).split())[:200]}): the '
        'checkpoint is corrupt or incomplete; download or save it again') from e


def _weight_files(path: str) -> list[str]:
  """model.safetensors (or its shards), else pytorch_model.bin (or its shards)."""
  for name in (SAFE_WEIGHTS, TORCH_WEIGHTS):
    if os.path.exists(os.path.join(path, name)):
      return [os.path.join(path, name)]
    index = os.path.join(path, name + '.index.json')
    if os.path.exists(index):
      with _reading(index), open(index) as f:
        shards = sorted(set(json.load(f)['weight_map'].values()))
      return [os.path.join(path, s) for s in shards]
  raise FileNotFoundError(f'{path} holds no {SAFE_WEIGHTS} or {TORCH_WEIGHTS} (nor a sharded '
                          'index of either)')


def _read_safetensors(file: str, keys: Optional[set[str]]) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  out = {}
  with _reading(file), safe_open(file, framework='np') as f:
    for key in f.keys():
      if keys is not None and _legacy_name(key) not in keys:
        continue
      try:
        out[key] = f.get_tensor(key)
      except TypeError:  # bfloat16: numpy has no such dtype; read the raw bytes
        out[key] = _read_raw_tensor(file, key)
  return out


def _read_raw_tensor(file: str, key: str) -> np.ndarray:
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  with open(file, 'rb') as f:
    n = int.from_bytes(f.read(8), 'little')
    info = json.loads(f.read(n))[key]
  if info['dtype'] != 'BF16':
    raise HFCheckpointError(f'{file}: weight {key} has unsupported dtype {info["dtype"]}')
  start, end = info['data_offsets']
  raw = np.memmap(file, dtype=np.uint8, mode='r', offset=8 + n)[start:end]
  return np.asarray(raw).view(ml_dtypes.bfloat16).astype(np.float32).reshape(info['shape'])


def _read_torch(file: str, keys: Optional[set[str]]) -> dict[str, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top
  with _reading(file):
    sd = torch.load(file, map_location='cpu', weights_only=True)
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in sd.items()
          if keys is None or _legacy_name(k) in keys}


def checkpoint_keys(path: str) -> list[str]:
  """The tensor names of a checkpoint directory (safetensors: read from the headers only)."""
  files = _weight_files(path)
  if files[0].endswith('.safetensors'):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    keys = []
    for file in files:
      with _reading(file), safe_open(file, framework='np') as f:
        keys += list(f.keys())
  else:
    keys = [k for file in files for k in _read_torch(file, None)]
  return sorted(_legacy_name(k) for k in keys)


def read_state_dict(path: str, keys: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
  """The tensors of a checkpoint directory (all, or those named in `keys`) as numpy arrays, under
  the names transformers uses (LayerNorm.gamma/beta renamed weight/bias)."""
  wanted = None if keys is None else set(keys)
  sd = {}
  for file in _weight_files(path):
    reader = _read_safetensors if file.endswith('.safetensors') else _read_torch
    sd.update(reader(file, wanted))
  return {_legacy_name(k): v for k, v in sd.items()}


def _write_safetensors(sd: dict[str, np.ndarray], path: str) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, path,
            metadata={'format': 'pt'})


def read_hf_config(path: str) -> dict[str, Any]:
  file = os.path.join(path, CONFIG_NAME)
  if not os.path.exists(file):
    raise FileNotFoundError(f'{path} has no {CONFIG_NAME}: is it a Hugging Face checkpoint dir?')
  try:
    with open(file) as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f'{file} is not valid JSON ({e}): is the checkpoint complete?') from e


# --- lab parameter trees --------------------------------------------------------------------------
def _flatten(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep='/')


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict(flat, sep='/')


def abstract_params(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Flat path -> shape of the lab parameters of `cfg` (traced, nothing allocated)."""
  model = build_model(cfg)
  tree = jax.eval_shape(lambda: nn.meta.unbox(
      model.init(jax.random.PRNGKey(0), **dummy_inputs(cfg, 1, 4))['params']))
  return {k: tuple(v.shape) for k, v in _flatten(tree).items()}


def _layout(flat: dict[str, np.ndarray], scanned: bool) -> dict[str, Any]:
  """A looped flat dict as a nested tree in the scanned or looped layout (numpy leaves)."""
  tree = _unflatten(flat)
  if scanned:
    tree = jax.tree.map(np.asarray, convert_layer_params(tree, scanned=True))
  return tree


def _looped_flat(params) -> dict[str, np.ndarray]:
  tree = convert_layer_params(jax.device_get(nn.meta.unbox(params)), scanned=False)
  return {k: np.asarray(v) for k, v in _flatten(tree).items()}


# --- checkpoint -> lab ----------------------------------------------------------------------------
@dataclasses.dataclass
class _Checkpoint:
  """A checkpoint directory as read: config.json, tensors, family, class, key prefix, tying."""
  path: str
  hf: dict[str, Any]
  sd: dict[str, np.ndarray]
  family: mapping.Family
  arch: str
  prefix: str
  tied: bool
  pooler: bool

  def fields(self) -> dict[str, Any]:
    return self.family.model_fields(self.hf, self.arch, self.tied, self.pooler)


def _prefix(fam: mapping.Family, arch: str, keys: set[str]) -> str:
  """The key prefix of the body: none for base classes, `<base_prefix>.` for head classes; a head
  class saved around a bare body (or the reverse) follows the keys, as HF does."""
  spec = fam.archs[arch]
  prefix = '' if spec.base or not fam.base_prefix else fam.base_prefix + '.'
  alt = fam.base_prefix + '.' if not prefix and fam.base_prefix else ''
  probe = {'gpt2': 'wte.weight', 't5': 'shared.weight', 'bart': 'shared.weight',
           'marian': 'shared.weight'}.get(fam.name, 'embeddings.word_embeddings.weight')
  if (prefix + probe) not in keys and (alt + probe) in keys:
    prefix = alt
  return prefix


def _fits(fam: mapping.Family, hf: dict[str, Any], arch: str, keys: set[str],
          tensors: dict[str, np.ndarray], exact: bool = True) -> Optional[_Checkpoint]:
  """The reading of the checkpoint as `arch` when its key set is exactly that class's (or, not
  `exact`, when it holds at least that class's weights), else None."""
  prefix = _prefix(fam, arch, keys)
  tied = _resolve_tied(fam, hf, arch, prefix, keys, tensors)
  pooler = any(k.startswith(f'{prefix}pooler.') for k in keys)
  ckpt = _Checkpoint('', hf, {}, fam, arch, prefix, tied, pooler)
  try:
    cfg = ModelConfig().replace(**ckpt.fields())
  except (UnsupportedError, ValueError):
    return None
  w = fam.weights(cfg, arch, prefix)
  required = {r.hf for r in w.rules}
  if required <= keys and (not exact or keys <= required | set(w.tied) | set(w.buffers)):
    return ckpt
  return None


def _open_checkpoint(path: str, architecture: Optional[str] = None,
                     tensors: bool = True) -> _Checkpoint:
  """Reads config.json and (with `tensors`; else only the tensors that decide tying) the weights.

  The class is config.json's `architectures[0]` (or `architecture`). When the checkpoint holds
  all its weights and more, and another class of the family matches the checkpoint exactly -
  bert-base-uncased says BertForMaskedLM but stores BertForPreTraining's NSP head - that class is
  used and logged. (Missing weights never switch the class: they are an error.)
  """
  hf = read_hf_config(path)
  arch = architecture or (hf.get('architectures') or [None])[0]
  fam = mapping.family_for(hf.get('model_type'), arch)
  if arch is None:
    arch = next(a for a, s in fam.archs.items() if s.base)
  if arch not in fam.archs:
    raise UnsupportedError(f'{path}: architecture {arch!r} is not supported for the {fam.name} '
                           f'family; supported: {", ".join(fam.archs)}')
  keys = set(checkpoint_keys(path))
  tie_keys = {k for a in fam.archs for k in (fam.tie_keys(a, _prefix(fam, a, keys)) or ())}
  sd = read_state_dict(path, None if tensors else sorted(tie_keys & keys))
  ckpt = _fits(fam, hf, arch, keys, sd)
  if ckpt is None and architecture is None and _fits(fam, hf, arch, keys, sd, exact=False):
    for other in fam.archs:
      if other != arch and (found := _fits(fam, hf, other, keys, sd)) is not None:
        logging.warning('%s: config.json says %s but the weights are exactly those of %s: '
                        'loading it as %s', path, arch, other, other)
        ckpt = found
        break
  if ckpt is None:  # read as the configured class; _convert names what does not fit
    prefix = _prefix(fam, arch, keys)
    ckpt = _Checkpoint('', hf, {}, fam, arch, prefix,
                       _resolve_tied(fam, hf, arch, prefix, keys, sd),
                       any(k.startswith(f'{prefix}pooler.') for k in keys))
  ckpt.path, ckpt.sd = path, sd
  return ckpt


def _resolve_tied(fam, hf, arch, prefix, keys, sd) -> bool:
  """Whether the output projection is the input embedding, decided as transformers 5 does: tied
  unless the config says otherwise (T5 ignores it) or the checkpoint stores a different lm_head."""
  tie = fam.tie_keys(arch, prefix)
  if tie is None:
    return True
  head_key, source = tie
  if fam.name != 't5' and hf.get('tie_word_embeddings', True) is False:
    return False
  if head_key not in keys:
    return True
  return (source in sd and head_key in sd and sd[source].shape == sd[head_key].shape and
          np.array_equal(sd[source], sd[head_key]))


def _convert(sd: dict[str, np.ndarray], cfg: ModelConfig, wmap: mapping.WeightMap, where: str,
             zero_fill: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """The checkpoint's tensors as a flat looped lab dict; strict (see the module docstring)."""
  shapes = abstract_params(cfg.replace(scan_layers=False))
  remaining = dict(sd)
  out: dict[str, np.ndarray] = {}
  missing, misshaped, problems = [], [], []
  for rule in wmap.rules:
    if rule.lab not in shapes:
      raise AssertionError(f'mapping bug: {rule.hf} -> {rule.lab} is not a lab parameter')
    lab_shape = shapes[rule.lab]
    shape_fn, _, to_lab = mapping.KINDS[rule.kind]
    want = shape_fn(lab_shape)
    if rule.hf not in remaining:
      if rule.hf in zero_fill:
        out[rule.lab] = np.zeros(lab_shape, np.float32)
      else:
        missing.append(rule.hf)
      continue
    x = remaining.pop(rule.hf)
    if tuple(x.shape) != tuple(want):
      misshaped.append(f'{rule.hf}: {list(x.shape)} in the checkpoint, {list(want)} expected')
      continue
    out[rule.lab] = np.asarray(to_lab(np.asarray(x, np.float32), lab_shape), np.float32)
  for key, source in wmap.tied.items():
    if key in remaining:
      x = remaining.pop(key)
      if source in sd and (x.shape != sd[source].shape or not np.array_equal(x, sd[source])):
        problems.append(f'{key} differs from {source}, to which it is tied (the lab cannot '
                        'represent untied weights of this head)')
  for key, check in wmap.buffers.items():
    if key in remaining:
      x = remaining.pop(key)
      msg = check(x) if check is not None else None
      if msg:
        problems.append(f'buffer {key} {msg}')
  unexpected = sorted(remaining)
  lines = []
  if missing:
    lines.append(f'missing weight(s): {", ".join(missing)}')
  if unexpected:
    lines.append(f'unexpected weight(s): {", ".join(unexpected)}')
  if misshaped:
    lines.append('mis-shaped weight(s): ' + '; '.join(misshaped))
  lines += problems
  if lines:
    raise HFCheckpointError(f'{where}:\n  ' + '\n  '.join(lines))
  not_covered = sorted(set(shapes) - set(out))
  if not_covered:
    raise AssertionError(f'mapping bug: lab parameters without a source: {not_covered}')
  return out


def _preset_config(fam: mapping.Family, head: str) -> ml_collections.ConfigDict:
  module = importlib.import_module(f'flaxformer_lab.presets.{fam.preset}')
  arg = None
  if fam.preset in _PRESETS_WITH_TASK_ARG:
    arg = 'task=classification' if head in ('classification', 'token_classification') else None
  return module.get_config(arg)


def training_config(fam: mapping.Family, fields: dict[str, Any]) -> ml_collections.ConfigDict:
  """The family preset's full training config with the model section replaced by `fields`."""
  c = _preset_config(fam, fields['head'])
  model = c.model.to_dict()
  model.update(fields)
  c.model = common.model_config(**model)
  cfg = ModelConfig.from_dict(c.model)  # validates
  head = cfg.head
  objective = tasks.objective_for_head(head)  # the objective that trains this head by default
  if objective is not None:
    c.task = objective.name
    objective.adapt_config(c, cfg)
  if cfg.position in ('learned', 'sinusoidal'):  # sequences must fit the position table
    room = cfg.max_len - cfg.position_offset
    c.data.seq_len = min(c.data.seq_len, room)
    if c.data.get('target_len'):
      c.data.target_len = min(c.data.target_len, room)
  # A subword tokenizer the preset would train must fit the checkpoint's vocabulary (the
  # checkpoint's own tokenizer, when it has one, is saved beside the run by `convert`).
  if c.data.tokenizer != 'byte' and tok_lib.trained_vocab_size(c.data) > cfg.vocab_size:
    c.data.tokenizer_vocab_size = cfg.vocab_size
  return c


def model_config_from_hf(path: str, architecture: Optional[str] = None) -> ModelConfig:
  """The lab ModelConfig of a Hugging Face checkpoint directory."""
  return ModelConfig.from_dict(config_from_hf(path, architecture).model)


def config_from_hf(path: str, architecture: Optional[str] = None,
                   **model_overrides: Any) -> ml_collections.ConfigDict:
  """A full training config for a checkpoint directory: the family preset, the model section from
  config.json (and the checkpoint's class, tying and pooler), then `model_overrides` (e.g.
  head='classification', num_labels=3). Reads only the tensors that decide tying."""
  ckpt = _open_checkpoint(path, architecture, tensors=False)
  fields = ckpt.fields()
  head = model_overrides.get('head')
  if head and head != fields['head'] and 'pooler' not in model_overrides:
    # A new head gets the pooler its HF class has (RoBERTa's classifier reads <s>, BERT's the
    # pooler); heads that ignore the pooler keep the checkpoint's.
    specs = [s for s in ckpt.family.archs.values() if s.head == head and s.pooler is not None]
    if specs:
      fields['pooler'] = specs[0].pooler
  fields.update(model_overrides)
  return training_config(ckpt.family, fields)


# --- the loaded model -----------------------------------------------------------------------------
def hf_inputs(cfg: ModelConfig, input_ids, attention_mask=None, token_type_ids=None,
              position_ids=None, decoder_input_ids=None, decoder_attention_mask=None,
              decoder_position_ids=None) -> dict[str, Any]:
  """Keyword arguments of `Transformer.__call__` for Hugging Face style inputs (see module doc)."""
  ids = jnp.asarray(np.asarray(input_ids), jnp.int32)
  kw: dict[str, Any] = {'input_ids': ids}
  if attention_mask is not None:
    kw['segment_ids'] = jnp.asarray(np.asarray(attention_mask)).astype(jnp.int32)
  kw['positions'] = _positions(cfg, ids, position_ids)
  if token_type_ids is not None:
    if not cfg.type_vocab_size:  # GPT-2 would add wte[token_type_ids]: refuse, not ignore
      raise ValueError('this model has no token type embeddings: pass token_type_ids=None')
    kw['token_type_ids'] = jnp.asarray(np.asarray(token_type_ids), jnp.int32)
  if cfg.family == 'encoder_decoder':
    if decoder_input_ids is None:
      raise ValueError('an encoder-decoder model needs decoder_input_ids')
    dec = jnp.asarray(np.asarray(decoder_input_ids), jnp.int32)
    kw['decoder_input_ids'] = dec
    if decoder_attention_mask is not None:
      kw['decoder_segment_ids'] = jnp.asarray(np.asarray(decoder_attention_mask)).astype(
          jnp.int32)
    kw['decoder_positions'] = _positions(cfg, dec, decoder_position_ids, from_padding=False)
  return kw


def _positions(cfg: ModelConfig, ids, position_ids=None, from_padding: Optional[bool] = None):
  if position_ids is not None:  # HF ids index the table directly; the lab adds position_offset
    return jnp.asarray(np.asarray(position_ids), jnp.int32) - cfg.position_offset
  if cfg.positions_from_padding if from_padding is None else from_padding:
    real = (ids != cfg.pad_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=-1) * real + cfg.pad_id - cfg.position_offset
  return jnp.broadcast_to(jnp.arange(ids.shape[-1], dtype=jnp.int32), ids.shape)


@dataclasses.dataclass
class Loaded:
  """A Hugging Face checkpoint in the lab: call it like the HF model."""
  config: ml_collections.ConfigDict  # full training config (preset + model section from HF)
  model: Transformer  # deterministic (eval) module
  params: Any  # unboxed params, in the layout of config.model.scan_layers
  hf_config: dict[str, Any]  # config.json as read
  architecture: str  # the HF class, e.g. 'BertForMaskedLM'
  family: str  # key of hf_mapping.FAMILIES
  tokenizer: Any = None  # interop.hf_tokenizer.HFTokenizer when the directory has one
  jit: bool = True  # compile the forward pass (False: op by op, quicker for one small call)
  _apply: Any = dataclasses.field(default=None, repr=False, compare=False)

  @property
  def model_config(self) -> ModelConfig:
    return self.model.config

  def outputs(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
              decoder_input_ids=None, decoder_attention_mask=None,
              decoder_position_ids=None) -> dict[str, Any]:
    """The lab model's output dict ('logits', 'hidden', 'pooled', 'encoded', ...)."""
    if self._apply is None:
      apply = lambda p, kw: self.model.apply({'params': p}, **kw)
      self._apply = jax.jit(apply) if self.jit else apply
    kw = hf_inputs(self.model_config, input_ids, attention_mask, token_type_ids, position_ids,
                   decoder_input_ids, decoder_attention_mask, decoder_position_ids)
    return self._apply(self.params, kw)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
               decoder_input_ids=None, decoder_attention_mask=None,
               decoder_position_ids=None) -> jax.Array:
    """Logits of the head (a body returns its last hidden states, as HF's last_hidden_state)."""
    out = self.outputs(input_ids, attention_mask, token_type_ids, position_ids,
                       decoder_input_ids, decoder_attention_mask, decoder_position_ids)
    return out['logits'] if 'logits' in out else out['hidden']


def load(path: str, *, architecture: Optional[str] = None, scan_layers: bool = True,
         zero_fill: Sequence[str] = (), tokenizer: bool = True) -> Loaded:
  """Loads a Hugging Face checkpoint directory (see the module docstring).

  Args:
    path: a directory with config.json and model.safetensors / pytorch_model.bin.
    architecture: the HF class to read it as (default: config.json's `architectures[0]`).
    scan_layers: the lab parameter layout (scanned `layers` or looped `layers_i`).
    zero_fill: HF keys that may be absent and are then zero (e.g. 'final_logits_bias', which HF
      itself zero-fills); any other absent weight is an error.
    tokenizer: also load the tokenizer files of the directory when present.
  """
  ckpt = _open_checkpoint(path, architecture)
  config = training_config(ckpt.family, ckpt.fields())
  config.model.scan_layers = scan_layers
  cfg = ModelConfig.from_dict(config.model)
  wmap = ckpt.family.weights(cfg, ckpt.arch, ckpt.prefix)
  flat = _convert(ckpt.sd, cfg, wmap, f'{path} ({ckpt.arch})', zero_fill)
  params = jax.tree.map(jnp.asarray, _layout(flat, cfg.scan_layers))
  tok = None
  if tokenizer:
    from flaxformer_lab.interop import hf_tokenizer  # pylint: disable=g-import-not-at-top
    tok = hf_tokenizer.load_hf_tokenizer(path, ckpt.hf)
  return Loaded(config, build_model(cfg), params, ckpt.hf, ckpt.arch, ckpt.family.name, tok)


# --- lab -> checkpoint ----------------------------------------------------------------------------
def _semantic(cfg: ModelConfig, drop: Sequence[str] = ()) -> dict[str, Any]:
  """The fields that decide parameters and computation, normalized (derived values resolved,
  fields of unused features removed)."""
  d = cfg.to_dict()
  d.update(final_norm=cfg.use_final_norm, num_kv_heads=cfg.kv_heads, head_dim=cfg.head_width,
           mlp_dim=cfg.hidden_dim, emb_dim=cfg.embed_dim,
           num_decoder_layers=cfg.decoder_layers if cfg.family == 'encoder_decoder' else 0,
           decoder_num_heads=cfg.decoder_stack.num_heads,
           decoder_mlp_dim=cfg.decoder_stack.hidden_dim)
  unused = list(drop) + ['attention_backend', 'scan_layers', 'remat_policy', 'dtype']
  if cfg.family != 'encoder_decoder':
    unused += ['share_encoder_decoder_embeddings', 'decoder_num_heads', 'decoder_mlp_dim']
  if cfg.position != 'relative_bias':
    unused += ['relative_num_buckets', 'relative_max_distance', 'relative_bias_shared']
  if cfg.position != 'rope':
    unused += ['rope_theta', 'rope_fraction']
  if cfg.position != 'sinusoidal':
    unused.append('sinusoidal_layout')
  if cfg.position not in ('learned', 'sinusoidal'):
    unused.append('max_len')
  if cfg.norm_type != 'layernorm':
    unused.append('norm_use_bias')
  if cfg.head not in ('classification', 'token_classification'):
    unused += ['num_labels', 'classifier_dropout']
  if cfg.head != 'classification':
    unused += ['pooling', 'classifier_hidden', 'classifier_activation']
  if cfg.head not in ('mlm', 'mlm_nsp'):
    unused += ['head_transform', 'head_activation']
  if cfg.head not in ('lm', 'seq2seq_lm'):
    unused += ['logits_scale_tied', 'logits_bias']
    if cfg.head not in ('mlm', 'mlm_nsp'):
      unused.append('tie_embeddings')
  return {k: v for k, v in d.items() if k not in unused}


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
  return [k for k in sorted(set(a) | set(b)) if a.get(k, '<unused>') != b.get(k, '<unused>')]


def _as_model_config(config: Any) -> ModelConfig:
  if isinstance(config, ModelConfig):
    return config
  if hasattr(config, 'model') and not isinstance(config, dict):
    config = config.model
  elif isinstance(config, dict) and 'model' in config:
    config = config['model']
  return ModelConfig.from_dict(config)


def to_hf(cfg: ModelConfig, params, *, family: Optional[str] = None,
          architecture: Optional[str] = None, base_hf_config: Optional[dict[str, Any]] = None
          ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json dict, state dict) of lab params; errors name what HF cannot represent."""
  fam = mapping.FAMILIES[family] if family else mapping.infer_family(cfg)
  arch = architecture or fam.arch_for(cfg)
  if arch not in fam.archs:
    raise UnsupportedError(
        f'{arch!r} is not a {fam.name} class; choose from {", ".join(fam.archs)}')
  labels = ('id2label', 'label2id', 'num_labels')  # kept from the base unless the head uses them
  hf = {k: v for k, v in (base_hf_config or {}).items() if k != 'architectures' and not (
      k in labels and cfg.head in ('classification', 'token_classification'))}
  hf.update(fam.hf_config(cfg, arch))
  # Round trip: the config HF will build must give back this lab config.
  back = dataclasses.replace(cfg, **fam.model_fields(hf, arch, cfg.tie_embeddings, cfg.pooler))
  diffs = _diff(_semantic(cfg), _semantic(back))
  if diffs:
    raise UnsupportedError(
        f'{arch} cannot represent this model: ' + '; '.join(
            f'model.{k}={getattr(cfg, k)!r} (it would load as {getattr(back, k)!r})'
            for k in diffs))
  wmap = fam.weights(cfg, arch, '' if fam.archs[arch].base or not fam.base_prefix
                     else fam.base_prefix + '.')
  flat = _looped_flat(params)
  shapes = abstract_params(cfg.replace(scan_layers=False))
  problems = [f'{k}: {list(np.shape(flat[k]))}, expected {list(s)}' for k, s in shapes.items()
              if k in flat and tuple(np.shape(flat[k])) != s]
  missing = sorted(set(shapes) - set(flat))
  extra = sorted(set(flat) - set(shapes))
  if problems or missing or extra:
    raise HFCheckpointError('params do not match the config: ' + '; '.join(
        (['mis-shaped: ' + ', '.join(problems)] if problems else []) +
        (['missing: ' + ', '.join(missing)] if missing else []) +
        (['unexpected: ' + ', '.join(extra)] if extra else [])))
  used = {r.lab for r in wmap.rules}
  dropped = sorted(set(flat) - used)
  if dropped:
    raise UnsupportedError(f'{arch} has no place for lab parameter(s) {", ".join(dropped)}')
  sd = {}
  for rule in wmap.rules:
    sd[rule.hf] = np.asarray(mapping.KINDS[rule.kind][1](flat[rule.lab]), np.float32)
  sd.update(wmap.saved_buffers)
  return hf, sd


def save(obj: Any, path: str, *, family: Optional[str] = None,
         architecture: Optional[str] = None) -> str:
  """Writes config.json + model.safetensors in the Hugging Face layout; returns `path`.

  Args:
    obj: a `Loaded`, or a `(config, params)` pair (config: training ConfigDict, its model section,
      or a ModelConfig; params: unboxed, scanned or looped).
    path: output directory (created).
    family: a key of hf_mapping.FAMILIES; default: the Loaded's, else inferred from the switches
      (an XLM-R-shaped model reads as RoBERTa unless family='xlmr').
    architecture: the HF class; default: the one for the config's head (and pooler).
  """
  base = None
  if isinstance(obj, Loaded):
    cfg, params, base = obj.model_config, obj.params, obj.hf_config
    family = family or obj.family
    spec = mapping.FAMILIES[family].archs.get(obj.architecture)
    if architecture is None and spec is not None and spec.head == cfg.head and (
        not spec.family or spec.family == cfg.family):
      architecture = obj.architecture
  else:
    config, params = obj
    cfg = _as_model_config(config)
  hf, sd = to_hf(cfg, params, family=family, architecture=architecture, base_hf_config=base)
  os.makedirs(path, exist_ok=True)
  _write_safetensors(sd, os.path.join(path, SAFE_WEIGHTS))
  with open(os.path.join(path, CONFIG_NAME), 'w') as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  if isinstance(obj, Loaded) and obj.tokenizer is not None:
    obj.tokenizer.save_hf(path)
  return path


# --- initializing a lab run from a checkpoint -----------------------------------------------------
def load_params_for_config(hf_dir: str, model_config: Any, *, architecture: Optional[str] = None
                           ) -> tuple[dict[str, Any], tuple[str, ...]]:
  """The checkpoint's weights for a lab model config, for `--config.init_from=hf:<dir>`.

  The body of `model_config` (everything but the head fields and dropout/runtime switches) must be
  the checkpoint's: a differing field is an error naming it. Every body parameter must come from
  the checkpoint (missing or mis-shaped: an error naming the weight).

  Returns:
    (params, fresh): `params` is a nested dict of numpy arrays in the config's layout (scanned or
    looped) holding every parameter of `build_model(model_config).init` except the paths listed in
    `fresh`, which the caller initializes. `fresh` lists '/'-joined leaf paths and only ever holds
    parameters under the head modules `mlm_head`, `lm_head`, `classifier`, `token_classifier`,
    `pair_head` - when the checkpoint has a different head, or the same head with other shapes
    (e.g. num_labels) - and under `pooler` when the checkpoint has none (e.g. a *ForMaskedLM
    checkpoint fine-tuned with BERT's pooler-based classifier). Checkpoint weights the config
    does not use (e.g. an MLM head when fine-tuning a classifier) are dropped and logged.
  """
  target = _as_model_config(model_config)
  ckpt = _open_checkpoint(hf_dir, architecture)
  fields = ckpt.fields()
  source = dataclasses.replace(target, **fields)
  source.validate()
  drop = list(_RUNTIME_FIELDS) + list(_HEAD_FIELDS)
  if not target.positions_from_padding and not source.positions_from_padding:
    drop.append('pad_id')  # only RoBERTa-style positions read it
  if target.position in ('learned', 'sinusoidal'):
    drop.append('max_len')  # a learned table's shape is checked below; a sinusoidal one computed
  diffs = _diff(_semantic(source, drop), _semantic(target, drop))
  if diffs:
    raise HFCheckpointError(
        f'{hf_dir} ({ckpt.arch}) does not fit the model config: ' + '; '.join(
            f'model.{k}={getattr(target, k)!r} but the checkpoint has {getattr(source, k)!r}'
            for k in diffs) + '. Set these in the config (configs/<family>.py presets may differ '
        'from the checkpoint) or build it with huggingface.config_from_hf(dir, head=...).')
  if target.head == source.head:
    head_diffs = _diff(_semantic(source, _RUNTIME_FIELDS + ('num_labels',)),
                       _semantic(target, _RUNTIME_FIELDS + ('num_labels',)))
    head_diffs = [k for k in head_diffs if k in _HEAD_FIELDS]
    if head_diffs:
      raise HFCheckpointError(
          f'{hf_dir} ({ckpt.arch}) has the same head but other head settings: ' + '; '.join(
              f'model.{k}={getattr(target, k)!r} vs {getattr(source, k)!r}' for k in head_diffs))
  wmap = ckpt.family.weights(source, ckpt.arch, ckpt.prefix)
  loaded = _convert(ckpt.sd, source, wmap, f'{hf_dir} ({ckpt.arch})')
  shapes = abstract_params(target.replace(scan_layers=False))
  out, fresh, errors = {}, [], []
  for key, shape in shapes.items():
    top = key.split('/')[0]
    freshable = top in HEAD_MODULES and (top != 'pooler' or not source.pooler)
    if key in loaded and tuple(loaded[key].shape) == shape:
      out[key] = loaded[key]
    elif freshable:
      fresh.append(key)
    elif key in loaded:
      errors.append(f'{key}: {list(loaded[key].shape)} in the checkpoint, {list(shape)} expected')
    else:
      errors.append(f'{key}: not in the checkpoint')
  if errors:
    raise HFCheckpointError(f'{hf_dir} ({ckpt.arch}) lacks body weights of the model config:\n  '
                            + '\n  '.join(errors))
  unused = sorted(set(loaded) - set(out))
  if unused:
    logging.info('init_from hf:%s: checkpoint weights not used by this config: %s', hf_dir,
                 ', '.join(unused))
  return _layout(out, target.scan_layers), tuple(fresh)
