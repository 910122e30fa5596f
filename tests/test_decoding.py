"""Decoding: cached steps equal the full forward pass; greedy, sampling, beam search; BLEU."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxformer_lab import decoding
from flaxformer_lab.data import tokenizers as tok_lib
from flaxformer_lab.models.config import ModelConfig
from flaxformer_lab.models.transformer import build_model

jax.config.update('jax_default_matmul_precision', 'highest')

EOS = tok_lib.EOS_ID


def tiny(**kw) -> ModelConfig:
  base = dict(vocab_size=61, d_model=32, num_heads=4, mlp_dim=48, num_layers=2, max_len=32,
              dropout_rate=0.0, attention_dropout_rate=0.0, classifier_dropout=0.0)
  base.update(kw)
  if base.get('family') == 'encoder_decoder':
    base['head'] = 'seq2seq_lm'
  return ModelConfig(**base).replace()


def init_params(cfg: ModelConfig, seed: int = 0, std: float = 0.02):
  """Random parameters of the model's shapes, drawn with numpy: weights N(0, std), biases 0, norm
  scales 1 (compiling `model.init`'s threefry draws costs seconds per config on this CPU)."""
  model = build_model(cfg)
  ids = jnp.zeros((2, 8), jnp.int32)
  kw = dict(decoder_input_ids=ids) if cfg.family == 'encoder_decoder' else {}
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), ids,
                                                           **kw)['params']))
  rng = np.random.RandomState(seed)

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if 'scale' in name:
      return jnp.ones(x.shape, x.dtype)
    if 'bias' in name and 'relative_bias' not in name:
      return jnp.zeros(x.shape, x.dtype)
    return jnp.asarray(rng.normal(0.0, std, x.shape).astype(np.float32))

  return model, jax.tree_util.tree_map_with_path(draw, shapes)


def forward_logits(model, params, ids_BxL, seg_BxL, src=None, src_seg=None):
  """Full (uncached) forward pass over right-padded sequences."""
  if model.config.family == 'encoder_decoder':
    fn = lambda p: model.apply({'params': p}, src, segment_ids=src_seg, decoder_input_ids=ids_BxL,
                               decoder_segment_ids=seg_BxL)['logits']
  else:
    fn = lambda p: model.apply({'params': p}, ids_BxL, segment_ids=seg_BxL)['logits']
  return jax.jit(fn)(params)


def mixed_batch(vocab, lengths, prompt_len, new, seed=0, src_len=7):
  """Right-padded prompts, their continuations, and the full sequences (tokens >= 3)."""
  rng = np.random.RandomState(seed)
  b = len(lengths)
  prompt = np.zeros((b, prompt_len), np.int32)
  cont = rng.randint(3, vocab, size=(b, new)).astype(np.int32)
  full = np.zeros((b, prompt_len + new), np.int32)
  seg = np.zeros_like(full)
  for i, n in enumerate(lengths):
    prompt[i, :n] = rng.randint(3, vocab, size=n)
    full[i, :n + new] = np.concatenate([prompt[i, :n], cont[i]])
    seg[i, :n + new] = 1
  src = rng.randint(3, vocab, size=(b, src_len)).astype(np.int32)
  src_seg = np.ones_like(src)
  src_seg[1, src_len - 3:] = 0  # a padded source
  src[1, src_len - 3:] = 0
  return prompt, cont, full, seg, src, src_seg


# --- cached decoding == full forward --------------------------------------------------------------
CACHE_CASES = (
    [dict(family='decoder', position=p, norm_position='pre')
     for p in ('learned', 'sinusoidal', 'relative_bias', 'rope', 'alibi')] +
    [dict(family='decoder', position='relative_bias', norm_position='post'),
     dict(family='decoder', position='alibi', norm_position='post', scan_layers=False),
     dict(family='decoder', position='rope', norm_position='post', num_kv_heads=2),
     dict(family='encoder_decoder', position='sinusoidal', norm_position='post'),
     dict(family='encoder_decoder', position='relative_bias', norm_position='pre',
          relative_bias_shared=False),
     dict(family='encoder_decoder', position='rope', norm_position='pre', num_kv_heads=1),
     # the remaining scheme x norm placement pairs, so each family covers every scheme
     dict(family='decoder', position='learned', norm_position='post'),
     dict(family='decoder', position='sinusoidal', norm_position='post'),
     dict(family='encoder_decoder', position='learned', norm_position='post'),
     dict(family='encoder_decoder', position='alibi', norm_position='pre'),
     dict(family='encoder_decoder', position='alibi', norm_position='post'),
     # a decoder with its own heads and feed-forward width (BART / Marian configs allow it)
     dict(family='encoder_decoder', position='alibi', norm_position='post', decoder_num_heads=2,
          decoder_mlp_dim=40)])


