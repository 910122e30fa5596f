"""DeepNorm (Wang et al. 2022): the residual scaled by alpha before each post-norm, the value /
attention-output / feed-forward kernels initialized scaled by beta, the paper's constants per stack."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from flaxformer_lab.models.attention import Attention
from flaxformer_lab.models.block import deepnorm_constants
from flaxformer_lab.models.config import ConfigError, ModelConfig
from flaxformer_lab.models.layers import Mlp, Norm
from flaxformer_lab.models.transformer import build_model, dummy_inputs

jax.config.update('jax_default_matmul_precision', 'highest')


def tiny(**kw) -> ModelConfig:
  base = dict(vocab_size=61, d_model=32, num_heads=4, mlp_dim=48, num_layers=2, max_len=32,
              dropout_rate=0.0, attention_dropout_rate=0.0, classifier_dropout=0.0,
              norm_position='deepnorm')
  base.update(kw)
  if base.get('family') == 'encoder_decoder':
    base.setdefault('head', 'seq2seq_lm')
  return ModelConfig(**base).replace()


def init_params(cfg, seed=0):
  model = build_model(cfg)
  variables = model.init(jax.random.PRNGKey(seed), **dummy_inputs(cfg, 2, 6))
  return model, nn.meta.unbox(variables['params'])


def test_constants_are_the_papers():
  dec = tiny(family='decoder', num_layers=18)
  assert deepnorm_constants(dec, has_cross=False) == pytest.approx((36 ** 0.25, 144 ** -0.25))
  encdec = tiny(family='encoder_decoder', num_layers=6, num_decoder_layers=12)
  n, m = 6, 12
  assert deepnorm_constants(encdec, has_cross=False) == pytest.approx(
      (0.81 * (n ** 4 * m) ** (1 / 16), 0.87 * (n ** 4 * m) ** (-1 / 16)))
  assert deepnorm_constants(encdec, has_cross=True) == pytest.approx(
      ((3 * m) ** 0.25, (12 * m) ** -0.25))
  # the paper's worked value: a 1000-layer decoder-only model has beta = 8000^(-1/4) ~ 0.106
  assert deepnorm_constants(tiny(num_layers=1000), False)[1] == pytest.approx(0.10574, abs=1e-4)


def test_unknown_norm_position_still_rejected():
  with pytest.raises(ConfigError, match='norm_position'):
    tiny(norm_position='deep')


def _trace(cfg):
  model, params = init_params(cfg)
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and isinstance(context.module, (Norm, Attention, Mlp)):
      kind = 'Attention' if isinstance(context.module, Attention) else type(context.module).__name__
      calls.append((kind, args[0], out))
    return out

  x = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 1, cfg.vocab_size)
  with nn.intercept_methods(record):
    out = model.apply({'params': params}, x)
  return calls, out


def test_norm_input_is_alpha_times_residual_plus_branch():
  cfg = tiny(family='decoder', num_layers=3, scan_layers=False, norm_eps=1e-12)
  alpha, _ = deepnorm_constants(cfg, False)
  assert alpha == pytest.approx(6 ** 0.25)
  calls, out = _trace(cfg)
  assert [c[0] for c in calls] == ['Attention', 'Norm', 'Mlp', 'Norm'] * 3  # post: no final norm
  for i in range(0, len(calls), 2):
    _, branch_in, branch_out = calls[i]
    _, norm_in, norm_out = calls[i + 1]
    np.testing.assert_allclose(norm_in, alpha * np.asarray(branch_in) + branch_out, atol=1e-5)
    # and not the plain post-LN sum (alpha > 1 makes the two differ)
    assert not np.allclose(norm_in, np.asarray(branch_in) + branch_out, atol=1e-3)
  np.testing.assert_array_equal(calls[-1][2], out['hidden'])


def _std(tree, *path):
  for p in path:
    tree = tree[p]
  return float(np.std(np.asarray(tree)))


@pytest.mark.parametrize('fused', [False, True])
def test_value_output_and_mlp_kernels_start_scaled_by_beta(fused):
  kw = dict(family='decoder', num_layers=4, d_model=128, num_heads=4, mlp_dim=256,
            scan_layers=False, fused_qkv=fused)
  _, deep = init_params(tiny(**kw))
  _, post = init_params(tiny(**kw, norm_position='post'))
  beta = (8 * 4) ** -0.25
  layer = lambda p: p['decoder']['layers_1']  # pylint: disable=unnecessary-lambda-assignment
  d, p = layer(deep), layer(post)
  for path in [('mlp', 'wi', 'kernel'), ('mlp', 'wo', 'kernel'), ('self_attention', 'out_kernel')]:
    np.testing.assert_allclose(_std(d, *path), beta * _std(p, *path), rtol=1e-5)
  if fused:
    qkv_d, qkv_p = d['self_attention']['qkv_kernel'], p['self_attention']['qkv_kernel']
    np.testing.assert_allclose(qkv_d[:, 2], beta * qkv_p[:, 2], rtol=1e-5)  # value slice
    np.testing.assert_array_equal(qkv_d[:, :2], qkv_p[:, :2])  # query and key untouched
  else:
    np.testing.assert_allclose(_std(d, 'self_attention', 'value_kernel'),
                               beta * _std(p, 'self_attention', 'value_kernel'), rtol=1e-5)
    for name in ('query_kernel', 'key_kernel'):
      np.testing.assert_array_equal(d['self_attention'][name], p['self_attention'][name])
  # same parameter tree as post-LN (checkpoints and HF mappings see no difference)
  assert jax.tree.structure(deep) == jax.tree.structure(post)


def test_encoder_decoder_stacks_use_their_own_constants():
  cfg = tiny(family='encoder_decoder', num_layers=2, num_decoder_layers=3, scan_layers=False)
  _, deep = init_params(cfg)
  _, post = init_params(cfg.replace(norm_position='post'))
  (_, beta_enc), (_, beta_dec) = deepnorm_constants(cfg, False), deepnorm_constants(cfg, True)
  assert beta_enc != pytest.approx(beta_dec)
  for stack, beta in (('encoder', beta_enc), ('decoder', beta_dec)):
    d, p = deep[stack]['layers_0'], post[stack]['layers_0']
    np.testing.assert_allclose(d['mlp']['wo']['kernel'], beta * p['mlp']['wo']['kernel'],
                               rtol=1e-5)
  d, p = deep['decoder']['layers_0']['cross_attention'], post['decoder']['layers_0']['cross_attention']
  np.testing.assert_allclose(d['value_kernel'], beta_dec * p['value_kernel'], rtol=1e-5)
  np.testing.assert_array_equal(d['query_kernel'], p['query_kernel'])


def test_scanned_and_looped_deepnorm_agree():
  from flaxformer_lab.models.stack import convert_layer_params  # pylint: disable=g-import-not-at-top
  cfg = tiny(family='decoder', num_layers=3, scan_layers=True)
  model_s, params_s = init_params(cfg)
  model_l = build_model(cfg.replace(scan_layers=False))
  x = jax.random.randint(jax.random.PRNGKey(2), (2, 6), 1, cfg.vocab_size)
  out_s = model_s.apply({'params': params_s}, x)
  out_l = model_l.apply({'params': convert_layer_params(params_s, scanned=False)}, x)
  np.testing.assert_allclose(out_s['logits'], out_l['logits'], atol=1e-5)
  # the scanned init scales every layer's kernels as the looped one does
  _, params_l = init_params(cfg.replace(scan_layers=False))
  beta = (8 * 3) ** -0.25
  for i in range(3):
    np.testing.assert_allclose(
        np.std(params_s['decoder']['layers']['mlp']['wo']['kernel'][i]),
        np.std(params_l['decoder'][f'layers_{i}']['mlp']['wo']['kernel']), rtol=0.2)
    assert np.std(params_s['decoder']['layers']['mlp']['wo']['kernel'][i]) < 0.02 * beta * 1.2
