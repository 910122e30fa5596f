"""Autoregressive decoding with a fixed-size key/value cache: greedy, sampling, beam search; BLEU.

How a sequence is decoded (every family that has a causal decoder: decoder, encoder_decoder):

  cache   = init_cache(cfg, params, batch, cache_len, source_len)  # decode-mode init on [B, S_max]
  logits, cache = prefill(...)    # the whole right-padded prompt in one call; the logits of each
                                  # example's last real prompt token ([B, V])
  loop:   logits, cache = decode_step(cfg, params, cache, token_B, position_B)

The cache holds keys/values at slots = positions, written per example, so prompts of different
lengths decode together: example b's prompt occupies slots [0, len_b), its i-th new token is fed
at position len_b + i, and a query only sees slots <= its position, which are all written by then
(the slots the prompt's padding wrote are overwritten before they become visible).

`generate` runs the whole loop inside one jitted `lax.while_loop` that stops as soon as every
sequence is finished; compiled programs are cached per (config, options, shapes).

Shape letters: B batch, L prompt length, N new tokens, K beams, V vocab, S cache length,
Ls source length.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lab.data import tokenizers as tok_lib
from flaxformer_lab.models.config import ModelConfig
from flaxformer_lab.models.stack import convert_layer_params
from flaxformer_lab.models.transformer import Transformer

NEG = -1e9  # score of an empty beam slot: finite, so arithmetic on it never makes NaN
STRATEGIES = ('greedy', 'sample', 'beam')


def model_config_of(config: Any) -> ModelConfig:
  """A ModelConfig from a ModelConfig, a model section, or a whole training config (`.model`)."""
  if isinstance(config, ModelConfig):
    return config
  if hasattr(config, 'model') and not isinstance(getattr(config, 'model'), str):
    config = config.model
  elif isinstance(config, dict) and 'model' in config:
    config = config['model']
  return ModelConfig.from_dict(config)


def _check_decodable(cfg: ModelConfig) -> None:
  if cfg.family not in ('decoder', 'encoder_decoder'):
    raise ValueError(f'model.family={cfg.family!r} has no causal decoder to generate with')
  if cfg.head not in ('lm', 'seq2seq_lm'):
    raise ValueError(f'model.head={cfg.head!r}: generation needs an lm or seq2seq_lm head')


def _decode_model(cfg: ModelConfig) -> Transformer:
  return Transformer(cfg, deterministic=True, decode=True)


# --------------------------------------------------------------------------------------------------
# The cache and the two model calls.
# --------------------------------------------------------------------------------------------------
def init_cache(cfg: ModelConfig, params: Any, batch: int, cache_len: int,
               source_len: int = 0) -> Any:
  """An empty cache for `batch` sequences of up to `cache_len` tokens (and `source_len` sources).

  Made by the model's own variable initializers: a decode-mode call on a full-length dummy input
  ([batch, cache_len]) with the 'cache' collection mutable, which is what `model.init` with
  decode=True does, minus the random parameter init (slow to compile; the given params are used).
  Under jit the dummy forward pass is dead code. Leaves: per layer `cached_key`/`cached_value`
  [B, G, S, K] (heads-major) (and `cross_key`/`cross_value` for an encoder_decoder), and `key_positions` [S].
  """
  model = _decode_model(cfg)
  ids = jnp.zeros((batch, cache_len), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(cache_len, dtype=jnp.int32), ids.shape)
  if cfg.family == 'encoder_decoder':
    src = jnp.ones((batch, max(source_len, 1)), jnp.int32)
    _, variables = model.apply({'params': params}, src, decoder_input_ids=ids,
                               decoder_positions=pos, mutable=['cache'])
  else:
    _, variables = model.apply({'params': params}, ids, positions=pos, mutable=['cache'])
  return variables['cache']


def _cache_batch_axes(cfg: ModelConfig, params: Any, cache_len: int, source_len: int) -> Any:
  """Each cache leaf's batch axis (found by comparing two batch sizes), or -1 where it has none."""
  a = jax.eval_shape(lambda p: init_cache(cfg, p, 2, cache_len, source_len), params)
  b = jax.eval_shape(lambda p: init_cache(cfg, p, 3, cache_len, source_len), params)

  def axis(x, y):
    diff = [i for i, (m, n) in enumerate(zip(x.shape, y.shape)) if m != n]
    return diff[0] if diff else -1

  return jax.tree.map(axis, a, b)


def gather_cache(cache: Any, axes: Any, index_B: jax.Array) -> Any:
  """Takes rows `index_B` along every leaf's batch axis (beam reordering, tiling)."""
  return jax.tree.map(lambda x, ax: x if ax < 0 else jnp.take(x, index_B, axis=ax), cache, axes)


def add_beam_rows(cache: Any, axes: Any, groups: int, beams: int) -> Any:
  """The cache with a `beam_rows` table [.., N, J, S] beside each self-attention cache.

  Rows n*J + j of the cache become group n's J beams, each reading its own row at first (the rows
  hold copies of the same prompt, so any would do). The attention layers then read every position
  through the table and write each beam's new keys/values into its own row
  (`Attention._update_cache`), so beam search reorders the table (`reorder_beam_rows`), not the
  cache.
  """
  def walk(node, node_axes):
    if not isinstance(node, dict):
      return node
    out = {name: walk(child, node_axes[name]) for name, child in node.items()}
    if 'cached_key' in node:
      x, ax = node['cached_key'], node_axes['cached_key']
      shape = x.shape[:ax] + (groups, beams, x.shape[ax + 2])  # [.., B, G, S, K]: S after G
      out['beam_rows'] = jnp.broadcast_to(jnp.arange(beams, dtype=jnp.int32)[:, None], shape)
    return out

  return walk(cache, axes)


