"""The state of a sweep's runs, read from their run directories (local paths or gs:// via epath).

Files the sweep adds to a run directory (besides the training's own config.json, metrics.jsonl,
checkpoints/):
  sweep.log        the output of every attempt, each after a `=== sweep attempt N ...` header line
  sweep_run.json   written when an attempt ends: {"status", "returncode", "attempts", "wall_s",
                   "last_attempt_s", "finished"}; wall_s sums the attempts that ended (an attempt
                   cut by a SIGKILLed sweep command leaves no record)

Statuses:
  done      the run ended with exit 0 (or its checkpoint already holds config.num_steps)
  diverged  the training stopped on a non-finite loss (exit 3): a result, not a failure
  failed    any other exit status (rerun by the next sweep command)
  running   a live process holds the run directory's lock (flaxformer_lab/runlock.py)
  pending   not started, or interrupted (`ckpt` says where it resumes)
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from typing import Any

from etils import epath

from flaxformer_lab import runlock

OUTCOME_FILE = 'sweep_run.json'
LOG_FILE = 'sweep.log'
EXIT_DIVERGED = 3  # flaxformer_lab.main's status for a non-finite loss
STATUSES = ('done', 'diverged', 'failed', 'running', 'pending')


def status_from_returncode(rc: int) -> str:
  return 'done' if rc == 0 else 'diverged' if rc == EXIT_DIVERGED else 'failed'


def read_json(path: epath.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, ValueError, OSError):
    return None


def read_outcome(workdir: str) -> dict[str, Any] | None:
  return read_json(epath.Path(workdir) / OUTCOME_FILE)


def write_outcome(workdir: str, returncode: int, attempt_s: float) -> dict[str, Any]:
  """Records an ended attempt (accumulating attempts and wall time)."""
  old = read_outcome(workdir) or {}
  out = {'status': status_from_returncode(returncode), 'returncode': int(returncode),
         'attempts': int(old.get('attempts', 0)) + 1,
         'wall_s': round(float(old.get('wall_s', 0.0)) + attempt_s, 3),
         'last_attempt_s': round(attempt_s, 3), 'finished': round(time.time(), 3)}
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / OUTCOME_FILE).write_text(json.dumps(out, indent=1) + '\n')
  return out


def attempt_header(attempt: int, command: str) -> str:
  return (f'=== sweep attempt {attempt} at {time.strftime("%Y-%m-%d %H:%M:%S")} on '
          f'{socket.gethostname()}: {command}\n')


def count_attempts(workdir: str) -> int:
  """Attempts started, from the headers in sweep.log."""
  try:
    text = (epath.Path(workdir) / LOG_FILE).read_text()
  except (FileNotFoundError, OSError):
    return 0
  return sum(1 for line in text.splitlines() if line.startswith('=== sweep attempt '))


def checkpoint_steps(workdir: str) -> list[int]:
  """Finalized checkpoint steps (orbax's integer-named step directories)."""
  d = epath.Path(workdir) / 'checkpoints'
  try:
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())
  except (FileNotFoundError, OSError):
    return []


def _records(workdir: str) -> list[dict[str, Any]]:
  try:
    text = (epath.Path(workdir) / 'metrics.jsonl').read_text()
  except (FileNotFoundError, OSError):
    return []
  out = []
  for line in text.splitlines():
    try:
      out.append(json.loads(line))
    except ValueError:
      continue  # a line cut by a kill
  return out


def last_logged_step(workdir: str, records=None) -> int | None:
  steps = [r['step'] for r in (records if records is not None else _records(workdir))
           if isinstance(r.get('step'), int)]
  return max(steps) if steps else None


def has_final_eval(records, num_steps: int) -> bool:
  """Whether the end-of-training evaluation (an eval/* metric at num_steps) was logged."""
  return any(r.get('step') == num_steps and any(k.startswith('eval/') for k in r)
             for r in records)


@dataclasses.dataclass
class RunState:
  status: str
  steps: int | None  # last step in metrics.jsonl
  ckpt: int | None  # latest finalized checkpoint
  num_steps: int | None  # from the run's config.json
  attempts: int
  outcome: dict[str, Any] | None
  holder: dict[str, Any] | None  # the lock holder of a running run


def run_state(workdir: str, num_steps: int | None = None) -> RunState:
  """The status of one run directory (see the module docstring)."""
  outcome = read_outcome(workdir)
  config = read_json(epath.Path(workdir) / 'config.json') or {}
  num_steps = config.get('num_steps', num_steps)
  ckpts = checkpoint_steps(workdir)
  ckpt = ckpts[-1] if ckpts else None
  holder = runlock.holder(workdir)
  records = _records(workdir)
  if holder is not None:
    status = 'running'
  elif outcome and outcome.get('status') in ('done', 'diverged'):
    status = outcome['status']
  elif (ckpt is not None and num_steps is not None and ckpt >= int(num_steps)
        and has_final_eval(records, int(num_steps))):
    status = 'done'  # finished, though its sweep command died before recording it
  elif outcome and outcome.get('status') == 'failed':
    status = 'failed'
  else:
    status = 'pending'
  return RunState(status, last_logged_step(workdir, records), ckpt, num_steps,
                  count_attempts(workdir), outcome, holder)
