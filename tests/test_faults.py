"""Fault injection (flaxformer_lab/faults.py): bad inputs, a poisoned update, metrics on restart,
corrupt checkpoints, kills at random moments, a full disk."""

from __future__ import annotations

import json
import os
import random
import signal
import sys

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


def test_the_one_line_check_sees_what_the_terminal_shows():
  # nested progress bars that clear themselves (tqdm: cursor up, carriage return, blanks)
  bars = ('\rsplits:   0%| 0/3\n\rexamples: 0\x1b[A\n\r            \x1b[A\r'
          '                \rerror: x is wrong\n')
  assert faults.one_error_line(bars) == 'error: x is wrong'
  assert faults.one_error_line('warning: y\nerror: x\n') is None
  assert faults.one_error_line('Traceback (most recent call last):\n  ...\nerror: x\n') is None
  assert faults.one_error_line('loading 50%\r           \rerror: x\n') == 'error: x'
  assert faults.one_error_line('loading 50%\rerror: x\n') == 'error: x50%'  # as shown
  assert faults.one_error_line('error: x\nerror: y\n') is None
  assert faults.one_error_line('') is None


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


# A few table cases that need no data preparation and no run, end to end through `main` in one
# worker process: the quick CI guard of the table (the whole table is slow-marked below).
QUICK_CASES = ('keep_checkpoints=0', 'unknown optimizer', 'grad_accum_steps=0',
               'mesh.shape not a tuple', 'unknown tokenizer', 'unknown data set',
               'config file syntax error', 'unknown config argument', 'no --workdir')


def test_quick_bad_inputs_are_one_line(tmp_path, tfds_dir):
  cases = [c for c in faults.BAD_INPUTS if c.name in QUICK_CASES]
  assert len(cases) == len(QUICK_CASES)
  rows = faults.run_bad_inputs(str(tmp_path), tfds_dir, run_dir='/nonexistent', cases=cases)
  _check(rows)
  assert not os.path.exists(tmp_path / 'tfds_tok')  # the unknown tokenizer prepared nothing


@pytest.mark.parametrize('content, name, expect', [
    ('Caf\u00e9\n'.encode('latin-1') * 50, 'input.txt', 'not UTF-8'),
    (__import__('gzip').compress(b'First Citizen:\n' * 50), 'input.txt', 'gzip-compressed'),
    (b'', 'input.txt', 'empty'),
    (b' \n\n', 'input.txt', 'empty'),
    (b'plain text, not gzip\n', 'train.en.gz', 'not a complete gzip file'),
    (__import__('gzip').compress(b'First Citizen:\n' * 50)[:40], 'train.en.gz',
     'not a complete gzip file'),
], ids=['latin1', 'gzip-without-gz', 'empty', 'blank', 'gz-not-gzip', 'gz-truncated'])
def test_a_bad_data_file_is_one_line_naming_it(tmp_path, content, name, expect):
  from flaxformer_lab.data import builders  # pylint: disable=g-import-not-at-top
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(builders.DataError) as e:
    builders._read_text(str(path))  # pylint: disable=protected-access
  code, line = errors.classify(e.value)
  assert code == 2 and str(path) in line and expect in line, line


def test_good_data_files_still_read(tmp_path):
  import gzip  # pylint: disable=g-import-not-at-top
  from flaxformer_lab.data import builders  # pylint: disable=g-import-not-at-top
  (tmp_path / 'a.txt').write_bytes('Caf\u00e9\r\nb\n'.encode('utf-8'))
  (tmp_path / 'b.gz').write_bytes(gzip.compress('x\u00e9\n'.encode('utf-8')))
  assert builders._read_text(str(tmp_path / 'a.txt')) == 'Caf\u00e9\nb\n'  # pylint: disable=protected-access
  assert builders._read_text(str(tmp_path / 'b.gz')) == 'x\u00e9\n'  # pylint: disable=protected-access


def test_an_unknown_tokenizer_is_refused_by_validation():
  c = _tiny()
  c.data.tokenizer = 'sentencepeice'
  with pytest.raises(train.ConfigError, match="data.tokenizer='sentencepeice'.*'sentencepiece'"):
    train.validate_config(c)


