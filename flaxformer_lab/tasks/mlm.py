"""Masked language modelling (BERT, RoBERTa, ALBERT): loss on the selected positions, plus NSP/SOP.

Inputs (data.mlm_inputs): `doc_sentences` -- a document (a stream data set's paragraph, a text
data set's example) is split into sentences grouped into chunks of at most seq_len - 2 tokens
([CLS] chunk [SEP]); with data.mlm_pairs a chunk becomes a sentence pair [CLS] A [SEP] B [SEP]
(token types 0 / 1) labelled for next-sentence (nsp: B replaced by text of another document with
probability 1/2, label 1) or sentence-order (sop: A and B, consecutive, swapped with probability
1/2, label 1) prediction. `full_sentences` (RoBERTa) -- the sentences of consecutive documents
packed into full rows, crossing document boundaries with an extra [SEP] (no pairs, no packing).

Masking: data.mlm_probability of the ordinary tokens, at most data.max_predictions_per_seq
(BERT's cap; 0 = none), 80% [MASK], 10% random, 10% kept; data.mlm_max_ngram > 1 selects
ALBERT's n-gram spans (p(n) ~ 1/n). data.mlm_masking: `dynamic` -- a new mask (and pair) every
time an example is read (RoBERTa); `static` -- fixed per example, seeded by its document and
chunk index, one of data.mlm_dupe_factor fixed masks drawn per read (BERT's data, dupe_factor).

Batch: inputs, targets, weights, segment_ids, positions, token_type_ids [B, L]; with pairs also
pair_label [B] and pair_weights [B]; with a cap and unpacked rows also BERT's gathered form
masked_lm_positions / masked_lm_ids / masked_lm_weights [B, P = max_predictions_per_seq], which
the model's MLM head then scores alone ([B, P, V] logits instead of [B, L, V]).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from flaxformer_lab.data import preprocess
from flaxformer_lab.data import tokenizers as tok_lib
from flaxformer_lab.models.config import ConfigError
from flaxformer_lab.tasks import base


class _LazyMap:
  """`fn` over a sequence, computed on access and remembered."""

  def __init__(self, items, fn):
    self._items, self._fn, self._cache = items, fn, {}

  def __len__(self):
    return len(self._items)

  def __getitem__(self, i):
    if i not in self._cache:
      self._cache[i] = self._fn(self._items[i])
    return self._cache[i]


@base.register
class MaskedLanguageModelling(base.Objective):
  name = 'mlm'
  families = ('encoder',)
  heads = ('mlm', 'mlm_nsp')
  default_for_heads = ('mlm', 'mlm_nsp')
  data_kinds = ('stream', 'text', 'parallel', 'labelled')
  report = {'loss': ('loss_sum', 'loss_count'), 'mlm_loss': ('mlm_loss_sum', 'loss_count'),
            'mlm_accuracy': ('correct_sum', 'loss_count'),
            'pair_loss': ('pair_loss_sum', 'pair_count'),
            'pair_accuracy': ('pair_correct_sum', 'pair_count')}
  fans_out = True
  # Whether the batch may carry BERT's gathered masked positions (the model then scores only
  # those); an objective that needs every position's logits (distillation) turns it off.
  gathers_predictions = True
  MASKINGS = ('dynamic', 'static')
  INPUTS = ('doc_sentences', 'full_sentences')

  # --- config ----------------------------------------------------------------------------------

  def validate(self, config, model_cfg):
    super().validate(config, model_cfg)
    d = config.data
    if d.mlm_pairs not in ('', 'nsp', 'sop'):
      raise ConfigError(f"config.data.mlm_pairs must be '', 'nsp' or 'sop', got {d.mlm_pairs!r}")
    if not 0.0 < float(d.mlm_probability) < 1.0:
      raise ConfigError(f'config.data.mlm_probability={d.mlm_probability} must be in (0, 1)')
    o = _options(d)
    if o['mlm_masking'] not in self.MASKINGS:
      raise ConfigError(f"config.data.mlm_masking must be 'dynamic' or 'static', got "
                        f"{o['mlm_masking']!r}")
    if o['mlm_inputs'] not in self.INPUTS:
      raise ConfigError(f"config.data.mlm_inputs must be 'doc_sentences' or 'full_sentences', "
                        f"got {o['mlm_inputs']!r}")
    if o['mlm_inputs'] == 'full_sentences' and d.mlm_pairs:
      raise ConfigError("config.data.mlm_inputs='full_sentences' has no sentence pairs: set "
                        "config.data.mlm_pairs=''")
    for key, low in (('max_predictions_per_seq', 0), ('mlm_dupe_factor', 1), ('mlm_max_ngram', 1)):
      if int(o[key]) < low:
        raise ConfigError(f'config.data.{key}={o[key]} must be >= {low}')
    trained = ('sentencepiece', *tok_lib.HF_KINDS)
    if d.tokenizer in trained and tok_lib.trained_vocab_size(d) > model_cfg.vocab_size:
      raise ConfigError(f'config.data.tokenizer_vocab_size={tok_lib.trained_vocab_size(d)} (the '
                        f'{d.tokenizer} tokenizer) exceeds config.model.vocab_size='
                        f'{model_cfg.vocab_size}')
    if int(o['max_predictions_per_seq']) > int(d.seq_len):
      raise ConfigError(f"config.data.max_predictions_per_seq={o['max_predictions_per_seq']} "
                        f'exceeds config.data.seq_len={d.seq_len}')

  def adapt_config(self, config, model_cfg):
    if model_cfg.head != 'mlm_nsp':
      config.data.mlm_pairs = ''  # no pair head to train

  # --- data ------------------------------------------------------------------------------------

  def check_data(self, data_config, kind):
    super().check_data(data_config, kind)
    if data_config.mlm_pairs not in ('', 'nsp', 'sop'):
      raise ValueError(f"config.data.mlm_pairs must be '', 'nsp' or 'sop', got "
                       f'{data_config.mlm_pairs!r}')

  @staticmethod
  def _pairs(data_config) -> bool:
    return bool(data_config.mlm_pairs)

  def documents(self, source, split):
    return base.paragraph_documents(source, split)

  def read_documents(self, ctx, source, split):
    """full_sentences: the split's rows (chunk dicts), packed across documents up front."""
    docs = self.documents(source, split)
    if _options(ctx.data_config)['mlm_inputs'] != 'full_sentences':
      return docs
    return preprocess.full_sentences((self.sentence_ids(ctx, ex) for ex in docs),
                                     ctx.seq_len - 2, ctx.tokenizer.sep_id)

  def sentence_ids(self, ctx, example):
    """The tokenized sentences of a document."""
    sentences = preprocess.split_sentences(example[ctx.spec.text_field])
    return [ids for ids in map(ctx.tokenizer.encode, sentences) if ids]

  def tokenize(self, ctx, index, example):
    if _options(ctx.data_config)['mlm_inputs'] == 'full_sentences':
      return [example]  # already a row (read_documents)
    pairs = self._pairs(ctx.data_config)
    budget = ctx.seq_len - (3 if pairs else 2)
    chunks = preprocess.mlm_chunks(self.sentence_ids(ctx, example), budget, index)
    return [c for c in chunks if len(c['tokens']) >= 2] if pairs else chunks

  def random_transform(self, ctx, documents):
    sentence_docs = _LazyMap(documents, functools.partial(self.sentence_ids, ctx))
    return functools.partial(self._mask, ctx, sentence_docs)

  def _mask(self, ctx, docs, chunk, rng):
    """A chunk -> a masked example (with a sentence pair when mlm_pairs is on)."""
    cfg, tok, o = ctx.data_config, ctx.tokenizer, _options(ctx.data_config)
    # grain's shuffled, repeated map hands `tokenize` the index of the read (epoch * N + i):
    # the document is that index modulo the number of documents.
    chunk = {**chunk, 'doc': np.int32(int(chunk['doc']) % len(docs))}
    if o['mlm_masking'] == 'static':  # the example's own draws: one of dupe_factor fixed ones
      dupe = int(rng.integers(int(o['mlm_dupe_factor'])))
      rng = np.random.default_rng([int(cfg.shuffle_seed), int(chunk['doc']),
                                   int(chunk.get('chunk', 0)), dupe])
    if self._pairs(cfg):
      example = preprocess.mlm_pair(chunk, rng, cfg.mlm_pairs,
                                    functools.partial(_random_segment, docs=docs, tok=tok), tok)
    else:
      example = preprocess.mlm_single(chunk, tok)
    cap = int(o['max_predictions_per_seq'])
    masked = preprocess.mask_tokens(example['inputs'], rng, probability=cfg.mlm_probability,
                                    tok=tok, max_predictions=cap,
                                    max_ngram=int(o['mlm_max_ngram']))
    out = {**example, **masked}
    if self._gathered(cfg):
      out.update(preprocess.gathered_predictions(masked, cap))
    return out

  def packable(self, data_config):
    return (bool(data_config.pack) and not self._pairs(data_config)
            and _options(data_config)['mlm_inputs'] != 'full_sentences')

  def _gathered(self, data_config) -> bool:
    """Whether rows carry BERT's gathered form: a cap, one example per row, an objective that
    scores only the masked positions."""
    return (self.gathers_predictions and int(_options(data_config)['max_predictions_per_seq']) > 0
            and not self.packable(data_config))

  def feature_lengths(self, seq_len, target_len):
    return {'inputs': seq_len, 'targets': seq_len, 'weights': seq_len, 'token_type_ids': seq_len}

  def pad_values(self, tokenizer):
    return {k: 0 if k in ('weights', 'token_type_ids') else tokenizer.pad_id
            for k in self.feature_lengths(1, 1)}

  def finalize(self, batch):
    i32 = lambda x: np.asarray(x, np.int32)
    out = {'inputs': i32(batch['inputs']), 'targets': i32(batch['targets']),
           'weights': np.asarray(batch['weights'], np.float32),
           'segment_ids': i32(batch['inputs_segment_ids']),
           'positions': i32(batch['inputs_positions']),
           'token_type_ids': i32(batch['token_type_ids'])}
    if 'pair_label' in batch:
      out['pair_label'] = i32(batch['pair_label'])
      out['pair_weights'] = (out['segment_ids'][:, 0] > 0).astype(np.float32)
    if 'masked_lm_positions' in batch:
      out['masked_lm_positions'] = i32(batch['masked_lm_positions'])
      out['masked_lm_ids'] = i32(batch['masked_lm_ids'])
      out['masked_lm_weights'] = np.asarray(batch['masked_lm_weights'], np.float32)
    return out

  def num_predictions(self, config) -> int:
    """Scored positions per row of a full sequence: data.max_predictions_per_seq when set, else
    ceil(mlm_probability * seq_len) (BERT's choice of max_predictions_per_seq)."""
    cap = int(_options(config.data)['max_predictions_per_seq'])
    return cap or max(1, int(np.ceil(float(config.data.mlm_probability) *
                                     int(config.data.seq_len))))

  def synthetic_batch(self, config, rng):
    """`num_predictions` random distinct masked positions per row, given both as full-length
    targets/weights and in BERT's gathered form (masked_lm_positions / _ids / _weights, [B, P])."""
    b, l, m = int(config.batch_size), int(config.data.seq_len), config.model
    p = self.num_predictions(config)
    masked = np.sort(np.stack([rng.choice(l, p, replace=False) for _ in range(b)]), axis=1)
    masked = masked.astype(np.int32)
    originals = base.random_ids(config, rng, (b, l))
    inputs = originals.copy()
    rows = np.arange(b)[:, None]
    inputs[rows, masked] = 4  # a stand-in [MASK] id
    weights = np.zeros((b, l), np.float32)
    weights[rows, masked] = 1.0
    types = np.zeros((b, l), np.int32)
    if int(m.get('type_vocab_size', 0)) > 1:
      types[:, l // 2:] = 1
    batch = dict(inputs=inputs, targets=originals, weights=weights,
                 segment_ids=np.ones((b, l), np.int32), positions=base.arange_rows(b, l),
                 token_type_ids=types, masked_lm_positions=masked,
                 masked_lm_ids=originals[rows, masked],
                 masked_lm_weights=np.ones((b, p), np.float32))
    if m.head == 'mlm_nsp' and config.data.mlm_pairs:
      batch['pair_label'] = rng.integers(0, 2, size=(b,)).astype(np.int32)
      batch['pair_weights'] = np.ones((b,), np.float32)
    return batch

  # --- model and loss --------------------------------------------------------------------------

  def model_inputs(self, batch):
    inputs = dict(input_ids=batch['inputs'], segment_ids=batch['segment_ids'],
                  positions=batch['positions'], token_type_ids=batch['token_type_ids'])
    if self._scores_gathered(batch):
      inputs['masked_positions'] = batch['masked_lm_positions']  # logits [B, P, V]
    return inputs

  def _scores_gathered(self, batch) -> bool:
    """Whether the model scores only the gathered positions: the run's config asks for them (a
    cap on unpacked rows) and the batch has them (benchmarks' synthetic batches always do)."""
    return ('masked_lm_positions' in batch and self.config is not None
            and self._gathered(self.config.data))

  def score(self, outputs, batch, label_smoothing):
    if self._scores_gathered(batch):
      targets, weights = batch['masked_lm_ids'], batch['masked_lm_weights']  # [B, P]
    else:
      targets, weights = batch['targets'], batch['weights']  # [B, L]
    loss, nll, correct, count = base.cross_entropy(outputs['logits'], targets, weights,
                                                   label_smoothing)
    sums = dict(mlm_loss_sum=loss, loss_count=count, nll_sum=nll, correct_sum=correct,
                loss_sum=loss)
    if 'pair_label' in batch and 'pair_logits' in outputs:
      w = batch.get('pair_weights', jnp.ones(batch['pair_label'].shape, jnp.float32))
      p_loss, _, p_correct, p_count = base.cross_entropy(outputs['pair_logits'][:, None],
                                                         batch['pair_label'][:, None], w[:, None])
      # The pair loss is a per-example mean added to the per-token mean (BERT's total loss).
      sums.update(pair_loss_sum=p_loss, pair_count=p_count, pair_correct_sum=p_correct)
      sums['loss_sum'] = loss + p_loss * count / jnp.maximum(p_count, 1.0)
    return sums


def _options(data_config) -> dict:
  """The masking/input settings, with their defaults for configs written before they existed."""
  defaults = dict(max_predictions_per_seq=0, mlm_masking='dynamic', mlm_dupe_factor=1,
                  mlm_max_ngram=1, mlm_inputs='doc_sentences')
  return {k: data_config.get(k, v) for k, v in defaults.items()}


def _random_segment(rng: np.random.Generator, max_len: int, doc: int, docs, tok) -> np.ndarray:
  """Up to max_len tokens of consecutive sentences of a random document other than `doc`."""
  for _ in range(10):
    j = int(rng.integers(len(docs) - 1)) if len(docs) > 1 else 0
    j += int(len(docs) > 1 and j >= doc)
    sentences = docs[j]
    if sentences:
      start = int(rng.integers(len(sentences)))
      tokens = [t for s in sentences[start:] for t in s][:max_len]
      return np.asarray(tokens, np.int32)
  return preprocess.random_ordinary_ids(rng, max_len, tok)
