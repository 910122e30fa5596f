r"""Does our own pre-training help? SST-2 fine-tuned from a `bert:pretrain_tiny` run vs the same
encoder trained from scratch for the same steps.

  # 1. pre-train (BERT's recipe, CPU-sized: WordPiece, static masks, NSP, on the Austen novels)
  python -m flaxformer_lab.main --config=configs/bert.py:pretrain_tiny --config.num_steps=2000 \
      --config.optim.warmup_steps=200 --workdir=workdirs/finetune/pretrain
  # 2. fine-tune from it and from scratch (3 seeds each), then the table
  python -m flaxformer_lab.sweep --sweep=experiments/finetune_from_pretraining/config.py:pretrained=workdirs/finetune/pretrain \
      --workdir=workdirs/finetune/sweep
  python -m flaxformer_lab.sweep --sweep=experiments/finetune_from_pretraining/config.py:pretrained=workdirs/finetune/pretrain \
      --workdir=workdirs/finetune/sweep --summarize

All arms have the pre-training run's body (the `pretrain_tiny` shapes, vocab 2,000) and BERT's
fine-tuning head on the pooler; the fine-tuned arm reads SST-2 with the pre-training run's
WordPiece tokenizer (init_from carries it); one scratch arm trains the same kind of tokenizer on
SST-2's own training text, the other reuses the pre-training run's (`data.tokenizer_from`). Evaluated on SST-2's test split (872 sentences = GLUE's dev set).
Arguments (after the colon): pretrained=<run dir> (required), steps=500, seeds=3, lr=1e-3.
"""

from flaxformer_lab.presets import bert
from flaxformer_lab.presets import common
from flaxformer_lab.sweeps import product
from flaxformer_lab.sweeps import zipped


def _arg(arg):
  a = common.parse_arg(arg, pretrained='', steps=500, seeds=3, lr=1e-3)
  if not a.pretrained:
    raise ValueError('pass the pre-training run: --sweep=...config.py:pretrained=<run dir>')
  return a


def get_config(arg=None):
  a = _arg(arg)
  c = bert.get_config('tiny,task=classification')  # SST-2, post-LN tiny BERT, batch 16
  pre = bert.get_config('pretrain_tiny')
  body = pre.model.to_dict()
  body.update(head='classification', num_labels=2)  # fresh head on the pooler
  c.model = common.model_config(**body)
  c.data.tokenizer = pre.data.tokenizer  # wordpiece (the fine-tuned arm: the run's own)
  c.data.tokenizer_vocab_size = pre.data.tokenizer_vocab_size  # 2,000 ids
  c.data.eval_split = 'test'  # the accuracy papers report (GLUE's SST-2 dev set)
  c.data.eval_batches = 0  # the whole split
  c.num_steps = a.steps
  c.optim.learning_rate = a.lr  # peak (the tiny preset's 1e-3; BERT fine-tunes at 2e-5..5e-5)
  c.optim.warmup_steps = max(1, a.steps // 10)  # 10% of the steps
  c.eval_every = max(1, a.steps // 5)
  c.checkpoint_every = a.steps
  c.keep_checkpoints = 1
  c.log_every = 50
  c.progress = 'lines'
  return c


def get_sweep(arg=None):
  """Three arms x seeds: fine-tuned from the pre-trained run; from scratch with its own SST-2
  tokenizer; from scratch with the pre-trained run's tokenizer (separates weights from vocabulary)."""
  a = _arg(arg)
  arms = zipped({'init_from': [a.pretrained, '', ''],
                 'data.tokenizer_from': ['', '', a.pretrained]})
  return product(arms, {'seed': list(range(a.seeds))})


def get_plots(arg=None):
  del arg
  return {'x': 'step', 'color': 'init_from'}
