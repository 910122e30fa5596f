"""Tokenizers: bytes, characters, SentencePiece, WordPiece, byte-level BPE; one interface.

The lab's own tokenizers (byte, char, sentencepiece) reserve the same seven ids at the bottom of
their vocabulary:

  pad 0, bos 1, eos 2, unk 3, cls 4 ([CLS]), sep 5 ([SEP]), mask 6 ([MASK])

and ordinary tokens start at `num_special` = 7. `encode` never emits special ids except `unk`
(never produced by the byte tokenizer, nor by SentencePiece, which falls back to bytes);
`decode` drops every special id except `unk`, which it renders as U+FFFD.

WordPiece (BERT, DistilBERT: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4; uncased, BERT's
normalizer and pre-tokenizer) and byte-level BPE (RoBERTa, GPT-2: <s> 0, <pad> 1, </s> 2, <unk> 3,
<mask> 4; <s>/</s> serve as [CLS]/[SEP], any text round-trips) are trained with the Hugging Face
`tokenizers` library (`train_hf_tokenizer`) and wrapped as `interop.hf_tokenizer.HFTokenizer`, whose
special ids are wherever the vocabulary puts them (`special_ids` lists them all).

A tokenizer saves itself to a directory (`tokenizer.json` plus its vocabulary or model file) and
`load_tokenizer(dir)` restores it, so a run's workdir can hold the tokenizer it was trained with.
"""

from __future__ import annotations

import abc
import json
import os
import tempfile
from typing import Any, Callable, Iterable, Sequence

import sentencepiece as spm

PAD_ID, BOS_ID, EOS_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(7)
NUM_SPECIAL = 7
SPECIAL_PIECES = ('<pad>', '<s>', '</s>', '<unk>', '[CLS]', '[SEP]', '[MASK]')
TOKENIZER_JSON = 'tokenizer.json'
_REPLACEMENT = '\ufffd'


class Tokenizer(abc.ABC):
  """Text <-> token ids, with the fixed special-id layout of this module."""

  kind: str = ''
  pad_id = PAD_ID
  bos_id = BOS_ID
  eos_id = EOS_ID
  unk_id = UNK_ID
  cls_id = CLS_ID
  sep_id = SEP_ID
  mask_id = MASK_ID
  num_special = NUM_SPECIAL  # ids below this are special; ordinary tokens are [num_special, vocab)

  @property
  def special_ids(self) -> tuple[int, ...]:
    """Ids that never stand for text (masking and random replacement avoid them)."""
    return (self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.cls_id, self.sep_id,
            self.mask_id)

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids (specials included); the model's vocab_size must be at least this."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no BOS/EOS added)."""

  @abc.abstractmethod
  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; special ids other than unk are dropped."""

  @abc.abstractmethod
  def _save_files(self, directory: str) -> dict[str, Any]:
    """Writes the vocabulary/model file(s); returns the extra fields of tokenizer.json."""

  def save(self, directory: str) -> str:
    """Writes `tokenizer.json` (+ vocab/model file) into `directory`; returns the json path."""
    os.makedirs(directory, exist_ok=True)
    meta = {'kind': self.kind, 'vocab_size': self.vocab_size,
            'special_ids': dict(zip(SPECIAL_PIECES, range(NUM_SPECIAL)))}
    meta.update(self._save_files(directory))
    path = os.path.join(directory, TOKENIZER_JSON)
    _atomic_write(path, json.dumps(meta, indent=2, ensure_ascii=False).encode('utf-8'))
    return path

  def _ordinary(self, ids: Iterable[int]) -> list[int]:
    """`ids` without the specials decode drops (unk stays)."""
    return [int(i) for i in ids if int(i) >= NUM_SPECIAL or int(i) == UNK_ID]

  def __repr__(self) -> str:
    return f'{type(self).__name__}(vocab_size={self.vocab_size})'


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes: id = byte + 7; vocab_size 263. Any text round-trips."""

  kind = 'byte'

  @property
  def vocab_size(self) -> int:
    return NUM_SPECIAL + 256

  def encode(self, text: str) -> list[int]:
    return [b + NUM_SPECIAL for b in text.encode('utf-8')]

  def decode(self, ids: Iterable[int]) -> str:
    out = bytearray()
    for i in self._ordinary(ids):
      if i == UNK_ID:
        out += _REPLACEMENT.encode('utf-8')
      elif i < self.vocab_size:
        out.append(i - NUM_SPECIAL)
    return out.decode('utf-8', errors='replace')

  def _save_files(self, directory: str) -> dict[str, Any]:
    return {}


