r"""Pre-LN vs post-LN vs DeepNorm: does post-LN need learning-rate warmup, and does DeepNorm fix it?

Claims under test: Xiong et al. 2020 ("On Layer Normalization in the Transformer Architecture"):
post-LN needs warmup, pre-LN trains without it, and post-LN's gradients at initialization grow
toward the output layer; Wang et al. 2022 ("DeepNet"): DeepNorm makes deep post-LN trainable.

Character-level decoders on tiny shakespeare (d_model 64, 4 heads, 32-character context, batch 16),
Adam(W) with beta2 = 0.999 (the papers' slow second-moment estimate), gradient clipping OFF (the
levers that make warmup matter), cosine decay after a linear warmup of 0 / short / long steps.

  python -m flaxformer_lab.sweep --sweep=experiments/prepost_ln/config.py --workdir=workdirs/prepost_ln
  python -m flaxformer_lab.sweep --sweep=experiments/prepost_ln/config.py --workdir=workdirs/prepost_ln --summarize

Variants (after the colon): default (72 runs, under an hour on 2 CPU cores), levers (24 runs: the
6-layer lr 3e-3 corner x clipping {off, 1.0} x beta2 {0.999, 0.98}), smoke (3 tiny runs, used by the
tests), gpu (a larger grid for an accelerator); key=value pairs override the sizes,
e.g. `:steps=600` or `:smoke,steps=40`.
"""

from flaxformer_lab.presets import common
from flaxformer_lab.sweeps import product

# Per-variant settings: model width, depths, steps, warmups, peak learning rates, seeds, batch.
VARIANTS = {
    'default': dict(d_model=64, depths=(6, 18), steps=200, warmups=(0, 20, 100),
                    lrs=(3e-3, 1e-2), seeds=(0, 1), seq_len=32, batch=16, eval_every=100),
    'smoke': dict(d_model=32, depths=(2,), steps=12, warmups=(0,), lrs=(3e-3,), seeds=(0,),
                  seq_len=32, batch=8, eval_every=6),
    # the default grid's 6-layer, lr 3e-3 corner with the two optimizer levers swept too
    'levers': dict(d_model=64, depths=(6,), steps=200, warmups=(0, 100), lrs=(3e-3,), seeds=(0,),
                   seq_len=32, batch=16, eval_every=100),
    'gpu': dict(d_model=256, depths=(6, 18, 48), steps=3000, warmups=(0, 300, 1500),
                lrs=(1e-3, 3e-3, 1e-2), seeds=(0, 1, 2), seq_len=256, batch=64, eval_every=500),
}


def _arg(arg):
  a = common.parse_arg(arg, variant='default', steps=0, b2=0.999, clip=0.0)
  if a.variant not in VARIANTS:
    raise ValueError(f'unknown variant {a.variant!r}; choose from {", ".join(VARIANTS)}')
  v = dict(VARIANTS[a.variant])
  if a.steps:
    v['steps'] = a.steps
  return a, v


def get_config(arg=None):
  """The base run: one char-level decoder; the sweep sets placement, depth, warmup, lr, seed."""
  a, v = _arg(arg)
  model = common.model_config(
      family='decoder', head='lm',
      vocab_size=80,  # >= the char tokenizer's ids (65 characters + specials)
      d_model=v['d_model'], num_heads=4, mlp_dim=4 * v['d_model'], num_layers=v['depths'][0],
      norm_position='post',  # swept
      position='learned', max_len=v['seq_len'],
      activation='gelu',
      dropout_rate=0.0, attention_dropout_rate=0.0,  # short runs: no regularization needed
  )
  c = common.base_config(model)
  c.task = 'lm'
  c.data.name = 'tiny_shakespeare'
  c.data.tokenizer = 'char'  # losses in nats per character
  c.data.seq_len = v['seq_len']
  c.data.eval_batches = 4  # 4 x batch x seq_len validation characters per evaluation
  c.batch_size = v['batch']
  c.num_steps = v['steps']
  c.optim.name = 'adamw'
  c.optim.learning_rate = v['lrs'][0]  # swept
  c.optim.schedule = 'cosine'  # linear warmup (swept length), cosine decay to 10%
  c.optim.warmup_steps = v['warmups'][0]  # swept
  c.optim.end_lr_fraction = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = a.b2  # 0.999: Adam's second moment adapts slowly, the warmup papers' setting
  c.optim.weight_decay = 0.01
  c.optim.grad_clip_norm = a.clip  # 0 = off: clipping at 1.0 hides the no-warmup instability
  c.log_every = 10
  c.eval_every = v['eval_every']
  c.checkpoint_every = v['eval_every']
  c.keep_checkpoints = 1
  c.progress = 'lines'
  return c


def get_sweep(arg=None):
  """{pre, post, deepnorm} x depths x peak lrs x warmups x seeds (slowest to fastest); the
  `levers` variant adds gradient clipping {off, 1.0} x Adam beta2 {0.999, 0.98}."""
  a, v = _arg(arg)
  levers = [{}]
  if a.variant == 'levers':
    levers = product({'optim.grad_clip_norm': [0.0, 1.0]}, {'optim.b2': [0.999, 0.98]})
  return product(
      {'model.norm_position': ['pre', 'post', 'deepnorm']},
      {'model.num_layers': list(v['depths'])},
      {'optim.learning_rate': list(v['lrs'])},
      {'optim.warmup_steps': list(v['warmups'])},
      levers,
      {'seed': list(v['seeds'])},
  )


def get_plots(arg=None):
  a, _ = _arg(arg)
  if a.variant == 'levers':
    return {'x': 'optim.warmup_steps', 'color': 'model.norm_position',
            'style': 'optim.warmup_steps', 'panels': ['optim.grad_clip_norm', 'optim.b2']}
  return {'x': 'optim.warmup_steps', 'color': 'model.norm_position', 'style': 'optim.warmup_steps',
          'panels': ['model.num_layers', 'optim.learning_rate']}
