"""The embedded default (`./launch.sh demo`): a small character-level GPT on tiny shakespeare, CPU.

Pre-LN decoder, learned positions, 4 layers x 128 wide, 128-character context. Sized so that the
whole run takes a few minutes on a 2-core machine; see the README for the loss it reaches.
"""

from flaxformer_lab.presets import common


def get_config(arg=None):
  arg = common.parse_arg(arg, steps=1500)
  model = common.model_config(
      family='decoder',  # causal, auto-regressive
      head='lm',  # next-character logits, tied to the input table
      vocab_size=80,  # >= the char tokenizer's ids (65 characters + 7 specials)
      d_model=128, num_heads=4, mlp_dim=512, num_layers=4,
      norm_position='pre',  # GPT-2 placement, final norm after the stack
      position='learned', max_len=128,
      activation='gelu',
      dropout_rate=0.0, attention_dropout_rate=0.0,  # a short run does not overfit 1M characters
  )
  c = common.base_config(model)
  c.task = 'lm'
  c.data.name = 'tiny_shakespeare'
  c.data.tokenizer = 'char'  # one id per character: loss is in nats per character
  c.data.seq_len = 128  # context length
  c.data.eval_batches = 16  # 16 x 32 x 128 = 65k validation characters per evaluation
  c.batch_size = 32  # sequences per update
  c.num_steps = arg.steps  # optimizer updates
  c.optim.learning_rate = 3e-3  # peak
  c.optim.schedule = 'cosine'
  c.optim.warmup_steps = 100
  c.optim.end_lr_fraction = 0.05
  c.optim.weight_decay = 0.1
  c.log_every = 100
  c.eval_every = 500
  c.checkpoint_every = 500
  return c
