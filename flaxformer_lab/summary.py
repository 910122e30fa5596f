r"""Parameter counts of a config, from shapes alone (no weights are allocated).

  python -m flaxformer_lab.summary --config=configs/bert.py:base
  python -m flaxformer_lab.summary --config=configs/t5.py:small --json
  python -m flaxformer_lab.summary --config=configs/gpt2.py:small --config.model.num_layers=6

The model is traced with `jax.eval_shape(model.init, ...)`: even the largest preset takes seconds.

Counting convention (what `--json` reports):
  learned_params         every parameter of our model (what the optimizer updates).
  head_params            the task head: lm_head, mlm_head, classifier, token_classifier, pair_head.
  fixed_position_params  sinusoidal position tables, max_len x embed per stack. Our model computes
                         them on the fly; Hugging Face stores them as frozen weights (MarianModel's
                         `embed_positions`, one per stack) and counts them in `num_parameters()`.
  body_params            the task-independent body counted as the matching Hugging Face base model
                         class counts it (BertModel, GPT2Model, T5Model, MarianModel, ...):
                         embeddings, stacks, final norms, relative position bias, the pooler where
                         the body has one, plus the fixed position tables; not the head.
  body_learned_params    body_params without the fixed tables (the paper-style count).
  total_params           body_params + head_params (the count of the *For<Task> class).
  modules                learned parameters per top-level module.
"""

from __future__ import annotations

import json
import math
from typing import Any

from absl import flags
import flax.linen as nn
import jax
from ml_collections import config_flags
import numpy as np

from flaxformer_lab import errors
from flaxformer_lab.models.config import ConfigError, ModelConfig
from flaxformer_lab.models.transformer import build_model, dummy_inputs

# Top-level modules of `Transformer` that make up the task head; everything else is the body.
HEAD_MODULES = ('lm_head', 'mlm_head', 'classifier', 'token_classifier', 'pair_head')
# Order of the table's groups: the data flow (modules not listed follow, alphabetically).
MODULE_ORDER = ('tokens', 'decoder_tokens', 'encoder_embeddings', 'encoder_relative_bias',
                'encoder', 'decoder_embeddings', 'decoder_relative_bias', 'decoder',
                'pooler') + HEAD_MODULES


def model_config_of(config: Any) -> ModelConfig:
  """A validated ModelConfig from a ModelConfig, a full training config or its model section."""
  if isinstance(config, ModelConfig):
    config.validate()
    return config
  if 'model' in config:
    config = config['model']
  return ModelConfig.from_dict(config)


def abstract_params(config: Any) -> dict[str, Any]:
  """The boxed parameter tree of `config`'s model as ShapeDtypeStructs (nothing is allocated)."""
  cfg = model_config_of(config)
  model = build_model(cfg)
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  variables = jax.eval_shape(lambda: model.init(rngs, **dummy_inputs(cfg, batch=1, length=4)))
  return variables['params']


def _path_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def param_rows(params) -> list[dict[str, Any]]:
  """One row per parameter: path, shape, count, logical axis names (None where unnamed)."""
  rows = []
  leaves = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))[0]
  for path, leaf in leaves:
    axes = getattr(leaf, 'names', None)
    value = nn.meta.unbox(leaf)
    shape = tuple(int(d) for d in value.shape)
    rows.append(dict(path=_path_name(path), shape=shape, count=math.prod(shape),
                     axes=tuple(axes) if axes is not None else None))
  return rows


def fixed_position_params(cfg: ModelConfig) -> int:
  """Entries of the sinusoidal tables Hugging Face would store (one per stack with embeddings)."""
  if cfg.position != 'sinusoidal':
    return 0
  stacks = 2 if cfg.family == 'encoder_decoder' else 1
  return stacks * cfg.max_len * cfg.embed_dim


def count_params(config: Any) -> dict[str, Any]:
  """Parameter counts of `config` (a training ConfigDict, its model section or a ModelConfig).

  Returns a dict with body_params, total_params, learned_params, head_params,
  fixed_position_params, body_learned_params and modules ({top-level module: count}); see the
  module docstring for the convention.
  """
  cfg = model_config_of(config)
  return _count_rows(cfg, param_rows(abstract_params(cfg)))