def reorder_beam_rows(cache: Any, parent_NxJ: jax.Array) -> Any:
  """Beam j of group n continues beam parent[n, j]: takes over its row table, nothing else moves.

  Cross-attention caches are the same in every row of a group (one source per example) and the
  self-attention keys/values stay where they were written; only `beam_rows` tables are permuted.
  """
  def reorder(path, x):
    if getattr(path[-1], 'key', None) != 'beam_rows':
      return x
    lead = x.ndim - 3  # a scanned stack's layer axis comes first
    index = parent_NxJ.reshape((1,) * lead + parent_NxJ.shape + (1,))
    return jnp.take_along_axis(x, jnp.broadcast_to(index, x.shape), axis=lead + 1)

  return jax.tree_util.tree_map_with_path(reorder, cache)


def prefill(cfg: ModelConfig, params: Any, cache: Any, prompt_ids_BxL: jax.Array,
            prompt_lengths_B: jax.Array, source_ids_BxLs: Optional[jax.Array] = None,
            source_segment_ids_BxLs: Optional[jax.Array] = None,
            all_logits: bool = False) -> tuple[jax.Array, Any]:
  """Runs the right-padded prompt (and the encoder) through the model in one call.

  Returns the next-token logits after each example's last real prompt token ([B, V], float32), or
  with `all_logits` the logits at every prompt position ([B, L, V]), and the filled cache.
  """
  model = _decode_model(cfg)
  b, l = prompt_ids_BxL.shape
  pos_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))

  def fn(m: Transformer):
    encoded = None
    if cfg.family == 'encoder_decoder':
      encoded = m.encode(source_ids_BxLs, source_segment_ids_BxLs)
    h_BxLxD = m.decode_hidden(prompt_ids_BxL, None, pos_BxL, encoded, source_segment_ids_BxLs)
    if all_logits:
      return m.logits(h_BxLxD)
    last = (prompt_lengths_B - 1).astype(jnp.int32)[:, None, None]
    return m.logits(jnp.take_along_axis(h_BxLxD, last, axis=1))[:, 0]

  logits, mutated = model.apply({'params': params, 'cache': cache}, method=fn, mutable=['cache'])
  return logits, mutated['cache']


def decode_step(cfg: ModelConfig, params: Any, cache: Any, tokens_B: jax.Array,
                positions_B: jax.Array,
                source_segment_ids_BxLs: Optional[jax.Array] = None) -> tuple[jax.Array, Any]:
  """Feeds one token per example at its position; returns the next-token logits [B, V].

  The model's own LM head: for a tied table that is x @ E^T against the [V, D] table, which XLA
  CPU's YNNPACK matmul runs 1.4-1.7x faster than against a once-transposed [D, V] copy (jax
  0.10.2; with the older Eigen matmuls it was the other way round).
  """
  model = _decode_model(cfg)

  def fn(m: Transformer):
    h_Bx1xD = m.decode_hidden(tokens_B[:, None], None, positions_B[:, None].astype(jnp.int32),
                              None, source_segment_ids_BxLs)
    return m.logits(h_Bx1xD)[:, 0]

  logits, mutated = model.apply({'params': params, 'cache': cache}, method=fn, mutable=['cache'])
  return logits, mutated['cache']


