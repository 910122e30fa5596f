r"""Runs a sweep: `python -m flaxformer_lab.sweep --sweep=experiments/<name>/config.py[:<arg>]
--workdir=<dir> [--backend=local|slurm|tpu] [--parallel=N] [--dry_run] [--status] [--summarize]`.

A sweep file defines `get_config(arg)` (the base training config) and `get_sweep(arg)` (a list of
{dotted key: value} overrides; see flaxformer_lab/sweeps/spec.py). Each run trains in
`<workdir>/<run name>/` with `python -m flaxformer_lab.main`, and its config.json records
`sweep.name`, `sweep.run` and `sweep.coordinates`.

Rerunning the same command skips finished (done or diverged) runs and resumes interrupted ones
from their last checkpoint. It exits 0 when every run is done or diverged (a non-finite loss is a
result), 1 naming the failed runs, and 2 with one line for a bad sweep or flag (an override that
names no config key is caught here, before anything runs).

  --status      a table: run, status (done/diverged/failed/running/pending), steps, attempts
  --summarize   results.csv, results.md, loss_curves.png, final_<metric>_vs_<x>.png and
                TensorBoard HParams (<workdir>/tensorboard_hparams) from the runs' metrics
  --dry_run     print what would run (commands, job specifications) and run nothing
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time

from absl import flags

from flaxformer_lab import errors
from flaxformer_lab.sweeps import spec as spec_lib
from flaxformer_lab.sweeps import state as state_lib

FLAGS = flags.FLAGS
_SWEEP = flags.DEFINE_string('sweep', None, 'Sweep file and optional arg: path/config.py[:arg].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory; each run in <workdir>/<run>/.')
_BACKEND = flags.DEFINE_enum('backend', 'local', ['local', 'slurm', 'tpu'], 'Where runs go.')
_PARALLEL = flags.DEFINE_integer(
    'parallel', 0, 'Runs at a time (local; slurm: array parallelism). 0 = half the CPU cores '
    '(each JAX process uses several threads), at least 1.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the commands / job specs; run nothing.')
_STATUS = flags.DEFINE_bool('status', False, 'Print the status table and exit.')
_SUMMARIZE = flags.DEFINE_bool('summarize', False, 'Write and print the results and exit.')
_METRIC = flags.DEFINE_string('metric', 'eval/loss', 'Metric of the summary (best: highest for '
                              'accuracy, BLEU and agreement metrics, else lowest).')
# SLURM (submitit).
_SLURM_PARTITION = flags.DEFINE_string('slurm_partition', '', 'SLURM partition.')
_SLURM_ACCOUNT = flags.DEFINE_string('slurm_account', '', 'SLURM account.')
_SLURM_NODES = flags.DEFINE_integer('slurm_nodes', 1, 'Nodes per run.')
_SLURM_TASKS = flags.DEFINE_integer('slurm_tasks_per_node', 1, 'Processes per node.')
_SLURM_GPUS = flags.DEFINE_integer('slurm_gpus_per_node', 0, 'GPUs per node.')
_SLURM_CPUS = flags.DEFINE_integer('slurm_cpus_per_task', 0, 'CPUs per task (0 = default).')
_SLURM_TIME = flags.DEFINE_integer('slurm_time_min', 60, 'Time limit per run, minutes.')
_SLURM_CLUSTER = flags.DEFINE_string('slurm_cluster', '',
                                     "'' = SLURM; 'local' = submitit's local executor (tests).")
_SLURM_WAIT = flags.DEFINE_bool('slurm_wait', True, 'Wait for the jobs and report outcomes.')
# TPU pod (gcloud).
_TPU = flags.DEFINE_string('tpu', '', 'TPU VM / pod name.')
_TPU_ZONE = flags.DEFINE_string('tpu_zone', '', 'Zone of the TPU.')
_TPU_PROJECT = flags.DEFINE_string('tpu_project', '', "GCP project ('' = gcloud's default).")
_TPU_DIR = flags.DEFINE_string('tpu_dir', 'flaxformer_lab', 'Code directory on every worker.')
_TPU_PYTHON = flags.DEFINE_string('tpu_python', 'python3', 'Python on the workers.')
_TPU_SETUP = flags.DEFINE_string('tpu_setup', '', 'Shell command run on every worker after the '
                                 "copy, in the code directory (e.g. 'pip install -r "
                                 "requirements.txt jax[tpu]').")


fail = errors.fail


def parse_flags(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(' '.join(str(e).split()))


def default_parallel() -> int:
  return max(1, (os.cpu_count() or 2) // 2)


def _commit() -> str:
  try:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(['git', '-C', root, 'rev-parse', 'HEAD'], capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ''


def write_manifest(sweep: spec_lib.Sweep) -> None:
  """<workdir>/sweep.json: what was run, from which file, at which commit."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(sweep.workdir)
  path.mkdir(parents=True, exist_ok=True)
  manifest = {'name': sweep.name, 'file': sweep.file, 'arg': sweep.arg, 'commit': _commit(),
              'written': time.strftime('%Y-%m-%d %H:%M:%S'),
              'runs': [{'name': r.name, 'overrides': r.overrides} for r in sweep.runs]}
  (path / 'sweep.json').write_text(json.dumps(manifest, indent=1, default=str) + '\n')


