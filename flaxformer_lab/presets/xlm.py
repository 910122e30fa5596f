r"""XLM (Lample & Conneau, 2019): a post-LN Transformer encoder with learned positions and a
language embedding per token, pre-trained with masked LM on monolingual text alternating with
translation LM on parallel sentences (flaxformer_lab/tasks/xlm.py).

Variants (after the colon): pretrain (default; xlm-mlm-ende-1024's shapes), xnli15
(xlm-mlm-tlm-xnli15-1024's shapes), pretrain_tiny (CPU-sized, a few minutes). Add
`data=bible_en_es` to train English-Spanish on the Bible instead of Multi30k English-German:

  python -m flaxformer_lab.main --config=configs/xlm.py:pretrain_tiny --workdir=/tmp/xlm_tiny
  python -m flaxformer_lab.summary --config=configs/xlm.py:pretrain

Shapes are the released checkpoints' (Hugging Face XLMConfig: emb_dim, n_layers, n_heads,
n_langs, vocab_size; 512 learned positions, GELU, LayerNorm eps 1e-12, LayerNorm on the summed
embeddings, a tied output layer with a bias, no token types); the body counts as XLMModel does:
ende 142,357,504, xnli15 248,976,384. Training follows section 5.1 of the paper: Adam with a linear
warmup and inverse square-root decay (XLM's adam_inverse_sqrt, 4,000 warmup updates), lr 1e-4,
mini-batches of 64 sequences of 256 tokens, dropout 0.1, 15% of the tokens predicted (80/10/10),
and the steps 'en,de,en-de' (MLM on each language and TLM on the pairs, XLM's --mlm_steps).
"""

from flaxformer_lab.presets import common

# Per-variant sizes; everything else is the family's (see get_config).
VARIANTS = {
    # xlm-mlm-ende-1024 (lang2id de 0, en 1).
    'pretrain': dict(vocab_size=64699, d_model=1024, num_layers=6, num_heads=8, mlp_dim=4096,
                     num_languages=2),
    # xlm-mlm-tlm-xnli15-1024 (15 language rows; the lab's data fills two of them).
    'xnli15': dict(vocab_size=95000, d_model=1024, num_layers=12, num_heads=8, mlp_dim=4096,
                   num_languages=15),
    # CPU-sized: same switches, byte tokenizer, 128 positions.
    'pretrain_tiny': dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, mlp_dim=256,
                          max_len=128, num_languages=2),
}
# Parallel data sets and their language pair (source_lang, target_lang).
DATA = {'multi30k': ('en', 'de'), 'bible_en_es': ('en', 'es')}


def get_config(arg=None):
  """The training config of `arg` = `variant[,data=multi30k|bible_en_es]`."""
  arg = common.parse_arg(arg, variant='pretrain', data='multi30k')
  if arg.variant not in VARIANTS:
    raise ValueError(f'unknown xlm variant {arg.variant!r}; choose from {", ".join(VARIANTS)}')
  if arg.data not in DATA:
    raise ValueError(f'unknown xlm data {arg.data!r}; choose from {", ".join(DATA)}')
  tiny = arg.variant == 'pretrain_tiny'
  model = common.model_config(
      family='encoder',  # bidirectional encoder only
      position='learned',  # absolute learned positions (sinusoidal_embeddings=False)
      max_len=512,  # max_position_embeddings
      num_languages=2,  # a learned language embedding added to every token (use_lang_emb)
      type_vocab_size=0,  # no token types: languages mark the two sentences of a TLM pair
      embedding_norm=True,  # layer_norm_emb on the summed embeddings
      norm_position='post',  # LayerNorm after each residual add
      final_norm=False,  # post-LN: no norm after the stack
      norm_eps=1e-12,  # layer_norm_eps
      activation='gelu',  # gelu_activation (exact erf GELU)
      dropout_rate=0.1,  # dropout
      attention_dropout_rate=0.1,  # attention_dropout
      tie_embeddings=True,  # pred_layer shares the embedding matrix ...
      head='mlm',  # ... plus its own bias (XLMWithLMHeadModel, asm=False)
      head_transform=False,  # no dense + norm before the output layer
      pooler=False,  # XLMModel has none
      pad_id=0,  # the lab tokenizers' <pad>
  )
  model.update(VARIANTS[arg.variant])
  c = common.base_config(model)
  c.task = 'xlm'  # MLM and TLM steps in a fixed cycle
  c.data.name = arg.data  # parallel sentences: TLM pairs, and each side for MLM
  c.data.source_lang, c.data.target_lang = DATA[arg.data]
  lang1, lang2 = DATA[arg.data]
  c.data.mlm_steps = f'{lang1},{lang2},{lang1}-{lang2}'  # XLM's --mlm_steps 'en,de,en-de'
  c.data.mlm_probability = 0.15  # word_pred
  c.data.tokenizer = 'byte' if tiny else 'sentencepiece'  # XLM: one BPE shared by the languages
  c.data.sp_model_type = 'bpe'  # fastBPE in the paper
  c.data.sp_vocab_size = 16000  # what the lab's corpora support (the model keeps 64,699 rows)
  c.data.seq_len = 256  # streams of 256 tokens (bptt)
  c.data.pack = True  # sentences packed into rows (segment ids keep them apart)
  c.optim.name = 'adamw'  # Adam (weight decay 0 below)
  c.optim.learning_rate = 1e-4  # lr
  c.optim.schedule = 'rsqrt'  # adam_inverse_sqrt: linear warmup then 1/sqrt(step)
  c.optim.warmup_steps = 4000  # warmup_updates
  c.optim.b1 = 0.9  # beta1
  c.optim.b2 = 0.98  # beta2 (XLM's recipes)
  c.optim.eps = 1e-8  # Adam epsilon
  c.optim.weight_decay = 0.0  # none
  c.optim.grad_clip_norm = 5.0  # clip_grad_norm
  c.batch_size = 64  # sequences per update
  c.num_steps = 200_000  # the paper stops on validation perplexity; 200k updates here
  c.eval_every = 5000  # steps between evaluations
  c.checkpoint_every = 5000  # steps between checkpoints
  if tiny:
    c.data.seq_len = 128  # fits the 128-row position table
    c.optim.learning_rate = 1e-3  # a small model from scratch tolerates a large step
    c.optim.warmup_steps = 30  # 10% of num_steps
    c.batch_size = 16  # CPU-sized batch
    c.num_steps = 300  # a few minutes on 2 cores
    c.eval_every = 100
    c.checkpoint_every = 100
    c.data.eval_batches = 4
  return c
