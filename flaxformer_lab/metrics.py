"""Metric logging (JSONL, TensorBoard, console), non-blocking metric fetches, and run summaries.

In the train loop:

  writer = metrics.MetricWriter(workdir, total_steps=config.num_steps, progress=config.progress,
                                start_step=resumed_step)      # None on a fresh start
  fetcher = metrics.AsyncFetcher()
  for step in range(start, num_steps):
    state, m = train_step(state, batch)                # dispatches step + 1
    for s, host_m in fetcher.pop():                    # earlier step's metrics: already computed
      writer.write_scalars(s, host_m)
    if (step + 1) % config.log_every == 0:
      fetcher.push(step + 1, {'train/loss': m['loss'], 'train/lr': lr_fn(step)})
    writer.progress(step + 1)                          # cheap; updates the bar
  for s, host_m in fetcher.pop(): writer.write_scalars(s, host_m)
  writer.write_scalars(num_steps, {'eval/loss': ...})
  writer.close()

Files (process 0 only): `<workdir>/metrics.jsonl`, one JSON object per `write_scalars` call:
{"step": 100, "time": 1764000000.0, "train/loss": 2.31, ...} (train and eval scalars of the same step
may be separate lines; `read_metrics` merges them), and TensorBoard events under
`<workdir>/tensorboard`. `plot_metrics` (flaxformer_lab/plotting.py) draws `<workdir>/loss_curve.png`;
`summarize_runs` + `format_table` compare several workdirs.

Every file goes through `etils.epath`, so a workdir may be a bucket (`gs://...`); there, where
objects cannot be appended to, metrics.jsonl is rewritten whole at each write (it stays small).

Optional sinks, from the run's config (the `config` argument, else `<workdir>/config.json`, which
the train loop writes before opening the writer):
- Weights & Biases when `config.wandb.project` is set (package `wandb`, imported only then): the
  run id is kept in `<workdir>/wandb_id.txt`, so a resumed run continues the same W&B run
  (`resume='allow'`); runs are grouped by `wandb.group`, else by the sweep name; `wandb.mode`
  (or $WANDB_MODE) = offline logs without network. W&B cannot rewind: after a resume, the steps
  that are recomputed are dropped by W&B (it keeps the values logged before the interruption).
- `write_hparams` (used by the sweep summary) writes TensorBoard's HParams records.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import sys
import time
from typing import Any, Iterable, Mapping, Sequence, TextIO

from absl import logging
from etils import epath
import jax
import numpy as np

PROGRESS_MODES = ('auto', 'bar', 'lines', 'off')
METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
WANDB_ID_FILE = 'wandb_id.txt'


def is_local(path: str) -> bool:
  """False for URLs such as gs://bucket/dir."""
  return '://' not in str(path)


def to_float(value: Any, key: str = '') -> float:
  """A Python float from a Python/numpy/jax scalar (or a size-1 array)."""
  arr = np.asarray(jax.device_get(value))
  if arr.size != 1:
    raise ValueError(f'metric {key!r} is not a scalar (shape {arr.shape})')
  return float(arr.reshape(()))


def to_floats(scalars: Mapping[str, Any]) -> dict[str, float]:
  """Fetches (one device_get for all) and converts every value to a float."""
  host = jax.device_get(dict(scalars))
  return {k: to_float(host[k], k) for k in scalars}  # keep the caller's key order


class AsyncFetcher:
  """Holds metrics as device arrays and fetches them only later (nanodo style).

  `push(step, metrics)` never blocks. `pop()` fetches everything pushed earlier: call it right after
  dispatching the next step, so the host waits only for the (finished) earlier step while the
  device works on the new one.
  """

  def __init__(self):
    self._pending: list[tuple[int, Mapping[str, Any]]] = []

  def push(self, step: int, metrics: Mapping[str, Any]) -> None:
    self._pending.append((int(step), dict(metrics)))

  def pop(self) -> list[tuple[int, dict[str, float]]]:
    pending, self._pending = self._pending, []
    return [(step, to_floats(m)) for step, m in pending]

  def __len__(self) -> int:
    return len(self._pending)


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


