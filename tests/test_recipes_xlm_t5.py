"""The XLM, XLM-R and T5 pre-training recipes: T5's span corruption, XLM's translation LM with its
alternating steps, XLM-R's language sampling, the English-Spanish Bible, and their presets.

Statistics are checked on large samples against the papers' formulas; each :pretrain_tiny recipe
trains a few steps and its loss must fall; each :pretrain preset validates and summarizes.
"""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flaxformer_lab import metrics as metrics_lib
from flaxformer_lab import train
from flaxformer_lab.data import builders
from flaxformer_lab.data import pipeline
from flaxformer_lab.data import sources
from flaxformer_lab.data import tokenizers as tok_lib
from flaxformer_lab.models.config import ConfigError
from flaxformer_lab.models.config import ModelConfig
from flaxformer_lab.presets import common
from flaxformer_lab.presets import t5 as t5_preset
from flaxformer_lab.presets import xlm as xlm_preset
from flaxformer_lab.presets import xlmr as xlmr_preset
from flaxformer_lab.tasks import base as tasks_base
from flaxformer_lab.tasks import span_corruption as sc
from flaxformer_lab.tasks import xlm as xlm_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = common.default_data_dir()
PRESETS = {'xlm': xlm_preset, 'xlmr': xlmr_preset, 't5': t5_preset}
needs_data = pytest.mark.skipif(not SHARED, reason='needs ../shared/data')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _config(family, data_dir, variant='pretrain_tiny', **data):
  c = PRESETS[family].get_config(variant)
  c.data.data_dir = data_dir
  c.data.update(data)
  return c


# --- T5 span corruption ----------------------------------------------------------------------------


def _runs(mask):
  """Lengths of the runs of True in a boolean array."""
  edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
  return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


def test_t5_lengths_are_the_papers():
  # T5: 568 raw tokens corrupt to 512 inputs and 114 targets (EOS included).
  assert sc.t5_lengths(512, 0.15, 3.0) == (568, 114)
  raw, targets = sc.t5_lengths(128, 0.15, 3.0)
  noise, spans = round(raw * 0.15), round(round(raw * 0.15) / 3)
  assert raw - noise + spans + 1 == 128 and targets == noise + spans + 1


def test_noise_density_and_span_length_on_a_large_sample():
  rng = np.random.default_rng(0)
  noise = spans = total = 0
  for _ in range(2000):
    length = int(rng.integers(100, 600))
    mask = sc.random_spans_noise_mask(length, 0.15, 3.0, rng)
    assert len(mask) == length and not mask[0]  # non-noise first
    runs = _runs(mask)
    assert len(_runs(~mask)) == len(runs) and (runs > 0).all()  # spans alternate
    noise += mask.sum()
    spans += len(runs)
    total += length
  assert abs(noise / total - 0.15) < 0.015  # within 10% of the density
  assert abs(noise / spans - 3.0) < 0.3  # within 10% of the mean span length
  # The span lengths are a uniformly random partition: every length of 1..num_noise occurs.
  lengths = np.concatenate([_runs(sc.random_spans_noise_mask(568, 0.15, 3.0, rng))
                            for _ in range(200)])
  assert lengths.min() == 1 and lengths.max() > 6


def test_sentinels_count_down_and_the_text_reconstructs():
  rng = np.random.default_rng(1)
  vocab = 512
  for _ in range(500):
    length = int(rng.integers(2, 300))
    tokens = rng.integers(7, 263, size=length).astype(np.int32)
    inputs, targets = sc.corrupt(tokens, rng, noise_density=0.15, mean_span=3.0, vocab_size=vocab)
    sent_in = inputs[inputs >= 263]
    sent_out = targets[targets >= 263]
    np.testing.assert_array_equal(sent_in, vocab - 1 - np.arange(len(sent_in)))
    np.testing.assert_array_equal(sent_out, sent_in)  # the same sentinels, in the same order
    assert targets[0] == vocab - 1  # targets start with the first sentinel
    # Brute force: what the inputs keep plus what the targets hold is every token, once.
    assert len(inputs) - len(sent_in) + len(targets) - len(sent_out) == length
    np.testing.assert_array_equal(sc.reconstruct(inputs, targets, vocab, vocab - 263), tokens)


