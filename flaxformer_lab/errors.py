"""One error path for every entry point: the project's errors become one `error:` line and a status.

  from flaxformer_lab import errors
  errors.fail('--workdir is required')            # anywhere below an entry point: bad input
  errors.run(main, flags_parser=errors.parse_config_flags)   # instead of absl.app.run

Exit statuses: 0 done, 2 bad input (a config field, flag, file or run directory to change; the
line names it), 3 a diverged run (non-finite loss, gradient or parameters; nothing non-finite was
saved and the line names the last good checkpoint), 4 a lost peer (a multi-process run whose
process died: the line names it; rerun to resume, see sharding.PeerWatchdog). Anything else is a
bug and keeps its traceback.

What counts as bad input: `fail`, the project's error classes (config, checkpoint, run directory,
data, run lock, sweep), a ValueError/TypeError/KeyError raised by the project's own code (a
validation), a file that is missing, unreadable, not UTF-8 or not a directory, and a full or
read-only disk. After the line, the process leaves with `os._exit` so that libraries' exit-time
noise (orbax's and asyncio's pending-task tracebacks, absl's handlers) is not printed; every
checkpoint save has been waited for by then (the train loop's `finally`).
"""

from __future__ import annotations

import difflib
import errno
import logging
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

BAD_INPUT = 2
DIVERGED = 3
PEER_LOST = 4

# Project error classes, by module: looked up only in modules already imported (a module that was
# never imported raised nothing), so this file imports none of them.
_PROJECT_ERRORS = (
    ('flaxformer_lab.models.config', 'ConfigError'),
    ('flaxformer_lab.checkpoint', 'CheckpointError'),
    ('flaxformer_lab.rundir', 'RunDirError'),
    ('flaxformer_lab.data.builders', 'DataError'),
    ('flaxformer_lab.runlock', 'RunLockedError'),
    ('flaxformer_lab.sweeps.spec', 'SweepError'),
    ('flaxformer_lab.interop.huggingface', 'HFCheckpointError'),
    ('flaxformer_lab.interop.hf_mapping', 'UnsupportedError'),
)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_DISK_ERRNOS = {errno.ENOSPC: 'no space left on the device',
                errno.EDQUOT: 'disk quota exceeded',
                errno.EROFS: 'the file system is read-only'}


class Failure(Exception):
  """Raised by `fail`: a message for the user and an exit status."""

  def __init__(self, message: str, code: int = BAD_INPUT):
    super().__init__(message)
    self.code = code


class Diverged(RuntimeError):
  """A run whose loss, gradient or parameters became non-finite (exit status 3)."""


def fail(message: str, code: int = BAD_INPUT):
  """Stops the entry point with `error: <message>` and exit status `code`."""
  raise Failure(message, code)


def _project_classes() -> tuple[type, ...]:
  out = []
  for module, name in _PROJECT_ERRORS:
    cls = getattr(sys.modules.get(module), name, None)
    if isinstance(cls, type):
      out.append(cls)
  return tuple(out)


def _raised_by_project(e: BaseException) -> bool:
  """Whether the innermost frame of `e`'s traceback is in this package (not a library)."""
  tb = e.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep)


def one_line(text: str, limit: int = 800) -> str:
  """`text` on one line (its lines joined with '; '), at most `limit` characters."""
  lines = [l.strip() for l in str(text).splitlines() if l.strip()]
  out = '; '.join(lines)
  return out if len(out) <= limit else out[:limit - 3] + '...'


# A full or read-only disk as libraries that do not raise OSError say it (tensorstore, under
# orbax: "ValueError: RESOURCE_EXHAUSTED: Error writing local file "<path>": ... No space left on
# device [os_error_code='28']").
_DISK_TEXT = {errno.ENOSPC: ('No space left on device', "os_error_code='28'"),
              errno.EDQUOT: ('Disk quota exceeded', "os_error_code='122'"),
              errno.EROFS: ('Read-only file system', "os_error_code='30'")}


