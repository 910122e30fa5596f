r"""Marian (Junczys-Dowmunt et al., 2018; the OPUS-MT models): the paper's post-LN transformer with
sinusoidal positions in the sin-half / cos-half layout, sqrt(d_model) embedding scale, SiLU
("swish") feed-forward, one token table for encoder, decoder and output, and an output bias.
Trained here on Multi30k English -> German.

Variants (after the colon): base (default; alias en_de), tiny (CPU runs and tests):

  python -m flaxformer_lab.main --config=configs/marian.py:tiny --workdir=/tmp/marian_tiny
  python -m flaxformer_lab.summary --config=configs/marian.py:base

Shapes are Hugging Face's Helsinki-NLP/opus-mt-en-de config; the body counts as MarianModel does:
74,410,496, which includes its two frozen 512 x 512 sinusoidal tables (524,288 entries, reported
as `fixed_position_params` by flaxformer_lab.summary: our model computes them).
"""

from flaxformer_lab.presets import common

# Per-variant sizes; everything else is the family's (see get_config).
_EN_DE = dict(d_model=512, num_layers=6, num_decoder_layers=6, num_heads=8, mlp_dim=2048)
VARIANTS = {
    'base': _EN_DE,  # Helsinki-NLP/opus-mt-en-de
    'en_de': _EN_DE,  # the same, by its model name
    # CPU-sized: same switches, small vocab (byte tokenizer; pad 0 like the byte tokenizer's).
    'tiny': dict(vocab_size=512, d_model=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                 mlp_dim=256, max_len=128, pad_id=0),
}


def get_config(arg=None):
  """The training config of `arg` = `variant`."""
  arg = common.parse_arg(arg, variant='base')
  if arg.variant not in VARIANTS:
    raise ValueError(f'unknown marian variant {arg.variant!r}; choose from {", ".join(VARIANTS)}')
  tiny = arg.variant == 'tiny'
  model = common.model_config(
      family='encoder_decoder',  # encoder + causal decoder with cross-attention
      vocab_size=58101,  # opus-mt-en-de's shared SentencePiece vocabulary
      share_encoder_decoder_embeddings=True,  # share_encoder_decoder_embeddings=True
      decoder_num_heads=0,  # decoder_attention_heads (0 = the encoder's; 8 in opus-mt-en-de)
      decoder_mlp_dim=0,  # decoder_ffn_dim (0 = the encoder's encoder_ffn_dim)
      position='sinusoidal',  # fixed sinusoidal table (computed, not stored)
      sinusoidal_layout='concat',  # sines in the first half, cosines in the second
      max_len=512,  # max_position_embeddings
      scale_embedding=True,  # token embeddings * sqrt(d_model)
      embedding_norm=False,  # no LayerNorm on the embeddings
      norm_position='post',  # LayerNorm after each residual add (normalize_before=False)
      final_norm=False,  # no norm after the stacks
      norm_eps=1e-5,  # torch LayerNorm default
      activation='silu',  # activation_function='swish'
      dropout_rate=0.1,  # dropout (activation_dropout: 0, the default)
      attention_dropout_rate=0.0,  # attention_dropout
      tie_embeddings=True,  # lm_head reuses the shared table
      logits_bias=True,  # final_logits_bias (a zero buffer in Hugging Face, learned here)
      head='seq2seq_lm',  # MarianMTModel
      pad_id=58100,  # <pad> (also the decoder start token)
  )
  model.update(VARIANTS[arg.variant])
  c = common.base_config(model)
  c.task = 'seq2seq'  # teacher-forced cross entropy on the target
  c.data.name = 'multi30k'  # image captions, en / de / fr
  c.data.source_lang = 'en'  # translate English ...
  c.data.target_lang = 'de'  # ... into German (the en-de shape)
  c.data.tokenizer = 'byte' if tiny else 'sentencepiece'  # the pretrained one comes with init_from
  c.data.seq_len = 128  # source tokens (captions are short)
  c.data.target_len = 128  # target tokens
  c.optim.name = 'adamw'  # Adam (no weight decay, as Marian)
  c.optim.learning_rate = 3e-4  # Marian's transformer-base rate
  c.optim.schedule = 'rsqrt'  # linear warmup then inverse square root decay (Marian's)
  c.optim.warmup_steps = 100  # 10% of num_steps (Marian: 16k)
  c.optim.b1 = 0.9  # Adam beta1
  c.optim.b2 = 0.98  # Adam beta2
  c.optim.eps = 1e-9  # Adam epsilon
  c.optim.weight_decay = 0.0  # none
  c.optim.grad_clip_norm = 5.0  # Marian's clip-norm
  c.label_smoothing = 0.1  # Marian's transformer recipe
  c.batch_size = 32  # sentence pairs per update
  c.num_steps = 1000  # optimizer updates
  if not tiny:  # sacreBLEU of greedy decoding on the validation split (not on CPU smoke runs)
    c.evals.bleu = common.bleu_eval(c, every=500)
  if tiny:
    c.optim.learning_rate = 1e-3  # a small model from scratch tolerates a large step
    c.optim.warmup_steps = 50  # 10% of num_steps
    c.batch_size = 16  # CPU-sized batch
    c.num_steps = 500  # a few minutes on 2 cores
  return c
