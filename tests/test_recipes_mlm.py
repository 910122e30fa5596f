"""The encoder pre-training recipes (BERT, RoBERTa, ALBERT) on the Austen novels.

Masking statistics (15%, 80/10/10, the cap, BERT's gathered form), NSP / SOP pairs, static vs
dynamic masks, ALBERT's n-gram lengths, RoBERTa's FULL-SENTENCES rows, the WordPiece / byte-level
BPE tokenizers, the presets' published numbers, and a short training run of each `:pretrain_tiny`.
"""

import collections
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from flaxformer_lab import rundir
from flaxformer_lab import train
from flaxformer_lab.data import make_datasets
from flaxformer_lab.data import preprocess
from flaxformer_lab.data import sources
from flaxformer_lab.data import tokenizers as tok_lib
from flaxformer_lab.models.config import ConfigError
from flaxformer_lab.presets import albert
from flaxformer_lab.presets import bert
from flaxformer_lab.presets import roberta
from flaxformer_lab.presets import common
from flaxformer_lab.presets.common import default_data_dir
from flaxformer_lab.tasks import get_objective

SHARED = default_data_dir()
pytestmark = pytest.mark.skipif(not SHARED or not os.path.isdir(os.path.join(SHARED, 'austen')),
                                reason='shared/data/austen is not beside the repository')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {'bert': bert, 'roberta': roberta, 'albert': albert}
BYTE = tok_lib.ByteTokenizer()
CLS, SEP, MASK = BYTE.cls_id, BYTE.sep_id, BYTE.mask_id


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _recipe(family, data_dir, variant='pretrain_tiny', **data):
  c = PRESETS[family].get_config(variant)
  c.data.update(data_dir=data_dir, manual_dir=SHARED)
  c.data.update(data)
  return c


def _byte(family, data_dir, **data):
  """A recipe's data settings with the byte tokenizer (targets decode to the exact text)."""
  c = _recipe(family, data_dir, tokenizer='byte', **data)
  c.model.vocab_size = 512
  return c


def _rows(bundle, n_batches):
  batches = [next(bundle.train_iter) for _ in range(n_batches)]
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _squash(ids):
  return re.sub(r'\s+', '', BYTE.decode(ids))


@pytest.fixture(scope='module')
def paragraphs(data_dir):
  """The squashed text of every training document of the first 400 (what the pipeline reads)."""
  c = _byte('bert', data_dir, max_examples=400)
  docs = get_objective(c).documents(sources.open_source(c.data), 'train')
  return [re.sub(r'\s+', '', d['text']) for d in docs]


# --- BERT's masking ---------------------------------------------------------------------------


def test_bert_masking_fraction_split_and_gathered_form(data_dir):
  """15% of the ordinary tokens (within 0.5 points), 80/10/10 (within 1 point each), at most
  max_predictions_per_seq per row, and the gathered [B, P] form equal to the full-length one."""
  c = _recipe('bert', data_dir)  # WordPiece, NSP pairs, static masks, cap 20 at 128 tokens
  bundle = make_datasets(c)
  tok = bundle.tokenizer
  r = _rows(bundle, 120)  # 1920 pairs
  special = np.isin(r['targets'], np.asarray(tok.special_ids))
  ordinary = ~special & (r['segment_ids'] > 0)
  selected = r['weights'] > 0
  assert ordinary.sum() > 100_000
  assert not (selected & ~ordinary).any()
  assert abs(selected.sum() / ordinary.sum() - 0.15) < 0.005
  np.testing.assert_array_equal(r['inputs'][~selected], r['targets'][~selected])
  sel_in, sel_tgt = r['inputs'][selected], r['targets'][selected]
  masked, kept = sel_in == tok.mask_id, sel_in == sel_tgt
  assert abs(masked.mean() - 0.8) < 0.01
  assert abs(kept.mean() - 0.1) < 0.01
  assert abs((~masked & ~kept).mean() - 0.1) < 0.01
  # BERT's count per row: min(cap, round(0.15 * ordinary)), exactly.
  per_row = selected.sum(1)
  expected = np.minimum(20, np.maximum(1, np.round(0.15 * ordinary.sum(1))))
  np.testing.assert_array_equal(per_row, expected)
  # The gathered form: the selected positions in order, their original ids, weight 1; then 0.
  p = r['masked_lm_positions']
  assert p.shape == (1920, c.data.max_predictions_per_seq)
  for i in range(len(p)):
    k = int(per_row[i])
    np.testing.assert_array_equal(p[i, :k], np.flatnonzero(selected[i]))
    np.testing.assert_array_equal(r['masked_lm_ids'][i, :k], r['targets'][i, p[i, :k]])
    assert (r['masked_lm_weights'][i, :k] == 1).all() and (r['masked_lm_weights'][i, k:] == 0).all()