def _disk_error(e: BaseException) -> Optional[tuple[int, Optional[str]]]:
  """(errno, file or None) when `e` or an exception it was raised from is a disk error."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
      return e.errno, e.filename
    text = str(e)
    for code, marks in _DISK_TEXT.items():
      if any(m in text for m in marks):
        m = re.search(r'(?:writing|to) (?:local )?file "([^"]+)"', text)
        return code, m.group(1) if m else None
    e = e.__cause__ or e.__context__
  return None


def classify(e: BaseException) -> Optional[tuple[int, str]]:
  """(exit status, one-line message) for an error the user can act on; None for a bug."""
  if isinstance(e, Failure):
    return e.code, one_line(str(e))
  if isinstance(e, Diverged):
    return DIVERGED, one_line(str(e))
  disk = _disk_error(e)
  if disk is not None:
    code, filename = disk
    where = f' writing {filename}' if filename else ''
    return BAD_INPUT, (f'{_DISK_ERRNOS[code]}{where}: free space or choose a --workdir on '
                       'another disk (the checkpoints saved so far are intact)')
  if isinstance(e, _project_classes()):
    return BAD_INPUT, one_line(str(e))
  if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                    FileExistsError)):
    name = f' {e.filename}' if e.filename else ''
    return BAD_INPUT, one_line(f'{e.strerror or e}:{name}' if e.strerror else str(e))
  if isinstance(e, UnicodeDecodeError):
    return BAD_INPUT, one_line(f'a file is not UTF-8 text ({e})')
  if isinstance(e, (ValueError, TypeError, KeyError)) and _raised_by_project(e):
    return BAD_INPUT, one_line(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))
  return None


def _lost_peer_verdict() -> Optional[str]:
  """In a multi-process run, an error the main thread cannot explain (e.g. a collective that
  failed because a peer died) waits for the peer watchdog's verdict: when it names a lost peer,
  it prints that one line and ends the process (it never returns then)."""
  sharding = sys.modules.get('flaxformer_lab.sharding')
  watchdog = sharding.peer_watchdog() if sharding is not None else None
  if watchdog is None:
    return None
  return watchdog.wait_for_verdict(watchdog.timeout + 2 * watchdog.interval + 1)


def report(e: BaseException) -> Optional[int]:
  """Prints `error: ...` for an error the user can act on and returns its status (None: a bug)."""
  found = classify(e)
  if found is None:
    _lost_peer_verdict()
    return None
  code, message = found
  print(f'error: {message}', file=sys.stderr, flush=True)
  return code


def call(main: Callable[[list[str]], Any], argv: Sequence[str],
         flags_parser: Optional[Callable[[list[str]], list[str]]] = None) -> int:
  """Parses `argv` and runs `main` in this process; returns the exit status (the error line, if
  any, is on stderr). Tests use it directly; `run` adds absl's start-up and a quiet exit."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  saved_argv, sys.argv = sys.argv, list(argv)  # config_flags finds its overrides in sys.argv
  try:
    if flags_parser is None:
      rest = flags.FLAGS(list(argv))
    else:
      rest = flags_parser(list(argv))
    out = main(rest)
    return int(out or 0)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except Exception as e:  # pylint: disable=broad-except
    code = report(e)
    if code is None:
      raise
    return code
  finally:
    sys.argv = saved_argv


class _DiskErrorLogFilter(logging.Filter):
  """Drops libraries' logged tracebacks of a full or read-only disk (orbax logs one per writer
  thread, hundreds of lines): the same error reaches the main thread, which reports it as one
  `error:` line (`classify`)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.WARNING:
      return True
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None and _disk_error(exc) is not None:
      return False
    text = record.getMessage() if 'orbax' in (record.pathname or '') else ''
    return not any(m in text for marks in _DISK_TEXT.values() for m in marks)


def silence_library_disk_errors() -> None:
  """Installs `_DiskErrorLogFilter` on the loggers the libraries write through (once)."""
  for name in ('absl', 'orbax', ''):
    log = logging.getLogger(name)
    if not any(isinstance(f, _DiskErrorLogFilter) for f in log.filters):
      log.addFilter(_DiskErrorLogFilter())


def _late_callback_into_closed_loop(exc_type, exc, tb) -> bool:
  """Whether an uncaught exception is a native thread's callback into an asyncio loop that has
  closed: `RuntimeError('Event loop is closed')` whose outermost frame is the loop's
  `call_soon_threadsafe` (no Python caller: tensorstore completing a write after orbax's save
  loop ended on an error; Python reports it through `sys.unraisablehook`, with no object, as a
  bare traceback per write)."""
  if exc_type is not RuntimeError or str(exc) != 'Event loop is closed' or tb is None:
    return False
  return (tb.tb_frame.f_code.co_name == 'call_soon_threadsafe'
          and os.path.basename(tb.tb_frame.f_code.co_filename) == 'base_events.py')


def silence_late_loop_callbacks() -> None:
  """Drops `_late_callback_into_closed_loop` tracebacks (up to 175 lines when a disk fills during
  an asynchronous checkpoint write) from sys.unraisablehook and sys.excepthook; every other
  exception reaches the previous hook. The failure
  that closed the loop reaches the main thread, which reports it as one `error:` line."""
  if getattr(sys.excepthook, '_lab_quiet', False):
    return
  previous_except, previous_unraisable = sys.excepthook, sys.unraisablehook

  def except_hook(exc_type, exc, tb):
    if not _late_callback_into_closed_loop(exc_type, exc, tb):
      previous_except(exc_type, exc, tb)

  def unraisable_hook(u):
    if not _late_callback_into_closed_loop(u.exc_type, u.exc_value, u.exc_traceback):
      previous_unraisable(u)

  except_hook._lab_quiet = True  # pylint: disable=protected-access
  sys.excepthook, sys.unraisablehook = except_hook, unraisable_hook


def quiet_exit(code: int) -> None:
  """Leaves the process with `code`, skipping libraries' exit-time output when code != 0 (the
  peers of a multi-process run are told first, so they stop rather than wait for this one)."""
  sys.stdout.flush()
  sys.stderr.flush()
  sharding = sys.modules.get('flaxformer_lab.sharding')
  watchdog = sharding.peer_watchdog() if sharding is not None else None
  if watchdog is not None:
    watchdog.announce_exit(code)
  if code:
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(0)


def run(main: Callable[[list[str]], Any],
        flags_parser: Optional[Callable[[list[str]], list[str]]] = None) -> None:
  """`absl.app.run(main)` with the project's error path (see the module docstring)."""
  from absl import app  # pylint: disable=g-import-not-at-top

  def parser(argv):
    try:
      return flags_parser(argv) if flags_parser else _parse_plain_flags(argv)
    except Exception as e:  # pylint: disable=broad-except
      code = report(e)
      if code is None:
        raise
      quiet_exit(code)

  def guarded(argv):
    silence_library_disk_errors()
    silence_late_loop_callbacks()
    try:
      code = int(main(argv) or 0)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # pylint: disable=broad-except
      code = report(e)
      if code is None:
        raise
    quiet_exit(code)

  app.run(guarded, flags_parser=parser)


