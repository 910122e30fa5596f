"""SLURM backend through submitit (optional dependency: `pip install submitit`).

All runs are submitted at once as one job array (`executor.batch()`), at most `--parallel` running
together. Each job runs `execute` on its node(s): the same `python -m flaxformer_lab.main` command
as the local backend, with its output in `<run dir>/sweep.log` and its outcome in
`<run dir>/sweep_run.json`, written by the job itself (rank 0), so `--status` and `--summarize`
need nothing from the submitting machine. A job with several tasks (nodes x tasks_per_node > 1)
sets FLAXFORMER_DISTRIBUTED=1 and `jax.distributed.initialize()` reads the SLURM environment
(SLURM_NTASKS, SLURM_PROCID, the node list) to find its coordinator.

Tests use submitit's local executor (`--slurm_cluster=local`): no SLURM needed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence, TextIO

from flaxformer_lab.sweeps import local as local_lib
from flaxformer_lab.sweeps import state as state_lib
from flaxformer_lab.sweeps.spec import Run, Sweep, SweepError


@dataclasses.dataclass
class SlurmOptions:
  partition: str = ''
  account: str = ''
  nodes: int = 1
  tasks_per_node: int = 1  # processes per node (jax: 1 per node, or 1 per GPU)
  gpus_per_node: int = 0
  cpus_per_task: int = 0  # 0 = the cluster default
  time_min: int = 60
  cluster: str = ''  # '' = SLURM (submitit auto-detects), 'local' = submitit's local executor
  wait: bool = True  # wait for the jobs and report their outcomes


def execute(argv: Sequence[str], workdir: str, env_extra: Mapping[str, str]) -> int:
  """Runs one training command inside a job (every task of it) and records the outcome."""
  import submitit  # pylint: disable=g-import-not-at-top
  job_env = submitit.JobEnvironment()
  rank, ntasks = job_env.global_rank, job_env.num_tasks
  extra = dict(env_extra)
  if ntasks > 1:
    extra['FLAXFORMER_DISTRIBUTED'] = '1'  # jax.distributed.initialize() reads SLURM's variables
  os.makedirs(workdir, exist_ok=True)
  log_name = state_lib.LOG_FILE if rank == 0 else f'sweep.task{rank}.log'
  with open(os.path.join(workdir, log_name), 'a') as log:
    if rank == 0:
      log.write(state_lib.attempt_header(state_lib.count_attempts(workdir) + 1,
                                         f'[slurm job {job_env.job_id}] ' + shlex.join(argv)))
      log.flush()
    t0 = time.monotonic()
    rc = subprocess.call(list(argv), stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, env=local_lib.run_env(extra),
                         preexec_fn=local_lib.child_preexec(os.getpid()))
  if rank == 0:
    state_lib.write_outcome(workdir, rc, time.monotonic() - t0)
  return rc


def executor_parameters(sweep: Sweep, opts: SlurmOptions, parallel: int) -> dict[str, Any]:
  params: dict[str, Any] = {'name': sweep.name.replace(':', '_'), 'timeout_min': opts.time_min,
                            'nodes': opts.nodes, 'tasks_per_node': opts.tasks_per_node,
                            'slurm_array_parallelism': max(1, parallel)}
  if opts.gpus_per_node:
    params['gpus_per_node'] = opts.gpus_per_node
  if opts.cpus_per_task:
    params['cpus_per_task'] = opts.cpus_per_task
  if opts.partition:
    params['slurm_partition'] = opts.partition
  if opts.account:
    params['slurm_account'] = opts.account
  return params


def job_specs(sweep: Sweep, runs: Sequence[Run], opts: SlurmOptions,
              parallel: int) -> list[dict[str, Any]]:
  """What `--dry_run` prints: the executor parameters and each job's command."""
  params = executor_parameters(sweep, opts, parallel)
  return [{'run': r.name, 'workdir': r.workdir, 'executor': params,
           'command': shlex.join(sweep.run_argv(r)),
           'distributed': opts.nodes * opts.tasks_per_node > 1} for r in runs]


def run_slurm(sweep: Sweep, runs: Sequence[Run], opts: SlurmOptions, parallel: int, *,
              dry_run: bool = False, stream: TextIO | None = None) -> dict[str, dict]:
  stream = stream or sys.stdout
  if dry_run:
    for spec in job_specs(sweep, runs, opts, parallel):
      print(json.dumps(spec), file=stream)
    return {}
  try:
    import submitit  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SweepError('--backend=slurm needs submitit: pip install submitit '
                     '(or pip install -e ".[cluster]")') from None
  folder = os.path.join(sweep.workdir, 'submitit', '%j')
  executor = submitit.AutoExecutor(folder=folder, cluster=opts.cluster or None)
  executor.update_parameters(**executor_parameters(sweep, opts, parallel))
  with executor.batch():
    jobs = [executor.submit(execute, sweep.run_argv(r), r.workdir, {}) for r in runs]
  for run, job in zip(runs, jobs):
    print(f'[sweep] submitted {run.name} as job {job.job_id}', file=stream, flush=True)
  if not opts.wait:
    return {}
  outcomes = {}
  for run, job in zip(runs, jobs):
    try:
      job.results()
    except Exception as e:  # pylint: disable=broad-except  # the job itself failed (node, time)
      print(f'[sweep] job {job.job_id} ({run.name}) failed: {str(e).splitlines()[0][:200]}',
            file=stream, flush=True)
    outcome = state_lib.read_outcome(run.workdir) or {'status': 'failed', 'returncode': None}
    outcomes[run.name] = outcome
    print(f'[sweep] {outcome["status"]} {run.name} (job {job.job_id})', file=stream, flush=True)
  return outcomes
