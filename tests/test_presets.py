"""Tests of the family presets in configs/ and of flaxformer_lab.summary.

The full-size presets are only traced (`jax.eval_shape`), never allocated: their body parameter
counts must equal those of the matching Hugging Face base model classes built from the standard
configurations (BertModel, RobertaModel, ..., MarianModel). Every tiny variant runs a forward pass.
"""

import importlib
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lab.presets import common
from flaxformer_lab import optim
from flaxformer_lab import summary
from flaxformer_lab.models.config import ModelConfig
from flaxformer_lab.models.transformer import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# num_parameters() of the Hugging Face base model class built from the standard configuration
# (transformers 5.x; MarianModel's count includes its two frozen 512 x 512 sinusoidal tables).
REFERENCE_BODY_PARAMS = {
    ('bert', 'base'): 109_482_240,  # BertModel
    ('bert', 'large'): 335_141_888,
    ('roberta', 'base'): 124_645_632,  # RobertaModel
    ('roberta', 'large'): 355_359_744,
    ('albert', 'base'): 11_683_584,  # AlbertModel
    ('albert', 'large'): 17_683_968,
    ('albert', 'xxlarge'): 222_595_584,
    ('distilbert', 'base'): 66_362_880,  # DistilBertModel
    ('gpt2', 'small'): 124_439_808,  # GPT2Model
    ('gpt2', 'medium'): 354_823_168,
    ('xlmr', 'base'): 278_043_648,  # XLMRobertaModel
    ('t5', 'small'): 60_506_624,  # T5Model
    ('t5', 'base'): 222_903_552,
    ('bart', 'base'): 139_420_416,  # BartModel
    ('marian', 'base'): 74_410_496,  # MarianModel (Helsinki-NLP/opus-mt-en-de)
}

# Every variant of every family file.
VARIANTS = {
    'transformer': ('base', 'big', 'tiny'),
    'bert': ('base', 'large', 'tiny'),
    'roberta': ('base', 'large', 'tiny'),
    'albert': ('base', 'large', 'xxlarge', 'tiny'),
    'distilbert': ('base', 'tiny'),
    'xlmr': ('base', 'tiny'),
    'gpt2': ('small', 'medium', 'tiny'),
    't5': ('small', 'base', 'tiny'),
    'bart': ('base', 'tiny'),
    'marian': ('base', 'en_de', 'tiny'),
}
# Families whose files also take `task=classification`.
CLASSIFIERS = ('bert', 'roberta', 'albert', 'distilbert', 'xlmr')
ALL_VARIANTS = [(f, v) for f, vs in VARIANTS.items() for v in vs]
# Model fields a tiny variant may change; every other switch must be the family's.
SIZE_FIELDS = {'vocab_size', 'd_model', 'num_layers', 'num_decoder_layers', 'num_heads',
               'head_dim', 'mlp_dim', 'max_len', 'emb_dim', 'pad_id', 'dropout_rate'}
TASKS = ('lm', 'seq2seq', 'classification', 'mlm')
DATASETS = ('tiny_shakespeare', 'multi30k', 'sst2', 'ag_news', 'austen')


def get_config(family, arg=None):
  return importlib.import_module(f'flaxformer_lab.presets.{family}').get_config(arg)


@pytest.mark.parametrize('family,variant', sorted(REFERENCE_BODY_PARAMS))
def test_body_params_match_hugging_face(family, variant):
  counts = summary.count_params(get_config(family, variant))
  assert counts['body_params'] == REFERENCE_BODY_PARAMS[family, variant]
  assert counts['total_params'] == counts['body_params'] + counts['head_params']


