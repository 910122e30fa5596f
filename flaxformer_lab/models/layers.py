"""Basic layers: dense projections with logical axis names, norms, activations and the MLP.

Every parameter is declared with `nn.with_logical_partitioning`, so a training system maps it onto a
device mesh from the config's logical axis rules alone. Multi-dimensional projections declare their
full-shape kernel with `self.param` and use `jnp.einsum` (DenseGeneral + partitioning fails under
`jax.set_mesh`, flax issue 3676).

Shape letters: B batch, L length, D d_model, H heads, K head width, F mlp width, V vocab.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lab.models.config import ModelConfig
from flaxformer_lab.models.dropout import Dropout

Initializer = Callable[..., jax.Array]
default_kernel_init = nn.initializers.normal(stddev=0.02)


def normal_init(cfg: ModelConfig, fan_in: int = 0) -> Initializer:
  """The normal initializer of a parameter under `cfg.init_scheme`: N(0, 0.02) ('normal'), or
  N(0, fan_in^-0.5) ('t5'; fan_in 0 = a token table or untied output, std 1)."""
  if cfg.init_scheme == 't5':
    return nn.initializers.normal(stddev=fan_in ** -0.5 if fan_in else 1.0)
  return default_kernel_init


def dtype_of(cfg: ModelConfig):
  return jnp.dtype(cfg.dtype)


def param_with_axes(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
                    axes: Sequence[str | None]) -> jax.Array:
  """Declares a float32 parameter whose dimensions carry logical axis names."""
  assert len(shape) == len(axes), (name, shape, axes)
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape),
                      jnp.float32)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Logical sharding constraint on an activation (a no-op outside a mesh)."""
  return nn.with_logical_constraint(x, tuple(axes))


class Dense(nn.Module):
  """y = x @ W (+ b) over the last axis, with logical axis names on W and b."""
  features: int
  axes: tuple[str | None, str | None]  # logical names of (in, out)
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x):
    kernel = param_with_axes(self, 'kernel', self.kernel_init, (x.shape[-1], self.features),
                             self.axes)
    y = jnp.einsum('...d,df->...f', x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = param_with_axes(self, 'bias', nn.initializers.zeros, (self.features,),
                             (self.axes[1],))
      y = y + bias.astype(self.dtype)
    return y


class Norm(nn.Module):
  """LayerNorm (with or without bias) or RMSNorm, computed in float32."""
  cfg: ModelConfig
  features_axis: str = 'norm'

  @nn.compact
  def __call__(self, x):
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    d = x.shape[-1]
    if self.cfg.norm_type == 'layernorm':
      mean = jnp.mean(x32, axis=-1, keepdims=True)
      var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
      y = (x32 - mean) * jax.lax.rsqrt(var + self.cfg.norm_eps)
    else:  # rmsnorm: no mean subtraction, no bias
      ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
      y = x32 * jax.lax.rsqrt(ms + self.cfg.norm_eps)
    if self.cfg.norm_use_scale:
      y = y * param_with_axes(self, 'scale', nn.initializers.ones, (d,), (self.features_axis,))
    if self.cfg.norm_type == 'layernorm' and self.cfg.norm_use_bias:
      y = y + param_with_axes(self, 'bias', nn.initializers.zeros, (d,), (self.features_axis,))
    return y.astype(dtype)


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  """The pointwise activation; gated variants use the base activation of their gate."""
  return {
      'gelu': lambda x: jax.nn.gelu(x, approximate=False),
      'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
      'relu': jax.nn.relu,
      'silu': jax.nn.silu,
      'geglu': lambda x: jax.nn.gelu(x, approximate=False),
      'geglu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
      'swiglu': jax.nn.silu,
      'reglu': jax.nn.relu,
  }[name]


class Mlp(nn.Module):
  """Position-wise feed-forward: D -> F -> D, optionally gated (GLU variants)."""
  cfg: ModelConfig
  deterministic: bool = True
  kernel_init: Initializer | None = None  # of wi, wi_gate and wo (None: `normal_init` by fan-in)

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    dtype = dtype_of(cfg)
    act = activation_fn(cfg.activation)
    init = self.kernel_init or normal_init(cfg, x_BxLxD.shape[-1])
    h_BxLxF = Dense(cfg.hidden_dim, ('embed', 'mlp'), cfg.mlp_bias, dtype, init,
                    name='wi')(x_BxLxD)
    h_BxLxF = act(h_BxLxF)
    if cfg.gated:
      h_BxLxF = h_BxLxF * Dense(cfg.hidden_dim, ('embed', 'mlp'), cfg.mlp_bias, dtype, init,
                                name='wi_gate')(x_BxLxD)
    h_BxLxF = constrain(h_BxLxF, ('activation_batch', 'activation_length', 'activation_mlp'))
    h_BxLxF = Dropout(cfg.activation_dropout_rate, cfg.dropout_bits)(
        h_BxLxF, deterministic=self.deterministic)
    return Dense(x_BxLxD.shape[-1], ('mlp', 'embed'), cfg.mlp_bias, dtype,
                 self.kernel_init or normal_init(cfg, cfg.hidden_dim), name='wo')(h_BxLxF)