@needs_data
def test_span_corruption_batches_reconstruct_austen(data_dir):
  c = _config('t5', data_dir, max_examples=300)
  train.validate_config(c)
  bundle = pipeline.make_datasets(c)
  tok = bundle.tokenizer
  assert (bundle.seq_len, bundle.target_len) == (128, 29)
  text = ' '.join(ex['text'] for ex in sources.open_source(c.data).split('train'))
  batch = next(bundle.train_iter)
  checked = 0
  for row in range(batch['encoder_inputs'].shape[0]):
    enc_seg, dec_seg = batch['encoder_segment_ids'][row], batch['decoder_segment_ids'][row]
    for s in range(1, enc_seg.max() + 1):
      inputs = batch['encoder_inputs'][row][enc_seg == s]
      targets = batch['decoder_targets'][row][dec_seg == s]
      assert inputs[-1] == tok.eos_id and targets[-1] == tok.eos_id
      assert batch['decoder_inputs'][row][dec_seg == s][0] == tok.bos_id
      piece = sc.reconstruct(inputs[:-1], targets[:-1], c.model.vocab_size,
                             c.model.vocab_size - tok.vocab_size)
      assert tok.decode(piece) in text  # a piece of a paragraph, whole again
      checked += 1
  assert checked >= 16


def test_t5_init_scheme_scales_by_fan_in():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from flaxformer_lab.models.transformer import build_model, dummy_inputs  # pylint: disable=g-import-not-at-top
  for scheme in ('t5', 'normal'):
    c = t5_preset.get_config('tiny')
    c.model.init_scheme = scheme
    cfg = ModelConfig.from_dict(c.model)
    d, f, h, k = cfg.d_model, cfg.hidden_dim, cfg.num_heads, cfg.head_width
    params = nn.meta.unbox(jax.jit(build_model(cfg).init)(jax.random.key(0),
                                                          **dummy_inputs(cfg, 1, 8)))
    flat = traverse_util.flatten_dict(params['params'], sep='/')
    t5_std = {'tokens/embedding': 1.0, 'encoder/layers/self_attention/query_kernel': (d * k) ** -0.5,
              'encoder/layers/self_attention/key_kernel': d ** -0.5,
              'encoder/layers/self_attention/value_kernel': d ** -0.5,
              'encoder/layers/self_attention/out_kernel': (h * k) ** -0.5,
              'decoder/layers/cross_attention/query_kernel': (d * k) ** -0.5,
              'encoder/layers/mlp/wi/kernel': d ** -0.5, 'decoder/layers/mlp/wo/kernel': f ** -0.5,
              'encoder_relative_bias/embedding': d ** -0.5}
    for name, std in t5_std.items():
      want = std if scheme == 't5' else 0.02
      assert abs(np.std(flat[name]) / want - 1) < 0.15, (scheme, name, np.std(flat[name]), want)


# --- XLM: translation LM, alternating steps -------------------------------------------------------


class _Ctx:
  def __init__(self, c):
    self.tokenizer, self.data_config, self.seq_len = tok_lib.ByteTokenizer(), c.data, c.data.seq_len


