r"""DistilBERT (Sanh et al., 2019): BERT-base halved in depth (6 layers), without token types and
without a pooler, trained (here: from scratch) with masked-LM.

Variants (after the colon): base (default), tiny (CPU runs and tests). Add `task=classification` to
fine-tune on SST-2 with DistilBERT's classification head (dense + ReLU on [CLS]):

  python -m flaxformer_lab.main --config=configs/distilbert.py:tiny --workdir=/tmp/distil_tiny
  python -m flaxformer_lab.summary --config=configs/distilbert.py:base

Shapes are Hugging Face's DistilBertConfig (distilbert-base-uncased); the body counts as
DistilBertModel does: 66,362,880. (The distillation loss of the paper is not part of this config.)
"""

import ml_collections

from flaxformer_lab.presets import common

# Per-variant sizes; everything else is the family's (see get_config).
VARIANTS = {
    'base': dict(d_model=768, num_layers=6, num_heads=12, mlp_dim=3072),  # distilbert-base-uncased
    # CPU-sized: same switches, small vocab (byte tokenizer) and a 128-row position table.
    'tiny': dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, mlp_dim=256, max_len=128),
}
TASKS = ('mlm', 'classification')


DISTILL_VARIANTS = ('distill', 'distill_tiny', 'teacher_tiny', 'student_tiny')


def get_config(arg=None):
  """The training config of `arg` = `variant[,task=mlm|classification][,data=sst2|ag_news]`.

  Distillation: `distill` (the paper's recipe; set config.distill.teacher), `distill_tiny` (CPU:
  a 2-layer student of `teacher_tiny`, a 4-layer tiny BERT MLM on the Austen novels) and
  `student_tiny` (the same student trained from scratch with MLM alone, the baseline).
  """
  arg = common.parse_arg(arg, variant='base', task='mlm', data='sst2')
  if arg.variant in ('distill', 'distill_tiny'):
    return _distill(arg)
  if arg.variant == 'teacher_tiny':
    return _tiny_bert(num_layers=4)
  if arg.variant == 'student_tiny':
    return _tiny_bert(num_layers=2)
  if arg.variant not in VARIANTS:
    raise ValueError(f'unknown distilbert variant {arg.variant!r}; choose from '
                     f'{", ".join((*VARIANTS, *DISTILL_VARIANTS))}')
  if arg.task not in TASKS:
    raise ValueError(f'unknown distilbert task {arg.task!r}; choose from {", ".join(TASKS)}')
  tiny = arg.variant == 'tiny'
  model = common.model_config(
      family='encoder',  # bidirectional encoder only
      vocab_size=30522,  # BERT's uncased WordPiece
      position='learned',  # absolute learned position table (sinusoidal_pos_embds=False)
      max_len=512,  # max_position_embeddings
      type_vocab_size=0,  # no token-type embeddings
      embedding_norm=True,  # LayerNorm on the summed embeddings
      norm_position='post',  # LayerNorm after each residual add
      final_norm=False,  # post-LN: no norm after the stack
      norm_eps=1e-12,  # the LayerNorm eps of DistilBERT
      activation='gelu',  # exact (erf) GELU
      dropout_rate=0.1,  # dropout
      attention_dropout_rate=0.1,  # attention_dropout
      classifier_dropout=0.2,  # seq_classif_dropout
      pooler=False,  # DistilBertModel has no pooler
      tie_embeddings=True,  # vocab_projector reuses the word embeddings (plus its own bias)
      head='mlm' if arg.task == 'mlm' else 'classification',  # DistilBertForMaskedLM | ...
      head_transform=True,  # vocab_transform + GELU + vocab_layer_norm before the projector
      head_activation='gelu',  # of that transform
      classifier_hidden=True,  # pre_classifier: dense + ReLU on [CLS]
      classifier_activation='relu',  # of pre_classifier
      pooling='first',  # classify from [CLS]
      num_labels=2,  # SST-2: negative / positive
      pad_id=0,  # [PAD]
  )
  model.update(VARIANTS[arg.variant])
  c = common.base_config(model)
  if arg.task == 'mlm':
    c.task = 'mlm'  # masked-LM
    c.data.name = 'austen'  # English prose
    c.data.seq_len = 512  # full-length sequences
    c.optim.learning_rate = 5e-4  # the released training script's peak
    c.optim.weight_decay = 0.0  # the released training script's
  else:
    c.task = 'classification'  # sentence classification
    common.classification_data(c, arg.data)  # data=sst2 (default) | ag_news, its split, labels
    c.data.seq_len = 128  # sentences are short
    c.data.pack = False  # one sentence per row
    c.optim.learning_rate = 5e-5  # a common fine-tuning rate
    c.optim.weight_decay = 0.01  # light decoupled decay
  c.data.tokenizer = 'byte' if tiny else 'sentencepiece'  # pretrained WordPiece: with init_from
  c.optim.name = 'adamw'  # Adam with decoupled weight decay
  c.optim.schedule = 'linear'  # warmup then linear decay
  c.optim.warmup_steps = 50  # 5% of num_steps (the released script's ratio)
  c.optim.b1 = 0.9  # Adam beta1
  c.optim.b2 = 0.98  # Adam beta2
  c.optim.eps = 1e-6  # Adam epsilon
  c.batch_size = 32  # examples per update
  c.num_steps = 1000  # optimizer updates
  if tiny:
    c.data.seq_len = 128  # fits the 128-row position table
    c.optim.learning_rate = 1e-3  # a small model from scratch tolerates a large step
    c.optim.warmup_steps = 50  # 10% of num_steps
    c.batch_size = 16  # CPU-sized batch
    c.num_steps = 500  # a few minutes on 2 cores
  return c


