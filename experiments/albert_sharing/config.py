r"""ALBERT's two parameter reductions at CPU scale: {no sharing, all layers shared} x {embedding
size E = d_model, factorized E < d_model}, each pre-trained with ALBERT's recipe and fine-tuned on
SST-2.

Claim under test (Lan et al., 2020, Tables 3 and 4): sharing every layer's weights (ALBERT base 12M
vs BERT base 108M parameters) costs a little accuracy; factorizing the embedding (E = 128 vs 768)
costs little. Every arm is the `albert.py:pretrain_tiny` recipe (masked LM + sentence-order
prediction, n-gram masking n <= 3, static masks, SentencePiece 2,000 on the Austen novels, LAMB),
d_model 64, 4 layers, 4 heads, MLP 256; the arms set `model.share_layers` (0 = none, 1 = one
group for all layers) and `model.emb_dim` (0 = d_model, else E).

Two stages, each a sweep (the second reads the first's runs):

  # 1. pre-training of the four arms
  python -m flaxformer_lab.sweep --sweep=experiments/albert_sharing/config.py:stage=pretrain \
      --workdir=workdirs/albert_sharing/pretrain --parallel=2
  # 2. SST-2 fine-tuning of each (init_from; fresh classifier on the pooler)
  python -m flaxformer_lab.sweep --sweep=experiments/albert_sharing/config.py:stage=finetune,pretrained=workdirs/albert_sharing/pretrain \
      --workdir=workdirs/albert_sharing/finetune --parallel=2
  # 3. the table (parameters, held-out MLM loss, SST-2 accuracy) and the bar plot
  python experiments/albert_sharing/analyze.py --pretrain=workdirs/albert_sharing/pretrain \
      --finetune=workdirs/albert_sharing/finetune --out=experiments/albert_sharing

Arguments (after the colon): stage=pretrain|finetune, pretrained=<sweep dir of stage 1>, a variant
(default: CPU-sized; smoke: seconds per run, for the tests; gpu: larger, not run) and key=value
size overrides: `:stage=pretrain,steps=100`, `:stage=finetune,pretrained=...,finetune_steps=50`.
"""

from flaxformer_lab.presets import albert
from flaxformer_lab.presets import common
from flaxformer_lab.sweeps import results
from flaxformer_lab.sweeps import zipped

# Per-variant sizes: body, factorized E, pre-training / fine-tuning steps, eval batches, and the
# pre-training paragraphs read (data.max_examples, the tokenizer's text too; 0 = all).
VARIANTS = {
    'default': dict(d_model=64, layers=4, heads=4, emb_dim=16, pretrain_steps=150,
                    finetune_steps=100, eval_batches=8, warmup=10, examples=0),
    'smoke': dict(d_model=32, layers=2, heads=2, emb_dim=8, pretrain_steps=4, finetune_steps=3,
                  eval_batches=1, warmup=1, examples=400),
    'gpu': dict(d_model=256, layers=6, heads=4, emb_dim=64, pretrain_steps=10000,
                finetune_steps=2000, eval_batches=64, warmup=250, examples=0),
}
STAGES = ('pretrain', 'finetune')
# The arms, in the table's order: name -> (model.share_layers, factorized?).
ARMS = {
    'not_shared_E=H': (0, False),
    'not_shared_factorized': (0, True),
    'shared_E=H': (1, False),
    'shared_factorized': (1, True),
}


def _arg(arg):
  return common.parse_stage_arg(
      arg, name='albert_sharing', variants=VARIANTS, stages=STAGES,
      needs=((('finetune',), 'pretrained', 'the pre-training sweep directory'),),
      pretrained='', steps=0, finetune_steps=0, seed=0)


def arm_overrides(v) -> list[dict]:
  """The model fields of each arm (ARMS order)."""
  return [{'model.share_layers': share, 'model.emb_dim': v['emb_dim'] if fact else 0}
          for share, fact in ARMS.values()]


def _pretrain(v):
  c = albert.get_config('pretrain_tiny')
  c.model.update(d_model=v['d_model'], num_layers=v['layers'], num_heads=v['heads'],
                 mlp_dim=4 * v['d_model'], emb_dim=v['emb_dim'], share_layers=1)
  return c


def get_config(arg=None):
  """Stage 1: ALBERT's tiny pre-training; stage 2: SST-2 on the same body (the arms switch
  share_layers / emb_dim, and in stage 2 the source run)."""
  a, v = _arg(arg)
  pre = _pretrain(v)
  if a.stage == 'pretrain':
    c = pre
    c.num_steps = a.steps or v['pretrain_steps']
    c.data.eval_batches = v['eval_batches']
    c.data.max_examples = v['examples']
  else:
    c = albert.get_config('tiny,task=classification')  # SST-2, AdamW, batch 16
    body = pre.model.to_dict()
    body.update(head='classification', num_labels=2)  # fresh classifier on the pooler
    c.model = common.model_config(**body)
    c.data.tokenizer = pre.data.tokenizer  # sentencepiece: init_from carries the run's own
    c.data.tokenizer_vocab_size = pre.data.tokenizer_vocab_size
    c.data.eval_split = 'test'  # 872 sentences = GLUE's SST-2 dev set
    c.data.eval_batches = 0  # the whole split
    c.num_steps = a.finetune_steps or v['finetune_steps']
    c.optim.learning_rate = 1e-3  # a tiny body: the rate of experiments/finetune_from_pretraining
  c.seed = a.seed
  c.progress = 'lines'
  return common.short_run_schedule(c, v['warmup'])


def arm_of(model: dict) -> str:
  """The arm name of a run's model config (share_layers, emb_dim)."""
  fact = bool(model.get('emb_dim')) and model['emb_dim'] != model['d_model']
  for name, spec in ARMS.items():
    if spec == (model.get('share_layers', 0), fact):
      return name
  raise ValueError(f'no arm has share_layers={model.get("share_layers")}, emb_dim={model.get("emb_dim")}')


def pretrain_runs(pretrain_dir: str) -> dict[str, str]:
  """Arm name -> run directory of a stage-1 sweep (read from each run's own config.json)."""
  return results.runs_by_config(pretrain_dir, lambda c: arm_of(c['model']), order=ARMS)


def get_sweep(arg=None):
  a, v = _arg(arg)
  arms = arm_overrides(v)
  if a.stage == 'pretrain':
    return zipped({k: [arm[k] for arm in arms] for k in arms[0]})
  runs = pretrain_runs(a.pretrained)
  missing = [arm for arm in ARMS if arm not in runs]
  if missing:
    raise ValueError(f'{a.pretrained} has no run of the arm(s) {", ".join(missing)}: run '
                     'stage=pretrain there first')
  cols = {k: [arm[k] for arm in arms] for k in arms[0]}
  cols['init_from'] = [runs[arm] for arm in ARMS]
  return zipped(cols)


def get_plots(arg=None):
  del arg
  return {'x': 'step', 'color': 'model.share_layers', 'style': 'model.emb_dim'}