def _format_scalars(scalars: Mapping[str, float]) -> str:
  return ' | '.join(f'{k} {v:.4g}' for k, v in scalars.items())


class _Rate:
  """Steps per second and ETA, measured from the first observed step (or, with `since_last`, from
  the previous call, so compilation time before the first report does not count)."""

  def __init__(self, total: int | None, since_last: bool = False):
    self.total = total
    self.since_last = since_last
    self._start: tuple[float, int] | None = None

  def update(self, step: int) -> tuple[float, float]:
    now = time.monotonic()
    if self._start is None:
      self._start = (now, step)
      return float('nan'), float('nan')
    t0, s0 = self._start
    if self.since_last:
      self._start = (now, step)
    rate = (step - s0) / (now - t0) if now > t0 and step > s0 else float('nan')
    eta = (self.total - step) / rate if self.total and rate > 0 else float('nan')
    return rate, eta


class _TextBar:
  """A minimal one-line progress bar (used when tqdm is not installed)."""

  def __init__(self, total: int | None, initial: int, stream: TextIO, width: int = 30):
    self.total, self.stream, self.width = total, stream, width
    self.n = initial
    self.postfix = ''
    self._rate = _Rate(total)
    self._rate.update(initial)
    self._last_draw = 0.0

  def _line(self) -> str:
    rate, eta = self._rate.update(self.n)
    if self.total:
      frac = min(self.n / self.total, 1.0)
      filled = int(frac * self.width)
      head = f'{100 * frac:3.0f}%|{"#" * filled}{"." * (self.width - filled)}| {self.n}/{self.total}'
    else:
      head = f'{self.n}'
    rate_s = f'{rate:.2f} step/s' if math.isfinite(rate) else '? step/s'
    return f'\r{head} [{rate_s}, ETA {_format_duration(eta)}] {self.postfix}'

  def update_to(self, step: int, force: bool = False) -> None:
    self.n = step
    now = time.monotonic()
    if force or now - self._last_draw > 0.1:
      self.stream.write(self._line() + '\x1b[K')
      self.stream.flush()
      self._last_draw = now

  def write(self, text: str) -> None:
    self.stream.write('\r\x1b[K' + text + '\n')
    self.update_to(self.n, force=True)

  def close(self) -> None:
    self.update_to(self.n, force=True)
    self.stream.write('\n')
    self.stream.flush()


class _TqdmBar:
  """tqdm with the same small interface as `_TextBar`."""

  def __init__(self, total: int | None, initial: int, stream: TextIO):
    import tqdm  # pylint: disable=g-import-not-at-top
    self._bar = tqdm.tqdm(total=total, initial=initial, file=stream, unit='step',
                          dynamic_ncols=True, smoothing=0.1)
    self.postfix = ''

  def update_to(self, step: int, force: bool = False) -> None:
    del force
    if step > self._bar.n:
      self._bar.update(step - self._bar.n)
    if self.postfix:
      self._bar.set_postfix_str(self.postfix, refresh=False)

  def write(self, text: str) -> None:
    self._bar.write(text, file=self._bar.fp)

  def close(self) -> None:
    self._bar.close()


def _make_bar(total, initial, stream):
  try:
    return _TqdmBar(total, initial, stream)
  except ImportError:
    return _TextBar(total, initial, stream)


