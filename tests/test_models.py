"""Model-library behaviour: masks, packing, stacking equivalences, backends, positions, norms, axes."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lab.presets.common import logical_axis_rules
from flaxformer_lab.models import positions as pos_lib
from flaxformer_lab.models.attention import Attention, einsum_attention, library_attention
from flaxformer_lab.models.config import ConfigError, ModelConfig
from flaxformer_lab.models.layers import Mlp, Norm
from flaxformer_lab.models.stack import convert_layer_params
from flaxformer_lab.models.transformer import build_model, dummy_inputs

jax.config.update('jax_default_matmul_precision', 'highest')

POSITIONS = ('learned', 'sinusoidal', 'relative_bias', 'rope', 'alibi', 'none')


def tiny(**kw) -> ModelConfig:
  base = dict(vocab_size=61, d_model=32, num_heads=4, mlp_dim=48, num_layers=2, max_len=32,
              dropout_rate=0.0, attention_dropout_rate=0.0, classifier_dropout=0.0)
  base.update(kw)
  if base.get('family') == 'encoder' and 'head' not in kw:
    base['head'] = 'mlm'
  if base.get('family') == 'encoder_decoder' and 'head' not in kw:
    base['head'] = 'seq2seq_lm'
  return ModelConfig(**base).replace()


def init(cfg, batch=2, length=10, seed=0):
  model = build_model(cfg)
  variables = model.init(jax.random.PRNGKey(seed), **dummy_inputs(cfg, batch, length))
  return model, nn.meta.unbox(variables['params'])


_JITTED = {}


def japply(model, params, *args, **kw):
  """model.apply under jit (one compile per model and shape instead of op-by-op dispatch)."""
  if model not in _JITTED:
    _JITTED[model] = jax.jit(lambda p, *a, **k: model.apply({'params': p}, *a, **k))
  return _JITTED[model](params, *args, **kw)


def tokens(key, shape, vocab, low=1):
  return jax.random.randint(jax.random.PRNGKey(key), shape, low, vocab)


# --- causality -------------------------------------------------------------------------------------
@pytest.mark.parametrize('position', POSITIONS)
def test_decoder_is_causal(position):
  cfg = tiny(family='decoder', position=position)
  model, params = init(cfg)
  x = tokens(1, (2, 10), cfg.vocab_size)
  y = x.at[:, 6:].set(tokens(2, (2, 4), cfg.vocab_size))
  a = japply(model, params, x)['logits']
  b = japply(model, params, y)['logits']
  np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
  assert np.abs(np.asarray(a[:, 6:] - b[:, 6:])).max() > 1e-3


@pytest.mark.parametrize('position', POSITIONS)
def test_encoder_sees_both_sides(position):
  cfg = tiny(family='encoder', position=position)
  model, params = init(cfg)
  x = tokens(1, (2, 10), cfg.vocab_size)
  y = x.at[:, 6:].set(tokens(2, (2, 4), cfg.vocab_size))
  a = japply(model, params, x)['hidden']
  b = japply(model, params, y)['hidden']
  # every earlier position changes when only later tokens change
  assert (np.abs(np.asarray(a[:, :6] - b[:, :6])).max(axis=-1) > 1e-4).all()


def test_encoder_decoder_decoder_is_causal_and_sees_whole_source():
  cfg = tiny(family='encoder_decoder', position='relative_bias')
  model, params = init(cfg)
  src = tokens(1, (2, 9), cfg.vocab_size)
  tgt = tokens(3, (2, 7), cfg.vocab_size)
  a = japply(model, params, src, decoder_input_ids=tgt)['logits']
  b = japply(model, params, src,
                  decoder_input_ids=tgt.at[:, 4:].set(5))['logits']
  np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)
  c = japply(model, params, src.at[:, -1].set(7), decoder_input_ids=tgt)['logits']
  assert (np.abs(np.asarray(a - c)).max(axis=-1) > 1e-5).all()  # the last source token reaches all


# --- padding and packing ---------------------------------------------------------------------------
# Every position scheme, and every family with at least two schemes.
FAMILY_POSITIONS = [('decoder', 'learned'), ('decoder', 'rope'), ('decoder', 'alibi'),
                    ('encoder', 'sinusoidal'), ('encoder', 'relative_bias'), ('encoder', 'none'),
                    ('encoder_decoder', 'relative_bias'), ('encoder_decoder', 'learned'),
                    ('decoder', 'relative_bias')]


@pytest.mark.parametrize('family, position', FAMILY_POSITIONS)
def test_padding_changes_no_real_token(family, position):
  cfg = tiny(family=family, position=position)
  model, params = init(cfg)
  n_real = 6
  x = tokens(1, (2, 10), cfg.vocab_size)
  seg = jnp.concatenate([jnp.ones((2, n_real), jnp.int32), jnp.zeros((2, 4), jnp.int32)], 1)
  x2 = x.at[:, n_real:].set(tokens(9, (2, 4), cfg.vocab_size))  # different pad contents
  kw = {}
  if family == 'encoder_decoder':
    kw = dict(decoder_input_ids=x, decoder_segment_ids=seg)
  a = japply(model, params, x, segment_ids=seg, **kw)['hidden']
  kw2 = dict(kw)
  if family == 'encoder_decoder':
    kw2['decoder_input_ids'] = x2
  b = japply(model, params, x2, segment_ids=seg, **kw2)['hidden']
  np.testing.assert_allclose(a[:, :n_real], b[:, :n_real], atol=1e-5)
  # and equals the unpadded sequence run alone
  kw3 = {}
  if family == 'encoder_decoder':
    kw3 = dict(decoder_input_ids=x[:, :n_real])
  c = japply(model, params, x[:, :n_real], **kw3)['hidden']
  np.testing.assert_allclose(a[:, :n_real], c, atol=1e-5)


@pytest.mark.parametrize('family, position', FAMILY_POSITIONS)
def test_packed_equals_one_by_one(family, position):
  cfg = tiny(family=family, position=position)
  model, params = init(cfg)
  lens = (4, 3, 2)
  seqs = [tokens(10 + i, (1, n), cfg.vocab_size) for i, n in enumerate(lens)]
  total = 11
  packed = jnp.concatenate(seqs + [jnp.zeros((1, total - sum(lens)), jnp.int32)], 1)
  seg = jnp.asarray([[1] * 4 + [2] * 3 + [3] * 2 + [0] * 2])
  kw = {}
  if family == 'encoder_decoder':
    kw = dict(decoder_input_ids=packed, decoder_segment_ids=seg)
  out = japply(model, params, packed, segment_ids=seg, **kw)['hidden']
  start = 0
  for s in seqs:
    n = s.shape[1]
    kw1 = dict(decoder_input_ids=s) if family == 'encoder_decoder' else {}
    alone = japply(model, params, s, **kw1)['hidden']
    np.testing.assert_allclose(out[:, start:start + n], alone, atol=1e-5)
    start += n


def test_positions_restart_per_segment():
  seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
  np.testing.assert_array_equal(pos_lib.positions_from_segments(seg),
                                [[0, 1, 2, 0, 1, 0, 0, 1]])


# --- stacking: scan, loop, remat, sharing ----------------------------------------------------------
def _loss_and_grads(model, params, x, kw):
  def loss(p):
    out = model.apply({'params': p}, x, **kw)['logits']
    return jnp.mean(jnp.square(out))
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize('family, remat, share', [
    ('decoder', 'none', 0), ('decoder', 'full', 0), ('decoder', 'dots', 0),
    ('encoder_decoder', 'dots_no_batch', 0), ('encoder', 'full', 1), ('encoder', 'none', 1)])
def test_scan_loop_remat_agree(family, remat, share):
  ref_cfg = tiny(family=family, num_layers=2, share_layers=share, position='relative_bias')
  _, ref_params = init(ref_cfg)
  x = tokens(1, (2, 10), ref_cfg.vocab_size)
  kw = dict(decoder_input_ids=x) if family == 'encoder_decoder' else {}
  ref_loss, ref_grads = _loss_and_grads(build_model(ref_cfg), ref_params, x, kw)
  for scan in (True, False):
    cfg = ref_cfg.replace(scan_layers=scan, remat_policy=remat)
    params = ref_params if scan else convert_layer_params(ref_params, scanned=False)
    loss, grads = _loss_and_grads(build_model(cfg), params, x, kw)
    if not scan:
      grads = convert_layer_params(grads, scanned=True)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads,
                 ref_grads)


def test_scanned_params_have_layer_axis_and_loop_layout_converts_back():
  cfg = tiny(family='decoder', num_layers=3)
  _, params = init(cfg)
  k = params['decoder']['layers']['mlp']['wi']['kernel']
  assert k.shape == (3, cfg.d_model, cfg.hidden_dim)
  loop = convert_layer_params(params, scanned=False)
  assert set(k for k in loop['decoder'] if k.startswith('layers')) == {
      'layers_0', 'layers_1', 'layers_2'}
  back = convert_layer_params(loop, scanned=True)
  jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize('scan', (True, False))
def test_albert_sharing_is_one_layer_applied_n_times(scan):
  n = 4
  cfg = tiny(family='encoder', num_layers=n, share_layers=1, scan_layers=scan)
  model, params = init(cfg)
  one_layer = tiny(family='encoder', num_layers=1)
  _, single = init(one_layer)
  n_shared = sum(x.size for x in jax.tree.leaves(params['encoder']))
  n_single = sum(x.size for x in jax.tree.leaves(single['encoder']))
  assert n_shared == n_single  # one layer's parameters (plus nothing per extra layer)
  # reference: an unshared loop stack whose n layers all carry the shared parameters
  layer = params['encoder']['layers'] if scan else params['encoder']['layers_0']
  layer = jax.tree.map(lambda a: a[0], layer['layer']) if scan else layer['layer']
  unshared = tiny(family='encoder', num_layers=n, scan_layers=False)
  ref_params = dict(params)
  rest = {k: v for k, v in params['encoder'].items() if not k.startswith('layers')}
  ref_params['encoder'] = {**rest, **{f'layers_{i}': layer for i in range(n)}}
  x = tokens(4, (2, 9), cfg.vocab_size)
  a = japply(model, params, x)['hidden']
  b = japply(build_model(unshared), ref_params, x)['hidden']
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_albert_layer_groups():
  cfg = tiny(family='encoder', num_layers=4, share_layers=2)
  model, params = init(cfg)
  layers = params['encoder']['layers']['layer']
  assert jax.tree.leaves(layers)[0].shape[0] == 2
  ref = tiny(family='encoder', num_layers=4, scan_layers=False)
  group = lambda g: jax.tree.map(lambda a: a[g], layers)
  ref_params = dict(params)
  rest = {k: v for k, v in params['encoder'].items() if not k.startswith('layers')}
  ref_params['encoder'] = {**rest, **{f'layers_{i}': group(i // 2) for i in range(4)}}  # i // (N/G)
  x = tokens(4, (2, 9), cfg.vocab_size)
  np.testing.assert_allclose(japply(model, params, x)['hidden'],
                             japply(build_model(ref), ref_params, x)['hidden'],
                             atol=1e-6)


# --- attention -------------------------------------------------------------------------------------
def test_gqa_equals_mha_with_repeated_kv_heads():
  key = jax.random.PRNGKey(0)
  q = jax.random.normal(key, (2, 5, 8, 16))
  k = jax.random.normal(jax.random.fold_in(key, 1), (2, 7, 2, 16))
  v = jax.random.normal(jax.random.fold_in(key, 2), (2, 7, 2, 16))
  mask = jax.random.bernoulli(jax.random.fold_in(key, 3), 0.7, (2, 1, 5, 7)).at[..., 0].set(True)
  grouped = einsum_attention(q, k, v, mask_Bx1xTxS=mask, scale=0.25)
  full = einsum_attention(q, jnp.repeat(k, 4, axis=2), jnp.repeat(v, 4, axis=2),
                          mask_Bx1xTxS=mask, scale=0.25)
  np.testing.assert_allclose(grouped, full, atol=1e-5)
  # brute force softmax(q k^T) v per head
  kr, vr = np.repeat(k, 4, axis=2), np.repeat(v, 4, axis=2)
  s = np.einsum('bthk,bshk->bhts', q, kr) * 0.25
  s = np.where(np.asarray(mask), s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  np.testing.assert_allclose(grouped, np.einsum('bhts,bshk->bthk', w, vr), atol=1e-5)


@pytest.mark.parametrize('family, position', [
    ('decoder', 'alibi'), ('decoder', 'rope'), ('encoder', 'relative_bias'),
    ('encoder_decoder', 'learned')])
def test_attention_backends_agree(family, position):
  cfg = tiny(family=family, position=position, num_heads=4, num_kv_heads=2)
  _, params = init(cfg)
  x = tokens(1, (2, 10), cfg.vocab_size)
  seg = jnp.asarray([[1] * 10, [1] * 6 + [2] * 2 + [0] * 2])
  kw = dict(decoder_input_ids=x, decoder_segment_ids=seg) if family == 'encoder_decoder' else {}
  outs = [build_model(cfg.replace(attention_backend=b)).apply({'params': params}, x,
                                                               segment_ids=seg, **kw)['logits']
          for b in ('einsum', 'xla')]
  np.testing.assert_allclose(outs[0], outs[1], atol=2e-5)


def test_library_backend_matches_reference_directly():
  key = jax.random.PRNGKey(3)
  q = jax.random.normal(key, (2, 6, 4, 8))
  k = jax.random.normal(jax.random.fold_in(key, 1), (2, 6, 2, 8))
  v = jax.random.normal(jax.random.fold_in(key, 2), (2, 6, 2, 8))
  bias = jax.random.normal(jax.random.fold_in(key, 3), (1, 4, 6, 6))
  mask = jnp.tril(jnp.ones((6, 6), bool))[None, None].repeat(2, 0)
  np.testing.assert_allclose(
      einsum_attention(q, k, v, mask_Bx1xTxS=mask, bias_BxHxTxS=bias, scale=0.3),
      library_attention(q, k, v, mask_Bx1xTxS=mask, bias_BxHxTxS=bias, scale=0.3,
                        implementation='xla'), atol=1e-5)


def test_attention_dropout_is_applied_in_training_only():
  cfg = tiny(family='decoder', attention_dropout_rate=0.5)
  attn = Attention(cfg, deterministic=False)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, cfg.d_model))
  pos = jnp.arange(6)[None]
  v = attn.init({'params': jax.random.PRNGKey(1), 'dropout': jax.random.PRNGKey(2)}, x,
                positions_BxT=pos)
  a = attn.apply(v, x, positions_BxT=pos, rngs={'dropout': jax.random.PRNGKey(3)})
  b = attn.apply(v, x, positions_BxT=pos, rngs={'dropout': jax.random.PRNGKey(4)})
  c = Attention(cfg, deterministic=True).apply(v, x, positions_BxT=pos)
  d = Attention(cfg, deterministic=True).apply(v, x, positions_BxT=pos)
  assert np.abs(np.asarray(a - b)).max() > 1e-4
  np.testing.assert_array_equal(c, d)


def test_feed_forward_hidden_dropout_is_activation_dropout_rate_only():
  """The feed-forward hidden units are dropped at `activation_dropout_rate` (T5, BART), not at
  `dropout_rate` (GPT-2, BERT and the paper drop only the residual branches): with dropout_rate
  0.5 and no activation dropout the MLP is deterministic; with activation dropout 0.5 it equals
  wo(mask * act(wi x) / 0.5) for the mask that keep_mask draws from the same key."""
  from flaxformer_lab.models.dropout import keep_mask  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 32))
  cfg = tiny(family='decoder', dropout_rate=0.5)
  v = nn.meta.unbox(Mlp(cfg).init(jax.random.PRNGKey(1), x))
  rngs = {'dropout': jax.random.key(3)}
  np.testing.assert_array_equal(Mlp(cfg, deterministic=False).apply(v, x, rngs=rngs),
                                Mlp(cfg).apply(v, x))
  cfg = tiny(family='decoder', dropout_rate=0.0, activation_dropout_rate=0.5)
  got = Mlp(cfg, deterministic=False).apply(v, x, rngs=rngs)
  p = v['params']
  h = jax.nn.gelu(x @ p['wi']['kernel'] + p['wi']['bias'], approximate=False)
  assert np.abs(np.asarray(got - Mlp(cfg).apply(v, x))).max() > 1e-3
  keys = _dropout_keys_seen(cfg, v, x, rngs)
  assert len(keys) == 1  # the hidden units' dropout, and no other
  mask = keep_mask(keys[0], 0.5, h.shape, cfg.dropout_bits)
  want = jnp.where(mask, h / 0.5, 0.0) @ p['wo']['kernel'] + p['wo']['bias']
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _dropout_keys_seen(cfg, v, x, rngs):
  """The keys the Mlp's dropout layers draw (intercepted from keep_mask)."""
  from flaxformer_lab.models import dropout as dropout_lib  # pylint: disable=g-import-not-at-top
  seen, original = [], dropout_lib.keep_mask

  def spy(rng, rate, shape, bits=32):
    seen.append(rng)
    return original(rng, rate, shape, bits)

  dropout_lib.keep_mask = spy
  try:
    Mlp(cfg, deterministic=False).apply(v, x, rngs=rngs)
  finally:
    dropout_lib.keep_mask = original
  return seen


