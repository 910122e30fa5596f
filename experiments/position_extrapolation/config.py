r"""Position schemes and length extrapolation: train at length L, evaluate at L, 2L and 4L.

Claim under test: Press et al. 2022 ("Train Short, Test Long", ALiBi), Figure 1: sinusoidal
positions (and learned ones, which cannot go past their table at all) blow up past the training
length; RoPE degrades; the T5 relative bias extrapolates better; ALiBi extrapolates (its perplexity
stays flat or improves with a longer context).

Character-level decoders on tiny shakespeare, one per `model.position`: learned, sinusoidal, rope,
alibi, relative_bias (T5 bias), none. Each trains at `data.seq_len = L` and ends with three
`metrics` evaluations of the validation split at L, 2L and 4L (`config.evals.len_<l>`, prefix
`eval_len<l>`), the evaluator's `seq_len` switch: the split is re-cut into non-overlapping windows
of that length, so every length scores the same target characters, each once (the whole split by
default; `eval_tokens` > 0 keeps its first eval_tokens targets).

The table extension: `model.max_len = 4L` for every run. Learned positions then have a 4L-row
table of which only the first L rows are ever trained (rows L..4L-1 keep their N(0, 0.02) init);
sinusoidal ones have a fixed 4L-row table. The other schemes have no table. The T5 bias uses
`model.relative_max_distance = L/2` so that its last (log-spaced) bucket, which holds every longer
distance, is trained; with T5's 128 at L = 64 the buckets for distances 64-127 would never be.

  python -m flaxformer_lab.sweep --sweep=experiments/position_extrapolation/config.py \
      --workdir=workdirs/position_extrapolation --parallel=2
  python experiments/position_extrapolation/analyze.py workdirs/position_extrapolation

Variants (after the colon): default (6 runs, L = 64, sized for 2 CPU cores), smoke (6 tiny runs
of seconds each, used by the tests), gpu (L = 256, a larger model, for an accelerator); key=value
pairs override sizes: `:steps=300`, `:smoke,steps=4`, `:eval_tokens=16384`.
"""

from flaxformer_lab.presets import common
from flaxformer_lab.sweeps import product

SCHEMES = ('learned', 'sinusoidal', 'rope', 'alibi', 'relative_bias', 'none')
FACTORS = (1, 2, 4)  # evaluation lengths, in multiples of the training length L

# Per-variant settings: model size, training length L, batch, steps, peak lr, eval tokens (0 = the
# whole validation split, else the first eval_tokens targets at every length).
VARIANTS = {
    'default': dict(d_model=64, num_layers=3, num_heads=4, seq_len=64, batch=32, steps=800,
                    lr=3e-3, warmup=50, eval_tokens=0, eval_every=200),
    'smoke': dict(d_model=32, num_layers=1, num_heads=2, seq_len=16, batch=8, steps=6,
                  lr=3e-3, warmup=0, eval_tokens=1024, eval_every=3),
    'gpu': dict(d_model=384, num_layers=6, num_heads=6, seq_len=256, batch=64, steps=5000,
                lr=1e-3, warmup=200, eval_tokens=0, eval_every=1000),
}


def _arg(arg):
  a = common.parse_arg(arg, variant='default', steps=0, eval_tokens=-1, seed=0)
  if a.variant not in VARIANTS:
    raise ValueError(f'unknown variant {a.variant!r}; choose from {", ".join(VARIANTS)}')
  v = dict(VARIANTS[a.variant])
  if a.steps:
    v['steps'] = a.steps
  if a.eval_tokens >= 0:
    v['eval_tokens'] = a.eval_tokens
  return a, v


def eval_lengths(arg=None) -> list[int]:
  """The evaluation lengths L, 2L, 4L of a variant."""
  _, v = _arg(arg)
  return [f * v['seq_len'] for f in FACTORS]


def eval_prefix(length: int) -> str:
  return f'eval_len{length}'


def get_config(arg=None):
  """The base run: a char-level pre-LN decoder; the sweep sets model.position."""
  a, v = _arg(arg)
  L, B = v['seq_len'], v['batch']
  model = common.model_config(
      family='decoder', head='lm',
      vocab_size=80,  # >= the char tokenizer's ids (65 characters + specials)
      d_model=v['d_model'], num_heads=v['num_heads'], mlp_dim=4 * v['d_model'],
      num_layers=v['num_layers'],
      norm_position='pre',
      position='learned',  # swept
      max_len=4 * L,  # the table extension: rows L..4L-1 of a learned table are never trained
      # T5 bias: L/2 puts every offset >= ~L/2 (all the longer ones too) in the last bucket, which
      # training reaches; it must exceed the 16 exact buckets (causal, 32 buckets): a max_distance
      # of 16 gives NaN buckets for offsets >= 16 (log(16/16) = 0 in the bucket formula)
      relative_max_distance=max(L // 2, 32),
      activation='gelu',
      dropout_rate=0.0, attention_dropout_rate=0.0,
  )
  c = common.base_config(model)
  c.task = 'lm'
  c.seed = a.seed
  c.data.name = 'tiny_shakespeare'
  c.data.tokenizer = 'char'  # losses in nats per character
  c.data.seq_len = L
  c.data.eval_batches = 4  # the periodic `eval` at L (training curve): 4 x batch x L characters
  c.batch_size = B
  c.num_steps = v['steps']
  c.optim.name = 'adamw'
  c.optim.learning_rate = v['lr']
  c.optim.schedule = 'cosine'
  c.optim.warmup_steps = v['warmup']
  c.optim.end_lr_fraction = 0.1
  c.optim.weight_decay = 0.01
  c.optim.grad_clip_norm = 1.0
  c.log_every = max(v['steps'] // 20, 1)
  c.eval_every = v['eval_every']
  c.checkpoint_every = v['steps']
  c.keep_checkpoints = 1
  c.progress = 'lines'
  with c.unlocked():
    for length in eval_lengths(arg):
      # the same eval_tokens targets at every length: max_batches windows of `length` each
      tokens = v['eval_tokens']
      if tokens and tokens % (B * length):
        raise ValueError(f'eval_tokens={tokens} must be a multiple of batch x 4L = '
                         f'{B * FACTORS[-1] * L}')
      c.evals[f'len_{length}'] = common.metrics_eval(
          c, every=0, split='validation', seq_len=length, prefix=eval_prefix(length),
          max_batches=tokens // (B * length))  # 0 = the whole split
  return c


def get_sweep(arg=None):
  """One run per position scheme."""
  _arg(arg)
  return product({'model.position': list(SCHEMES)})


def get_plots(arg=None):
  del arg
  return {'color': 'model.position'}  # loss curves coloured by scheme
