r"""GPT-2 (Radford et al., 2019): a pre-LN causal decoder with learned positions, a fused QKV
projection, tanh-GELU and a final LayerNorm, trained as a language model (tied output, no bias).

Variants (after the colon): small (default), medium, tiny (CPU runs and tests):

  python -m flaxformer_lab.main --config=configs/gpt2.py:tiny --workdir=/tmp/gpt2_tiny
  python -m flaxformer_lab.summary --config=configs/gpt2.py:medium

Shapes are Hugging Face's GPT2Config (gpt2, gpt2-medium); the body counts as GPT2Model does:
small 124,439,808, medium 354,823,168.
"""

from flaxformer_lab.presets import common

# Per-variant sizes; everything else is the family's (see get_config).
VARIANTS = {
    'small': dict(d_model=768, num_layers=12, num_heads=12, mlp_dim=3072),  # gpt2
    'medium': dict(d_model=1024, num_layers=24, num_heads=16, mlp_dim=4096),  # gpt2-medium
    # CPU-sized: same switches, small vocab (byte tokenizer) and a 128-row position table.
    'tiny': dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, mlp_dim=256, max_len=128),
}


def get_config(arg=None):
  """The training config of `arg` = `variant`."""
  arg = common.parse_arg(arg, variant='small')
  if arg.variant not in VARIANTS:
    raise ValueError(f'unknown gpt2 variant {arg.variant!r}; choose from {", ".join(VARIANTS)}')
  tiny = arg.variant == 'tiny'
  model = common.model_config(
      family='decoder',  # causal decoder only
      vocab_size=50257,  # byte-level BPE (GPT2Config.vocab_size)
      position='learned',  # absolute learned position table (wpe)
      max_len=1024,  # n_positions
      norm_position='pre',  # LayerNorm at the start of each residual branch (ln_1, ln_2)
      final_norm=True,  # ln_f after the stack
      norm_eps=1e-5,  # layer_norm_epsilon
      fused_qkv=True,  # one c_attn projection for q, k and v
      qkv_bias=True,  # c_attn has a bias
      out_bias=True,  # c_proj has a bias
      mlp_bias=True,  # c_fc / c_proj have biases
      activation='gelu_tanh',  # activation_function='gelu_new'
      dropout_rate=0.1,  # embd_pdrop = resid_pdrop
      attention_dropout_rate=0.1,  # attn_pdrop
      tie_embeddings=True,  # lm_head reuses wte
      logits_bias=False,  # lm_head has no bias
      head='lm',  # GPT2LMHeadModel
      pad_id=0,  # GPT-2 has no pad token; padding is masked through segment ids anyway
  )
  model.update(VARIANTS[arg.variant])
  c = common.base_config(model)
  c.task = 'lm'  # next-token prediction
  c.data.name = 'tiny_shakespeare'  # about 1 MB of Shakespeare
  c.data.tokenizer = 'byte' if tiny else 'sentencepiece'  # a pretrained BPE comes with init_from
  c.data.seq_len = 1024  # the full context
  c.data.pack = True  # concatenate documents into full rows
  c.optim.name = 'adamw'  # Adam with decoupled weight decay
  c.optim.learning_rate = 6e-4 if arg.variant == 'small' else 3e-4  # GPT-3 paper's rates by size
  c.optim.schedule = 'cosine'  # warmup then cosine decay
  c.optim.warmup_steps = 100  # 10% of num_steps
  c.optim.end_lr_fraction = 0.1  # decay to 10% of the peak
  c.optim.b1 = 0.9  # Adam beta1
  c.optim.b2 = 0.95  # Adam beta2 (GPT-3 / nanoGPT)
  c.optim.eps = 1e-8  # Adam epsilon
  c.optim.weight_decay = 0.1  # on matrices only (the decay mask skips norms and biases)
  c.optim.grad_clip_norm = 1.0  # clip by global norm
  c.batch_size = 16  # sequences per update
  c.num_steps = 1000  # optimizer updates
  if tiny:
    c.data.seq_len = 128  # fits the 128-row position table
    c.optim.learning_rate = 3e-3  # a small model from scratch tolerates a large step
    c.optim.warmup_steps = 50  # 10% of num_steps
    c.num_steps = 500  # a few minutes on 2 cores
    c.evals.samples = common.samples_eval(every=250)  # print a sample twice per run
  return c
