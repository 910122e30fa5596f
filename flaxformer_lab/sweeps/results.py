"""A sweep's results: the status table, results.csv / results.md, plots and TensorBoard HParams.

Summary columns, one row per run (values read from each run's metrics.jsonl and sweep_run.json):
  run, <each swept coordinate>, status, steps (last logged step), final/best <metric> (best = the
  lowest finite value), final train/loss (last logged), diverged, wall_s (summed over the attempts
  that ended), tokens_per_s (median of the logged train/tokens_per_s windows).
Plots (PNG in the sweep workdir):
  loss_curves.png             every run's train loss (eval loss dotted), colour by one coordinate,
                              line style by another, one panel per value of the panel coordinates
  final_<metric>_vs_<x>.png   the final metric against coordinate x, one line per colour
                              coordinate value (mean over the other coordinates; each run a dot;
                              diverged runs as crosses at the top of the panel)
The sweep file's optional `get_plots(arg)` picks x / color / style / panels; otherwise they are
inferred from the swept keys.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
from typing import Any, Sequence

from etils import epath
import numpy as np

from flaxformer_lab import metrics as metrics_lib
from flaxformer_lab.sweeps import state as state_lib
from flaxformer_lab.sweeps.spec import Sweep, format_value, short_keys

RESULTS_CSV = 'results.csv'
RESULTS_MD = 'results.md'
HPARAMS_DIR = 'tensorboard_hparams'


# --- finding an experiment's runs again (staged experiments: experiments/<name>/analyze.py) -------


def last_value(workdir: str, key: str) -> Any:
  """The last logged value of `key` in a run's metrics.jsonl (None if never logged or no file)."""
  try:
    records = metrics_lib.read_metrics(workdir)
  except FileNotFoundError:
    return None
  values = [r[key] for r in records if key in r]
  return values[-1] if values else None


def runs_by_config(sweep_dir: str, key_of, order: Sequence[Any] | None = None) -> dict[Any, str]:
  """key_of(run's config.json) -> run directory, for the runs of a sweep directory.

  A run whose key is None is left out; with `order`, the result holds those keys in that order.
  """
  out = {}
  for name in sorted(os.listdir(sweep_dir)):
    cfg = state_lib.read_json(epath.Path(sweep_dir) / name / 'config.json')
    if cfg is not None:
      key = key_of(cfg)
      if key is not None:
        out[key] = os.path.join(sweep_dir, name)
  return out if order is None else {k: out[k] for k in order if k in out}


def runs_by_init_from(sweep_dir: str) -> dict[str, str]:
  """Source run (a fine-tuning run's `init_from`, normalized) -> the fine-tuning run directory."""
  return runs_by_config(sweep_dir, lambda c: os.path.normpath(c['init_from']) if c.get('init_from')
                        else None)


def status_rows(sweep: Sweep) -> list[dict[str, Any]]:
  rows = []
  for run in sweep.runs:
    st = state_lib.run_state(run.workdir, run.overrides.get('num_steps',
                                                           sweep.base_config.get('num_steps')))
    note = ''
    if st.status == 'running' and st.holder:
      note = f'pid {st.holder.get("pid")} on {st.holder.get("host")}'
    elif st.status == 'pending' and st.ckpt is not None:
      note = f'resumes from step {st.ckpt}'
    elif st.status in ('failed', 'diverged'):
      note = f'exit {st.outcome.get("returncode")}; see {run.workdir}/{state_lib.LOG_FILE}'
    total = st.num_steps if st.num_steps is not None else '?'
    rows.append({'run': run.name, 'status': st.status,
                 'steps': f'{st.steps if st.steps is not None else 0}/{total}',
                 'attempts': st.attempts, 'note': note})
  return rows


def _coordinate_columns(sweep: Sweep) -> dict[str, str]:
  return short_keys(sweep.swept_keys)


# Metric names whose best value is the largest (accuracy, BLEU, agreement); others: the smallest.
_HIGHER_IS_BETTER = ('accuracy', 'bleu', 'agreement', 'tokens_per_s')


def higher_is_better(metric: str) -> bool:
  return any(word in metric.rsplit('/', 1)[-1] for word in _HIGHER_IS_BETTER)


def summary_rows(sweep: Sweep, metric: str = 'eval/loss') -> list[dict[str, Any]]:
  cols = _coordinate_columns(sweep)
  rows = []
  for run in sweep.runs:
    st = state_lib.run_state(run.workdir)
    row: dict[str, Any] = {'run': run.name}
    for key, short in cols.items():
      row[short] = run.overrides.get(key, _lookup(sweep.base_config, key))
    row['status'] = st.status
    try:
      records = metrics_lib.read_metrics(run.workdir)
    except FileNotFoundError:
      records = []
    row['steps'] = records[-1]['step'] if records else 0
    _, vals = metrics_lib.series(records, metric)
    finite = vals[np.isfinite(vals)]
    row[f'final_{metric}'] = float(vals[-1]) if vals.size else None
    best = (finite.max() if higher_is_better(metric) else finite.min()) if finite.size else None
    row[f'best_{metric}'] = None if best is None else float(best)
    _, train = metrics_lib.series(records, 'train/loss')
    row['final_train/loss'] = float(train[-1]) if train.size else None
    row['diverged'] = st.status == 'diverged'
    row['wall_s'] = (st.outcome or {}).get('wall_s')
    _, tps = metrics_lib.series(records, 'train/tokens_per_s')
    row['tokens_per_s'] = float(np.median(tps)) if tps.size else None
    rows.append(row)
  return rows