@pytest.mark.parametrize('kw', CACHE_CASES,
                         ids=lambda kw: '-'.join(str(v) for v in kw.values()))
def test_cached_steps_equal_full_forward(kw):
  cfg = tiny(**kw)
  model, params = init_params(cfg, std=0.2)
  lengths = np.array([5, 2, 3], np.int32)
  prompt_len, new = 5, 6
  prompt, cont, full, seg, src, src_seg = mixed_batch(cfg.vocab_size, lengths, prompt_len, new)
  enc_dec = cfg.family == 'encoder_decoder'
  ref = np.asarray(forward_logits(model, params, full, seg, src, src_seg))
  s, e = (src, src_seg) if enc_dec else (None, None)

  @jax.jit
  def prefill(p):
    cache = decoding.init_cache(cfg, p, 3, prompt_len + new - 1, src.shape[1])
    every, _ = decoding.prefill(cfg, p, cache, prompt, lengths, s, e, all_logits=True)
    last, cache = decoding.prefill(cfg, p, cache, prompt, lengths, s, e)
    return every, last, cache

  step = jax.jit(lambda p, c, t, q: decoding.decode_step(cfg, p, c, t, q, e))
  # Every real prompt position, and the last one alone, from the one-call prefill.
  all_logits, logits, cache = prefill(params)
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(all_logits[b, :n], ref[b, :n], atol=1e-5, rtol=0)
  rows = np.arange(3)
  np.testing.assert_allclose(logits, ref[rows, lengths - 1], atol=1e-5, rtol=0)
  for i in range(new - 1):
    logits, cache = step(params, cache, jnp.asarray(cont[:, i]), jnp.asarray(lengths + i))
    np.testing.assert_allclose(logits, ref[rows, lengths + i], atol=1e-5, rtol=0,
                               err_msg=f'step {i}')


# --- strategies -----------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def decoder_model():
  cfg = tiny(family='decoder', position='rope')
  _, params = init_params(cfg, std=0.3)  # peakier than a 0.02 init's near-uniform outputs
  prompt, _, _, _, _, _ = mixed_batch(cfg.vocab_size, [4, 1, 2], 4, 1)
  return cfg, params, prompt, np.array([4, 1, 2], np.int32)


@pytest.mark.parametrize('family', ['decoder', 'encoder_decoder'])
def test_beam_of_one_equals_greedy_with_eos(family):
  cfg = tiny(family=family, position='learned')
  _, params = init_params(cfg, seed=1, std=0.3)
  prompt, _, _, _, src, src_seg = mixed_batch(cfg.vocab_size, [4, 1, 2], 4, 1)
  kw = dict(max_new_tokens=8)
  if family == 'encoder_decoder':
    prompt, lengths = None, None
    kw.update(source_ids=src, source_segment_ids=src_seg)
  else:
    lengths = np.array([4, 1, 2], np.int32)
  free = decoding.generate(cfg, params, prompt, lengths, eos_id=None, **kw)
  free_toks = np.asarray(free['tokens'])
  assert free_toks.shape == (3, 8) and int(free['steps']) == 8
  eos = int(free_toks[0, 2])  # make a token the greedy path emits the stop token
  greedy = decoding.generate(cfg, params, prompt, lengths, eos_id=eos, **kw)
  # Length penalty 0: a finished beam can only be beaten by a longer one that scores higher,
  # which greedy would have chosen; so one beam is greedy search, stop tokens included.
  beam = decoding.generate(cfg, params, prompt, lengths, eos_id=eos, strategy='beam',
                           num_beams=1, length_penalty=0.0, **kw)
  toks = np.asarray(greedy['tokens'])
  np.testing.assert_array_equal(np.asarray(beam['tokens']), toks)
  np.testing.assert_array_equal(np.asarray(beam['lengths']), np.asarray(greedy['lengths']))
  np.testing.assert_allclose(np.asarray(beam['scores']), np.asarray(greedy['scores']), atol=1e-5)
  # Without stop tokens every hypothesis has N tokens: one beam is greedy for any penalty.
  beam_free = decoding.generate(cfg, params, prompt, lengths, eos_id=None, strategy='beam',
                                num_beams=1, length_penalty=0.6, **kw)
  np.testing.assert_array_equal(np.asarray(beam_free['tokens']), free_toks)
  # Stop handling: the stop token is kept, pads follow; lengths count up to it.
  first = int(np.argmax(free_toks[0] == eos)) + 1
  assert int(greedy['lengths'][0]) == first and toks[0, first - 1] == eos
  assert (toks[0, first:] == 0).all()
  for b in range(3):
    n = int(greedy['lengths'][b])
    np.testing.assert_array_equal(toks[b, :n], free_toks[b, :n])
    assert (n == 8) or toks[b, n - 1] == eos
  if (toks == eos).any(axis=1).all():  # every row stopped: the loop ended early
    assert int(greedy['steps']) == int(greedy['lengths'].max())


