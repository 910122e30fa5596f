"""Grain pipelines: batch layout, packing, restore, shuffling, sharding, eval coverage."""

import collections
import json
import os

import numpy as np
import pytest

from flaxformer_lab.presets.common import base_config
from flaxformer_lab.presets.common import default_data_dir
from flaxformer_lab.data import make_datasets
from flaxformer_lab.data import tokenizers as tok_lib

SHARED = default_data_dir()
needs_shared = pytest.mark.skipif(not SHARED or not os.path.isdir(SHARED),
                                  reason='shared/data is not beside the repository')
BOS, EOS, CLS, SEP = 1, 2, 4, 5
WORDS = ('the cat sat on a mat while dogs ran far away into green hills and '
         'nobody knew why it was so').split()


def _sentences(n, seed):
  rng = np.random.default_rng(seed)
  return [f'row {i} ' + ' '.join(rng.choice(WORDS, size=int(rng.integers(1, 30))))
          for i in range(n)]


@pytest.fixture(scope='module')
def small_sst2(tmp_path_factory):
  """A manual dir with a small SST-2 (unique sentences) and a data_dir to prepare it in."""
  root = tmp_path_factory.mktemp('sst2')
  (root / 'manual' / 'sst2').mkdir(parents=True)
  rows = {}
  for stem, n, seed in (('train', 40, 1), ('dev', 37, 2), ('test', 5, 3)):
    rows[stem] = [(s, i % 2) for i, s in enumerate(_sentences(n, seed))]
    (root / 'manual' / 'sst2' / f'{stem}.tsv').write_text(
        'sentence\tlabel\n' + ''.join(f'{s}\t{y}\n' for s, y in rows[stem]))
  return {'manual': str(root / 'manual'), 'data_dir': str(root / 'tfds'), 'rows': rows}


def _config(task, name, *, data_dir='', manual_dir='', batch_size=8, seq_len=64, **data):
  c = base_config()
  c.task = task
  c.batch_size = batch_size
  c.data.name = name
  c.data.data_dir = data_dir or '/nonexistent'
  c.data.manual_dir = manual_dir
  c.data.seq_len = seq_len
  c.data.update(data)
  return c


