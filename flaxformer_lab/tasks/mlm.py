"""Masked language modelling (BERT): loss on the selected positions, plus NSP/SOP when present.

Data: documents (a stream data set's paragraphs) are split into sentences and grouped into chunks
of at most seq_len - 2 tokens ([CLS] chunk [SEP]); with data.mlm_pairs a chunk becomes a sentence
pair [CLS] A [SEP] B [SEP] labelled for next-sentence (nsp) or sentence-order (sop) prediction.
Masking is dynamic: a new mask every time an example is read (80% [MASK], 10% random, 10% kept).
Batch: inputs, targets, weights, segment_ids, positions, token_type_ids [B, L]; with pairs also
pair_label [B] and pair_weights [B].
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from flaxformer_lab.data import preprocess
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

  # --- config ----------------------------------------------------------------------------------

  def validate(self, config, model_cfg):
    super().validate(config, model_cfg)
    d = config.data
    if d.mlm_pairs not in ('', 'nsp', 'sop'):
      raise ConfigError(f"config.data.mlm_pairs must be '', 'nsp' or 'sop', got {d.mlm_pairs!r}")
    if not 0.0 < float(d.mlm_probability) < 1.0:
      raise ConfigError(f'config.data.mlm_probability={d.mlm_probability} must be in (0, 1)')

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
    examples = source.split(split)
    if source.spec.kind == 'stream':  # paragraphs of the stream
      return [{'text': p} for ex in examples for p in ex['text'].split('\n\n') if p.strip()]
    return examples

  def sentence_ids(self, ctx, example):
    """The tokenized sentences of a document."""
    sentences = preprocess.split_sentences(example[ctx.spec.text_field])
    return [ids for ids in map(ctx.tokenizer.encode, sentences) if ids]

  def tokenize(self, ctx, index, example):
    pairs = self._pairs(ctx.data_config)
    budget = ctx.seq_len - (3 if pairs else 2)
    chunks = preprocess.mlm_chunks(self.sentence_ids(ctx, example), budget, index)
    return [c for c in chunks if len(c['tokens']) >= 2] if pairs else chunks

  def random_transform(self, ctx, documents):
    sentence_docs = _LazyMap(documents, functools.partial(self.sentence_ids, ctx))
    return functools.partial(self._mask, ctx, sentence_docs)

  def _mask(self, ctx, docs, chunk, rng):
    """A chunk -> a masked example (with a sentence pair when mlm_pairs is on)."""
    cfg, tok = ctx.data_config, ctx.tokenizer
    if self._pairs(cfg):
      example = preprocess.mlm_pair(chunk, rng, cfg.mlm_pairs,
                                    functools.partial(_random_segment, docs=docs, tok=tok), tok)
    else:
      example = preprocess.mlm_single(chunk, tok)
    masked = preprocess.mask_tokens(example['inputs'], rng, probability=cfg.mlm_probability,
                                    tok=tok)
    return {**example, **masked}

  def packable(self, data_config):
    return bool(data_config.pack) and not self._pairs(data_config)

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
    return out

  def num_predictions(self, config) -> int:
    """Scored positions per row of a full sequence: ceil(mlm_probability * seq_len) (BERT's
    max_predictions_per_seq)."""
    return max(1, int(np.ceil(float(config.data.mlm_probability) * int(config.data.seq_len))))

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
    return dict(input_ids=batch['inputs'], segment_ids=batch['segment_ids'],
                positions=batch['positions'], token_type_ids=batch['token_type_ids'])

  def score(self, outputs, batch, label_smoothing):
    loss, nll, correct, count = base.cross_entropy(outputs['logits'], batch['targets'],
                                                   batch['weights'], label_smoothing)
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
