r"""RoBERTa (Liu et al., 2019): BERT's post-LN encoder with a byte-level BPE vocabulary, positions
offset by 2 and counted from padding, one token type, pre-trained with masked-LM only.

Variants (after the colon): base (default), large, tiny (CPU runs and tests). Add
`task=classification` to fine-tune on SST-2 with RoBERTa's classification head.
Recipes: `pretrain` (the paper's RoBERTa-base pre-training: byte-level BPE, FULL-SENTENCES
inputs, dynamic masking, no NSP, batch 8K, lr 6e-4, 24k warmup, 500k steps) and `pretrain_tiny`
(the same recipe CPU-sized on the Austen novels, a few minutes here):

  python -m flaxformer_lab.main --config=configs/roberta.py:tiny --workdir=/tmp/roberta_tiny
  python -m flaxformer_lab.summary --config=configs/roberta.py:base

Shapes are Hugging Face's roberta-base / roberta-large configs; the body counts as RobertaModel
(with its pooler) does: base 124,645,632, large 355,359,744. RoBERTa's own heads do not use the
pooler (RobertaForMaskedLM and ...ForSequenceClassification build the model without it): the MLM
pre-training config keeps it so the body matches RobertaModel and its checkpoints, and
`task=classification` drops it (classifier_hidden = RoBERTa's dense + tanh on <s>).
"""

from flaxformer_lab.presets import common

# Per-variant sizes; everything else is the family's (see get_config).
VARIANTS = {
    'base': dict(d_model=768, num_layers=12, num_heads=12, mlp_dim=3072),  # roberta-base
    'large': dict(d_model=1024, num_layers=24, num_heads=16, mlp_dim=4096),  # roberta-large
    # CPU-sized: same switches; 128 positions + the offset of 2 = a 130-row table.
    'tiny': dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, mlp_dim=256, max_len=130),
}
TASKS = ('mlm', 'classification')
RECIPES = ('pretrain', 'pretrain_tiny')


def get_config(arg=None):
  """The training config of `arg` = `variant[,task=mlm|classification][,data=sst2|ag_news]`."""
  arg = common.parse_arg(arg, variant='base', task='mlm', data='sst2')
  if arg.variant in RECIPES:
    return _pretrain(tiny=arg.variant == 'pretrain_tiny')
  if arg.variant not in VARIANTS:
    raise ValueError(f'unknown roberta variant {arg.variant!r}; choose from '
                     f'{", ".join((*VARIANTS, *RECIPES))}')
  if arg.task not in TASKS:
    raise ValueError(f'unknown roberta task {arg.task!r}; choose from {", ".join(TASKS)}')
  tiny = arg.variant == 'tiny'
  mlm = arg.task == 'mlm'
  model = common.model_config(
      family='encoder',  # bidirectional encoder only
      vocab_size=50265,  # GPT-2 byte-level BPE + RoBERTa's specials
      position='learned',  # absolute learned position table
      max_len=514,  # max_position_embeddings: 512 positions + the offset of 2
      position_offset=2,  # positions start at pad_id + 1 = 2
      positions_from_padding=True,  # pads keep position pad_id; real tokens count on from 2
      pad_id=1,  # <pad>
      type_vocab_size=1,  # one token type (kept: RobertaModel has the 1-row table)
      embedding_norm=True,  # LayerNorm on the summed embeddings
      norm_position='post',  # LayerNorm after each residual add
      final_norm=False,  # post-LN: no norm after the stack
      norm_eps=1e-5,  # layer_norm_eps of the released checkpoints
      activation='gelu',  # exact (erf) GELU
      dropout_rate=0.1,  # hidden_dropout_prob
      attention_dropout_rate=0.1,  # attention_probs_dropout_prob
      classifier_dropout=0.1,  # classifier_dropout=None falls back to hidden_dropout_prob
      pooler=mlm,  # RobertaModel's dense + tanh on <s> (unused by the MLM head; see above)
      tie_embeddings=True,  # the MLM decoder reuses the word embeddings (plus its own bias)
      head='mlm' if mlm else 'classification',  # RobertaForMaskedLM | ...ForSequenceClassification
      head_transform=True,  # MLM head: dense + GELU + LayerNorm before the decoder
      head_activation='gelu',  # of that transform
      classifier_hidden=True,  # RobertaClassificationHead: dense + tanh on <s>, then the output
      classifier_activation='tanh',  # of that dense layer
      pooling='first',  # classify from <s>
      num_labels=2,  # SST-2: negative / positive
  )
  model.update(VARIANTS[arg.variant])
  c = common.base_config(model)
  if mlm:
    c.task = 'mlm'  # masked-LM only (no next-sentence prediction)
    c.data.name = 'austen'  # English prose
    c.data.seq_len = 512  # full-length sequences (the paper's)
    c.optim.learning_rate = 6e-4 if arg.variant == 'base' else 4e-4  # paper: 6e-4 base, 4e-4 large
    c.optim.weight_decay = 0.01  # the paper's
  else:
    c.task = 'classification'  # sentence classification
    common.classification_data(c, arg.data)  # data=sst2 (default) | ag_news, its split, labels
    c.data.seq_len = 128  # sentences are short
    c.data.pack = False  # one sentence per row
    c.optim.learning_rate = 1e-5  # GLUE fine-tuning range of the paper (1e-5 .. 3e-5)
    c.optim.weight_decay = 0.1  # the paper's GLUE fine-tuning weight decay
  c.data.tokenizer = 'byte' if tiny else 'sentencepiece'  # a pretrained BPE comes with init_from
  c.optim.name = 'adamw'  # Adam with decoupled weight decay
  c.optim.schedule = 'linear'  # warmup then linear decay
  c.optim.warmup_steps = 60  # 6% of num_steps (the paper's ratio)
  c.optim.b1 = 0.9  # Adam beta1
  c.optim.b2 = 0.98  # Adam beta2 (the paper: more stable at large batch)
  c.optim.eps = 1e-6  # Adam epsilon
  c.batch_size = 32  # examples per update
  c.num_steps = 1000  # optimizer updates
  if tiny:
    c.data.seq_len = 128  # fits the 130-row position table
    c.optim.learning_rate = 1e-3  # a small model from scratch tolerates a large step
    c.optim.warmup_steps = 30  # 6% of num_steps
    c.batch_size = 16  # CPU-sized batch
    c.num_steps = 500  # a few minutes on 2 cores
  return c


