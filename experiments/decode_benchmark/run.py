r"""Decode speed of flaxformer_lab.decoding vs Hugging Face GPT2LMHeadModel.generate, same weights.

  PYTHONPATH=. .venv/bin/python experiments/decode_benchmark/run.py            # about 3 minutes
  PYTHONPATH=. .venv/bin/python experiments/decode_benchmark/run.py --layers=2 --new_tokens=8

A GPT-2-shaped decoder (configs/gpt2.py with smaller sizes) is initialized once in the lab; the
same random weights are copied by hand into a torch GPT2LMHeadModel. Both decode the same random
prompts (equal lengths, no padding) with greedy search and beam search, at batch 1 and batch 8,
with no stop token, so every run produces exactly `new_tokens` tokens per sequence. Reported:
wall time per generate call (best of `repeats`, the two implementations alternating, after a
warm-up call that also compiles the lab's program; the minimum, not the median, because this
machine is shared and other jobs inflate single calls), tokens/s = batch * new_tokens / time
(beam search: returned tokens, not beam tokens), and whether the two implementations returned the
same tokens. Writes results.md beside this file.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import flax.linen as nn
import jax
import numpy as np

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')

from flaxformer_lab.presets import gpt2 as gpt2_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from flaxformer_lab import bench  # pylint: disable=wrong-import-position
from flaxformer_lab import decoding  # pylint: disable=wrong-import-position
from flaxformer_lab.models.config import ModelConfig  # pylint: disable=wrong-import-position
from flaxformer_lab.models.transformer import build_model  # pylint: disable=wrong-import-position
from flaxformer_lab.models.transformer import dummy_inputs  # pylint: disable=wrong-import-position


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--layers', type=int, default=6)
  p.add_argument('--d_model', type=int, default=384)
  p.add_argument('--heads', type=int, default=6)
  p.add_argument('--vocab', type=int, default=50257, help='GPT-2 BPE size')
  p.add_argument('--prompt_len', type=int, default=16)
  p.add_argument('--new_tokens', type=int, default=32)
  p.add_argument('--batches', type=str, default='1,8')
  p.add_argument('--beams', type=int, default=4)
  p.add_argument('--strategies', type=str, default='greedy,beam', help='greedy, beam or both')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--threads', type=int, default=os.cpu_count() or 1,
                 help='torch.set_num_threads (XLA on CPU uses every core)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--scanned_decode', action='store_true',
                 help='decode with the scanned layer stack (generate(unroll_layers=False))')
  p.add_argument('--device', type=str, default='auto',
                 help="torch device of the HF model: auto (cuda when available) | cpu | cuda")
  p.add_argument('--out', type=str, default=os.path.join(os.path.dirname(__file__), 'results.md'))
  return p.parse_args(argv)


def lab_config(args) -> ModelConfig:
  c = gpt2_config.get_config('small')
  cfg = ModelConfig.from_dict(c.model)
  return cfg.replace(num_layers=args.layers, d_model=args.d_model, num_heads=args.heads,
                     mlp_dim=4 * args.d_model, vocab_size=args.vocab, dropout_rate=0.0,
                     attention_dropout_rate=0.0)


def to_hf_state_dict(params, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Lab GPT-2 params (scanned, fused qkv) -> GPT2LMHeadModel state dict (Conv1D: [in, out])."""
  p = jax.tree.map(np.asarray, params)
  d = cfg.d_model
  layers = p['decoder']['layers']
  sd = {'transformer.wte.weight': p['tokens']['embedding'],
        'transformer.wpe.weight': p['decoder_embeddings']['positions']['embedding'],
        'transformer.ln_f.weight': p['decoder']['final_norm']['scale'],
        'transformer.ln_f.bias': p['decoder']['final_norm']['bias']}
  for i in range(cfg.num_layers):
    h = f'transformer.h.{i}.'
    attn = jax.tree.map(lambda x, i=i: x[i], layers['self_attention'])
    mlp = jax.tree.map(lambda x, i=i: x[i], layers['mlp'])
    sd.update({
        h + 'ln_1.weight': layers['self_attention_norm']['scale'][i],
        h + 'ln_1.bias': layers['self_attention_norm']['bias'][i],
        h + 'attn.c_attn.weight': attn['qkv_kernel'].reshape(d, -1),  # [D, 3, H, K] -> [D, 3D]
        h + 'attn.c_attn.bias': attn['qkv_bias'].reshape(-1),
        h + 'attn.c_proj.weight': attn['out_kernel'].reshape(-1, d),  # [H, K, D] -> [D, D]
        h + 'attn.c_proj.bias': attn['out_bias'],
        h + 'ln_2.weight': layers['mlp_norm']['scale'][i],
        h + 'ln_2.bias': layers['mlp_norm']['bias'][i],
        h + 'mlp.c_fc.weight': mlp['wi']['kernel'],
        h + 'mlp.c_fc.bias': mlp['wi']['bias'],
        h + 'mlp.c_proj.weight': mlp['wo']['kernel'],
        h + 'mlp.c_proj.bias': mlp['wo']['bias'],
    })
  return sd


