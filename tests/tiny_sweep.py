"""A tiny sweep for tests/test_sweep.py: one-layer char-level decoders on tiny shakespeare.

Variants: default (4 runs: pre/post x seed 0/1), pair (2 runs), failing (a run that fails, one
that diverges, one that finishes), badkey (an override that names no config key).
"""

from flaxformer_lab.presets import common
from flaxformer_lab.sweeps import axis, product, zipped


def get_config(arg=None):
  del arg
  model = common.model_config(family='decoder', head='lm', vocab_size=80, d_model=32, num_heads=2,
                              mlp_dim=64, num_layers=1, max_len=16, dropout_rate=0.0,
                              attention_dropout_rate=0.0)
  c = common.base_config(model)
  c.data.name = 'tiny_shakespeare'
  c.data.tokenizer = 'char'
  c.data.seq_len = 16
  c.data.eval_batches = 1
  c.batch_size = 4
  c.num_steps = 300
  c.log_every = 50
  c.eval_every = 0  # at the end only
  c.checkpoint_every = 50
  c.keep_checkpoints = 2
  c.optim.warmup_steps = 10
  c.progress = 'lines'
  return c


def get_sweep(arg=None):
  if arg == 'pair':
    return axis('model.norm_position', ['pre', 'deepnorm'])
  if arg == 'failing':
    return [{'model.num_heads': 3},  # 32 is not divisible by 3: the run exits 2
            {'optim.learning_rate': 1e30},  # finite but huge: a non-finite loss, exit 3, diverged
            {'model.norm_position': 'pre'}]
  if arg == 'badkey':
    return zipped({'model.norm_position': ['pre', 'post'], 'optim.lerning_rate': [1e-3, 1e-2]})
  return product({'model.norm_position': ['pre', 'post']}, {'seed': [0, 1]})