def _distill(arg) -> ml_collections.ConfigDict:
  """Knowledge distillation into a DistilBERT student (task=distill)."""
  if arg.variant == 'distill':
    # The paper's recipe: teacher BERT base (set --config.distill.teacher=hf:<bert-base-uncased>
    # or a lab BERT MLM run), a 6-layer student of its width initialized from every other teacher
    # layer, batches of 4K sequences of 512 tokens (gradient accumulation), dynamic masking, no
    # NSP, Adam lr 5e-4, 5% warmup, clipping at 5.0: the released script's hyperparameters.
    c = get_config('base')
    c.model.head = 'mlm'
    c.data.seq_len = 512  # max_model_input_size
    c.batch_size = 4096  # "up to 4K examples per batch"
    c.optim.grad_accum_steps = 32  # 128 sequences per micro-batch
    c.optim.learning_rate = 5e-4  # --learning_rate
    c.optim.warmup_steps = 300  # --warmup_prop 0.05 of num_steps
    c.optim.grad_clip_norm = 5.0  # --max_grad_norm
    c.optim.weight_decay = 0.0  # --weight_decay
    c.optim.eps = 1e-6  # --adam_epsilon
    # ~3 epochs (--n_epoch 3) of the 3.3B-word BookCorpus + Wikipedia corpus at 4K x 512 tokens
    # (an estimate from the paper's corpus size; the shared data here is the Austen novels).
    c.num_steps = 6000
    c.distill = common.distill_config(teacher_layers=(0, 2, 4, 7, 9, 11))
  else:
    # CPU: a 2-layer student of the tiny BERT teacher (`:teacher_tiny`, 4 layers), taking teacher
    # layers 0 and 2; BERT-shaped (token types) so embeddings copy exactly.
    c = _tiny_bert(num_layers=2)
    c.distill = common.distill_config(teacher='workdirs/distill/teacher', teacher_layers=(0, 2))
  c.task = 'distill'
  c.data.mlm_pairs = ''  # no NSP
  return c


def _tiny_bert(num_layers: int) -> ml_collections.ConfigDict:
  """A tiny BERT-shaped MLM encoder on the Austen novels (teacher and students of the CPU runs)."""
  from flaxformer_lab.presets import bert  # pylint: disable=g-import-not-at-top
  c = bert.get_config('tiny')
  c.model.update(num_layers=num_layers, head='mlm', pooler=False)
  c.data.mlm_pairs = ''  # masked LM only
  c.data.seq_len = 128  # fits the 128-row position table
  c.batch_size = 32  # CPU-sized
  c.num_steps = 1000  # optimizer updates
  c.optim.learning_rate = 1e-3  # a small model tolerates a large step
  c.optim.warmup_steps = 50
  c.eval_every = 250
  c.data.eval_batches = 16  # 512 held-out sequences
  return c
