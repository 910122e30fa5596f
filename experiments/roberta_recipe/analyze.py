r"""The roberta_recipe table and plot, from its two sweeps (see config.py).

  python experiments/roberta_recipe/analyze.py --pretrain=workdirs/roberta_recipe/pretrain \
      --finetune=workdirs/roberta_recipe/finetune --out=experiments/roberta_recipe

Per arm: masking, input format, NSP, the held-out MLM loss of its pre-training run's last
evaluation on the rows every arm shares (`shared/mlm_loss`: the validation split as
FULL-SENTENCES rows, one fixed mask each), its loss on its own input format (`eval/mlm_loss`) and
the SST-2 test accuracy of its fine-tuning run (`eval/accuracy`). Writes results.md, results.csv and roberta_recipe.png into --out; an arm
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

HEADER = ['arm', 'masking', 'inputs', 'NSP', 'held-out MLM loss (shared rows)',
          'MLM loss on own format', 'SST-2 accuracy']


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
                 'sst2_accuracy': results.last_value(ft, 'eval/accuracy') if ft else None})
  return rows


def _f(x, fmt):
  return '-' if x is None else format(x, fmt)


def cells(r: dict) -> list[str]:
  acc = None if r['sst2_accuracy'] is None else 100 * r['sst2_accuracy']
  return [r['arm'], r['masking'], r['inputs'], 'yes' if r['nsp'] else 'no',
          _f(r['mlm_loss'], '.3f'), _f(r['own_mlm_loss'], '.3f'), _f(acc, '.1f') + ('%' if acc is not None else '')]


def markdown(rows: list[dict]) -> str:
  lines = ['| ' + ' | '.join(HEADER) + ' |', '|---|---|---|---|---:|---:|---:|']
  lines += ['| ' + ' | '.join(cells(r)) + ' |' for r in rows]
  lines.append('| paper (Liu et al. 2019) | Table 1: dynamic ~ static or slightly better | '
               'Table 2: FULL-SENTENCES, no NSP > SEGMENT-PAIR + NSP | | - | - | - |')
  return '\n'.join(lines) + '\n'


def plot(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = [r['arm'] for r in rows]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, (title, vals) in zip(axes, [
      ('held-out MLM loss (lower is better)', [r['mlm_loss'] or 0.0 for r in rows]),
      ('SST-2 test accuracy (%)', [100 * (r['sst2_accuracy'] or 0.0) for r in rows])]):
    ax.bar(names, vals, color=['tab:gray', 'tab:blue', 'tab:orange', 'tab:green'][:len(rows)])
    ax.set_title(title)
    for i, val in enumerate(vals):
      ax.text(i, val, f'{val:.3f}' if 'loss' in title else f'{val:.1f}', ha='center',
              va='bottom', fontsize=8)
  fig.suptitle('RoBERTa recipe changes on a tiny BERT (CPU scale)')
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--pretrain', required=True)
  p.add_argument('--finetune', default='')
  p.add_argument('--out', default='')
  a = p.parse_args(argv)
  out = a.out or a.pretrain
  os.makedirs(out, exist_ok=True)
  rows = collect(a.pretrain, a.finetune)
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
