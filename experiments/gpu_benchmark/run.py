r"""The prepared single-GPU benchmark (issue 12): the lab against Hugging Face on the same chip.

  python experiments/gpu_benchmark/run.py --wheels=.whl --out=$OUT          # an H100/H200, ~8 min
  python experiments/gpu_benchmark/run.py --tiny --out=/tmp/gpu_bench       # tiny CPU form (tests)

Written for a machine whose Python has jax with CUDA, flax, optax, orbax, torch and transformers
but may lack the project's other dependencies: every missing one of ml_collections, grain,
tensorflow-datasets, array_record and tensorboardX is installed from the wheels in `--wheels`
(pip --no-index --no-deps, into `<out>/site` unless `--site` says otherwise) before anything of the
project is imported. Then, each part in its own try block so that one failure still leaves the
others' numbers:

  gpt2   GPT-2 124M (configs/gpt2.py:small), sequence 1024, bfloat16, cuDNN flash attention
         (attention-weight dropout 0 on both sides: cuDNN has none), `bench.run` with --vs_hf:
         HF GPT2LMHeadModel (sdpa, bf16 autocast, torch.compile) interleaved on the same GPU;
         tokens/s, MFU (against the chip's datasheet bf16 peak), memory, compile times.
  bert   BERT-base MLM at sequence 512 (BertForMaskedLM / BertForPreTraining), same settings.
  decode GPT-2 124M decoding vs `generate` (experiments/decode_benchmark/run.py on the GPU):
         greedy and 4-beam search at batch 1 and 8.

Each part's result is written as soon as it is done: `<out>/results.json` (everything `bench.run`
returns, per part) and `<out>/results.md` (the tables, the command, the machine). `--budget_s`
skips the parts that would start after that many seconds. JAX does not preallocate GPU memory
here (XLA_PYTHON_CLIENT_PREALLOCATE=false) so that torch shares the device.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MISSING_CANDIDATES = {  # import name -> wheel name prefix
    'ml_collections': 'ml_collections',
    'grain': 'grain',
    'tensorflow_datasets': 'tensorflow_datasets',
    'array_record': 'array_record',
    'tensorboardX': 'tensorboardX',
}
PARTS = ('gpt2', 'bert', 'decode')


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', required=True, help='output directory (results.json, results.md)')
  p.add_argument('--wheels', default='', help='folder of wheels for the missing dependencies')
  p.add_argument('--site', default='', help='install target for the wheels (default <out>/site)')
  p.add_argument('--parts', default=','.join(PARTS), help='comma list of ' + ', '.join(PARTS))
  p.add_argument('--tiny', action='store_true', help='tiny shapes: the CPU form used by tests')
  p.add_argument('--steps', type=int, default=0, help='timed train steps (default 30; tiny 2)')
  p.add_argument('--rounds', type=int, default=0, help='interleaved rounds (default 5; tiny 1)')
  p.add_argument('--gpt2_batch', type=int, default=16)
  p.add_argument('--bert_batch', type=int, default=32)
  p.add_argument('--hf_modes', default='', help='default compile (tiny: eager)')
  p.add_argument('--budget_s', type=float, default=450.0,
                 help='do not start a part after this many seconds')
  return p.parse_args(argv)


def install_missing(wheels: str, site: str) -> dict:
  """pip-installs the wheels of the dependencies that do not import; returns what it did."""
  missing = []
  for module in MISSING_CANDIDATES:
    try:
      importlib.import_module(module)
    except ImportError:
      missing.append(module)
  report = {'missing': missing, 'installed': []}
  if not missing:
    return report
  if not wheels or not os.path.isdir(wheels):
    raise SystemExit(f'missing {", ".join(missing)} and no --wheels folder to install them from')
  files = sorted(glob.glob(os.path.join(wheels, '*.whl')))
  os.makedirs(site, exist_ok=True)
  cmd = [sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile',
         '--no-cache-dir', '--upgrade', '--target', site, *files]
  subprocess.run(cmd, check=True)
  sys.path.insert(0, site)
  importlib.invalidate_caches()
  for module in missing:
    importlib.import_module(module)  # fails loudly if a wheel was not there
  report['installed'] = [os.path.basename(f) for f in files]
  return report


def _config(spec: str, overrides: dict):
  module, _, arg = spec.partition(':')
  c = importlib.import_module(f'configs.{module}').get_config(arg or None)
  for key, value in overrides.items():
    node = c
    *path, last = key.split('.')
    for name in path:
      node = node[name]
    node[last] = value
  return c


def train_configs(args) -> dict:
  """The lab configs of the two training parts (real sizes, or tiny ones for the CPU form)."""
  gpu = dict(**{'model.dtype': 'bfloat16', 'model.attention_dropout_rate': 0.0})
  if not args.tiny:
    gpu['model.attention_backend'] = 'cudnn'
  if args.tiny:
    gpt2 = _config('gpt2:tiny', {**gpu, 'model.num_layers': 1, 'data.seq_len': 32,
                                 'batch_size': 2})
    bert = _config('bert:tiny', {**gpu, 'model.num_layers': 1, 'data.seq_len': 32,
                                 'batch_size': 2})
  else:
    gpt2 = _config('gpt2:small', {**gpu, 'data.seq_len': 1024, 'batch_size': args.gpt2_batch})
    bert = _config('bert:base', {**gpu, 'data.seq_len': 512, 'model.max_len': 512,
                                 'batch_size': args.bert_batch})
  return {'gpt2': gpt2, 'bert': bert}


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  start = time.time()
  os.makedirs(args.out, exist_ok=True)
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  results: dict = {'command': ' '.join(['python', 'experiments/gpu_benchmark/run.py'] +
                                       (sys.argv[1:] if argv is None else list(argv))),
                   'install': install_missing(args.wheels, args.site or
                                              os.path.join(args.out, 'site')),
                   'parts': {}}
  import jax  # pylint: disable=g-import-not-at-top
  from flaxformer_lab import bench  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  results['device'] = f'{dev.platform} {getattr(dev, "device_kind", "")} x{jax.device_count()}'
  steps = args.steps or (2 if args.tiny else 30)
  rounds = args.rounds or (1 if args.tiny else 5)
  hf_modes = tuple(m for m in (args.hf_modes or ('eager' if args.tiny else 'compile')).split(',')
                   if m)
  parts = [p for p in args.parts.split(',') if p]
  configs = train_configs(args)
  tables = []

  def write():
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2, default=str)
    md = [f'# GPU benchmark: flaxformer_lab vs Hugging Face\n', f'Command: `{results["command"]}`',
          f'Device: {results["device"]}; total {time.time() - start:.0f} s.\n'] + tables
    with open(os.path.join(args.out, 'results.md'), 'w') as f:
      f.write('\n\n'.join(md) + '\n')

  for part in parts:
    if time.time() - start > args.budget_s:
      results['parts'][part] = {'skipped': f'budget of {args.budget_s:.0f} s spent'}
      write()
      continue
    t0 = time.time()
    print(f'--- {part}', flush=True)
    try:
      if part in ('gpt2', 'bert'):
        label = {'gpt2': 'GPT-2 124M, seq 1024' if not args.tiny else 'GPT-2 tiny',
                 'bert': 'BERT-base MLM, seq 512' if not args.tiny else 'BERT tiny'}[part]
        r = bench.run(configs[part], steps=steps, rounds=rounds, warmup=2, vs_hf=True,
                      hf_modes=hf_modes, label=label)
        results['parts'][part] = r
        tables.append(f'## {label}\n\n' + bench.markdown([r]))
      elif part == 'decode':
        import importlib.util  # pylint: disable=g-import-not-at-top
        spec = importlib.util.spec_from_file_location(
            'decode_benchmark_run', os.path.join(ROOT, 'experiments', 'decode_benchmark', 'run.py'))
        decode = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(decode)
        out_md = os.path.join(args.out, 'decode.md')
        dargs = (['--layers=1', '--d_model=32', '--heads=2', '--vocab=97', '--prompt_len=4',
                  '--new_tokens=3', '--batches=1', '--repeats=1', '--strategies=greedy']
                 if args.tiny else
                 ['--layers=12', '--d_model=768', '--heads=12', '--repeats=3'])
        rows = decode.main(dargs + [f'--out={out_md}'])
        results['parts'][part] = {'rows': rows}
        with open(out_md) as f:
          tables.append('## Decoding vs generate\n\n' + f.read().split('\n', 2)[2])
      else:
        raise ValueError(f'unknown part {part!r}; choose from {", ".join(PARTS)}')
      results['parts'].setdefault(part, {})
      if isinstance(results['parts'][part], dict):
        results['parts'][part]['wall_s'] = time.time() - t0
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      results['parts'][part] = {'error': f'{type(e).__name__}: {e}'[:2000],
                                'wall_s': time.time() - t0}
      tables.append(f'## {part}\n\nfailed: `{type(e).__name__}: {str(e)[:300]}`')
    write()
    print(tables[-1] if tables else '', flush=True)
  write()
  failed = [p for p, r in results['parts'].items() if 'error' in r]
  print(f'wrote {args.out}/results.json and results.md in {time.time() - start:.0f} s'
        + (f'; failed: {", ".join(failed)}' if failed else ''))
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
