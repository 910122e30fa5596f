r"""The GPT-2 row's kernels one by one, XLA CPU against PyTorch, interleaved in one process.

  PYTHONPATH=. .venv/bin/python experiments/cpu_train_speed/kernels.py [--rounds=5] [--reps=5]

Issue 12 asks the lab's train step for 1.3x Hugging Face compiled on this CPU. This measures the
floor under that: each matmul of the GPT-2 row (batch 16, seq 256 -> 4096 positions, d 256, 4 heads
of 64, mlp 1024, vocab 8192), forward only, float32, once as a jitted JAX function and once as the
torch call Hugging Face makes, the two alternating in `--rounds` rounds of `--reps` calls. If a
kernel that both step times are made of runs slower under XLA than under torch, no rewrite of the
model around it can put the whole step 1.3x ahead. Prints a markdown table (median ms per call, the
ratio torch time / JAX time: above 1 means JAX is faster) and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _cases(rng):
  """(name, jax fn, jax args, torch fn, torch args, flops) for each kernel of the GPT-2 row."""
  import torch  # pylint: disable=g-import-not-at-top
  n, d, h, k, t, b = 4096, 256, 4, 64, 256, 16

  def arr(*shape):
    return rng.standard_normal(shape, dtype=np.float32)

  def both(*arrays):
    return [jnp.asarray(a) for a in arrays], [torch.from_numpy(a.copy()) for a in arrays]

  out = []
  for name, (m, kk, nn) in {'qkv projection': (n, d, 3 * d), 'output projection': (n, d, d),
                            'mlp up': (n, d, 4 * d), 'mlp down': (n, 4 * d, d),
                            'tied output head': (n, d, 8192)}.items():
    (ja, jb), (ta, tb) = both(arr(m, kk), arr(kk, nn))
    out.append((f'{name} [{m}x{kk}] @ [{kk}x{nn}]', jax.jit(jnp.matmul), (ja, jb),
                torch.matmul, (ta, tb), 2 * m * kk * nn))
  (jq, jk), (tq, tk) = both(arr(b, h, t, k), arr(b, h, t, k))
  out.append((f'attention scores [{b}x{h}x{t}x{k}] q k^T',
              jax.jit(lambda q, kx: jnp.einsum('bhqd,bhkd->bhqk', q, kx)), (jq, jk),
              lambda q, kx: q @ kx.transpose(-1, -2), (tq, tk), 2 * b * h * t * t * k))
  (jp, jv), (tp, tv) = both(arr(b, h, t, t), arr(b, h, t, k))
  out.append((f'attention values [{b}x{h}x{t}x{t}] p v', jax.jit(jnp.matmul), (jp, jv),
              torch.matmul, (tp, tv), 2 * b * h * t * t * k))
  (jq, jk, jv), (tq, tk, tv) = both(arr(b, t, h, k), arr(b, t, h, k), arr(b, t, h, k))
  tq, tk, tv = (x.transpose(1, 2).contiguous() for x in (tq, tk, tv))
  out.append(('causal attention forward (jax.nn.dot_product_attention xla / torch sdpa)',
              jax.jit(lambda q, kx, v: jax.nn.dot_product_attention(q, kx, v, is_causal=True)),
              (jq, jk, jv),
              lambda q, kx, v: torch.nn.functional.scaled_dot_product_attention(
                  q, kx, v, is_causal=True), (tq, tk, tv), 4 * b * h * t * t * k))
  return out


def _time(fn, args, reps, sync):
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    sync(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--threads', type=int, default=os.cpu_count() or 1,
                      help='torch threads (default: the CPU count)')
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  load = os.getloadavg()[0]
  rows = []
  for name, jfn, jargs, tfn, targs, flops in _cases(np.random.default_rng(0)):
    jsync, tsync = jax.block_until_ready, lambda x: x
    _time(jfn, jargs, 2, jsync)  # compile and warm up
    _time(tfn, targs, 2, tsync)
    jt, tt = [], []
    for r in range(args.rounds):
      order = [(jt, jfn, jargs, jsync), (tt, tfn, targs, tsync)]
      for acc, fn, fargs, sync in (order if r % 2 == 0 else order[::-1]):
        acc.extend(_time(fn, fargs, args.reps, sync))
    jm, tm = statistics.median(jt), statistics.median(tt)
    rows.append((name, jm * 1e3, tm * 1e3, flops / jm / 1e9, flops / tm / 1e9, tm / jm))
  print('| kernel (forward, float32) | JAX ms | torch ms | JAX GFLOP/s | torch GFLOP/s | '
        'torch / JAX |')
  print('|---|---:|---:|---:|---:|---:|')
  for name, jm, tm, jg, tg, ratio in rows:
    print(f'| {name} | {jm:.2f} | {tm:.2f} | {jg:.0f} | {tg:.0f} | {ratio:.2f}x |')
  print(f'\njax {jax.__version__}, torch {torch.__version__} ({args.threads} threads), '
        f'{os.cpu_count()} CPU cores; load average (1 min) {load:.2f} -> {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  main()
