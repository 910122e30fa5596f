"""TFDS builders (array_record, no TensorFlow) for the lab's text data sets.

Each builder reads its raw files from a manual directory laid out like `shared/data` (see
`shared/data/SOURCES.md`); when that directory is unset ('') or exists but is empty, it downloads
the same files from their public source with TFDS's download manager instead (URLs pinned to the
commits named in SOURCES.md; their sizes and sha256 are registered in `checksums.tsv` beside this
file, so TFDS verifies them). A manual directory that is set but lacks a file is an error
(`DataError`) naming the file and where it was looked for.

Prepared data is written once to `data_dir/<builder name>/<version>/` as array_record files and
read back with `builder.as_data_source(split)`; a later `prepare()` finds it and does not rebuild.
Text fields come back as `bytes`. TFDS shuffles examples when it writes them, so the stored order
is a deterministic permutation of the raw order.

Builder names carry a `lab_` prefix so that they never collide with TFDS's own (TensorFlow,
tfrecord) `tiny_shakespeare` etc. prepared in the same `data_dir`.
"""

from __future__ import annotations

import fcntl
import gzip
import os
import re
import zlib
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

_ALPS = ('https://raw.githubusercontent.com/forest-snow/alps/'
         '3c7ef2c98249fc975a897b27f275695f97d5b7a9/data')
_CHAR_RNN = ('https://raw.githubusercontent.com/karpathy/char-rnn/'
             '6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt')
_MULTI30K = ('https://raw.githubusercontent.com/multi30k/dataset/'
             'a3d2e0d26b56f3846f66a952536ffed4e401d05a/data/task1/raw')
_GUTENBERG = 'https://www.gutenberg.org/cache/epub/{id}/pg{id}.txt'

AG_NEWS_CLASSES = ('World', 'Sports', 'Business', 'Sci/Tech')  # AG News' own order (labels 1..4)
SST2_CLASSES = ('negative', 'positive')  # label 0 / 1
MULTI30K_LANGS = ('en', 'de', 'fr')
BIBLE_LANGS = ('en', 'es')
AUSTEN_NOVELS = (  # (file name in the manual dir, Project Gutenberg ebook number)
    ('sense_and_sensibility', 161),
    ('pride_and_prejudice', 1342),
    ('mansfield_park', 141),
    ('emma', 158),
    ('northanger_abbey', 121),
    ('persuasion', 105),
)


class DataError(FileNotFoundError):
  """A raw data file is missing (the message names the file and where it was looked for)."""


class _LabBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common part: raw files come from `manual_dir`, else from the public URLs.

  Subclasses define `RAW_FILES = {key: (path relative to manual_dir, url)}` (url '' when the files
  have no public download: then only a manual dir works) and
  `_raw_splits(paths) -> {split: iterator of (key, example)}`.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  RAW_FILES: Mapping[str, tuple[str, str]] = {}

  def __init__(self, *, manual_dir: str | None = None, **kwargs: Any):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)
    self._lab_manual_dir = manual_dir or ''

  def _use_manual_dir(self) -> bool:
    """True when raw files must come from the manual dir ('' or an empty folder: download)."""
    d = self._lab_manual_dir
    if not d:
      return False
    return not (os.path.isdir(d) and not os.listdir(d))

  def raw_paths(self, dl_manager: tfds.download.DownloadManager | None) -> dict[str, str]:
    """Local paths of every raw file, from the manual dir or downloaded."""
    if self._use_manual_dir():
      paths = {}
      for key, (rel, url) in self.RAW_FILES.items():
        path = os.path.join(self._lab_manual_dir, rel)
        if not os.path.isfile(path):
          fallback = f"or set it to '' to download it from {url}" if url else (
              'it has no public download (see shared/data/SOURCES.md)')
          raise DataError(
              f'{self.name}: data file {rel!r} not found in manual_dir {self._lab_manual_dir!r} '
              f'(looked for {path}); point config.data.manual_dir at the folder holding it; '
              f'{fallback}')
        paths[key] = path
      return paths
    if dl_manager is None:
      raise DataError(f'{self.name}: no manual_dir and no download manager to fetch the raw files')
    urls = {key: url for key, (_, url) in self.RAW_FILES.items()}
    if not all(urls.values()):
      raise DataError(f'{self.name}: its raw files have no public download (see '
                      'shared/data/SOURCES.md); set config.data.manual_dir to the folder holding '
                      f'{", ".join(rel for rel, _ in self.RAW_FILES.values())}')
    return {key: os.fspath(p) for key, p in dl_manager.download(urls).items()}

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    return self._raw_splits(self.raw_paths(dl_manager))

  def _raw_splits(self, paths: dict[str, str]) -> dict[str, Iterator[tuple[Any, dict]]]:
    raise NotImplementedError

  def _generate_examples(self, **kwargs):  # Unused: splits come from `_raw_splits`.
    raise NotImplementedError


