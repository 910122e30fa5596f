"""Shared pieces of every config file: argument parsing, model defaults, and the training sections.

A config file exposes `get_config(arg)`; `arg` is the text after the colon in
`--config=configs/bert.py:base` (a bare variant name, or `key=value,...` pairs, big_vision style).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from flaxformer_lab.models.config import ModelConfig


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `variant` or `variant=base,key=value,flag` into a ConfigDict of typed values.

  A bare first word sets `variant`; `key` alone sets a boolean True; values are converted to the type
  of the default. An unknown key is an error naming the valid ones.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for i, part in enumerate(p for p in arg.split(',') if p):
    if '=' not in part:
      if i == 0 and 'variant' in defaults and part not in defaults:
        key, value = 'variant', part
      else:
        key, value = part, 'True'
    else:
      key, value = part.split('=', 1)
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r}; valid: {", ".join(sorted(defaults))}')
    default = defaults[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ('1', 'true', 'yes')
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  return out


def parse_stage_arg(arg: str | None, *, name: str, variants: dict[str, dict[str, Any]],
                    stages: tuple[str, ...], needs: tuple[tuple[tuple[str, ...], str, str], ...] = (),
                    **defaults: Any) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """The argument of a staged experiment's config.py: (parsed arguments, the variant's sizes).

  `variant` (a key of `variants`, default 'default') and `stage` (one of `stages`, default the
  first) come with every such config; `defaults` adds the experiment's own keys. `needs` lists
  (stages, key, what): in those stages `key` must be given (it names `what`, e.g. the directory of
  an earlier stage's sweep). Each rule broken is one ValueError naming the key and what to add.
  """
  a = parse_arg(arg, variant='default', stage=stages[0], **defaults)
  if a.variant not in variants:
    raise ValueError(f'unknown {name} variant {a.variant!r}; choose from {", ".join(variants)}')
  if a.stage not in stages:
    raise ValueError(f'unknown stage {a.stage!r}; choose from {", ".join(stages)}')
  for in_stages, key, what in needs:
    if a.stage in in_stages and not a[key]:
      raise ValueError(f'stage={a.stage} needs {what}: add ,{key}=<dir>')
  return a, dict(variants[a.variant])


def short_run_schedule(c: ml_collections.ConfigDict, warmup: int) -> ml_collections.ConfigDict:
  """Sets an experiment run's cadence from `c.num_steps`: warmup (at most a tenth of the steps),
  four evaluations, one checkpoint kept at the end, twenty log lines."""
  c.optim.warmup_steps = max(1, min(warmup, c.num_steps // 10 or 1))
  c.eval_every = max(1, c.num_steps // 4)
  c.checkpoint_every = c.num_steps
  c.keep_checkpoints = 1
  c.log_every = max(1, c.num_steps // 20)
  return c


def model_config(**overrides: Any) -> ml_collections.ConfigDict:
  """The model section: every `ModelConfig` field with its default, then `overrides`.

  Field meanings are documented next to each field in `flaxformer_lab/models/config.py`.
  """
  cfg = ModelConfig().to_dict()
  for key in overrides:
    if key not in cfg:
      raise KeyError(f'unknown model field {key!r}')
  cfg.update(overrides)
  # final_norm may be None (derived from norm_position); keep it typed so overrides work.
  d = ml_collections.ConfigDict(cfg)
  return d


def default_data_dir() -> str:
  """$FLAXFORMER_DATA, else ../shared/data beside the repository when it exists, else ''."""
  env = os.environ.get('FLAXFORMER_DATA')
  if env:
    return env
  # flaxformer_lab/presets/common.py -> the repository root -> ../shared/data beside it.
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  shared = os.path.join(os.path.dirname(root), 'shared', 'data')
  return shared if os.path.isdir(shared) else ''


def data_config(**overrides: Any) -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.name = 'tiny_shakespeare'  # tiny_shakespeare | multi30k | sst2 | ag_news | synthetic_copy | ...
  d.manual_dir = default_data_dir()  # where the raw files are read from (no download when present)
  d.download = False  # with manual_dir '': fetch the raw files from the public source (else an error)
  d.data_dir = os.environ.get('FLAXFORMER_TFDS_DIR', os.path.expanduser('~/tensorflow_datasets'))
  d.tokenizer = 'byte'  # byte | char | sentencepiece | wordpiece (BERT) | bpe (byte-level, RoBERTa)
  d.sp_vocab_size = 8000  # SentencePiece vocabulary size (trained on the training split, cached)
  d.tokenizer_vocab_size = 0  # vocabulary of a trained sentencepiece / wordpiece / bpe (0 = sp_vocab_size)
  d.tokenizer_from = ''  # reuse the tokenizer of a run dir or hf:<dir> ('' = init_from's, else train)
  d.sp_model_type = 'unigram'  # unigram | bpe
  d.source_lang = 'de'  # translation source (multi30k: en | de | fr)
  d.target_lang = 'en'  # translation target
  d.seq_len = 256  # tokens per example (decoder) or encoder input length
  d.target_len = 0  # decoder length of an encoder_decoder (0 = seq_len)
  d.pack = True  # pack several examples per row with segment ids (LM, seq2seq)
  d.shuffle_seed = 0  # seed of the deterministic shuffle
  d.num_workers = 0  # grain worker processes (0 = in the main process)
  d.eval_split = 'validation'  # split used by periodic evaluation
  d.eval_batches = 8  # batches per evaluation (0 = whole split)
  d.max_examples = 0  # read only the first N examples of each split (0 = all); quick runs and tests
  d.sp_input_sentence_size = 1_000_000  # lines sampled to train SentencePiece (0 = all)
  d.mlm_probability = 0.15  # mlm: fraction of real tokens selected (80% [MASK], 10% random, 10% kept)
  d.mlm_pairs = ''  # mlm: '' (single segments) | nsp (next-sentence) | sop (sentence-order) pair_label
  d.max_predictions_per_seq = 0  # mlm: cap on selected tokens per sequence (BERT: 20 at 128); 0 = none
  d.mlm_masking = 'dynamic'  # mlm: dynamic (new mask per read) | static (fixed per example, BERT's data)
  d.mlm_dupe_factor = 1  # mlm static masking: fixed masks per example, one drawn per read (BERT: 10)
  d.mlm_max_ngram = 1  # mlm: mask spans of n <= this tokens, p(n) ~ 1/n (ALBERT: 3); 1 = single tokens
  d.mlm_inputs = 'doc_sentences'  # mlm: doc_sentences (one document per row) | full_sentences (RoBERTa)
  d.corpora = ''  # multilingual: monolingual columns '<parallel data set>.<lang>,...' (multi30k.en, ...)
  d.language_alpha = 0.3  # multilingual: sample language i with q_i ~ (n_i / sum n)^alpha (XLM-R 0.3)
  d.noise_density = 0.15  # span_corruption: fraction of tokens in noise spans (T5)
  d.mean_noise_span_length = 3.0  # span_corruption: mean length of a noise span (T5)
  d.mlm_steps = ''  # xlm: batch kinds in a fixed cycle, 'en,de,en-de' = MLM en, MLM de, TLM en-de
  d.synthetic_train_size = 10_000  # synthetic_*: training examples (synthetic_lm: lines of the stream)
  d.synthetic_eval_size = 500  # synthetic_*: validation and test examples
  d.synthetic_min_len = 2  # synthetic_*: shortest random string
  d.synthetic_max_len = 20  # synthetic_*: longest random string
  d.update(overrides)
  return d


# Fine-tuning data sets of the classification presets: name -> (evaluation split, classes).
CLASSIFICATION_DATA = {
    'sst2': ('validation', 2),  # binary sentiment; 'test' is GLUE's SST-2 dev set
    'ag_news': ('test', 4),  # four news topics; the alps subset has no validation split
}


def classification_data(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Points classification config `c` at data set `name`: its evaluation split and its number of
  labels (the head's num_labels) come with it."""
  if name not in CLASSIFICATION_DATA:
    raise ValueError(f'unknown classification data set {name!r}; choose from '
                     f'{", ".join(CLASSIFICATION_DATA)}')
  c.data.name = name
  c.data.eval_split, c.model.num_labels = CLASSIFICATION_DATA[name]
  return c


def optim_config(**overrides: Any) -> ml_collections.ConfigDict:
  o = ml_collections.ConfigDict()
  o.name = 'adamw'  # adamw | adafactor | lamb
  o.learning_rate = 1e-3  # peak learning rate
  o.schedule = 'cosine'  # constant | rsqrt (warmup then inverse sqrt) | linear (warmup, linear decay) | cosine
  o.warmup_steps = 100  # linear warmup length (0 allowed)
  o.end_lr_fraction = 0.0  # final lr as a fraction of the peak (linear, cosine)
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 0.01  # decoupled weight decay; never applied to norms and biases
  o.grad_clip_norm = 1.0  # clip by global norm (0 = off)
  # adafactor: step relative to each parameter's RMS (T5, whose init has RMS ~1 embeddings) |
  # False: absolute steps (Hugging Face's T5 setting scale_parameter=False, relative_step=False)
  o.adafactor_param_scale = True
  o.grad_accum_steps = 1  # micro-batches accumulated per update
  o.update(overrides)
  return o


def mesh_config(**overrides: Any) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 fills the remaining devices
  m.axis_names = ('data', 'fsdp', 'tensor')
  m.update(overrides)
  return m


def logical_axis_rules() -> tuple[tuple[str, Any], ...]:
  """Logical axis -> mesh axes. Model code only names logical axes; this table maps them."""
  return (
      ('batch', ('data', 'fsdp')),
      ('activation_batch', ('data', 'fsdp')),
      ('activation_length', None),
      ('activation_embed', None),
      ('activation_heads', 'tensor'),
      ('activation_kv', None),
      ('activation_mlp', 'tensor'),
      ('activation_vocab', 'tensor'),
      ('vocab', 'tensor'),
      ('embed', 'fsdp'),
      ('mlp', 'tensor'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('kv', None),
      ('qkv', None),
      ('layers', None),
      ('groups', None),
      ('positions', None),
      ('relpos_buckets', None),
      ('type_vocab', None),
      ('classes', None),
      ('norm', None),
      ('factor_embed', None),
  )


def metrics_eval(c: ml_collections.ConfigDict, **overrides: Any) -> ml_collections.ConfigDict:
  """An evaluation of the objective's metrics; by default on data.eval_split every eval_every
  steps over data.eval_batches batches (their values when called)."""
  e = ml_collections.ConfigDict()
  e.type = 'metrics'
  e.every = c.eval_every
  e.split = c.data.eval_split
  e.max_batches = c.data.eval_batches
  e.seq_len = 0  # evaluation length (0 = data.seq_len)
  e.prefix = 'eval'  # scalars are written as <prefix>/<metric>
  e.update(overrides)
  return e


def bleu_eval(c: ml_collections.ConfigDict, every: int, **overrides: Any
              ) -> ml_collections.ConfigDict:
  """sacreBLEU of greedy decoding on the eval split (encoder_decoder presets)."""
  e = ml_collections.ConfigDict()
  e.type = 'bleu'
  e.every = every  # steps between BLEU evaluations
  e.split = c.data.eval_split
  e.max_batches = c.data.eval_batches
  e.strategy = 'greedy'  # greedy | beam
  e.num_beams = 4
  e.length_penalty = 0.6
  e.prefix = 'eval'
  e.update(overrides)
  return e


def samples_eval(every: int, **overrides: Any) -> ml_collections.ConfigDict:
  """A sampled continuation written to the log (decoder presets)."""
  e = ml_collections.ConfigDict()
  e.type = 'samples'
  e.every = every  # steps between samples
  e.prompt = ''  # '' = unconditional, from BOS
  e.max_new_tokens = 64
  e.temperature = 0.8
  e.top_k = 0
  e.top_p = 0.95
  e.prefix = 'eval'
  e.update(overrides)
  return e


def distill_config(**overrides: Any) -> ml_collections.ConfigDict:
  """The distillation section (config.task='distill'; flaxformer_lab/tasks/distill.py)."""
  d = ml_collections.ConfigDict()
  d.teacher = ''  # a lab run directory of an MLM encoder, or hf:<dir> (*ForMaskedLM)
  d.temperature = 2.0  # softmax temperature T of the soft-target term
  d.alpha_ce = 5.0  # weight of KL(teacher_T || student_T) * T^2
  d.alpha_mlm = 2.0  # weight of the student's own MLM cross entropy
  d.alpha_cos = 1.0  # weight of 1 - cos(last hidden states)
  d.restrict_ce_to_mask = False  # KL over masked positions only (script default: all real tokens)
  d.student_init = 'teacher_layers'  # teacher_layers (copy the named layers) | none
  d.teacher_layers = (0, 2, 4, 7, 9, 11)  # student layer i <- teacher layer teacher_layers[i]
  d.update(overrides)
  return d


def base_config(model: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """A complete training config: model, task, data, optimizer, mesh and loop settings."""
  c = ml_collections.ConfigDict()
  c.model = model if model is not None else model_config()
  c.task = 'lm'  # lm | seq2seq | classification | mlm (the objective; see flaxformer_lab/tasks)
  c.data = data_config()
  c.optim = optim_config()
  c.mesh = mesh_config()
  c.logical_axis_rules = logical_axis_rules()
  c.seed = 0  # parameter init and dropout seed
  c.batch_size = 32  # global batch (examples per update, summed over devices and processes)
  c.num_steps = 1000  # optimizer updates
  c.log_every = 50  # steps between training metric lines
  c.eval_every = 250  # steps between evaluations (0 = only at the end)
  c.checkpoint_every = 500  # steps between checkpoints
  c.keep_checkpoints = 3  # the last K checkpoints are kept
  c.async_checkpoints = True  # orbax saves in the background
  c.label_smoothing = 0.0  # seq2seq/LM cross entropy label smoothing
  c.init_from = ''  # '' | hf:<dir> (Hugging Face checkpoint) | a lab workdir to start from
  # Evaluations (flaxformer_lab/evals.py): name -> {type, every, ...}; the objective adds its
  # defaults for names not given here. every: k > 0 every k steps and at the end, 0 only at the
  # end, < 0 never. Types: metrics (split, max_batches, seq_len), bleu (split, max_batches,
  # strategy, num_beams), samples (prompt, max_new_tokens, temperature, top_k, top_p),
  # teacher_agreement (split, max_batches).
  # The default evaluation, `eval` (metrics on data.eval_split every eval_every steps over
  # data.eval_batches batches), comes from the objective; entries here add to it or replace it.
  c.evals = ml_collections.ConfigDict()
  c.rng_impl = 'threefry2x32'  # PRNG of dropout keys: threefry2x32 | rbg | unsafe_rbg
  c.progress = 'auto'  # auto | bar | lines | off
  c.stop_at_step = 0  # save and exit after this step as if preempted (0 = run to num_steps)
  c.sweep = ml_collections.ConfigDict()  # set by `python -m flaxformer_lab.sweep`; kept in config.json
  c.sweep.name = ''  # the sweep this run belongs to ('' = not a sweep run)
  c.sweep.run = ''  # the run's name within the sweep (its directory name)
  c.sweep.coordinates = '{}'  # JSON: the run's overrides {dotted key: value}
  c.wandb = ml_collections.ConfigDict()  # Weights & Biases logging (optional `wandb` package)
  c.wandb.project = ''  # '' = off
  c.wandb.entity = ''  # team or user ('' = the default of the logged-in account)
  c.wandb.group = ''  # runs grouped under this name ('' = sweep.name)
  c.wandb.mode = ''  # online | offline | disabled ('' = wandb's default / $WANDB_MODE)
  return c
