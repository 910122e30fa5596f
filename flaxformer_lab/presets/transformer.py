r"""The Transformer of Vaswani et al. (2017), "Attention Is All You Need": post-LN encoder-decoder,
interleaved sinusoidal positions, sqrt(d_model) embedding scale, ReLU feed-forward, and one token
table for the encoder input, the decoder input and the pre-softmax projection (a shared BPE
vocabulary of about 37,000 tokens, WMT'14 English-German). Trained here on Multi30k en -> de.

Variants (after the colon): base (default), big, tiny (CPU runs and tests):

  python -m flaxformer_lab.main --config=configs/transformer.py:tiny --workdir=/tmp/tf_tiny
  python -m flaxformer_lab.summary --config=configs/transformer.py:big

Attention projections have no biases (MultiHead(Q, K, V) = Concat(head_i) W^O with
head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V), as tensor2tensor); the feed-forward has b1, b2.
Parameter counts (flaxformer_lab.summary): base 63,045,632 learned, big 214,171,648 learned; the
paper reports 65M and 213M. `body_params` adds the two fixed sinusoidal tables (max_len x d_model
per stack) that Hugging Face-style classes store as weights; see flaxformer_lab/summary.py.
"""

from flaxformer_lab.presets import common

# Per-variant sizes; everything else is the family's (see get_config).
VARIANTS = {
    # Table 3, base: N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1.
    'base': dict(d_model=512, num_layers=6, num_decoder_layers=6, num_heads=8, mlp_dim=2048,
                 dropout_rate=0.1),
    # Table 3, big: N=6, d_model=1024, d_ff=4096, h=16, P_drop=0.3 (EN-DE).
    'big': dict(d_model=1024, num_layers=6, num_decoder_layers=6, num_heads=16, mlp_dim=4096,
                dropout_rate=0.3),
    # CPU-sized: same switches, small vocab (byte tokenizer) and 128 positions.
    'tiny': dict(vocab_size=512, d_model=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                 mlp_dim=256, max_len=128, dropout_rate=0.1),
}


def get_config(arg=None):
  """The training config of `arg` = `variant`."""
  arg = common.parse_arg(arg, variant='base')
  if arg.variant not in VARIANTS:
    raise ValueError(
        f'unknown transformer variant {arg.variant!r}; choose from {", ".join(VARIANTS)}')
  tiny = arg.variant == 'tiny'
  model = common.model_config(
      family='encoder_decoder',  # encoder + causal decoder with cross-attention
      vocab_size=37000,  # the shared source-target BPE vocabulary (WMT'14 en-de)
      share_encoder_decoder_embeddings=True,  # one table for encoder and decoder inputs
      position='sinusoidal',  # fixed sinusoids, added to the scaled embeddings
      sinusoidal_layout='interleaved',  # the paper's PE(pos, 2i) = sin, PE(pos, 2i+1) = cos
      max_len=1024,  # longest sequence (a computed table; fairseq's default 1024 positions)
      scale_embedding=True,  # "we multiply those weights by sqrt(d_model)"
      embedding_norm=False,  # no norm on the embeddings
      norm_position='post',  # LayerNorm(x + Sublayer(x))
      final_norm=False,  # post-LN: no norm after the stacks
      norm_eps=1e-6,  # tensor2tensor's LayerNorm epsilon
      qkv_bias=False,  # linear projections W^Q, W^K, W^V without biases
      out_bias=False,  # W^O without a bias
      mlp_bias=True,  # FFN(x) = max(0, x W1 + b1) W2 + b2
      activation='relu',  # the max(0, .) of the FFN
      attention_dropout_rate=0.0,  # the paper drops sub-layer outputs and embedding sums only
      tie_embeddings=True,  # pre-softmax projection = the embedding table
      logits_bias=False,  # no output bias
      head='seq2seq_lm',  # next-token logits of the decoder
      pad_id=0,  # padding token id
  )
  model.update(VARIANTS[arg.variant])  # sizes and P_drop (dropout_rate)
  c = common.base_config(model)
  c.task = 'seq2seq'  # teacher-forced cross entropy on the target
  c.data.name = 'multi30k'  # image captions, en / de / fr
  c.data.source_lang = 'en'  # translate English ...
  c.data.target_lang = 'de'  # ... into German (the paper's EN-DE direction)
  c.data.tokenizer = 'byte' if tiny else 'sentencepiece'  # a joint subword vocabulary
  c.data.sp_model_type = 'bpe'  # byte-pair encoding, as the paper
  c.data.seq_len = 128  # source tokens (captions are short)
  c.data.target_len = 128  # target tokens
  c.optim.name = 'adamw'  # Adam (weight decay 0 below: plain Adam)
  # Peak of equation 3, d_model^-0.5 * warmup^-0.5 with the paper's 4,000 warmup steps.
  c.optim.learning_rate = (4000 * VARIANTS[arg.variant]['d_model']) ** -0.5
  c.optim.schedule = 'rsqrt'  # linear warmup then inverse square root decay (equation 3)
  c.optim.warmup_steps = 100  # 10% of num_steps (paper: 4,000 of 100k)
  c.optim.b1 = 0.9  # beta1
  c.optim.b2 = 0.98  # beta2
  c.optim.eps = 1e-9  # epsilon
  c.optim.weight_decay = 0.0  # none
  c.optim.grad_clip_norm = 0.0  # the paper does not clip
  c.label_smoothing = 0.1  # epsilon_ls
  c.batch_size = 32  # sentence pairs per update
  c.num_steps = 1000  # optimizer updates
  if not tiny:  # sacreBLEU of greedy decoding on the validation split (not on CPU smoke runs)
    c.evals.bleu = common.bleu_eval(c, every=500)
  if tiny:
    c.optim.learning_rate = 1e-3  # a small model from scratch tolerates a large step
    c.optim.warmup_steps = 50  # 10% of num_steps
    c.optim.grad_clip_norm = 1.0  # safety on CPU smoke runs
    c.batch_size = 16  # CPU-sized batch
    c.num_steps = 500  # a few minutes on 2 cores
  return c
