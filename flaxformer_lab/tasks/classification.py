"""Sequence classification fine-tuning (encoder): cross entropy on the label; accuracy."""

from __future__ import annotations

import jax.numpy as jnp

from flaxformer_lab.tasks.base import Task, cross_entropy


def model_inputs(batch):
  return dict(input_ids=batch['inputs'], segment_ids=batch['segment_ids'],
              positions=batch['positions'], token_type_ids=batch['token_type_ids'])


def score(outputs, batch, label_smoothing):
  weights = batch.get('weights', jnp.ones(batch['label'].shape, jnp.float32))
  loss, nll, correct, count = cross_entropy(outputs['logits'][:, None], batch['label'][:, None],
                                            weights[:, None], label_smoothing)
  return dict(loss_sum=loss, loss_count=count, nll_sum=nll, correct_sum=correct)


TASK = Task('classification', model_inputs, score,
            report={'loss': ('loss_sum', 'loss_count'), 'accuracy': ('correct_sum', 'loss_count')},
            tokens_key='segment_ids')
