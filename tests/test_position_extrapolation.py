"""experiments/position_extrapolation: evaluating at another length than training (the metrics
evaluator's `seq_len`), and the `:smoke` sweep end to end (six tiny training subprocesses, two
at a time; in the quick CI set: the issue asks every experiment's smoke sweep to run in it)."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from flaxformer_lab import data as data_lib
from flaxformer_lab import evals
from flaxformer_lab import metrics as metrics_lib
from flaxformer_lab import train
from flaxformer_lab.models.config import ConfigError, ModelConfig
from flaxformer_lab.tasks import base

from experiments.position_extrapolation import analyze
from experiments.position_extrapolation import config as pe_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _windows(bundle, split, max_batches):
  """(real windows, real target tokens) of an evaluation pass."""
  rows = tokens = 0
  for batch in bundle.eval_batches(split, max_batches):
    w = np.asarray(batch['weights'])
    rows += int((w.sum(axis=1) > 0).sum())
    tokens += int(w.sum())
  return rows, tokens


def test_eval_at_another_length_rewindows_the_stream(tmp_path, monkeypatch):
  """seq_len = 2L re-cuts the validation stream: ceil((N - 1) / 2L) windows, the same N - 1 targets."""
  monkeypatch.setenv('FLAXFORMER_TFDS_DIR', str(tmp_path / 'tfds'))
  c = pe_config.get_config('smoke')
  L = c.data.seq_len
  bundle = data_lib.make_datasets(c)
  n = len(bundle._pipeline.stream_tokens('validation'))  # pylint: disable=protected-access
  ev = evals.MetricsEval('len', {'type': 'metrics', 'split': 'validation', 'max_batches': 0,
                                 'seq_len': 2 * L}, c)
  ctx = evals.EvalContext(config=c, objective=None, setup=None, data=bundle, frozen={},
                          frozen_shardings={})
  long_bundle = ev._data(ctx)  # pylint: disable=protected-access
  assert long_bundle.seq_len == 2 * L and ev._data(ctx) is long_bundle  # built once  # pylint: disable=protected-access
  rows_l, tokens_l = _windows(bundle, 'validation', 0)
  rows_2l, tokens_2l = _windows(long_bundle, 'validation', 0)
  assert tokens_l == tokens_2l == n - 1  # every target once, at both lengths
  assert rows_l == math.ceil((n - 1) / L) and rows_2l == math.ceil((n - 1) / (2 * L))
  batch = next(long_bundle.eval_batches('validation', 1))
  assert batch['inputs'].shape == (c.batch_size, 2 * L)
  # a token budget: max_batches = budget / (batch x length) covers the same first targets
  budget = c.batch_size * 4 * L
  for length in (L, 2 * L, 4 * L):
    b = long_bundle if length == 2 * L else bundle
    if length == 4 * L:
      b = evals.MetricsEval('x4', {'type': 'metrics', 'seq_len': length}, c)._data(ctx)  # pylint: disable=protected-access
    assert _windows(b, 'validation', budget // (c.batch_size * length)) == (
        budget // length, budget)


@pytest.mark.parametrize('position', ['learned', 'relative_bias'])
def test_eval_lengths_give_different_finite_losses(tmp_path, monkeypatch, position):
  monkeypatch.setenv('FLAXFORMER_TFDS_DIR', str(tmp_path / 'tfds'))
  c = pe_config.get_config('smoke')
  c.model.position = position
  L = c.data.seq_len
  final = train.train_and_evaluate(c, str(tmp_path / 'run'))
  losses = [final[f'{pe_config.eval_prefix(f * L)}/loss'] for f in pe_config.FACTORS]
  assert all(np.isfinite(losses)), losses
  assert len(set(losses)) == len(losses), losses  # longer windows: other contexts, other losses
  recs = metrics_lib.read_metrics(str(tmp_path / 'run'))
  assert [r['step'] for r in recs if f'{pe_config.eval_prefix(4 * L)}/loss' in r] == [c.num_steps]


def test_a_learned_table_shorter_than_the_eval_length_is_refused():
  c = pe_config.get_config('smoke')
  c.model.max_len = 2 * c.data.seq_len  # the 4L evaluation no longer fits the table
  objective = base.get_objective(c)
  ev = evals.MetricsEval('len', c.evals[f'len_{4 * c.data.seq_len}'].to_dict(), c)
  with pytest.raises(ConfigError, match='max_len'):
    ev.validate(c, ModelConfig.from_dict(c.model), objective)
  c.model.position = 'alibi'
  ev.validate(c, ModelConfig.from_dict(c.model), objective)  # no table: any length


def test_smoke_config_evaluates_every_length():
  c = pe_config.get_config('smoke')
  L = c.data.seq_len
  assert c.model.max_len == 4 * L
  assert {k: (e.seq_len, e.prefix) for k, e in c.evals.items()} == {
      f'len_{f * L}': (f * L, f'eval_len{f * L}') for f in pe_config.FACTORS}
  assert [r['model.position'] for r in pe_config.get_sweep('smoke')] == list(analyze.SCHEMES)
  with pytest.raises(ValueError, match='multiple'):
    pe_config.get_config('smoke,eval_tokens=100')


def test_smoke_sweep_writes_the_table_with_every_scheme(tmp_path):
  env = {**os.environ, 'FLAXFORMER_TFDS_DIR': str(tmp_path / 'tfds'), 'JAX_PLATFORMS': 'cpu'}
  work = tmp_path / 'sweep'
  subprocess.run([sys.executable, '-m', 'flaxformer_lab.sweep',
                  '--sweep=experiments/position_extrapolation/config.py:smoke',
                  f'--workdir={work}', '--parallel=2'], cwd=ROOT, env=env, check=True)
  out = analyze.main([str(work), f'--out={tmp_path / "out"}'])
  assert [r[0] for r in out['rows']] == list(analyze.SCHEMES) and not out['missing']
  L = pe_config.get_config('smoke').data.seq_len
  assert out['header'][1:4] == [f'ppl @ {f * L} ({f}L)' for f in pe_config.FACTORS]
  for row in out['rows']:
    assert all(np.isfinite(float(v)) and float(v) > 1 for v in row[1:4]), row
  md = (tmp_path / 'out' / 'extrapolation.md').read_text()
  assert all(f'| {s} |' in md for s in analyze.SCHEMES)
  assert os.path.getsize(out['png']) > 10_000