def print_status(sweep: spec_lib.Sweep) -> None:
  from flaxformer_lab import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from flaxformer_lab.sweeps import results  # pylint: disable=g-import-not-at-top
  rows = results.status_rows(sweep)
  print(metrics_lib.format_table(rows))
  counts = {s: sum(r['status'] == s for r in rows) for s in state_lib.STATUSES}
  print(' '.join(f'{s}={n}' for s, n in counts.items() if n))


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _SWEEP.value:
    fail('--sweep is required (e.g. --sweep=experiments/prepost_ln/config.py:smoke)')
  if not _WORKDIR.value:
    fail('--workdir is required')
  workdir = _WORKDIR.value
  if state_lib.runlock.is_local(workdir):
    workdir = os.path.abspath(workdir)
  try:
    sweep = spec_lib.load(_SWEEP.value, workdir)
  except spec_lib.SweepError as e:
    fail(str(e))
  if _STATUS.value:
    print_status(sweep)
    return
  if _SUMMARIZE.value:
    from flaxformer_lab.sweeps import results  # pylint: disable=g-import-not-at-top
    out = results.summarize(sweep, _METRIC.value)
    print(out['table'])
    print(f'\nwrote {out["csv"]}, {out["md"]}' +
          ''.join(f', {out[k]}' for k in ('curves', 'final') if out.get(k)) +
          (f'; HParams in {out["hparams"]}' if out.get('hparams') else ''))
    return

  states = {r.name: state_lib.run_state(r.workdir) for r in sweep.runs}
  todo = [r for r in sweep.runs if states[r.name].status in ('pending', 'failed')]
  counts = {s: sum(st.status == s for st in states.values()) for s in state_lib.STATUSES}
  print(f'[sweep] {sweep.name}: {len(sweep.runs)} runs: ' +
        ', '.join(f'{n} {s}' for s, n in counts.items() if n) +
        f'; starting {len(todo)}', flush=True)
  for r in sweep.runs:
    if states[r.name].status == 'running':
      h = states[r.name].holder or {}
      print(f'[sweep] skipping {r.name}: running as pid {h.get("pid")} on {h.get("host")}')
  parallel = _PARALLEL.value or default_parallel()
  if _BACKEND.value == 'local' and _DRY_RUN.value:
    for r in todo:
      print(shlex.join(sweep.run_argv(r)))
    return
  if not _DRY_RUN.value:
    write_manifest(sweep)
  try:
    if _BACKEND.value == 'local':
      from flaxformer_lab.sweeps import local  # pylint: disable=g-import-not-at-top
      local.run_local(sweep, todo, parallel)
    elif _BACKEND.value == 'slurm':
      from flaxformer_lab.sweeps import slurm  # pylint: disable=g-import-not-at-top
      opts = slurm.SlurmOptions(
          partition=_SLURM_PARTITION.value, account=_SLURM_ACCOUNT.value,
          nodes=_SLURM_NODES.value, tasks_per_node=_SLURM_TASKS.value,
          gpus_per_node=_SLURM_GPUS.value, cpus_per_task=_SLURM_CPUS.value,
          time_min=_SLURM_TIME.value, cluster=_SLURM_CLUSTER.value, wait=_SLURM_WAIT.value)
      slurm.run_slurm(sweep, todo, opts, parallel, dry_run=_DRY_RUN.value)
      if _DRY_RUN.value or not opts.wait:
        return
    else:
      from flaxformer_lab.sweeps import tpu  # pylint: disable=g-import-not-at-top
      opts = tpu.TpuOptions(name=_TPU.value, zone=_TPU_ZONE.value, project=_TPU_PROJECT.value,
                            remote_dir=_TPU_DIR.value, python=_TPU_PYTHON.value,
                            setup=_TPU_SETUP.value)
      tpu.run_tpu(sweep, todo, opts, dry_run=_DRY_RUN.value)
      if _DRY_RUN.value:
        return
  except spec_lib.SweepError as e:
    fail(str(e))
  final = {r.name: state_lib.run_state(r.workdir) for r in sweep.runs}
  failed = [n for n, st in final.items() if st.status == 'failed']
  counts = {s: sum(st.status == s for st in final.values()) for s in state_lib.STATUSES}
  print(f'[sweep] {sweep.name}: ' + ', '.join(f'{n} {s}' for s, n in counts.items() if n),
        flush=True)
  if failed:
    fail(f'{len(failed)} run(s) failed: {", ".join(failed)} (logs: '
         f'{os.path.join(sweep.workdir, "<run>", state_lib.LOG_FILE)})', code=1)


def run():
  errors.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
