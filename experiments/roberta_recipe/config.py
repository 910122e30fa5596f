r"""RoBERTa's two data-recipe changes at CPU scale: static vs dynamic masking, and BERT's segment
pairs with NSP vs FULL-SENTENCES without NSP; each pre-trained arm then fine-tuned on SST-2.

Claims under test (Liu et al. 2019): Table 1 -- dynamic masking is comparable to static masking or
slightly better; Table 2 -- FULL-SENTENCES inputs without the NSP loss beat BERT's SEGMENT-PAIR
inputs with NSP (on SQuAD, MNLI, SST-2, RACE).

Four pre-training arms of one tiny post-LN BERT (`bert:pretrain_tiny`: WordPiece 2,000, 2 layers,
d 64, Austen novels, 128 tokens, at most 20 predictions per row), the same steps, batch and
optimizer for all; only the data recipe changes:

  bert          static masks (dupe_factor 10) + segment pairs (doc_sentences) + NSP (head mlm_nsp)
  dynamic_nsp   dynamic masks               + segment pairs + NSP
  static_full   static masks (dupe_factor 10) + FULL-SENTENCES, no NSP (head mlm)
  roberta       dynamic masks               + FULL-SENTENCES, no NSP (head mlm)

  # 1. pre-training (4 runs)
  python -m flaxformer_lab.sweep --sweep=experiments/roberta_recipe/config.py \
      --workdir=workdirs/roberta_recipe/pretrain --parallel=2
  # 2. SST-2 fine-tuning of each (init_from: body and WordPiece tokenizer; classifier fresh)
  python -m flaxformer_lab.sweep --sweep=experiments/roberta_recipe/config.py:stage=finetune,pretrain=workdirs/roberta_recipe/pretrain \
      --workdir=workdirs/roberta_recipe/finetune --parallel=2
  # 3. the table and the plot
  python experiments/roberta_recipe/analyze.py --pretrain=workdirs/roberta_recipe/pretrain \
      --finetune=workdirs/roberta_recipe/finetune --out=experiments/roberta_recipe

Held-out MLM loss: `shared/mlm_loss` of each pre-training run's last evaluation: the whole
validation split as FULL-SENTENCES rows with one fixed mask each (SHARED_EVAL), the same rows for
every arm (`eval/mlm_loss` is each arm's loss on its own input format).
Arguments (after the colon): stage=pretrain|finetune, pretrain=<sweep dir of stage 1>, a variant
(default: CPU-sized; smoke: seconds per run, for the tests; gpu: larger), and size overrides:
`:steps=300`, `:finetune_steps=200`, `:examples=2000` (0 = every paragraph), `:seed=1`.
"""

from flaxformer_lab.presets import bert
from flaxformer_lab.presets import common
from flaxformer_lab.sweeps import results
from flaxformer_lab.sweeps import zipped

# Per-variant sizes: pre-training steps, fine-tuning steps, eval batches, warmup.
# examples: the first N Austen paragraphs (data.max_examples; 0 = all 11k), so that the default's
# 3,000 steps x 16 rows are ~32 epochs of segment pairs (~48 of FULL-SENTENCES rows): every static
# mask is read about 3 times, the regime where RoBERTa's static/dynamic comparison can differ
# (the paper: dupe_factor 10 over 40 epochs, each mask 4 times).
VARIANTS = {
    'default': dict(steps=3000, finetune_steps=1000, eval_batches=8, warmup=100, examples=1000),
    'smoke': dict(steps=4, finetune_steps=3, eval_batches=1, warmup=1, examples=200),
    'gpu': dict(steps=20000, finetune_steps=2000, eval_batches=64, warmup=1000, examples=0),
}
# The evaluation every arm shares: the same validation rows (FULL-SENTENCES, no pairs, one fixed
# mask per row), whatever the arm trained on; `shared/mlm_loss` is the table's held-out MLM loss.
SHARED_EVAL = dict(mlm_inputs='full_sentences', mlm_pairs='', mlm_masking='static',
                   mlm_dupe_factor=1)
