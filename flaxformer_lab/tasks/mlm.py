"""Masked language modelling (BERT): loss on the selected positions, plus NSP/SOP when present."""

from __future__ import annotations

import jax.numpy as jnp

from flaxformer_lab.tasks.base import Task, cross_entropy


def model_inputs(batch):
  return dict(input_ids=batch['inputs'], segment_ids=batch['segment_ids'],
              positions=batch['positions'], token_type_ids=batch['token_type_ids'])


def score(outputs, batch, label_smoothing):
  loss, nll, correct, count = cross_entropy(outputs['logits'], batch['targets'], batch['weights'],
                                            label_smoothing)
  sums = dict(mlm_loss_sum=loss, loss_count=count, nll_sum=nll, correct_sum=correct,
              loss_sum=loss)
  if 'pair_label' in batch and 'pair_logits' in outputs:
    w = batch.get('pair_weights', jnp.ones(batch['pair_label'].shape, jnp.float32))
    p_loss, _, p_correct, p_count = cross_entropy(outputs['pair_logits'][:, None],
                                                  batch['pair_label'][:, None], w[:, None])
    # The pair loss is a per-example mean added to the per-token mean (BERT's total loss).
    sums.update(pair_loss_sum=p_loss, pair_count=p_count, pair_correct_sum=p_correct)
    sums['loss_sum'] = loss + p_loss * count / jnp.maximum(p_count, 1.0)
  return sums


TASK = Task('mlm', model_inputs, score,
            report={'loss': ('loss_sum', 'loss_count'), 'mlm_loss': ('mlm_loss_sum', 'loss_count'),
                    'mlm_accuracy': ('correct_sum', 'loss_count'),
                    'pair_loss': ('pair_loss_sum', 'pair_count'),
                    'pair_accuracy': ('pair_correct_sum', 'pair_count')},
            tokens_key='segment_ids')
