r"""T5 v1.0 (Raffel et al., 2020): a pre-RMSNorm encoder-decoder with no biases anywhere, unscaled
attention, a learned relative position bias (computed in the first layer of each stack, shared by
the others), ReLU feed-forward and a tied output scaled by d_model**-0.5. Fine-tuned here for
translation on Multi30k.

Variants (after the colon): small (default), base, tiny (CPU runs and tests) fine-tune on
translation; pretrain (the paper's baseline: t5-base shapes, span corruption, 2^19 steps of 128
x 512 tokens) and pretrain_tiny (CPU-sized, a few minutes) pre-train with span corruption
(flaxformer_lab/tasks/span_corruption.py) on the Austen novels:

  python -m flaxformer_lab.main --config=configs/t5.py:tiny --workdir=/tmp/t5_tiny
  python -m flaxformer_lab.main --config=configs/t5.py:pretrain_tiny --workdir=/tmp/t5_pt
  python -m flaxformer_lab.summary --config=configs/t5.py:base

Shapes are Hugging Face's t5-small / t5-base configs (T5Config() is t5-small); the body counts as
T5Model does: small 60,506,624, base 222,903,552.

T5's Adafactor scales each step by the parameter's RMS, which assumes T5's initialization
(model.init_scheme='t5': token table std 1, kernels std fan_in^-0.5). With the library's default
init (std 0.02 everywhere) a step of lr 3e-3 moved a weight by 6e-5 and `tiny` went from 6.22 to
6.09 in 100 steps; with T5's init it reaches 2.69 (2.36 at lr 1e-2; AdamW on the 0.02 init: 3.19).
Measured on 2 shared cores with (numbers for every variant of the question in the README)
  python -m flaxformer_lab.main --config=configs/t5.py:tiny --workdir=/tmp/t5 \
      --config.num_steps=100 --config.log_every=10 --config.eval_every=100 \
      [--config.model.init_scheme=normal] [--config.optim.learning_rate=3e-3]
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
VARIANTS['pretrain'] = VARIANTS['base']  # the paper's baseline model
VARIANTS['pretrain_tiny'] = VARIANTS['tiny']  # 512 ids: 263 byte-tokenizer ids + 249 sentinels


def get_config(arg=None):
  """The training config of `arg` = `variant`."""
  arg = common.parse_arg(arg, variant='small')
  if arg.variant not in VARIANTS:
    raise ValueError(f'unknown t5 variant {arg.variant!r}; choose from {", ".join(VARIANTS)}')
  tiny = arg.variant in ('tiny', 'pretrain_tiny')
  pretrain = arg.variant.startswith('pretrain')
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
      activation_dropout_rate=0.1,  # and to the feed-forward hidden units (T5DenseActDense)
      tie_embeddings=True,  # lm_head = shared (v1.0)
      logits_scale_tied=True,  # decoder output * d_model**-0.5 before the tied projection
      logits_bias=False,  # no output bias
      head='seq2seq_lm',  # T5ForConditionalGeneration
      pad_id=0,  # <pad> (also the decoder start token)
      init_scheme='t5',  # Mesh TensorFlow T5's fan-in scaled init (what Adafactor's steps assume)
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
  c.optim.adafactor_param_scale = True  # steps relative to each parameter's RMS (T5's Adafactor)
  c.label_smoothing = 0.0  # T5 uses none
  c.batch_size = 32  # sentence pairs per update
  c.num_steps = 1000  # optimizer updates
  if not tiny and not pretrain:  # sacreBLEU of greedy decoding (not on CPU smoke runs)
    c.evals.bleu = common.bleu_eval(c, every=500)
  if tiny:
    c.optim.learning_rate = 1e-2  # from scratch: T5's pre-training rate 1/sqrt(10^4)
    c.batch_size = 16  # CPU-sized batch
    c.num_steps = 500  # a few minutes on 2 cores
  if pretrain:
    _pretrain(c, tiny)
  return c


def _pretrain(c, tiny):
  """Span corruption (section 3.1.4 of the paper) on the Austen novels."""
  c.task = 'span_corruption'  # noise spans -> sentinels; the decoder writes the spans
  c.data.name = 'austen'  # English prose, one paragraph per document (the paper: C4)
  c.data.noise_density = 0.15  # 15% of the tokens are noise
  c.data.mean_noise_span_length = 3.0  # spans of 3 tokens on average
  c.data.seq_len = 512  # inputs: 568 raw tokens corrupt to 512
  c.data.target_len = 0  # targets: their length follows (114)
  c.data.pack = True  # several pieces per row (the paper packs examples)
  c.data.sp_vocab_size = 32000  # SentencePiece 32k; ids 32000..32127 are free for the sentinels
  c.batch_size = 128  # 128 x 512 = 2^16 tokens per batch
  c.num_steps = 2**19  # 524,288 updates
  # The paper's rate 1/sqrt(max(step, 10^4)): 0.01, decaying as 1/sqrt(step) after 10^4 steps
  # (the 'rsqrt' schedule reaches 0.01 by a linear warmup over those steps instead of holding it).
  c.optim.learning_rate = 0.01
  c.optim.schedule = 'rsqrt'
  c.optim.warmup_steps = 10_000
  c.eval_every = 5000  # steps between evaluations
  c.checkpoint_every = 5000  # steps between checkpoints
  if tiny:
    c.data.seq_len = 128  # 141 raw tokens -> 128 inputs, 29 targets
    c.batch_size = 16  # CPU-sized batch
    c.num_steps = 300  # a few minutes on 2 cores
    c.optim.learning_rate = 1e-2  # constant, as tiny
    c.optim.schedule = 'constant'
    c.optim.warmup_steps = 0
    c.eval_every = 100
    c.checkpoint_every = 100
    c.data.eval_batches = 4