def _sst2(task, small, **kw):
  return _config(task, 'sst2', data_dir=small['data_dir'], manual_dir=small['manual'], **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _segments(tokens, segment_ids, positions, pad_id=0):
  """Checks one row's packing layout; returns its segments' tokens in order."""
  n = int((segment_ids > 0).sum())
  assert (segment_ids[:n] > 0).all() and (segment_ids[n:] == 0).all(), segment_ids
  assert (tokens[n:] == pad_id).all() and (positions[n:] == 0).all()
  out = []
  for k in range(1, int(segment_ids.max(initial=0)) + 1):
    idx = np.flatnonzero(segment_ids == k)
    assert len(idx) and (np.diff(idx) == 1).all()  # contiguous
    assert (positions[idx] == np.arange(len(idx))).all()
    out.append(tokens[idx])
  assert sum(len(s) for s in out) == n  # segment ids are 1..k with no gaps
  return out


# --- layout ---------------------------------------------------------------------------------------


def test_batch_keys_shapes_and_dtypes(small_sst2):
  cases = {
      ('lm', 'synthetic_lm'): {'inputs', 'targets', 'segment_ids', 'positions', 'weights'},
      ('seq2seq', 'synthetic_copy'): {
          'encoder_inputs', 'encoder_segment_ids', 'encoder_positions', 'decoder_inputs',
          'decoder_targets', 'decoder_segment_ids', 'decoder_positions', 'weights'},
  }
  for (task, name), keys in cases.items():
    bundle = make_datasets(_config(task, name, seq_len=32, target_len=24))
    batch = next(bundle.train_iter)
    assert set(batch) == keys
    for k, v in batch.items():
      assert v.dtype == (np.float32 if k == 'weights' else np.int32), k
      assert v.shape == (8, 24 if k.startswith('decoder') or (task == 'seq2seq' and
                                                              k == 'weights') else 32), k
  cls = make_datasets(_sst2('classification', small_sst2, seq_len=32))
  batch = next(cls.train_iter)
  assert set(batch) == {'inputs', 'segment_ids', 'positions', 'token_type_ids', 'label',
                        'weights'}
  assert batch['label'].shape == (8,) and batch['weights'].shape == (8,)
  assert (batch['inputs'][:, 0] == CLS).all() and (batch['token_type_ids'] == 0).all()
  assert cls.num_classes == 2 and cls.vocab_size == 263
  mlm = make_datasets(_sst2('mlm', small_sst2, seq_len=32, mlm_pairs='sop'))
  batch = next(mlm.train_iter)
  assert set(batch) == {'inputs', 'targets', 'weights', 'segment_ids', 'positions',
                        'token_type_ids', 'pair_label', 'pair_weights'}
  assert batch['weights'].dtype == np.float32 and batch['pair_label'].shape == (8,)


@needs_shared
def test_lm_stream_windows_cover_the_stream(tmp_path):
  with open(os.path.join(SHARED, 'tinyshakespeare/input.txt'), 'rb') as f:
    raw = f.read()
  val = np.frombuffer(raw[1003854:1003854 + 55770], np.uint8).astype(np.int32) + 7
  data_dir = str(tmp_path)
  bundle = make_datasets(_config('lm', 'tiny_shakespeare', data_dir=data_dir,
                                 manual_dir=SHARED, batch_size=16, seq_len=100))
  batches = list(bundle.eval_batches(max_batches=0))
  assert len(batches) == -(-(-(-(len(val) - 1) // 100)) // 16)
  targets = np.concatenate([b['targets'][b['weights'] > 0] for b in batches])
  inputs = np.concatenate([b['inputs'][b['weights'] > 0] for b in batches])
  np.testing.assert_array_equal(targets, val[1:])  # every target exactly once, in order
  np.testing.assert_array_equal(inputs, val[:-1])
  for b in batches:
    for row in range(16):
      _segments(b['inputs'][row], b['segment_ids'][row], b['positions'][row])
  train = next(bundle.train_iter)
  assert (train['weights'] == 1).all() and (train['positions'] == np.arange(100)).all()
  np.testing.assert_array_equal(train['inputs'][:, 1:], train['targets'][:, :-1])


# --- packing --------------------------------------------------------------------------------------


def _multiset(rows):
  return collections.Counter(tuple(tuple(int(t) for t in part) for part in r) for r in rows)


def test_seq2seq_packing_brute_force():
  kw = dict(seq_len=40, target_len=40, batch_size=8, synthetic_train_size=300)
  tok = tok_lib.ByteTokenizer()
  packed = make_datasets(_config('seq2seq', 'synthetic_reverse', **kw))
  batches = _take(packed.train_iter, 6)
  pairs = []
  for b in batches:
    for r in range(8):
      enc = _segments(b['encoder_inputs'][r], b['encoder_segment_ids'][r],
                      b['encoder_positions'][r])
      dec_in = _segments(b['decoder_inputs'][r], b['decoder_segment_ids'][r],
                         b['decoder_positions'][r])
      dec_out = _segments(b['decoder_targets'][r], b['decoder_segment_ids'][r],
                          b['decoder_positions'][r])
      assert len(enc) == len(dec_in) == len(dec_out)  # segment k pairs with segment k
      np.testing.assert_array_equal(b['weights'][r], b['decoder_segment_ids'][r] > 0)
      for e, di, do in zip(enc, dec_in, dec_out):
        assert e[-1] == EOS and di[0] == BOS and do[-1] == EOS
        np.testing.assert_array_equal(di[1:], do[:-1])
        assert tok.decode(do) == tok.decode(e)[::-1]  # target = reversed source
        pairs.append((e, do))
    assert len(pairs) > 8  # several pairs per row
  unpacked = make_datasets(_config('seq2seq', 'synthetic_reverse', pack=False, **kw))
  rows = []
  for b in _take(unpacked.train_iter, len(pairs) // 8 + 1):
    for r in range(8):
      n_enc, n_dec = b['encoder_segment_ids'][r].sum(), b['decoder_segment_ids'][r].sum()
      rows.append((b['encoder_inputs'][r][:n_enc], b['decoder_targets'][r][:n_dec]))
  # The packed rows hold exactly the first examples of the same shuffled stream.
  assert _multiset(pairs) == _multiset(rows[:len(pairs)])


def test_lm_packing_brute_force(small_sst2):
  raw = {s for s, _ in small_sst2['rows']['train']}
  tok = tok_lib.ByteTokenizer()
  kw = dict(seq_len=32, batch_size=4)
  unpacked = make_datasets(_sst2('lm', small_sst2, pack=False, **kw))
  # Unpacked: one segment per row; consecutive rows of a document rebuild it exactly.
  docs, current = [], None
  rows = []
  for b in _take(unpacked.train_iter, 60):
    for r in range(4):
      (inputs,) = _segments(b['inputs'][r], b['segment_ids'][r], b['positions'][r])
      n = len(inputs)
      targets = b['targets'][r][:n]
      np.testing.assert_array_equal(b['weights'][r], np.arange(32) < n)
      rows.append((inputs, targets))
      if inputs[0] == BOS:
        assert current is None
        current = []
      np.testing.assert_array_equal(inputs[1:], targets[:-1])  # shifted by one
      current.extend(targets)
      if targets[-1] == EOS:
        docs.append(tok.decode(current))
        current = None
  assert len(docs) > 40 and set(docs) == raw  # more than an epoch, every sentence, intact
  packed = make_datasets(_sst2('lm', small_sst2, **kw))
  segs = []
  for b in _take(packed.train_iter, 10):
    for r in range(4):
      ins = _segments(b['inputs'][r], b['segment_ids'][r], b['positions'][r])
      outs = _segments(b['targets'][r], b['segment_ids'][r], b['positions'][r])
      np.testing.assert_array_equal(b['weights'][r], b['segment_ids'][r] > 0)
      segs.extend(zip(ins, outs))
  assert len(segs) > 40
  assert _multiset(segs) == _multiset(rows[:len(segs)])


# --- checkpointing, shuffling, sharding -----------------------------------------------------------


def _restore_configs(small):
  return {
      'lm_stream': _config('lm', 'synthetic_lm', seq_len=32, synthetic_train_size=200),
      'lm_packed': _sst2('lm', small, seq_len=32),
      'seq2seq_packed': _config('seq2seq', 'synthetic_copy', seq_len=24,
                                synthetic_train_size=50),
      'classification': _sst2('classification', small, seq_len=32),
      'mlm_packed': _sst2('mlm', small, seq_len=32),
      'mlm_nsp': _sst2('mlm', small, seq_len=32, mlm_pairs='nsp'),
  }


@pytest.mark.parametrize('case', ['lm_stream', 'lm_packed', 'seq2seq_packed', 'classification',
                                  'mlm_packed', 'mlm_nsp'])
def test_restored_iterator_continues_exactly(small_sst2, case):
  config = _restore_configs(small_sst2)[case]
  first = make_datasets(config)
  _take(first.train_iter, 7)  # several epochs of the small sets
  state = json.loads(json.dumps(first.train_iter.get_state()))  # JSON-serializable
  expected = _take(first.train_iter, 5)
  restored = make_datasets(config)  # a new process would rebuild the pipeline
  restored.train_iter.set_state(state)
  _assert_same_batches(_take(restored.train_iter, 5), expected)
  uninterrupted = make_datasets(config)
  _assert_same_batches(_take(uninterrupted.train_iter, 12)[7:], expected)


def test_shuffle_is_deterministic_by_seed(small_sst2):
  def first_batches(seed):
    bundle = make_datasets(_sst2('classification', small_sst2, seq_len=32, shuffle_seed=seed))
    return _take(bundle.train_iter, 3)
  a, b, c = first_batches(0), first_batches(0), first_batches(1)
  _assert_same_batches(a, b)
  assert not all(np.array_equal(x['inputs'], y['inputs']) for x, y in zip(a, c))
  # Same examples in another order: one epoch is 40 rows = 5 batches of 8.
  def epoch(seed):
    bundle = make_datasets(_sst2('classification', small_sst2, seq_len=32, shuffle_seed=seed))
    return sorted(tuple(row) for b in _take(bundle.train_iter, 5) for row in b['inputs'])
  assert epoch(0) == epoch(1)


def _texts(batch, tok):
  """Sentences of classification rows ([CLS] text [SEP]) with weight 1."""
  out = []
  for row, seg, w in zip(batch['inputs'], batch['segment_ids'], batch['weights']):
    if w > 0:
      n = int(seg.sum())
      assert row[0] == CLS and row[n - 1] == SEP
      out.append(tok.decode(row[1:n - 1]))
  return out


def test_process_shards_are_disjoint_and_cover(small_sst2):
  tok = tok_lib.ByteTokenizer()
  raw = sorted(s for s, _ in small_sst2['rows']['train'])
  seen = []
  for p in range(2):
    bundle = make_datasets(_sst2('classification', small_sst2, seq_len=256, batch_size=8),
                           process_index=p, process_count=2)
    assert bundle.batch_size == 4
    epoch = [t for b in _take(bundle.train_iter, 5) for t in _texts(b, tok)]  # 20 = 40 / 2
    assert len(set(epoch)) == 20
    seen.append(set(epoch))
  assert not seen[0] & seen[1]
  assert sorted(seen[0] | seen[1]) == raw


@pytest.mark.parametrize('process_count,batch_size', [(1, 8), (2, 8), (3, 6), (1, 64)])
def test_eval_batches_cover_every_example_once(small_sst2, process_count, batch_size):
  tok = tok_lib.ByteTokenizer()
  raw = small_sst2['rows']['dev']  # 37 rows
  got, counts = [], []
  for p in range(process_count):
    bundle = make_datasets(_sst2('classification', small_sst2, seq_len=256,
                                 batch_size=batch_size, eval_batches=0),
                           process_index=p, process_count=process_count)
    batches = list(bundle.eval_batches())
    assert len(list(bundle.eval_batches())) == len(batches)  # a fresh pass each time
    counts.append(len(batches))
    for b in batches:
      assert b['inputs'].shape[0] == batch_size // process_count
      real = b['weights'] > 0
      assert ((b['segment_ids'].sum(1) > 0) == real).all()  # padding rows are empty
      got.extend(zip(_texts(b, tok), b['label'][real].tolist()))
  assert len(set(counts)) == 1  # every process runs the same number of eval steps
  assert sorted(got) == sorted(raw)


def test_eval_batches_limit_and_seq2seq_coverage():
  config = _config('seq2seq', 'synthetic_copy', seq_len=24, synthetic_eval_size=37,
                   eval_batches=2, batch_size=8)
  bundle = make_datasets(config)
  assert len(list(bundle.eval_batches())) == 2
  full = list(bundle.eval_batches(max_batches=0))
  assert len(full) == 5
  assert sum(int(b['weights'].sum(1).astype(bool).sum()) for b in full) == 37
  first = list(bundle.eval_batches(max_batches=0))
  _assert_same_batches(full, first)  # deterministic


def test_config_errors(small_sst2):
  with pytest.raises(ValueError, match='not divisible'):
    make_datasets(_config('lm', 'synthetic_lm', batch_size=6), process_index=0, process_count=4)
  with pytest.raises(ValueError, match='cannot read'):
    make_datasets(_config('classification', 'synthetic_copy'))
  with pytest.raises(ValueError, match="no split 'nope'"):
    make_datasets(_sst2('classification', small_sst2, eval_split='nope'))
  with pytest.raises(ValueError, match='unknown data set'):
    make_datasets(_config('lm', 'wikipedia'))
  with pytest.raises(ValueError, match='config.task'):
    make_datasets(_config('translation', 'synthetic_copy'))


def test_restored_tokenizer_is_used(small_sst2, tmp_path):
  config = _sst2('lm', small_sst2, seq_len=32, tokenizer='char')
  bundle = make_datasets(config)
  bundle.tokenizer.save(str(tmp_path / 'tok'))
  again = make_datasets(config, tokenizer=tok_lib.load_tokenizer(str(tmp_path / 'tok')))
  assert again.tokenizer.chars == bundle.tokenizer.chars
  _assert_same_batches(_take(again.train_iter, 2), _take(bundle.train_iter, 2))


@needs_shared
def test_seq2seq_packed_segments_pair_source_with_its_translation(tmp_path):
  """Encoder segment k and decoder segment k of a row are one Multi30k de->en pair."""
  import gzip
  manual = tmp_path / 'manual' / 'multi30k'
  manual.mkdir(parents=True)
  lines = {}
  for stem in ('train', 'val', 'test_2016_flickr'):
    for lang in ('en', 'de', 'fr'):
      with gzip.open(os.path.join(SHARED, f'multi30k/{stem}.{lang}.gz'), 'rt',
                     encoding='utf-8') as f:
        lines[stem, lang] = [next(f) for _ in range(120)]
      with gzip.open(manual / f'{stem}.{lang}.gz', 'wt', encoding='utf-8') as f:
        f.write(''.join(lines[stem, lang]))
  pairs = {de.strip(): en.strip() for de, en in zip(lines['train', 'de'], lines['train', 'en'])}
  tok = tok_lib.ByteTokenizer()
  bundle = make_datasets(_config('seq2seq', 'multi30k', data_dir=str(tmp_path / 'tfds'),
                                 manual_dir=str(tmp_path / 'manual'), seq_len=256,
                                 target_len=200, batch_size=4))
  seen = 0
  for b in _take(bundle.train_iter, 10):
    for r in range(4):
      enc = _segments(b['encoder_inputs'][r], b['encoder_segment_ids'][r],
                      b['encoder_positions'][r])
      dec = _segments(b['decoder_targets'][r], b['decoder_segment_ids'][r],
                      b['decoder_positions'][r])
      assert len(enc) == len(dec)
      for e, d in zip(enc, dec):
        assert pairs[tok.decode(e)] == tok.decode(d)
        seen += 1
  assert seen > 60


class _TopSpecials(tok_lib.ByteTokenizer):
  """Bytes at ids 0..255 and the specials above them, like a pretrained vocabulary's layout."""

  pad_id, bos_id, eos_id, unk_id, cls_id, sep_id, mask_id = range(256, 263)

  def encode(self, text):
    return list(text.encode('utf-8'))

  def decode(self, ids):
    return bytes(int(i) for i in ids if i < 256).decode('utf-8', errors='replace')


def test_special_ids_come_from_the_tokenizer(small_sst2):
  tok = _TopSpecials()
  mlm = make_datasets(_sst2('mlm', small_sst2, seq_len=64, eval_batches=0), tokenizer=tok)
  raw = ''.join(s for s, _ in small_sst2['rows']['train']).replace(' ', '')
  selected = 0
  for b in _take(mlm.train_iter, 10):
    pad = b['segment_ids'] == 0
    assert (b['inputs'][pad] == 256).all() and (b['targets'][pad] == 256).all()
    chosen = b['weights'] > 0
    assert not np.isin(b['targets'][chosen], tok.special_ids).any()
    changed = chosen & (b['inputs'] != b['targets'])
    assert np.isin(b['inputs'][changed], [tok.mask_id] + list(range(256))).all()
    selected += chosen.sum()
    for r in range(8):
      for seg in _segments(b['targets'][r], b['segment_ids'][r], b['positions'][r], 256):
        assert seg[0] == tok.cls_id and seg[-1] == tok.sep_id
        assert tok.decode(seg).replace(' ', '') in raw
  assert selected > 100
  cls = make_datasets(_sst2('classification', small_sst2, seq_len=64, batch_size=16,
                            eval_batches=0), tokenizer=tok)
  last = list(cls.eval_batches())[-1]  # 37 rows: the last batch has 11 padding rows
  assert (last['inputs'][last['weights'] == 0] == 256).all()
  assert (last['inputs'][last['weights'] > 0, 0] == tok.cls_id).all()
  s2s = make_datasets(_config('seq2seq', 'synthetic_copy', seq_len=24, pack=False),
                      tokenizer=tok)
  b = next(s2s.train_iter)
  assert (b['decoder_inputs'][:, 0] == tok.bos_id).all()
  n = b['decoder_segment_ids'].sum(1)
  assert (b['decoder_targets'][np.arange(8), n - 1] == tok.eos_id).all()
  assert (b['decoder_targets'][b['decoder_segment_ids'] == 0] == tok.pad_id).all()
