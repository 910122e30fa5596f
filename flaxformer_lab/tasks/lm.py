"""Causal language modelling (decoder-only): predict token t+1 from tokens <= t.

Data: documents become [BOS] ids -> ids [EOS] segments of at most seq_len tokens (packed when
data.pack); a stream data set (tiny_shakespeare, synthetic_lm) is cut into fixed windows instead.
Batch: inputs, targets, segment_ids, positions [B, L]; weights [B, L].
"""

from __future__ import annotations

import numpy as np

from flaxformer_lab.data import preprocess
from flaxformer_lab.tasks import base


@base.register
class LanguageModelling(base.Objective):
  name = 'lm'
  families = ('decoder',)
  heads = ('lm',)
  default_for_heads = ('lm',)
  data_kinds = ('stream', 'text', 'parallel', 'labelled')
  report = {'loss': ('loss_sum', 'loss_count'), 'nll': ('nll_sum', 'loss_count'),
            'accuracy': ('correct_sum', 'loss_count')}
  perplexity = True
  fans_out = True

  def windows(self, spec):
    return spec.kind == 'stream'

  def tokenize(self, ctx, index, example):
    ids = ctx.tokenizer.encode(example[ctx.spec.text_field])
    return preprocess.lm_document(ids, ctx.seq_len, ctx.tokenizer)

  def feature_lengths(self, seq_len, target_len):
    return {'inputs': seq_len, 'targets': seq_len}

  def finalize(self, batch):
    i32 = lambda x: np.asarray(x, np.int32)
    return {'inputs': i32(batch['inputs']), 'targets': i32(batch['targets']),
            'segment_ids': i32(batch['inputs_segment_ids']),
            'positions': i32(batch['inputs_positions']),
            'weights': (batch['targets_segment_ids'] > 0).astype(np.float32)}

  def synthetic_batch(self, config, rng):
    b, l = int(config.batch_size), int(config.data.seq_len)
    tokens = base.random_ids(config, rng, (b, l + 1))
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=np.ones((b, l), np.int32),
                positions=base.arange_rows(b, l), weights=np.ones((b, l), np.float32))

  def model_inputs(self, batch):
    return dict(input_ids=batch['inputs'], segment_ids=batch['segment_ids'],
                positions=batch['positions'])

  def score(self, outputs, batch, label_smoothing):
    loss, nll, correct, count = base.cross_entropy(outputs['logits'], batch['targets'],
                                                   batch['weights'], label_smoothing)
    return dict(loss_sum=loss, loss_count=count, nll_sum=nll, correct_sum=correct)
