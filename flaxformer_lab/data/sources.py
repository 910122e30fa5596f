"""Random-access example sources: prepared TFDS data sets and in-memory synthetic ones.

`open_source(data_config)` returns a `Source`: which fields hold text, its splits as sequences of
example dicts (text fields as `str`, labels as `int`), and where trained tokenizers are cached.
Kinds of data set:
  stream   one long text per split (tiny_shakespeare, synthetic_lm), cut into LM windows
  text     one document per example (austen paragraphs)
  parallel source/target text pairs (multi30k, bible_en_es, synthetic_copy, synthetic_reverse)
  labelled text + class label (sst2, ag_news)
The `multilingual` data set is of kind text: the monolingual columns `data.corpora` names
('multi30k.en,bible_en_es.es,...') read as {'text', 'lang'} examples, with training examples drawn
by language with XLM's exponentiated sampling (`sampling_probabilities`, alpha =
data.language_alpha); its evaluation splits are the columns one after another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from flaxformer_lab.data import builders

SYNTHETIC = ('synthetic_copy', 'synthetic_reverse', 'synthetic_lm')
MULTILINGUAL = 'multilingual'
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
    """A factory of the texts of `fields` over a split (for tokenizer training); an endless
    sampled split gives one epoch's worth of draws (`epoch_size`)."""
    def gen():
      examples = self.split(split)
      if hasattr(examples, 'epoch_size'):  # endless: one epoch's worth of draws, by index
        sampled = examples
        examples = (sampled[i] for i in range(sampled.epoch_size))
      for example in examples:  # a prepared split reads in bulk
        for f in fields:
          yield example[f]
    return gen


def _builder_spec(data_config: Any) -> Spec:
  """The Spec of a TFDS-backed data set (ValueError naming the setting when it cannot be read)."""
  name = data_config.name
  if name == MULTILINGUAL:
    multilingual_columns(data_config)  # checks data.corpora
    alpha = float(data_config.get('language_alpha', 0.3))
    if not 0.0 < alpha <= 1.0:
      raise ValueError(f'config.data.language_alpha={alpha} must be in (0, 1] (1 = sample by size)')
    return Spec('text', 'text')
  if name == 'tiny_shakespeare':
    return Spec('stream', 'text')
  if name == 'austen':
    return Spec('text', 'text')
  if name == 'sst2':
    return Spec('labelled', 'sentence', label_field='label', num_classes=2)
  if name == 'ag_news':
    return Spec('labelled', 'text', label_field='label', num_classes=4)
  if name in builders.PARALLEL_LANGS:
    langs = builders.PARALLEL_LANGS[name]
    for lang in (data_config.source_lang, data_config.target_lang):
      if lang not in langs:
        raise ValueError(f'{name} has languages {langs}, not {lang!r} (config.data.source_lang / '
                         'target_lang)')
    if data_config.source_lang == data_config.target_lang:
      raise ValueError('config.data.source_lang and target_lang are the same')
    return Spec('parallel', data_config.target_lang, source_field=data_config.source_lang)
  known = ', '.join(list(builders.BUILDERS) + list(SYNTHETIC) + [MULTILINGUAL])
  raise ValueError(f'unknown data set {name!r}; known: {known}')


def open_source(data_config: Any) -> Source:
  """Opens `data_config.name`, preparing it first when it is a TFDS data set not yet built."""
  name = data_config.name
  limit = data_config.get('max_examples', 0)
  if name in SYNTHETIC:
    return _open_synthetic(data_config)
  if name == MULTILINGUAL:
    return _open_multilingual(data_config)
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


# --- multilingual text -----------------------------------------------------------------------------


def sampling_probabilities(counts: Sequence[int], alpha: float) -> np.ndarray:
  """XLM's language sampling (Lample & Conneau 2019, eq. 1; XLM-R uses alpha = 0.3):
  q_i = p_i^alpha / sum_j p_j^alpha with p_i = n_i / sum_k n_k (n_i: examples of language i)."""
  n = np.asarray(counts, np.float64)
  if n.ndim != 1 or not len(n) or (n <= 0).any():
    raise ValueError(f'sampling needs a positive example count per language, got {list(counts)}')
  if not 0.0 < alpha <= 1.0:
    raise ValueError(f'config.data.language_alpha={alpha} must be in (0, 1]')
  q = (n / n.sum()) ** alpha
  return q / q.sum()


class _Column(Sequence):
  """One language column of a parallel split as {'text', 'lang'} examples."""

  def __init__(self, examples: Sequence[dict], field: str, lang: str):
    self._examples, self._field, self.lang = examples, field, lang

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, index):
    return {'text': self._examples[index][self._field], 'lang': self.lang}


