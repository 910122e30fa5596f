r"""T5 v1.0 (Raffel et al., 2020): a pre-RMSNorm encoder-decoder with no biases anywhere, unscaled
attention, a learned relative position bias (computed in the first layer of each stack, shared by
the others), ReLU feed-forward and a tied output scaled by d_model**-0.5. Fine-tuned here for
translation on Multi30k.

Variants (after the colon): small (default), base, tiny (CPU runs and tests):

  python -m flaxformer_lab.main --config=configs/t5.py:tiny --workdir=/tmp/t5_tiny
  python -m flaxformer_lab.summary --config=configs/t5.py:base

Shapes are Hugging Face's t5-small / t5-base configs (T5Config() is t5-small); the body counts as
T5Model does: small 60,506,624, base 222,903,552.
"""

from flaxformer_lab.presets import common

# Per-variant sizes; everything else is the family's (see get_config).
VARIANTS = {
    # t5-small: d_kv = 64 per head.
    'small': dict(d_model=512, num_layers=6, num_decoder_layers=6, num_heads=8, head_dim=64,
                  mlp_dim=2048),
    # t5-base.
    'base': dict(d_model=768, num_layers=12, num_decoder_layers=12, num_heads=12, head_dim=64,
                 mlp_dim=3072),
    # CPU-sized: same switches (the relative bias keeps 32 buckets up to distance 128).
    'tiny': dict(vocab_size=512, d_model=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                 head_dim=16, mlp_dim=256, max_len=128),
}


def get_config(arg=None):
  """The training config of `arg` = `variant`."""
  arg = common.parse_arg(arg, variant='small')
  if arg.variant not in VARIANTS:
    raise ValueError(f'unknown t5 variant {arg.variant!r}; choose from {", ".join(VARIANTS)}')
  tiny = arg.variant == 'tiny'
  model = common.model_config(
      family='encoder_decoder',  # encoder + causal decoder with cross-attention
      vocab_size=32128,  # SentencePiece 32k + 100 sentinels, padded (T5Config.vocab_size)
      share_encoder_decoder_embeddings=True,  # one `shared` token table
      position='relative_bias',  # learned per-head bias by bucketed relative offset
      relative_num_buckets=32,  # relative_attention_num_buckets
      relative_max_distance=128,  # relative_attention_max_distance
      relative_bias_shared=True,  # computed in the first layer of each stack, reused by all
      max_len=512,  # longest sequence the data pipeline should produce (no position table)
      norm_position='pre',  # norm at the start of each residual branch
      final_norm=True,  # final_layer_norm after each stack
      norm_type='rmsnorm',  # T5LayerNorm: scale only, no mean subtraction, no bias
      norm_use_bias=False,  # no norm bias
      norm_eps=1e-6,  # layer_norm_epsilon
      attention_scale=False,  # no 1/sqrt(d_kv) (folded into the initialization)
      qkv_bias=False,  # no biases anywhere
      out_bias=False,  # no biases anywhere
      mlp_bias=False,  # no biases anywhere
      activation='relu',  # feed_forward_proj='relu' (v1.0; v1.1 uses gated GELU)
      dropout_rate=0.1,  # dropout_rate
      attention_dropout_rate=0.1,  # T5 applies dropout_rate to the attention weights too
      tie_embeddings=True,  # lm_head = shared (v1.0)
      logits_scale_tied=True,  # decoder output * d_model**-0.5 before the tied projection
      logits_bias=False,  # no output bias
      head='seq2seq_lm',  # T5ForConditionalGeneration
      pad_id=0,  # <pad> (also the decoder start token)
  )
  model.update(VARIANTS[arg.variant])
  c = common.base_config(model)
  c.task = 'seq2seq'  # teacher-forced cross entropy on the target
  c.data.name = 'multi30k'  # image captions, en / de / fr
  c.data.source_lang = 'de'  # translate German ...
  c.data.target_lang = 'en'  # ... into English
  c.data.tokenizer = 'byte' if tiny else 'sentencepiece'  # the pretrained one comes with init_from
  c.data.seq_len = 128  # source tokens (captions are short)
  c.data.target_len = 128  # target tokens
  c.optim.name = 'adafactor'  # T5's optimizer
  c.optim.learning_rate = 1e-3  # T5's constant fine-tuning rate
  c.optim.schedule = 'constant'  # no decay
  c.optim.warmup_steps = 0  # none (a constant rate from step 0)
  c.optim.weight_decay = 0.0  # none
  c.optim.grad_clip_norm = 0.0  # Adafactor clips its own update
  c.label_smoothing = 0.0  # T5 uses none
  c.batch_size = 32  # sentence pairs per update
  c.num_steps = 1000  # optimizer updates
  if not tiny:  # sacreBLEU of greedy decoding on the validation split (not on CPU smoke runs)
    c.evals.bleu = common.bleu_eval(c, every=500)
  if tiny:
    c.optim.learning_rate = 3e-3  # a small model from scratch tolerates a large step
    c.batch_size = 16  # CPU-sized batch
    c.num_steps = 500  # a few minutes on 2 cores
  return c