def hf_model(cfg: ModelConfig, state_dict):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  hf_cfg = transformers.GPT2Config(
      vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model,
      n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.hidden_dim,
      activation_function='gelu_new', resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=True, bos_token_id=None,
      eos_token_id=None, pad_token_id=0)
  model = transformers.GPT2LMHeadModel(hf_cfg).eval()
  missing, unexpected = model.load_state_dict(
      {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state_dict.items()}, strict=False)
  missing = [k for k in missing if k != 'lm_head.weight']  # tied to wte
  if missing or unexpected:
    raise RuntimeError(f'weight mapping: missing {missing}, unexpected {unexpected}')
  model.generation_config.eos_token_id = None
  model.generation_config.bos_token_id = None
  model.generation_config.pad_token_id = 0
  return model, transformers.__version__, torch.__version__


def timed_pair(fn_a, fn_b, repeats):
  """Warm-up calls, then `repeats` alternating timed calls of each (so both see the same load).

  Returns (output, warm-up seconds, best seconds) for a, then for b.
  """
  results = []
  for fn in (fn_a, fn_b):
    start = time.perf_counter()
    out = fn()
    results.append([out, time.perf_counter() - start, []])
  for _ in range(repeats):
    for fn, res in zip((fn_a, fn_b), results):
      start = time.perf_counter()
      res[0] = fn()
      res[2].append(time.perf_counter() - start)
  return [(out, warm, min(times)) for out, warm, times in results]


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  load0 = os.getloadavg()[0]
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  device = ('cuda' if torch.cuda.is_available() else 'cpu') if args.device == 'auto' else args.device
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  cfg = lab_config(args)
  model = build_model(cfg)
  params = jax.jit(lambda k: model.init(k, **dummy_inputs(cfg, 1, 8))['params'])(
      jax.random.PRNGKey(args.seed))
  params = jax.tree.map(np.asarray, nn.meta.unbox(params))
  hf, hf_version, torch_version = hf_model(cfg, to_hf_state_dict(params, cfg))
  hf = hf.to(device)
  params = jax.device_put(params)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  rng = np.random.RandomState(args.seed)
  with torch.inference_mode():  # the first generate calls of a process are slow (lazy set-up)
    warm = torch.zeros((1, args.prompt_len), dtype=torch.int64, device=device)
    for beams in (1, args.beams):
      hf.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, num_beams=beams,
                  do_sample=False, pad_token_id=0)
  rows = []
  for batch in [int(b) for b in args.batches.split(',')]:
    prompt = rng.randint(0, cfg.vocab_size, size=(batch, args.prompt_len)).astype(np.int32)
    for strategy, beams in [(s, 1 if s == 'greedy' else args.beams)
                            for s in args.strategies.split(',') if s]:
      lab_fn = lambda: jax.block_until_ready(decoding.generate(
          cfg, params, prompt, None, max_new_tokens=args.new_tokens, strategy=strategy,
          num_beams=beams, length_penalty=0.0, eos_id=None,
          unroll_layers=not args.scanned_decode)['tokens'])
      ids = torch.from_numpy(prompt.astype(np.int64)).to(device)

      def hf_fn():
        with torch.inference_mode():
          out = hf.generate(ids, attention_mask=torch.ones_like(ids),
                            max_new_tokens=args.new_tokens, min_new_tokens=0,
                            do_sample=False, num_beams=beams, num_return_sequences=1,
                            use_cache=True, pad_token_id=0)
          sync()
          return out
      (lab_out, lab_warm, lab_t), (hf_out, _, hf_t) = timed_pair(lab_fn, hf_fn, args.repeats)
      hf_new = hf_out[:, args.prompt_len:].cpu().numpy()
      same = hf_new.shape == lab_out.shape and bool((hf_new == np.asarray(lab_out)).all())
      agree = float((hf_new == np.asarray(lab_out)).mean()) if hf_new.shape == lab_out.shape \
          else 0.0
      tokens = batch * args.new_tokens
      rows.append(dict(strategy=f'{strategy}' + (f' {beams}' if strategy == 'beam' else ''),
                       batch=batch, lab_ms=1e3 * lab_t, lab_tps=tokens / lab_t,
                       lab_compile_s=lab_warm - lab_t, hf_ms=1e3 * hf_t, hf_tps=tokens / hf_t,
                       speedup=hf_t / lab_t, same=same, agree=agree))
      r = rows[-1]
      print(f'{r["strategy"]:>7} batch {batch}: lab {r["lab_ms"]:.0f} ms ({r["lab_tps"]:.0f} '
            f'tok/s, compile {r["lab_compile_s"]:.1f}s), HF {r["hf_ms"]:.0f} ms ({r["hf_tps"]:.0f} '
            f'tok/s), same tokens: {same} ({100 * agree:.0f}%)', flush=True)
  header = ('| strategy | batch | lab ms/call | lab tokens/s | lab compile s | HF ms/call | '
            'HF tokens/s | HF time / lab time | same tokens |\n'
            '|---|---:|---:|---:|---:|---:|---:|---:|---|')
  lines = [header] + [
      f'| {r["strategy"]} | {r["batch"]} | {r["lab_ms"]:.0f} | {r["lab_tps"]:.0f} | '
      f'{r["lab_compile_s"]:.1f} | {r["hf_ms"]:.0f} | {r["hf_tps"]:.0f} | {r["speedup"]:.2f}x | '
      f'{"yes" if r["same"] else "no (%.0f%% of tokens)" % (100 * r["agree"])} |' for r in rows]
  table = '\n'.join(lines)
  command = 'PYTHONPATH=. .venv/bin/python experiments/decode_benchmark/run.py ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  setup = (f'GPT-2-shaped decoder: {cfg.num_layers} layers, d_model {cfg.d_model}, '
           f'{cfg.num_heads} heads, mlp {cfg.hidden_dim}, vocab {cfg.vocab_size}, '
           f'{n_params / 1e6:.1f}M parameters, float32; prompt {args.prompt_len} tokens, '
           f'{args.new_tokens} new tokens, no stop token; best of {args.repeats} calls after a '
           f'warm-up; lab layers {"scanned" if args.scanned_decode else "unrolled"} while '
           f'decoding. Load average (1 min) {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at '
           f'the end. Machine: {platform.machine()}, {os.cpu_count()} CPU cores of '
           f'{bench.cpu_description()}, '
           f'{platform.python_version()}; jax {jax.__version__} ({jax.default_backend()}), '
           f'torch {torch_version} ({device}, {args.threads} threads), transformers {hf_version}.')
  report = f'Command: `{command.strip()}`\n\n{setup}\n\n{table}\n'
  print('\n' + report)
  with open(args.out, 'w') as f:
    f.write('# Decode benchmark: flaxformer_lab.decoding vs Hugging Face generate\n\n' + report)
  return rows


if __name__ == '__main__':
  main()
