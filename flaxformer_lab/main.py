"""Entry point: `python -m flaxformer_lab.main --config=configs/<file>.py[:<arg>] --workdir=<dir>
[--config.<key>=<value> ...]`.

Flags only: distributed initialization, then `train.train_and_evaluate`. Bad flags, unknown or
mistyped config keys, impossible configs and unusable files exit with status 2 and one line that says
what to change; a diverged run exits with status 3 (errors.py).
"""

from __future__ import annotations

import os

from absl import flags
from absl import logging
from ml_collections import config_flags

import jax

from flaxformer_lab import errors
from flaxformer_lab import hostmem
from flaxformer_lab import runlock
from flaxformer_lab import sharding

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/<family>.py:<arg>).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, config).')

fail = errors.fail
parse_flags = errors.parse_config_flags  # every flag/config error -> one line, exit status 2


def main(argv):
  hostmem.reexec_with_tunables('flaxformer_lab.main')  # CPU: malloc reusing pages (hostmem.py)
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if _WORKDIR.value is None:
    fail('--workdir is required')
  if _CONFIG.value is None:
    fail('--config is required (e.g. --config=configs/gpt2.py:tiny)')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.ERROR)  # library INFO/WARNING chatter off; --verbosity=0 brings it back
  sharding.maybe_initialize_distributed()
  from flaxformer_lab import train  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  train.validate_config(config)
  workdir = _WORKDIR.value
  created = check_workdir(workdir)
  # one training per run directory; held until this process exits (see runlock.py)
  run_lock = runlock.RunLock(workdir, enabled=jax.process_index() == 0).acquire()
  try:
    train.train_and_evaluate(config, workdir)
  except BaseException:
    run_lock.release()
    if created and jax.process_index() == 0:  # a run that never started leaves no directory
      _remove_if_only_lock(workdir)
    raise
  run_lock.release()


def check_workdir(workdir: str) -> bool:
  """Refuses a --workdir that is a file or not writable; returns whether it does not exist yet."""
  if not runlock.is_local(workdir):
    return False
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    fail(f'--workdir={workdir} is a file, not a directory: choose another path')
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    fail(f'--workdir={workdir} cannot be created: {parent} is a file')
  if not os.access(parent, os.W_OK | os.X_OK):
    fail(f'--workdir={workdir} is not writable ({parent} is read-only for this user): choose '
         'another path')
  return not os.path.exists(path)


def _remove_if_only_lock(workdir: str) -> None:
  try:
    if set(os.listdir(workdir)) <= {runlock.LOCK_FILE}:
      for name in os.listdir(workdir):
        os.remove(os.path.join(workdir, name))
      os.rmdir(workdir)
  except OSError:
    pass


def run():
  errors.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