def _lookup(config, key: str):
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def _cell(v: Any) -> str:
  if v is None:
    return ''
  if isinstance(v, float):
    return f'{v:.6g}'
  return str(v)


def write_tables(sweep: Sweep, rows: Sequence[dict[str, Any]]) -> tuple[str, str]:
  out = epath.Path(sweep.workdir)
  out.mkdir(parents=True, exist_ok=True)
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
  writer.writeheader()
  for r in rows:
    writer.writerow({k: _cell(v) for k, v in r.items()})
  (out / RESULTS_CSV).write_text(buf.getvalue())
  table = metrics_lib.format_table(rows)
  header = (f'# Sweep {sweep.name}\n\n{len(rows)} runs of `{sweep.config_flag}` in '
            f'`{sweep.workdir}`.\n\n')
  (out / RESULTS_MD).write_text(header + table + '\n')
  return str(out / RESULTS_CSV), table


def write_hparams(sweep: Sweep, rows: Sequence[dict[str, Any]], metric: str) -> str:
  cols = _coordinate_columns(sweep)
  sessions = []
  for row in rows:
    hp = {short: row[short] for short in cols.values()}
    mv = {f'hparam/final_{metric}': row[f'final_{metric}'],
          f'hparam/best_{metric}': row[f'best_{metric}'],
          'hparam/final_train_loss': row['final_train/loss'],
          'hparam/diverged': float(row['diverged'])}
    sessions.append((row['run'], hp, mv))
  logdir = os.path.join(sweep.workdir, HPARAMS_DIR)
  metrics_lib.write_hparams(logdir, sessions)
  return logdir


# --- plots -------------------------------------------------------------------------------------------
def plot_spec(sweep: Sweep) -> dict[str, Any]:
  """{'x', 'color', 'style', 'panels'} as dotted keys (from get_plots or inferred)."""
  keys = sweep.swept_keys
  # keys a variant of the sweep does not vary are dropped (then inferred as below)
  spec = {k: v for k, v in sweep.plots.items() if k != 'panels' and v in keys}
  spec['panels'] = [k for k in sweep.plots.get('panels', []) if k in keys]
  numeric = [k for k in keys if all(isinstance(r.overrides.get(k), (int, float))
                                    and not isinstance(r.overrides.get(k), bool)
                                    for r in sweep.runs if k in r.overrides)]
  spec.setdefault('color', keys[0] if keys else None)
  rest = [k for k in keys if k != spec['color']]
  spec.setdefault('x', next((k for k in numeric if k != spec['color']), None))
  spec.setdefault('style', next((k for k in rest if k != spec['x'] and k not in spec['panels']),
                                None))
  return spec


def _values(sweep, key):
  return list(dict.fromkeys(r.overrides.get(key, _lookup(sweep.base_config, key))
                            for r in sweep.runs)) if key else [None]


def _panels(sweep, spec):
  keys = list(spec.get('panels') or [])
  combos = list(itertools.product(*[_values(sweep, k) for k in keys])) or [()]
  return keys, combos


def _coord(sweep, run, key):
  return run.overrides.get(key, _lookup(sweep.base_config, key))


def _figure(n_panels: int):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  ncols = min(n_panels, 4)
  nrows = math.ceil(n_panels / ncols)
  fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows + 0.6), dpi=100)
  FigureCanvasAgg(fig)
  axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
  return fig, axes


COLORS = ('tab:blue', 'tab:orange', 'tab:green', 'tab:red', 'tab:purple', 'tab:brown', 'tab:pink',
          'tab:gray', 'tab:olive', 'tab:cyan')
STYLES = ('-', '--', ':', '-.')


def _label(key, value, short):
  return f'{short[key]}={format_value(value)}'