@pytest.mark.parametrize('family,variant', ALL_VARIANTS)
def test_every_variant_builds_and_validates(family, variant):
  c = get_config(family, variant)
  cfg = ModelConfig.from_dict(c.model)  # validates
  assert c.task in TASKS and c.data.name in DATASETS
  optim.make_optimizer(c.optim, c.num_steps)  # known optimizer and schedule
  # A pair head (NSP / SOP) gets labelled segment pairs from the data, and only then.
  assert (cfg.head == 'mlm_nsp') == (c.data.get('mlm_pairs', '') in ('nsp', 'sop'))
  assert c.model.keys() == common.model_config().keys()  # nothing added or lost
  if cfg.position == 'learned':  # the data fits the position table
    assert max(c.data.seq_len, c.data.target_len) + cfg.position_offset <= cfg.max_len
  if variant == 'tiny':
    assert c.data.tokenizer == 'byte' and cfg.vocab_size >= 256 + 4
  counts = summary.count_params(c)
  assert counts['learned_params'] > 0
  assert counts['body_params'] == counts['body_learned_params'] + counts['fixed_position_params']


@pytest.mark.parametrize('family', CLASSIFIERS)
def test_classification_task_variants(family):
  for variant in ('base', 'tiny'):
    c = get_config(family, f'{variant},task=classification')
    cfg = ModelConfig.from_dict(c.model)
    assert (c.task, c.data.name, cfg.head) == ('classification', 'sst2', 'classification')
  with pytest.raises(ValueError, match='task'):
    get_config(family, 'tiny,task=lm')
  # AG News carries its own evaluation split (it has no validation split) and four labels.
  c = get_config(family, 'tiny,task=classification,data=ag_news')
  assert (c.data.name, c.data.eval_split, c.model.num_labels) == ('ag_news', 'test', 4)
  with pytest.raises(ValueError, match='ag_news'):
    get_config(family, 'tiny,task=classification,data=imdb')


def test_ag_news_preset_reads_its_splits_and_four_labels(tmp_path, monkeypatch):
  """The AG News config needs no override: its evaluation split exists and its labels fit."""
  monkeypatch.setenv('FLAXFORMER_TFDS_DIR', str(tmp_path / 'tfds'))
  from flaxformer_lab import data as data_lib  # pylint: disable=g-import-not-at-top
  c = get_config('bert', 'tiny,task=classification,data=ag_news')
  c.data.data_dir = str(tmp_path / 'tfds')
  c.batch_size, c.data.eval_batches = 64, 4
  bundle = data_lib.make_datasets(c)
  assert bundle.num_classes == c.model.num_labels == 4
  labels = np.concatenate([b['label'][b['weights'] > 0] for b in bundle.eval_batches()])
  assert set(np.unique(labels)) == {0, 1, 2, 3}


@pytest.mark.parametrize('family', sorted(VARIANTS))
def test_tiny_keeps_family_switches(family):
  full = get_config(family).model.to_dict()
  tiny = get_config(family, 'tiny').model.to_dict()
  changed = {k for k in full if full[k] != tiny[k]}
  assert changed <= SIZE_FIELDS, changed - SIZE_FIELDS


def test_unknown_variant_names_the_choices():
  with pytest.raises(ValueError, match='choose from base, large, tiny'):
    get_config('bert', 'huge')


def _inputs(cfg, batch=2, length=12):
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(4, cfg.vocab_size, (batch, length)), jnp.int32)
  segments = np.ones((batch, length), np.int32)
  segments[1, length - 3:] = 0  # padding at the end of the second row
  kw = dict(input_ids=ids, segment_ids=jnp.asarray(segments))
  if cfg.type_vocab_size > 1:
    half = length // 2
    kw['token_type_ids'] = jnp.asarray(np.repeat([[0] * half + [1] * (length - half)], batch, 0),
                                       jnp.int32)
  if cfg.family == 'encoder_decoder':
    kw['decoder_input_ids'] = jnp.asarray(rng.integers(4, cfg.vocab_size, (batch, length - 2)),
                                          jnp.int32)
  return kw


@pytest.mark.parametrize('family,arg', [(f, 'tiny') for f in VARIANTS] +
                         [(f, 'tiny,task=classification') for f in ('bert', 'roberta')])
