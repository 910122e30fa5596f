"""A stack of `Block`s: `nn.scan` (default) or a Python loop, remat by named policy, and
cross-layer parameter sharing (ALBERT).

Parameter layout (the same for every combination, so checkpoints convert by stacking/unstacking):
  scanned:   `layers/...` with a leading axis of size num_groups (logical axis 'layers')
  looped:    `layers_0/...`, ..., `layers_{num_groups-1}/...`
where num_groups = num_layers without sharing, and `share_layers` with sharing (layer i then uses
group i // (num_layers // share_layers), as ALBERT's layer groups do).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lab.models.block import Block
from flaxformer_lab.models.config import AUTO_UNROLL_LAYERS, ModelConfig
from flaxformer_lab.models.layers import Norm

REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole layer in the backward pass
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    'save_attention_out': jax.checkpoint_policies.save_only_these_names('attention_out'),
}


def scan_unroll(setting: int, groups: int) -> int:
  """Layer groups per iteration of the scanned loop for `model.scan_unroll` (0 = auto)."""
  if setting == 0:
    return groups if groups <= AUTO_UNROLL_LAYERS else 1
  return min(setting, groups)


def _block_class(cfg: ModelConfig):
  if cfg.remat_policy == 'none':
    return Block
  return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)


class _Group(nn.Module):
  """`repeats` applications of one layer's parameters (a scan with the params broadcast)."""
  cfg: ModelConfig
  repeats: int
  causal: bool
  has_cross: bool
  deterministic: bool
  decode: bool

  @nn.compact
  def __call__(self, x, aux):
    block_cls = _block_class(self.cfg)
    if self.repeats == 1:
      return block_cls(self.cfg, self.causal, self.has_cross, self.deterministic, self.decode,
                       name='layer')(x, aux)
    scanned = nn.scan(block_cls, variable_broadcast='params',
                      variable_axes={'cache': 0, 'intermediates': 0},
                      split_rngs={'params': False, 'dropout': True},
                      in_axes=(nn.broadcast,), length=self.repeats)
    x, _ = scanned(self.cfg, self.causal, self.has_cross, self.deterministic, self.decode,
                   name='layer')(x, aux)
    return x, None


class Stack(nn.Module):
  """`num_layers` blocks followed, for pre-LN, by the final norm."""
  cfg: ModelConfig
  num_layers: int
  causal: bool
  has_cross: bool = False
  deterministic: bool = True
  decode: bool = False

  @property
  def num_groups(self) -> int:
    return self.cfg.share_layers or self.num_layers

  @nn.compact
  def __call__(self, x_BxTxD, aux: dict[str, Any]):
    cfg = self.cfg
    groups = self.num_groups
    repeats = self.num_layers // groups
    if cfg.share_layers:
      body_cls, body_args = _Group, (cfg, repeats, self.causal, self.has_cross,
                                     self.deterministic, self.decode)
    else:
      body_cls, body_args = _block_class(cfg), (cfg, self.causal, self.has_cross,
                                                self.deterministic, self.decode)
    if cfg.scan_layers:
      scanned = nn.scan(body_cls, variable_axes={'params': 0, 'cache': 0, 'intermediates': 0},
                        split_rngs={'params': True, 'dropout': True}, in_axes=(nn.broadcast,),
                        length=groups, metadata_params={nn.PARTITION_NAME: 'layers'},
                        unroll=scan_unroll(cfg.scan_unroll, groups))
      x_BxTxD, _ = scanned(*body_args, name='layers')(x_BxTxD, aux)
    else:
      if cfg.share_layers and self.decode:
        raise ValueError('decoding with share_layers needs scan_layers=True (one cache per layer)')
      bodies = [body_cls(*body_args, name=f'layers_{g}') for g in range(groups)]
      for g in range(groups):
        x_BxTxD, _ = bodies[g](x_BxTxD, aux)
    if cfg.use_final_norm:
      x_BxTxD = Norm(cfg, name='final_norm')(x_BxTxD)
    return x_BxTxD


def _is_layer_key(key: str) -> bool:
  return key == 'layers' or (key.startswith('layers_') and key[len('layers_'):].isdigit())


def convert_layer_params(tree, scanned: bool):
  """Converts a params tree between the scanned (`layers`) and looped (`layers_i`) layouts.

  Works on any nesting (encoder/decoder stacks); boxed (LogicallyPartitioned) leaves are unboxed.
  """
  tree = nn.meta.unbox(tree)

  def convert(node):
    if not isinstance(node, dict):
      return node
    keys = list(node)
    if scanned and any(k.startswith('layers_') and _is_layer_key(k) for k in keys):
      n = sum(1 for k in keys if _is_layer_key(k) and k != 'layers')
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[node[f'layers_{i}'] for i in range(n)])
      rest = {k: convert(v) for k, v in node.items() if not _is_layer_key(k)}
      return {**rest, 'layers': stacked}
    if not scanned and 'layers' in keys:
      layers = node['layers']
      n = int(np.shape(jax.tree.leaves(layers)[0])[0])
      rest = {k: convert(v) for k, v in node.items() if k != 'layers'}
      return {**rest, **{f'layers_{i}': jax.tree.map(lambda x, i=i: x[i], layers)
                         for i in range(n)}}
    return {k: convert(v) for k, v in node.items()}

  return convert(tree)
