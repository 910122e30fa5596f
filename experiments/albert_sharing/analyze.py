r"""The albert_sharing experiment's table and bar plot, from its two sweeps (see config.py).

  python experiments/albert_sharing/analyze.py --pretrain=workdirs/albert_sharing/pretrain \
      --finetune=workdirs/albert_sharing/finetune --out=experiments/albert_sharing

Per arm: parameters of the pre-trained model (all of it, heads included), of its layer stack and of
its embeddings (token table + positions + token types + norm + the E -> d_model projection), the
held-out MLM loss of its pre-training run's last evaluation (`eval/mlm_loss`: the same validation
pairs and static masks for every arm) and the SST-2 test accuracy of its fine-tuning run, beside
the paper's Tables 3 and 4. Writes results.md, results.csv and albert_sharing.png into --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments.albert_sharing import config as exp_config  # pylint: disable=wrong-import-position
from flaxformer_lab.sweeps import results  # pylint: disable=wrong-import-position

# Lan et al. 2020, Tables 3 and 4 (ALBERT base shapes): parameter counts of the four cells. Their
# accuracy columns are not copied here (not checked against the paper in this session); the text
# says sharing costs a little accuracy and E = 128 vs 768 costs little.
PAPER = [
    ('paper: not shared, E=768 (BERT base)', '108M'),
    ('paper: not shared, E=128', '89M'),
    ('paper: all shared, E=768', '31M'),
    ('paper: all shared, E=128 (ALBERT base)', '12M'),
]


def param_counts(run_dir: str) -> dict[str, int]:
  """{'total', 'layers', 'embeddings'} parameter counts of a run's last checkpoint."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flaxformer_lab import rundir  # pylint: disable=g-import-not-at-top
  params = rundir.RunDir(run_dir).restore_params()
  out = {'total': 0, 'layers': 0, 'embeddings': 0}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [getattr(k, 'key', str(k)) for k in path]
    n = int(np.size(x))
    out['total'] += n
    if keys[:2] == ['encoder', 'layers']:
      out['layers'] += n
    elif keys[0] in ('tokens', 'encoder_embeddings'):
      out['embeddings'] += n
  return out


def collect(pretrain: str, finetune: str) -> dict:
  pre = exp_config.pretrain_runs(pretrain)
  tuned = results.runs_by_init_from(finetune)
  rows, missing = [], [arm for arm in exp_config.ARMS if arm not in pre]
  for arm, run in pre.items():
    with open(os.path.join(run, 'config.json')) as f:
      model = json.load(f)['model']
    ft = tuned.get(os.path.normpath(run))
    if ft is None:
      missing.append(f'{arm} (fine-tuning)')
    rows.append({'arm': arm, 'share_layers': model.get('share_layers', 0),
                 'emb_dim': model.get('emb_dim') or model['d_model'], 'd_model': model['d_model'],
                 'num_layers': model['num_layers'], 'vocab_size': model['vocab_size'],
                 **{f'params_{k}': v for k, v in param_counts(run).items()},
                 'mlm_loss': results.last_value(run, 'eval/mlm_loss'),
                 'sst2_accuracy': results.last_value(ft, 'eval/accuracy') if ft else None})
  return {'rows': rows, 'missing': missing}


def _f(x, fmt):
  return '-' if x is None else format(x, fmt)


def markdown(rows: list[dict]) -> str:
  lines = ['| arm | layers shared | E | params (all) | layer stack | embeddings | '
           'held-out MLM loss | SST-2 accuracy |',
           '|---|---|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    acc = None if r['sst2_accuracy'] is None else 100 * r['sst2_accuracy']
    shared = 'all' if r['share_layers'] else 'no'
    lines.append(f'| {r["arm"]} | {shared} | {r["emb_dim"]} | {r["params_total"]:,} | '
                 f'{r["params_layers"]:,} | {r["params_embeddings"]:,} | '
                 f'{_f(r["mlm_loss"], ".3f")} | {_f(acc, ".1f")}% |')
  for label, params in PAPER:
    lines.append(f'| {label} | | | {params} | | | - | - |')
  return '\n'.join(lines) + '\n'


def plot(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = [r['arm'].replace('_', '\n', 1) for r in rows]
  colors = ['tab:blue', 'tab:cyan', 'tab:orange', 'tab:red'][:len(rows)]
  panels = [('parameters (all)', [r['params_total'] for r in rows]),
            ('held-out MLM loss', [r['mlm_loss'] or 0.0 for r in rows]),
            ('SST-2 accuracy (%)', [100 * (r['sst2_accuracy'] or 0.0) for r in rows])]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  for ax, (title, values) in zip(axes, panels):
    ax.bar(names, values, color=colors)
    ax.set_title(title)
    ax.tick_params(axis='x', labelsize=8)
  axes[2].axhline(50, color='k', ls=':', lw=1, label='chance')
  axes[2].legend(loc='lower right', fontsize=8)
  fig.suptitle('ALBERT sharing x factorization (tiny encoder, CPU scale)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--pretrain', required=True)
  p.add_argument('--finetune', required=True)
  p.add_argument('--out', required=True)
  a = p.parse_args(argv)
  out = collect(a.pretrain, a.finetune)
  rows = out['rows']
  if not rows:
    raise SystemExit(f'error: {a.pretrain} holds no pre-training run')
  os.makedirs(a.out, exist_ok=True)
  table = markdown(rows)
  with open(os.path.join(a.out, 'results.md'), 'w') as f:
    f.write(table)
  with open(os.path.join(a.out, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  out['png'] = os.path.join(a.out, 'albert_sharing.png')
  plot(rows, out['png'])
  out['table'] = table
  print(table)
  if out['missing']:
    print('missing: ' + ', '.join(out['missing']))
  return out


if __name__ == '__main__':
  main()
  sys.exit(0)
