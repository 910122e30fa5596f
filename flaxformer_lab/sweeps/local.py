"""Local backend: each run is a `python -m flaxformer_lab.main` subprocess, N at a time.

Each run writes its output to `<run dir>/sweep.log`; a failing run does not stop the others.
Runs never outlive the sweep command: every child asks the kernel to SIGKILL it when its parent
dies (Linux `prctl(PR_SET_PDEATHSIG)`, set between fork and exec), and runs in its own session
(process group), so SIGTERM/SIGINT to the sweep command reach each run's whole group: the runs
save a checkpoint (the train loop's preemption handling) and the sweep exits.
A SIGKILLed sweep command loses at most each interrupted run's steps since its last checkpoint;
rerunning the command resumes them. PR_SET_PDEATHSIG is per forking *thread*, so runs are started
from the thread that waits for them (the scheduler below is single-threaded).
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Callable, Mapping, Sequence, TextIO

from flaxformer_lab.sweeps import state as state_lib
from flaxformer_lab.sweeps.spec import Run, Sweep

PR_SET_PDEATHSIG = 1
_LIBC = None


def _libc():
  """libc, loaded in the parent (loading a library between fork and exec is not safe)."""
  global _LIBC
  if _LIBC is None and sys.platform.startswith('linux'):
    _LIBC = ctypes.CDLL(None, use_errno=True)
  return _LIBC


def child_preexec(parent_pid: int) -> Callable[[], None] | None:
  """A preexec_fn that makes the child die with its parent (Linux), or None elsewhere."""
  libc = _libc()
  if libc is None:
    return None

  def preexec():
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
      os._exit(1)  # pylint: disable=protected-access

  return preexec


def repo_root() -> str:
  """The directory holding the flaxformer_lab package (put on the runs' PYTHONPATH)."""
  return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
  env = dict(os.environ)
  root = repo_root()
  paths = [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p]
  if root not in paths:
    env['PYTHONPATH'] = os.pathsep.join([root] + paths)
  env.setdefault('PYTHONUNBUFFERED', '1')
  env.update(extra or {})
  return env


def start_run(sweep: Sweep, run: Run, env: Mapping[str, str]) -> tuple[subprocess.Popen, TextIO]:
  """Starts one attempt of `run`, appending its output to `<run dir>/sweep.log`."""
  os.makedirs(run.workdir, exist_ok=True)
  argv = sweep.run_argv(run)
  attempt = state_lib.count_attempts(run.workdir) + 1
  log = open(os.path.join(run.workdir, state_lib.LOG_FILE), 'a')
  log.write(state_lib.attempt_header(attempt, shlex.join(argv)))
  log.flush()
  proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          env=dict(env), start_new_session=True,
                          preexec_fn=child_preexec(os.getpid()))
  return proc, log


class _Stop(Exception):
  def __init__(self, signum):
    super().__init__(signum)
    self.signum = signum


def run_local(sweep: Sweep, runs: Sequence[Run], parallel: int, *,
              env_extra: Mapping[str, str] | None = None, stream: TextIO | None = None,
              poll_s: float = 0.2, stop_grace_s: float = 120.0) -> dict[str, dict]:
  """Runs `runs` (N at a time) and returns {run name: outcome}. SIGTERM/SIGINT of this process
  stop the runs (they checkpoint) and raise SystemExit(128 + signal)."""
  stream = stream or sys.stdout
  env = run_env(env_extra)
  queue = list(runs)
  active: dict[str, tuple[Run, subprocess.Popen, TextIO, float]] = {}
  outcomes: dict[str, dict] = {}
  parallel = max(1, int(parallel))

  def on_signal(signum, frame):
    del frame
    raise _Stop(signum)

  old_handlers = {}
  import threading  # pylint: disable=g-import-not-at-top
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGTERM, signal.SIGINT):
      old_handlers[sig] = signal.signal(sig, on_signal)
  try:
    while queue or active:
      while queue and len(active) < parallel:
        run = queue.pop(0)
        proc, log = start_run(sweep, run, env)
        active[run.name] = (run, proc, log, time.monotonic())
        print(f'[sweep] started {run.name} (pid {proc.pid}; log {run.workdir}/'
              f'{state_lib.LOG_FILE})', file=stream, flush=True)
      for name, (run, proc, log, t0) in list(active.items()):
        rc = proc.poll()
        if rc is None:
          continue
        log.close()
        del active[name]
        outcome = state_lib.write_outcome(run.workdir, rc, time.monotonic() - t0)
        outcomes[name] = outcome
        print(f'[sweep] {outcome["status"]} {name} (exit {rc}, {outcome["last_attempt_s"]:.1f} s)',
              file=stream, flush=True)
      if active:
        time.sleep(poll_s)
  except _Stop as stop:
    print(f'[sweep] signal {stop.signum}: stopping {len(active)} run(s) (they save a checkpoint)',
          file=stream, flush=True)
    for run, proc, log, _ in active.values():
      _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + stop_grace_s
    for run, proc, log, _ in active.values():
      try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
      except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
      log.close()
    raise SystemExit(128 + stop.signum) from None
  finally:
    for sig, handler in old_handlers.items():
      signal.signal(sig, handler)
  return outcomes


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  try:
    os.killpg(proc.pid, sig)  # start_new_session: the run leads its own group
  except ProcessLookupError:
    pass
