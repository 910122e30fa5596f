"""Tests of flaxformer_lab.metrics and flaxformer_lab.plotting."""

import glob
import io
import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lab import metrics
from flaxformer_lab import plotting


def _read_jsonl(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _read_tensorboard_scalars(logdir):
  """Parses TFRecord event files (length, crc, Event proto, crc) and returns {tag: [(step, v)]}."""
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c
  files = glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))
  assert files, f'no event file in {logdir}'
  out = {}
  for path in files:
    with open(path, 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,) = struct.unpack('<Q', header)
      (header_crc,) = struct.unpack('<I', data[pos + 8:pos + 12])
      assert header_crc == masked_crc32c(header)
      payload = data[pos + 12:pos + 12 + length]
      (payload_crc,) = struct.unpack('<I', data[pos + 12 + length:pos + 16 + length])
      assert payload_crc == masked_crc32c(payload)
      pos += 16 + length
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_jsonl_contents_and_conversion(tmp_path):
  workdir = str(tmp_path)
  with metrics.MetricWriter(workdir, total_steps=10, progress='off') as w:
    w.write_scalars(1, {'train/loss': jnp.asarray(2.5), 'train/lr': np.float32(1e-3)})
    w.write_scalars(2, {'train/loss': 2.0, 'train/accuracy': jnp.asarray([0.25])})
    w.write_scalars(2, {'eval/loss': jnp.asarray(2.2, jnp.bfloat16)})
  recs = _read_jsonl(workdir)
  assert [r['step'] for r in recs] == [1, 2, 2]
  assert recs[0]['train/loss'] == 2.5 and recs[0]['train/lr'] == pytest.approx(1e-3)
  assert recs[1]['train/accuracy'] == 0.25 and recs[2]['eval/loss'] == pytest.approx(2.2, rel=1e-2)
  assert all(isinstance(r['time'], float) for r in recs)
  merged = metrics.read_metrics(workdir)
  assert [r['step'] for r in merged] == [1, 2]
  assert merged[1]['train/loss'] == 2.0 and 'eval/loss' in merged[1]
  with pytest.raises(ValueError, match="'bad' is not a scalar"):
    metrics.to_floats({'bad': jnp.ones(3)})


def test_resume_appends_and_drops_records_after_checkpoint(tmp_path):
  workdir = str(tmp_path)
  with metrics.MetricWriter(workdir, progress='off', tensorboard=False) as w:
    for step in (10, 20, 30):
      w.write_scalars(step, {'train/loss': 1.0 / step})
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 40, "train/lo')  # cut by a crash
  # Resume from the checkpoint at step 20: the 30 (and the broken 40) records are recomputed.
  with metrics.MetricWriter(workdir, progress='off', tensorboard=False, start_step=20) as w:
    w.write_scalars(30, {'train/loss': 0.5})
  recs = _read_jsonl(workdir)
  assert [(r['step'], r['train/loss']) for r in recs] == [(10, 0.1), (20, 0.05), (30, 0.5)]
  # Without start_step it simply appends.
  with metrics.MetricWriter(workdir, progress='off', tensorboard=False) as w:
    w.write_scalars(40, {'train/loss': 0.4})
  assert [r['step'] for r in _read_jsonl(workdir)] == [10, 20, 30, 40]


def test_tensorboard_event_file_holds_scalars(tmp_path):
  workdir = str(tmp_path)
  with metrics.MetricWriter(workdir, progress='off') as w:
    w.write_scalars(5, {'train/loss': 3.25})
    w.write_scalars(10, {'train/loss': 2.5, 'eval/loss': 2.75})
  scalars = _read_tensorboard_scalars(os.path.join(workdir, 'tensorboard'))
  assert scalars['train/loss'] == [(5, 3.25), (10, 2.5)]
  assert scalars['eval/loss'] == [(10, 2.75)]


def test_non_primary_process_writes_nothing(tmp_path):
  stream = io.StringIO()
  with metrics.MetricWriter(str(tmp_path), progress='lines', is_primary=False, stream=stream) as w:
    w.write_scalars(1, {'train/loss': 1.0})
  assert os.listdir(tmp_path) == [] and stream.getvalue() == ''


