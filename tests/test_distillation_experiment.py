"""experiments/distillation: the three `:smoke` sweeps (teacher, students, fine-tuning) end to end
through `python -m flaxformer_lab.sweep`, then analyze.py's table with every arm present."""

import csv
import json
import os
import subprocess
import sys

import pytest

from experiments.distillation import config as exp_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = 'experiments/distillation/config.py:smoke'


def _sweep(arg, workdir, env):
  r = subprocess.run([sys.executable, '-m', 'flaxformer_lab.sweep', f'--sweep={SWEEP},{arg}',
                      f'--workdir={workdir}', '--parallel=2'], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_stage_arguments_are_checked():
  with pytest.raises(ValueError, match='teacher='):
    exp_config.get_sweep('smoke,stage=students')
  with pytest.raises(ValueError, match='students='):
    exp_config.get_sweep('smoke,stage=finetune,teacher=x')
  with pytest.raises(ValueError, match='unknown stage'):
    exp_config.get_config('stage=nope')


def test_student_arms_differ_as_intended():
  arms = exp_config.get_sweep('smoke,stage=students,teacher=t')
  got = [(a['task'], a['distill.student_init']) for a in arms]
  assert got == [('distill', 'teacher_layers'), ('distill', 'none'), ('mlm', 'none')]
  c = exp_config.get_config('smoke,stage=students,teacher=t')
  teacher = exp_config.get_config('smoke,stage=teacher')
  assert 2 * c.model.num_layers == teacher.model.num_layers  # half the teacher's depth
  assert tuple(c.distill.teacher_layers) == (0, 2)  # every other teacher layer
  assert c.model.d_model == teacher.model.d_model and c.num_steps > 0


def test_smoke_sweeps_make_the_table_with_every_arm(tmp_path):
  env = dict(os.environ, FLAXFORMER_TFDS_DIR=str(tmp_path / 'tfds'), PYTHONPATH=ROOT,
             JAX_PLATFORMS='cpu')
  w = tmp_path
  _sweep('stage=teacher', w / 'teacher', env)
  teacher = w / 'teacher' / 'seed=0'
  _sweep(f'stage=students,teacher={teacher}', w / 'students', env)
  _sweep(f'stage=finetune,teacher={teacher},students={w / "students"}', w / 'finetune', env)
  r = subprocess.run([sys.executable, 'experiments/distillation/analyze.py',
                      f'--teacher={teacher}', f'--students={w / "students"}',
                      f'--finetune={w / "finetune"}', f'--out={w / "out"}', '--rounds=1',
                      '--iters=1'], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert (w / 'out' / 'distillation.png').stat().st_size > 0
  with open(w / 'out' / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert [row['model'] for row in rows] == ['teacher', *exp_config.STUDENTS]
  # Parameters from the checkpoints against an independent count: a student drops 2 of the
  # teacher's 4 encoder layers, each 4 d^2 + 4 d (attention) + 2 d f + d + f (MLP) + 4 d (2 norms).
  with open(teacher / 'config.json') as f:
    m = json.load(f)['model']
  d, ff = m['d_model'], m['mlp_dim']
  per_layer = 4 * d * d + 4 * d + 2 * d * ff + d + ff + 4 * d
  t_params = int(rows[0]['params'])
  for row in rows[1:]:
    assert t_params - int(row['params']) == 2 * per_layer, row
    assert row['mlm_loss'] not in ('', 'None') and row['sst2_accuracy'] not in ('', 'None'), row
  assert float(rows[0]['accuracy_pct_of_teacher']) == pytest.approx(100.0)
