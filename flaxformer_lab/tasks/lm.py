"""Causal language modelling (decoder-only): predict token t+1 from tokens <= t."""

from __future__ import annotations

from flaxformer_lab.tasks.base import Task, cross_entropy


def model_inputs(batch):
  return dict(input_ids=batch['inputs'], segment_ids=batch['segment_ids'],
              positions=batch['positions'])


def score(outputs, batch, label_smoothing):
  loss, nll, correct, count = cross_entropy(outputs['logits'], batch['targets'], batch['weights'],
                                            label_smoothing)
  return dict(loss_sum=loss, loss_count=count, nll_sum=nll, correct_sum=correct)


TASK = Task('lm', model_inputs, score,
            report={'loss': ('loss_sum', 'loss_count'), 'nll': ('nll_sum', 'loss_count'),
                    'accuracy': ('correct_sum', 'loss_count')},
            perplexity=True, tokens_key='segment_ids')
