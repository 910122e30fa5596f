r"""A/B of the training-speed levers of issue 12, interleaved in one process.

  PYTHONPATH=. .venv/bin/python experiments/cpu_train_speed/ab.py --row=gpt2 [--rounds=5]
      [--steps=3] [--variants=base,loss,unroll,...] [--json=out.json]

Every variant is the real train step (`bench.build_lab_step`: build_setup / create_state /
make_train_step, lowered and compiled) on the same synthetic batch; the variants' timed blocks
alternate (`--rounds` rounds of `--steps` steps each, the order rotating), so that load from other
processes affects all of them alike, and the table reports each variant's median step time and its
ratio to the first variant. Levers that the training code does not switch on yet are applied by
patching the objective while the step is traced (the patch is undone before the next variant):

  loss       the objectives' cross entropy -> flaxformer_lab.losses.cross_entropy
  refloss    the objectives' cross entropy -> the original formulation (reference_cross_entropy)
  masked     MLM: the head scores only `masked_lm_positions` ([B, P]; targets/weights [B, P])
  oldmask    the per-layer boolean `where` mask (the form before the AttentionMask)
  unroll     model.scan_unroll = num_layers
  loop       model.scan_layers = False
  rbg / unsafe_rbg / threefry   config.rng_impl (the dropout keys' PRNG)
  bits8 / bits16 / bits32   model.dropout_bits (random bits per dropout decision)
  einsumhead the tied head as autodiff of x @ E^T (before the custom backward of embedding.tied_logits)
  blocksN    model.causal_attention_blocks = N (causal attention in N query blocks; 1 = off)
  nodrop     all dropout off (a reference, not a lever)

Variants combine levers with '+', e.g. `--variants=base,loss+unroll+unsafe_rbg`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from flaxformer_lab import bench  # pylint: disable=wrong-import-position

ROWS = {
    # The two rows of issue 12.
    'gpt2': ('gpt2:small', {'model.d_model': 256, 'model.num_layers': 4, 'model.num_heads': 4,
                            'model.mlp_dim': 1024, 'model.vocab_size': 8192,
                            'data.seq_len': 256, 'batch_size': 16}),
    'bert': ('bert:base', {'model.d_model': 256, 'model.num_layers': 4, 'model.num_heads': 4,
                           'model.mlp_dim': 1024, 'model.vocab_size': 8192, 'data.seq_len': 128,
                           'batch_size': 32}),
}


def row_config(name: str, extra: dict | None = None):
  import importlib  # pylint: disable=g-import-not-at-top
  spec, overrides = ROWS[name]
  module, _, arg = spec.partition(':')
  c = importlib.import_module(f'configs.{module}').get_config(arg)
  for key, value in {**overrides, **(extra or {})}.items():
    node = c
    *path, last = key.split('.')
    for part in path:
      node = node[part]
    node[last] = value
  return c


@contextlib.contextmanager
def patched(obj, name, value):
  old = getattr(obj, name)
  setattr(obj, name, value)
  try:
    yield
  finally:
    setattr(obj, name, old)


def variant(config, levers: list[str]):
  """(config, context manager of patches active while the step is traced) of a lever list."""
  from flaxformer_lab import losses  # pylint: disable=g-import-not-at-top
  from flaxformer_lab.models import transformer as transformer_lib  # pylint: disable=g-import-not-at-top
  from flaxformer_lab.tasks import base as tasks_base  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  stack = contextlib.ExitStack()
  for lever in levers:
    if lever == 'base':
      continue
    if lever == 'loss':
      stack.enter_context(patched(tasks_base, 'cross_entropy', losses.cross_entropy))
    elif lever == 'refloss':
      stack.enter_context(patched(tasks_base, 'cross_entropy', losses.reference_cross_entropy))
    elif lever == 'einsumhead':
      from flaxformer_lab.models import embedding  # pylint: disable=g-import-not-at-top
      stack.enter_context(patched(embedding, 'tied_logits',
                                  lambda x, e: jax.numpy.einsum('ble,ve->blv', x, e)))
    elif lever == 'oldmask':
      stack.enter_context(patched(transformer_lib, 'attention_mask', transformer_lib.visible_keys))
    elif lever == 'masked':
      from flaxformer_lab.tasks import mlm  # pylint: disable=g-import-not-at-top
      cls = mlm.MaskedLanguageModelling
      inputs, score = cls.model_inputs, cls.score

      def model_inputs(self, batch, inputs=inputs):
        return dict(inputs(self, batch), masked_positions=batch['masked_lm_positions'])

      def masked_score(self, outputs, batch, smoothing, score=score):
        batch = dict(batch, targets=batch['masked_lm_ids'], weights=batch['masked_lm_weights'])
        return score(self, outputs, batch, smoothing)

      stack.enter_context(patched(cls, 'model_inputs', model_inputs))
      stack.enter_context(patched(cls, 'score', masked_score))
    elif lever == 'unroll':
      config.model.scan_unroll = int(config.model.num_layers)
    elif lever == 'loop':
      config.model.scan_layers = False
    elif lever in ('rbg', 'unsafe_rbg', 'threefry2x32', 'threefry'):
      config.rng_impl = 'threefry2x32' if lever == 'threefry' else lever
    elif lever in ('bits8', 'bits16', 'bits32'):
      config.model.dropout_bits = int(lever[4:])
    elif lever.startswith('blocks') and lever[6:].isdigit():
      config.model.causal_attention_blocks = int(lever[6:])
    elif lever == 'nodrop':
      config.model.dropout_rate = 0.0
      config.model.attention_dropout_rate = 0.0
    else:
      raise ValueError(f'unknown lever {lever!r}')
  return config, stack


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--row', default='gpt2', choices=sorted(ROWS))
  p.add_argument('--variants', default='base,loss,unroll,unsafe_rbg,rbg,oldmask')
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--json', default='')
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  load0 = os.getloadavg()[0]
  base = row_config(args.row)
  batch = bench.synthetic_batch(base)
  names = [v for v in args.variants.split(',') if v]
  steps, compile_s = {}, {}
  for name in names:
    config, patches = variant(base, name.split('+'))
    with patches:
      lab = bench.build_lab_step(config, batch)
    compile_s[name] = lab.compile_s
    state = lab.state

    def run(lab=lab, box={'state': state}):  # pylint: disable=dangerous-default-value
      t = time.perf_counter()
      box['state'], m = lab.compiled(box['state'], lab.batch)
      jax.block_until_ready(box['state'])
      return time.perf_counter() - t, float(m['loss'])

    with lab.mesh_context():
      run()
      run()
    steps[name] = (lab, run)
  times = {n: [] for n in names}
  losses = {}
  for r in range(args.rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      lab, run = steps[name]
      with lab.mesh_context():
        for _ in range(args.steps):
          t, losses[name] = run()
          times[name].append(t)
  load1 = os.getloadavg()[0]
  ref = statistics.median(times[names[0]])
  lines = [f'row {args.row}: {bench._describe(base)}; load average {load0:.2f} -> {load1:.2f}; '
           f'{args.rounds} rounds x {args.steps} steps, interleaved',
           '| variant | step ms median | min | vs first | compile s | last loss |',
           '|---|---:|---:|---:|---:|---:|']
  out = {}
  for name in names:
    med = statistics.median(times[name])
    out[name] = dict(median_s=med, min_s=min(times[name]), ratio=med / ref,
                     compile_s=compile_s[name], times=times[name], loss=losses[name])
    lines.append(f'| {name} | {1e3 * med:.0f} | {1e3 * min(times[name]):.0f} | '
                 f'{med / ref:.3f} | {compile_s[name]:.1f} | {losses[name]:.4f} |')
  print('\n'.join(lines))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(row=args.row, load=[load0, load1], variants=out), f, indent=2)
  return out


if __name__ == '__main__':
  main()
