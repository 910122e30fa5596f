"""Entry point: `python -m flaxformer_lab.main --config=configs/<file>.py[:<arg>] --workdir=<dir>
[--config.<key>=<value> ...]`.

Flags only: distributed initialization, then `train.train_and_evaluate`. Bad flags, unknown or
mistyped config keys and impossible configs exit with status 2 and one line that says what to change.
"""

from __future__ import annotations

import difflib
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import jax

from flaxformer_lab import runlock
from flaxformer_lab import sharding

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/<family>.py:<arg>).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, config).')


def fail(message: str, code: int = 2):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def _valid_keys(config, prefix=''):
  out = []
  for key, value in config.items():
    name = f'{prefix}{key}'
    out.append(name)
    if hasattr(value, 'items'):
      out.extend(_valid_keys(value, name + '.'))
  return out


def _config_from_argv(argv):
  """Loads the --config file directly (flag parsing failed, so the flag holds no value)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec_arg = next((a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')), None)
  if not spec_arg:
    return None
  path, _, arg = spec_arg.partition(':')
  try:
    spec = importlib.util.spec_from_file_location('_lab_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None


def _explain_flag_error(error: Exception, argv) -> str:
  """One line naming the bad key and the closest valid keys."""
  text = ' '.join(str(error).replace('\\n', ' ').split()) or type(error).__name__
  bad = [a.split('=', 1)[0][len('--config.'):] for a in argv[1:] if a.startswith('--config.')]
  config = _config_from_argv(argv)
  if config is not None:
    valid = _valid_keys(config)
    for key in bad:
      if key not in valid:
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        hint = f'; closest valid keys: {", ".join(close)}' if close else ''
        return f'unknown config key {key!r}{hint}'
  m = re.search(r"Could not override key '?([\w.]+)'?", text)
  if m:
    return f'config.{m.group(1)}: {text}'
  return text


def parse_flags(argv):
  """absl flag parsing that turns every flag/config error into one line and exit code 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(_explain_flag_error(e.__cause__ or e, argv))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    fail(_explain_flag_error(e, argv))


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if _WORKDIR.value is None:
    fail('--workdir is required')
  if _CONFIG.value is None:
    fail('--config is required (e.g. --config=configs/gpt2.py:tiny)')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter off; --verbosity=0 brings it back
  sharding.maybe_initialize_distributed()
  from flaxformer_lab import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from flaxformer_lab import train  # pylint: disable=g-import-not-at-top
  from flaxformer_lab.models.config import ConfigError  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  try:
    train.validate_config(config)
  except (ConfigError, ValueError) as e:
    fail(str(e).splitlines()[0])
  try:  # one training per run directory; held until this process exits (see runlock.py)
    run_lock = runlock.RunLock(_WORKDIR.value, enabled=jax.process_index() == 0).acquire()
  except runlock.RunLockedError as e:
    fail(str(e))
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
    run_lock.release()
  except train.NonFiniteLossError as e:
    logging.error('%s', e)
    fail(str(e), code=3)
  except (ConfigError, FileNotFoundError, ckpt_lib.CheckpointError) as e:
    fail(str(e).splitlines()[0] + (' (details: ' + '; '.join(str(e).splitlines()[1:3]) + ')'
                                    if len(str(e).splitlines()) > 1 else ''))


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