def test_gathered_loss_equals_the_full_length_loss(data_dir):
  """BERT's recipe scores only the gathered positions ([B, P, V] logits); the loss and metrics
  equal those of scoring every position with the full-length targets and weights."""
  import jax  # pylint: disable=g-import-not-at-top
  from flaxformer_lab.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from flaxformer_lab.models.transformer import build_model  # pylint: disable=g-import-not-at-top
  c = _recipe('bert', data_dir, max_examples=400)
  batch = next(make_datasets(c).train_iter)
  objective = get_objective(c)
  model = build_model(ModelConfig.from_dict(c.model))
  inputs = objective.model_inputs(batch)
  assert inputs['masked_positions'].shape == (c.batch_size, 20)
  params = model.init(jax.random.key(0), **inputs)['params']
  gathered = model.apply({'params': params}, **inputs)
  assert gathered['logits'].shape == (c.batch_size, 20, c.model.vocab_size)
  loss, sums = objective.loss(gathered, batch)
  full_inputs = {k: v for k, v in inputs.items() if k != 'masked_positions'}
  full = model.apply({'params': params}, **full_inputs)
  plain = {k: v for k, v in batch.items() if not k.startswith('masked_lm_')}
  full_loss, full_sums = objective.loss(full, plain)
  np.testing.assert_allclose(loss, full_loss, rtol=1e-5)
  for key in ('mlm_loss_sum', 'loss_count', 'correct_sum', 'pair_loss_sum'):
    np.testing.assert_allclose(sums[key], full_sums[key], rtol=1e-5)


def test_the_cap_binds(data_dir):
  c = _byte('bert', data_dir, max_examples=400, max_predictions_per_seq=7)
  r = _rows(make_datasets(c), 20)
  ordinary = (r['targets'] >= BYTE.num_special) & (r['segment_ids'] > 0)
  per_row = (r['weights'] > 0).sum(1)
  assert per_row.max() == 7 and (ordinary.sum(1) * 0.15 > 7.5).mean() > 0.5  # the cap binds
  np.testing.assert_array_equal(per_row, np.minimum(7, np.maximum(1, np.round(0.15 * ordinary.sum(1)))))
  assert r['masked_lm_positions'].shape[1] == 7


# --- NSP and SOP ------------------------------------------------------------------------------


def _pair(targets, types):
  seps = np.flatnonzero(targets == SEP)
  assert targets[0] == CLS and len(seps) == 2
  assert (types[:seps[0] + 1] == 0).all() and (types[seps[0] + 1:seps[1] + 1] == 1).all()
  return targets[1:seps[0]], targets[seps[0] + 1:seps[1]]


def _containing(paragraphs, text):
  return {i for i, p in enumerate(paragraphs) if text in p}