def _count_rows(cfg: ModelConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
  modules: dict[str, int] = {}
  for row in rows:
    top = row['path'].split('/', 1)[0]
    modules[top] = modules.get(top, 0) + row['count']
  learned = sum(modules.values())
  head = sum(n for m, n in modules.items() if m in HEAD_MODULES)
  fixed = fixed_position_params(cfg)
  body_learned = learned - head
  return dict(
      body_params=body_learned + fixed,
      total_params=learned + fixed,
      learned_params=learned,
      head_params=head,
      fixed_position_params=fixed,
      body_learned_params=body_learned,
      modules=modules,
  )


def format_table(config: Any) -> str:
  """A readable per-parameter table grouped by top-level module, with subtotals and totals."""
  cfg = model_config_of(config)
  rows = param_rows(abstract_params(cfg))
  counts = _count_rows(cfg, rows)
  path_w = max(len('parameter'), *(len(r['path']) for r in rows))
  shape_w = max(len('shape'), *(len(str(r['shape'])) for r in rows))
  count_w = max(len(f'{counts["total_params"]:,}'), len('count'))
  line = '-' * (path_w + shape_w + count_w + 30)
  out = [f'{"parameter":<{path_w}}  {"shape":<{shape_w}}  {"count":>{count_w}}  axes', line]
  groups: dict[str, list[dict[str, Any]]] = {}
  for r in rows:
    groups.setdefault(r['path'].split('/', 1)[0], []).append(r)
  order = {name: i for i, name in enumerate(MODULE_ORDER)}
  for top in sorted(groups, key=lambda m: (order.get(m, len(order)), m)):
    group = groups[top]
    for r in group:
      axes = ', '.join(str(a) for a in r['axes']) if r['axes'] else ''
      out.append(f'{r["path"]:<{path_w}}  {str(r["shape"]):<{shape_w}}  '
                 f'{r["count"]:>{count_w},}  {axes}')
    part = 'head' if top in HEAD_MODULES else 'body'
    out.append(f'{"  subtotal " + top + " (" + part + ")":<{path_w + shape_w + 2}}  '
               f'{counts["modules"][top]:>{count_w},}')
    out.append('')
  out.append(line)

  def total(label, value):
    out.append(f'{label:<{path_w + shape_w + 2}}  {value:>{count_w},}')

  total('learned parameters', counts['learned_params'])
  total('  of which head', counts['head_params'])
  if counts['fixed_position_params']:
    total('fixed sinusoidal position tables (not learned)', counts['fixed_position_params'])
  total('body (as the Hugging Face base model counts it)', counts['body_params'])
  if counts['fixed_position_params']:
    total('body without the fixed tables', counts['body_learned_params'])
  total('total (body + head)', counts['total_params'])
  out.append(f'({cfg.family}, d_model={cfg.d_model}, layers={cfg.num_layers}'
             + (f'+{cfg.decoder_layers}' if cfg.family == 'encoder_decoder' else '')
             + f', heads={cfg.num_heads}, vocab={cfg.vocab_size}, head={cfg.head})')
  return '\n'.join(out)


# --- command line --------------------------------------------------------------------------------

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and variant, e.g. configs/bert.py:base.', lock_config=True)
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of the table.')


def main(argv):
  if len(argv) > 1:
    errors.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  jax.config.update('jax_platforms', 'cpu')  # shapes only: no accelerator is needed or probed
  config = _CONFIG.value
  if config is None:
    errors.fail('--config is required, e.g. --config=configs/bert.py:base')
  try:
    cfg = model_config_of(config)
  except ConfigError as e:
    errors.fail(f'invalid model config: {e}')
  if _JSON.value:
    result = count_params(cfg)
    result['config'] = config_flags.get_config_filename(flags.FLAGS['config'])
    result['overrides'] = {k: str(v) for k, v in
                           config_flags.get_override_values(flags.FLAGS['config']).items()}
    print(json.dumps(result, default=lambda o: int(o) if isinstance(o, np.integer) else str(o)))
  else:
    print(format_table(cfg))


if __name__ == '__main__':
  errors.run(main, flags_parser=errors.parse_config_flags)