@pytest.mark.parametrize('kind', ['hf_garbage', 'hf_truncated'])
def test_corrupt_hf_weights_are_one_line_naming_the_file(tmp_path, kind):
  from flaxformer_lab.interop import huggingface  # pylint: disable=g-import-not-at-top
  faults._prepare(kind, str(tmp_path), {})  # pylint: disable=protected-access
  weights = str(tmp_path / kind / 'model.safetensors')
  for read in (huggingface.checkpoint_keys, huggingface.read_state_dict):
    with pytest.raises(huggingface.HFCheckpointError) as e:
      read(str(tmp_path / kind))
    code, line = errors.classify(e.value)
    assert code == 2 and weights in line and 'corrupt' in line, line


class _FakeStore:
  """The distributed key-value store of jax's client, in memory; `down` makes it fail."""

  def __init__(self):
    self.kv, self.down = {}, False

  def key_value_set(self, key, value, allow_overwrite=False):
    if self.down:
      raise RuntimeError('UNAVAILABLE')
    self.kv[key] = value

  def key_value_dir_get(self, prefix):
    if self.down:
      raise RuntimeError('UNAVAILABLE')
    return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]


def _watch(store, pid, n, lost):
  from flaxformer_lab import sharding  # pylint: disable=g-import-not-at-top
  return sharding.PeerWatchdog(store, pid, n, timeout=1.0, interval=0.1,
                               on_lost=lost.append).start()


def _wait(pred, seconds):
  import time  # pylint: disable=g-import-not-at-top
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline and not pred():
    time.sleep(0.05)
  return pred()


def test_peer_watchdog_names_the_lost_process():
  store = _FakeStore()
  lost0, lost1, lost2 = [], [], []
  dogs = [_watch(store, i, 3, l) for i, l in enumerate((lost0, lost1, lost2))]
  assert not _wait(lambda: lost0 or lost1 or lost2, 2.0)  # all alive: no verdict
  dogs[2].stop()  # process 2 dies without a word
  assert _wait(lambda: lost0 and lost1, 3.0)
  assert 'process 2 of 3 was lost' in lost0[0] and 'process 2 of 3 was lost' in lost1[0]
  for d in dogs:
    d.stop()


def test_peer_watchdog_clean_exit_is_no_loss_and_coordinator_loss_names_0():
  store = _FakeStore()
  lost0, lost1 = [], []
  d0, d1 = _watch(store, 0, 2, lost0), _watch(store, 1, 2, lost1)
  d1.announce_exit(0)  # process 1 finished
  assert not _wait(lambda: lost0, 2.0)
  d0.stop()
  store2 = _FakeStore()
  lost = []
  d = _watch(store2, 1, 2, lost)
  store2.kv['flaxformer_lab/peer/beat/0'] = 'x'
  store2.down = True  # the coordinator (process 0, holding the store) is gone
  assert _wait(lambda: lost, 3.0) and 'process 0 of 2 was lost' in lost[0], lost
  d.stop()


def test_one_error_line_classifies_project_and_library_errors():
  assert errors.classify(errors.Failure('x'))[0] == 2
  assert errors.classify(train.NonFiniteLossError('nan'))[0] == 3
  assert errors.classify(OSError(28, 'No space left on device', '/w/ckpt'))[0] == 2
  # tensorstore (orbax's writer) says it in a ValueError; wrapped once more here
  store = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/w/checkpoints/2.orbax-'
                     'checkpoint-tmp/_sharding": Failed to write 13146 bytes to file 16: No space '
                     "left on device [os_error_code='28']")
  wrapped = RuntimeError('commit failed')
  wrapped.__cause__ = store
  code, line = errors.classify(wrapped)
  assert code == 2 and line.startswith('no space left') and '/w/checkpoints/2' in line, line
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
  assert rec['ok'], rec['why']
  assert rec['saved'] == [2] and 'step 2' in rec['message']


def test_poisoned_first_update_names_no_checkpoint(tmp_path, tfds_dir):
  rec = faults.poisoned_update(str(tmp_path), poison_step=1)
  assert rec['ok'], rec['why']
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
  sent = [t['signal'] for t in rec['trials'] if t['sent']]
  assert sent == ['SIGKILL', 'SIGKILL', 'SIGTERM'], rec['trials']  # each landed mid-run