# --- positions -------------------------------------------------------------------------------------
def test_sinusoidal_table_is_the_papers_formula():
  length, d = 50, 16
  table = pos_lib.sinusoidal_table(length, d)
  for p in range(length):
    for i in range(d // 2):
      angle = p / (10000 ** (2 * i / d))
      assert table[p, 2 * i] == pytest.approx(math.sin(angle), abs=1e-6)
      assert table[p, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-6)
  concat = pos_lib.sinusoidal_table(length, d, 'concat')
  np.testing.assert_allclose(concat[:, :d // 2], table[:, 0::2], atol=1e-7)
  np.testing.assert_allclose(concat[:, d // 2:], table[:, 1::2], atol=1e-7)


def test_rope_scores_depend_only_on_relative_offset():
  key = jax.random.PRNGKey(0)
  q = jax.random.normal(key, (1, 1, 1, 16))
  k = jax.random.normal(jax.random.fold_in(key, 1), (1, 1, 1, 16))

  def score(m, n):
    qm = pos_lib.apply_rope(q, jnp.asarray([[m]]))
    kn = pos_lib.apply_rope(k, jnp.asarray([[n]]))
    return float(jnp.sum(qm * kn))

  for m, n in [(0, 3), (5, 2), (7, 7)]:
    for shift in (1, 11, 100):
      assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-4, abs=1e-4)
  assert abs(score(0, 3) - score(0, 4)) > 1e-3  # and it does depend on the offset
  np.testing.assert_allclose(pos_lib.apply_rope(q, jnp.asarray([[0]])), q, atol=1e-7)


def test_alibi_slopes_are_the_published_sequence():
  for n in (1, 2, 4, 8, 16):
    expected = [2 ** (-8 * (i + 1) / n) for i in range(n)]
    np.testing.assert_allclose(pos_lib.alibi_slopes(n), expected, rtol=1e-6)
  # 12 heads: slopes of 8 heads, then every other slope of 16 heads (Press et al.'s recipe)
  eight = [2 ** (-8 * (i + 1) / 8) for i in range(8)]
  sixteen = [2 ** (-8 * (i + 1) / 16) for i in range(16)]
  np.testing.assert_allclose(pos_lib.alibi_slopes(12), eight + sixteen[0::2][:4], rtol=1e-6)
  bias = pos_lib.alibi_bias(4, jnp.arange(5)[None], jnp.arange(5)[None], causal=True)
  np.testing.assert_allclose(bias[0, 1, 4, 1], -pos_lib.alibi_slopes(4)[1] * 3, rtol=1e-6)


def _published_t5_bucket(rel, bidirectional, num_buckets, max_distance):
  """Mesh TensorFlow's `_relative_position_bucket`, in plain Python."""
  ret = 0
  n = -rel
  if bidirectional:
    num_buckets //= 2
    if n < 0:
      ret += num_buckets
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) *
                        (num_buckets - max_exact))
  return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize('bidirectional', (True, False))
def test_t5_buckets_match_published_bucketing(bidirectional):
  offsets = np.array([-1000, -200, -128, -127, -64, -20, -16, -15, -8, -7, -1, 0, 1, 2, 7, 8, 9, 15,
                      16, 17, 31, 64, 100, 127, 128, 500])
  got = pos_lib.t5_relative_bucket(jnp.asarray(offsets), bidirectional, 32, 128)
  want = [_published_t5_bucket(int(o), bidirectional, 32, 128) for o in offsets]
  np.testing.assert_array_equal(got, want)
  # spot values from the T5 paper's scheme: offsets 0..7 exact (per direction when bidirectional)
  if bidirectional:
    assert int(pos_lib.t5_relative_bucket(jnp.asarray(3), True, 32, 128)) == 16 + 3
    assert int(pos_lib.t5_relative_bucket(jnp.asarray(-3), True, 32, 128)) == 3


# --- norm placement, checked on the computation ----------------------------------------------------
def _trace(cfg):
  model, params = init(cfg, length=6)
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and isinstance(context.module, (Norm, Attention, Mlp)):
      calls.append((type(context.module).__name__, args[0], out))
    return out

  x = tokens(1, (2, 6), cfg.vocab_size)
  with nn.intercept_methods(record):
    out = model.apply({"params": params}, x)
  return calls, out


def _normalized(x):
  x = np.asarray(x)
  return (np.abs(x.mean(-1)) < 1e-4).all() and (np.abs(x.std(-1) - 1) < 1e-2).all()


def test_pre_ln_normalizes_each_branch_input_and_adds_a_final_norm():
  cfg = tiny(family='decoder', norm_position='pre', num_layers=2, scan_layers=False,
             norm_eps=1e-12)
  calls, out = _trace(cfg)
  kinds = [c[0] for c in calls]
  assert kinds == ['Norm', 'Attention', 'Norm', 'Mlp'] * 2 + ['Norm']
  for i in range(0, 8, 2):
    _, _, norm_out = calls[i]
    _, branch_in, _ = calls[i + 1]
    np.testing.assert_array_equal(norm_out, branch_in)  # the branch reads the normed stream
    assert _normalized(branch_in)
  # the residual stream itself is never normalized between layers: the next norm's input is
  # (previous norm's input) + (branch output)
  np.testing.assert_allclose(calls[2][1], calls[0][1] + calls[1][2], atol=1e-5)
  np.testing.assert_allclose(calls[4][1], calls[2][1] + calls[3][2], atol=1e-5)
  assert not _normalized(calls[4][1])
  np.testing.assert_array_equal(calls[-1][2], out['hidden'])  # final norm produces the output


def test_post_ln_normalizes_after_each_residual_add():
  cfg = tiny(family='decoder', norm_position='post', num_layers=2, scan_layers=False,
             norm_eps=1e-12)
  calls, out = _trace(cfg)
  kinds = [c[0] for c in calls]
  assert kinds == ['Attention', 'Norm', 'Mlp', 'Norm'] * 2  # no final norm
  # Norm input = branch input + branch output; the next branch reads the norm's output
  for i in range(0, 8, 2):
    _, branch_in, branch_out = calls[i]
    _, norm_in, norm_out = calls[i + 1]
    np.testing.assert_allclose(norm_in, branch_in + branch_out, atol=1e-5)
    assert _normalized(norm_out)
    if i + 2 < 8:
      np.testing.assert_array_equal(calls[i + 2][1], norm_out)
  assert not _normalized(calls[0][1])  # the first branch reads raw embeddings
  np.testing.assert_array_equal(calls[-1][2], out['hidden'])


def test_rmsnorm_has_no_mean_subtraction_and_no_bias():
  cfg = tiny(norm_type='rmsnorm', norm_eps=1e-6)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8)) + 2.0
  v = Norm(cfg).init(jax.random.PRNGKey(1), x)
  assert set(v['params']) == {'scale'}
  y = Norm(cfg).apply(v, x)
  ref = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(y, ref, rtol=1e-5)