def _parse_plain_flags(argv: list[str]) -> list[str]:
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(one_line(str(e)))


# --- config flags ----------------------------------------------------------------------------------
def _valid_keys(config, prefix=''):
  out = []
  for key, value in config.items():
    name = f'{prefix}{key}'
    out.append(name)
    if hasattr(value, 'items'):
      out.extend(_valid_keys(value, name + '.'))
  return out


def _config_arg(argv: Sequence[str], name: str = 'config') -> Optional[str]:
  for i, a in enumerate(argv[1:], 1):
    if a.startswith(f'--{name}='):
      return a.split('=', 1)[1]
    if a == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config_file(spec_arg: str):
  """(config or None, one-line problem or None) of `path[:arg]`, loaded as config_flags does."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec_arg.partition(':')
  if not os.path.isfile(path):
    return None, (f'config file {path!r} does not exist' if not os.path.exists(path) else
                  f'config {path!r} is not a file')
  try:
    spec = importlib.util.spec_from_file_location('_lab_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except SyntaxError as e:
    return None, f'config file {path} has a syntax error at line {e.lineno}: {e.msg}'
  except Exception as e:  # pylint: disable=broad-except
    return None, f'config file {path} fails to import: {type(e).__name__}: {one_line(str(e), 300)}'
  if not hasattr(module, 'get_config'):
    return None, f'config file {path} defines no get_config(arg)'
  try:
    return (module.get_config(arg) if arg else module.get_config()), None
  except Exception as e:  # pylint: disable=broad-except
    return None, f'--config={spec_arg}: {one_line(str(e), 400)}'


def explain_config_error(error: BaseException, argv: Sequence[str], name: str = 'config') -> str:
  """One line for a failed `--config=...` / `--config.<key>=...` parse: the file, the variant or
  argument, or the override key (with the closest valid keys)."""
  spec_arg = _config_arg(argv, name)
  if spec_arg is None:
    return one_line(str(error)) or type(error).__name__
  config, problem = _load_config_file(spec_arg)
  if problem:
    return problem
  overrides = [a[len(f'--{name}.'):] for a in argv[1:] if a.startswith(f'--{name}.')]
  valid = _valid_keys(config)
  for item in overrides:
    key = item.split('=', 1)[0]
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
      hint = f'; closest valid keys: {", ".join(close)}' if close else ''
      return f'unknown config key {key!r}{hint}'
  text = ' '.join(str(error).replace('\\n', ' ').split()) or type(error).__name__
  m = re.search(r"Could not override key '?([\w.]+)'?", text)
  culprits = [o for o in overrides if m and o.split('=', 1)[0] == m.group(1)] or [
      o for o in overrides if '=' in o and o.split('=', 1)[1] and o.split('=', 1)[1] in text]
  if len(culprits) == 1:
    key, _, value = culprits[0].partition('=')
    current = config
    for part in key.split('.'):
      current = current[part] if hasattr(current, 'items') and part in current else None
    kind = f' (expected {type(current).__name__}, like {current!r})' if current is not None else ''
    return f'config.{key}={value!r} is not a valid value{kind}: {text[:300]}'
  if overrides and not text.startswith('Unknown command line flag'):
    return f'a --{name} override is invalid ({", ".join(overrides)}): {text[:300]}'
  return one_line(text)


def parse_config_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for entry points with a `--config` file flag: every flag or config error
  becomes one line and exit status 2."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    rest = flags.FLAGS(argv)
    config = flags.FLAGS['config'].value
    if config is not None:
      _ = '_' in config  # config_flags defers a file that failed to load until first access
    return rest
  except flags.Error as e:
    fail(explain_config_error(e.__cause__ or e, argv))
  except (AttributeError, KeyError, TypeError, ValueError, SyntaxError, OSError) as e:
    fail(explain_config_error(e, argv))
