r"""ALBERT (Lan et al., 2020): BERT with a factorized embedding (E = 128, projected to d_model) and
one set of layer weights shared by every layer, pre-trained with masked-LM + sentence-order
prediction (SOP, the pair head).

Variants (after the colon): base (default), large, xxlarge, tiny (CPU runs and tests). Add
`task=classification` to fine-tune on SST-2 instead:

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


def get_config(arg=None):
  """The training config of `arg` = `variant[,task=mlm|classification]`."""
  arg = common.parse_arg(arg, variant='base', task='mlm')
  if arg.variant not in VARIANTS:
    raise ValueError(f'unknown albert variant {arg.variant!r}; choose from {", ".join(VARIANTS)}')
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
    c.data.name = 'sst2'  # binary sentiment
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