def _read_text(path: str) -> str:
  """UTF-8 text of a plain or .gz file, with CRLF normalised to LF. A file that is empty,
  compressed without a .gz name, not gzip despite one, or not UTF-8 is a DataError naming it."""
  gz = path.endswith('.gz')
  try:
    with open(path, 'rb') as f:
      head = f.read(2)
    if not gz and head == b'\x1f\x8b':
      raise DataError(f'data file {path} is gzip-compressed but not named .gz: decompress it '
                      '(gunzip) or replace it with the plain UTF-8 text file')
    with (gzip.open if gz else open)(path, 'rt', encoding='utf-8', newline='') as f:
      text = f.read().replace('\r\n', '\n')
  except UnicodeDecodeError as e:
    raise DataError(f'data file {path} is not UTF-8 text{" once decompressed" if gz else ""} '
                    f'(byte {e.object[e.start:e.start + 1]!r}): convert it to UTF-8 (e.g. '
                    'iconv -f latin1 -t utf-8) or replace it') from None
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise DataError(f'data file {path} is not a complete gzip file ({e}): replace it') from None
  if not text.strip():
    raise DataError(f'data file {path} is empty: replace it with the raw text')
  return text


def _read_lines(path: str) -> list[str]:
  """Lines of a text file without their line ends (a final newline adds no empty line)."""
  lines = _read_text(path).split('\n')
  return lines[:-1] if lines and not lines[-1] else lines


def _read_tsv(path: str, *, header: bool) -> list[tuple[str, str]]:
  """(text, label) rows of a two-column TSV; quotes are literal (no CSV quoting)."""
  rows = []
  for i, line in enumerate(_read_lines(path)):
    if header and i == 0:
      continue
    text, sep, label = line.rpartition('\t')
    if not sep:
      raise ValueError(f'{path}:{i + 1}: expected "text<TAB>label", got {line[:80]!r}')
    rows.append((text.strip(), label.strip()))
  return rows


class TinyShakespeare(_LabBuilder, skip_registration=True):
  """Karpathy's tiny shakespeare (1,115,394 chars) as one text per split.

  Split by characters exactly as TFDS's `tiny_shakespeare` and char-rnn do: train = the first
  int(0.9 n) = 1,003,854 characters, validation = the next half of the rest (55,770), test = the
  last 55,770. Each split is a single example {'text'}: a continuous character stream that the
  LM pipeline cuts into windows.
  """

  name = 'lab_tiny_shakespeare'
  RAW_FILES = {'input': ('tinyshakespeare/input.txt', _CHAR_RNN)}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Tiny Shakespeare (karpathy/char-rnn), split 90/5/5 by characters.',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        homepage='https://github.com/karpathy/char-rnn',
        license='MIT (char-rnn repository); the text is public domain',
    )

  def _raw_splits(self, paths):
    text = _read_text(paths['input'])
    n_train = int(len(text) * 0.9)
    n_val = int((len(text) - n_train) * 0.5)
    parts = {
        'train': text[:n_train],
        'validation': text[n_train:n_train + n_val],
        'test': text[n_train + n_val:],
    }
    return {split: iter([(0, {'text': t})]) for split, t in parts.items()}


class Multi30k(_LabBuilder, skip_registration=True):
  """Multi30k task 1: English, German and French captions, parallel line by line.

  train = train.* (29,000), validation = val.* (1,014), test = test_2016_flickr.* (1,000).
  Features: 'en', 'de', 'fr' (text).
  """

  name = 'lab_multi30k'
  _SPLIT_FILES = {'train': 'train', 'validation': 'val', 'test': 'test_2016_flickr'}
  RAW_FILES = {
      f'{split}.{lang}': (f'multi30k/{stem}.{lang}.gz', f'{_MULTI30K}/{stem}.{lang}.gz')
      for split, stem in _SPLIT_FILES.items() for lang in MULTI30K_LANGS
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Multi30k task 1 (Elliott et al. 2016, 2017): en/de/fr image captions.',
        features=tfds.features.FeaturesDict(
            {lang: tfds.features.Text() for lang in MULTI30K_LANGS}),
        homepage='https://github.com/multi30k/dataset',
        license='non-commercial research and educational use (see the repository README)',
    )

  def _raw_splits(self, paths):
    return {split: _parallel_lines(paths, split, MULTI30K_LANGS, 'multi30k')
            for split in self._SPLIT_FILES}