STAGES = ('pretrain', 'finetune')
# The arms, in the table's order: name -> (data.mlm_masking, data.mlm_pairs, data.mlm_inputs,
# model.head).
ARMS = {
    'bert': ('static', 'nsp', 'doc_sentences', 'mlm_nsp'),
    'dynamic_nsp': ('dynamic', 'nsp', 'doc_sentences', 'mlm_nsp'),
    'static_full': ('static', '', 'full_sentences', 'mlm'),
    'roberta': ('dynamic', '', 'full_sentences', 'mlm'),
}
KEYS = ('data.mlm_masking', 'data.mlm_pairs', 'data.mlm_inputs', 'model.head')


def _arg(arg):
  return common.parse_stage_arg(
      arg, name='roberta_recipe', variants=VARIANTS, stages=STAGES,
      needs=((('finetune',), 'pretrain', 'the pre-training sweep directory'),),
      pretrain='', steps=0, finetune_steps=0, examples=-1, seed=0)


def _pretrain_config(a, v):
  c = bert.get_config('pretrain_tiny')  # static + dupe 10 + NSP: the `bert` arm; sweep switches
  if a.variant == 'gpu':
    c.model.update(d_model=256, num_layers=4, num_heads=4, mlp_dim=1024)
    c.batch_size = 64
  c.data.eval_batches = v['eval_batches']
  c.data.max_examples = v['examples'] if a.examples < 0 else a.examples
  return c


def get_config(arg=None):
  """Stage 1: the BERT-recipe pre-training run (the sweep switches the data recipe per arm);
  stage 2: the SST-2 classifier on its body (the sweep switches init_from)."""
  a, v = _arg(arg)
  pre = _pretrain_config(a, v)
  if a.stage == 'pretrain':
    c = pre
    c.num_steps = a.steps or v['steps']
  else:
    c = bert.get_config('tiny,task=classification')  # SST-2, batch 16, AdamW 1e-3
    body = pre.model.to_dict()
    body.update(head='classification', num_labels=2)  # fresh classifier on the pooler
    c.model = common.model_config(**body)
    c.data.tokenizer = pre.data.tokenizer  # wordpiece: init_from carries the run's own
    c.data.eval_split = 'test'  # 872 sentences = GLUE's SST-2 dev set
    c.data.eval_batches = 0  # the whole split
    c.num_steps = a.finetune_steps or v['finetune_steps']
  c.seed = a.seed
  c.progress = 'lines'
  common.short_run_schedule(c, v['warmup'])
  if a.stage == 'pretrain':
    with c.unlocked():  # the whole validation split (max_batches 0), at every evaluation
      c.evals.shared = common.metrics_eval(c, prefix='shared', max_batches=0, data=SHARED_EVAL)
  return c


def arm_of(cfg: dict) -> str | None:
  """The arm name of a run's config.json (None if it is none of ARMS)."""
  d, m = cfg['data'], cfg['model']
  key = (d.get('mlm_masking'), d.get('mlm_pairs'), d.get('mlm_inputs'), m.get('head'))
  for arm, spec in ARMS.items():
    if spec == key:
      return arm
  return None


def pretrain_runs(pretrain_dir: str) -> dict[str, str]:
  """Arm name -> run directory of a stage-1 sweep (read from each run's config.json)."""
  return results.runs_by_config(pretrain_dir, arm_of, order=ARMS)  # the table's order


def get_sweep(arg=None):
  a, _ = _arg(arg)
  if a.stage == 'pretrain':
    cols = list(zip(*ARMS.values()))
    return zipped({k: list(col) for k, col in zip(KEYS, cols)})
  runs = pretrain_runs(a.pretrain)
  missing = [arm for arm in ARMS if arm not in runs]
  if missing:
    raise ValueError(f'{a.pretrain} has no run of the arm(s) {", ".join(missing)}: run '
                     'stage=pretrain there first')
  return zipped({'init_from': [runs[arm] for arm in ARMS]})


def get_plots(arg=None):
  a, _ = _arg(arg)
  return {'color': 'init_from' if a.stage == 'finetune' else 'data.mlm_inputs'}
