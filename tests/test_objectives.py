"""The objective seam: no objective is named outside tasks/, a new objective is one class, the
package stands alone, evaluations come from config.evals, and the run directory module."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from flaxformer_lab import checkpoint as ckpt_lib
from flaxformer_lab import evals as evals_lib
from flaxformer_lab import metrics as metrics_lib
from flaxformer_lab import rundir
from flaxformer_lab import train
from flaxformer_lab.models.config import ConfigError
from flaxformer_lab.presets import common
from flaxformer_lab.presets import gpt2
from flaxformer_lab.presets import t5
from flaxformer_lab.tasks import base as tasks_base
from flaxformer_lab.tasks.lm import LanguageModelling
from multiprocess_util import REPO_ROOT

PACKAGE = os.path.join(REPO_ROOT, 'flaxformer_lab')


def _py_files():
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith('.py'):
        yield os.path.join(root, f)


def test_no_objective_name_is_tested_outside_tasks():
  pattern = re.compile(r'task ?(==|in) ')
  hits = []
  for path in _py_files():
    # tasks/ owns the objectives; presets/ read their own `task=` argument to build a config.
    if os.sep + 'tasks' + os.sep in path or os.sep + 'presets' + os.sep in path:
      continue
    for i, line in enumerate(open(path, encoding='utf-8'), 1):
      if pattern.search(line):
        hits.append(f'{path}:{i}: {line.strip()}')
  assert not hits, hits


def test_the_package_imports_nothing_from_configs():
  imports = re.compile(r'^\s*(from configs\b|import configs\b)|import_module\([^)]*configs\.')
  hits = [f'{p}:{i}' for p in _py_files()
          for i, line in enumerate(open(p, encoding='utf-8'), 1) if imports.search(line)]
  assert not hits, hits


def test_the_package_works_from_any_directory(tmp_path):
  """Installed (editable) by launch.sh: no PYTHONPATH, another working directory."""
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  code = ('import sys, flaxformer_lab.train, flaxformer_lab.interop.huggingface, '
          'flaxformer_lab.generate; '
          "assert not any(m == 'configs' or m.startswith('configs.') for m in sys.modules); "
          'print(flaxformer_lab.train.__file__)')
  r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip().startswith(PACKAGE)


def _tiny_lm(**over):
  c = gpt2.get_config('tiny')
  c.model.update(d_model=32, num_heads=2, mlp_dim=64, num_layers=1)
  c.data.seq_len, c.batch_size, c.data.eval_batches = 32, 8, 1
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 4, 2, 2, 4
  c.progress, c.optim.warmup_steps = 'off', 0
  with c.unlocked():
    del c.evals['samples']
  for k, v in over.items():
    node = c
    *path, last = k.split('.')
    for p in path:
      node = node[p]
    node[last] = v
  return c


@tasks_base.register
class _SkipTwo(LanguageModelling):
  """A test objective defined outside the package: predict the token two ahead."""
  name = 'test_skip_two'

  def windows(self, spec):
    return False

  def documents(self, source, split):
    return source.split(split)[:64]

  def tokenize(self, ctx, index, example):
    ids = [ctx.tokenizer.bos_id, *ctx.tokenizer.encode(example[ctx.spec.text_field])[:ctx.seq_len + 1]]
    ids = np.asarray(ids, np.int32)
    return [{'inputs': ids[:-2], 'targets': ids[2:]}] if len(ids) > 2 else []


def test_a_new_objective_is_one_class(tmp_path, monkeypatch):
  monkeypatch.setenv('FLAXFORMER_TFDS_DIR', str(tmp_path / 'tfds'))
  c = _tiny_lm(task='test_skip_two')
  c.data.name, c.data.pack = 'sst2', False
  final = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert np.isfinite(final['eval/loss']) and 'eval/perplexity' in final
  assert rundir.RunDir(str(tmp_path / 'run')).load_config().task == 'test_skip_two'


def test_every_eval_type_runs(tmp_path, monkeypatch):
  monkeypatch.setenv('FLAXFORMER_TFDS_DIR', str(tmp_path / 'tfds'))
  c = _tiny_lm()
  with c.unlocked():
    c.evals.test = common.metrics_eval(c, split='test', every=4, prefix='test', seq_len=64)
    c.evals.samples = common.samples_eval(every=4, max_new_tokens=5, prompt='ROMEO:')
  final = train.train_and_evaluate(c, str(tmp_path / 'lm'))
  recs = metrics_lib.read_metrics(str(tmp_path / 'lm'))
  assert [r['step'] for r in recs if 'eval/loss' in r] == [2, 4]
  assert [r['step'] for r in recs if 'test/loss' in r] == [4]
  assert final['test/loss'] != final['eval/loss']  # another split at another length
  s = t5.get_config('tiny')
  s.model.update(d_model=32, num_heads=2, mlp_dim=64, num_layers=1, head_dim=16)
  s.data.update(name='synthetic_copy', seq_len=16, target_len=16, eval_batches=1)
  s.num_steps, s.log_every, s.eval_every, s.checkpoint_every, s.batch_size = 2, 1, 0, 2, 8
  s.progress = 'off'
  with s.unlocked():
    s.evals.bleu = common.bleu_eval(s, every=0, strategy='beam', num_beams=2)
  final = train.train_and_evaluate(s, str(tmp_path / 's2s'))
  assert 0.0 <= final['eval/bleu'] <= 100.0 and 'eval/token_accuracy' in final
  # (teacher_agreement runs in tests/test_distill.py's training runs: eval/teacher_agreement)


@pytest.mark.parametrize('entry, message', [
    (dict(type='perplexity'), "config.evals.x.type='perplexity' is not one of"),
    (dict(type='metrics', every=1, splitt='test'), 'config.evals.x has unknown key(s) splitt'),
    (dict(type='bleu', every=1), 'needs model.family in'),
    (dict(type='teacher_agreement', every=1), 'needs an objective with a teacher'),
    (dict(type='metrics', every=1), 'both write eval/'),
    (dict(type='samples', every=1, top_p=0.0), 'top_p must be in (0, 1]'),
    (dict(type='metrics', every=1, prefix='long', seq_len=4096), 'does not fit the learned'),
])
def test_bad_evals_are_one_line_config_errors(entry, message):
  c = _tiny_lm()
  with c.unlocked():
    c.evals.x = entry
  with pytest.raises(ConfigError) as e:
    train.validate_config(c)
  assert message in str(e.value) and '\n' not in str(e.value)


def test_unknown_eval_type_from_the_command_line(tmp_path):
  from test_train import run_main  # pylint: disable=g-import-not-at-top
  r = run_main(['--config=configs/gpt2.py:tiny', '--config.evals.samples.type=bleuu'],
               tmp_path / 'w', str(tmp_path / 'tfds'), timeout=120)
  lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
  assert r.returncode == 2 and len(lines) == 1, r.stderr
  assert "config.evals.samples.type='bleuu' is not one of" in lines[0]
  assert not os.path.exists(tmp_path / 'w')


def test_run_directory_restores_params_without_an_optimizer(tmp_path, monkeypatch):
  monkeypatch.setenv('FLAXFORMER_TFDS_DIR', str(tmp_path / 'tfds'))
  c = _tiny_lm(checkpoint_every=2)
  train.train_and_evaluate(c, str(tmp_path / 'run'))
  run = rundir.RunDir(str(tmp_path / 'run'))
  assert run.steps() == [2, 4] and run.latest_step() == 4
  assert run.load_config().to_dict() == c.to_dict() or run.load_config().model == c.model
  setup = train.build_setup(c)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'run'), every=0, async_save=False)
  try:
    for step in (2, 4):
      full, _ = ckpt.restore(step, setup.abstract_state, with_data=False)
      got = run.restore_params(step)
      assert jax.tree.structure(got) == jax.tree.structure(jax.device_get(full['params']))
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(jax.device_get(full['params']))):
        assert isinstance(a, np.ndarray) and np.array_equal(a, b)
  finally:
    ckpt.close()
  assert not np.array_equal(jax.tree.leaves(run.restore_params(2))[0],
                            jax.tree.leaves(run.restore_params(4))[0])
  monkeypatch.chdir(tmp_path)  # a relative run directory reads the same
  assert np.array_equal(jax.tree.leaves(rundir.RunDir('run').restore_params(4))[0],
                        jax.tree.leaves(run.restore_params(4))[0])
  with pytest.raises(rundir.RunDirError, match=r'no checkpoint for step 3 .*steps: 2, 4'):
    run.restore_params(3)
  with pytest.raises(rundir.RunDirError, match='no config.json'):
    rundir.RunDir(str(tmp_path / 'nothing')).load_config()
  assert run.load_tokenizer().vocab_size == rundir.RunDir(str(tmp_path / 'run')).load_tokenizer(
  ).vocab_size


def test_fine_tuning_drops_the_pretraining_head(tmp_path, monkeypatch):
  """init_from=<an MLM run>: the body is loaded, mlm_head is dropped and said so, the classifier
  starts fresh."""
  monkeypatch.setenv('FLAXFORMER_TFDS_DIR', str(tmp_path / 'tfds'))
  from flaxformer_lab.presets import distilbert  # pylint: disable=g-import-not-at-top
  pre = distilbert.get_config('student_tiny')
  pre.model.update(d_model=32, num_heads=2, mlp_dim=64)
  pre.data.seq_len, pre.batch_size, pre.data.eval_batches = 32, 8, 1
  pre.num_steps, pre.eval_every, pre.checkpoint_every, pre.progress = 2, 0, 2, 'off'
  pre.data.tokenizer = 'char'  # trained on Austen: the fine-tuning run must reuse it
  train.train_and_evaluate(pre, str(tmp_path / 'pre'))
  from flaxformer_lab.presets import bert  # pylint: disable=g-import-not-at-top
  ft = bert.get_config('tiny,task=classification')
  ft.model.update(d_model=32, num_heads=2, mlp_dim=64, pooler=False, pooling='first')
  ft.data.seq_len, ft.batch_size, ft.data.eval_batches = 32, 8, 1
  ft.num_steps, ft.eval_every, ft.checkpoint_every, ft.progress = 2, 0, 2, 'off'
  ft.init_from = str(tmp_path / 'pre')
  setup = train.build_setup(ft)
  state = train.init_from(ft, setup, train.create_state(ft, setup))
  src = rundir.RunDir(str(tmp_path / 'pre')).restore_params()
  got = jax.device_get(state['params'])
  assert np.array_equal(got['tokens']['embedding'], src['tokens']['embedding'])
  assert 'mlm_head' not in got and 'classifier' in got
  # The fine-tuning run reads its text with the source's tokenizer (the ids of its embeddings),
  # not the byte tokenizer its preset names.
  train.train_and_evaluate(ft, str(tmp_path / 'ft'))
  tok, src_tok = (rundir.RunDir(str(tmp_path / d)).load_tokenizer() for d in ('ft', 'pre'))
  assert tok.kind == src_tok.kind == 'char'
  text = 'a gripping , funny movie .'
  assert tok.encode(text) == src_tok.encode(text)
  # data.tokenizer_from reuses a run's tokenizer without its weights (a from-scratch baseline
  # with the same ids); a directory without one is refused.
  scratch = ft.copy_and_resolve_references()
  scratch.init_from, scratch.data.tokenizer_from = '', str(tmp_path / 'pre')
  assert train.source_tokenizer(scratch).encode(text) == src_tok.encode(text)
  scratch.data.tokenizer_from = str(tmp_path / 'nothing')
  with pytest.raises(rundir.RunDirError, match='holds no tokenizer'):
    train.source_tokenizer(scratch)