def test_console_lines_mode(tmp_path):
  stream = io.StringIO()
  with metrics.MetricWriter(str(tmp_path), total_steps=100, progress='auto', stream=stream,
                            tensorboard=False) as w:  # StringIO is no TTY: lines
    w.write_scalars(10, {'train/loss': 2.0})
    w.progress(11)
    w.write_scalars(20, {'train/loss': 1.5, 'eval/loss': 1.75})
    w.write_text('sample: hello')
  lines = stream.getvalue().splitlines()
  assert lines[0] == 'step 10/100 | train/loss 2'
  assert lines[1].startswith('step 20/100 | train/loss 1.5 | eval/loss 1.75 | ')
  assert 'step/s' in lines[1] and 'ETA' in lines[1]
  assert lines[2] == 'sample: hello'


@pytest.mark.parametrize('use_tqdm', [True, False])
def test_console_bar_mode(tmp_path, monkeypatch, use_tqdm):
  if not use_tqdm:
    monkeypatch.setattr(metrics, '_make_bar', lambda t, i, s: metrics._TextBar(t, i, s))
  stream = io.StringIO()
  reporter = metrics.ConsoleReporter('bar', total_steps=50, stream=stream)
  for step in range(1, 51):
    reporter.progress(step)
    if step % 25 == 0:
      reporter.report(step, {'train/loss': 1.0 / step})
  reporter.close()
  text = stream.getvalue()
  assert '50/50' in text and 'step 25/50 | train/loss 0.04' in text
  with pytest.raises(ValueError, match='auto, bar, lines, off'):
    metrics.ConsoleReporter('fancy')


def test_async_fetcher_defers_device_get():
  fetcher = metrics.AsyncFetcher()
  assert fetcher.pop() == []
  fetcher.push(1, {'train/loss': jnp.asarray(1.5)})
  fetcher.push(2, {'train/loss': jnp.asarray(1.25), 'n': jnp.asarray(3)})
  assert len(fetcher) == 2
  assert fetcher.pop() == [(1, {'train/loss': 1.5}), (2, {'train/loss': 1.25, 'n': 3.0})]
  assert len(fetcher) == 0


def _fake_run(workdir, train, evals):
  with metrics.MetricWriter(str(workdir), progress='off', tensorboard=False) as w:
    for step, loss in train:
      w.write_scalars(step, {'train/loss': loss})
    for step, loss in evals:
      w.write_scalars(step, {'eval/loss': loss})


def test_plot_writes_valid_png(tmp_path):
  import matplotlib.image
  _fake_run(tmp_path, [(s, 5.0 / s) for s in range(1, 101)], [(25, 0.5), (50, 0.3), (100, 0.2)])
  path = metrics.plot_metrics(str(tmp_path))
  assert path == os.path.join(str(tmp_path), 'loss_curve.png')
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  img = matplotlib.image.imread(path)
  assert img.shape[0] >= 300 and img.shape[1] >= 500 and img.shape[2] in (3, 4)
  assert img[..., :3].std() > 0.01  # not a blank canvas
  with pytest.raises(ValueError, match='none of'):
    plotting.plot_metrics(str(tmp_path), keys=('missing',))


def test_summarize_two_runs_into_table(tmp_path):
  a, b = tmp_path / 'run_a', tmp_path / 'run_b'
  _fake_run(a, [(10, 3.0), (20, 2.0)], [(10, 2.9), (20, 2.4)])
  _fake_run(b, [(10, 2.5), (20, 1.5)], [(10, 2.0), (20, 2.1)])
  rows = metrics.summarize_runs([str(a), str(b)])
  assert rows[0]['run'] == 'run_a' and rows[0]['last_step'] == 20
  assert rows[0]['final_train/loss'] == 2.0 and rows[0]['final_eval/loss'] == 2.4
  assert rows[0]['best_eval/loss'] == 2.4 and rows[0]['best_eval/loss_step'] == 20
  assert rows[1]['best_eval/loss'] == 2.0 and rows[1]['best_eval/loss_step'] == 10
  assert rows[1]['final_eval/loss'] == 2.1
  table = metrics.format_table(rows).splitlines()
  assert table[0].split('|')[1].strip() == 'run' and len(table) == 4
  assert 'run_b' in table[3] and '2.1' in table[3]
