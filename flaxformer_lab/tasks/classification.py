"""Sequence classification fine-tuning (encoder or decoder): cross entropy on the label; accuracy.

Data: a labelled data set, [CLS] ids [SEP], one example per row (never packed).
Batch: inputs, segment_ids, positions, token_type_ids [B, L]; label [B]; weights [B] (1 for a real
row, 0 for a padding row of a final eval batch).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from flaxformer_lab.data import preprocess
from flaxformer_lab.models.config import ConfigError
from flaxformer_lab.tasks import base


@base.register
class Classification(base.Objective):
  name = 'classification'
  families = ('encoder', 'decoder')
  heads = ('classification',)
  default_for_heads = ('classification',)
  data_kinds = ('labelled',)
  report = {'loss': ('loss_sum', 'loss_count'), 'accuracy': ('correct_sum', 'loss_count')}

  def check_bundle(self, config, bundle):
    if bundle.num_classes != config.model.num_labels:
      raise ConfigError(f'{config.data.name} has {bundle.num_classes} classes but '
                        f'model.num_labels={config.model.num_labels}: set '
                        f'--config.model.num_labels={bundle.num_classes}')

  def tokenize(self, ctx, index, example):
    ids = ctx.tokenizer.encode(example[ctx.spec.text_field])
    return preprocess.classification_example(ids, example[ctx.spec.label_field], ctx.seq_len,
                                             ctx.tokenizer)

  def packable(self, data_config):
    return False

  def feature_lengths(self, seq_len, target_len):
    return {'inputs': seq_len}

  def finalize(self, batch):
    segment_ids = np.asarray(batch['inputs_segment_ids'], np.int32)
    return {'inputs': np.asarray(batch['inputs'], np.int32), 'segment_ids': segment_ids,
            'positions': np.asarray(batch['inputs_positions'], np.int32),
            'token_type_ids': np.zeros_like(segment_ids),
            'label': np.asarray(batch['label'], np.int32),
            'weights': (segment_ids[:, 0] > 0).astype(np.float32)}

  def synthetic_batch(self, config, rng):
    b, l = int(config.batch_size), int(config.data.seq_len)
    return dict(inputs=base.random_ids(config, rng, (b, l)), segment_ids=np.ones((b, l), np.int32),
                positions=base.arange_rows(b, l), token_type_ids=np.zeros((b, l), np.int32),
                label=rng.integers(0, int(config.model.num_labels), size=(b,)).astype(np.int32),
                weights=np.ones((b,), np.float32))

  def model_inputs(self, batch):
    return dict(input_ids=batch['inputs'], segment_ids=batch['segment_ids'],
                positions=batch['positions'], token_type_ids=batch['token_type_ids'])

  def score(self, outputs, batch, label_smoothing):
    weights = batch.get('weights', jnp.ones(batch['label'].shape, jnp.float32))
    loss, nll, correct, count = base.cross_entropy(outputs['logits'][:, None],
                                                   batch['label'][:, None], weights[:, None],
                                                   label_smoothing)
    return dict(loss_sum=loss, loss_count=count, nll_sum=nll, correct_sum=correct)
