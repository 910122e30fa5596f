"""TFDS builders: offline preparation from a manual dir, counts against the raw files, errors."""

import gzip
import hashlib
import os
import shutil

import pytest

from flaxformer_lab.presets.common import default_data_dir
from flaxformer_lab.data import builders

SHARED = default_data_dir()
needs_shared = pytest.mark.skipif(not SHARED or not os.path.isdir(SHARED),
                                  reason='shared/data is not beside the repository')


def _lines(path):
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rt', encoding='utf-8', newline='') as f:
    return f.read().split('\n')[:-1]  # every raw file ends with a newline


def _copy_head(src, dst, n):
  """The first n lines of src written to dst (gzip kept)."""
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  lines = _lines(src)[:n]
  opener = gzip.open if dst.endswith('.gz') else open
  with opener(dst, 'wt', encoding='utf-8', newline='') as f:
    f.write(''.join(line + '\n' for line in lines))


def _all(builder, split):
  source = builder.as_data_source(split)
  return source.__getitems__(list(range(len(source))))


@needs_shared
def test_tiny_shakespeare_split_by_characters(tmp_path):
  with open(os.path.join(SHARED, 'tinyshakespeare/input.txt'), encoding='utf-8') as f:
    text = f.read()
  b = builders.prepare('tiny_shakespeare', data_dir=str(tmp_path), manual_dir=SHARED)
  parts = {s: _all(b, s) for s in ('train', 'validation', 'test')}
  assert all(len(p) == 1 for p in parts.values())
  texts = {s: p[0]['text'] for s, p in parts.items()}
  assert all(isinstance(t, bytes) for t in texts.values())
  # The split TFDS and char-rnn use (SOURCES.md): 1,003,854 / 55,770 / 55,770 characters.
  assert [len(texts[s]) for s in ('train', 'validation', 'test')] == [1003854, 55770, 55770]
  assert (texts['train'] + texts['validation'] + texts['test']).decode('utf-8') == text


@needs_shared
def test_multi30k_counts_and_alignment(tmp_path):
  b = builders.prepare('multi30k', data_dir=str(tmp_path), manual_dir=SHARED)
  for split, stem in (('train', 'train'), ('validation', 'val'), ('test', 'test_2016_flickr')):
    raw = {lang: _lines(os.path.join(SHARED, f'multi30k/{stem}.{lang}.gz'))
           for lang in ('en', 'de', 'fr')}
    got = _all(b, split)
    assert len(got) == len(raw['en']) == b.info.splits[split].num_examples
    triples = sorted((e['en'].decode(), e['de'].decode(), e['fr'].decode()) for e in got)
    assert triples == sorted(zip(*(map(str.strip, raw[lang]) for lang in ('en', 'de', 'fr'))))
  assert b.info.splits['train'].num_examples == 29000


@needs_shared
def test_sst2_and_ag_news_counts_and_labels(tmp_path):
  sst2 = builders.prepare('sst2', data_dir=str(tmp_path), manual_dir=SHARED)
  for split, stem in (('train', 'train'), ('validation', 'dev'), ('test', 'test')):
    rows = _lines(os.path.join(SHARED, f'sst2/{stem}.tsv'))[1:]  # header line
    got = _all(sst2, split)
    assert len(got) == len(rows)
    assert sum(e['label'] for e in got) == sum(r.endswith('\t1') for r in rows)
  assert len(_all(sst2, 'test')) == 872
  ag = builders.prepare('ag_news', data_dir=str(tmp_path), manual_dir=SHARED)
  assert set(ag.info.splits) == {'train', 'test'}
  for split, stem in (('train', 'dev'), ('test', 'test')):
    rows = _lines(os.path.join(SHARED, f'agnews/{stem}.tsv'))
    got = _all(ag, split)
    assert len(got) == len(rows)
    for k, name in enumerate(builders.AG_NEWS_CLASSES):
      assert sum(e['label'] == k for e in got) == sum(r.endswith('\t' + name) for r in rows)
  assert sorted(e['text'] for e in _all(ag, 'test'))[:50] == sorted(
      r.rsplit('\t', 1)[0].strip().encode() for r in
      _lines(os.path.join(SHARED, 'agnews/test.tsv')))[:50]


