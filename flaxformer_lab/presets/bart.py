r"""BART (Lewis et al., 2020): a post-LN encoder-decoder with learned positions offset by 2, a
LayerNorm on the embeddings of each stack, GELU and tied embeddings, fine-tuned here for
translation on Multi30k.

Variants (after the colon): base (default), tiny (CPU runs and tests):

  python -m flaxformer_lab.main --config=configs/bart.py:tiny --workdir=/tmp/bart_tiny
  python -m flaxformer_lab.summary --config=configs/bart.py:base

Shapes are Hugging Face's facebook/bart-base config; the body counts as BartModel does:
139,420,416 (each stack has its own 1,026-row position table).
"""

from flaxformer_lab.presets import common

# Per-variant sizes; everything else is the family's (see get_config).
VARIANTS = {
    'base': dict(d_model=768, num_layers=6, num_decoder_layers=6, num_heads=12,
                 mlp_dim=3072),  # facebook/bart-base
    # CPU-sized: same switches; 128 positions + the offset of 2 = a 130-row table.
    'tiny': dict(vocab_size=512, d_model=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                 mlp_dim=256, max_len=130),
}


def get_config(arg=None):
  """The training config of `arg` = `variant`."""
  arg = common.parse_arg(arg, variant='base')
  if arg.variant not in VARIANTS:
    raise ValueError(f'unknown bart variant {arg.variant!r}; choose from {", ".join(VARIANTS)}')
  tiny = arg.variant == 'tiny'
  model = common.model_config(
      family='encoder_decoder',  # encoder + causal decoder with cross-attention
      vocab_size=50265,  # GPT-2 byte-level BPE + fairseq specials
      share_encoder_decoder_embeddings=True,  # one `shared` token table
      decoder_num_heads=0,  # decoder_attention_heads (0 = the encoder's; 12 in bart-base)
      decoder_mlp_dim=0,  # decoder_ffn_dim (0 = the encoder's encoder_ffn_dim)
      position='learned',  # a learned table per stack
      max_len=1026,  # max_position_embeddings 1024 + the offset of 2
      position_offset=2,  # BartLearnedPositionalEmbedding's offset (ids = index + 2)
      positions_from_padding=False,  # positions are plain indices, pads included
      scale_embedding=False,  # scale_embedding=False
      embedding_norm=True,  # layernorm_embedding in each stack
      norm_position='post',  # LayerNorm after each residual add
      final_norm=False,  # bart-base has no final layer norm
      norm_eps=1e-5,  # torch LayerNorm default
      activation='gelu',  # activation_function='gelu' (exact)
      dropout_rate=0.1,  # dropout
      activation_dropout_rate=0.1,  # activation_dropout
      attention_dropout_rate=0.1,  # attention_dropout
      tie_embeddings=True,  # lm_head reuses the shared table
      logits_bias=True,  # final_logits_bias (a zero buffer in Hugging Face, learned here)
      head='seq2seq_lm',  # BartForConditionalGeneration
      pad_id=1,  # <pad>
  )
  model.update(VARIANTS[arg.variant])
  c = common.base_config(model)
  c.task = 'seq2seq'  # teacher-forced cross entropy on the target
  c.data.name = 'multi30k'  # image captions, en / de / fr
  c.data.source_lang = 'de'  # translate German ...
  c.data.target_lang = 'en'  # ... into English
  c.data.tokenizer = 'byte' if tiny else 'sentencepiece'  # a pretrained BPE comes with init_from
  c.data.seq_len = 128  # source tokens (captions are short)
  c.data.target_len = 128  # target tokens
  c.optim.name = 'adamw'  # Adam with decoupled weight decay
  c.optim.learning_rate = 5e-5  # fine-tuning rate of the released BART recipes (3e-5 .. 5e-5)
  c.optim.schedule = 'linear'  # warmup then linear decay (fairseq polynomial_decay)
  c.optim.warmup_steps = 100  # 10% of num_steps
  c.optim.b1 = 0.9  # Adam beta1
  c.optim.b2 = 0.999  # Adam beta2 (the released fine-tuning recipes)
  c.optim.eps = 1e-8  # Adam epsilon
  c.optim.weight_decay = 0.01  # the released fine-tuning recipes
  c.optim.grad_clip_norm = 0.1  # clip-norm of the released fine-tuning recipes
  c.label_smoothing = 0.1  # the released fine-tuning recipes
  c.batch_size = 32  # sentence pairs per update
  c.num_steps = 1000  # optimizer updates
  if not tiny:  # sacreBLEU of greedy decoding on the validation split (not on CPU smoke runs)
    c.evals.bleu = common.bleu_eval(c, every=500)
  if tiny:
    c.optim.learning_rate = 1e-3  # a small model from scratch tolerates a large step
    c.optim.warmup_steps = 50  # 10% of num_steps
    c.optim.grad_clip_norm = 1.0  # looser clip from scratch
    c.batch_size = 16  # CPU-sized batch
    c.num_steps = 500  # a few minutes on 2 cores
  return c