def test_tiny_forward_is_finite(family, arg):
  cfg = ModelConfig.from_dict(get_config(family, arg).model)
  kw = _inputs(cfg)
  model = build_model(cfg, deterministic=False)  # dropout on: the training path

  def init_and_apply(kw):
    variables = model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, **kw)
    return variables, model.apply(variables, **kw, rngs={'dropout': jax.random.key(2)})

  # One program, compiled without XLA's backend optimizations: about 4x faster to compile on CPU
  # than the default (and far faster than running linen op by op); results are the same.
  compiled = jax.jit(init_and_apply).lower(kw).compile(
      compiler_options={'xla_backend_optimization_level': 0})
  variables, out = compiled(kw)
  logits = np.asarray(out['logits'])
  assert np.isfinite(logits).all()
  b = kw['input_ids'].shape[0]
  if cfg.head == 'classification':
    assert logits.shape == (b, cfg.num_labels)
  else:
    length = kw.get('decoder_input_ids', kw['input_ids']).shape[1]
    assert logits.shape == (b, length, cfg.vocab_size)
  if cfg.head == 'mlm_nsp':  # BERT's NSP / ALBERT's SOP
    assert out['pair_logits'].shape == (b, 2) and np.isfinite(np.asarray(out['pair_logits'])).all()
  # The table and the counts agree with the allocated parameters.
  allocated = sum(x.size for x in jax.tree.leaves(variables['params']))
  assert summary.count_params(cfg)['learned_params'] == allocated


def test_fixed_sinusoidal_tables_are_reported():
  marian = summary.count_params(get_config('marian', 'base'))
  assert marian['fixed_position_params'] == 2 * 512 * 512
  assert marian['body_learned_params'] == REFERENCE_BODY_PARAMS['marian', 'base'] - 2 * 512 * 512
  for variant, learned in (('base', 63_045_632), ('big', 214_171_648)):
    c = get_config('transformer', variant)
    counts = summary.count_params(c)
    assert counts['body_learned_params'] == learned  # the paper-style count
    assert counts['fixed_position_params'] == 2 * c.model.max_len * c.model.d_model
    assert counts['head_params'] == 0  # tied pre-softmax projection


def test_count_params_accepts_every_config_form():
  c = get_config('gpt2', 'tiny')
  a = summary.count_params(c)
  assert a == summary.count_params(c.model)
  assert a == summary.count_params(ModelConfig.from_dict(c.model))
  assert set(a) >= {'body_params', 'total_params', 'modules'}
  assert sum(a['modules'].values()) == a['learned_params']


def test_table_has_groups_subtotals_and_totals():
  text = summary.format_table(get_config('bert', 'tiny'))
  for needle in ('tokens/embedding', 'subtotal encoder (body)', 'subtotal mlm_head (head)',
                 'subtotal pooler (body)', 'body (as the Hugging Face base model counts it)',
                 'total (body + head)'):
    assert needle in text
  # Groups follow the data flow: embeddings before the stack before the head.
  assert text.index('subtotal tokens') < text.index('subtotal encoder (body)') < text.index(
      'subtotal mlm_head')


def test_summary_cli_json_is_fast_and_parseable():
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  start = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, '-m', 'flaxformer_lab.summary', '--config=configs/bert.py:large', '--json'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
  elapsed = time.perf_counter() - start
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout)  # exactly one JSON object on stdout
  assert result['body_params'] == REFERENCE_BODY_PARAMS['bert', 'large']
  assert result['total_params'] > result['body_params']
  assert elapsed < 60, f'summary took {elapsed:.1f}s'  # about 1-3 s measured; headroom for CI


def test_summary_cli_bad_override_is_one_line():
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run(
      [sys.executable, '-m', 'flaxformer_lab.summary', '--config=configs/gpt2.py:tiny',
       '--config.model.no_such_field=1'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2
  assert 'no_such_field' in proc.stderr and 'Traceback' not in proc.stderr