class BibleEnEs(_LabBuilder, skip_registration=True):
  """The verse-aligned English-Spanish Bible (World English Bible / Reina-Valera 1909).

  Line i of X.en.gz translates line i of X.es.gz. Split by book (shared/data/SOURCES.md):
  train = 64 books (30,281 verses), validation = Ruth (85), test = Mark (678).
  Features: 'en', 'es' (text). Built from Debian SWORD packages, so there is no download: the
  files must come from a manual dir.
  """

  name = 'lab_bible_en_es'
  _SPLIT_FILES = {'train': 'train', 'validation': 'val', 'test': 'test'}
  RAW_FILES = {f'{split}.{lang}': (f'bible_en_es/{stem}.{lang}.gz', '')
               for split, stem in _SPLIT_FILES.items() for lang in BIBLE_LANGS}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='World English Bible / Reina-Valera 1909, verse-aligned, split by book.',
        features=tfds.features.FeaturesDict({lang: tfds.features.Text() for lang in BIBLE_LANGS}),
        homepage='https://ebible.org/web/',
        license='public domain (both translations)',
    )

  def _raw_splits(self, paths):
    return {split: _parallel_lines(paths, split, BIBLE_LANGS, 'bible_en_es')
            for split in self._SPLIT_FILES}


def _parallel_lines(paths, split, langs, name):
  """(i, {lang: line i}) of line-aligned files `paths[f'{split}.{lang}']`."""
  columns = {lang: _read_lines(paths[f'{split}.{lang}']) for lang in langs}
  sizes = {lang: len(lines) for lang, lines in columns.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f'{name} {split}: the languages have different line counts {sizes}')
  for i, texts in enumerate(zip(*columns.values())):
    yield i, {lang: t.strip() for lang, t in zip(columns, texts)}


class Sst2(_LabBuilder, skip_registration=True):
  """SST-2 (GLUE version) as re-split by forest-snow/alps.

  train = train.tsv (60,614), validation = dev.tsv (6,735): together GLUE's 67,349-row train set;
  test = test.tsv (872) = GLUE's SST-2 *dev* set with labels, the accuracy papers report.
  Features: 'sentence' (text), 'label' (0 negative, 1 positive).
  """

  name = 'lab_sst2'
  _SPLIT_FILES = {'train': 'train', 'validation': 'dev', 'test': 'test'}
  RAW_FILES = {split: (f'sst2/{stem}.tsv', f'{_ALPS}/SST-2/{stem}.tsv')
               for split, stem in _SPLIT_FILES.items()}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='SST-2 binary sentiment (Socher et al. 2013), GLUE version, alps re-split.',
        features=tfds.features.FeaturesDict({
            'sentence': tfds.features.Text(),
            'label': tfds.features.ClassLabel(names=SST2_CLASSES),
        }),
        supervised_keys=('sentence', 'label'),
        homepage='https://nlp.stanford.edu/sentiment/',
    )

  def _raw_splits(self, paths):
    return {split: self._rows(paths[split]) for split in self._SPLIT_FILES}

  def _rows(self, path):
    for i, (text, label) in enumerate(_read_tsv(path, header=True)):
      if label not in ('0', '1'):
        raise ValueError(f'{path}: row {i + 1} has label {label!r}, expected 0 or 1')
      yield i, {'sentence': text, 'label': int(label)}


class AgNews(_LabBuilder, skip_registration=True):
  """The AG News subset kept by forest-snow/alps: 4 topic classes.

  Only two files exist (the 120k-row train.tsv is not in the snapshot): train = dev.tsv (10,001
  rows, class-balanced), test = test.tsv (7,600, the official AG News test set). There is no
  validation split: evaluate on 'test'.
  Features: 'text', 'label' (0 World, 1 Sports, 2 Business, 3 Sci/Tech).
  """

  name = 'lab_ag_news'
  _SPLIT_FILES = {'train': 'dev', 'test': 'test'}
  RAW_FILES = {split: (f'agnews/{stem}.tsv', f'{_ALPS}/agnews/{stem}.tsv')
               for split, stem in _SPLIT_FILES.items()}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='AG News topic classification (Zhang et al. 2015), alps subset.',
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'label': tfds.features.ClassLabel(names=AG_NEWS_CLASSES),
        }),
        supervised_keys=('text', 'label'),
        homepage='http://groups.di.unipi.it/~gulli/AG_corpus_of_news_articles.html',
        license='non-commercial research use',
    )

  def _raw_splits(self, paths):
    return {split: self._rows(paths[split]) for split in self._SPLIT_FILES}

  def _rows(self, path):
    for i, (text, label) in enumerate(_read_tsv(path, header=False)):
      if label not in AG_NEWS_CLASSES:
        raise ValueError(f'{path}: row {i + 1} has label {label!r}, expected {AG_NEWS_CLASSES}')
      yield i, {'text': text, 'label': AG_NEWS_CLASSES.index(label)}


