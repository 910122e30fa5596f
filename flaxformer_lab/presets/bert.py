r"""BERT (Devlin et al., 2019): a post-LN encoder with learned positions, segment embeddings and a
pooler, pre-trained with masked-LM + next-sentence prediction.

Variants (after the colon): base (default), large, tiny (CPU runs and tests). Add
`task=classification` to fine-tune on SST-2 instead of pre-training with MLM + NSP.
Recipes: `pretrain` (the paper's pre-training: BERT-base, WordPiece, static masks with a cap of 20
predictions, NSP, batch 256, lr 1e-4, 10k warmup, phase 1 of the 1M-step schedule) and
`pretrain_tiny` (the same recipe CPU-sized on the Austen novels, a few minutes here):

  python -m flaxformer_lab.main --config=configs/bert.py:tiny --workdir=/tmp/bert_tiny
  python -m flaxformer_lab.main --config=configs/bert.py:base,task=classification --workdir=...
  python -m flaxformer_lab.summary --config=configs/bert.py:large

Shapes are Hugging Face's BertConfig (bert-base-uncased, bert-large-uncased); the body counts as
BertModel does: base 109,482,240, large 335,141,888.
"""

from flaxformer_lab.presets import common

# Per-variant sizes; everything else is the family's (see get_config).
VARIANTS = {
    'base': dict(d_model=768, num_layers=12, num_heads=12, mlp_dim=3072),  # bert-base-uncased
    'large': dict(d_model=1024, num_layers=24, num_heads=16, mlp_dim=4096),  # bert-large-uncased
    # CPU-sized: same switches, small vocab (byte tokenizer) and a 128-row position table.
    'tiny': dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, mlp_dim=256, max_len=128),
}
TASKS = ('mlm', 'classification')
RECIPES = ('pretrain', 'pretrain_tiny')


def get_config(arg=None):
  """The training config of `arg` = `variant[,task=mlm|classification][,data=sst2|ag_news]`."""
  arg = common.parse_arg(arg, variant='base', task='mlm', data='sst2')
  if arg.variant in RECIPES:
    return _pretrain(tiny=arg.variant == 'pretrain_tiny')
  if arg.variant not in VARIANTS:
    raise ValueError(f'unknown bert variant {arg.variant!r}; choose from '
                     f'{", ".join((*VARIANTS, *RECIPES))}')
  if arg.task not in TASKS:
    raise ValueError(f'unknown bert task {arg.task!r}; choose from {", ".join(TASKS)}')
  tiny = arg.variant == 'tiny'
  model = common.model_config(
      family='encoder',  # bidirectional encoder only
      vocab_size=30522,  # WordPiece, uncased (BertConfig.vocab_size)
      position='learned',  # absolute learned position table
      max_len=512,  # max_position_embeddings
      type_vocab_size=2,  # segment A / B embeddings
      embedding_norm=True,  # LayerNorm on the summed embeddings
      norm_position='post',  # LayerNorm after each residual add
      final_norm=False,  # post-LN: no norm after the stack
      norm_eps=1e-12,  # layer_norm_eps
      activation='gelu',  # exact (erf) GELU, hidden_act='gelu'
      dropout_rate=0.1,  # hidden_dropout_prob
      attention_dropout_rate=0.1,  # attention_probs_dropout_prob
      classifier_dropout=0.1,  # classifier_dropout=None falls back to hidden_dropout_prob
      pooler=True,  # dense + tanh on [CLS]: part of BertModel
      tie_embeddings=True,  # the MLM decoder reuses the word embeddings (plus its own bias)
      # BertForPreTraining (MLM + NSP) | BertForSequenceClassification.
      head='mlm_nsp' if arg.task == 'mlm' else 'classification',
      head_transform=True,  # MLM head: dense + GELU + LayerNorm before the decoder
      head_activation='gelu',  # of that transform
      classifier_hidden=False,  # classification reads the pooler output directly
      num_labels=2,  # SST-2: negative / positive
      pad_id=0,  # [PAD]
  )
  model.update(VARIANTS[arg.variant])
  c = common.base_config(model)
  if arg.task == 'mlm':
    c.task = 'mlm'  # masked-LM (+ NSP through the pair head)
    c.data.name = 'austen'  # English prose
    c.data.mlm_pairs = 'nsp'  # segment pairs labelled next / random for the pair head (NSP)
    c.data.seq_len = 128  # phase-1 pre-training length (phase 2 uses 512)
    c.optim.learning_rate = 1e-4  # the paper's Adam learning rate
  else:
    c.task = 'classification'  # sentence classification
    common.classification_data(c, arg.data)  # data=sst2 (default) | ag_news, its split, labels
    c.data.seq_len = 128  # sentences are short
    c.data.pack = False  # one sentence per row
    c.optim.learning_rate = 2e-5  # fine-tuning range of the paper (2e-5 .. 5e-5)
  c.data.tokenizer = 'byte' if tiny else 'sentencepiece'  # pretrained WordPiece: with init_from
  c.optim.name = 'adamw'  # Adam with decoupled weight decay
  c.optim.schedule = 'linear'  # warmup then linear decay (the paper's)
  c.optim.warmup_steps = 100  # 10% of num_steps (paper: 10k of 1M)
  c.optim.b1 = 0.9  # Adam beta1
  c.optim.b2 = 0.999  # Adam beta2
  c.optim.eps = 1e-6  # Adam epsilon
  c.optim.weight_decay = 0.01  # the paper's L2 weight decay
  c.batch_size = 32  # examples per update
  c.num_steps = 1000  # optimizer updates
  if tiny:
    c.optim.learning_rate = 1e-3  # a small model from scratch tolerates a large step
    c.optim.warmup_steps = 50  # 10% of num_steps
    c.batch_size = 16  # CPU-sized batch
    c.num_steps = 500  # a few minutes on 2 cores
  return c


