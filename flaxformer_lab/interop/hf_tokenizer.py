"""Tokenizers shipped with Hugging Face checkpoints, behind the lab's `Tokenizer` interface.

Read from a checkpoint directory: `tokenizer.json` (the `tokenizers` package; every fast tokenizer),
else a SentencePiece model whose ids are the model's (T5/ALBERT `spiece.model`, Marian `source.spm`
with its `vocab.json`). The special ids come from special_tokens_map.json / tokenizer_config.json,
then config.json; where a family lacks one the lab's pipeline needs, the closest stands in
(cls <- bos, sep <- eos, bos <- cls or decoder_start_token_id, eos <- sep, pad <- eos).

Unlike the lab's own tokenizers, special ids are wherever the vocabulary puts them (`special_ids`
lists them all, so masking and random replacement avoid them). `save(dir)` writes the original files
(prefixed `hf_`) and a `tokenizer.json` of kind 'huggingface' that `load_saved(dir)` reads back;
`save_hf(dir)` writes the original file names for a Hugging Face checkpoint directory.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional

from absl import logging

from flaxformer_lab.data import tokenizers as tok_lib

NAMES = ('pad', 'bos', 'eos', 'unk', 'cls', 'sep', 'mask')
_META_FILES = ('tokenizer_config.json', 'special_tokens_map.json')
_SPM_FILES = ('spiece.model', 'source.spm')  # ids = model ids (with vocab.json for Marian)
_PREFIX = 'hf_'


def _content(value: Any) -> Optional[str]:
  if isinstance(value, dict):
    return value.get('content')
  return value if isinstance(value, str) else None


class HFTokenizer(tok_lib.Tokenizer):
  """A Hugging Face tokenizer (tokenizers or SentencePiece backend) as a lab Tokenizer."""

  kind = 'huggingface'
  num_special = 0  # specials are not at the bottom of the vocabulary: use `special_ids`

  def __init__(self, files: dict[str, bytes], config_ids: Optional[dict[str, Any]] = None):
    """`files`: original file name -> contents; `config_ids`: config.json's *_token_id values."""
    self.files = dict(files)
    self._vocab = None
    if 'tokenizer.json' in files:
      import tokenizers  # pylint: disable=g-import-not-at-top
      self._tok = tokenizers.Tokenizer.from_str(files['tokenizer.json'].decode('utf-8'))
      self._sp = None
      added = json.loads(files['tokenizer.json']).get('added_tokens', [])
      special = {int(t['id']) for t in added if t.get('special')}
    else:
      import sentencepiece as spm  # pylint: disable=g-import-not-at-top
      name = next(n for n in _SPM_FILES if n in files)
      self._tok = None
      self._sp = spm.SentencePieceProcessor(model_proto=files[name])
      special = {i for i in range(self._sp.get_piece_size())
                 if self._sp.is_control(i) or self._sp.is_unknown(i)}
      if 'vocab.json' in files:  # Marian: pieces -> model ids through vocab.json
        self._vocab = json.loads(files['vocab.json'])
        self._inverse = {int(i): p for p, i in self._vocab.items()}
        special = {self._vocab[self._sp.id_to_piece(i)] for i in special
                   if self._sp.id_to_piece(i) in self._vocab}
    tokens: dict[str, Optional[str]] = {}
    for meta in _META_FILES:
      if meta in files:
        d = json.loads(files[meta])
        for n in NAMES:
          tokens[n] = _content(d.get(f'{n}_token')) or tokens.get(n)
        for i, t in (d.get('added_tokens_decoder') or {}).items():
          if isinstance(t, dict) and t.get('special'):
            special.add(int(i))
    ids: dict[str, Optional[int]] = {n: self._token_id(tokens.get(n)) for n in NAMES}
    config_ids = config_ids or {}
    for n in NAMES:
      if ids[n] is None and config_ids.get(f'{n}_token_id') is not None:
        ids[n] = int(config_ids[f'{n}_token_id'])
    if self._sp is not None and self._vocab is None:  # the model's own ids for the rest
      for n in ('pad', 'bos', 'eos', 'unk'):
        i = getattr(self._sp, f'{n}_id')()
        if ids[n] is None and i >= 0:
          ids[n] = i
    fallbacks = {'cls': ('bos',), 'sep': ('eos',), 'bos': ('cls',), 'eos': ('sep',),
                 'pad': ('eos',)}
    for n, alts in fallbacks.items():
      for a in alts:
        if ids[n] is None and ids[a] is not None:
          ids[n] = ids[a]
    if ids['bos'] is None and config_ids.get('decoder_start_token_id') is not None:
      ids['bos'] = int(config_ids['decoder_start_token_id'])  # T5, Marian: decoder start = pad
    for n in NAMES:
      setattr(self, f'{n}_id', ids[n])
    self._special = tuple(sorted(special | {i for i in ids.values() if i is not None}))

  def _token_id(self, token: Optional[str]) -> Optional[int]:
    if token is None:
      return None
    if self._tok is not None:
      return self._tok.token_to_id(token)
    if self._vocab is not None:
      return self._vocab.get(token)
    i = self._sp.piece_to_id(token)
    return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

  @property
  def special_ids(self) -> tuple[int, ...]:
    return self._special

  @property
  def vocab_size(self) -> int:
    if self._tok is not None:
      return self._tok.get_vocab_size(with_added_tokens=True)
    if self._vocab is not None:
      return max(self._vocab.values()) + 1
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without the special tokens HF's tokenizer call would add."""
    if self._tok is not None:
      return self._tok.encode(text, add_special_tokens=False).ids
    if self._vocab is not None:
      unk = self.unk_id if self.unk_id is not None else 0
      return [self._vocab.get(p, unk) for p in self._sp.encode(text, out_type=str)]
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    special = set(self._special) - ({self.unk_id} if self.unk_id is not None else set())
    ids = [int(i) for i in ids if int(i) not in special]
    if self._tok is not None:
      return self._tok.decode(ids, skip_special_tokens=False)
    if self._vocab is not None:
      return self._sp.decode_pieces([self._inverse[i] for i in ids if i in self._inverse])
    return self._sp.decode(ids)

  # --- files ---------------------------------------------------------------------------------
  def _save_files(self, directory: str) -> dict[str, Any]:
    names = []
    for name, data in self.files.items():
      with open(os.path.join(directory, _PREFIX + name), 'wb') as f:
        f.write(data)
      names.append(name)
    return {'files': sorted(names),
            'special_ids': {n: getattr(self, f'{n}_id') for n in NAMES}}

  def save(self, directory: str) -> str:
    """Writes the original files as hf_<name> and a lab tokenizer.json of kind 'huggingface'."""
    os.makedirs(directory, exist_ok=True)
    meta = {'kind': self.kind, 'vocab_size': self.vocab_size}
    meta.update(self._save_files(directory))
    path = os.path.join(directory, tok_lib.TOKENIZER_JSON)
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(meta, f, indent=2)
    return path

  def save_hf(self, directory: str) -> None:
    """Writes the original files under their own names (a Hugging Face checkpoint directory)."""
    os.makedirs(directory, exist_ok=True)
    for name, data in self.files.items():
      with open(os.path.join(directory, name), 'wb') as f:
        f.write(data)

  @classmethod
  def load_saved(cls, directory: str) -> 'HFTokenizer':
    """The tokenizer `save(directory)` wrote."""
    with open(os.path.join(directory, tok_lib.TOKENIZER_JSON), encoding='utf-8') as f:
      meta = json.load(f)
    if meta.get('kind') != cls.kind:
      raise ValueError(f'{directory}: tokenizer kind {meta.get("kind")!r}, not {cls.kind!r}')
    files = {}
    for name in meta['files']:
      with open(os.path.join(directory, _PREFIX + name), 'rb') as f:
        files[name] = f.read()
    tok = cls(files)
    for n, i in meta['special_ids'].items():
      setattr(tok, f'{n}_id', i)
    tok._special = tuple(sorted(set(tok._special) | {i for i in meta['special_ids'].values()
                                                     if i is not None}))
    return tok


def load_hf_tokenizer(path: str, hf_config: Optional[dict[str, Any]] = None
                      ) -> Optional[HFTokenizer]:
  """The tokenizer of a checkpoint directory, or None when it has no supported tokenizer files."""
  names = os.listdir(path)
  wanted = [n for n in _META_FILES if n in names]
  if 'tokenizer.json' in names:
    wanted.append('tokenizer.json')
  else:
    spm_file = next((n for n in _SPM_FILES if n in names), None)
    if spm_file is None:
      if any(n.endswith(('.model', '.spm')) for n in names):
        logging.warning('%s: SentencePiece files without tokenizer.json are only read for '
                        'T5/ALBERT (spiece.model) and Marian (source.spm); none loaded', path)
      return None
    wanted.append(spm_file)
    if 'vocab.json' in names:
      wanted.append('vocab.json')
  files = {}
  for n in wanted:
    with open(os.path.join(path, n), 'rb') as f:
      files[n] = f.read()
  return HFTokenizer(files, hf_config)