# --------------------------------------------------------------------------------------------------
# Token choice.
# --------------------------------------------------------------------------------------------------
def filter_logits(logits_BxV: jax.Array, temperature: Any = 1.0, top_k: int = 0,
                  top_p: Any = 1.0, use_top_p: Optional[bool] = None) -> jax.Array:
  """Temperature, then top-k, then nucleus (top-p) filtering; removed tokens get -inf.

  `temperature` and `top_p` may be traced values; `top_k` is static, and so is `use_top_p`
  (default: `top_p < 1`, which needs a concrete top_p).
  """
  logits = logits_BxV.astype(jnp.float32) / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if use_top_p is None:
    use_top_p = top_p < 1.0
  if use_top_p:
    sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_BxV, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep = before < top_p  # the most likely token is always kept
    threshold = jnp.min(jnp.where(keep, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def length_penalty_factor(length, alpha):
  """GNMT / t5x brevity penalty ((5 + length) / 6) ** alpha; scores are log-probs divided by it."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _is_stop(tokens, stop_S):
  """Whether each token is one of the stop ids `stop_S` (int array; -1 entries match nothing)."""
  return jnp.any(tokens[..., None] == stop_S, axis=-1)


@dataclasses.dataclass(frozen=True)
class _Options:
  """The static (compile-time) settings of one generate program. The numbers that may change
  between calls without recompiling (temperature, top_p, length penalty, stop ids) are `_Dynamic`.
  """
  cfg: ModelConfig
  strategy: str
  max_new_tokens: int
  top_k: int
  use_top_p: bool
  num_beams: int
  pad_id: int


class _Dynamic(NamedTuple):
  temperature: jax.Array  # float32 []
  top_p: jax.Array  # float32 []
  length_penalty: jax.Array  # float32 []
  stop_ids: jax.Array  # int32 [S], padded with -1


def first_argmax(x_BxV: jax.Array, peak_Bx1: jax.Array) -> jax.Array:
  """`jnp.argmax(x, -1)` (the first maximum) given the row max: the lowest index equal to it.

  Two plain reductions instead of argmax's (value, index) pair reduction: 0.54x its time on
  [32, 50257] logits on XLA CPU (jax 0.10.2), the max included, which decoding needs anyway.
  Rows must be NaN-free.
  """
  v = x_BxV.shape[-1]
  index = jax.lax.broadcasted_iota(jnp.int32, x_BxV.shape, 1)
  return jnp.min(jnp.where(x_BxV == peak_Bx1, index, v), axis=-1).astype(jnp.int32)


def token_log_prob(logits_BxV: jax.Array, peak_Bx1: jax.Array, tok_B: jax.Array) -> jax.Array:
  """`log_softmax(logits)[b, tok[b]]` with the same float operations, without writing [B, V]."""
  log_z_B = jnp.log(jnp.sum(jnp.exp(logits_BxV - peak_Bx1), axis=-1))
  tok_logit_B = jnp.take_along_axis(logits_BxV, tok_B[:, None], axis=-1)[:, 0]
  return (tok_logit_B - peak_Bx1[:, 0]) - log_z_B


def _sample_or_greedy(o: _Options, d: _Dynamic, params, prompt_BxL, lengths_B, rng, source_BxLs,
                      src_seg_BxLs):
  cfg, n = o.cfg, o.max_new_tokens
  b, l = prompt_BxL.shape
  cache = init_cache(cfg, params, b, l + n - 1,
                     0 if source_BxLs is None else source_BxLs.shape[1])
  logits, cache = prefill(cfg, params, cache, prompt_BxL, lengths_B, source_BxLs, src_seg_BxLs)
  greedy = o.strategy == 'greedy'

  def choose(s):
    i = s['i']
    logits_BxV = s['logits'].astype(jnp.float32)
    peak_Bx1 = jnp.max(logits_BxV, axis=-1, keepdims=True)
    if greedy:
      tok_B = first_argmax(logits_BxV, peak_Bx1)
    else:
      filtered = filter_logits(logits_BxV, d.temperature, o.top_k, d.top_p, o.use_top_p)
      tok_B = jax.random.categorical(jax.random.fold_in(rng, i), filtered, axis=-1)
      tok_B = tok_B.astype(jnp.int32)
    done_B = s['finished']
    tok_B = jnp.where(done_B, o.pad_id, tok_B)
    tok_logp_B = token_log_prob(logits_BxV, peak_Bx1, tok_B)
    return dict(
        s, i=i + 1,
        tokens=jax.lax.dynamic_update_slice(s['tokens'], tok_B[:, None], (0, i)),
        scores=s['scores'] + jnp.where(done_B, 0.0, tok_logp_B),
        lengths=s['lengths'] + (~done_B).astype(jnp.int32),
        finished=done_B | _is_stop(tok_B, d.stop_ids))

  def body(s):
    i = s['i']
    last_B = jax.lax.dynamic_slice_in_dim(s['tokens'], i - 1, 1, axis=1)[:, 0]
    logits, new_cache = decode_step(cfg, params, s['cache'], last_B, lengths_B + i - 1,
                                    src_seg_BxLs)
    return choose(dict(s, logits=logits, cache=new_cache))

  def cond(s):
    return (s['i'] < n) & ~jnp.all(s['finished'])

  state = dict(i=jnp.int32(0), logits=logits, cache=cache,
               tokens=jnp.full((b, n), o.pad_id, jnp.int32), scores=jnp.zeros((b,), jnp.float32),
               lengths=jnp.zeros((b,), jnp.int32), finished=jnp.zeros((b,), bool))
  state = jax.lax.while_loop(cond, body, choose(state))
  return dict(tokens=state['tokens'], lengths=state['lengths'], scores=state['scores'],
              steps=state['i'])


# Switches kept for A/B benchmarks (experiments/decode_benchmark).
_TWO_STAGE = True  # beam candidates in two top_k stages (`_beam_candidates`)
# Beams share one cache through row tables (`add_beam_rows`) instead of gathering the cache on
# every step. Attention then scores each query against all J rows of its group (J times the
# attention FLOPs), so wide beams fall back to the gather: on the decode benchmark's model (XLA
# CPU, 2 cores) the tables took 0.88-0.93x the time of the gather at 4 beams x 8 examples, 0.95x
# at 8 x 4, and 1.00x at 16 x 4.
_SHARED_BEAM_CACHE = True
MAX_SHARED_CACHE_BEAMS = 8


TOP_K_CHUNK = 128  # `top_k_and_max`: chunk width of the first pass


def top_k_and_max(x_BxV: jax.Array, m: int, chunk: int = TOP_K_CHUNK):
  """(`jax.lax.top_k(x, m)` values, indices, row max [B, 1]), exactly, ties to the lower index.

  In two passes over a row's chunks of `chunk` entries: the m best entries lie in the m chunks
  with the best maxima (an entry outside them is beaten by those m maxima), so a top_k over the
  chunk maxima (one `reduce_window` pass, which also gives the row max) picks m chunks, and a
  top_k over their m * chunk entries finishes; positions past V read as -inf and, being last,
  lose every tie. For the decode benchmark's [32, 50257] logits and m = 8, 0.28x the time of
  `top_k` plus `max` over V on XLA CPU. Rows of at most m chunks take the plain top_k.
  """
  b, v = x_BxV.shape
  nc = -(-v // chunk)
  if nc <= m:
    return (*jax.lax.top_k(x_BxV, m), jnp.max(x_BxV, axis=-1, keepdims=True))
  chunk_max_BxC = jax.lax.reduce_window(x_BxV, -jnp.inf, jax.lax.max, (1, chunk), (1, chunk),
                                        ((0, 0), (0, nc * chunk - v)))
  peak_Bx1 = jnp.max(chunk_max_BxC, axis=-1, keepdims=True)
  _, best_BxM = jax.lax.top_k(chunk_max_BxC, m)
  best_BxM = jnp.sort(best_BxM, axis=-1)  # candidates in index order: ties still go low
  index_BxMW = (best_BxM[:, :, None] * chunk + jnp.arange(chunk)).reshape(b, m * chunk)
  cand_BxMW = jnp.take_along_axis(x_BxV, index_BxMW, axis=1, mode='fill', fill_value=-jnp.inf)
  top_BxM, pos_BxM = jax.lax.top_k(cand_BxMW, m)
  return top_BxM, jnp.take_along_axis(index_BxMW, pos_BxM, axis=1), peak_Bx1


def _beam_candidates(logits_BKxV, alive_logp_BxK, m: int):
  """The best `m` extensions (log-prob, parent beam, token) of each example's K alive beams.

  Two stages, exact: an example's best m extensions hold at most m of any one beam, and within a
  beam the order of log-probs is the order of its logits (the beam's log-prob and normalizer are
  per-beam constants), so each beam's m best tokens are found from its raw logits ([B*K, V] ->
  [B*K, m]), then the best m of those K * m candidates. Ties go to the lower (beam, token), as one
  top_k over the flattened K * V candidates gives. The log-softmax is computed only at the chosen
  tokens, with the same float operations as jax.nn.log_softmax, so scores are bit-identical; the
  full [B*K, V] log-prob array is never written.
  """
  b, k = alive_logp_BxK.shape
  logits = logits_BKxV.astype(jnp.float32)
  m1 = min(m, logits.shape[-1])  # a beam offers at most V tokens (wide beams, tiny vocabularies)
  top_BKxM, tok_BKxM, peak_BKx1 = top_k_and_max(logits, m1)
  log_z_BKx1 = jnp.log(jnp.sum(jnp.exp(logits - peak_BKx1), axis=-1, keepdims=True))
  logp_BKxM = (top_BKxM - peak_BKx1) - log_z_BKx1
  cand_BxKM = (alive_logp_BxK[:, :, None] + logp_BKxM.reshape(b, k, m1)).reshape(b, k * m1)
  top_logp_BxM, idx_BxM = jax.lax.top_k(cand_BxKM, m)
  parent_BxM = idx_BxM // m1
  tok_BxM = jnp.take_along_axis(tok_BKxM.reshape(b, k * m1), idx_BxM, axis=1).astype(jnp.int32)
  return top_logp_BxM, parent_BxM, tok_BxM


def _beam_search(o: _Options, d: _Dynamic, params, prompt_BxL, lengths_B, source_BxLs,
                 src_seg_BxLs):
  """Beam search with GNMT length penalty; one program for both families.

  Per step, the 2K best extensions of the K alive beams are ranked by log-prob. A candidate that
  ends (a stop token, or the last allowed token) joins the finished set, with score
  log-prob / ((5 + length) / 6) ** alpha, if it ranks among the best K (as Hugging Face: so one beam
  is greedy search); the best K candidates that do not end stay alive. The loop stops when no alive
  beam can still beat the worst of K finished ones (an exact bound: log-probs only fall, and the
  penalty is monotone in length).
  """
  cfg, n, k, alpha = o.cfg, o.max_new_tokens, o.num_beams, d.length_penalty
  b, l = prompt_BxL.shape
  ls = 0 if source_BxLs is None else source_BxLs.shape[1]
  cache = init_cache(cfg, params, b, l + n - 1, ls)
  logits_BxV, cache = prefill(cfg, params, cache, prompt_BxL, lengths_B, source_BxLs, src_seg_BxLs)
  axes = _cache_batch_axes(cfg, params, l + n - 1, ls)
  tile = jnp.repeat(jnp.arange(b), k)  # [B*K]: beam j of example i is row i*K + j
  cache = gather_cache(cache, axes, tile)
  shared = _SHARED_BEAM_CACHE and k <= MAX_SHARED_CACHE_BEAMS
  if shared:
    cache = add_beam_rows(cache, axes, b, k)
  lengths_BK = lengths_B[tile]
  src_seg_BKxLs = None if src_seg_BxLs is None else src_seg_BxLs[tile]
  v = logits_BxV.shape[-1]
  m = min(2 * k, k * v)  # candidates per step
  max_penalty = lambda i: jnp.maximum(length_penalty_factor(i + 2, alpha),
                                      length_penalty_factor(n, alpha))

  def choose(s):
    i = s['i']
    if _TWO_STAGE:
      top_logp_BxM, parent_BxM, tok_BxM = _beam_candidates(s['logits'], s['alive_logp'], m)
    else:
      logp_BxKxV = jax.nn.log_softmax(s['logits'].astype(jnp.float32), axis=-1).reshape(b, k, v)
      cand_BxKV = (s['alive_logp'][:, :, None] + logp_BxKxV).reshape(b, k * v)
      top_logp_BxM, top_idx_BxM = jax.lax.top_k(cand_BxKV, m)
      parent_BxM, tok_BxM = top_idx_BxM // v, (top_idx_BxM % v).astype(jnp.int32)
    seq_BxMxN = jnp.take_along_axis(s['alive_seq'], parent_BxM[:, :, None], axis=1)
    seq_BxMxN = jax.lax.dynamic_update_slice(seq_BxMxN, tok_BxM[:, :, None], (0, 0, i))
    valid_BxM = top_logp_BxM > NEG / 2
    ends_BxM = _is_stop(tok_BxM, d.stop_ids) | (i == n - 1)
    rank_ok = jnp.arange(m)[None, :] < k
    # Finished set: the best K of the old finished and the candidates that end now.
    new_fin_BxM = ends_BxM & valid_BxM & rank_ok
    new_score_BxM = jnp.where(new_fin_BxM, top_logp_BxM / length_penalty_factor(i + 1, alpha),
                              NEG)
    all_score = jnp.concatenate([s['fin_score'], new_score_BxM], axis=1)
    all_seq = jnp.concatenate([s['fin_seq'], seq_BxMxN], axis=1)
    all_flag = jnp.concatenate([s['fin_flag'], new_fin_BxM], axis=1)
    fin_score, fin_idx = jax.lax.top_k(all_score, k)
    fin_seq = jnp.take_along_axis(all_seq, fin_idx[:, :, None], axis=1)
    fin_flag = jnp.take_along_axis(all_flag, fin_idx, axis=1)
    # Alive set: the best K candidates that do not end.
    alive_cand = jnp.where(ends_BxM | ~valid_BxM, NEG, top_logp_BxM)
    alive_logp, alive_idx = jax.lax.top_k(alive_cand, k)
    alive_seq = jnp.take_along_axis(seq_BxMxN, alive_idx[:, :, None], axis=1)
    parent = jnp.take_along_axis(parent_BxM, alive_idx, axis=1)
    last = jnp.take_along_axis(tok_BxM, alive_idx, axis=1)
    # Done: nothing alive, or K finished and no alive beam can reach the worst of them.
    any_alive = alive_logp[:, 0] > NEG / 2
    worst = jnp.min(jnp.where(fin_flag, fin_score, -jnp.inf), axis=1)
    done = ~any_alive | (alive_logp[:, 0] / max_penalty(i) < worst)
    return dict(s, i=i + 1, alive_seq=alive_seq, alive_logp=alive_logp, last=last.reshape(-1),
                cache=(reorder_beam_rows(s['cache'], parent) if shared else gather_cache(
                    s['cache'], axes, (jnp.arange(b)[:, None] * k + parent).reshape(-1))),
                fin_seq=fin_seq, fin_score=fin_score,
                fin_flag=fin_flag, done=jnp.all(done))

  def body(s):
    logits, new_cache = decode_step(cfg, params, s['cache'], s['last'], lengths_BK + s['i'] - 1,
                                    src_seg_BKxLs)
    return choose(dict(s, logits=logits, cache=new_cache))

  def cond(s):
    return (s['i'] < n) & ~s['done']

  state = dict(
      i=jnp.int32(0), logits=jnp.repeat(logits_BxV, k, axis=0), cache=cache,
      last=jnp.zeros((b * k,), jnp.int32),
      alive_seq=jnp.full((b, k, n), o.pad_id, jnp.int32),
      alive_logp=jnp.tile(jnp.asarray([0.0] + [NEG] * (k - 1), jnp.float32), (b, 1)),
      fin_seq=jnp.full((b, k, n), o.pad_id, jnp.int32), fin_score=jnp.full((b, k), NEG),
      fin_flag=jnp.zeros((b, k), bool), done=jnp.bool_(False))
  state = jax.lax.while_loop(cond, body, choose(state))
  seq_BxKxN = state['fin_seq']
  stop_BxKxN = _is_stop(seq_BxKxN, d.stop_ids)
  first_stop = jnp.where(jnp.any(stop_BxKxN, -1), jnp.argmax(stop_BxKxN, -1) + 1, n)
  lengths_BxK = jnp.where(state['fin_flag'], first_stop, 0).astype(jnp.int32)
  return dict(tokens=seq_BxKxN[:, 0], lengths=lengths_BxK[:, 0], scores=state['fin_score'][:, 0],
              beam_tokens=seq_BxKxN, beam_lengths=lengths_BxK, beam_scores=state['fin_score'],
              steps=state['i'])


def decode_layout(cfg: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
  """The config and params to decode with: unrolled layers (`layers_i`), no remat.

  A scanned stack slices every layer's parameters out of the stacked arrays on every decode step
  (a copy per layer per token on XLA CPU); unrolled, the slices are taken once per `generate`
  call, outside the loop: 13-27% less time per call on the decode benchmark
  (`experiments/decode_benchmark`, `--scanned_decode` for the other form), compile time growing
  with depth. Stacks with shared layers (share_layers) stay scanned.
  """
  if cfg.remat_policy != 'none':  # no gradients here: remat would only add optimization barriers
    cfg = cfg.replace(remat_policy='none')
  if cfg.scan_layers and not cfg.share_layers:
    cfg = cfg.replace(scan_layers=False)
    params = convert_layer_params(params, scanned=False)
  return cfg, params


@functools.lru_cache(maxsize=64)
def _compiled(options: _Options, unroll_layers: bool):
  def run(dynamic, params, prompt_BxL, lengths_B, rng, source_BxLs, src_seg_BxLs):
    o = options
    if unroll_layers:
      cfg, params = decode_layout(o.cfg, params)
      o = dataclasses.replace(o, cfg=cfg)
    if o.strategy == 'beam':
      return _beam_search(o, dynamic, params, prompt_BxL, lengths_B, source_BxLs, src_seg_BxLs)
    return _sample_or_greedy(o, dynamic, params, prompt_BxL, lengths_B, rng, source_BxLs,
                             src_seg_BxLs)
  return jax.jit(run)


def _stop_tuple(eos_id: Any) -> tuple[int, ...]:
  if eos_id is None:
    return ()
  if isinstance(eos_id, (int, np.integer)):
    return (int(eos_id),)
  return tuple(int(x) for x in eos_id)


def generate(model_config: Any, params: Any, prompt_ids_BxL: Any = None,
             prompt_lengths_B: Any = None, *, max_new_tokens: int, strategy: str = 'greedy',
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_beams: int = 4,
             length_penalty: float = 0.6, eos_id: Any = tok_lib.EOS_ID,
             bos_id: int = tok_lib.BOS_ID, pad_id: Optional[int] = None,
             rng: Optional[jax.Array] = None, source_ids: Any = None,
             source_segment_ids: Any = None, unroll_layers: bool = True) -> dict[str, jax.Array]:
  """Generates up to `max_new_tokens` tokens after each prompt, in one compiled loop.

  Args:
    model_config: a ModelConfig, a model config section, or a training config with `.model`.
    params: the model parameters (boxed or not).
    prompt_ids_BxL: right-padded prompts (int [B, L]). For an encoder_decoder the decoder prompt;
      None there means [bos_id] for every example.
    prompt_lengths_B: real tokens of each prompt (>= 1); None = L for all.
    max_new_tokens: N, the most tokens generated per sequence (stop tokens included).
    strategy: 'greedy', 'sample' (temperature / top_k / top_p; needs `rng`) or 'beam'.
    temperature: sampling temperature (0 = greedy).
    top_k: sample among the k most likely tokens (0 = all).
    top_p: nucleus sampling: the smallest set of most likely tokens with mass >= top_p (1 = all).
    num_beams: beam width K.
    length_penalty: alpha of ((5 + length) / 6) ** alpha (0 = plain sum of log-probs).
    eos_id: stop token id, a sequence of them, or None (always N tokens).
    bos_id: first decoder token of an encoder_decoder when `prompt_ids_BxL` is None.
    pad_id: id written after a sequence stops (default: the config's pad_id).
    rng: a PRNG key (sampling only).
    source_ids: encoder input (int [B, Ls]) of an encoder_decoder.
    source_segment_ids: 1 real / 0 padding ([B, Ls]); None = `source_ids != pad_id`.
    unroll_layers: decode a scanned model with unrolled layers (`decode_layout`: faster steps,
      longer compile for deep models; the layers are sliced out once per call, so a caller that
      decodes many times may convert once with `decode_layout` and pass that config and those
      params). The results are the same.

  Returns:
    A dict of jax arrays: `tokens` [B, N] (new tokens only; a stop token is included and followed
    by pad_id), `lengths` [B] (new tokens up to and including the stop token), `scores` [B] (sum
    of the model's log-probs of the tokens; beam: that sum divided by the length penalty), `steps`
    (loop iterations run). Beam search also returns `beam_tokens` [B, K, N], `beam_lengths`
    [B, K] and `beam_scores` [B, K], best first.
  """
  cfg = model_config_of(model_config)
  _check_decodable(cfg)
  if strategy not in STRATEGIES:
    raise ValueError(f'strategy={strategy!r}; choose from {", ".join(STRATEGIES)}')
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
  pad_id = cfg.pad_id if pad_id is None else int(pad_id)
  params = nn.meta.unbox(params)
  if cfg.family == 'encoder_decoder':
    if source_ids is None:
      raise ValueError('an encoder_decoder model needs source_ids')
    source_ids = jnp.asarray(source_ids, jnp.int32)
    if source_segment_ids is None:
      source_segment_ids = (source_ids != pad_id).astype(jnp.int32)
    source_segment_ids = jnp.asarray(source_segment_ids, jnp.int32)
    if prompt_ids_BxL is None:
      prompt_ids_BxL = jnp.full((source_ids.shape[0], 1), bos_id, jnp.int32)
  elif source_ids is not None:
    raise ValueError('source_ids is only for encoder_decoder models')
  if prompt_ids_BxL is None:
    raise ValueError('a decoder model needs prompt_ids (start them with BOS, as training does)')
  prompt = jnp.asarray(prompt_ids_BxL, jnp.int32)
  if prompt.ndim != 2:
    raise ValueError(f'prompt_ids must be [batch, length], got shape {prompt.shape}')
  b, l = prompt.shape
  if prompt_lengths_B is None:
    lengths = jnp.full((b,), l, jnp.int32)
  else:
    lengths = jnp.asarray(prompt_lengths_B, jnp.int32)
    host_lengths = np.asarray(jax.device_get(lengths))
    if host_lengths.shape != (b,) or host_lengths.min() < 1 or host_lengths.max() > l:
      raise ValueError(f'prompt_lengths must be [B] in [1, {l}], got {host_lengths}')
  if cfg.position in ('learned', 'sinusoidal'):
    if l + max_new_tokens - 1 > cfg.max_len:
      raise ValueError(f'prompt length {l} + max_new_tokens {max_new_tokens} - 1 exceeds '
                       f'model.max_len={cfg.max_len} (the position table)')
    if source_ids is not None and source_ids.shape[1] > cfg.max_len:
      raise ValueError(f'source length {source_ids.shape[1]} exceeds model.max_len={cfg.max_len}')
  if strategy == 'sample' and rng is None:
    raise ValueError("strategy='sample' needs an explicit PRNG key: rng=jax.random.PRNGKey(seed)")
  if strategy == 'sample' and temperature < 0:
    raise ValueError(f'temperature must be >= 0, got {temperature}')
  if strategy == 'sample' and not 0.0 < top_p <= 1.0:
    raise ValueError(f'top_p must be in (0, 1], got {top_p}')
  if strategy == 'beam' and num_beams < 1:
    raise ValueError(f'num_beams must be >= 1, got {num_beams}')
  if strategy == 'sample' and temperature == 0.0:
    strategy = 'greedy'
  sampling = strategy == 'sample'
  options = _Options(
      cfg=cfg, strategy=strategy, max_new_tokens=int(max_new_tokens),
      top_k=int(top_k) if sampling else 0, use_top_p=sampling and top_p < 1.0,
      num_beams=int(num_beams) if strategy == 'beam' else 1, pad_id=pad_id)
  stop = _stop_tuple(eos_id)
  stop_S = np.full((max(1, len(stop)),), -1, np.int32)  # one compile for "no stop id" and one id
  stop_S[:len(stop)] = stop
  dynamic = _Dynamic(temperature=jnp.float32(temperature if sampling else 1.0),
                     top_p=jnp.float32(top_p if sampling else 1.0),
                     length_penalty=jnp.float32(length_penalty), stop_ids=jnp.asarray(stop_S))
  if rng is None:
    rng = jax.random.PRNGKey(0)
  return _compiled(options, bool(unroll_layers))(dynamic, params, prompt, lengths, rng, source_ids,
                                                 source_segment_ids)


# --------------------------------------------------------------------------------------------------
# Text in, text out.
# --------------------------------------------------------------------------------------------------
def truncate_at_stop(ids: Iterable[int], stop_ids: Sequence[int] = (tok_lib.EOS_ID,)) -> list[int]:
  """The ids before the first stop token."""
  out = []
  for i in ids:
    if int(i) in stop_ids:
      break
    out.append(int(i))
  return out


def generate_texts(config: Any, params: Any, tokenizer: tok_lib.Tokenizer, prompts: Sequence[str],
                   *, max_new_tokens: int = 64, strategy: str = 'greedy',
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   num_beams: int = 4, length_penalty: float = 0.6, seed: int = 0) -> list[str]:
  """Generated texts for a batch of prompts (decoder: continuations; encoder_decoder: outputs).

  A decoder prompt is encoded as training data is, starting with BOS; prompts of different lengths
  are right-padded and decoded together. An encoder_decoder reads each prompt as its source
  (text + EOS) and starts the target with BOS.

  A learned or sinusoidal position table of `max_len` rows bounds what one `generate` call can
  see. A decoder then continues past it with a sliding window: when the context is full, decoding
  restarts from the last max_len // 2 tokens (a fresh cache; the same shapes from the second
  window on, so one more compile). An encoder_decoder output is capped at max_len tokens.
  """
  cfg = model_config_of(config)
  limit = cfg.max_len if cfg.position in ('learned', 'sinusoidal') else None
  encoded = [tokenizer.encode(p) for p in prompts]
  kw = dict(strategy=strategy, temperature=temperature, top_k=top_k, top_p=top_p,
            num_beams=num_beams, length_penalty=length_penalty, eos_id=tokenizer.eos_id,
            bos_id=tokenizer.bos_id, pad_id=tokenizer.pad_id)
  key = jax.random.PRNGKey(seed)
  if cfg.family == 'encoder_decoder':
    n = min(max_new_tokens, limit) if limit else max_new_tokens
    srcs = [(ids[:limit - 1] if limit else ids) + [tokenizer.eos_id] for ids in encoded]
    src = np.full((len(srcs), max(map(len, srcs))), tokenizer.pad_id, np.int32)
    seg = np.zeros_like(src)
    for r, ids in enumerate(srcs):
      src[r, :len(ids)], seg[r, :len(ids)] = ids, 1
    out = generate(cfg, params, None, source_ids=src, source_segment_ids=seg, max_new_tokens=n,
                   rng=key, **kw)
    tokens = np.asarray(out['tokens'])
    return [tokenizer.decode(truncate_at_stop(t, (tokenizer.eos_id,))) for t in tokens]

  texts = [[tokenizer.bos_id] + ids for ids in encoded]
  new: list[list[int]] = [[] for _ in texts]
  done = [False] * len(texts)
  remaining, window = max_new_tokens, 0
  while remaining > 0 and not all(done):
    keep = window or (limit - 1 if limit else None)
    rows = [(t + o)[-keep:] if keep else t + o for t, o in zip(texts, new)]
    width = max(map(len, rows))
    n = min(remaining, limit - width + 1) if limit else remaining
    prompt = np.full((len(rows), width), tokenizer.pad_id, np.int32)
    for r, ids in enumerate(rows):
      prompt[r, :len(ids)] = ids
    out = generate(cfg, params, prompt, [len(r) for r in rows], max_new_tokens=n,
                   rng=jax.random.fold_in(key, max_new_tokens - remaining), **kw)
    for r, toks in enumerate(np.asarray(out['tokens'])):
      if not done[r]:
        kept = truncate_at_stop(toks, (tokenizer.eos_id,))
        new[r].extend(kept)
        done[r] = len(kept) < n
    remaining -= n
    window = max(1, limit // 2) if limit else 0
  return [tokenizer.decode(o) for o in new]


def sample_text(config: Any, params: Any, tokenizer: tok_lib.Tokenizer, prompt: str = '', *,
                max_new_tokens: int = 64, strategy: str = 'sample', temperature: float = 0.8,
                top_k: int = 0, top_p: float = 0.95, num_beams: int = 4,
                length_penalty: float = 0.6, seed: int = 0, include_prompt: bool = True) -> str:
  """One sample for `prompt` (see `generate_texts`); for a decoder, the prompt and its
  continuation unless `include_prompt` is False. For the train loop's periodic samples."""
  cfg = model_config_of(config)
  text = generate_texts(cfg, params, tokenizer, [prompt], max_new_tokens=max_new_tokens,
                        strategy=strategy, temperature=temperature, top_k=top_k, top_p=top_p,
                        num_beams=num_beams, length_penalty=length_penalty, seed=seed)[0]
  if cfg.family == 'decoder' and include_prompt:
    return prompt + text
  return text


# --------------------------------------------------------------------------------------------------
# BLEU.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BleuResult:
  """sacreBLEU corpus BLEU and the strings it was computed on."""
  score: float
  hypotheses: list[str]
  references: list[str]
  sources: list[str]
  signature: str
  details: str  # sacreBLEU's one-line summary (precisions, brevity penalty, lengths)


def _unpack_seq2seq(batch: dict[str, np.ndarray]) -> Iterable[tuple[list[int], list[int]]]:
  """(source ids, reference ids) of every real example of a seq2seq batch, packed or not."""
  enc = np.asarray(batch['encoder_inputs'])
  tgt = np.asarray(batch['decoder_targets'])
  w = np.asarray(batch['weights'])
  enc_seg = np.asarray(batch.get('encoder_segment_ids', (enc != 0).astype(np.int32)))
  dec_seg = batch.get('decoder_segment_ids')
  dec_seg = (w > 0).astype(np.int32) if dec_seg is None else np.asarray(dec_seg)
  for row in range(enc.shape[0]):
    for seg in np.unique(enc_seg[row][enc_seg[row] > 0]):
      sel = (dec_seg[row] == seg) & (w[row] > 0)
      if not sel.any():
        continue
      yield enc[row][enc_seg[row] == seg].tolist(), tgt[row][sel].tolist()


def translate(config: Any, params: Any, sources: Sequence[Sequence[int]], *,
              tokenizer: Optional[tok_lib.Tokenizer] = None, batch_size: int = 32,
              source_len: Optional[int] = None, max_new_tokens: int = 64,
              strategy: str = 'greedy', num_beams: int = 4,
              length_penalty: float = 0.6) -> list[list[int]]:
  """Decodes every source (token ids, EOS included) and returns the new ids before the stop token.

  Batches are padded to `batch_size` rows and `source_len` columns (default: the longest source)
  so that one compiled program serves them all.
  """
  bos = tokenizer.bos_id if tokenizer else tok_lib.BOS_ID
  eos = tokenizer.eos_id if tokenizer else tok_lib.EOS_ID
  pad = tokenizer.pad_id if tokenizer else tok_lib.PAD_ID
  source_len = source_len or max(len(s) for s in sources)
  out: list[list[int]] = []
  for start in range(0, len(sources), batch_size):
    chunk = sources[start:start + batch_size]
    src = np.full((batch_size, source_len), pad, np.int32)
    seg = np.zeros((batch_size, source_len), np.int32)
    for r, s in enumerate(chunk):
      s = list(s)[:source_len]
      src[r, :len(s)] = s
      seg[r, :len(s)] = 1
    seg[len(chunk):, 0] = 1  # filler rows: one token, so that no row is entirely masked
    res = generate(config, params, None, source_ids=src, source_segment_ids=seg,
                   max_new_tokens=max_new_tokens, strategy=strategy, num_beams=num_beams,
                   length_penalty=length_penalty, eos_id=eos, bos_id=bos, pad_id=pad)
    toks = np.asarray(res['tokens'])
    out.extend(truncate_at_stop(toks[r], (eos,)) for r in range(len(chunk)))
  return out


def evaluate_bleu(model_config: Any, params: Any, tokenizer: tok_lib.Tokenizer,
                  batches: Iterable[dict[str, np.ndarray]], *, max_new_tokens: Optional[int] = None,
                  strategy: str = 'greedy', num_beams: int = 4, length_penalty: float = 0.6,
                  batch_size: Optional[int] = None, max_examples: int = 0,
                  tokenize: str = '13a') -> BleuResult:
  """Translates the sources of seq2seq `batches` and scores them with sacreBLEU corpus BLEU.

  `batches` are data-pipeline seq2seq batches (encoder_inputs, encoder_segment_ids,
  decoder_targets, weights; packed rows are split into their examples); the references are the
  decoded `decoder_targets` up to EOS. `max_new_tokens` defaults to the target length of the
  batches; `batch_size` to their batch size.
  """
  import sacrebleu  # pylint: disable=g-import-not-at-top

  cfg = model_config_of(model_config)
  if cfg.family != 'encoder_decoder':
    raise ValueError(f'BLEU needs an encoder_decoder model, not model.family={cfg.family!r}')
  sources, refs = [], []
  target_len = source_len = rows = 0
  for batch in batches:
    rows = rows or np.asarray(batch['encoder_inputs']).shape[0]
    source_len = max(source_len, np.asarray(batch['encoder_inputs']).shape[1])
    target_len = max(target_len, np.asarray(batch['decoder_targets']).shape[1])
    for src, tgt in _unpack_seq2seq(batch):
      sources.append(src)
      refs.append(truncate_at_stop(tgt, (tokenizer.eos_id,)))
      if max_examples and len(sources) >= max_examples:
        break
    if max_examples and len(sources) >= max_examples:
      break
  if not sources:
    raise ValueError('no examples with weight > 0 in the BLEU batches')
  n = max_new_tokens or target_len
  if cfg.position in ('learned', 'sinusoidal'):
    n = min(n, cfg.max_len)
  hyp_ids = translate(cfg, params, sources, tokenizer=tokenizer, batch_size=batch_size or rows,
                      source_len=source_len, max_new_tokens=n, strategy=strategy,
                      num_beams=num_beams, length_penalty=length_penalty)
  hyps = [tokenizer.decode(h) for h in hyp_ids]
  references = [tokenizer.decode(r) for r in refs]
  bleu = sacrebleu.metrics.BLEU(tokenize=tokenize)
  result = bleu.corpus_score(hyps, [references])
  return BleuResult(score=float(result.score), hypotheses=hyps, references=references,
                    sources=[tokenizer.decode(truncate_at_stop(s, (tokenizer.eos_id,)))
                             for s in sources],
                    signature=str(bleu.get_signature()), details=str(result))


def bleu_score(model_config: Any, params: Any, tokenizer: tok_lib.Tokenizer,
               batches: Iterable[dict[str, np.ndarray]], **kw) -> float:
  """sacreBLEU corpus BLEU (0-100) of greedy (or `strategy='beam'`) decoding on `batches`.

  A periodic evaluation for the train loop; keyword arguments as `evaluate_bleu`.
  """
  return evaluate_bleu(model_config, params, tokenizer, batches, **kw).score
