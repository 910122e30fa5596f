"""Masked-LM data on Jane Austen: BERT's masking statistics, dynamic masks, NSP/SOP pairs."""

import os
import re

import numpy as np
import pytest

from flaxformer_lab.presets.common import base_config
from flaxformer_lab.presets.common import default_data_dir
from flaxformer_lab.data import make_datasets
from flaxformer_lab.data import preprocess
from flaxformer_lab.data import tokenizers as tok_lib

SHARED = default_data_dir()
pytestmark = pytest.mark.skipif(not SHARED or not os.path.isdir(os.path.join(SHARED, 'austen')),
                                reason='shared/data/austen is not beside the repository')
CLS, SEP, MASK, NUM_SPECIAL = 4, 5, 6, 7
TOK = tok_lib.ByteTokenizer()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def austen_text():
  """All six novels with every whitespace removed (substring checks ignore spacing)."""
  text = ''
  for name in sorted(os.listdir(os.path.join(SHARED, 'austen'))):
    with open(os.path.join(SHARED, 'austen', name), encoding='utf-8') as f:
      text += '|' + re.sub(r'\s+', '', f.read())
  return text


def _config(data_dir, **data):
  c = base_config()
  c.task = 'mlm'
  c.batch_size = 16
  c.data.update(name='austen', data_dir=data_dir, manual_dir=SHARED, seq_len=128,
                max_examples=300, pack=False)
  c.data.update(data)
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _squash(ids):
  return re.sub(r'\s+', '', TOK.decode(ids))


def test_masking_statistics_and_targets(data_dir, austen_text):
  bundle = make_datasets(_config(data_dir, pack=True))
  batches = _take(bundle.train_iter, 40)
  inputs = np.concatenate([b['inputs'] for b in batches])  # [N, L]
  targets = np.concatenate([b['targets'] for b in batches])
  weights = np.concatenate([b['weights'] for b in batches])
  segment_ids = np.concatenate([b['segment_ids'] for b in batches])
  ordinary = (targets >= NUM_SPECIAL) & (segment_ids > 0)
  selected = weights > 0
  assert ordinary.sum() > 50_000
  assert not (selected & ~ordinary).any()  # never specials or padding
  assert set(np.unique(weights)) <= {0.0, 1.0}
  assert abs(selected.sum() / ordinary.sum() - 0.15) < 0.01
  np.testing.assert_array_equal(inputs[~selected], targets[~selected])  # unselected: unchanged
  sel_in, sel_tgt = inputs[selected], targets[selected]
  masked = sel_in == MASK
  kept = sel_in == sel_tgt
  randomized = ~masked & ~kept
  assert abs(masked.mean() - 0.8) < 0.02
  assert abs(kept.mean() - 0.1) < 0.015
  assert abs(randomized.mean() - 0.1) < 0.015
  assert (sel_in[randomized] >= NUM_SPECIAL).all() and (sel_in < bundle.vocab_size).all()
  # targets are the original text: each segment is [CLS] text [SEP] from a novel.
  checked = 0
  for row, seg in zip(targets[:60], segment_ids[:60]):
    for k in range(1, seg.max() + 1):
      s = row[seg == k]
      assert s[0] == CLS and s[-1] == SEP and (s[1:-1] >= NUM_SPECIAL).all()
      assert _squash(s[1:-1]) in austen_text
      checked += 1
  assert checked > 60  # packed: several segments per row


def test_masks_are_redrawn_each_epoch_but_eval_is_fixed(data_dir):
  bundle = make_datasets(_config(data_dir, max_examples=10, batch_size=8, eval_batches=0))
  seen = {}
  for b in _take(bundle.train_iter, 40):
    for t, w in zip(b['targets'], b['weights']):
      seen.setdefault(t.tobytes(), []).append(w)
  repeats = [ws for ws in seen.values() if len(ws) >= 2]
  assert len(repeats) >= 5
  differ = [not np.array_equal(ws[0], ws[1]) for ws in repeats]
  assert np.mean(differ) > 0.8
  a = list(bundle.eval_batches())
  b = list(bundle.eval_batches())
  assert all(np.array_equal(x['inputs'], y['inputs']) for x, y in zip(a, b))


def _pair_parts(row_targets, token_types):
  """(A, B) token arrays of [CLS] A [SEP] B [SEP]."""
  seps = np.flatnonzero(row_targets == SEP)
  assert row_targets[0] == CLS and len(seps) == 2
  a, b = row_targets[1:seps[0]], row_targets[seps[0] + 1:seps[1]]
  assert (token_types[:seps[0] + 1] == 0).all()
  assert (token_types[seps[0] + 1:seps[1] + 1] == 1).all()
  assert (token_types[seps[1] + 1:] == 0).all()
  return a, b


@pytest.mark.parametrize('mode', ['sop', 'nsp'])
def test_sentence_pairs(data_dir, austen_text, mode):
  bundle = make_datasets(_config(data_dir, mlm_pairs=mode))
  labels, in_order = [], []
  for b in _take(bundle.train_iter, 20):
    assert (b['pair_weights'] == 1).all()
    for t, tt, y in zip(b['targets'], b['token_type_ids'], b['pair_label']):
      a, bb = _pair_parts(t, tt)
      assert len(a) and len(bb)
      labels.append(int(y))
      if y == 0 or mode == 'sop':
        first, second = (a, bb) if y == 0 else (bb, a)
        assert _squash(np.concatenate([first, second])) in austen_text
      else:
        in_order.append(_squash(np.concatenate([a, bb])) in austen_text)
  assert 0.4 < np.mean(labels) < 0.6
  if mode == 'nsp':
    assert np.mean(in_order) < 0.1  # B really comes from elsewhere


def test_mask_tokens_never_touches_specials():
  rng = np.random.default_rng(0)
  ids = np.array([CLS] + list(range(7, 107)) + [SEP, 0, 0], np.int32)
  for _ in range(50):
    out = preprocess.mask_tokens(ids, rng, probability=0.15, tok=TOK)
    assert out['weights'].sum() == 15  # round(0.15 * 100)
    assert (out['weights'][[0, 101, 102, 103]] == 0).all()
    np.testing.assert_array_equal(out['targets'], ids)
  assert preprocess.mask_tokens(np.array([CLS, SEP], np.int32), rng, probability=0.15,
                                tok=TOK)['weights'].sum() == 0
