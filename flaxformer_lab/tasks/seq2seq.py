"""Sequence-to-sequence cross entropy (encoder_decoder) with label smoothing; token accuracy.

Data: a parallel data set; encoder: source + EOS; decoder_inputs: BOS + target; decoder_targets:
target + EOS (pairs packed when data.pack: segment k of the encoder row pairs with segment k of the
decoder row). Batch: encoder_inputs, encoder_segment_ids, encoder_positions [B, Ls];
decoder_inputs, decoder_targets, decoder_segment_ids, decoder_positions, weights [B, Lt].
"""

from __future__ import annotations

import numpy as np

from flaxformer_lab.data import preprocess
from flaxformer_lab.tasks import base


@base.register
class SequenceToSequence(base.Objective):
  name = 'seq2seq'
  families = ('encoder_decoder',)
  heads = ('seq2seq_lm',)
  default_for_heads = ('seq2seq_lm',)
  data_kinds = ('parallel',)
  report = {'loss': ('loss_sum', 'loss_count'), 'nll': ('nll_sum', 'loss_count'),
            'token_accuracy': ('correct_sum', 'loss_count')}
  perplexity = True
  tokens_key = 'decoder_segment_ids'
  encoder_decoder_lengths = True

  def text_fields(self, spec):
    return (spec.source_field, spec.text_field)

  def tokenize(self, ctx, index, example):
    encode = ctx.tokenizer.encode
    return preprocess.seq2seq_example(encode(example[ctx.spec.source_field]),
                                      encode(example[ctx.spec.text_field]), ctx.seq_len,
                                      ctx.target_len, ctx.tokenizer)

  def feature_lengths(self, seq_len, target_len):
    return {'encoder_inputs': seq_len, 'decoder_inputs': target_len,
            'decoder_targets': target_len}

  def finalize(self, batch):
    i32 = lambda x: np.asarray(x, np.int32)
    return {'encoder_inputs': i32(batch['encoder_inputs']),
            'encoder_segment_ids': i32(batch['encoder_inputs_segment_ids']),
            'encoder_positions': i32(batch['encoder_inputs_positions']),
            'decoder_inputs': i32(batch['decoder_inputs']),
            'decoder_targets': i32(batch['decoder_targets']),
            'decoder_segment_ids': i32(batch['decoder_inputs_segment_ids']),
            'decoder_positions': i32(batch['decoder_inputs_positions']),
            'weights': (batch['decoder_targets_segment_ids'] > 0).astype(np.float32)}

  def synthetic_batch(self, config, rng):
    b, l = int(config.batch_size), int(config.data.seq_len)
    lt = self.target_len(config.data)
    tgt = base.random_ids(config, rng, (b, lt + 1))
    return dict(encoder_inputs=base.random_ids(config, rng, (b, l)),
                encoder_segment_ids=np.ones((b, l), np.int32),
                encoder_positions=base.arange_rows(b, l), decoder_inputs=tgt[:, :-1],
                decoder_targets=tgt[:, 1:], decoder_segment_ids=np.ones((b, lt), np.int32),
                decoder_positions=base.arange_rows(b, lt), weights=np.ones((b, lt), np.float32))

  def model_inputs(self, batch):
    return dict(input_ids=batch['encoder_inputs'], segment_ids=batch['encoder_segment_ids'],
                positions=batch['encoder_positions'], decoder_input_ids=batch['decoder_inputs'],
                decoder_segment_ids=batch['decoder_segment_ids'],
                decoder_positions=batch['decoder_positions'])

  def score(self, outputs, batch, label_smoothing):
    loss, nll, correct, count = base.cross_entropy(outputs['logits'], batch['decoder_targets'],
                                                   batch['weights'], label_smoothing)
    return dict(loss_sum=loss, loss_count=count, nll_sum=nll, correct_sum=correct)