@needs_shared
def test_austen_paragraphs(tmp_path):
  b = builders.prepare('austen', data_dir=str(tmp_path), manual_dir=SHARED)
  got = {s: _all(b, s) for s in ('train', 'validation', 'test')}
  for novel, _ in builders.AUSTEN_NOVELS:
    with open(os.path.join(SHARED, f'austen/{novel}.txt'), encoding='utf-8') as f:
      raw = f.read()
    # Independent paragraph count: blocks separated by blank lines.
    blocks = [' '.join(l.strip() for l in blk.split('\n') if l.strip())
              for blk in raw.replace('\r', '').split('\n\n')]
    blocks = [blk for blk in blocks if blk]
    mine = {s: sorted((e['paragraph'], e['text'].decode()) for e in got[s]
                      if e['novel'].decode() == novel) for s in got}
    n = len(blocks)
    assert [len(mine[s]) for s in got] == [int(0.9 * n), int(0.95 * n) - int(0.9 * n),
                                           n - int(0.95 * n)]
    assert [t for s in got for _, t in mine[s]] == blocks


def test_small_manual_dir_and_cached_second_prepare(tmp_path, monkeypatch):
  if not SHARED:
    pytest.skip('shared/data is not beside the repository')
  manual = tmp_path / 'manual'
  for stem in ('train', 'val', 'test_2016_flickr'):
    for lang in ('en', 'de', 'fr'):
      _copy_head(os.path.join(SHARED, f'multi30k/{stem}.{lang}.gz'),
                 str(manual / f'multi30k/{stem}.{lang}.gz'), {'train': 40}.get(stem, 7))
  data_dir = str(tmp_path / 'tfds')
  b = builders.prepare('multi30k', data_dir=data_dir, manual_dir=str(manual))
  assert {s: b.info.splits[s].num_examples for s in b.info.splits} == {
      'train': 40, 'validation': 7, 'test': 7}
  files = sorted(os.path.join(r, f) for r, _, fs in os.walk(data_dir) for f in fs)
  mtimes = [os.stat(f).st_mtime_ns for f in files]
  calls = []
  monkeypatch.setattr(builders.Multi30k, '_raw_splits',
                      lambda self, paths: calls.append(1) or {})
  b2 = builders.prepare('multi30k', data_dir=data_dir, manual_dir=str(manual))
  assert not calls  # not rebuilt
  assert [os.stat(f).st_mtime_ns for f in files] == mtimes
  assert len(b2.as_data_source('train')) == 40


def test_missing_file_is_a_clear_error(tmp_path):
  manual = tmp_path / 'manual'
  (manual / 'sst2').mkdir(parents=True)
  (manual / 'sst2' / 'train.tsv').write_text('sentence\tlabel\ngood .\t1\n')
  with pytest.raises(builders.DataError) as err:
    builders.prepare('sst2', data_dir=str(tmp_path / 'tfds'), manual_dir=str(manual))
  message = str(err.value)
  assert isinstance(err.value, FileNotFoundError)
  assert "'sst2/dev.tsv'" in message and str(manual / 'sst2' / 'dev.tsv') in message
  assert '\n' not in message


def test_empty_manual_dir_downloads_the_pinned_urls(tmp_path):
  """An empty manual dir goes through the download manager, with the registered URLs."""
  if not SHARED:
    pytest.skip('shared/data is not beside the repository')
  (tmp_path / 'empty').mkdir()
  requested = {}

  class FakeDownloadManager:

    def download(self, urls):
      requested.update(urls)
      by_url = {url: os.path.join(SHARED, rel) for rel, url in builders.Sst2.RAW_FILES.values()}
      return {k: by_url[u] for k, u in urls.items()}

  b = builders.get_builder('sst2', data_dir=str(tmp_path / 'tfds'),
                           manual_dir=str(tmp_path / 'empty'))
  gens = b._split_generators(FakeDownloadManager())
  assert set(gens) == {'train', 'validation', 'test'}
  assert sum(1 for _ in gens['test']) == 872
  assert all(u.startswith('https://raw.githubusercontent.com/forest-snow/alps/3c7ef2c')
             for u in requested.values())


