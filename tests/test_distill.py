"""Distillation (tasks/distill.py): the frozen teacher, the student's initialization, the loss
against a numpy reference, checkpoints without the teacher, and resuming with another teacher."""

from __future__ import annotations

import os
import shutil

from flax import traverse_util
import jax
import numpy as np
import pytest

from flaxformer_lab import checkpoint as ckpt_lib
from flaxformer_lab import rundir
from flaxformer_lab import sharding as shard_lib
from flaxformer_lab import train
from flaxformer_lab.models.config import ConfigError
from flaxformer_lab.presets import distilbert
from flaxformer_lab.tasks import get_objective
from flaxformer_lab.tasks.distill import init_student_from_teacher

SMALL = dict(d_model=32, num_heads=2, mlp_dim=64, dropout_rate=0.0, attention_dropout_rate=0.0)


def _small(config, **model):
  config.model.update(**SMALL, **model)
  config.data.seq_len, config.batch_size, config.data.eval_batches = 32, 8, 1
  config.log_every, config.eval_every, config.checkpoint_every = 2, 0, 4
  config.progress, config.optim.warmup_steps = 'off', 0
  return config


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  os.environ['FLAXFORMER_TFDS_DIR'] = path
  return path


def _teacher(workdir, seed):
  c = _small(distilbert.get_config('teacher_tiny'))
  c.num_steps, c.seed = 6, seed
  train.train_and_evaluate(c, str(workdir))
  return str(workdir)


@pytest.fixture(scope='module')
def teachers(tmp_path_factory, tfds_dir):
  root = tmp_path_factory.mktemp('teachers')
  return _teacher(root / 'a', 0), _teacher(root / 'b', 1)


def _student(teacher, **distill):
  c = _small(distilbert.get_config('distill_tiny'))
  c.distill.update(teacher=teacher, **distill)
  return c


def test_teacher_is_frozen_and_never_checkpointed(teachers, tmp_path):
  c = _student(teachers[0])
  c.num_steps = 3
  setup = train.build_setup(c)
  frozen = train.place_frozen(setup)
  state = train.create_state(c, setup)
  step = train.make_train_step(c, setup)
  from flaxformer_lab import data as data_lib  # pylint: disable=g-import-not-at-top
  data = data_lib.make_datasets(c)
  sh = shard_lib.batch_sharding(setup.mesh)
  with shard_lib.use_mesh(setup.mesh, setup.rules):
    for _ in range(3):
      state, metrics = step(state, shard_lib.make_global_batch(next(data.train_iter), sh), frozen)
  assert np.isfinite(float(metrics['loss']))
  host = traverse_util.flatten_dict(setup.frozen_models['teacher'].params, sep='/')
  after = traverse_util.flatten_dict(jax.device_get(frozen['teacher']), sep='/')
  assert host.keys() == after.keys()
  for k in host:
    assert np.array_equal(host[k], after[k]), k  # bit-identical, and not donated
  # The optimizer state mirrors the student only: its parameter-shaped leaves are the student's.
  student_shapes = sorted(np.shape(x) for x in jax.tree.leaves(state['params']))
  opt_shapes = sorted(np.shape(x) for x in jax.tree.leaves(state['opt_state']) if np.ndim(x))
  assert opt_shapes == sorted(student_shapes * 2)  # Adam's two moments
  # A training run's checkpoint holds the student's state and records the teacher.
  final = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert {'train/kl_loss', 'train/mlm_loss', 'train/cos_loss'} <= set(final)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'run'), every=0, async_save=False)
  try:
    ckpt.check_compatible(3, setup.abstract_state)  # exactly the student's tree
    meta = ckpt.stored_meta(3)
  finally:
    ckpt.close()
  assert meta['frozen']['teacher']['source'] == teachers[0]
  teacher_leaves = sum(np.size(x) for x in jax.tree.leaves(setup.frozen_models['teacher'].params))
  stored = rundir.RunDir(str(tmp_path / 'run')).restore_params()
  assert sum(np.size(x) for x in jax.tree.leaves(stored)) < teacher_leaves  # 2 of 4 layers


def test_resume_with_another_teacher_is_refused(teachers, tmp_path):
  c = _student(teachers[0])
  c.num_steps, c.stop_at_step = 4, 2
  train.train_and_evaluate(c, str(tmp_path / 'run'))
  before = sorted(os.listdir(tmp_path / 'run' / 'checkpoints'))
  config_json = (tmp_path / 'run' / 'config.json').read_text()
  other = _student(teachers[1])
  other.num_steps = 4
  with pytest.raises(ConfigError, match='trained with teacher'):
    train.train_and_evaluate(other, str(tmp_path / 'run'))
  assert sorted(os.listdir(tmp_path / 'run' / 'checkpoints')) == before
  assert (tmp_path / 'run' / 'config.json').read_text() == config_json
  # The same teacher copied elsewhere has the same fingerprint but another source: also refused.
  shutil.copytree(teachers[0], tmp_path / 'copy')
  moved = _student(str(tmp_path / 'copy'))
  moved.num_steps = 4
  with pytest.raises(ConfigError, match='trained with teacher'):
    train.train_and_evaluate(moved, str(tmp_path / 'run'))
  c.stop_at_step = 0
  train.train_and_evaluate(c, str(tmp_path / 'run'))  # the right teacher resumes