def test_tlm_positions_restart_and_languages_follow_each_side():
  c = xlm_preset.get_config('pretrain_tiny')
  objective = tasks_base.get_objective(c)
  ctx = _Ctx(c)
  rng = np.random.default_rng(0)
  for _ in range(200):
    en = ''.join(rng.choice(list('abc de'), size=int(rng.integers(0, 90))))
    de = ''.join(rng.choice(list('xyz uv'), size=int(rng.integers(0, 90))))
    (row,) = objective.tokenize(ctx, 0, {'langs': ('en', 'de'), 'texts': (en, de)})
    n_en = min(len(en), c.data.seq_len // 2 - 2) + 2
    n_de = min(len(de), c.data.seq_len // 2 - 2) + 2
    np.testing.assert_array_equal(row['token_positions'],
                                  np.r_[np.arange(n_en), np.arange(n_de)])
    np.testing.assert_array_equal(row['language_ids'], np.r_[[1] * n_en, [0] * n_de])  # de 0, en 1
    eos = ctx.tokenizer.eos_id
    assert [row['inputs'][i] for i in (0, n_en - 1, n_en, n_en + n_de - 1)] == [eos] * 4
    masked = objective.random_transform(ctx, None)(row, rng)
    np.testing.assert_array_equal(masked['targets'], row['inputs'])
    sides = masked['weights'][:n_en].sum(), masked['weights'][n_en:].sum()
    assert masked['weights'][[0, n_en - 1, n_en, n_en + n_de - 1]].sum() == 0  # never eos
    if min(len(en), len(de)) > 40:
      assert min(sides) > 0  # both sides are masked
  with pytest.raises(ConfigError, match='mlm_steps'):
    xlm_task.parse_steps('en,en-de-fr')


@needs_data
@pytest.mark.parametrize('data', ['multi30k', 'bible_en_es'])
def test_xlm_batches_cycle_through_the_steps(data, data_dir):
  c = xlm_preset.get_config(f'pretrain_tiny,data={data}')
  c.data.update(data_dir=data_dir, max_examples=400)
  train.validate_config(c)
  ids = {lang: i for i, lang in enumerate(xlm_task.languages(c.data))}
  first, second = c.data.mlm_steps.split(',')[:2]
  bundle = pipeline.make_datasets(c)
  kinds = []
  for _ in range(6):
    b = next(bundle.train_iter)
    real = b['segment_ids'] > 0
    kinds.append(tuple(np.unique(b['language_ids'][real])))
    for row in range(b['inputs'].shape[0]):
      for s in range(1, b['segment_ids'][row].max() + 1):
        seg = b['segment_ids'][row] == s
        pos, langs = b['positions'][row][seg], b['language_ids'][row][seg]
        starts = np.flatnonzero(pos == 0)
        changes = np.flatnonzero(np.diff(langs)) + 1
        np.testing.assert_array_equal(starts[1:], changes)  # positions restart where it changes
        assert len(starts) == (2 if len(kinds[-1]) == 2 else 1)
  # en, de (or es), en-de, in a fixed cycle, every batch homogeneous.
  assert kinds == [(ids[first],), (ids[second],), (0, 1)] * 2
  assert ids == ({'de': 0, 'en': 1} if data == 'multi30k' else {'en': 0, 'es': 1})  # lang2id
  assert (b['weights'] * (b['inputs'] != b['targets'])).sum() > 0  # masked


@needs_data
def test_xlm_stream_resumes_exactly(data_dir):
  c = _config('xlm', data_dir, max_examples=400)
  first = pipeline.make_datasets(c)
  for _ in range(4):  # mid-cycle
    next(first.train_iter)
  state = json.loads(json.dumps(first.train_iter.get_state()))
  expected = [next(first.train_iter) for _ in range(4)]
  restored = pipeline.make_datasets(c)
  restored.train_iter.set_state(state)
  for want in expected:
    got = next(restored.train_iter)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


@needs_data
def test_language_embeddings_need_language_ids(data_dir):
  c = _config('xlmr', data_dir)
  c.model.num_languages = 2
  with pytest.raises(ConfigError, match='model.num_languages=2'):
    train.validate_config(c)
  x = _config('xlm', data_dir)
  x.model.num_languages = 1
  with pytest.raises(ConfigError, match='model.num_languages=1'):
    train.validate_config(x)
  x.model.num_languages, x.data.mlm_steps = 2, 'en,fr'
  with pytest.raises(ConfigError, match='mlm_steps'):
    train.validate_config(x)


@needs_data
def test_span_corruption_config_errors(data_dir):
  c = _config('t5', data_dir)
  c.data.target_len = 20
  with pytest.raises(ConfigError, match='config.data.target_len=20'):
    train.validate_config(c)
  c.data.target_len, c.data.noise_density = 0, 1.5
  with pytest.raises(ConfigError, match='config.data.noise_density'):
    train.validate_config(c)
  # A 141-token piece has 7 noise spans; 268 leaves 5 ids above the byte tokenizer's 263.
  c.data.noise_density, c.model.vocab_size = 0.15, 268

  class Bundle:
    tokenizer = tok_lib.ByteTokenizer()

  with pytest.raises(ConfigError, match='config.model.vocab_size=268'):
    tasks_base.get_objective(c).check_bundle(c, Bundle())
  r = _config('xlmr', data_dir)
  r.data.language_alpha = 0.0
  with pytest.raises(ConfigError, match='language_alpha'):
    train.validate_config(r)


# --- XLM-R: multilingual data and language sampling ------------------------------------------------


def _lines(path):
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    return f.read().rstrip('\n').split('\n')


@needs_data
def test_bible_builder_counts_and_alignment(data_dir):
  b = builders.prepare('bible_en_es', data_dir=data_dir, manual_dir=SHARED)
  counts = {'train': 30281, 'validation': 85, 'test': 678}
  for split, stem in (('train', 'train'), ('validation', 'val'), ('test', 'test')):
    ds = b.as_data_source(split)
    assert len(ds) == counts[split]
    raw = {lang: _lines(os.path.join(SHARED, f'bible_en_es/{stem}.{lang}.gz')) for lang in ('en', 'es')}
    pairs = set(zip(raw['en'], raw['es']))
    for i in range(0, len(ds), max(1, len(ds) // 50)):
      assert (ds[i]['en'].decode(), ds[i]['es'].decode()) in pairs
  with pytest.raises(builders.DataError, match='no public download'):
    builders.prepare('bible_en_es', data_dir=data_dir + '_empty', manual_dir='')


@needs_data
def test_language_sampling_follows_the_formula(data_dir):
  d = _config('xlmr', data_dir).data
  source = sources.open_source(d)
  split = source.split('train')
  columns = sources.multilingual_columns(d)
  n = {}
  for name, lang in columns:  # the examples of each language, counted from the builders
    n[lang] = n.get(lang, 0) + len(builders.prepare(name, data_dir=data_dir,
                                                    manual_dir=SHARED).as_data_source('train'))
  assert split.languages == ('en', 'de', 'fr', 'es') and list(split.counts) == list(n.values())
  total = sum(n.values())
  expected = [(n[lang] / total) ** 0.3 for lang in split.languages]
  expected = [e / sum(expected) for e in expected]
  np.testing.assert_allclose(split.probabilities, expected, rtol=1e-12)
  p = np.asarray(list(n.values())) / total
  assert split.probabilities[0] < p[0] and split.probabilities[1] > p[1]  # flatter than p
  np.testing.assert_allclose(sources.sampling_probabilities(list(n.values()), 1.0), p)
  draws = 40_000
  langs = np.asarray([split.language_of(k) for k in range(draws)])
  freq = np.bincount(langs, minlength=4) / draws
  sigma = np.sqrt(np.asarray(expected) * (1 - np.asarray(expected)) / draws)
  assert (np.abs(freq - expected) < 4.5 * sigma).all(), (freq, expected)
  assert {split[k]['lang'] for k in range(50)} == set(split.languages)  # the examples follow
  # The tokenizer trains on one epoch's worth of draws of the endless split.
  assert sum(1 for _ in source.texts('train', ('text',))()) == split.epoch_size == total
  with pytest.raises(ValueError, match='corpora'):
    sources.multilingual_columns(common.data_config(name='multilingual', corpora='multi30k.es'))


# --- the recipes -----------------------------------------------------------------------------------


def _train_losses(c, workdir, steps):
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = steps, 5, 0, steps
  c.progress = 'off'
  c.data.eval_batches = 1
  train.train_and_evaluate(c, workdir)
  return [r['train/loss'] for r in metrics_lib.read_metrics(workdir) if 'train/loss' in r]


@needs_data
@pytest.mark.parametrize('family,steps,drop', [
    ('xlm', 30, 0.5),  # about 25 s on 2 shared cores
    ('t5', 30, 0.5),  # about 40 s
    ('xlmr', 30, 0.5),  # about 45 s (trains SentencePiece)
])
def test_pretrain_tiny_loss_falls(family, steps, drop, data_dir, tmp_path):
  c = _config(family, data_dir, max_examples=2000)
  losses = _train_losses(c, str(tmp_path / family), steps)
  assert len(losses) == steps // 5 and np.isfinite(losses).all()
  assert losses[-1] < losses[0] - drop, losses


@pytest.mark.parametrize('family,variant,body', [
    ('xlm', 'pretrain', 142_357_504),  # XLMModel(xlm-mlm-ende-1024)
    ('xlm', 'xnli15', 248_976_384),  # XLMModel(xlm-mlm-tlm-xnli15-1024)
    ('xlmr', 'pretrain', 278_043_648),  # XLMRobertaModel(xlm-roberta-base)
    ('t5', 'pretrain', 222_903_552),  # T5Model(t5-base)
])
def test_pretrain_presets_validate_and_summarize(family, variant, body):
  c = PRESETS[family].get_config(variant)
  if SHARED:
    train.validate_config(c)
  else:
    tasks_base.get_objective(c).validate(c, ModelConfig.from_dict(c.model))
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run(
      [sys.executable, '-m', 'flaxformer_lab.summary', f'--config=configs/{family}.py:{variant}',
       '--json'], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout)['body_params'] == body
