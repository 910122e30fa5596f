r"""XLM-RoBERTa (Conneau et al., 2020): RoBERTa's architecture with a 250k SentencePiece vocabulary
shared by 100 languages, pre-trained with masked-LM.

Variants (after the colon): base (default), tiny (CPU runs and tests). Add `task=classification`
to fine-tune on SST-2 with the RoBERTa classification head:

  python -m flaxformer_lab.main --config=configs/xlmr.py:tiny --workdir=/tmp/xlmr_tiny
  python -m flaxformer_lab.summary --config=configs/xlmr.py:base

Multilingual pre-training: pretrain (xlm-roberta-base's shapes and the paper's recipe) and
pretrain_tiny (CPU-sized, a few minutes) run masked LM over the `multilingual` data set: the
monolingual sides of Multi30k (en, de, fr) and of the English-Spanish Bible (en, es), one
SentencePiece model trained on the sampled mixture for all languages, and a language sampled for
every example with q_i = p_i^0.3 / sum_j p_j^0.3, p_i = n_i / sum n (data.language_alpha; XLM-R
section 3.1), no language embeddings:

  python -m flaxformer_lab.main --config=configs/xlmr.py:pretrain_tiny --workdir=/tmp/xlmr_pt

Shapes are Hugging Face's xlm-roberta-base config; the body counts as XLMRobertaModel (with its
pooler) does: 278,043,648, of which 192,001,536 are the token table. As for RoBERTa, the pooler is
kept for MLM (to match XLMRobertaModel and its checkpoints) and dropped for classification.
"""

from flaxformer_lab.presets import common

# Per-variant sizes; everything else is the family's (see get_config).
VARIANTS = {
    'base': dict(d_model=768, num_layers=12, num_heads=12, mlp_dim=3072),  # xlm-roberta-base
    # CPU-sized: same switches; 128 positions + the offset of 2 = a 130-row table.
    'tiny': dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, mlp_dim=256, max_len=130),
}
VARIANTS['pretrain'] = VARIANTS['base']
VARIANTS['pretrain_tiny'] = dict(VARIANTS['tiny'], vocab_size=2048)  # a 2,000-piece SentencePiece
# The multilingual columns: Multi30k's three languages and both sides of the Bible.
CORPORA = 'multi30k.en,multi30k.de,multi30k.fr,bible_en_es.en,bible_en_es.es'
TASKS = ('mlm', 'classification')