class ConsoleReporter:
  """Progress on the console: a bar with ETA ('bar'), periodic lines ('lines'), or nothing ('off').

  'auto' picks 'bar' when the stream is a TTY, else 'lines'. In 'lines' mode every
  `report(step, scalars)` prints `step 100/1000 | train/loss 2.31 | ... | 4.2 step/s | ETA 3:34`
  (speed over the interval since the previous report; the first report has none);
  in 'bar' mode the same text is printed above the bar and the bar shows the latest train loss.
  """

  def __init__(self, mode: str = 'auto', total_steps: int | None = None, initial_step: int = 0,
               stream: TextIO | None = None):
    if mode not in PROGRESS_MODES:
      raise ValueError(f'unknown progress mode {mode!r}; valid: {", ".join(PROGRESS_MODES)}')
    self.stream = stream or sys.stdout
    if mode == 'auto':
      mode = 'bar' if getattr(self.stream, 'isatty', lambda: False)() else 'lines'
    self.mode = mode
    self.total = total_steps
    self._rate = _Rate(total_steps, since_last=True)
    self._bar = _make_bar(total_steps, initial_step, self.stream) if mode == 'bar' else None

  def progress(self, step: int) -> None:
    if self._bar is not None:
      self._bar.update_to(step)

  def report(self, step: int, scalars: Mapping[str, float]) -> None:
    if self.mode == 'off':
      return
    rate, eta = self._rate.update(step)
    total = f'/{self.total}' if self.total else ''
    parts = [f'step {step}{total}']
    if scalars:
      parts.append(_format_scalars(scalars))
    if math.isfinite(rate):
      parts.append(f'{rate:.2f} step/s')
    if self.total and math.isfinite(eta):
      parts.append(f'ETA {_format_duration(eta)}')
    line = ' | '.join(parts)
    if self._bar is not None:
      train = {k: v for k, v in scalars.items() if k.startswith('train/loss')}
      if train:
        self._bar.postfix = _format_scalars(train)
      self._bar.write(line)
      self._bar.update_to(step)
    else:
      self.stream.write(line + '\n')
      self.stream.flush()

  def write(self, text: str) -> None:
    """Prints free text (e.g. samples) without breaking the bar."""
    if self.mode == 'off':
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      self.stream.write(text + '\n')
      self.stream.flush()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def _truncate_jsonl(path: epath.Path, last_step: int) -> list[str]:
  """Drops records with step > last_step (written after the checkpoint we resume from); returns
  the kept lines."""
  keep = []
  for line in path.read_text().splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut by a crash
    if rec.get('step', -1) <= last_step:
      keep.append(json.dumps(rec) + '\n')
  if is_local(str(path)):
    tmp = str(path) + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(keep)
    os.replace(tmp, str(path))
  else:
    path.write_text(''.join(keep))
  return keep


class _JsonlFile:
  """Appends lines: a real append locally, a whole rewrite on object stores (no append there)."""

  def __init__(self, path: epath.Path, existing: list[str] | None = None):
    self.path = path
    self._local = is_local(str(path))
    if self._local:
      self._f = open(str(path), 'a')
    else:
      self._lines = existing if existing is not None else (
          path.read_text().splitlines(keepends=True) if path.exists() else [])

  def write(self, line: str) -> None:
    if self._local:
      self._f.write(line)
      self._f.flush()
    else:
      self._lines.append(line)
      self.path.write_text(''.join(self._lines))

  def close(self) -> None:
    if self._local:
      self._f.close()


def _load_config(workdir: str, config: Any) -> dict[str, Any]:
  if config is not None:
    return config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  path = epath.Path(workdir) / 'config.json'
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, ValueError, OSError):
    return {}