class CharTokenizer(Tokenizer):
  """Unicode characters of a vocabulary built from training text; others map to unk."""

  kind = 'char'

  def __init__(self, chars: Sequence[str]):
    if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
      raise ValueError('CharTokenizer needs distinct single characters')
    self.chars = list(chars)
    self._index = {c: i + NUM_SPECIAL for i, c in enumerate(self.chars)}

  @classmethod
  def train(cls, texts: Iterable[str]) -> 'CharTokenizer':
    """The sorted set of characters occurring in `texts`."""
    seen = set()
    for t in texts:
      seen.update(t)
    return cls(sorted(seen))

  @property
  def vocab_size(self) -> int:
    return NUM_SPECIAL + len(self.chars)

  def encode(self, text: str) -> list[int]:
    return [self._index.get(c, UNK_ID) for c in text]

  def decode(self, ids: Iterable[int]) -> str:
    return ''.join(_REPLACEMENT if i == UNK_ID else self.chars[i - NUM_SPECIAL]
                   for i in self._ordinary(ids) if i < self.vocab_size)

  def _save_files(self, directory: str) -> dict[str, Any]:
    _atomic_write(os.path.join(directory, 'char_vocab.json'),
                  json.dumps(self.chars, ensure_ascii=False).encode('utf-8'))
    return {'file': 'char_vocab.json'}

  @classmethod
  def load(cls, path: str) -> 'CharTokenizer':
    with open(path, encoding='utf-8') as f:
      return cls(json.load(f))


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece unigram/BPE model trained with the lab's special ids.

  Trained with identity normalisation, no whitespace collapsing, byte fallback and '\\n' as a
  user-defined piece, so that `decode(encode(text)) == text` for any text.
  """

  kind = 'sentencepiece'

  def __init__(self, model_proto: bytes):
    self.model_proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
    for i, piece in enumerate(SPECIAL_PIECES):
      if self._sp.id_to_piece(i) != piece:
        raise ValueError(f'SentencePiece model has {self._sp.id_to_piece(i)!r} at id {i}, '
                         f'expected {piece!r}: it was not trained by this module')

  @classmethod
  def train(cls, texts: Iterable[str], *, vocab_size: int, model_type: str = 'unigram',
            input_sentence_size: int = 0, num_threads: int = 2) -> 'SentencePieceTokenizer':
    """Trains in-process on `texts` (each split into lines); `input_sentence_size` 0 = all."""
    if model_type not in ('unigram', 'bpe'):
      raise ValueError(f"sp_model_type must be 'unigram' or 'bpe', got {model_type!r}")
    min_size = NUM_SPECIAL + 1 + 256 + 1  # specials, '\n', the 256 byte pieces, one more
    if vocab_size < min_size:
      raise ValueError(f'sp_vocab_size={vocab_size} is too small: byte fallback needs at '
                       f'least {min_size} (a few hundred more for useful pieces)')
    lines = (line for t in texts for line in t.split('\n') if line.strip())
    model = _BytesSink()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        control_symbols=list(SPECIAL_PIECES[CLS_ID:]), user_defined_symbols=['\n'],
        normalization_rule_name='identity', remove_extra_whitespaces=False,
        byte_fallback=True, character_coverage=0.9995, hard_vocab_limit=False,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
        num_threads=num_threads, minloglevel=2)
    return cls(model.getvalue())

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    out, run = [], []
    for i in self._ordinary(ids):
      if i == UNK_ID:
        out.append(self._sp.decode(run) + _REPLACEMENT)
        run = []
      elif i < self.vocab_size:
        run.append(i)
    return ''.join(out) + self._sp.decode(run)

  def _save_files(self, directory: str) -> dict[str, Any]:
    _atomic_write(os.path.join(directory, 'spm.model'), self.model_proto)
    return {'file': 'spm.model'}

  @classmethod
  def load(cls, path: str) -> 'SentencePieceTokenizer':
    with open(path, 'rb') as f:
      return cls(f.read())

  def __getstate__(self):
    return {'model_proto': self.model_proto}

  def __setstate__(self, state):
    self.__init__(state['model_proto'])


class _BytesSink:
  """A write-only file-like object for SentencePieceTrainer's `model_writer`."""

  def __init__(self):
    self._chunks = []

  def write(self, data: bytes) -> None:
    self._chunks.append(bytes(data))

  def getvalue(self) -> bytes:
    return b''.join(self._chunks)