@pytest.mark.parametrize('family,mode', [('bert', 'nsp'), ('albert', 'sop')])
def test_pair_labels_are_balanced_and_built_as_described(data_dir, paragraphs, family, mode):
  """NSP: label 1 = B from another document (no document holds A and B); label 0 = A then B in
  one document. SOP: label 0 = A then B, label 1 = the same two consecutive segments swapped."""
  c = _byte(family, data_dir, max_examples=400, mlm_masking='dynamic')
  assert c.data.mlm_pairs == mode
  r = _rows(make_datasets(c), 40)  # 640 pairs
  labels = r['pair_label']
  assert 0.45 < labels.mean() < 0.55
  elsewhere = []
  for t, tt, y in zip(r['targets'], r['token_type_ids'], labels):
    a, b = map(_squash, _pair(t, tt))
    assert a and b
    long = min(len(a), len(b)) >= 8  # (a few letters occur in many documents)
    if y == 0:
      assert _containing(paragraphs, a + b)  # consecutive in one document
    elif mode == 'sop':
      assert _containing(paragraphs, b + a)
      elsewhere.append(not _containing(paragraphs, a + b)) if long else None
    else:
      assert _containing(paragraphs, b)  # real text
      if long:
        elsewhere.append(not (_containing(paragraphs, a) & _containing(paragraphs, b)))
  assert len(elsewhere) > 150 and np.mean(elsewhere) > 0.99  # (Austen repeats a phrase or two)


# --- static vs dynamic masks ------------------------------------------------------------------


def _masks_by_example(c, n_batches):
  seen = collections.defaultdict(list)
  bundle = make_datasets(c)
  for _ in range(n_batches):
    b = next(bundle.train_iter)
    for t, w in zip(b['targets'], b['weights']):
      seen[t.tobytes()].append(w.tobytes())
  return [ws for ws in seen.values() if len(ws) >= 3]


@pytest.mark.parametrize('masking,dupe', [('dynamic', 1), ('static', 1), ('static', 3)])
def test_static_masks_stay_fixed_and_dynamic_ones_change(data_dir, masking, dupe):
  c = _byte('roberta', data_dir, max_examples=12, mlm_masking=masking, mlm_dupe_factor=dupe,
            mlm_inputs='doc_sentences')
  c.batch_size = 8
  repeats = _masks_by_example(c, 60)
  assert len(repeats) >= 5  # examples read at least three times (epochs)
  distinct = np.array([len(set(ws)) for ws in repeats])
  if masking == 'dynamic':
    assert (distinct == np.array([len(ws) for ws in repeats])).mean() > 0.9
  else:
    assert distinct.max() <= dupe
    if dupe > 1:
      assert (distinct > 1).mean() > 0.5


# --- ALBERT's n-grams -------------------------------------------------------------------------


def test_ngram_lengths_follow_one_over_n():
  """Span lengths n = 1..3 with p(n) = (1/n) / (1 + 1/2 + 1/3) = 6/11, 3/11, 2/11 (rarely
  masked long sequences, where overlaps and the count limit hardly bias the accepted spans)."""
  rng = np.random.default_rng(0)
  counts = collections.Counter()
  for _ in range(40):
    candidates = np.arange(1, 20_001)
    n_select = preprocess.num_to_predict(len(candidates), 0.02)
    spans = preprocess.ngram_spans(candidates, n_select, rng, 3)
    covered = np.concatenate([np.arange(s, s + n) for s, n in spans])
    assert len(covered) == len(set(covered.tolist())) == n_select  # disjoint, exactly the count
    counts.update(n for _, n in spans)
  total = sum(counts.values())
  observed = np.array([counts[n] / total for n in (1, 2, 3)])
  np.testing.assert_allclose(observed, np.array([6, 3, 2]) / 11, atol=0.012)


def test_ngram_masking_in_the_albert_recipe(data_dir):
  """Spans never cross a special token, the count is BERT's, and masked runs are longer than
  with single-token masking."""
  c = _byte('albert', data_dir, max_examples=400)
  r = _rows(make_datasets(c), 20)
  assert c.data.mlm_max_ngram == 3
  selected = r['weights'] > 0
  ordinary = (r['targets'] >= BYTE.num_special) & (r['segment_ids'] > 0)
  assert not (selected & ~ordinary).any()
  np.testing.assert_array_equal(selected.sum(1),
                                np.minimum(20, np.maximum(1, np.round(0.15 * ordinary.sum(1)))))
  rng = np.random.default_rng(0)
  single = np.stack([preprocess.mask_tokens(t, rng, probability=0.15, tok=BYTE,
                                            max_predictions=20)['weights'] > 0
                     for t in r['targets']])

  def in_runs(sel):  # fraction of selected tokens next to another selected one
    nxt = np.zeros_like(sel)
    nxt[:, :-1] = sel[:, 1:]
    prv = np.zeros_like(sel)
    prv[:, 1:] = sel[:, :-1]
    return (sel & (nxt | prv)).sum() / sel.sum()

  assert in_runs(selected) > in_runs(single) + 0.3  # measured about 0.6 vs 0.25


