"""Random-access example sources: prepared TFDS data sets and in-memory synthetic ones.

`open_source(data_config)` returns a `Source`: which fields hold text, its splits as sequences of
example dicts (text fields as `str`, labels as `int`), and where trained tokenizers are cached.
Kinds of data set:
  stream   one long text per split (tiny_shakespeare, synthetic_lm), cut into LM windows
  text     one document per example (austen paragraphs)
  parallel source/target text pairs (multi30k, synthetic_copy, synthetic_reverse)
  labelled text + class label (sst2, ag_news)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from flaxformer_lab.data import builders

SYNTHETIC = ('synthetic_copy', 'synthetic_reverse', 'synthetic_lm')
_SYNTHETIC_SEED = 20240917  # fixed: the synthetic data do not change with the shuffle seed
_ALPHABET = np.array(list('abcdefghijklmnopqrstuvwxyz'))


@dataclasses.dataclass(frozen=True)
class Spec:
  """What a data set holds: its kind, text fields and label."""

  kind: str  # stream | text | parallel | labelled
  text_field: str  # the field of text (stream/text/labelled) or of the *target* (parallel)
  source_field: str = ''  # parallel: the field of the source text
  label_field: str = ''  # labelled: the integer label field
  num_classes: int = 0  # labelled: number of classes


class _DecodedSplit(Sequence):
  """A split of a TFDS data source with bytes fields decoded to str, optionally truncated."""

  def __init__(self, data_source: Sequence[dict], limit: int):
    self._source = data_source
    self._len = len(data_source) if limit <= 0 else min(limit, len(data_source))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(self._len))]
    if not -self._len <= index < self._len:
      raise IndexError(index)
    return _decode(self._source[index % self._len])

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    """Bulk read (several times faster than one by one)."""
    return [_decode(e) for e in self._source.__getitems__([i % self._len for i in indices])]

  def __iter__(self) -> Iterator[dict]:
    for start in range(0, self._len, 1024):
      yield from self.__getitems__(range(start, min(start + 1024, self._len)))


def _decode(example: dict) -> dict:
  return {k: v.decode('utf-8') if isinstance(v, bytes) else v for k, v in example.items()}


class SyntheticPairs(Sequence):
  """Random lowercase strings; target = source ('copy') or source reversed ('reverse').

  Example i of a split is drawn from a generator seeded by (seed, split, i): deterministic,
  independent of access order, and nothing is stored.
  """

  def __init__(self, size: int, *, reverse: bool, seed: int, split_id: int, min_len: int,
               max_len: int):
    self._size, self._reverse, self._seed, self._split_id = size, reverse, seed, split_id
    self._min_len, self._max_len = min_len, max_len

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(self._size))]
    if not -self._size <= index < self._size:
      raise IndexError(index)
    text = random_string(np.random.default_rng([self._seed, self._split_id, index % self._size]),
                         self._min_len, self._max_len)
    return {'source': text, 'target': text[::-1] if self._reverse else text}


def random_string(rng: np.random.Generator, min_len: int, max_len: int) -> str:
  """A string of random lowercase letters with a length uniform in [min_len, max_len]."""
  n = int(rng.integers(min_len, max_len + 1))
  return ''.join(rng.choice(_ALPHABET, size=n))


def synthetic_lm_text(num_lines: int, *, seed: int, split_id: int, min_len: int,
                      max_len: int) -> str:
  """A stream of lines 'w=w' (a random word, '=', the same word): the second half is learnable."""
  rng = np.random.default_rng([seed, split_id])
  return ''.join(f'{w}={w}\n' for w in (random_string(rng, min_len, max_len)
                                         for _ in range(num_lines)))


@dataclasses.dataclass
class Source:
  """A data set opened for reading."""

  name: str
  spec: Spec
  splits: dict[str, Sequence[dict]]  # split name -> random-access examples (text fields as str)
  tokenizer_cache_dir: str | None  # where trained char/SentencePiece vocabularies are cached

  def split(self, name: str) -> Sequence[dict]:
    if name not in self.splits:
      raise ValueError(f'data set {self.name!r} has no split {name!r}; its splits are '
                       f'{", ".join(self.splits)} (set config.data.eval_split to one of them)')
    return self.splits[name]

  def texts(self, split: str, fields: Sequence[str]) -> Callable[[], Iterator[str]]:
    """A factory of the texts of `fields` over a split (for tokenizer training)."""
    def gen():
      for example in self.split(split):
        for f in fields:
          yield example[f]
    return gen


def _builder_spec(data_config: Any) -> Spec:
  """The Spec of a TFDS-backed data set."""
  name = data_config.name
  if name == 'tiny_shakespeare':
    return Spec('stream', 'text')
  if name == 'austen':
    return Spec('text', 'text')
  if name == 'sst2':
    return Spec('labelled', 'sentence', label_field='label', num_classes=2)
  if name == 'ag_news':
    return Spec('labelled', 'text', label_field='label', num_classes=4)
  if name == 'multi30k':
    for lang in (data_config.source_lang, data_config.target_lang):
      if lang not in builders.MULTI30K_LANGS:
        raise ValueError(f'multi30k has languages {builders.MULTI30K_LANGS}, not {lang!r}')
    if data_config.source_lang == data_config.target_lang:
      raise ValueError('config.data.source_lang and target_lang are the same')
    return Spec('parallel', data_config.target_lang, source_field=data_config.source_lang)
  known = ', '.join(list(builders.BUILDERS) + list(SYNTHETIC))
  raise ValueError(f'unknown data set {name!r}; known: {known}')


def open_source(data_config: Any) -> Source:
  """Opens `data_config.name`, preparing it first when it is a TFDS data set not yet built."""
  name = data_config.name
  limit = data_config.get('max_examples', 0)
  if name in SYNTHETIC:
    return _open_synthetic(data_config)
  spec = _builder_spec(data_config)
  builder = builders.prepare(name, data_dir=data_config.data_dir,
                             manual_dir=data_config.manual_dir)
  splits = {s: _DecodedSplit(builder.as_data_source(s), limit) for s in builder.info.splits}
  return Source(name, spec, splits, os.path.join(os.fspath(builder.data_dir), 'tokenizers'))


def _open_synthetic(data_config: Any) -> Source:
  """The in-memory synthetic data sets (no files)."""
  sizes = {'train': data_config.synthetic_train_size,
           'validation': data_config.synthetic_eval_size,
           'test': data_config.synthetic_eval_size}
  limit = data_config.get('max_examples', 0)
  if limit > 0:
    sizes = {k: min(v, limit) for k, v in sizes.items()}
  lens = dict(min_len=data_config.synthetic_min_len, max_len=data_config.synthetic_max_len)
  seed = _SYNTHETIC_SEED
  if data_config.name == 'synthetic_lm':
    splits = {s: [{'text': synthetic_lm_text(n, seed=seed, split_id=i, **lens)}]
              for i, (s, n) in enumerate(sizes.items())}
    return Source(data_config.name, Spec('stream', 'text'), splits, None)
  reverse = data_config.name == 'synthetic_reverse'
  splits = {s: SyntheticPairs(n, reverse=reverse, seed=seed, split_id=i, **lens)
            for i, (s, n) in enumerate(sizes.items())}
  return Source(data_config.name, Spec('parallel', 'target', source_field='source'), splits, None)