# --- sharding metadata and config ------------------------------------------------------------------
@pytest.mark.parametrize('cfg', [
    dict(family='decoder', fused_qkv=True), dict(family='encoder', head='mlm_nsp', pooler=True,
                                                 type_vocab_size=2, emb_dim=16, share_layers=1),
    dict(family='encoder_decoder', position='relative_bias', activation='swiglu',
         tie_embeddings=False, logits_bias=True, num_kv_heads=2),
    dict(family='encoder', head='classification', classifier_hidden=True, num_languages=3),
    dict(family='decoder', head='token_classification', position='relative_bias',
         relative_bias_shared=False, scan_layers=False)])
def test_every_parameter_has_logical_axis_names(cfg):
  cfg = tiny(**cfg)
  model = build_model(cfg)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), **dummy_inputs(cfg, 2, 8))['params']
  known = {name for name, _ in logical_axis_rules()}
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == len(leaf.value.shape), (leaf.names, leaf.value.shape)
    assert set(leaf.names) <= known, leaf.names


def test_computation_dtype_bfloat16_keeps_float32_params():
  cfg = tiny(family='decoder', dtype='bfloat16')
  model, params = init(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  out = japply(model, params, tokens(1, (2, 8), cfg.vocab_size))
  assert out['hidden'].dtype == jnp.bfloat16
  assert out['logits'].dtype == jnp.float32
  ref = build_model(cfg.replace(dtype='float32')).apply(
      {'params': params}, tokens(1, (2, 8), cfg.vocab_size))['logits']
  assert np.abs(np.asarray(out['logits'] - ref)).max() < 0.1


@pytest.mark.parametrize('bad, message', [
    (dict(d_model=30, num_heads=4), 'not divisible'),
    (dict(num_heads=4, num_kv_heads=3), 'multiple'),
    (dict(family='decoderr'), 'family'),
    (dict(norm_position='middle'), 'norm_position'),
    (dict(position='absolute'), 'position'),
    (dict(family='encoder', head='lm'), 'does not fit'),
    (dict(num_layers=3, share_layers=2), 'do not divide'),
    (dict(family='decoder', decoder_num_heads=2), 'decoder_num_heads sets the decoder'),
    (dict(family='encoder_decoder', head='seq2seq_lm', d_model=32, decoder_num_heads=3),
     'decoder_num_heads=3'),
    (dict(family='encoder_decoder', head='seq2seq_lm', decoder_mlp_dim=-1), 'decoder_mlp_dim'),
    # T5 bucketing divides by log(max_distance / exact buckets): equal gives NaN biases.
    (dict(position='relative_bias', relative_num_buckets=32, relative_max_distance=16),
     'relative_max_distance=16'),
])
def test_impossible_configs_are_rejected(bad, message):
  with pytest.raises(ConfigError, match=message):
    tiny(**bad)


def test_unknown_model_key_names_the_closest():
  with pytest.raises(ConfigError, match="did you mean norm_position"):
    ModelConfig.from_dict({'norm_positon': 'pre'})


def test_decoder_stack_has_its_own_heads_and_width():
  """An encoder_decoder's decoder may differ in heads and feed-forward width (BART, Marian); the
  encoder keeps the base shapes, and cross-attention runs with the decoder's heads."""
  cfg = tiny(family='encoder_decoder', head='seq2seq_lm', d_model=32, num_heads=4, mlp_dim=48,
             decoder_num_heads=2, decoder_mlp_dim=40)
  _, params = init(cfg)
  enc, dec = params['encoder']['layers'], params['decoder']['layers']
  assert enc['self_attention']['query_kernel'].shape[-2:] == (4, 8)
  assert enc['mlp']['wi']['kernel'].shape[-1] == 48
  assert dec['self_attention']['query_kernel'].shape[-2:] == (2, 16)
  assert dec['cross_attention']['query_kernel'].shape[-2:] == (2, 16)
  assert dec['mlp']['wi']['kernel'].shape[-1] == 40
  assert cfg.decoder_stack.num_heads == 2 and cfg.decoder_stack.hidden_dim == 40
  assert tiny(family='encoder_decoder', head='seq2seq_lm').decoder_stack.num_heads == 4