def austen_paragraphs(text: str) -> list[str]:
  """Paragraphs of a novel: runs of non-blank lines, joined by single spaces."""
  paragraphs, current = [], []
  for line in text.split('\n'):
    line = line.strip()
    if line:
      current.append(line)
    elif current:
      paragraphs.append(' '.join(current))
      current = []
  if current:
    paragraphs.append(' '.join(current))
  return paragraphs


def _strip_gutenberg(text: str) -> str:
  """The body of a Project Gutenberg text, between its START and END markers."""
  start = re.search(r'^\*\*\* ?START OF.*$', text, flags=re.MULTILINE)
  end = re.search(r'^\*\*\* ?END OF.*$', text, flags=re.MULTILINE)
  return text[start.end() if start else 0:end.start() if end else len(text)]


class Austen(_LabBuilder, skip_registration=True):
  """Jane Austen's six novels (janeaustenr 1.0.0 text) as paragraphs, for masked-LM pretraining.

  An example is one paragraph (a run of non-blank lines joined by spaces). Each novel is split
  by position: its first 90% of paragraphs go to train, the next 5% to validation, the last 5%
  to test (int() cut points), so no paragraph crosses splits and every novel is in each split.
  Features: 'text', 'novel' (file stem), 'paragraph' (index within the novel).
  Without a manual dir the novels are downloaded from Project Gutenberg (the janeaustenr source),
  minus the Gutenberg header and licence, so that text may differ slightly from the manual copy.
  """

  name = 'lab_austen'
  RAW_FILES = {novel: (f'austen/{novel}.txt', _GUTENBERG.format(id=ebook))
               for novel, ebook in AUSTEN_NOVELS}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Jane Austen's six novels, one paragraph per example.",
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'novel': tfds.features.Text(),
            'paragraph': tfds.features.Scalar(dtype=np.int32),
        }),
        homepage='https://github.com/juliasilge/janeaustenr',
        license='public domain (the novels); janeaustenr packaging MIT',
    )

  def _raw_splits(self, paths):
    novels = {}
    for novel, _ in AUSTEN_NOVELS:
      text = _read_text(paths[novel])
      if not self._use_manual_dir():
        text = _strip_gutenberg(text)
      novels[novel] = austen_paragraphs(text)
    return {split: self._rows(novels, split) for split in ('train', 'validation', 'test')}

  def _rows(self, novels, split):
    for novel, paragraphs in novels.items():
      n = len(paragraphs)
      bounds = {'train': (0, int(0.9 * n)), 'validation': (int(0.9 * n), int(0.95 * n)),
                'test': (int(0.95 * n), n)}[split]
      for i in range(*bounds):
        yield f'{novel}-{i}', {'text': paragraphs[i], 'novel': novel, 'paragraph': i}


BUILDERS: dict[str, type[_LabBuilder]] = {
    'tiny_shakespeare': TinyShakespeare,
    'multi30k': Multi30k,
    'bible_en_es': BibleEnEs,
    'sst2': Sst2,
    'ag_news': AgNews,
    'austen': Austen,
}


# The languages (feature names) of each parallel data set.
PARALLEL_LANGS: dict[str, tuple[str, ...]] = {'multi30k': MULTI30K_LANGS,
                                              'bible_en_es': BIBLE_LANGS}


def get_builder(name: str, *, data_dir: str, manual_dir: str | None = None) -> _LabBuilder:
  """The builder of data set `name` (a key of BUILDERS), writing under `data_dir`."""
  if name not in BUILDERS:
    raise ValueError(f'unknown data set {name!r}; builders exist for {", ".join(BUILDERS)}')
  if not data_dir:
    raise ValueError('config.data.data_dir is empty: set it to where prepared data should go')
  return BUILDERS[name](data_dir=os.path.expanduser(data_dir), manual_dir=manual_dir)


def prepare(name: str, *, data_dir: str, manual_dir: str | None = None) -> _LabBuilder:
  """Builds data set `name` once (a no-op when it is already prepared) and returns its builder.

  Processes that prepare the same data set at once (the runs of a parallel sweep on a fresh data
  directory) take turns on a lock file beside it: the first builds it, the others find it built.
  """
  builder = get_builder(name, data_dir=data_dir, manual_dir=manual_dir)
  os.makedirs(builder.data_dir_root, exist_ok=True)
  # Opened without truncating: a prepared data set's files (the lock's mtime included) stay as
  # they are, so a second prepare changes nothing on disk.
  lock = os.open(os.path.join(builder.data_dir_root, f'.{builder.name}.prepare.lock'),
                 os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
    builder = get_builder(name, data_dir=data_dir, manual_dir=manual_dir)  # sees a finished build
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  finally:
    os.close(lock)
  return builder