def test_sampling_top_k_one_is_greedy_and_seeds(decoder_model):
  cfg, params, prompt, lengths = decoder_model
  kw = dict(max_new_tokens=10, eos_id=None)
  greedy = np.asarray(decoding.generate(cfg, params, prompt, lengths, **kw)['tokens'])
  scanned = decoding.generate(cfg, params, prompt, lengths, unroll_layers=False, **kw)
  np.testing.assert_array_equal(np.asarray(scanned['tokens']), greedy)
  top1 = decoding.generate(cfg, params, prompt, lengths, strategy='sample', top_k=1,
                           temperature=1.5, rng=jax.random.PRNGKey(3), **kw)
  np.testing.assert_array_equal(np.asarray(top1['tokens']), greedy)
  sample = lambda seed: np.asarray(decoding.generate(
      cfg, params, prompt, lengths, strategy='sample', temperature=2.0, top_p=0.99,
      rng=jax.random.PRNGKey(seed), **kw)['tokens'])
  np.testing.assert_array_equal(sample(0), sample(0))
  assert (sample(0) != sample(1)).any()
  with pytest.raises(ValueError, match='PRNG'):
    decoding.generate(cfg, params, prompt, lengths, strategy='sample', **kw)


def test_filter_logits():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  finite = lambda x: np.isfinite(np.asarray(x))[0].tolist()
  assert finite(decoding.filter_logits(logits, top_k=2)) == [True, True, False, False]
  assert finite(decoding.filter_logits(logits, top_p=0.5)) == [True, False, False, False]
  assert finite(decoding.filter_logits(logits, top_p=0.8)) == [True, True, False, False]
  assert finite(decoding.filter_logits(logits, top_p=0.81)) == [True, True, True, False]
  np.testing.assert_allclose(decoding.filter_logits(logits, temperature=2.0), logits / 2.0)


def test_wide_beam_finds_brute_force_best():
  vocab, new, alpha = 5, 4, 0.6  # ids 0..4; 2 is EOS
  cfg = tiny(family='decoder', position='alibi', vocab_size=vocab)
  model, params = init_params(cfg, seed=2, std=0.3)
  lengths = np.array([3, 1], np.int32)
  prompt = np.array([[1, 3, 4], [1, 0, 0]], np.int32)
  beams = (vocab - 1) ** (new - 1) * vocab  # every candidate of every step fits in the beam
  out = decoding.generate(cfg, params, prompt, lengths, max_new_tokens=new, strategy='beam',
                          num_beams=beams, length_penalty=alpha, eos_id=EOS)
  # Brute force: every continuation of `new` tokens, cut after its first EOS.
  conts = np.array(list(itertools.product(range(vocab), repeat=new)), np.int32)  # [625, 4]
  for b, n in enumerate(lengths):
    seqs = np.concatenate([np.tile(prompt[b, :n], (len(conts), 1)), conts], axis=1)
    logp = jax.nn.log_softmax(forward_logits(model, params, seqs, np.ones_like(seqs)), -1)
    tok_logp = np.take_along_axis(np.asarray(logp)[:, n - 1:-1], conts[:, :, None], 2)[..., 0]
    hyps = {}
    for c, lp in zip(conts, tok_logp):
      stop = np.flatnonzero(c == EOS)
      m = int(stop[0]) + 1 if stop.size else new
      hyps[tuple(c[:m])] = lp[:m].sum() / ((5 + m) / 6) ** alpha
    ranked = sorted(hyps.items(), key=lambda kv: -kv[1])
    best, best_score = ranked[0]
    got_len = int(out['lengths'][b])
    assert tuple(np.asarray(out['tokens'][b, :got_len])) == best
    np.testing.assert_allclose(float(out['scores'][b]), best_score, atol=1e-4)
    top = [s for _, s in ranked[:10]]
    np.testing.assert_allclose(np.asarray(out['beam_scores'][b, :10]), top, atol=1e-4)


# --- a trained model: exact decoding and BLEU -----------------------------------------------------
class SpacedChars(tok_lib.CharTokenizer):
  """Characters written as words, so that BLEU has n-grams to count."""

  def decode(self, ids):
    return ' '.join(super().decode(ids))


