r"""The roberta_recipe table and plot, from its two sweeps (see config.py).

  python experiments/roberta_recipe/analyze.py --pretrain=workdirs/roberta_recipe/pretrain \
      --finetune=workdirs/roberta_recipe/finetune --out=experiments/roberta_recipe
  # several seeds (`:seed=S` sweeps): comma-separated dirs, the table shows mean (per seed)

Per arm: masking, input format, NSP, the last logged training MLM loss (`train/mlm_loss`), the
held-out MLM loss of its pre-training run's last evaluation on the rows every arm shares
(`shared/mlm_loss`: the validation split as FULL-SENTENCES rows, one fixed mask each), its loss
on its own input format (`eval/mlm_loss`) and the SST-2 test accuracy of its fine-tuning run
(`eval/accuracy`). Writes results.md, results.csv and roberta_recipe.png into --out; an arm
without a finished run shows '-' and is listed under `missing`.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments.roberta_recipe import config as exp_config  # pylint: disable=wrong-import-position
from flaxformer_lab.sweeps import results  # pylint: disable=wrong-import-position

HEADER = ['arm', 'masking', 'inputs', 'NSP', 'train MLM loss (last log)',
          'held-out MLM loss (shared rows)', 'MLM loss on own format', 'SST-2 accuracy (%)']


def collect(pretrain: str, finetune: str) -> list[dict]:
  pre = exp_config.pretrain_runs(pretrain)
  tuned = results.runs_by_init_from(finetune) if finetune and os.path.isdir(finetune) else {}
  rows = []
  for arm, (masking, pairs, inputs, _) in exp_config.ARMS.items():
    run = pre.get(arm)
    ft = tuned.get(os.path.normpath(run)) if run else None
    rows.append({'arm': arm, 'masking': masking, 'inputs': inputs, 'nsp': bool(pairs),
                 'pretrain_run': run, 'finetune_run': ft,
                 'mlm_loss': results.last_value(run, 'shared/mlm_loss') if run else None,
                 'own_mlm_loss': results.last_value(run, 'eval/mlm_loss') if run else None,
                 'train_mlm_loss': results.last_value(run, 'train/mlm_loss') if run else None,
                 'sst2_accuracy': results.last_value(ft, 'eval/accuracy') if ft else None})
  return rows


METRICS = ('train_mlm_loss', 'mlm_loss', 'own_mlm_loss', 'sst2_accuracy')


def combine(per_seed: list[list[dict]]) -> list[dict]:
  """One row per arm over several seeds' rows: each metric's mean (None if a seed lacks it) and
  its per-seed values (`<metric>_seeds`)."""
  rows = []
  for arm_rows in zip(*per_seed):
    r = dict(arm_rows[0])
    for key in METRICS:
      vals = [x[key] for x in arm_rows]
      r[f'{key}_seeds'] = vals
      r[key] = None if any(v is None for v in vals) else sum(vals) / len(vals)
    rows.append(r)
  return rows


def _f(x, fmt, scale=1.0):
  return '-' if x is None else format(scale * x, fmt)


def _cell(r: dict, key: str, fmt: str, scale: float = 1.0) -> str:
  """The mean, and with several seeds each seed's value: `5.713 (5.70 / 5.72)`."""
  text = _f(r[key], fmt, scale)
  seeds = r.get(f'{key}_seeds') or []
  if len(seeds) > 1:
    text += ' (' + ' / '.join(_f(v, fmt, scale) for v in seeds) + ')'
  return text


def cells(r: dict) -> list[str]:
  return [r['arm'], r['masking'], r['inputs'], 'yes' if r['nsp'] else 'no',
          _cell(r, 'train_mlm_loss', '.3f'), _cell(r, 'mlm_loss', '.3f'),
          _cell(r, 'own_mlm_loss', '.3f'),
          _cell(r, 'sst2_accuracy', '.1f', 100.0)]


def markdown(rows: list[dict]) -> str:
  lines = ['| ' + ' | '.join(HEADER) + ' |', '|---|---|---|---|---:|---:|---:|---:|']
  lines += ['| ' + ' | '.join(cells(r)) + ' |' for r in rows]
  lines.append('| paper (Liu et al. 2019) | Table 1: dynamic ~ static or slightly better | '
               'Table 2: FULL-SENTENCES, no NSP > SEGMENT-PAIR + NSP | | - | - | - | - |')
  return '\n'.join(lines) + '\n'


def plot(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = [r['arm'] for r in rows]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, (title, key, scale) in zip(axes, [
      ('held-out MLM loss, shared rows (lower is better)', 'mlm_loss', 1.0),
      ('SST-2 test accuracy (%)', 'sst2_accuracy', 100.0)]):
    vals = [scale * (r[key] or 0.0) for r in rows]
    ax.bar(names, vals, color=['tab:gray', 'tab:blue', 'tab:orange', 'tab:green'][:len(rows)])
    seeds = [[scale * v for v in (r.get(f'{key}_seeds') or []) if v is not None] for r in rows]
    for i, pts in enumerate(seeds):
      if len(pts) > 1:
        ax.plot([i] * len(pts), pts, 'k.', label='seeds' if i == 0 else None)
    shown = [v for v in vals if v] + [v for pts in seeds for v in pts]
    if shown:  # differences of a few percent: start the axis near the values
      lo, hi = min(shown), max(shown)
      pad = max(0.25 * (hi - lo), 0.02 * hi)
      ax.set_ylim(lo - 2 * pad, hi + pad)
    ax.set_title(title)
    for i, val in enumerate(vals):
      ax.text(i, val, f'{val:.3f}' if scale == 1.0 else f'{val:.1f}', ha='center',
              va='bottom', fontsize=8)
    if any(len(p) > 1 for p in seeds):
      ax.legend(loc='lower right', fontsize=8)
  fig.suptitle('RoBERTa recipe changes on a tiny BERT (CPU scale)')
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--pretrain', required=True, help='sweep dir(s) of stage 1, comma-separated '
                 'for several seeds (the table shows the mean and each seed)')
  p.add_argument('--finetune', default='', help='the stage-2 sweep dir(s), in the same order')
  p.add_argument('--out', default='')
  a = p.parse_args(argv)
  pretrains = a.pretrain.split(',')
  finetunes = a.finetune.split(',') if a.finetune else [''] * len(pretrains)
  if len(finetunes) != len(pretrains):
    p.error(f'--finetune names {len(finetunes)} sweep dir(s) for {len(pretrains)} --pretrain')
  out = a.out or pretrains[0]
  os.makedirs(out, exist_ok=True)
  rows = combine([collect(pre, ft) for pre, ft in zip(pretrains, finetunes)])
  md = markdown(rows)
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write(md)
  with open(os.path.join(out, 'results.csv'), 'w', newline='') as f:
    csv.writer(f).writerows([HEADER] + [cells(r) for r in rows])
  png = os.path.join(out, 'roberta_recipe.png')
  plot(rows, png)
  print(md)
  missing = [r['arm'] for r in rows if r['mlm_loss'] is None or r['sst2_accuracy'] is None]
  if missing:
    print(f'incomplete: {", ".join(missing)}')
  return {'rows': rows, 'missing': missing, 'png': png, 'markdown': md}


if __name__ == '__main__':
  main(sys.argv[1:])
