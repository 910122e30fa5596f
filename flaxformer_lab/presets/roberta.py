r"""RoBERTa (Liu et al., 2019): BERT's post-LN encoder with a byte-level BPE vocabulary, positions
offset by 2 and counted from padding, one token type, pre-trained with masked-LM only.

Variants (after the colon): base (default), large, tiny (CPU runs and tests). Add
`task=classification` to fine-tune on SST-2 with RoBERTa's classification head:

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


def get_config(arg=None):
  """The training config of `arg` = `variant[,task=mlm|classification]`."""
  arg = common.parse_arg(arg, variant='base', task='mlm')
  if arg.variant not in VARIANTS:
    raise ValueError(f'unknown roberta variant {arg.variant!r}; choose from {", ".join(VARIANTS)}')
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
    c.data.name = 'sst2'  # binary sentiment
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
