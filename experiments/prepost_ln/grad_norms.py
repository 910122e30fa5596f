r"""Per-layer gradient norms at initialization for each norm placement (Xiong et al. 2020, Fig. 3).

Xiong et al.: at initialization, post-LN's gradient norms grow toward the output layers while
pre-LN's stay flat (their analysis assumes Xavier initialization). This script takes the sweep's
deep decoder (experiments/prepost_ln/config.py: 18 layers, d_model 64), tiny shakespeare
characters, and averages over seeds and batches the gradient norm of each layer's feed-forward
output kernel (W^FC2, as in the paper's figure) and of all of the layer's parameters, for
  - the library's initialization (normal, stddev 0.02; what the sweep trains), and
  - Xavier-normal kernels (the papers' initialization; DeepNorm keeps its beta on top).

  python experiments/prepost_ln/grad_norms.py [--layers=18] [--out=experiments/prepost_ln]

Writes grad_norm_at_init.png and grad_norm_at_init.json (the numbers) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from flaxformer_lab.models.block import deepnorm_constants  # pylint: disable=g-import-not-at-top,wrong-import-position
from flaxformer_lab.models.config import ModelConfig  # pylint: disable=wrong-import-position
from flaxformer_lab.models.transformer import build_model  # pylint: disable=wrong-import-position
from flaxformer_lab.presets import common  # pylint: disable=wrong-import-position

PLACEMENTS = ('pre', 'post', 'deepnorm')
BETA_SCALED = ('value_kernel', 'out_kernel', 'wi', 'wi_gate', 'wo')  # DeepNorm's beta names


def char_batches(seq_len: int, batch: int, num: int, seed: int) -> list[np.ndarray]:
  """Random windows of tiny shakespeare's training text as character ids (1 + rank of the char)."""
  path = os.path.join(common.default_data_dir(), 'tinyshakespeare', 'input.txt')
  text = open(path, encoding='utf-8').read()
  text = text[:int(len(text) * 0.9)]  # the training part
  vocab = {c: i + 1 for i, c in enumerate(sorted(set(text)))}
  ids = np.array([vocab[c] for c in text], np.int32)
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    starts = rng.integers(0, len(ids) - seq_len - 1, size=batch)
    out.append(np.stack([ids[s:s + seq_len + 1] for s in starts]))
  return out


def model_config(placement: str, layers: int, d_model: int, seq_len: int) -> ModelConfig:
  return ModelConfig(family='decoder', head='lm', vocab_size=80, d_model=d_model, num_heads=4,
                     mlp_dim=4 * d_model, num_layers=layers, norm_position=placement,
                     position='learned', max_len=seq_len, dropout_rate=0.0,
                     attention_dropout_rate=0.0, scan_layers=False).replace()


def xavier(params, cfg: ModelConfig, rng):
  """Xavier-normal kernels inside the layers (fan-in/out from the einsum layouts); DeepNorm's
  v/out/FFN kernels keep their beta."""
  _, beta = deepnorm_constants(cfg, has_cross=False)
  flat = _flatten(params)
  out = {}
  for i, (path, value) in enumerate(sorted(flat.items())):
    if '/layers_' not in path or not path.endswith('kernel'):
      out[path] = value
      continue
    name = path.split('/')[-1] if path.split('/')[-1] != 'kernel' else path.split('/')[-2]
    shape = value.shape
    if name == 'out_kernel':  # [H, K, D]
      fan_in, fan_out = shape[0] * shape[1], shape[2]
    elif value.ndim == 3:  # q/k/v [D, H, K]
      fan_in, fan_out = shape[0], shape[1] * shape[2]
    else:  # dense [in, out]
      fan_in, fan_out = shape
    std = np.sqrt(2.0 / (fan_in + fan_out))
    if cfg.norm_position == 'deepnorm' and name in BETA_SCALED:
      std *= beta
    out[path] = std * jax.random.normal(jax.random.fold_in(rng, i), shape, value.dtype)
  return _unflatten(out)


def _flatten(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}/'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _unflatten(flat):
  out: dict = {}
  for path, v in flat.items():
    node = out
    parts = path.split('/')
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


def layer_grad_norms(placement, layers, d_model, seq_len, batches, seeds, init):
  cfg = model_config(placement, layers, d_model, seq_len)
  model = build_model(cfg)

  def loss_fn(params, tokens):
    logits = model.apply({'params': params}, tokens[:, :-1])['logits']
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  grad_fn = jax.jit(jax.grad(loss_fn))
  fc2, whole = np.zeros(layers), np.zeros(layers)
  n = 0
  for seed in seeds:
    rng = jax.random.PRNGKey(seed)
    params = nn.meta.unbox(model.init(rng, batches[0][:1, :-1])['params'])
    if init == 'xavier':
      params = xavier(params, cfg, jax.random.fold_in(rng, 1))
    for tokens in batches:
      g = grad_fn(params, jnp.asarray(tokens))['decoder']
      for i in range(layers):
        layer = g[f'layers_{i}']
        fc2[i] += float(jnp.linalg.norm(layer['mlp']['wo']['kernel']))
        whole[i] += float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(layer))))
      n += 1
  return (fc2 / n).tolist(), (whole / n).tolist()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', type=int, default=18)
  parser.add_argument('--d_model', type=int, default=64)
  parser.add_argument('--seq_len', type=int, default=32)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--batches', type=int, default=4)
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--out', default=os.path.dirname(os.path.abspath(__file__)))
  a = parser.parse_args()
  batches = char_batches(a.seq_len, a.batch, a.batches, seed=0)
  results = {}
  for init in ('lab', 'xavier'):
    for placement in PLACEMENTS:
      fc2, whole = layer_grad_norms(placement, a.layers, a.d_model, a.seq_len, batches,
                                    range(a.seeds), init)
      results[f'{init}/{placement}'] = {'fc2': fc2, 'layer': whole}
      print(f'{init:6s} {placement:8s} FC2 grad norm, layer 1 -> {a.layers}: '
            + ' '.join(f'{x:.3g}' for x in fc2), flush=True)
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, 'grad_norm_at_init.json'), 'w') as f:
    json.dump({'args': vars(a), 'results': results}, f, indent=1)

  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(10, 7), dpi=100)
  FigureCanvasAgg(fig)
  colors = {'pre': 'tab:blue', 'post': 'tab:orange', 'deepnorm': 'tab:green'}
  titles = {'lab': 'library init (normal 0.02)', 'xavier': 'Xavier-normal init'}
  for r, init in enumerate(('lab', 'xavier')):
    for c, (key, what) in enumerate((('fc2', 'FFN output kernel W^FC2'),
                                     ('layer', 'all parameters of the layer'))):
      ax = fig.add_subplot(2, 2, 2 * r + c + 1)
      for p in PLACEMENTS:
        ys = results[f'{init}/{p}'][key]
        ax.plot(range(1, a.layers + 1), ys, marker='o', markersize=3, color=colors[p], label=p)
      ax.set_yscale('log')
      ax.set_xlabel('layer')
      ax.set_ylabel('gradient norm')
      ax.set_title(f'{what}, {titles[init]}', fontsize=9)
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize=8)
  fig.suptitle(f'Gradient norms at initialization, {a.layers}-layer char decoder (d={a.d_model}), '
               f'mean of {a.seeds} seeds x {a.batches} batches', fontsize=10)
  fig.tight_layout()
  fig.savefig(os.path.join(a.out, 'grad_norm_at_init.png'))
  print('wrote', os.path.join(a.out, 'grad_norm_at_init.png'))


if __name__ == '__main__':
  main()