def _atomic_write(path: str, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file and a rename (readers never see half)."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or '.', prefix='.tmp-')
  with os.fdopen(fd, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


# Trained Hugging Face tokenizers: kind -> the special tokens, by the lab's names.
HF_KINDS = {
    'wordpiece': {'pad': '[PAD]', 'unk': '[UNK]', 'cls': '[CLS]', 'sep': '[SEP]',
                  'mask': '[MASK]'},
    'bpe': {'bos': '<s>', 'pad': '<pad>', 'eos': '</s>', 'unk': '<unk>', 'mask': '<mask>',
            'cls': '<s>', 'sep': '</s>'},
}
TRAINED_KINDS = ('char', 'sentencepiece', *HF_KINDS)


def train_hf_tokenizer(texts: Iterable[str], *, kind: str, vocab_size: int) -> Tokenizer:
  """A WordPiece (`kind='wordpiece'`, BERT uncased) or byte-level BPE (`'bpe'`, RoBERTa / GPT-2)
  tokenizer trained on `texts` with the `tokenizers` library; specials first in the vocabulary.

  Returned as an `HFTokenizer` (interop/hf_tokenizer.py) over the files a Hugging Face checkpoint
  ships (`tokenizer.json`, `special_tokens_map.json`), so `save_hf` gives a usable HF tokenizer.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers  # pylint: disable=g-import-not-at-top,g-multiple-import
  from flaxformer_lab.interop.hf_tokenizer import HFTokenizer  # pylint: disable=g-import-not-at-top
  if kind not in HF_KINDS:
    raise ValueError(f"unknown Hugging Face tokenizer kind {kind!r}; use {' or '.join(HF_KINDS)}")
  names = HF_KINDS[kind]
  specials = list(dict.fromkeys(names.values()))  # in id order, <s>/</s> once
  if vocab_size < len(specials) + 256 + 1:
    raise ValueError(f'tokenizer_vocab_size={vocab_size} is too small for a {kind} tokenizer '
                     f'(at least {len(specials) + 257}; a few thousand for useful pieces)')
  ids = {t: i for i, t in enumerate(specials)}
  if kind == 'wordpiece':
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token='[UNK]', max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)  # uncased, accents stripped
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix='##')
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                        continuing_subword_prefix='##', show_progress=False)
    tok.post_processor = processors.TemplateProcessing(
        single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
        special_tokens=[('[CLS]', ids['[CLS]']), ('[SEP]', ids['[SEP]'])])
  else:
    tok = tokenizers.Tokenizer(models.BPE())  # bytes: nothing is unknown
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.post_processor = processors.RobertaProcessing(('</s>', ids['</s>']), ('<s>', ids['<s>']))
  tok.train_from_iterator(texts, trainer=trainer)
  special_map = {f'{n}_token': t for n, t in names.items()}
  files = {'tokenizer.json': tok.to_str().encode('utf-8'),
           'special_tokens_map.json': json.dumps(special_map, indent=2).encode('utf-8')}
  return HFTokenizer(files)


def trained_vocab_size(data_config: Any) -> int:
  """The vocabulary size a trained subword tokenizer is asked for: data.tokenizer_vocab_size, or
  data.sp_vocab_size (the older key, read by configs without the new one) when that is 0."""
  return int(data_config.get('tokenizer_vocab_size', 0) or data_config.sp_vocab_size)


def load_tokenizer(directory: str) -> Tokenizer:
  """The tokenizer saved in `directory` by `Tokenizer.save`."""
  path = os.path.join(directory, TOKENIZER_JSON)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no tokenizer saved in {directory} (expected {path})')
  with open(path, encoding='utf-8') as f:
    meta = json.load(f)
  kind = meta['kind']
  if kind == 'byte':
    tok = ByteTokenizer()
  elif kind == 'char':
    tok = CharTokenizer.load(os.path.join(directory, meta['file']))
  elif kind == 'sentencepiece':
    tok = SentencePieceTokenizer.load(os.path.join(directory, meta['file']))
  elif kind == 'huggingface':  # a converted checkpoint's own tokenizer (interop/hf_tokenizer.py)
    from flaxformer_lab.interop.hf_tokenizer import HFTokenizer  # pylint: disable=g-import-not-at-top
    tok = HFTokenizer.load_saved(directory)
  else:
    raise ValueError(f'{path}: unknown tokenizer kind {kind!r}')
  if tok.vocab_size != meta['vocab_size']:
    raise ValueError(f'{path}: vocab_size {meta["vocab_size"]} but the files give {tok.vocab_size}')
  return tok


def cache_name(data_config: Any, text_fields: Sequence[str]) -> str:
  """File stem of a trained tokenizer: its kind, settings and the fields it was trained on."""
  fields = '-'.join(text_fields)
  limit = data_config.get('max_examples', 0)
  subset = f'_first{limit}' if limit > 0 else ''
  if data_config.tokenizer == 'char':
    return f'char_{fields}{subset}'
  if data_config.tokenizer in HF_KINDS:
    return f'{data_config.tokenizer}_{trained_vocab_size(data_config)}_{fields}{subset}'
  return f'spm_{data_config.sp_model_type}_{trained_vocab_size(data_config)}_{fields}{subset}'


def get_tokenizer(data_config: Any, *, cache_dir: str | None = None,
                  train_texts: Callable[[], Iterable[str]] | None = None,
                  text_fields: Sequence[str] = ('text',)) -> Tokenizer:
  """The tokenizer `data_config.tokenizer` names (byte | char | sentencepiece | wordpiece | bpe).

  Char, SentencePiece, WordPiece and byte-level BPE tokenizers are trained on `train_texts()` (the training split's text,
  both sides for translation) the first time and cached in `cache_dir/<cache_name>/`; later
  calls load the cached files and do not retrain. With `cache_dir` None nothing is cached.
  """
  kind = data_config.tokenizer
  if kind == 'byte':
    return ByteTokenizer()
  if kind not in TRAINED_KINDS:
    raise ValueError(f"unknown tokenizer {kind!r}; use 'byte', 'char', 'sentencepiece', "
                     "'wordpiece' or 'bpe'")
  directory = os.path.join(cache_dir, cache_name(data_config, text_fields)) if cache_dir else None
  if directory and os.path.isfile(os.path.join(directory, TOKENIZER_JSON)):
    return load_tokenizer(directory)
  if train_texts is None:
    raise ValueError(f'the {kind} tokenizer must be trained but no training text was given')
  if kind == 'char':
    tok = CharTokenizer.train(train_texts())
  elif kind in HF_KINDS:
    tok = train_hf_tokenizer(train_texts(), kind=kind, vocab_size=trained_vocab_size(data_config))
  else:
    tok = SentencePieceTokenizer.train(
        train_texts(), vocab_size=trained_vocab_size(data_config),
        model_type=data_config.sp_model_type,
        input_sentence_size=data_config.get('sp_input_sentence_size', 0))
  if directory:
    tok.save(directory)
  return tok