class Concatenation(Sequence):
  """Sequences one after another (random access)."""

  def __init__(self, parts: Sequence[Sequence[dict]]):
    self.parts = list(parts)
    self._ends = np.cumsum([len(p) for p in self.parts])

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, index):
    if not 0 <= index < len(self):
      raise IndexError(index)
    part = int(np.searchsorted(self._ends, index, side='right'))
    return self.parts[part][index - (int(self._ends[part - 1]) if part else 0)]


class LanguageSampledSplit(Sequence):
  """An endless training split: example k is an independent draw, seeded by (seed, k), of a
  language i with probability q_i (`sampling_probabilities`) and then of one of its examples
  uniformly (with replacement, as fairseq's ResamplingDataset for XLM-R).

  `epoch_size` (the number of examples of all languages) bounds what tokenizer training reads.
  """

  def __init__(self, by_language: dict[str, Sequence[dict]], alpha: float, seed: int):
    self.languages = tuple(by_language)
    self._columns = [by_language[lang] for lang in self.languages]
    self.counts = np.asarray([len(c) for c in self._columns], np.int64)
    self.probabilities = sampling_probabilities(self.counts, alpha)
    self._cdf = np.cumsum(self.probabilities)
    self._seed = seed
    self.epoch_size = int(self.counts.sum())

  def __len__(self) -> int:
    return 2**31 - 1  # endless: every read is a fresh draw

  def language_of(self, index: int) -> int:
    """The language (index into `languages`) example `index` is drawn from."""
    return self.draw(index)[0]

  def draw(self, index: int) -> tuple[int, int]:
    rng = np.random.default_rng([self._seed, index])
    lang = min(int(np.searchsorted(self._cdf, rng.random(), side='right')), len(self._cdf) - 1)
    return lang, int(rng.integers(self.counts[lang]))

  def __getitem__(self, index):
    if not 0 <= index < len(self):
      raise IndexError(index)
    lang, i = self.draw(index)
    return self._columns[lang][i]

  def __iter__(self):
    raise TypeError('the multilingual training split is an endless sample read by index; what '
                    'must read a whole split (data.mlm_inputs=full_sentences) cannot use it: set '
                    "config.data.mlm_inputs='doc_sentences'")


def multilingual_columns(data_config: Any) -> list[tuple[str, str]]:
  """(data set, language) of each `data.corpora` entry 'name.lang'; ValueError naming the key."""
  entries = [e.strip() for e in str(data_config.get('corpora', '')).split(',') if e.strip()]
  if not entries:
    raise ValueError("config.data.corpora is empty: name the columns of the multilingual data set, "
                     "e.g. 'multi30k.en,multi30k.de,bible_en_es.es'")
  out = []
  for entry in entries:
    name, _, lang = entry.partition('.')
    if name not in builders.PARALLEL_LANGS or lang not in builders.PARALLEL_LANGS[name]:
      options = ', '.join(f'{n}.{l}' for n, ls in builders.PARALLEL_LANGS.items() for l in ls)
      raise ValueError(f'config.data.corpora entry {entry!r} is not one of {options}')
    if (name, lang) in out:
      raise ValueError(f'config.data.corpora names {entry!r} twice')
    out.append((name, lang))
  return out


def _open_multilingual(data_config: Any) -> Source:
  """The `multilingual` data set: monolingual columns of the parallel data sets, by language."""
  columns = multilingual_columns(data_config)
  limit = data_config.get('max_examples', 0)
  opened = {}
  for name in dict.fromkeys(n for n, _ in columns):
    builder = builders.prepare(name, data_dir=data_config.data_dir,
                               manual_dir=data_config.manual_dir)
    opened[name] = {s: _DecodedSplit(builder.as_data_source(s), limit) for s in builder.info.splits}
  split_names = [s for s in ('train', 'validation', 'test') if all(s in o for o in opened.values())]
  by_split = {}
  for split in split_names:
    by_language: dict[str, list] = {}
    for name, lang in columns:
      by_language.setdefault(lang, []).append(_Column(opened[name][split], lang, lang))
    by_split[split] = {lang: Concatenation(parts) for lang, parts in by_language.items()}
  alpha = float(data_config.get('language_alpha', 0.3))
  splits = {'train': LanguageSampledSplit(by_split['train'], alpha, int(data_config.shuffle_seed))}
  for split in split_names[1:]:
    splits[split] = Concatenation(list(by_split[split].values()))
  # Trained tokenizers depend on the columns, the sampling and the seed.
  key = hashlib.sha1(f'{columns}|{alpha}|{data_config.shuffle_seed}'.encode()).hexdigest()[:10]
  cache = os.path.join(os.path.expanduser(data_config.data_dir), 'lab_multilingual', 'tokenizers',
                       key)
  return Source(MULTILINGUAL, _builder_spec(data_config), splits, cache)
