r"""DistilBERT at CPU scale: a tiny BERT teacher, three half-depth students, each fine-tuned on SST-2.

Claim under test (Sanh et al. 2019): a student of half the teacher's depth, distilled with the
triple loss (soft-target KL at temperature T, its own MLM loss, cosine of the hidden states) and
initialized from every other teacher layer, keeps 97% of the teacher's downstream score with 40%
fewer parameters and runs 60% faster; the ablation (its Table 4) says the teacher-layer
initialization matters most (-3.7 GLUE points without it).

Three stages, each a sweep (the second reads the first's run, the third the first two's):

  # 1. the teacher: a 4-layer tiny BERT (d 64), MLM on the Austen novels, byte tokenizer
  python -m flaxformer_lab.sweep --sweep=experiments/distillation/config.py:stage=teacher \
      --workdir=workdirs/distillation/teacher
  # 2. three 2-layer students for the same steps: (a) distilled + teacher-layer init (layers 0, 2,
  #    embeddings and head), (b) distilled from a random init, (c) MLM alone from a random init
  python -m flaxformer_lab.sweep --sweep=experiments/distillation/config.py:stage=students,teacher=workdirs/distillation/teacher/seed=0 \
      --workdir=workdirs/distillation/students --parallel=2
  # 3. SST-2 fine-tuning of the teacher and of each student (init_from; classifier fresh)
  python -m flaxformer_lab.sweep --sweep=experiments/distillation/config.py:stage=finetune,teacher=workdirs/distillation/teacher/seed=0,students=workdirs/distillation/students \
      --workdir=workdirs/distillation/finetune --parallel=2
  # 4. the table (parameters, CPU inference tokens/s measured interleaved, held-out MLM loss,
  #    SST-2 accuracy as a percentage of the teacher's) and the plots
  python experiments/distillation/analyze.py --teacher=workdirs/distillation/teacher/seed=0 \
      --students=workdirs/distillation/students --finetune=workdirs/distillation/finetune \
      --out=experiments/distillation

Arguments (after the colon): stage=teacher|students|finetune, teacher=<run dir>, students=<sweep
dir>, a variant (default: CPU-sized; smoke: seconds per run, for the tests; gpu: larger), and
key=value size overrides: `:stage=students,teacher=...,steps=200`.
"""

import os

from flaxformer_lab.presets import bert
from flaxformer_lab.presets import common
from flaxformer_lab.presets import distilbert
from flaxformer_lab.sweeps import product
from flaxformer_lab.sweeps import results
from flaxformer_lab.sweeps import zipped

# Per-variant sizes: teacher / student pre-training steps, fine-tuning steps, eval batches.
VARIANTS = {
    'default': dict(teacher_steps=600, student_steps=300, finetune_steps=1000, eval_batches=16,
                    warmup=25, layers=4, d_model=64),
    'smoke': dict(teacher_steps=6, student_steps=4, finetune_steps=4, eval_batches=2, warmup=1,
                  layers=4, d_model=64),
    'gpu': dict(teacher_steps=20000, student_steps=10000, finetune_steps=2000, eval_batches=64,
                warmup=500, layers=6, d_model=256),
}
STAGES = ('teacher', 'students', 'finetune')
# The student arms of stage 2, in the table's order: name -> (task, distill.student_init).
STUDENTS = {
    'distilled': ('distill', 'teacher_layers'),
    'distilled_no_init': ('distill', 'none'),
    'scratch_mlm': ('mlm', 'none'),
}


def _arg(arg):
  return common.parse_stage_arg(
      arg, name='distillation', variants=VARIANTS, stages=STAGES,
      needs=((('students', 'finetune'), 'teacher', 'the teacher run (stage 1)'),
             (('finetune',), 'students', 'the students sweep directory (stage 2)')),
      teacher='', students='', steps=0, finetune_steps=0, seed=0)


def teacher_layers(v) -> tuple[int, ...]:
  """Every other teacher layer (DistilBERT's initialization), one per student layer."""
  return tuple(range(0, v['layers'], 2))


def _body(c, v, num_layers):
  c.model.update(num_layers=num_layers, d_model=v['d_model'], num_heads=4,
                 mlp_dim=4 * v['d_model'])
  c.data.eval_batches = v['eval_batches']
  c.progress = 'lines'
  return c


def get_config(arg=None):
  """Stage 1: the teacher; stage 2: the distilled student (arms switch task/init); stage 3: the
  SST-2 classifier on the teacher's body shape (arms switch the source run and depth)."""
  a, v = _arg(arg)
  if a.stage == 'teacher':
    c = _body(distilbert.get_config('teacher_tiny'), v, v['layers'])
    c.num_steps = a.steps or v['teacher_steps']
  elif a.stage == 'students':
    c = _body(distilbert.get_config('distill_tiny'), v, v['layers'] // 2)
    c.distill.teacher = a.teacher
    c.distill.teacher_layers = teacher_layers(v)
    c.num_steps = a.steps or v['student_steps']
  else:
    pre = _body(distilbert.get_config('teacher_tiny'), v, v['layers'])
    c = bert.get_config('tiny,task=classification')  # SST-2, batch 16, AdamW 1e-3, 10% warmup
    body = pre.model.to_dict()
    body.update(head='classification', num_labels=2)  # fresh classifier on the first token
    c.model = common.model_config(**body)
    c.data.tokenizer = pre.data.tokenizer  # byte: init_from carries the run's own
    c.data.eval_split = 'test'  # 872 sentences = GLUE's SST-2 dev set
    c.data.eval_batches = 0  # the whole split
    c.num_steps = a.finetune_steps or v['finetune_steps']
    c.progress = 'lines'
  c.seed = a.seed
  return common.short_run_schedule(c, v['warmup'])


def student_runs(students_dir: str) -> dict[str, str]:
  """Arm name -> run directory of a stage-2 sweep (read from each run's own config.json)."""
  arm_of = {spec: arm for arm, spec in STUDENTS.items()}
  return results.runs_by_config(
      students_dir, lambda c: arm_of.get((c['task'], c.get('distill', {}).get('student_init', 'none'))),
      order=STUDENTS)  # the table's order


def get_sweep(arg=None):
  a, v = _arg(arg)
  if a.stage == 'teacher':
    return product({'seed': [a.seed]})
  if a.stage == 'students':
    tasks, inits = zip(*STUDENTS.values())
    return zipped({'task': list(tasks), 'distill.student_init': list(inits)})
  runs = student_runs(a.students)
  missing = [arm for arm in STUDENTS if arm not in runs]
  if missing:
    raise ValueError(f'{a.students} has no run of the student arm(s) {", ".join(missing)}: run '
                     'stage=students there first')
  sources = [a.teacher] + [runs[arm] for arm in STUDENTS]
  depths = [v['layers']] + [v['layers'] // 2] * len(STUDENTS)
  return zipped({'init_from': sources, 'model.num_layers': depths})


def get_plots(arg=None):
  a, _ = _arg(arg)
  return {'color': 'init_from' if a.stage == 'finetune' else 'task'}