def test_kills_during_a_checkpoint_write_and_during_a_resume_resume_bit_identical(tmp_path,
                                                                                  tfds_dir):
  """SIGKILL the moment orbax's tmp directory of a save exists, and SIGKILL a resuming process
  during its start-up and restore (after a first kill once a checkpoint existed)."""
  rec = faults.run_kills(str(tmp_path), tfds_dir, kills=2, terms=0, seed=2, num_steps=8,
                         moments=('checkpoint_write', 'resume'))
  bad = [t for t in rec['trials'] if not t['ok']]
  assert not bad, bad
  sent = [t['moment'] for t in rec['trials'] if t['sent']]
  assert sent == ['checkpoint_write', 'resume'], rec['trials']
  resumed = [t for t in rec['trials'] if t['moment'] == 'resume' and t['sent']][0]
  assert resumed['first_kill_checkpoints'], resumed  # the killed resume had a checkpoint to read


@pytest.mark.slow
def test_full_disk_is_one_line_and_keeps_checkpoints(tmp_path, tfds_dir):
  rec = faults.full_disk(str(tmp_path), tfds_dir)
  if 'skipped' in rec:
    pytest.skip(rec['skipped'])
  assert rec['ok'], rec['why']


@pytest.mark.slow  # three two-process runs
def test_a_lost_peer_is_one_line_and_the_rerun_resumes_bit_identical(tmp_path, tfds_dir):
  rec = faults.peer_loss(str(tmp_path), tfds_dir, victims=(1,))
  assert rec['ok'], rec['why']


def test_library_disk_error_logs_are_dropped_and_other_errors_kept():
  """orbax logs a traceback per writer thread when the disk fills during a write; the main thread
  reports the same error as one line, so those records are dropped, and only those."""
  import errno
  import logging
  flt = errors._DiskErrorLogFilter()  # pylint: disable=protected-access

  def record(msg, exc=None, path='/x/orbax/checkpoint/_src/futures/future.py',
             level=logging.ERROR):
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord('absl', level, path, 1, msg, (), exc_info)

  full = OSError(errno.ENOSPC, 'No space left on device')
  wrapped = RuntimeError('write failed')
  wrapped.__cause__ = full
  assert not flt.filter(record('raised an exception', full))
  assert not flt.filter(record('raised an exception', wrapped))
  assert not flt.filter(record("RESOURCE_EXHAUSTED ... [os_error_code='28']"))
  assert flt.filter(record('raised an exception', ValueError('a real bug')))
  assert flt.filter(record('No space left on device', path='/work/flaxformer_lab/train.py'))
  assert flt.filter(record('step 3 saved', full, level=logging.INFO))


def test_native_callbacks_into_a_closed_loop_are_dropped_and_other_errors_kept(monkeypatch):
  """tensorstore finishing a write after orbax's save loop closed on an error reports
  `RuntimeError: Event loop is closed` from `call_soon_threadsafe` with no Python caller (a bare
  traceback per write); the hooks drop exactly those, every other exception reaches the old hook."""
  import asyncio
  import types
  seen = []
  monkeypatch.setattr(sys, 'excepthook', lambda *a: seen.append(('except', a[1])))
  monkeypatch.setattr(sys, 'unraisablehook', lambda u: seen.append(('unraisable', u.exc_value)))
  errors.silence_late_loop_callbacks()
  errors.silence_late_loop_callbacks()  # installed once
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError as e:
    closed, from_python = e, e.__traceback__
  native = from_python.tb_next  # the traceback as a native caller sees it: starts in asyncio
  assert native.tb_frame.f_code.co_name == 'call_soon_threadsafe'
  sys.excepthook(RuntimeError, closed, native)
  sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=closed,
                                           exc_traceback=native, err_msg=None, object=None))
  assert seen == []
  sys.excepthook(RuntimeError, closed, from_python)  # a Python caller: a bug of that caller
  other = RuntimeError('something else')
  sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=other,
                                           exc_traceback=None, err_msg=None, object=None))
  assert seen == [('except', closed), ('unraisable', other)]


@pytest.mark.slow  # one two-process run with a long compile (~1-5 min on 2 cores)
def test_a_compile_longer_than_the_heartbeat_timeout_is_not_a_lost_peer(tmp_path, tfds_dir):
  rec = faults.long_compile_peers(str(tmp_path), tfds_dir)
  assert rec['ok'], rec['why']
