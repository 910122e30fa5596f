"""Fault injection (flaxformer_lab/faults.py): bad inputs, a poisoned update, metrics on restart,
corrupt checkpoints, kills at random moments, a full disk."""

from __future__ import annotations

import json
import os
import random
import signal

import numpy as np
import pytest

from flaxformer_lab import errors
from flaxformer_lab import faults
from flaxformer_lab import train
from flaxformer_lab.presets import gpt2


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  os.environ['FLAXFORMER_TFDS_DIR'] = path
  return path


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory, tfds_dir):
  """A finished 2-step run (checkpoint at step 2), shared by the tests that only read it."""
  path = str(tmp_path_factory.mktemp('run') / 'run')
  faults.train(path, faults.tiny_args(2, checkpoint_every=2), tfds_dir)
  return path


def _tiny(num_steps=4):
  c = gpt2.get_config('tiny')
  c.num_steps, c.batch_size, c.data.seq_len = num_steps, 4, 32
  c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 2
  c.data.eval_batches, c.progress, c.async_checkpoints = 1, 'off', False
  c.evals.samples.every = -1
  return c


def test_the_table_has_sixty_kinds_of_bad_input():
  names = [c.name for c in faults.BAD_INPUTS]
  assert len(names) == len(set(names)) and len(names) >= 60
  assert {c.entry for c in faults.BAD_INPUTS} == {'main', 'generate', 'summary', 'convert',
                                                   'sweep'}


def _check(rows):
  bad = [f'{r["name"]}: {r["why"]}' for r in rows if not r['ok']]
  assert not bad, '\n'.join(bad)


@pytest.mark.slow  # about 100 s on 2 cores (the data-file cases prepare data sets)
def test_bad_inputs_without_a_run(tmp_path, tfds_dir):
  """Each config/flag/file case: exit 2, one `error:` line naming it, nothing written."""
  cases = [c for c in faults.BAD_INPUTS if '{run' not in ' '.join(c.args)]
  rows = faults.run_bad_inputs(str(tmp_path), tfds_dir, run_dir='/nonexistent', cases=cases)
  _check(rows)


@pytest.mark.slow
def test_bad_inputs_on_a_run(tmp_path, tfds_dir, run_dir):
  """generate, resume and corrupt-run cases: the run directory's files are unchanged."""
  cases = [c for c in faults.BAD_INPUTS if '{run' in ' '.join(c.args)]
  rows = faults.run_bad_inputs(str(tmp_path), tfds_dir, run_dir, cases=cases)
  _check(rows)


def test_one_error_line_classifies_project_and_library_errors():
  assert errors.classify(errors.Failure('x'))[0] == 2
  assert errors.classify(train.NonFiniteLossError('nan'))[0] == 3
  assert errors.classify(OSError(28, 'No space left on device', '/w/ckpt'))[0] == 2
  try:
    train.check_loop_fields(_with(keep_checkpoints=0))
  except Exception as e:  # pylint: disable=broad-except
    code, line = errors.classify(e)
    assert code == 2 and 'keep_checkpoints' in line
  else:
    raise AssertionError('keep_checkpoints=0 was accepted')
  assert errors.classify(ValueError('raised by a library')) is None  # a bug keeps its traceback


def _with(**fields):
  c = _tiny()
  for k, v in fields.items():
    c[k] = v
  return c


def test_poisoned_update_is_never_saved(tmp_path, tfds_dir):
  """An update that makes the parameters NaN with a finite loss and gradient stops the run with
  exit status 3 naming the last good step; no checkpoint holds a non-finite value."""
  rec = faults.poisoned_update(str(tmp_path), poison_step=3)
  assert rec['ok'], rec
  assert rec['saved'] == [2] and 'step 2' in rec['message']


def test_poisoned_first_update_names_no_checkpoint(tmp_path, tfds_dir):
  rec = faults.poisoned_update(str(tmp_path), poison_step=1)
  assert rec['ok'], rec
  assert rec['saved'] == [] and 'no checkpoint was saved yet' in rec['message']
  assert 'None' not in rec['message']


def test_restart_rewinds_metrics_and_a_finished_run_is_left_alone(tmp_path, tfds_dir):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  # An earlier attempt that died before its first checkpoint logged steps 1..3.
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for step in (1, 2, 3):
      f.write(json.dumps({'step': step, 'train/loss': 9.0}) + '\n')
  train.train_and_evaluate(_tiny(), workdir)
  assert faults.logged_steps(workdir) == [1, 2, 3, 4]
  before = faults.snapshot(workdir)
  assert train.train_and_evaluate(_tiny(), workdir) == {}  # finished: nothing to do
  assert faults.snapshot(workdir) == before  # no second final evaluation, nothing rewritten
  with pytest.raises(train.ConfigError, match='past config.num_steps'):
    train.train_and_evaluate(_tiny(num_steps=3), workdir)
  assert faults.snapshot(workdir) == before


def test_checkpointer_refuses_keep_zero(tmp_path):
  from flaxformer_lab import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='keep_checkpoints'):
    ckpt_lib.Checkpointer(str(tmp_path), every=1, keep=0)
  assert not os.path.exists(tmp_path / 'checkpoints')


@pytest.mark.slow
def test_corrupt_checkpoints_are_one_line(tmp_path, tfds_dir, run_dir):
  rows = faults.run_corruptions(str(tmp_path), tfds_dir, run_dir)
  bad = [f'{r["corruption"]}: {r["why"]}' for r in rows if not r['ok']]
  assert not bad, '\n'.join(bad)


@pytest.mark.slow
def test_kills_at_random_moments_resume_bit_identical(tmp_path, tfds_dir):
  rec = faults.run_kills(str(tmp_path), tfds_dir, kills=2, terms=1, seed=1, num_steps=8)
  bad = [t for t in rec['trials'] if not t['ok']]
  assert not bad, bad


@pytest.mark.slow
def test_full_disk_is_one_line_and_keeps_checkpoints(tmp_path, tfds_dir):
  rec = faults.full_disk(str(tmp_path), tfds_dir)
  if 'skipped' in rec:
    pytest.skip(rec['skipped'])
  assert rec['ok'], rec