def plot_curves(sweep: Sweep, out_path: str, metric: str = 'eval/loss') -> str:
  from flaxformer_lab import plotting  # pylint: disable=g-import-not-at-top
  spec = plot_spec(sweep)
  short = short_keys(sweep.swept_keys + [k for k in spec['panels'] if k])
  pkeys, combos = _panels(sweep, spec)
  colors = {v: COLORS[i % len(COLORS)] for i, v in enumerate(_values(sweep, spec['color']))}
  styles = {v: STYLES[i % len(STYLES)] for i, v in enumerate(_values(sweep, spec['style']))}
  fig, axes = _figure(len(combos))
  for ax, combo in zip(axes, combos):
    shown = set()
    for run in sweep.runs:
      if tuple(_coord(sweep, run, k) for k in pkeys) != combo:
        continue
      try:
        records = metrics_lib.read_metrics(run.workdir)
      except FileNotFoundError:
        continue
      c = colors[_coord(sweep, run, spec['color'])] if spec['color'] else COLORS[0]
      s = styles[_coord(sweep, run, spec['style'])] if spec['style'] else '-'
      label_parts = [_label(k, _coord(sweep, run, k), short) for k in (spec['color'], spec['style'])
                     if k]
      label = ', '.join(label_parts) or run.name
      steps, vals = metrics_lib.series(records, 'train/loss')
      ax.plot(steps, vals, color=c, linestyle=s, alpha=0.75, linewidth=1.1,
              label=None if label in shown else label)
      shown.add(label)
    ax.set_title(', '.join(_label(k, v, short) for k, v in zip(pkeys, combo)) or sweep.name,
                 fontsize=9)
    ax.set_xlabel('step')
    ax.set_ylabel('train/loss')
    ax.grid(True, alpha=0.3)
  if axes:
    axes[0].legend(fontsize=7)
  fig.suptitle(f'{sweep.name}: training loss of every run', fontsize=10)
  fig.tight_layout()
  return plotting.save_figure(fig, out_path)


def plot_final(sweep: Sweep, rows: Sequence[dict[str, Any]], out_path: str,
               metric: str = 'eval/loss') -> str | None:
  from flaxformer_lab import plotting  # pylint: disable=g-import-not-at-top
  spec = plot_spec(sweep)
  if not spec['x']:
    return None
  short = short_keys(sweep.swept_keys + [k for k in spec['panels'] if k])
  by_name = {r['run']: r for r in rows}
  pkeys, combos = _panels(sweep, spec)
  xs = sorted(_values(sweep, spec['x']))
  colors = {v: COLORS[i % len(COLORS)] for i, v in enumerate(_values(sweep, spec['color']))}
  fig, axes = _figure(len(combos))
  col = f'final_{metric}'
  finite_all = [r[col] for r in rows if r[col] is not None and math.isfinite(r[col])]
  top = max(finite_all) * 1.05 if finite_all else 1.0
  for ax, combo in zip(axes, combos):
    for cval, color in colors.items():
      means = []
      for x in xs:
        vals, diverged = [], 0
        for run in sweep.runs:
          if tuple(_coord(sweep, run, k) for k in pkeys) != combo:
            continue
          if spec['color'] and _coord(sweep, run, spec['color']) != cval:
            continue
          if _coord(sweep, run, spec['x']) != x:
            continue
          r = by_name[run.name]
          if r['diverged'] or r[col] is None or not math.isfinite(r[col]):
            diverged += r['diverged']
          else:
            vals.append(r[col])
        if vals:
          ax.scatter([x] * len(vals), vals, color=color, s=10, alpha=0.5)
        if diverged:
          ax.scatter([x], [top], color=color, marker='x', s=40)
        means.append(float(np.mean(vals)) if vals else np.nan)
      label = _label(spec['color'], cval, short) if spec['color'] else None
      ax.plot(xs, means, color=color, marker='o', label=label)
    if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 10:
      ax.set_xscale('log')
    ax.set_title(', '.join(_label(k, v, short) for k, v in zip(pkeys, combo)) or sweep.name,
                 fontsize=9)
    ax.set_xlabel(short[spec['x']])
    ax.set_ylabel(col)
    ax.grid(True, alpha=0.3)
  if axes:
    axes[0].legend(fontsize=7)
  fig.suptitle(f'{sweep.name}: {col} (line: mean; x at the top: diverged)', fontsize=10)
  fig.tight_layout()
  return plotting.save_figure(fig, out_path)


def summarize(sweep: Sweep, metric: str = 'eval/loss') -> dict[str, Any]:
  """Writes results.csv, results.md, the plots and the HParams records; returns their paths and
  the markdown table."""
  rows = summary_rows(sweep, metric)
  csv_path, table = write_tables(sweep, rows)
  out: dict[str, Any] = {'rows': rows, 'table': table, 'csv': csv_path,
                         'md': os.path.join(sweep.workdir, RESULTS_MD)}
  if any(r['steps'] for r in rows):
    out['curves'] = plot_curves(sweep, os.path.join(sweep.workdir, 'loss_curves.png'), metric)
    spec = plot_spec(sweep)
    if spec['x']:
      name = f'final_{metric.replace("/", "_")}_vs_{short_keys([spec["x"]])[spec["x"]]}.png'
      out['final'] = plot_final(sweep, rows, os.path.join(sweep.workdir, name), metric)
    out['hparams'] = write_hparams(sweep, rows, metric)
  return out


def rows_json(rows) -> str:
  return json.dumps(rows, default=str)
