r"""ALBERT (Lan et al., 2020): BERT with a factorized embedding (E = 128, projected to d_model) and
one set of layer weights shared by every layer, pre-trained with masked-LM + sentence-order
prediction (SOP, the pair head).

Variants (after the colon): base (default), large, xxlarge, tiny (CPU runs and tests). Add
`task=classification` to fine-tune on SST-2 instead.
Recipes: `pretrain` (the paper's ALBERT-base pre-training: SentencePiece 30k, SOP, n-gram masking
n <= 3 with at most 20 predictions, LAMB, batch 4096, lr 0.00176, 125k steps) and `pretrain_tiny`
(the same recipe CPU-sized on the Austen novels, a few minutes here):

  python -m flaxformer_lab.main --config=configs/albert.py:tiny --workdir=/tmp/albert_tiny
  python -m flaxformer_lab.summary --config=configs/albert.py:xxlarge

Shapes are Hugging Face's albert-*-v2 configs (AlbertConfig() is xxlarge); the body counts as
AlbertModel does: base 11,683,584, large 17,683,968, xxlarge 222,595,584.
"""

from flaxformer_lab.presets import common

# Per-variant sizes; everything else is the family's (see get_config).
VARIANTS = {
    'base': dict(d_model=768, num_layers=12, num_heads=12, mlp_dim=3072),  # albert-base-v2
    'large': dict(d_model=1024, num_layers=24, num_heads=16, mlp_dim=4096),  # albert-large-v2
    'xxlarge': dict(d_model=4096, num_layers=12, num_heads=64, mlp_dim=16384),  # albert-xxlarge-v2
    # CPU-sized: same switches (factorized E = 32, one shared layer applied 4 times).
    'tiny': dict(vocab_size=512, emb_dim=32, d_model=64, num_layers=4, num_heads=4, mlp_dim=256,
                 max_len=128),
}
TASKS = ('mlm', 'classification')
RECIPES = ('pretrain', 'pretrain_tiny')


def get_config(arg=None):
  """The training config of `arg` = `variant[,task=mlm|classification][,data=sst2|ag_news]`."""
  arg = common.parse_arg(arg, variant='base', task='mlm', data='sst2')
  if arg.variant in RECIPES:
    return _pretrain(tiny=arg.variant == 'pretrain_tiny')
  if arg.variant not in VARIANTS:
    raise ValueError(f'unknown albert variant {arg.variant!r}; choose from '
                     f'{", ".join((*VARIANTS, *RECIPES))}')
  if arg.task not in TASKS:
    raise ValueError(f'unknown albert task {arg.task!r}; choose from {", ".join(TASKS)}')
  tiny = arg.variant == 'tiny'
  model = common.model_config(
      family='encoder',  # bidirectional encoder only
      vocab_size=30000,  # SentencePiece (AlbertConfig.vocab_size)
      emb_dim=128,  # embedding_size: factorized embeddings, projected E -> d_model
      share_layers=1,  # num_hidden_groups = 1: all layers share one set of weights
      position='learned',  # absolute learned position table (of width E)
      max_len=512,  # max_position_embeddings
      type_vocab_size=2,  # segment A / B embeddings
      embedding_norm=True,  # LayerNorm (width E) on the summed embeddings
      norm_position='post',  # LayerNorm after each residual add
      final_norm=False,  # post-LN: no norm after the stack
      norm_eps=1e-12,  # layer_norm_eps
      activation='gelu_tanh',  # hidden_act='gelu_new' (tanh approximation)
      dropout_rate=0.0,  # hidden_dropout_prob (v2 models: no dropout)
      attention_dropout_rate=0.0,  # attention_probs_dropout_prob (v2: none)
      classifier_dropout=0.1,  # classifier_dropout_prob
      pooler=True,  # dense + tanh on [CLS]: part of AlbertModel
      tie_embeddings=True,  # the MLM decoder reuses the (E-wide) word embeddings
      # AlbertForPreTraining (MLM + SOP) | AlbertForSequenceClassification.
      head='mlm_nsp' if arg.task == 'mlm' else 'classification',
      head_transform=True,  # MLM head: dense (d_model -> E) + GELU + LayerNorm before the decoder
      head_activation='gelu_tanh',  # of that transform (hidden_act)
      classifier_hidden=False,  # classification reads the pooler output directly
      num_labels=2,  # SST-2: negative / positive
      pad_id=0,  # <pad>
  )
  model.update(VARIANTS[arg.variant])
  c = common.base_config(model)
  if arg.task == 'mlm':
    c.task = 'mlm'  # masked-LM (+ SOP through the pair head)
    c.data.name = 'austen'  # English prose
    c.data.mlm_pairs = 'sop'  # segment pairs labelled in order / swapped for the pair head (SOP)
    c.data.seq_len = 512  # the paper's sequence length
    c.optim.name = 'lamb'  # the paper's optimizer (large-batch)
    c.optim.learning_rate = 1.76e-3  # the paper's LAMB learning rate
    c.optim.warmup_steps = 25  # 2.5% of num_steps (paper: 3,125 of 125k)
    c.optim.weight_decay = 0.01  # LAMB weight decay
  else:
    c.task = 'classification'  # sentence classification
    common.classification_data(c, arg.data)  # data=sst2 (default) | ag_news, its split, labels
    c.data.seq_len = 128  # sentences are short
    c.data.pack = False  # one sentence per row
    c.optim.name = 'adamw'  # the paper fine-tunes with Adam
    c.optim.learning_rate = 1e-5  # the paper's SST-2 fine-tuning rate
    c.optim.warmup_steps = 60  # 6% of num_steps (the paper's SST-2 ratio)
    c.optim.weight_decay = 0.0  # none in fine-tuning
  c.data.tokenizer = 'byte' if tiny else 'sentencepiece'  # the pretrained one comes with init_from
  c.optim.schedule = 'linear'  # warmup then linear decay
  c.optim.b1 = 0.9  # beta1
  c.optim.b2 = 0.999  # beta2
  c.optim.eps = 1e-6  # epsilon
  c.batch_size = 32  # examples per update
  c.num_steps = 1000  # optimizer updates
  if tiny:
    c.data.seq_len = 128  # fits the 128-row position table
    c.optim.learning_rate = 2e-3  # a small model from scratch tolerates a large step
    c.optim.warmup_steps = 50  # 10% of num_steps
    c.batch_size = 16  # CPU-sized batch
    c.num_steps = 500  # a few minutes on 2 cores
  return c


