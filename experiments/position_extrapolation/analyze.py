r"""The table and the plot: validation perplexity against evaluation length, one row/line per scheme.

  python experiments/position_extrapolation/analyze.py <sweep workdir> [<workdir of another seed> ...]
      [--out=<dir>]

Reads every run directory of the sweep(s) (its config.json: model.position, data.seq_len; its
metrics.jsonl: the last `eval_len<l>/perplexity` of each evaluation length l) and writes into
--out (default: the first sweep workdir)
  extrapolation.csv / extrapolation.md   scheme, then perplexity at L, 2L, 4L (nats/char -> exp),
                                         and the ratio ppl(4L) / ppl(L); with several workdirs
                                         (seeds) each cell is the mean and [min-max] over them
  perplexity_vs_length.png               one line per scheme, log-scale perplexity (ALiBi Fig. 1),
                                         min-max bars over seeds
A scheme whose run did not finish (or lacks a length) shows '-' and is named on stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys

SCHEMES = ('learned', 'sinusoidal', 'rope', 'alibi', 'relative_bias', 'none')
_PREFIX = re.compile(r'^eval_len(\d+)/perplexity$')


def read_run(run_dir: str) -> tuple[str, int, dict[int, float]] | None:
  """(position scheme, training length, {eval length: final perplexity}) of one run, or None."""
  cfg_path, metrics_path = (os.path.join(run_dir, f) for f in ('config.json', 'metrics.jsonl'))
  if not (os.path.exists(cfg_path) and os.path.exists(metrics_path)):
    return None
  cfg = json.load(open(cfg_path))
  ppl: dict[int, float] = {}
  for line in open(metrics_path):
    rec = json.loads(line)
    for k, v in rec.items():
      m = _PREFIX.match(k)
      if m:
        ppl[int(m.group(1))] = float(v)  # the last record wins: the final evaluation
  return cfg['model']['position'], int(cfg['data']['seq_len']), ppl


def collect(workdirs: list[str]
            ) -> tuple[int | None, list[int], dict[str, list[dict[int, float]]]]:
  """(training length, evaluation lengths, {scheme: [{length: ppl}, one per workdir]})."""
  runs: dict[str, list[dict[int, float]]] = {}
  train_lens = set()
  for workdir in workdirs:
    for name in sorted(os.listdir(workdir)):
      r = read_run(os.path.join(workdir, name))
      if r is None:
        continue
      scheme, train_len, ppl = r
      runs.setdefault(scheme, []).append(ppl)
      train_lens.add(train_len)
  if len(train_lens) > 1:
    raise SystemExit(f'{workdirs}: runs trained at different lengths {sorted(train_lens)}')
  lengths = sorted({l for ps in runs.values() for p in ps for l in p})
  return (train_lens.pop() if train_lens else None), lengths, runs


def _stats(values: list[float]) -> tuple[float, float, float] | None:
  """(mean, min, max), or None when there are none."""
  if not values:
    return None
  return sum(values) / len(values), min(values), max(values)


def _fmt(v: float | None) -> str:
  if v is None:
    return '-'
  return f'{v:.3f}' if math.isfinite(v) else str(v)


def _cell(values: list[float]) -> str:
  st = _stats(values)
  if st is None:
    return '-'
  return _fmt(st[0]) if len(values) == 1 else f'{_fmt(st[0])} [{_fmt(st[1])}-{_fmt(st[2])}]'


def table(train_len, lengths, runs) -> tuple[list[str], list[list[str]]]:
  header = ['position'] + [f'ppl @ {l}' + (f' ({l // train_len}L)' if train_len else '')
                           for l in lengths] + ['ppl(max) / ppl(L)']
  rows = []
  order = [s for s in SCHEMES if s in runs] + sorted(set(runs) - set(SCHEMES))
  for s in order:
    cells = [_cell([p[l] for p in runs[s] if l in p]) for l in lengths]
    ratios = [p[lengths[-1]] / p[train_len] for p in runs[s]
              if lengths and train_len in p and lengths[-1] in p and p[train_len]]
    rows.append([s] + cells + [_cell(ratios)])
  return header, rows


def plot(train_len, lengths, runs, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
  for s in [s for s in SCHEMES if s in runs] + sorted(set(runs) - set(SCHEMES)):
    xs = [l for l in lengths if any(l in p for p in runs[s])]
    st = [_stats([p[l] for p in runs[s] if l in p]) for l in xs]
    mean = [m for m, _, _ in st]
    err = [[m - lo for m, lo, _ in st], [hi - m for m, _, hi in st]]
    ax.errorbar(xs, mean, yerr=err if len(runs[s]) > 1 else None, marker='o', capsize=3,
                label=s + (f' ({len(runs[s])} seeds)' if len(runs[s]) > 1 else ''))
  if train_len:
    ax.axvline(train_len, color='grey', ls=':', lw=1)
  ax.set_xscale('log', base=2)
  ax.set_yscale('log')
  ax.set_xticks(lengths, [str(l) for l in lengths])
  ax.set_xlabel(f'evaluation length (characters; trained at L = {train_len})')
  ax.set_ylabel('validation perplexity (per character)')
  ax.set_title('tiny shakespeare: extrapolation by position scheme')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('workdirs', nargs='+', help='sweep workdirs (e.g. one per seed)')
  p.add_argument('--out', default='')
  a = p.parse_args(argv)
  out = a.out or a.workdirs[0]
  os.makedirs(out, exist_ok=True)
  train_len, lengths, runs = collect(a.workdirs)
  if not runs:
    raise SystemExit(f'{a.workdirs}: no finished runs with eval_len<l>/perplexity metrics')
  header, rows = table(train_len, lengths, runs)
  with open(os.path.join(out, 'extrapolation.csv'), 'w', newline='') as f:
    csv.writer(f).writerows([header] + rows)
  md = '\n'.join(['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] +
                 ['| ' + ' | '.join(r) + ' |' for r in rows])
  with open(os.path.join(out, 'extrapolation.md'), 'w') as f:
    f.write(md + '\n')
  png = os.path.join(out, 'perplexity_vs_length.png')
  plot(train_len, lengths, runs, png)
  print(md)
  missing = [s for s in SCHEMES if s not in runs or
             any(len(p) < len(lengths) for p in runs[s]) or len(runs[s]) < len(a.workdirs)]
  if missing:
    print(f'\nincomplete: {", ".join(missing)}')
  print(f'\nwrote {out}/extrapolation.csv, extrapolation.md, {png}')
  return {'header': header, 'rows': rows, 'missing': missing, 'png': png}


if __name__ == '__main__':
  main(sys.argv[1:])