def _pretrain(tiny: bool):
  """BERT's pre-training recipe (Devlin et al., 2019, section A.2; google-research/bert's
  create_pretraining_data.py and run_pretraining.py flags)."""
  c = get_config('tiny' if tiny else 'base')
  d = c.data
  d.name = 'austen'  # English prose (the paper: BooksCorpus + English Wikipedia)
  d.tokenizer = 'wordpiece'  # uncased WordPiece trained on the training split (cached)
  d.mlm_pairs = 'nsp'  # [CLS] A [SEP] B [SEP]; B from another document half the time (NSP)
  d.mlm_probability = 0.15  # masked_lm_prob: 15% of the tokens, 80% [MASK] / 10% random / 10% kept
  d.mlm_masking = 'static'  # masks fixed when the data is written (create_pretraining_data.py)
  d.mlm_dupe_factor = 10  # dupe_factor: each sequence with 10 different fixed masks
  d.mlm_max_ngram = 1  # single-token masking
  d.mlm_inputs = 'doc_sentences'  # segments of one document
  d.pack = False  # one pair per row ([B, P] gathered predictions)
  c.optim.name = 'adamw'  # Adam with decoupled weight decay (the released AdamWeightDecay)
  c.optim.schedule = 'linear'  # linear warmup, then linear decay to 0
  c.optim.b1 = 0.9  # Adam beta1
  c.optim.b2 = 0.999  # Adam beta2
  c.optim.eps = 1e-6  # Adam epsilon
  c.optim.weight_decay = 0.01  # L2 weight decay
  c.optim.grad_clip_norm = 1.0  # run_pretraining.py clips the global norm at 1.0
  if not tiny:
    d.tokenizer_vocab_size = 30522  # bert-base-uncased's vocabulary size
    c.model.vocab_size = 30522  # the model's table holds the tokenizer's ids
    # Phase 1 (90% of the 1M steps) at 128 tokens with max_predictions_per_seq 20; the paper runs
    # the last 100k steps at 512 tokens with 80 predictions (not reproduced by this preset).
    d.seq_len = 128  # max_seq_length of phase 1
    d.max_predictions_per_seq = 20  # max_predictions_per_seq at 128 tokens
    c.batch_size = 256  # 256 sequences per batch
    c.optim.learning_rate = 1e-4  # Adam learning rate
    c.optim.warmup_steps = 10_000  # warmup over the first 10,000 steps
    c.num_steps = 1_000_000  # the full schedule: 1M steps
    c.stop_at_step = 900_000  # phase 1 ends at 90% of the steps
    c.eval_every = 10_000  # steps between evaluations
    c.checkpoint_every = 10_000  # steps between checkpoints
  else:
    d.tokenizer_vocab_size = 2000  # a WordPiece vocabulary the Austen novels fill
    c.model.vocab_size = 2000  # the model's table holds the tokenizer's ids
    d.seq_len = 128  # the phase-1 length (the tiny position table holds 128)
    d.max_predictions_per_seq = 20  # BERT's cap at 128 tokens
    c.batch_size = 16  # CPU-sized batch
    c.optim.learning_rate = 1e-3  # a small model from scratch tolerates a large step
    c.optim.warmup_steps = 30  # 10% of num_steps (the paper: 1%)
    c.num_steps = 300  # a few minutes on 2 cores
    c.eval_every = 100  # steps between evaluations
    c.checkpoint_every = 100  # steps between checkpoints
    d.eval_batches = 4  # 64 held-out pairs per evaluation
  return c
