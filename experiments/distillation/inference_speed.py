r"""Forward-pass tokens/s of two lab run directories (e.g. a distilled student and its teacher),
measured interleaved in one process on the same random batch.

  python experiments/distillation/inference_speed.py --runs=workdirs/distill/distilled,workdirs/distill/teacher \
      [--batch=32] [--seq_len=128] [--rounds=7] [--iters=10]
"""

from __future__ import annotations

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lab import rundir
from flaxformer_lab.models.config import ModelConfig
from flaxformer_lab.models.transformer import build_model

_RUNS = flags.DEFINE_list('runs', None, 'Run directories to compare; times are given relative to '
                          'the last one.')
_BATCH = flags.DEFINE_integer('batch', 32, 'Sequences per forward pass.')
_SEQ = flags.DEFINE_integer('seq_len', 128, 'Tokens per sequence.')
_ROUNDS = flags.DEFINE_integer('rounds', 7, 'Interleaved rounds (median reported).')
_ITERS = flags.DEFINE_integer('iters', 10, 'Forward passes per round and run.')


def _forward(workdir):
  run = rundir.RunDir(workdir)
  cfg = ModelConfig.from_dict(run.load_config().model)
  params = jax.device_put(run.restore_params())
  model = build_model(cfg)
  fn = jax.jit(lambda p, ids: model.apply({'params': p}, input_ids=ids)['logits'])
  n = sum(np.size(x) for x in jax.tree.leaves(params))
  return cfg, params, fn, n


def measure(workdirs, batch: int = 32, seq_len: int = 128, rounds: int = 7, iters: int = 10):
  """Per run: layers, parameters, median ms per forward pass and tokens/s, the runs' timed blocks
  interleaved (`rounds` rounds of `iters` calls each) on one random batch."""
  rng = np.random.default_rng(0)
  runs = [_forward(w) for w in workdirs]
  vocab = min(cfg.vocab_size for cfg, *_ in runs)
  ids = jnp.asarray(rng.integers(5, vocab, size=(batch, seq_len)), jnp.int32)
  for _, params, fn, _ in runs:
    fn(params, ids).block_until_ready()  # compile
  times = [[] for _ in runs]
  for _ in range(rounds):
    for i, (_, params, fn, _) in enumerate(runs):
      start = time.perf_counter()
      for _ in range(iters):
        out = fn(params, ids)
      out.block_until_ready()
      times[i].append((time.perf_counter() - start) / iters)
  out = []
  for w, (cfg, _, _, n), t in zip(workdirs, runs, times):
    med = statistics.median(t)
    out.append({'run': w, 'layers': cfg.num_layers, 'params': n, 'ms': med * 1e3,
                'tokens_per_s': batch * seq_len / med})
  return out


def main(argv):
  del argv
  rows = measure(_RUNS.value, _BATCH.value, _SEQ.value, _ROUNDS.value, _ITERS.value)
  ref = rows[-1]['ms']
  print('| run | layers | params | ms / forward | tokens/s | time vs last |')
  print('|---|---:|---:|---:|---:|---:|')
  for r in rows:
    print(f'| {r["run"]} | {r["layers"]} | {r["params"]:,} | {r["ms"]:.1f} | '
          f'{r["tokens_per_s"]:,.0f} | {r["ms"] / ref:.2f}x |')


if __name__ == '__main__':
  flags.mark_flag_as_required('runs')
  app.run(main)