# --- RoBERTa's FULL-SENTENCES ------------------------------------------------------------------


def test_full_sentences_rows_pack_documents_in_order():
  docs = [[[7, 8, 9], [10, 11]], [[12, 13, 14, 15]], [[16] * 9], [[17, 18]]]
  rows = preprocess.full_sentences(docs, budget=8, separator=SEP)
  # A document that does not fit starts the next row (no separator at a row's start or end); a
  # long sentence is cut; a row crosses into the next document with one separator.
  assert [r['tokens'].tolist() for r in rows] == [
      [7, 8, 9, 10, 11], [12, 13, 14, 15], [16] * 8, [16, SEP, 17, 18]]
  assert [r['bounds'].tolist() for r in rows] == [[0, 3], [0], [0], [0, 2]]
  assert [int(r['doc']) for r in rows] == [0, 1, 2, 3]


def test_full_sentences_in_the_roberta_recipe(data_dir, paragraphs):
  """Rows of the byte-level BPE recipe: nearly full, crossing documents with </s> between two,
  each piece the text of one document."""
  c = _recipe('roberta', data_dir, max_examples=400)
  assert (c.data.mlm_inputs, c.data.mlm_pairs, c.data.tokenizer) == ('full_sentences', '', 'bpe')
  bundle = make_datasets(c)
  tok = bundle.tokenizer
  r = _rows(bundle, 10)
  assert 'pair_label' not in r
  lengths = r['segment_ids'].sum(1)
  assert lengths.max() <= c.data.seq_len and np.median(lengths) >= c.data.seq_len - 20
  crossing = 0
  for t, seg in zip(r['targets'], r['segment_ids']):
    t = t[seg > 0]
    assert t[0] == tok.cls_id and t[-1] == tok.sep_id
    inner = t[1:-1]
    parts = np.split(inner, np.flatnonzero(inner == tok.sep_id))
    crossing += len(parts) > 1
    for part in parts:
      text = re.sub(r'\s+', '', tok.decode(part[part != tok.sep_id]))
      assert text and _containing(paragraphs, text)  # each piece lies in one document
  assert crossing > 0.5 * len(lengths)  # rows cross document boundaries


# --- tokenizers -------------------------------------------------------------------------------


@pytest.mark.parametrize('kind,specials', [
    ('wordpiece', {'pad': '[PAD]', 'unk': '[UNK]', 'cls': '[CLS]', 'sep': '[SEP]',
                   'mask': '[MASK]'}),
    ('bpe', {'bos': '<s>', 'pad': '<pad>', 'eos': '</s>', 'unk': '<unk>', 'mask': '<mask>',
             'cls': '<s>', 'sep': '</s>'})])
