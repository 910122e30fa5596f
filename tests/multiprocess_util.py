"""Runs Python in fresh subprocesses: N simulated CPU devices, or several JAX processes on localhost.

The pytest process may already have initialized JAX with one CPU device, so anything that needs a
different device count or a multi-process launch runs in a subprocess:

  out = run_python(['-c', code], num_devices=8)                  # one process, 8 CPU devices
  outs = launch_processes(['-c', code], num_processes=2, devices_per_process=4)

`launch_processes` sets the environment that `flaxformer_lab.sharding.maybe_initialize_distributed`
reads (FLAXFORMER_COORDINATOR=localhost:<free port>, FLAXFORMER_NUM_PROCESSES,
FLAXFORMER_PROCESS_ID, FLAXFORMER_NUM_CPU_DEVICES), so a script (or `flaxformer_lab.main`) only has
to call that function first. Each call returns CompletedProcess objects with text stdout/stderr.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Mapping, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  """An unused TCP port on localhost (portpicker when installed, else the kernel's choice)."""
  try:
    import portpicker  # pylint: disable=g-import-not-at-top
    return portpicker.pick_unused_port()
  except ImportError:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      s.bind(('localhost', 0))
      return s.getsockname()[1]


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
  """The current environment with the repository on PYTHONPATH, CPU only, and no inherited
  device-count or distributed settings."""
  env = dict(os.environ)
  for key in list(env):
    if key.startswith('FLAXFORMER_') and key not in ('FLAXFORMER_DATA', 'FLAXFORMER_TFDS_DIR'):
      del env[key]
  env.pop('XLA_FLAGS', None)
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join([REPO_ROOT] + [p for p in [env.get('PYTHONPATH')] if p])
  env.setdefault('PYTHONUNBUFFERED', '1')
  env.update(extra or {})
  return env


def _format_failure(results) -> str:
  parts = []
  for i, r in enumerate(results):
    parts.append(f'--- process {i}: rc={r.returncode}\n[stdout]\n{r.stdout[-4000:]}\n'
                 f'[stderr]\n{r.stderr[-6000:]}')
  return '\n'.join(parts)


def launch_processes(argv: Sequence[str], num_processes: int = 2, devices_per_process: int = 4,
                     env: Mapping[str, str] | None = None, timeout: float = 120.0,
                     check: bool = True) -> list[subprocess.CompletedProcess]:
  """Starts `python <argv...>` `num_processes` times as one JAX distributed job on localhost.

  Args:
    argv: arguments after the interpreter, e.g. ['-c', code] or ['-m', 'flaxformer_lab.main', ...].
    num_processes: processes in the job.
    devices_per_process: CPU devices each process gets.
    env: extra environment variables for every process.
    timeout: seconds for the whole job; on expiry every process is killed and an error raised.
    check: raise AssertionError (with every process's output) unless all exit with 0.
  """
  port = free_port()
  procs, files = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(num_processes):
      penv = base_env(env)
      penv.update({
          'FLAXFORMER_COORDINATOR': f'localhost:{port}',
          'FLAXFORMER_NUM_PROCESSES': str(num_processes),
          'FLAXFORMER_PROCESS_ID': str(i),
          'FLAXFORMER_NUM_CPU_DEVICES': str(devices_per_process),
      })
      out = open(os.path.join(tmp, f'{i}.out'), 'w+')
      err = open(os.path.join(tmp, f'{i}.err'), 'w+')
      files.append((out, err))
      procs.append(subprocess.Popen([sys.executable, *argv], cwd=REPO_ROOT, env=penv,
                                    stdout=out, stderr=err, text=True))
    deadline = time.monotonic() + timeout
    timed_out = False
    for p in procs:
      try:
        p.wait(timeout=max(deadline - time.monotonic(), 0.1))
      except subprocess.TimeoutExpired:
        timed_out = True
        break
    if timed_out:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    results = []
    for p, (out, err) in zip(procs, files):
      out.seek(0)
      err.seek(0)
      results.append(subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read()))
      out.close()
      err.close()
  if timed_out:
    raise AssertionError(f'multi-process job timed out after {timeout}s\n' + _format_failure(results))
  if check and any(r.returncode != 0 for r in results):
    raise AssertionError('multi-process job failed\n' + _format_failure(results))
  return results


def run_python(argv: Sequence[str], num_devices: int = 1, env: Mapping[str, str] | None = None,
               timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
  """Runs `python <argv...>` (e.g. ['-c', code] or [script, arg]) in a fresh process with
  `num_devices` CPU devices (XLA_FLAGS, set before JAX starts)."""
  penv = base_env(env)
  penv['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
  result = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=penv, text=True,
                          capture_output=True, timeout=timeout, check=False)
  if check and result.returncode != 0:
    raise AssertionError(f'subprocess failed\n' + _format_failure([result]))
  return result
