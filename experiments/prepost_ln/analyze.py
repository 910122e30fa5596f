r"""The README's table: final eval loss per (depth, peak lr, warmup) x placement, over seeds.

  python -m flaxformer_lab.sweep --sweep=experiments/prepost_ln/config.py --workdir=<dir> --summarize
  python experiments/prepost_ln/analyze.py <dir>/results.csv

Each cell: the seeds' mean final eval loss (nats per character) and, in brackets, min-max;
'NaN xK' counts runs stopped by a non-finite loss; a mean above STUCK (a unigram character model
scores about 3.3 here) marks runs that never left the unigram plateau.
"""

from __future__ import annotations

import collections
import csv
import sys

STUCK = 3.0
PLACEMENTS = ('pre', 'post', 'deepnorm')


def main(path: str) -> None:
  rows = list(csv.DictReader(open(path)))
  cells = collections.defaultdict(list)
  diverged = collections.Counter()
  for r in rows:
    key = (int(r['num_layers']), float(r['learning_rate']), int(r['warmup_steps']),
           r['norm_position'])
    if r['diverged'] == 'True':
      diverged[key] += 1
    elif r['final_eval/loss']:
      cells[key].append(float(r['final_eval/loss']))
  grid = sorted({k[:3] for k in list(cells) + list(diverged)})
  print('| layers | peak lr | warmup | ' + ' | '.join(PLACEMENTS) + ' |')
  print('|---|---|---|' + '---|' * len(PLACEMENTS))
  for g in grid:
    out = []
    for p in PLACEMENTS:
      vals, nan = cells.get(g + (p,), []), diverged.get(g + (p,), 0)
      text = ''
      if vals:
        mean = sum(vals) / len(vals)
        text = f'{mean:.3f} [{min(vals):.3f}-{max(vals):.3f}]'
        if mean > STUCK:
          text = f'**{text}**'
      if nan:
        text += f' NaN x{nan}'
      out.append(text.strip() or '-')
    print(f'| {g[0]} | {g[1]:g} | {g[2]} | ' + ' | '.join(out) + ' |')
  stuck = {p: sum(1 for k, v in cells.items() if k[3] == p for x in v if x > STUCK)
           for p in PLACEMENTS}
  print('\nruns above', STUCK, 'nats (stuck):', stuck, '| non-finite:',
        {p: sum(n for k, n in diverged.items() if k[3] == p) for p in PLACEMENTS})


if __name__ == '__main__':
  main(sys.argv[1])