def test_student_from_all_teacher_layers_matches_the_teacher(teachers):
  c = _student(teachers[0], teacher_layers=(0, 1, 2, 3))
  c.model.num_layers = 4
  setup = train.build_setup(c)
  frozen = train.place_frozen(setup)
  state = train.create_state(c, setup)
  params = setup.objective.initialize(c, lambda: jax.device_get(state['params']),
                                      setup.frozen_models)
  from flaxformer_lab import data as data_lib  # pylint: disable=g-import-not-at-top
  batch = next(data_lib.make_datasets(c).train_iter)
  sums = jax.jit(setup.objective.make_eval(setup.models, frozen, c))(params, batch)
  assert float(sums['kl_sum']) / float(sums['kl_count']) == pytest.approx(0.0, abs=1e-6)
  assert float(sums['cos_sum']) / float(sums['cos_count']) == pytest.approx(0.0, abs=1e-6)
  # A student initialized from scratch does differ (the test can fail).
  sums = jax.jit(setup.objective.make_eval(setup.models, frozen, c))(state['params'], batch)
  assert float(sums['kl_sum']) / float(sums['kl_count']) > 1e-3


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize('restrict', [False, True])
def test_loss_equals_a_numpy_reference(restrict):
  rng = np.random.default_rng(0)
  B, L, V, D, T = 2, 5, 7, 4, 2.0
  s_logits, t_logits = rng.normal(size=(B, L, V)) * 2, rng.normal(size=(B, L, V)) * 2
  s_h, t_h = rng.normal(size=(B, L, D)), rng.normal(size=(B, L, D))
  segment = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
  weights = np.array([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]], np.float32)
  targets = rng.integers(0, V, size=(B, L))
  config = distilbert.get_config('distill_tiny')
  config.distill.restrict_ce_to_mask = restrict
  obj = get_objective(config)
  sums = obj.terms({'logits': s_logits, 'hidden': s_h}, {'logits': t_logits, 'hidden': t_h},
                   {'segment_ids': segment, 'weights': weights, 'targets': targets}, config)
  # numpy, written from the formulas of the module docstring
  ps, pt = _np_log_softmax(s_logits / T), _np_log_softmax(t_logits / T)
  kl = (np.exp(pt) * (pt - ps)).sum(-1) * T * T
  kl_w = weights if restrict else (segment > 0)
  kl_ref = (kl * kl_w).sum() / kl_w.sum()
  nll = -np.take_along_axis(_np_log_softmax(s_logits), targets[..., None], -1)[..., 0]
  mlm_ref = (nll * weights).sum() / weights.sum()
  cos = (s_h * t_h).sum(-1) / (np.linalg.norm(s_h, axis=-1) * np.linalg.norm(t_h, axis=-1))
  cos_ref = ((1 - cos) * (segment > 0)).sum() / (segment > 0).sum()
  total = 5.0 * kl_ref + 2.0 * mlm_ref + 1.0 * cos_ref
  assert float(sums['kl_sum'] / sums['kl_count']) == pytest.approx(kl_ref, rel=1e-5)
  assert float(sums['mlm_loss_sum'] / sums['loss_count']) == pytest.approx(mlm_ref, rel=1e-5)
  assert float(sums['cos_sum'] / sums['cos_count']) == pytest.approx(cos_ref, rel=1e-5)
  assert float(sums['loss_sum'] / sums['loss_count']) == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize('student_scanned,teacher_scanned', [(True, True), (False, True),
                                                             (True, False)])
def test_layer_mapping_copies_exactly_the_named_layers(student_scanned, teacher_scanned):
  from flaxformer_lab.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from flaxformer_lab.models.transformer import build_model, dummy_inputs  # pylint: disable=g-import-not-at-top
  base = _small(distilbert.get_config('teacher_tiny'))
  t_cfg = ModelConfig.from_dict(base.model).replace(scan_layers=teacher_scanned)
  s_cfg = t_cfg.replace(num_layers=2, scan_layers=student_scanned)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  init = lambda cfg, seed: jax.device_get(nn.meta.unbox(build_model(cfg).init(
      jax.random.PRNGKey(seed), **dummy_inputs(cfg, 1, 8))['params']))
  from flaxformer_lab.models.stack import convert_layer_params  # pylint: disable=g-import-not-at-top
  teacher, student = init(t_cfg, 1), init(s_cfg, 2)
  out = init_student_from_teacher(student, teacher, [3, 1])
  assert jax.tree.structure(out) == jax.tree.structure(student)
  t_layers = convert_layer_params(teacher, scanned=False)['encoder']
  o_layers = convert_layer_params(out, scanned=False)['encoder']
  for i, j in ((0, 3), (1, 1)):
    for a, b in zip(jax.tree.leaves(o_layers[f'layers_{i}']), jax.tree.leaves(t_layers[f'layers_{j}'])):
      assert np.array_equal(np.asarray(a), np.asarray(b))
  kernel = lambda layers, i: np.asarray(layers[f'layers_{i}']['mlp']['wi']['kernel'])
  assert not np.array_equal(kernel(o_layers, 0), kernel(t_layers, 0))  # layer 3, not layer 0
  assert np.array_equal(out['tokens']['embedding'], teacher['tokens']['embedding'])
  assert np.array_equal(out['mlm_head']['bias'], teacher['mlm_head']['bias'])


def test_student_of_another_width_is_a_config_error(teachers):
  c = _student(teachers[0])
  c.model.d_model, c.model.mlp_dim = 48, 96
  with pytest.raises(ConfigError, match='teacher width'):
    train.validate_config(c)
  c.distill.update(student_init='none', alpha_cos=0.0)
  train.validate_config(c)  # allowed without copying or the cosine term
