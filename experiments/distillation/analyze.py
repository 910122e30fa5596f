r"""The distillation experiment's table and plot, from its three sweeps (see config.py).

  python experiments/distillation/analyze.py --teacher=workdirs/distillation/teacher/seed=0 \
      --students=workdirs/distillation/students --finetune=workdirs/distillation/finetune \
      --out=experiments/distillation [--rounds=7]

Per model (teacher and the three students): parameters (and student / teacher), CPU forward-pass
tokens/s measured interleaved in this process (student / teacher), the held-out MLM loss of its
pre-training run's last evaluation (`eval/mlm_loss`: the same validation split and deterministic
masks for every run), and the SST-2 test accuracy of its fine-tuning run, also as a percentage of
the teacher's, beside the paper's 40% fewer parameters, 60% faster inference and 97% of the score.
Writes results.md, results.csv and distillation.png into --out.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments.distillation import config as exp_config  # pylint: disable=wrong-import-position
from flaxformer_lab.sweeps import results  # pylint: disable=wrong-import-position

PAPER = {'params': 0.60, 'speedup': 1.60, 'score': 97.0}  # DistilBERT vs BERT base (Sanh et al.)
LABELS = {'teacher': 'teacher (4 layers)', 'distilled': '(a) distilled, teacher-layer init',
          'distilled_no_init': '(b) distilled, random init', 'scratch_mlm': '(c) MLM alone, random init'}


def collect(teacher: str, students: str, finetune: str, rounds: int = 7, iters: int = 10,
            batch: int = 32, seq_len: int = 128) -> list[dict]:
  from experiments.distillation import inference_speed  # pylint: disable=g-import-not-at-top
  pre = {'teacher': teacher, **exp_config.student_runs(students)}
  missing = [arm for arm in ('teacher', *exp_config.STUDENTS) if arm not in pre]
  if missing:
    raise SystemExit(f'error: {students} lacks the student arm(s) {", ".join(missing)}')
  tuned = results.runs_by_init_from(finetune)
  arms = list(pre)
  speed = inference_speed.measure([pre[a] for a in arms], batch=batch, seq_len=seq_len,
                                  rounds=rounds, iters=iters)
  rows = []
  for arm, s in zip(arms, speed):
    ft = tuned.get(os.path.normpath(pre[arm]))
    rows.append({'model': arm, 'label': LABELS[arm], 'layers': s['layers'], 'params': s['params'],
                 'tokens_per_s': s['tokens_per_s'], 'ms': s['ms'],
                 'mlm_loss': results.last_value(pre[arm], 'eval/mlm_loss'),
                 'sst2_accuracy': results.last_value(ft, 'eval/accuracy') if ft else None})
  t = rows[0]
  for r in rows:
    r['params_vs_teacher'] = r['params'] / t['params']
    r['speed_vs_teacher'] = r['tokens_per_s'] / t['tokens_per_s']
    r['accuracy_pct_of_teacher'] = (100 * r['sst2_accuracy'] / t['sst2_accuracy']
                                    if r['sst2_accuracy'] is not None and t['sst2_accuracy']
                                    else None)
  return rows


def _f(x, fmt):
  return '-' if x is None else format(x, fmt)


def markdown(rows: list[dict]) -> str:
  lines = ['| model | layers | params | params / teacher | tokens/s | speed / teacher | '
           'held-out MLM loss | SST-2 accuracy | % of teacher |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    acc = None if r['sst2_accuracy'] is None else 100 * r['sst2_accuracy']
    lines.append(f'| {r["label"]} | {r["layers"]} | {r["params"]:,} | '
                 f'{r["params_vs_teacher"]:.2f} | {r["tokens_per_s"]:,.0f} | '
                 f'{r["speed_vs_teacher"]:.2f}x | {_f(r["mlm_loss"], ".3f")} | {_f(acc, ".1f")}% | '
                 f'{_f(r["accuracy_pct_of_teacher"], ".1f")}% |')
  lines.append(f'| paper: DistilBERT vs BERT base | 6 vs 12 | 66M vs 110M | {PAPER["params"]:.2f} | '
               f'- | {PAPER["speedup"]:.2f}x | - | - | {PAPER["score"]:.0f}% |')
  return '\n'.join(lines) + '\n'


def plot(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  students = rows[1:]
  names = [r['model'].replace('_', '\n') for r in students]
  panels = [('params / teacher', [r['params_vs_teacher'] for r in students], PAPER['params']),
            ('inference speed / teacher', [r['speed_vs_teacher'] for r in students],
             PAPER['speedup']),
            ('SST-2 accuracy, % of teacher',
             [r['accuracy_pct_of_teacher'] or 0.0 for r in students], PAPER['score'])]
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
  for ax, (title, values, paper) in zip(axes, panels):
    ax.bar(names, values, color=['tab:blue', 'tab:orange', 'tab:gray'])
    ax.axhline(paper, color='k', ls='--', lw=1, label='DistilBERT paper')
    ax.set_title(title)
    ax.legend(loc='lower right', fontsize=8)
  fig.suptitle('Half-depth students of a tiny BERT teacher (CPU scale)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--teacher', required=True)
  p.add_argument('--students', required=True)
  p.add_argument('--finetune', required=True)
  p.add_argument('--out', required=True)
  p.add_argument('--rounds', type=int, default=7)
  p.add_argument('--iters', type=int, default=10)
  a = p.parse_args(argv)
  rows = collect(a.teacher, a.students, a.finetune, rounds=a.rounds, iters=a.iters)
  os.makedirs(a.out, exist_ok=True)
  table = markdown(rows)
  with open(os.path.join(a.out, 'results.md'), 'w') as f:
    f.write(table)
  with open(os.path.join(a.out, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  plot(rows, os.path.join(a.out, 'distillation.png'))
  print(table)
  return 0


if __name__ == '__main__':
  sys.exit(main())