def test_trained_tokenizer_has_its_specials_and_reloads_to_the_same_ids(data_dir, paragraphs,
                                                                         tmp_path, kind,
                                                                         specials):
  c = _recipe('roberta' if kind == 'bpe' else 'bert', data_dir, max_examples=400,
              tokenizer_vocab_size=1000)
  tok = make_datasets(c).tokenizer  # trained on the training split
  cached = os.path.join(sources.open_source(c.data).tokenizer_cache_dir,
                        f'{kind}_1000_text_first400')
  assert os.path.isfile(os.path.join(cached, tok_lib.TOKENIZER_JSON))  # beside the data
  vocab = json.loads(tok.files['tokenizer.json'])['model']['vocab']
  for name, piece in specials.items():
    assert getattr(tok, f'{name}_id') == vocab[piece]
  assert sorted(tok.special_ids) == list(range(len(set(specials.values()))))  # at the bottom
  assert tok.vocab_size == 1000
  text = ('It is a truth universally acknowledged, that a single man in possession of a good '
          'fortune, must be in want of a wife. Ünïcödé 🙂')
  ids = tok.encode(text)
  assert not set(ids) & (set(tok.special_ids) - {tok.unk_id})
  if kind == 'bpe':
    assert tok.decode(ids) == text  # byte-level: any text round-trips
  else:
    assert tok.decode(tok.encode('it is a truth universally acknowledged')) == (
        'it is a truth universally acknowledged')
  tok.save(str(tmp_path))
  again = tok_lib.load_tokenizer(str(tmp_path))
  assert again.encode(text) == ids and again.vocab_size == tok.vocab_size
  assert [getattr(again, f'{n}_id') for n in specials] == [getattr(tok, f'{n}_id')
                                                            for n in specials]
  assert again.special_ids == tok.special_ids


# --- presets ----------------------------------------------------------------------------------

# The papers' pre-training numbers: batch, peak lr, steps, warmup, sequence length, predictions.
PUBLISHED = {
    'bert': dict(batch_size=256, learning_rate=1e-4, num_steps=1_000_000, warmup_steps=10_000,
                 seq_len=128, max_predictions_per_seq=20, vocab_size=30522, tokenizer='wordpiece',
                 mlm_pairs='nsp', mlm_masking='static', mlm_max_ngram=1, optim='adamw'),
    'roberta': dict(batch_size=8192, learning_rate=6e-4, num_steps=500_000, warmup_steps=24_000,
                    seq_len=512, max_predictions_per_seq=0, vocab_size=50265, tokenizer='bpe',
                    mlm_pairs='', mlm_masking='dynamic', mlm_max_ngram=1, optim='adamw'),
    'albert': dict(batch_size=4096, learning_rate=0.00176, num_steps=125_000, warmup_steps=3125,
                   seq_len=512, max_predictions_per_seq=20, vocab_size=30000,
                   tokenizer='sentencepiece', mlm_pairs='sop', mlm_masking='static',
                   mlm_max_ngram=3, optim='lamb'),
}


@pytest.mark.parametrize('family', sorted(PRESETS))
def test_pretrain_has_the_published_numbers_and_validates(family):
  c = PRESETS[family].get_config('pretrain')
  want = PUBLISHED[family]
  got = dict(batch_size=c.batch_size, learning_rate=c.optim.learning_rate,
             num_steps=c.num_steps, warmup_steps=c.optim.warmup_steps, seq_len=c.data.seq_len,
             max_predictions_per_seq=c.data.max_predictions_per_seq,
             vocab_size=c.model.vocab_size, tokenizer=c.data.tokenizer, mlm_pairs=c.data.mlm_pairs,
             mlm_masking=c.data.mlm_masking, mlm_max_ngram=c.data.mlm_max_ngram,
             optim=c.optim.name)
  assert got == want
  assert tok_lib.trained_vocab_size(c.data) == want['vocab_size']
  train.validate_config(c, num_devices=1)
  out = subprocess.run([sys.executable, '-m', 'flaxformer_lab.summary',
                        f'--config={REPO}/configs/{family}.py:pretrain', '--json'],
                       capture_output=True, text=True, check=True, timeout=300)
  counts = json.loads(out.stdout)
  assert counts['body_params'] == {'bert': 109_482_240, 'roberta': 124_645_632,
                                   'albert': 11_683_584}[family]


