"""Loss curves from a run's metrics.jsonl (matplotlib's Agg canvas: no display, no global backend).

PNGs are written through etils.epath (`save_figure`), so a workdir may be a bucket (gs://...).
"""

from __future__ import annotations

import io
import os
from typing import Sequence

from etils import epath

from flaxformer_lab import metrics


def save_figure(fig, out_path: str) -> str:
  """Writes a matplotlib figure as PNG to a local path or a gs:// URL."""
  buf = io.BytesIO()
  fig.savefig(buf, format='png')
  path = epath.Path(out_path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buf.getvalue())
  return str(out_path)


def plot_metrics(workdir: str, out_path: str | None = None,
                 keys: Sequence[str] = ('train/loss', 'eval/loss'), log_y: bool = False,
                 title: str | None = None) -> str:
  """Draws `keys` against step from `<workdir>/metrics.jsonl`; returns the PNG path.

  Args:
    workdir: run directory holding metrics.jsonl.
    out_path: where to write (default `<workdir>/loss_curve.png`).
    keys: metric names to draw (missing ones are skipped; at least one must be present).
    log_y: logarithmic y axis.
    title: figure title (default: the workdir's name).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  records = metrics.read_metrics(workdir)
  fig = Figure(figsize=(7, 4.5), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  drawn = 0
  for key in keys:
    steps, values = metrics.series(records, key)
    if steps.size == 0:
      continue
    style = {'marker': 'o', 'markersize': 3} if steps.size < 50 else {}
    ax.plot(steps, values, label=key, **style)
    drawn += 1
  if not drawn:
    raise ValueError(f'none of {list(keys)} in {os.path.join(workdir, metrics.METRICS_FILE)}')
  ax.set_xlabel('step')
  ax.set_ylabel('loss' if all('loss' in k for k in keys) else 'value')
  if log_y:
    ax.set_yscale('log')
  ax.grid(True, alpha=0.3)
  ax.legend()
  ax.set_title(title or os.path.basename(os.path.normpath(workdir)))
  fig.tight_layout()
  out_path = out_path or os.path.join(workdir, 'loss_curve.png')
  return save_figure(fig, out_path)
