"""Sequence-to-sequence cross entropy (encoder_decoder) with label smoothing; token accuracy."""

from __future__ import annotations

from flaxformer_lab.tasks.base import Task, cross_entropy


def model_inputs(batch):
  return dict(input_ids=batch['encoder_inputs'], segment_ids=batch['encoder_segment_ids'],
              positions=batch['encoder_positions'], decoder_input_ids=batch['decoder_inputs'],
              decoder_segment_ids=batch['decoder_segment_ids'],
              decoder_positions=batch['decoder_positions'])


def score(outputs, batch, label_smoothing):
  loss, nll, correct, count = cross_entropy(outputs['logits'], batch['decoder_targets'],
                                            batch['weights'], label_smoothing)
  return dict(loss_sum=loss, loss_count=count, nll_sum=nll, correct_sum=correct)


TASK = Task('seq2seq', model_inputs, score,
            report={'loss': ('loss_sum', 'loss_count'), 'nll': ('nll_sum', 'loss_count'),
                    'token_accuracy': ('correct_sum', 'loss_count')},
            perplexity=True, tokens_key='decoder_segment_ids')