def _pretrain(tiny: bool):
  """RoBERTa's pre-training recipe (Liu et al., 2019: sections 4.1-4.2 and Table 9, base)."""
  c = get_config('tiny' if tiny else 'base')
  d = c.data
  d.name = 'austen'  # English prose (the paper: 160 GB of books, news, web text, stories)
  d.tokenizer = 'bpe'  # byte-level BPE (GPT-2's scheme) trained on the training split (cached)
  d.mlm_pairs = ''  # no next-sentence prediction
  d.mlm_inputs = 'full_sentences'  # FULL-SENTENCES: rows packed across documents, </s> between
  d.mlm_probability = 0.15  # 15% of the tokens, 80% <mask> / 10% random / 10% kept
  d.mlm_masking = 'dynamic'  # a new mask every time a sequence is fed to the model
  d.mlm_max_ngram = 1  # single-token masking
  d.max_predictions_per_seq = 0  # fairseq's masking has no cap (15% of each row)
  d.pack = False  # FULL-SENTENCES rows are already full
  c.optim.name = 'adamw'  # Adam with decoupled weight decay
  c.optim.schedule = 'linear'  # linear warmup, then linear decay to 0
  c.optim.b1 = 0.9  # Adam beta1
  c.optim.b2 = 0.98  # Adam beta2 (more stable with large batches)
  c.optim.eps = 1e-6  # Adam epsilon
  c.optim.weight_decay = 0.01  # weight decay
  c.optim.grad_clip_norm = 0.0  # Table 9: gradient clipping 0.0 (none)
  if not tiny:
    d.tokenizer_vocab_size = 50265  # roberta-base's vocabulary size (50K BPE + specials)
    c.model.vocab_size = 50265  # the model's table holds the tokenizer's ids
    d.seq_len = 512  # T = 512 tokens
    c.batch_size = 8192  # 8K sequences per batch
    c.optim.learning_rate = 6e-4  # peak learning rate (base)
    c.optim.warmup_steps = 24_000  # warmup steps
    c.num_steps = 500_000  # max steps
    c.eval_every = 10_000  # steps between evaluations
    c.checkpoint_every = 10_000  # steps between checkpoints
  else:
    d.tokenizer_vocab_size = 2000  # a byte-level BPE vocabulary the Austen novels fill
    c.model.vocab_size = 2000  # the model's table holds the tokenizer's ids
    d.seq_len = 128  # fits the tiny 130-row position table (with the offset of 2)
    c.batch_size = 16  # CPU-sized batch
    c.optim.learning_rate = 1e-3  # a small model from scratch tolerates a large step
    c.optim.warmup_steps = 18  # 6% of num_steps (the paper: 24k of 500k, ~5%)
    c.num_steps = 300  # a few minutes on 2 cores
    c.eval_every = 100  # steps between evaluations
    c.checkpoint_every = 100  # steps between checkpoints
    d.eval_batches = 4  # 64 held-out rows per evaluation
  return c
