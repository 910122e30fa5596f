"""The speed changes of issue 12 leave outputs and gradients unchanged (float32 tolerance):
one additive mask bias per stack, scan unrolling, MLM scoring on masked positions only, and the
fast cross entropy through a whole model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lab import losses
from flaxformer_lab.models import transformer as transformer_lib
from flaxformer_lab.models import attention as attention_lib
from flaxformer_lab.models.attention import AttentionMask, einsum_attention
from flaxformer_lab.models.config import ConfigError, ModelConfig
from flaxformer_lab.models.heads import gather_positions
from flaxformer_lab.models.transformer import build_model, dummy_inputs

jax.config.update('jax_default_matmul_precision', 'highest')


def tiny(**kw) -> ModelConfig:
  base = dict(vocab_size=61, d_model=32, num_heads=4, mlp_dim=48, num_layers=3, max_len=32,
              dropout_rate=0.0, attention_dropout_rate=0.0, classifier_dropout=0.0)
  base.update(kw)
  if base.get('family') == 'encoder' and 'head' not in kw:
    base['head'] = 'mlm'
  if base.get('family') == 'encoder_decoder' and 'head' not in kw:
    base['head'] = 'seq2seq_lm'
  return ModelConfig(**base).replace()


def init(cfg, seed=0):
  model = build_model(cfg)
  variables = model.init(jax.random.PRNGKey(seed), **dummy_inputs(cfg, 2, 10))
  return nn.meta.unbox(variables['params'])


def padded_inputs(cfg, seed=1, b=3, l=10):
  """Packed and padded rows: two segments in row 0, right padding in rows 1 and 2."""
  ids = np.asarray(jax.random.randint(jax.random.PRNGKey(seed), (b, l), 1, cfg.vocab_size))
  seg = np.ones((b, l), np.int32)
  seg[0, 6:] = 2
  seg[1, 7:] = 0
  seg[2, 4:] = 0
  ids = np.where(seg == 0, 0, ids)
  kw = dict(input_ids=jnp.asarray(ids), segment_ids=jnp.asarray(seg))
  if cfg.family == 'encoder_decoder':
    kw['decoder_input_ids'] = jnp.asarray(ids[:, ::-1].copy())
    kw['decoder_segment_ids'] = jnp.asarray(seg)
  return kw


def loss_and_grads(cfg, params, kw, deterministic=True, rng=None):
  model = build_model(cfg, deterministic=deterministic)

  def loss(p):
    out = model.apply({'params': p}, rngs=None if rng is None else {'dropout': rng}, **kw)
    return jnp.mean(jnp.square(out['logits'])) + jnp.mean(jnp.square(out['hidden']))

  return jax.jit(jax.value_and_grad(loss))(params)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


# --- one additive mask bias ------------------------------------------------------------------------
@pytest.mark.parametrize('family, position', [
    ('decoder', 'learned'), ('decoder', 'alibi'), ('encoder', 'relative_bias'),
    ('encoder_decoder', 'relative_bias'), ('encoder_decoder', 'rope')])
def test_additive_mask_bias_equals_the_per_layer_where(family, position, monkeypatch):
  """The model with AttentionMask (bias added) against the old boolean masks (where per layer)."""
  cfg = tiny(family=family, position=position)
  params = init(cfg)
  kw = padded_inputs(cfg)
  new_loss, new_grads = loss_and_grads(cfg, params, kw)
  # The old form: a boolean [B, 1, T, S] mask that every layer applies with jnp.where.
  monkeypatch.setattr(transformer_lib, 'attention_mask', transformer_lib.visible_keys)
  old_loss, old_grads = loss_and_grads(cfg, params, kw)
  np.testing.assert_allclose(new_loss, old_loss, rtol=1e-6)
  assert_trees_close(new_grads, old_grads)


def test_einsum_attention_bias_and_boolean_masks_agree_with_gradients():
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(k[0], (2, 5, 4, 8))
  kk = jax.random.normal(k[1], (2, 7, 2, 8))
  v = jax.random.normal(k[2], (2, 7, 2, 8))
  visible = jax.random.bernoulli(k[3], 0.6, (2, 1, 5, 7)).at[..., 0].set(True)

  def f(mask):
    return jax.value_and_grad(
        lambda q, kk, v: jnp.sum(jnp.sin(einsum_attention(q, kk, v, mask_Bx1xTxS=mask,
                                                           scale=0.3))), argnums=(0, 1, 2))(q, kk, v)

  (a, ga), (b, gb) = f(AttentionMask.from_visible(visible)), f(visible)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  assert_trees_close(ga, gb)
  # A fully masked row gives the same uniform weights in both forms (its query's gradient differs:
  # the bias form lets it through; no loss in the lab reads such a row, padding queries see keys).
  empty = visible.at[1, 0, 2].set(False)
  out_bias = einsum_attention(q, kk, v, mask_Bx1xTxS=AttentionMask.from_visible(empty), scale=0.3)
  out_bool = einsum_attention(q, kk, v, mask_Bx1xTxS=empty, scale=0.3)
  np.testing.assert_allclose(out_bias, out_bool, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(out_bias[1, 2], jnp.repeat(jnp.mean(v[1], 0), 2, axis=0), rtol=1e-5,
                             atol=1e-6)


def test_mask_is_built_once_and_marked_causal_only_where_a_fused_kernel_may_use_it():
  seg = jnp.ones((2, 6), jnp.int32)
  index = jnp.broadcast_to(jnp.arange(6), (2, 6))
  causal = transformer_lib.attention_mask(seg, seg, causal=True, q_index_BxT=index,
                                          k_index_BxS=index)
  assert causal.causal and causal.bias.dtype == jnp.float32
  np.testing.assert_array_equal(causal.visible[0, 0], np.tril(np.ones((6, 6), bool)))
  np.testing.assert_array_equal(causal.bias == 0, causal.visible)
  assert not transformer_lib.attention_mask(seg, seg, causal=False).causal
  other = jnp.broadcast_to(jnp.arange(6) + 3, (2, 6))  # queries at other positions than keys
  assert not transformer_lib.attention_mask(seg, seg, True, q_index_BxT=other,
                                            k_index_BxS=index).causal


# --- causal attention in query blocks --------------------------------------------------------------
def test_causal_query_blocks_cover_the_sequence_in_blocks_of_at_least_the_minimum():
  for t, blocks in [(256, 4), (200, 4), (100, 4), (64, 4), (1000, 3), (130, 1)]:
    edges = attention_lib.causal_query_blocks(t, blocks)
    assert edges[0][0] == 0 and edges[-1][1] == t
    assert all(a[1] == b[0] for a, b in zip(edges, edges[1:]))
    assert len(edges) == max(1, min(blocks, t // attention_lib.MIN_QUERY_BLOCK))
    assert len(edges) == 1 or min(e - s for s, e in edges) >= attention_lib.MIN_QUERY_BLOCK


def causal_case(t=200, b=2, h=4, g=2, k=8):
  """q, k, v and a causal AttentionMask with two packed segments in row 0 and right padding."""
  r = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(r[0], (b, t, h, k))
  kk = jax.random.normal(r[1], (b, t, g, k))
  v = jax.random.normal(r[2], (b, t, g, k))
  seg = np.ones((b, t), np.int32)
  seg[0, 90:] = 2
  seg[1, 150:] = 0
  index = jnp.broadcast_to(jnp.arange(t), (b, t))
  mask = transformer_lib.attention_mask(jnp.asarray(seg), jnp.asarray(seg), causal=True,
                                        q_index_BxT=index, k_index_BxS=index)
  bias = jax.random.normal(r[3], (1, h, t, t))  # a relative-position bias, broadcast over rows
  return q, kk, v, mask, bias


@pytest.mark.parametrize('with_bias', [False, True])
def test_causal_blocked_attention_equals_full_attention_with_gradients(with_bias):
  q, kk, v, mask, bias = causal_case()
  bias = bias if with_bias else None
  assert mask.causal and bool(jnp.all(jnp.any(mask.visible, -1)))  # every query sees a key

  def f(fn, **kw):
    return jax.jit(jax.value_and_grad(
        lambda q, kk, v: jnp.sum(jnp.sin(fn(q, kk, v, mask_Bx1xTxS=mask, bias_BxHxTxS=bias,
                                            scale=0.3, **kw))), argnums=(0, 1, 2)))(q, kk, v)

  full, full_g = f(einsum_attention)
  got, got_g = f(attention_lib.causal_blocked_attention, blocks=4)
  assert len(attention_lib.causal_query_blocks(200, 4)) == 3  # uneven blocks: 66, 67, 67 rows
  np.testing.assert_allclose(got, full, rtol=1e-5)
  assert_trees_close(got_g, full_g, rtol=1e-5, atol=1e-5)


def test_causal_blocked_attention_gives_a_keyless_query_its_blocks_uniform_average():
  q, kk, v, mask, _ = causal_case(t=128)
  hidden = mask.visible.at[1, 0, 70].set(False)  # query 70 (second block, keys 0..127) sees none
  mask = AttentionMask.from_visible(hidden, causal=True)
  out = attention_lib.causal_blocked_attention(q, kk, v, mask_Bx1xTxS=mask, scale=0.3, blocks=2)
  np.testing.assert_allclose(out[1, 70], jnp.repeat(jnp.mean(v[1, :128], 0), 2, axis=0),
                             rtol=1e-5, atol=1e-6)
  full = einsum_attention(q, kk, v, mask_Bx1xTxS=mask, scale=0.3)
  np.testing.assert_allclose(jnp.delete(out, 70, axis=1), jnp.delete(full, 70, axis=1),
                             rtol=1e-5, atol=1e-6)


def test_causal_blocked_attention_dropout_is_unbiased_and_differs_between_blocks(monkeypatch):
  q, kk, _, mask, _ = causal_case(t=256, b=4)
  ones = jnp.ones_like(kk)  # every output is then the sum of the kept (rescaled) weights
  keys, plain = [], attention_lib.einsum_attention

  def recording(*args, dropout_rng=None, **kwargs):
    keys.append(np.asarray(jax.random.key_data(dropout_rng)).tobytes())
    return plain(*args, dropout_rng=dropout_rng, **kwargs)

  monkeypatch.setattr(attention_lib, 'einsum_attention', recording)
  out = attention_lib.causal_blocked_attention(
      q, kk, ones, mask_Bx1xTxS=mask, scale=0.3, blocks=4, dropout_rate=0.3,
      dropout_rng=jax.random.PRNGKey(5), deterministic=False)
  real = np.asarray(mask.visible[:, 0].any(-1))  # [B, T]
  per_query = np.asarray(out[..., 0])[real]  # [N, H]
  assert abs(per_query.mean() - 1.0) < 0.02  # E[kept / (1 - rate)] = 1
  assert per_query.std() > 0.05  # dropout did act
  # Each block draws its bits from its own key (one key's bits at overlapping counters would tie
  # the masks of different blocks together).
  assert len(keys) == 4 and len(set(keys)) == 4


def test_causal_blocked_attention_refuses_non_causal_masks():
  q, kk, v, mask, _ = causal_case(t=128)
  with pytest.raises(ValueError, match='causal'):
    attention_lib.causal_blocked_attention(q, kk, v, mask_Bx1xTxS=mask.replace(causal=False),
                                           scale=1.0, blocks=2)


@pytest.mark.parametrize('kw', [dict(family='decoder'),
                                dict(family='decoder', position='rope', num_kv_heads=2),
                                dict(family='encoder_decoder', position='relative_bias')])
def test_model_with_causal_attention_blocks_equals_one_block(kw, monkeypatch):
  cfg = tiny(max_len=256, num_layers=2, causal_attention_blocks=1, **kw)
  params = init(cfg)
  inputs = padded_inputs(cfg, l=192)
  want = loss_and_grads(cfg, params, inputs)
  query_lengths = []
  plain = attention_lib.einsum_attention

  def recording(q, *args, **kwargs):
    query_lengths.append(q.shape[1])
    return plain(q, *args, **kwargs)

  monkeypatch.setattr(attention_lib, 'einsum_attention', recording)
  got = loss_and_grads(cfg.replace(causal_attention_blocks=4), params, inputs)
  assert 64 in query_lengths  # the decoder's self-attention ran in 3 blocks of 64 queries
  assert 192 in query_lengths or cfg.family == 'decoder'  # an encoder / cross-attention: one block
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  assert_trees_close(got[1], want[1], rtol=1e-5, atol=1e-6)
  with pytest.raises(ConfigError, match='causal_attention_blocks'):
    cfg.replace(causal_attention_blocks=0)


# --- scan unrolling --------------------------------------------------------------------------------
@pytest.mark.parametrize('family', ['decoder', 'encoder_decoder'])
def test_scan_unroll_changes_nothing(family):
  cfg = tiny(family=family, num_layers=4, dropout_rate=0.1, attention_dropout_rate=0.1,
             scan_unroll=1)
  params = init(cfg)
  kw = padded_inputs(cfg)
  rng = jax.random.PRNGKey(5)
  ref = loss_and_grads(cfg, params, kw, deterministic=False, rng=rng)
  for unroll in (0, 2, 4, 9):  # 0: auto, unrolled at 4 layers
    got = loss_and_grads(cfg.replace(scan_unroll=unroll), params, kw, deterministic=False,
                         rng=rng)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)  # same dropout masks too
    assert_trees_close(got[1], ref[1])
  with pytest.raises(ConfigError, match='scan_unroll'):
    cfg.replace(scan_unroll=-1)


def test_auto_scan_unroll_unrolls_shallow_stacks_only():
  from flaxformer_lab.models.config import AUTO_UNROLL_LAYERS  # pylint: disable=g-import-not-at-top
  from flaxformer_lab.models.stack import scan_unroll  # pylint: disable=g-import-not-at-top
  assert scan_unroll(0, 4) == 4
  assert scan_unroll(0, AUTO_UNROLL_LAYERS) == AUTO_UNROLL_LAYERS
  assert scan_unroll(0, AUTO_UNROLL_LAYERS + 1) == 1
  assert scan_unroll(3, 12) == 3 and scan_unroll(9, 4) == 4


# --- MLM head on masked positions only -------------------------------------------------------------
@pytest.mark.parametrize('head, emb_dim', [('mlm', 0), ('mlm_nsp', 16)])
def test_masked_position_scoring_equals_full_scoring_restricted(head, emb_dim):
  cfg = tiny(family='encoder', head=head, pooler=head == 'mlm_nsp', emb_dim=emb_dim,
             type_vocab_size=2)
  params = init(cfg)
  kw = padded_inputs(cfg)
  model = build_model(cfg)
  positions = jnp.asarray([[1, 4, 8, 0], [0, 2, 5, 6], [3, 1, 0, 0]], jnp.int32)  # [B, P]
  full = model.apply({'params': params}, **kw)['logits']  # [B, L, V]
  part = model.apply({'params': params}, masked_positions=positions, **kw)['logits']
  assert part.shape == (3, 4, cfg.vocab_size)
  np.testing.assert_allclose(part, gather_positions(full, positions), rtol=1e-5, atol=1e-6)


def test_masked_position_loss_and_gradients_equal_full_scoring():
  """The MLM loss on gathered positions = the loss on all positions weighted at those positions."""
  cfg = tiny(family='encoder', head='mlm')
  params = init(cfg)
  kw = padded_inputs(cfg)
  model = build_model(cfg)
  b, l = kw['input_ids'].shape
  positions = jnp.asarray([[1, 4, 8, 0], [0, 2, 5, 6], [3, 1, 0, 0]], jnp.int32)
  p_weights = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], jnp.float32)  # 0 = padding
  p_targets = jax.random.randint(jax.random.PRNGKey(9), positions.shape, 1, cfg.vocab_size)
  rows = jnp.arange(b)[:, None]
  full_w = jnp.zeros((b, l)).at[rows, positions].add(p_weights)
  full_t = jnp.zeros((b, l), jnp.int32).at[rows, positions].max(
      jnp.where(p_weights > 0, p_targets, 0))

  def loss_full(p):
    s = losses.cross_entropy(model.apply({'params': p}, **kw)['logits'], full_t, full_w)
    return s[0] / s[3]

  def loss_masked(p):
    out = model.apply({'params': p}, masked_positions=positions, **kw)['logits']
    s = losses.cross_entropy(out, p_targets, p_weights)
    return s[0] / s[3]

  a, ga = jax.jit(jax.value_and_grad(loss_full))(params)
  c, gc = jax.jit(jax.value_and_grad(loss_masked))(params)
  np.testing.assert_allclose(c, a, rtol=1e-5)
  assert_trees_close(gc, ga)


def test_masked_positions_are_refused_for_other_heads():
  cfg = tiny(family='decoder')
  params = init(cfg)
  with pytest.raises(ValueError, match='masked_positions'):
    build_model(cfg).apply({'params': params}, jnp.ones((1, 4), jnp.int32),
                           masked_positions=jnp.zeros((1, 2), jnp.int32))


# --- the fast cross entropy through a model --------------------------------------------------------
def model_and_lm_batch(cfg):
  """(model, params, inputs, targets, weights): a padded batch with random targets on real tokens."""
  params = init(cfg)
  kw = padded_inputs(cfg)
  seg = kw.get('decoder_segment_ids', kw['segment_ids'])
  targets = jax.random.randint(jax.random.PRNGKey(3), seg.shape, 1, cfg.vocab_size)
  return build_model(cfg), params, kw, targets, (seg > 0).astype(jnp.float32)


@pytest.mark.parametrize('family, smoothing', [('decoder', 0.0), ('encoder_decoder', 0.1)])
def test_fast_loss_equals_the_old_formulation_through_the_model(family, smoothing):
  cfg = tiny(family=family)
  model, params, kw, targets, weights = model_and_lm_batch(cfg)

  def loss(fn):
    def f(p):
      s = fn(model.apply({'params': p}, **kw)['logits'], targets, weights, smoothing)
      return s[0] / s[3], s
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

  (new, new_sums), new_g = loss(losses.cross_entropy)
  (old, old_sums), old_g = loss(losses.reference_cross_entropy)
  assert abs(float(new) - float(old)) <= 1e-5 * abs(float(old))
  for x, y in zip(new_sums, old_sums):
    assert abs(float(x) - float(y)) <= 1e-5 * max(abs(float(y)), 1e-6)
  leaves_new, leaves_old = jax.tree.leaves(new_g), jax.tree.leaves(old_g)
  overall = max(float(jnp.max(jnp.abs(y))) for y in leaves_old)
  for x, y in zip(leaves_new, leaves_old):
    # Relative to the leaf's own scale; leaves whose gradient is float32 noise around zero
    # (a parameter that cancels out, ~1e-11) are compared at 1e-3 of the largest gradient.
    scale = max(float(jnp.max(jnp.abs(y))), 1e-3 * overall)
    assert float(jnp.max(jnp.abs(x - y))) <= 1e-5 * scale


# --- the tied head's backward pass --------------------------------------------------------------
@pytest.mark.parametrize('dtype, rtol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_tied_logits_backward_equals_autodiff_of_the_einsum(dtype, rtol):
  from flaxformer_lab.models.embedding import tied_logits  # pylint: disable=g-import-not-at-top
  kx, ke, kc = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (3, 7, 16), jnp.float32).astype(dtype)
  table = jax.random.normal(ke, (50, 16), jnp.float32).astype(dtype)
  cot = jax.random.normal(kc, (3, 7, 50), jnp.float32).astype(dtype)

  def vjp(fn):
    out, pullback = jax.vjp(fn, x, table)
    return (out,) + pullback(cot)

  plain = lambda a, e: jnp.einsum('ble,ve->blv', a, e)
  got, want = jax.jit(lambda: vjp(tied_logits))(), jax.jit(lambda: vjp(plain))()
  for g, w in zip(got, want):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=rtol, atol=rtol)
  # The independent reference for the table's gradient: sum over (b, l) of cot[b,l,v] * x[b,l,e].
  brute = np.einsum('blv,ble->ve', np.asarray(cot, np.float64), np.asarray(x, np.float64))
  np.testing.assert_allclose(np.asarray(got[2], np.float64), brute, rtol=rtol, atol=rtol)


@pytest.mark.parametrize('family, head', [('decoder', 'lm'), ('encoder', 'mlm'),
                                          ('encoder_decoder', 'seq2seq_lm')])
def test_tied_head_loss_and_gradients_equal_the_plain_einsum(family, head, monkeypatch):
  """Whole model, cross entropy on a fixed batch: custom backward vs autodiff of x @ E^T."""
  from flaxformer_lab.models import embedding  # pylint: disable=g-import-not-at-top
  cfg = tiny(family=family, head=head, tie_embeddings=True)
  model, params, kw, targets, weights = model_and_lm_batch(cfg)

  def run():
    def f(p):
      s = losses.cross_entropy(model.apply({'params': p}, **kw)['logits'], targets, weights)
      return s[0] / s[3]
    return jax.jit(jax.value_and_grad(f))(params)

  new, new_g = run()
  monkeypatch.setattr(embedding, 'tied_logits', lambda a, e: jnp.einsum('ble,ve->blv', a, e))
  old, old_g = run()
  np.testing.assert_allclose(new, old, rtol=1e-5)
  assert_trees_close(new_g, old_g)
  # The table's gradient has two paths (lookup and head): it is where a wrong backward shows.
  np.testing.assert_allclose(new_g['tokens']['embedding'], old_g['tokens']['embedding'],
                             rtol=1e-5, atol=1e-6)


# --- decoding: two-stage beam candidates, chunked top_k, shared beam cache ----------------------
@pytest.mark.parametrize('k, v', [(4, 50), (3, 5), (8, 6)])  # the last two: 2K > V (wide beams)
def test_two_stage_beam_candidates_equal_one_top_k_over_all_extensions(k, v):
  from flaxformer_lab import decoding  # pylint: disable=g-import-not-at-top
  b, m = 3, min(2 * k, k * v)
  logits = jax.random.normal(jax.random.PRNGKey(0), (b * k, v))
  logits = logits.at[0, 1].set(logits[0, 2])  # a tie inside a beam
  alive = jax.random.normal(jax.random.PRNGKey(1), (b, k)).at[:, 1:].add(-1.0)
  logp = jax.nn.log_softmax(logits, axis=-1).reshape(b, k, v)
  want_logp, idx = jax.lax.top_k((alive[:, :, None] + logp).reshape(b, k * v), m)
  got_logp, parent, tok = decoding._beam_candidates(logits, alive, m)
  np.testing.assert_array_equal(got_logp, want_logp)  # bit-identical scores
  np.testing.assert_array_equal(parent, idx // v)
  np.testing.assert_array_equal(tok, idx % v)


@pytest.mark.parametrize('v, chunk', [(1000, 16), (1024, 16), (50, 16), (1000, 7)])
def test_top_k_and_max_equals_lax_top_k(v, chunk):
  from flaxformer_lab import decoding  # pylint: disable=g-import-not-at-top
  m = 8
  x = np.random.RandomState(0).randn(6, v).astype(np.float32)
  x[0, :] = 1.0  # every entry tied: the m lowest indices win
  x[1, 3:3 + 40] = 5.0  # ties spread over several chunks
  x[2, :] = -np.inf
  x[2, v - 3:] = [1.0, 2.0, 3.0]  # fewer than m finite entries, all in the last chunk
  x[3, ::chunk] = 9.0  # each chunk's max at its first entry: all chunks tie
  want_top, want_idx = jax.lax.top_k(jnp.asarray(x), m)
  top, idx, peak = decoding.top_k_and_max(jnp.asarray(x), m, chunk=chunk)
  np.testing.assert_array_equal(top, want_top)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_array_equal(peak[:, 0], x.max(axis=1))


def test_first_argmax_and_token_log_prob_equal_argmax_and_log_softmax():
  from flaxformer_lab import decoding  # pylint: disable=g-import-not-at-top
  x = np.random.RandomState(0).randn(5, 300).astype(np.float32)
  x[0, [7, 9, 200]] = 10.0  # tied maxima: the first wins
  x[1, :] = -3.0  # all tied
  x[2, :5] = -np.inf
  x = jnp.asarray(x)
  peak = jnp.max(x, axis=-1, keepdims=True)
  tok = decoding.first_argmax(x, peak)
  np.testing.assert_array_equal(tok, jnp.argmax(x, axis=-1))
  want = jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), tok[:, None], axis=-1)[:, 0]
  np.testing.assert_array_equal(decoding.token_log_prob(x, peak, tok), want)  # bit-identical


@pytest.mark.parametrize('t, h, g', [(1, 4, 4), (1, 4, 2), (3, 6, 3)])
def test_grouped_attention_equals_attention_on_the_gathered_cache(t, h, g):
  """A row table read equals attention on keys/values copied into place (the brute force)."""
  n, j, s, k = 3, 4, 9, 8
  rng = np.random.RandomState(0)
  q = jnp.asarray(rng.randn(n * j, t, h, k).astype(np.float32))
  keys = rng.randn(n * j, g, s, k).astype(np.float32)
  values = rng.randn(n * j, g, s, k).astype(np.float32)
  rows = rng.randint(0, j, (n, j, s)).astype(np.int32)
  visible = jnp.asarray(rng.rand(n * j, 1, t, s) > 0.3)
  bias = jnp.asarray(rng.randn(n * j, h, t, s).astype(np.float32))
  src = (np.arange(n)[:, None, None] * j + rows).reshape(n * j, s)  # [B, S] physical row
  gather = lambda x: jnp.asarray(x[src, :, np.arange(s)[None, :]].transpose(0, 2, 1, 3))
  want = einsum_attention(q, gather(keys), gather(values), mask_Bx1xTxS=visible,
                          bias_BxHxTxS=bias, scale=0.3, kv_heads_major=True)
  got = einsum_attention(q, jnp.asarray(keys), jnp.asarray(values), mask_Bx1xTxS=visible,
                         bias_BxHxTxS=bias, scale=0.3, kv_heads_major=True,
                         kv_rows_NxJxS=jnp.asarray(rows))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('kw, unroll', [(dict(family='decoder', position='rope', num_kv_heads=2),
                                         True),
                                        (dict(family='decoder', position='learned'), False),
                                        (dict(family='encoder_decoder', position='relative_bias'), True)])
def test_shared_beam_cache_equals_reordering_the_cache(kw, unroll):
  """Beam search through row tables returns what gathering the whole cache per step returns."""
  from flaxformer_lab import decoding  # pylint: disable=g-import-not-at-top
  cfg = tiny(num_layers=2, **kw)
  params = jax.tree.map(lambda x: 6.0 * x, init(cfg))  # peaky outputs: beams that diverge
  rng = np.random.RandomState(0)
  prompt = rng.randint(3, cfg.vocab_size, (3, 5)).astype(np.int32)
  lengths = np.array([5, 2, 3], np.int32)
  call = dict(max_new_tokens=9, strategy='beam', num_beams=4, length_penalty=0.6, eos_id=4,
              unroll_layers=unroll)
  if cfg.family == 'encoder_decoder':
    prompt, lengths = None, None
    call.update(source_ids=rng.randint(3, cfg.vocab_size, (3, 6)).astype(np.int32))
  outs = []
  for shared in (True, False):
    decoding._SHARED_BEAM_CACHE = shared  # pylint: disable=protected-access
    decoding._compiled.cache_clear()  # pylint: disable=protected-access
    try:
      outs.append(jax.device_get(decoding.generate(cfg, params, prompt, lengths, **call)))
    finally:
      decoding._SHARED_BEAM_CACHE = True  # pylint: disable=protected-access
  decoding._compiled.cache_clear()  # pylint: disable=protected-access
  got, want = outs
  assert len({tuple(row) for row in want['beam_tokens'].reshape(-1, 9)}) > 3  # beams differ
  for name in ('tokens', 'lengths', 'beam_tokens', 'beam_lengths', 'steps'):
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  np.testing.assert_allclose(got['beam_scores'], want['beam_scores'], rtol=1e-5, atol=1e-5)
