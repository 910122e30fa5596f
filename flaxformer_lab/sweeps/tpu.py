"""TPU pod backend through `gcloud compute tpus tpu-vm` (gcloud on PATH, already authenticated).

1. The code goes to every worker: a tarball of the repository's code (flaxformer_lab/, configs/,
   experiments/, requirements.txt, pyproject.toml and the sweep file) is copied with
   `gcloud compute tpus tpu-vm scp <tgz> <tpu>:<remote tgz> --zone=<zone> --worker=all` and
   unpacked into `--tpu_dir`; `--tpu_setup` (e.g. a pip install) then runs on every worker.
2. Runs go one at a time on the whole pod: for each,
   `gcloud compute tpus tpu-vm ssh <tpu> --zone=<zone> --worker=all --command='cd <dir> &&
   FLAXFORMER_DISTRIBUTED=1 <python> -m flaxformer_lab.main ...'` (jax finds the pod topology).
   Its output is kept in `<run dir>/sweep.log` and its exit status in `<run dir>/sweep_run.json`.

The workdir should be a bucket (`--workdir=gs://...`): the workers write there (orbax, and every
file of the lab through etils.epath). `--dry_run` prints the commands without running them.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Sequence, TextIO

from etils import epath

from flaxformer_lab.sweeps import local as local_lib
from flaxformer_lab.sweeps import state as state_lib
from flaxformer_lab.sweeps.spec import Run, Sweep, SweepError

BUNDLE_PARTS = ('flaxformer_lab', 'configs', 'experiments', 'requirements.txt', 'pyproject.toml')


@dataclasses.dataclass
class TpuOptions:
  name: str = ''  # the TPU VM (pod) name
  zone: str = ''
  project: str = ''  # '' = gcloud's configured project
  remote_dir: str = 'flaxformer_lab'  # where the code is unpacked on every worker (relative: ~)
  python: str = 'python3'
  setup: str = ''  # a shell command run on every worker after the copy ('' = none)
  gcloud: str = 'gcloud'


def _gcloud(opts: TpuOptions, verb: str, *args: str) -> list[str]:
  flags = [f'--zone={opts.zone}', '--worker=all']
  if opts.project:
    flags.append(f'--project={opts.project}')
  return [opts.gcloud, 'compute', 'tpus', 'tpu-vm', verb, *args, *flags]


def bundle_path(sweep: Sweep) -> str:
  slug = ''.join(c if c.isalnum() else '_' for c in sweep.name)
  return os.path.join(tempfile.gettempdir(), f'flaxformer_lab_{slug}.tgz')


def relative_sweep_file(sweep: Sweep) -> str:
  root = local_lib.repo_root()
  rel = os.path.relpath(sweep.file, root)
  if rel.startswith('..'):
    raise SweepError(f'--backend=tpu copies the repository to the workers: the sweep file '
                     f'{sweep.file} must be inside {root}')
  return rel


def setup_commands(sweep: Sweep, opts: TpuOptions) -> list[list[str]]:
  tgz = bundle_path(sweep)
  remote_tgz = f'{opts.remote_dir.rstrip("/")}.tgz'
  d = shlex.quote(opts.remote_dir)
  unpack = f'rm -rf {d} && mkdir -p {d} && tar -xzf {shlex.quote(remote_tgz)} -C {d}'
  cmds = [_gcloud(opts, 'scp', tgz, f'{opts.name}:{remote_tgz}'),
          _gcloud(opts, 'ssh', opts.name, f'--command={unpack}')]
  if opts.setup:
    cmds.append(_gcloud(opts, 'ssh', opts.name, f'--command=cd {d} && {opts.setup}'))
  return cmds


def run_command(sweep: Sweep, run: Run, opts: TpuOptions) -> list[str]:
  rel = relative_sweep_file(sweep)
  flag = rel + (f':{sweep.arg}' if sweep.arg else '')
  args = sweep.run_args(run, config_flag=flag)
  remote = (f'cd {shlex.quote(opts.remote_dir)} && FLAXFORMER_DISTRIBUTED=1 '
            f'{opts.python} -m flaxformer_lab.main {shlex.join(args)}')
  return _gcloud(opts, 'ssh', opts.name, f'--command={remote}')


def make_bundle(path: str, sweep_file_rel: str) -> str:
  """The code the workers need: the package, configs, experiments and the sweep file itself."""
  root = local_lib.repo_root()
  skip = lambda info: None if ('__pycache__' in info.name or info.name.endswith('.pyc')) else info
  with tarfile.open(path, 'w:gz') as tar:
    for part in BUNDLE_PARTS:
      if os.path.exists(os.path.join(root, part)):
        tar.add(os.path.join(root, part), arcname=part, filter=skip)
    if sweep_file_rel not in tar.getnames():
      tar.add(os.path.join(root, sweep_file_rel), arcname=sweep_file_rel)
  return path


def _run_and_log(cmd: list[str], stream: TextIO, log_lines: list[str] | None = None) -> int:
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          stdin=subprocess.DEVNULL, preexec_fn=local_lib.child_preexec(os.getpid()))
  for line in proc.stdout:
    stream.write(line)
    if log_lines is not None:
      log_lines.append(line)
  return proc.wait()


def run_tpu(sweep: Sweep, runs: Sequence[Run], opts: TpuOptions, *, dry_run: bool = False,
            stream: TextIO | None = None) -> dict[str, dict]:
  stream = stream or sys.stdout
  if not opts.name or not opts.zone:
    raise SweepError('--backend=tpu needs --tpu=<name> and --tpu_zone=<zone>')
  if not runs:
    return {}  # nothing to run: not even the code copy
  setup = setup_commands(sweep, opts)
  commands = [(r, run_command(sweep, r, opts)) for r in runs]
  if dry_run:
    for cmd in setup + [c for _, c in commands]:
      print(shlex.join(cmd), file=stream)
    return {}
  make_bundle(bundle_path(sweep), relative_sweep_file(sweep))
  for cmd in setup:
    print(f'[sweep] {shlex.join(cmd)}', file=stream, flush=True)
    rc = _run_and_log(cmd, stream)
    if rc:
      raise SweepError(f'copying the code to {opts.name} failed (exit {rc}): {shlex.join(cmd)}')
  outcomes = {}
  for run, cmd in commands:
    print(f'[sweep] running {run.name} on {opts.name}', file=stream, flush=True)
    log_path = epath.Path(run.workdir) / state_lib.LOG_FILE
    log_path.parent.mkdir(parents=True, exist_ok=True)
    old = log_path.read_text() if log_path.exists() else ''
    lines = [state_lib.attempt_header(state_lib.count_attempts(run.workdir) + 1, shlex.join(cmd))]
    t0 = time.monotonic()
    rc = _run_and_log(cmd, stream, lines)
    log_path.write_text(old + ''.join(lines))  # object stores have no append
    outcome = state_lib.write_outcome(run.workdir, rc, time.monotonic() - t0)
    outcomes[run.name] = outcome
    print(f'[sweep] {outcome["status"]} {run.name} (exit {rc})', file=stream, flush=True)
  return outcomes