def reversal_batch(rng, n, length=6, vocab=12):
  x = rng.randint(tok_lib.NUM_SPECIAL, vocab, size=(n, length)).astype(np.int32)
  y = x[:, ::-1]
  col = lambda v: np.full((n, 1), v, np.int32)
  return {'encoder_inputs': np.concatenate([x, col(EOS)], 1),
          'encoder_segment_ids': np.ones((n, length + 1), np.int32),
          'decoder_inputs': np.concatenate([col(tok_lib.BOS_ID), y], 1),
          'decoder_targets': np.concatenate([y, col(EOS)], 1),
          'decoder_segment_ids': np.ones((n, length + 1), np.int32),
          'weights': np.ones((n, length + 1), np.float32)}


def test_trained_reversal_decodes_exactly_and_bleu_is_100():
  tokenizer = SpacedChars(list('abcde'))
  assert tokenizer.vocab_size == 12
  cfg = tiny(family='encoder_decoder', vocab_size=12, num_layers=1, mlp_dim=64, max_len=16)
  model, params = init_params(cfg)
  opt = optax.adam(3e-3)

  @jax.jit
  def train_step(params, opt_state, batch):
    def loss_fn(p):
      logits = model.apply({'params': p}, batch['encoder_inputs'],
                           decoder_input_ids=batch['decoder_inputs'])['logits']
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, batch['decoder_targets']).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = opt.init(params)
  rng = np.random.RandomState(0)
  for _ in range(400):
    params, opt_state, loss = train_step(params, opt_state, reversal_batch(rng, 64))
  assert float(loss) < 0.05
  held_out = reversal_batch(np.random.RandomState(123), 24)
  # Two eval batches; the second ends with padding rows (weights 0) as the pipeline makes them.
  second = {k: v[16:].copy() for k, v in held_out.items()}
  second = {k: np.concatenate([v, np.zeros((8,) + v.shape[1:], v.dtype)]) for k, v in
            second.items()}
  batches = [{k: v[:16] for k, v in held_out.items()}, second]
  out = decoding.generate(cfg, params, None, source_ids=held_out['encoder_inputs'],
                          max_new_tokens=7)
  np.testing.assert_array_equal(np.asarray(out['tokens']), held_out['decoder_targets'])
  result = decoding.evaluate_bleu(cfg, params, tokenizer, batches)
  assert len(result.hypotheses) == 24
  assert result.hypotheses == result.references
  assert result.score == pytest.approx(100.0)
  assert decoding.bleu_score(cfg, params, tokenizer, batches, strategy='beam',
                             num_beams=3) == pytest.approx(100.0)


def test_unpack_packed_seq2seq_batch():
  batch = {'encoder_inputs': np.array([[7, 8, 2, 9, 2, 0]]),
           'encoder_segment_ids': np.array([[1, 1, 1, 2, 2, 0]]),
           'decoder_targets': np.array([[10, 2, 11, 11, 2, 0]]),
           'decoder_segment_ids': np.array([[1, 1, 2, 2, 2, 0]]),
           'weights': np.array([[1, 1, 1, 1, 1, 0]], np.float32)}
  assert list(decoding._unpack_seq2seq(batch)) == [([7, 8, 2], [10, 2]), ([9, 2], [11, 11, 2])]


class IdTokenizer:
  """Token ids in and out (text is space-separated ids), with the standard special ids."""
  pad_id, bos_id, eos_id = tok_lib.PAD_ID, tok_lib.BOS_ID, tok_lib.EOS_ID

  def encode(self, text):
    return [int(t) for t in text.split()]

  def decode(self, ids):
    return list(ids)


def test_generate_texts_slides_past_the_position_table():
  cfg = tiny(family='decoder', position='learned', max_len=16)
  _, params = init_params(cfg, std=0.3)
  tok = IdTokenizer()
  out = decoding.generate_texts(cfg, params, tok, ['7 8 9'], max_new_tokens=30)[0]
  assert 0 < len(out) <= 30
  # The first window: prompt (BOS + 3 ids) plus 13 new tokens fill the 16 positions.
  first = decoding.generate(cfg, params, np.array([[1, 7, 8, 9]]), max_new_tokens=13)
  first = decoding.truncate_at_stop(np.asarray(first['tokens'])[0])
  assert out[:13] == first
  if len(first) == 13:  # no stop token yet: decoding went on from the last 8 tokens
    window = ([1, 7, 8, 9] + first)[-8:]
    second = decoding.generate(cfg, params, np.array([window]), max_new_tokens=9)
    second = decoding.truncate_at_stop(np.asarray(second['tokens'])[0])
    assert out[13:22] == second
    assert len(out) == 30 or tok.eos_id not in out