@pytest.mark.parametrize('key,value,match', [
    ('mlm_masking', 'fixed', 'config.data.mlm_masking'),
    ('mlm_inputs', 'sentences', 'config.data.mlm_inputs'),
    ('max_predictions_per_seq', -1, 'config.data.max_predictions_per_seq'),
    ('max_predictions_per_seq', 200, 'config.data.max_predictions_per_seq'),
    ('mlm_dupe_factor', 0, 'config.data.mlm_dupe_factor'),
    ('mlm_max_ngram', 0, 'config.data.mlm_max_ngram'),
    ('tokenizer_vocab_size', 5000, 'config.data.tokenizer_vocab_size'),
    ('mlm_inputs', 'full_sentences', 'config.data.mlm_pairs')])
def test_bad_recipe_settings_are_one_line_config_errors(key, value, match):
  c = bert.get_config('pretrain_tiny')
  c.data[key] = value
  with pytest.raises(ConfigError, match=match) as e:
    train.validate_config(c, num_devices=1)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('family', ['bert', 'roberta', 'albert'])  # ~15-40 s each
def test_pretrain_tiny_loss_falls(family, data_dir, tmp_path):
  """25 steps of each CPU recipe: the training loss falls; the workdir's tokenizer is the one
  the data was made with (same ids)."""
  c = _recipe(family, data_dir, max_examples=1000)  # the tokenizer trains on 1000 documents
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 25, 5, 0, 25
  c.optim.warmup_steps, c.data.eval_batches, c.progress = 5, 1, 'off'
  train.train_and_evaluate(c, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  losses = [r['train/loss'] for r in rows if 'train/loss' in r]
  assert len(losses) == 5 and np.isfinite(losses).all()
  assert losses[-1] < losses[0] - 0.1, losses
  saved = rundir.RunDir(str(tmp_path)).load_tokenizer()
  text = 'She was the youngest of the two daughters of a most affectionate, indulgent father.'
  assert saved.encode(text) == make_datasets(c).tokenizer.encode(text)


def test_a_metrics_evaluation_can_change_the_data_recipe(data_dir, tmp_path):
  """`config.evals.<name>.data` scores on rows built with other config.data keys: FULL-SENTENCES
  rows without pairs give no pair metrics and another MLM loss; an override equal to the run's
  own setting reuses its pipeline (the same numbers as `eval`)."""
  c = _recipe('bert', data_dir, max_examples=400)
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 3, 1, 0, 3
  c.optim.warmup_steps, c.data.eval_batches, c.progress = 1, 2, 'off'
  with c.unlocked():
    c.evals.same = common.metrics_eval(c, prefix='same', data=dict(mlm_masking='static'))
    c.evals.shared = common.metrics_eval(c, prefix='shared', data=dict(
        mlm_inputs='full_sentences', mlm_pairs='', mlm_masking='static', mlm_dupe_factor=1))
  final = train.train_and_evaluate(c, str(tmp_path))
  assert c.data.mlm_pairs == 'nsp' and 'eval/pair_loss' in final
  for key in ('loss', 'mlm_loss', 'mlm_accuracy', 'pair_loss'):
    assert final[f'same/{key}'] == final[f'eval/{key}'], key
  assert 'shared/pair_loss' not in final and np.isfinite(final['shared/mlm_loss'])
  assert final['shared/mlm_loss'] != final['eval/mlm_loss']


@pytest.mark.parametrize('data, match', [
    (dict(nosuch=1), 'config.evals.x.data has unknown key(s) nosuch'),
    (dict(mlm_pairs='nsp', mlm_inputs='full_sentences'), "config.evals.x.data: config.data.mlm_inputs='full_sentences' has no sentence pairs"),
    (dict(mlm_masking='sometimes'), "config.evals.x.data: config.data.mlm_masking must be"),
    (dict(mlm_dupe_factor='ten'), 'config.evals.x.data.mlm_dupe_factor'),
])
def test_bad_evaluation_data_overrides_are_one_line_config_errors(data, match):
  c = bert.get_config('pretrain_tiny')
  with c.unlocked():
    c.evals.x = common.metrics_eval(c, prefix='x', data=data)
  with pytest.raises(ConfigError) as e:
    train.validate_config(c, num_devices=1)
  assert match in str(e.value) and '\n' not in str(e.value), str(e.value)