@needs_shared
def test_registered_checksums_match_the_shared_files():
  """checksums.tsv (what TFDS verifies downloads against) agrees with the shared copies."""
  infos = builders.Sst2.url_infos
  for name, cls in builders.BUILDERS.items():
    if name == 'austen':  # Gutenberg texts: no pinned checksum
      continue
    for rel, url in cls.RAW_FILES.values():
      if not url:  # no public download (bible_en_es): nothing registered
        continue
      with open(os.path.join(SHARED, rel), 'rb') as f:
        data = f.read()
      assert int(infos[url].size) == len(data), url
      assert infos[url].checksum == hashlib.sha256(data).hexdigest(), url


def test_unknown_name_and_no_data_dir():
  with pytest.raises(ValueError, match='unknown data set'):
    builders.get_builder('imagenet', data_dir='/tmp/x')
  with pytest.raises(ValueError, match='data_dir'):
    builders.get_builder('sst2', data_dir='')


def test_austen_paragraph_splitting():
  text = 'TITLE\n\nOne line\nwrapped here.\n\n\n  Second.  \nEnd\n'
  assert builders.austen_paragraphs(text) == ['TITLE', 'One line wrapped here.', 'Second. End']
  body = 'head\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nbody\n*** END OF THE PROJECT\nlic'
  assert builders._strip_gutenberg(body).strip() == 'body'


def test_sst2_copy_without_header_row_count(tmp_path):
  """A tmp manual dir with a few rows per file: counts follow the files."""
  manual = tmp_path / 'm'
  (manual / 'sst2').mkdir(parents=True)
  for stem, n in (('train', 11), ('dev', 5), ('test', 3)):
    rows = [f'sentence {stem} {i} "quoted" .\t{i % 2}' for i in range(n)]
    (manual / 'sst2' / f'{stem}.tsv').write_text('sentence\tlabel\n' + '\n'.join(rows) + '\n')
  b = builders.prepare('sst2', data_dir=str(tmp_path / 'tfds'), manual_dir=str(manual))
  got = _all(b, 'train')
  assert len(got) == 11 and sum(e['label'] for e in got) == 5
  assert sorted(e['sentence'] for e in got) == sorted(
      f'sentence train {i} "quoted" .'.encode() for i in range(11))
  shutil.rmtree(manual)  # prepared data no longer needs the raw files
  assert len(builders.prepare('sst2', data_dir=str(tmp_path / 'tfds'),
                              manual_dir=str(manual)).as_data_source('test')) == 3


def test_tensorflow_is_never_imported(tmp_path):
  import subprocess
  import sys
  code = ('import sys; from flaxformer_lab.data import builders; '
          f"b = builders.prepare('sst2', data_dir={str(tmp_path)!r}, manual_dir={str(tmp_path)!r}); "
          "print('tensorflow' in sys.modules)")
  (tmp_path / 'sst2').mkdir()
  for stem in ('train', 'dev', 'test'):
    (tmp_path / 'sst2' / f'{stem}.tsv').write_text('sentence\tlabel\nok .\t1\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == 'False'


@needs_shared
def test_concurrent_preparation_waits_for_the_first(tmp_path):
  """Two processes preparing one data set (a parallel sweep on a fresh data directory) take turns:
  while one holds the preparation lock the other waits, then finds the data built."""
  import fcntl  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / 'tfds')
  os.makedirs(data_dir)
  code = ('from flaxformer_lab.data import builders; print("imported", flush=True); '
          f'b = builders.prepare("tiny_shakespeare", data_dir={data_dir!r}, '
          f'manual_dir={SHARED!r}); print(b.info.splits["train"].num_examples)')
  with open(os.path.join(data_dir, '.lab_tiny_shakespeare.prepare.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process is preparing
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'imported'
    time.sleep(6)  # long enough for an unlocked preparation to start writing
    assert proc.poll() is None, proc.communicate()
    assert not os.path.exists(os.path.join(data_dir, 'lab_tiny_shakespeare'))
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  assert out.split()[-1] == '1'