class WandbRun:
  """A W&B run for a workdir; its id lives in `<workdir>/wandb_id.txt` so resumes continue it."""

  def __init__(self, workdir: str, config: Mapping[str, Any]):
    try:
      import wandb  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError('config.wandb.project is set but wandb is not installed: pip install '
                        'wandb (or pip install -e ".[cluster]"), or set --config.wandb.project=""'
                        ) from None
    w, sweep = dict(config.get('wandb', {})), dict(config.get('sweep', {}))
    id_path = epath.Path(workdir) / WANDB_ID_FILE
    if id_path.exists():
      run_id = id_path.read_text().strip()
    else:
      run_id = ''.join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
      id_path.write_text(run_id + '\n')
    local_dir = workdir if is_local(workdir) else None  # wandb writes its files locally
    name = sweep.get('run') or os.path.basename(os.path.normpath(str(workdir)))
    self.run = wandb.init(project=w['project'], entity=w.get('entity') or None,
                          group=w.get('group') or sweep.get('name') or None, name=name,
                          id=run_id, resume='allow', config=dict(config), dir=local_dir,
                          mode=w.get('mode') or None)
    self.id = run_id

  def log(self, step: int, values: Mapping[str, float]) -> None:
    self.run.log(dict(values), step=int(step))

  def close(self) -> None:
    self.run.finish()


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl`, TensorBoard and the console (process 0 only)."""

  def __init__(self, workdir: str, *, total_steps: int | None = None, progress: str = 'auto',
               start_step: int | None = None, tensorboard: bool = True,
               is_primary: bool | None = None, stream: TextIO | None = None,
               config: Any = None):
    """Opens the sinks.

    Args:
      workdir: run directory (created).
      total_steps: for the bar and ETA.
      progress: 'auto' | 'bar' | 'lines' | 'off' (config.progress).
      start_step: when resuming from a checkpoint at this step: metrics.jsonl keeps the records up
        to it (later ones are recomputed) and appends; TensorBoard purges events after it.
        None: append to whatever is there.
      tensorboard: write TensorBoard events (needs tensorboardX).
      is_primary: whether this process writes (default: jax.process_index() == 0).
      stream: console stream (default sys.stdout).
      config: the run's config (ConfigDict or dict), for the optional W&B sink; None reads
        `<workdir>/config.json` when there is one.
    """
    self.workdir = str(workdir)
    self.is_primary = jax.process_index() == 0 if is_primary is None else bool(is_primary)
    self.path = epath.Path(self.workdir) / METRICS_FILE
    self._file = None
    self._tb = None
    self._console = None
    self._wandb = None
    if not self.is_primary:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    existing = None
    if start_step is not None and self.path.exists():
      existing = _truncate_jsonl(self.path, int(start_step))
    self._file = _JsonlFile(self.path, existing)
    if tensorboard:
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError('tensorboardX is not installed: install it (requirements.txt) or pass '
                          'tensorboard=False') from e
      purge = None if start_step is None else int(start_step) + 1
      self._tb = tensorboardX.SummaryWriter(os.path.join(self.workdir, TENSORBOARD_DIR),
                                            purge_step=purge, flush_secs=30)
    run_config = _load_config(self.workdir, config)
    if run_config.get('wandb', {}).get('project'):
      self._wandb = WandbRun(self.workdir, run_config)
    self._console = ConsoleReporter(progress, total_steps, int(start_step or 0), stream)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs `{name: scalar}` for `step` (values may be jax/numpy; they are fetched here)."""
    if not self.is_primary:
      return
    values = to_floats(scalars)
    step = int(step)
    record = {'step': step, 'time': round(time.time(), 3), **values}
    self._file.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)
    if self._wandb is not None:
      self._wandb.log(step, values)
    self._console.report(step, values)

  def progress(self, step: int) -> None:
    """Advances the progress bar (no device sync; call every step)."""
    if self._console is not None:
      self._console.progress(int(step))

  def write_text(self, text: str) -> None:
    """Prints free text (samples, notices) on the console of process 0."""
    if self._console is not None:
      self._console.write(text)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._wandb is not None:
      self._wandb.close()
      self._wandb = None
    if self._console is not None:
      self._console.close()
      self._console = None

  def __enter__(self) -> 'MetricWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# --- reading runs back ---------------------------------------------------------------------------


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Records of `<workdir>/metrics.jsonl` merged by step and sorted by step.

  If a step was logged more than once (e.g. a resumed run appended without truncation), the
  later value of each key wins. A malformed line (a crash mid-write) is skipped with a warning.
  """
  path = epath.Path(workdir) / METRICS_FILE
  by_step: dict[int, dict[str, Any]] = {}
  with path.open('r') as f:
    for i, line in enumerate(f):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        logging.warning('%s:%d: skipping a malformed line', path, i + 1)
        continue
      by_step.setdefault(int(rec['step']), {}).update(rec)
  return [by_step[s] for s in sorted(by_step)]


def series(records: Iterable[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the records that have `key`."""
  pairs = [(r['step'], r[key]) for r in records if key in r and r[key] is not None]
  if not pairs:
    return np.zeros((0,), np.int64), np.zeros((0,), np.float64)
  steps, values = zip(*pairs)
  return np.asarray(steps), np.asarray(values, np.float64)


def summarize_run(workdir: str, metric: str = 'eval/loss',
                  train_metric: str = 'train/loss') -> dict[str, Any]:
  """One row: final step, final train metric, final and best (lowest) `metric` with its step."""
  records = read_metrics(workdir)
  row: dict[str, Any] = {'run': os.path.basename(os.path.normpath(workdir)), 'workdir': workdir,
                         'last_step': records[-1]['step'] if records else None}
  steps, train = series(records, train_metric)
  row[f'final_{train_metric}'] = float(train[-1]) if train.size else None
  steps, vals = series(records, metric)
  finite = np.isfinite(vals)
  row[f'final_{metric}'] = float(vals[-1]) if vals.size else None
  if finite.any():
    best = int(np.argmin(np.where(finite, vals, np.inf)))
    row[f'best_{metric}'] = float(vals[best])
    row[f'best_{metric}_step'] = int(steps[best])
  else:
    row[f'best_{metric}'] = None
    row[f'best_{metric}_step'] = None
  return row


def summarize_runs(workdirs: Sequence[str], metric: str = 'eval/loss',
                   train_metric: str = 'train/loss') -> list[dict[str, Any]]:
  """`summarize_run` for each workdir (a sweep's runs), in the given order."""
  return [summarize_run(w, metric, train_metric) for w in workdirs]


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
  """A Markdown table of `rows` (floats with 4 significant digits; None as '-')."""
  if not rows:
    return ''
  columns = list(columns or [c for c in rows[0] if c != 'workdir'])

  def cell(v):
    if v is None:
      return '-'
    if isinstance(v, float):
      return f'{v:.4g}'
    return str(v)

  body = [[cell(r.get(c)) for c in columns] for r in rows]
  widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
  fmt = lambda cells: '| ' + ' | '.join(x.ljust(w) for x, w in zip(cells, widths)) + ' |'
  lines = [fmt(columns), '|' + '|'.join('-' * (w + 2) for w in widths) + '|']
  lines += [fmt(b) for b in body]
  return '\n'.join(lines)


def write_hparams(logdir: str, runs: Sequence[tuple[str, Mapping[str, Any], Mapping[str, float]]]
                  ) -> None:
  """TensorBoard HParams records (tensorboardX): one session per (run name, hparams, metrics).

  `logdir` is replaced: each run gets `<logdir>/<run name>/`; open it with
  `tensorboard --logdir <logdir>` and the HPARAMS tab. Values that are not bool/int/float/str
  are written as text; metric values must be floats (NaN for a missing one).
  """
  import tensorboardX  # pylint: disable=g-import-not-at-top
  root = epath.Path(logdir)
  if root.exists():
    root.rmtree()
  root.mkdir(parents=True, exist_ok=True)
  with tensorboardX.SummaryWriter(str(root)) as writer:
    for name, hparams, metric_values in runs:
      hp = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
      mv = {k: float('nan') if v is None else float(v) for k, v in metric_values.items()}
      writer.add_hparams(hp, mv, name=name)


def plot_metrics(workdir: str, **kwargs) -> str:
  """`plotting.plot_metrics`: writes `<workdir>/loss_curve.png` (train and eval loss vs step)."""
  from flaxformer_lab import plotting  # pylint: disable=g-import-not-at-top
  return plotting.plot_metrics(workdir, **kwargs)