def get_config(arg=None):
  """The training config of `arg` = `variant[,task=mlm|classification][,data=sst2|ag_news]`."""
  arg = common.parse_arg(arg, variant='base', task='mlm', data='sst2')
  if arg.variant not in VARIANTS:
    raise ValueError(f'unknown xlmr variant {arg.variant!r}; choose from {", ".join(VARIANTS)}')
  if arg.task not in TASKS:
    raise ValueError(f'unknown xlmr task {arg.task!r}; choose from {", ".join(TASKS)}')
  tiny = arg.variant in ('tiny', 'pretrain_tiny')
  pretrain = arg.variant.startswith('pretrain')
  if pretrain and arg.task != 'mlm':
    raise ValueError(f'xlmr:{arg.variant} pre-trains (task=mlm); fine-tune with base or tiny')
  mlm = arg.task == 'mlm'
  model = common.model_config(
      family='encoder',  # bidirectional encoder only
      vocab_size=250002,  # multilingual SentencePiece + fairseq specials
      position='learned',  # absolute learned position table
      max_len=514,  # max_position_embeddings: 512 positions + the offset of 2
      position_offset=2,  # positions start at pad_id + 1 = 2
      positions_from_padding=True,  # pads keep position pad_id; real tokens count on from 2
      pad_id=1,  # <pad>
      type_vocab_size=1,  # one token type (kept: XLMRobertaModel has the 1-row table)
      embedding_norm=True,  # LayerNorm on the summed embeddings
      norm_position='post',  # LayerNorm after each residual add
      final_norm=False,  # post-LN: no norm after the stack
      norm_eps=1e-5,  # layer_norm_eps of the released checkpoints
      activation='gelu',  # exact (erf) GELU
      dropout_rate=0.1,  # hidden_dropout_prob
      attention_dropout_rate=0.1,  # attention_probs_dropout_prob
      classifier_dropout=0.1,  # classifier_dropout=None falls back to hidden_dropout_prob
      pooler=mlm,  # XLMRobertaModel's dense + tanh on <s> (unused by the MLM head)
      tie_embeddings=True,  # the MLM decoder reuses the word embeddings (plus its own bias)
      head='mlm' if mlm else 'classification',  # XLMRobertaForMaskedLM | ...SequenceClassification
      head_transform=True,  # MLM head: dense + GELU + LayerNorm before the decoder
      head_activation='gelu',  # of that transform
      classifier_hidden=True,  # RoBERTa's classification head: dense + tanh on <s>
      classifier_activation='tanh',  # of that dense layer
      pooling='first',  # classify from <s>
      num_labels=2,  # SST-2: negative / positive
  )
  model.update(VARIANTS[arg.variant])
  c = common.base_config(model)
  if mlm:
    c.task = 'mlm'  # masked-LM only
    c.data.name = 'austen'  # English prose (the lab has no multilingual MLM corpus)
    c.data.seq_len = 512  # full-length sequences
    c.optim.learning_rate = 6e-4  # RoBERTa-base's pre-training peak
    c.optim.weight_decay = 0.01  # RoBERTa's
  else:
    c.task = 'classification'  # sentence classification
    common.classification_data(c, arg.data)  # data=sst2 (default) | ag_news, its split, labels
    c.data.seq_len = 128  # sentences are short
    c.data.pack = False  # one sentence per row
    c.optim.learning_rate = 1e-5  # fine-tuning
    c.optim.weight_decay = 0.1  # RoBERTa's GLUE fine-tuning weight decay
  c.data.tokenizer = 'byte' if tiny else 'sentencepiece'  # the pretrained one comes with init_from
  c.optim.name = 'adamw'  # Adam with decoupled weight decay
  c.optim.schedule = 'linear'  # warmup then linear decay
  c.optim.warmup_steps = 60  # 6% of num_steps
  c.optim.b1 = 0.9  # Adam beta1
  c.optim.b2 = 0.98  # Adam beta2
  c.optim.eps = 1e-6  # Adam epsilon
  c.batch_size = 32  # examples per update
  c.num_steps = 1000  # optimizer updates
  if tiny:
    c.data.seq_len = 128  # fits the 130-row position table
    c.optim.learning_rate = 1e-3  # a small model from scratch tolerates a large step
    c.optim.warmup_steps = 30  # 6% of num_steps
    c.batch_size = 16  # CPU-sized batch
    c.num_steps = 500  # a few minutes on 2 cores
  if pretrain:
    _pretrain(c, tiny)
  return c


def _pretrain(c, tiny):
  """Multilingual masked LM with exponentiated language sampling (XLM-R section 3)."""
  c.data.name = 'multilingual'  # monolingual columns of the parallel data sets
  c.data.corpora = CORPORA  # en (Multi30k + Bible), de, fr, es
  c.data.language_alpha = 0.3  # alpha of the language sampling
  c.data.tokenizer = 'sentencepiece'  # one model for all languages, on the sampled text
  c.data.sp_model_type = 'unigram'  # SentencePiece unigram LM (250k pieces in the paper)
  c.data.sp_vocab_size = 32000  # what the lab's corpora support (the model keeps 250,002 rows)
  c.data.seq_len = 512  # full-length sequences
  c.batch_size = 8192  # sequences per update
  c.num_steps = 1_500_000  # 1.5M updates
  c.optim.learning_rate = 6e-4  # RoBERTa-base's peak (the XLM-R paper gives none)
  c.optim.warmup_steps = 24_000  # RoBERTa's warmup
  c.eval_every = 5000  # steps between evaluations
  c.checkpoint_every = 5000  # steps between checkpoints
  if tiny:
    c.data.sp_vocab_size = 2000  # pieces (plus the 7 specials: fits vocab_size 2048)
    c.data.sp_input_sentence_size = 100_000  # sampled lines to train it on
    c.data.seq_len = 128  # fits the 130-row position table
    c.batch_size = 16  # CPU-sized batch
    c.num_steps = 300  # a few minutes on 2 cores
    c.optim.learning_rate = 1e-3  # a small model from scratch tolerates a large step
    c.optim.warmup_steps = 30  # 10% of num_steps
    c.eval_every = 100
    c.checkpoint_every = 100
    c.data.eval_batches = 4