def _pretrain(tiny: bool):
  """ALBERT's pre-training recipe (Lan et al., 2020, sections 3.2 and 4.1; google-research/albert's
  create_pretraining_data.py and run_pretraining.py flags)."""
  c = get_config('tiny' if tiny else 'base')
  d = c.data
  d.name = 'austen'  # English prose (the paper: BooksCorpus + English Wikipedia, as BERT)
  d.tokenizer = 'sentencepiece'  # SentencePiece, as ALBERT's 30k vocabulary
  d.sp_model_type = 'unigram'  # SentencePiece's default (unigram LM)
  d.mlm_pairs = 'sop'  # two consecutive segments of one document, swapped half the time (SOP)
  d.mlm_probability = 0.15  # masked_lm_prob
  d.mlm_max_ngram = 3  # n-gram masking, n <= 3, p(n) ~ 1/n (the paper's section 4.1)
  d.mlm_masking = 'static'  # masks fixed when the data is written (create_pretraining_data.py)
  d.mlm_dupe_factor = 40  # dupe_factor: each sequence with 40 different fixed masks
  d.mlm_inputs = 'doc_sentences'  # segments of one document
  d.max_predictions_per_seq = 20  # max_predictions_per_seq
  d.pack = False  # one pair per row ([B, P] gathered predictions)
  c.optim.name = 'lamb'  # LAMB (large-batch)
  c.optim.schedule = 'linear'  # linear warmup, then linear decay to 0
  c.optim.b1 = 0.9  # beta1
  c.optim.b2 = 0.999  # beta2
  c.optim.eps = 1e-6  # epsilon
  c.optim.weight_decay = 0.01  # LAMB weight decay
  c.optim.grad_clip_norm = 1.0  # clip the global norm at 1.0
  if not tiny:
    d.tokenizer_vocab_size = 30000  # vocabulary size 30,000
    c.model.vocab_size = 30000  # the model's table holds the tokenizer's ids
    d.seq_len = 512  # maximum n-gram input length 512
    c.batch_size = 4096  # batch size 4096
    c.optim.learning_rate = 0.00176  # LAMB learning rate
    c.optim.warmup_steps = 3125  # num_warmup_steps
    c.num_steps = 125_000  # 125,000 steps
    c.eval_every = 5_000  # steps between evaluations
    c.checkpoint_every = 5_000  # steps between checkpoints
  else:
    d.tokenizer_vocab_size = 2000  # a SentencePiece vocabulary the Austen novels fill
    c.model.vocab_size = 2000  # the model's table holds the tokenizer's ids
    d.sp_input_sentence_size = 0  # train SentencePiece on every line (the split is small)
    d.seq_len = 128  # fits the tiny 128-row position table
    c.batch_size = 16  # CPU-sized batch
    c.optim.learning_rate = 1e-2  # LAMB's step is relative to each weight's norm: a small model
    # from scratch moves too slowly at the paper's 0.00176 (measured: loss -0.04 in 30 steps)
    c.optim.warmup_steps = 8  # 2.5% of num_steps (the paper: 3,125 of 125k)
    c.num_steps = 300  # a few minutes on 2 cores
    c.eval_every = 100  # steps between evaluations
    c.checkpoint_every = 100  # steps between checkpoints
    d.eval_batches = 4  # 64 held-out pairs per evaluation
  return c
