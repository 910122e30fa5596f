"""The training system: sharding equivalence, exact resume, preemption, non-finite stops, config
errors, and that each objective learns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flaxformer_lab import metrics as metrics_lib
from flaxformer_lab import rundir
from flaxformer_lab import train
from multiprocess_util import REPO_ROOT, base_env, free_port, launch_processes

from flaxformer_lab.presets import common
from flaxformer_lab.presets import gpt2

# A tiny decoder run: no dropout so every layout computes the same function.
TINY_LM = ['--config=configs/gpt2.py:tiny', '--config.num_steps=4', '--config.batch_size=8',
           '--config.data.seq_len=32', '--config.log_every=1', '--config.eval_every=0',
           '--config.checkpoint_every=2', '--config.data.eval_batches=1',
           '--config.model.dropout_rate=0.0', '--config.model.attention_dropout_rate=0.0',
           '--config.progress=lines', '--config.optim.warmup_steps=0']


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  """One prepared-data directory for the module (builders prepare once, from the manual dir)."""
  path = str(tmp_path_factory.mktemp('tfds'))
  os.environ['FLAXFORMER_TFDS_DIR'] = path
  return path


def run_main(args, workdir, tfds_dir, env=None, timeout=300):
  env = base_env({'FLAXFORMER_TFDS_DIR': tfds_dir, **(env or {})})
  return subprocess.run([sys.executable, '-m', 'flaxformer_lab.main', f'--workdir={workdir}',
                         *args], env=env, capture_output=True, text=True, timeout=timeout,
                        cwd=REPO_ROOT)


def losses(workdir):
  recs = metrics_lib.read_metrics(str(workdir))
  return {r['step']: r['train/loss'] for r in recs if 'train/loss' in r}


def test_one_device_mesh_and_two_processes_agree(tmp_path, tfds_dir):
  one = run_main(TINY_LM, tmp_path / 'one', tfds_dir)
  assert one.returncode == 0, one.stderr[-3000:]
  mesh = run_main(TINY_LM + ['--config.mesh.shape=(2,2,2)'], tmp_path / 'mesh', tfds_dir,
                  env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert mesh.returncode == 0, mesh.stderr[-3000:]
  procs = launch_processes(
      ['-m', 'flaxformer_lab.main', f'--workdir={tmp_path / "procs"}', *TINY_LM,
       '--config.mesh.shape=(2,2,2)'], num_processes=2, devices_per_process=4,
      env={'FLAXFORMER_TFDS_DIR': tfds_dir}, timeout=300)
  assert all(p.returncode == 0 for p in procs)
  a, b, c = losses(tmp_path / 'one'), losses(tmp_path / 'mesh'), losses(tmp_path / 'procs')
  assert sorted(a) == [1, 2, 3, 4] and sorted(b) == sorted(a) and sorted(c) == sorted(a)
  for step in a:
    assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a, b)
    assert c[step] == pytest.approx(a[step], rel=1e-4), (step, a, c)
  assert a[4] < a[1]


def test_fsdp_and_tensor_parallel_really_shard_parameters(tmp_path, tfds_dir):
  code = r'''
import json
from flaxformer_lab.presets import gpt2
from flaxformer_lab import train
c = gpt2.get_config('tiny')
c.mesh.shape = (2, 2, 2)
setup = train.build_setup(c)
state = train.create_state(c, setup)
out = {}
for path, leaf in jax.tree_util.tree_leaves_with_path(state['params']):
  name = jax.tree_util.keystr(path)
  out[name] = [list(leaf.shape), list(leaf.addressable_shards[0].data.shape)]
print('RESULT' + json.dumps(out))
'''
  env = base_env({'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
                  'FLAXFORMER_TFDS_DIR': tfds_dir})
  r = subprocess.run([sys.executable, '-c', 'import jax\n' + code], env=env, capture_output=True,
                     text=True, timeout=300, cwd=REPO_ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  shapes = json.loads(r.stdout.split('RESULT', 1)[1])
  wi = [v for k, v in shapes.items() if 'mlp' in k and "['wi']" in k and 'kernel' in k][0]
  (layers, d, f), local = wi[0], wi[1]
  assert local == [layers, d // 2, f // 2]  # embed over fsdp=2, mlp over tensor=2
  table = [v for k, v in shapes.items() if "['tokens']" in k][0]
  assert table[1] == [table[0][0] // 2, table[0][1] // 2]  # vocab over tensor, embed over fsdp
  total = sum(np.prod(v[0]) for v in shapes.values())
  local_total = sum(np.prod(v[1]) for v in shapes.values())
  assert local_total < total / 2  # each device holds a fraction of the parameters


def _config(tmp_overrides=()):
  c = gpt2.get_config('tiny')
  c.num_steps, c.batch_size, c.data.seq_len = 6, 4, 32
  c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 3
  c.data.eval_batches, c.progress = 1, 'off'
  c.async_checkpoints = False
  for k, v in tmp_overrides:
    c[k] = v
  return c


def test_resume_after_stop_is_exact(tmp_path, tfds_dir):
  full = tmp_path / 'full'
  train.train_and_evaluate(_config(), str(full))
  split = tmp_path / 'split'
  c = _config()
  c.stop_at_step = 4  # stops after step 4 (a checkpoint is written there), mid-schedule
  train.train_and_evaluate(c, str(split))
  assert max(losses(split)) == 4
  train.train_and_evaluate(_config(), str(split))  # the same command again resumes
  a, b = losses(full), losses(split)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  for step in a:
    assert a[step] == b[step], (step, a[step], b[step])  # exact on CPU: same data order too
  pa, pb = rundir.RunDir(str(full)).restore_params(), rundir.RunDir(str(split)).restore_params()
  jax.tree.map(np.testing.assert_array_equal, pa, pb)


@pytest.mark.slow  # two subprocess runs (quick CI: test_checkpoint's SIGTERM test)
def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path, tfds_dir):
  workdir = tmp_path / 'run'
  args = [a for a in TINY_LM if not a.startswith(('--config.num_steps', '--config.checkpoint'))]
  args += ['--config.num_steps=100000', '--config.checkpoint_every=100000']
  env = base_env({'FLAXFORMER_TFDS_DIR': tfds_dir})
  proc = subprocess.Popen([sys.executable, '-m', 'flaxformer_lab.main', f'--workdir={workdir}',
                           *args], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline:
    if os.path.exists(workdir / 'metrics.jsonl') and losses(workdir).get(3):
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  steps = sorted(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit())
  assert steps and steps[-1] >= 3
  # resume: run to a slightly later step from the saved one
  resumed = run_main([a.replace('--config.num_steps=100000', f'--config.num_steps={steps[-1] + 2}')
                      for a in args], workdir, tfds_dir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert max(losses(workdir)) == steps[-1] + 2
  assert 'resumed from step %d' % steps[-1] in resumed.stderr


def start_two_processes(args, workdir, tfds_dir, env=None):
  """Two `flaxformer_lab.main` processes of one run (2 x 4 CPU devices), not waited for."""
  port = free_port()
  procs = []
  for i in range(2):
    penv = base_env({'FLAXFORMER_TFDS_DIR': tfds_dir, 'FLAXFORMER_COORDINATOR': f'localhost:{port}',
                     'FLAXFORMER_NUM_PROCESSES': '2', 'FLAXFORMER_PROCESS_ID': str(i),
                     'FLAXFORMER_NUM_CPU_DEVICES': '4', **(env or {})})
    procs.append(subprocess.Popen([sys.executable, '-m', 'flaxformer_lab.main',
                                   f'--workdir={workdir}', *args], env=penv, cwd=REPO_ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return procs


@pytest.mark.slow  # a two-process run: about a minute per case on 2 shared cores
@pytest.mark.parametrize('victim', [1, 0])  # 0 also holds the distributed service
def test_a_lost_process_stops_the_survivor_with_one_line(tmp_path, tfds_dir, victim):
  """SIGKILL one process of a two-process run mid-training: the survivor exits with status 4
  within the configured heartbeat timeout, its only error output one line naming the lost
  process (no traceback, no C++ abort)."""
  timeout_s = 6
  workdir = tmp_path / 'run'
  args = [a for a in TINY_LM if not a.startswith(('--config.num_steps', '--config.progress'))]
  args += ['--config.num_steps=100000', '--config.progress=off', '--config.mesh.shape=(2,2,2)']
  procs = start_two_processes(args, workdir, tfds_dir,
                              env={'FLAXFORMER_HEARTBEAT_TIMEOUT_S': str(timeout_s)})
  try:
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs):
      if (workdir / 'checkpoints' / '2').is_dir() and losses(workdir).get(3):
        break
      time.sleep(0.3)
    assert all(p.poll() is None for p in procs), [p.communicate()[1][-3000:] for p in procs]
    procs[victim].kill()
    killed_at = time.time()
    survivor = procs[1 - victim]
    _, err = survivor.communicate(timeout=timeout_s + 60)
    took = time.time() - killed_at
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.communicate()
  assert survivor.returncode == 4, (survivor.returncode, err[-3000:])
  assert took < timeout_s + 20, (took, err[-2000:])
  lines = [l for l in err.splitlines() if l.strip()]
  errors_ = [l for l in lines if l.startswith('error:')]
  assert len(errors_) == 1 and lines[-1] == errors_[0], err[-3000:]
  assert f'process {victim} of 2 was lost' in errors_[0], errors_[0]
  assert 'Traceback' not in err and 'Check failure' not in err and 'F0000' not in err, err[-3000:]


@pytest.mark.slow  # two subprocess runs (quick CI: test_faults' poisoned-update tests)
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tfds_dir):
  workdir = tmp_path / 'run'
  args = [a for a in TINY_LM if not a.startswith('--config.num_steps')]
  ok = run_main(args + ['--config.num_steps=2'], workdir, tfds_dir)
  assert ok.returncode == 0, ok.stderr[-3000:]
  bad = run_main(args + ['--config.num_steps=8', '--config.optim.learning_rate=1e30',
                        ],
                 workdir, tfds_dir)
  assert bad.returncode == 3, bad.stderr[-3000:]
  assert 'non-finite loss' in bad.stderr
  steps = sorted(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit())
  assert steps[-1] == 2
  params = rundir.RunDir(str(workdir)).restore_params()
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize('args, expect', [
    (['--config.modle.d_model=64'], "unknown config key 'modle.d_model'; closest valid keys: "
     'model.d_model'),
    (['--config.model.d_model=wide'], 'model.d_model'),
    (['--config.model.d_model=66'], 'not divisible by model.num_heads'),
    (['--config.mesh.shape=(3,1,1)'], 'mesh'),
    (['--config.data.seq_len=4096'], 'position table'),
    (['--config.model.norm_position=middle'], 'norm_position'),
])
def test_bad_config_is_one_line_and_writes_no_checkpoint(tmp_path, tfds_dir, args, expect):
  r = run_main(['--config=configs/gpt2.py:tiny'] + args, tmp_path / 'w', tfds_dir, timeout=120)
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith('error: ') and expect in lines[0], lines[0]
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


@pytest.mark.parametrize('config_arg, overrides, eval_metric', [
    ('configs/gpt2.py:tiny', dict(), 'eval/accuracy'),
    ('configs/t5.py:tiny', {'data.name': 'synthetic_copy', 'data.seq_len': 16,
                            'data.target_len': 16}, 'eval/token_accuracy'),
    # From scratch (no pre-training), topic classification with mean pooling learns in a short run.
    # (The preset's data=ag_news carries the test split and the four labels.)
    ('configs/bert.py:tiny,task=classification,data=ag_news', {'model.pooling': 'mean'},
     'eval/accuracy'),
])
def test_each_objective_learns(tmp_path, tfds_dir, config_arg, overrides, eval_metric):
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  c = config_flags.config_flags._LoadConfigModule('cfg', config_arg.split(':')[0]).get_config(
      config_arg.split(':')[1])
  steps = 150 if c.task == 'classification' else 40
  c.num_steps, c.batch_size, c.log_every, c.eval_every = steps, 32, 10, 0
  c.checkpoint_every, c.data.eval_batches, c.progress = steps, 2, 'off'
  c.optim.name, c.optim.learning_rate, c.optim.warmup_steps = 'adamw', 3e-3, 5
  if c.data.seq_len > 64:
    c.data.seq_len = 64
  if c.model.family == 'encoder_decoder':
    with c.unlocked():  # the BLEU evaluation runs inside the loop, at the end
      c.evals.bleu = common.bleu_eval(c, every=steps)
  for k, v in overrides.items():
    section, key = k.split('.')
    c[section][key] = v
  final = train.train_and_evaluate(c, str(tmp_path / 'run'))
  curve = losses(tmp_path / 'run')
  assert curve[steps] < curve[10] - 0.05, curve
  assert eval_metric in final and 0.0 <= final[eval_metric] <= 1.0
  if c.model.family == 'encoder_decoder':
    assert 0.0 <= final['eval/bleu'] <= 100.0
    assert any('eval/bleu' in r for r in metrics_lib.read_metrics(str(tmp_path / 'run')))


def test_sst2_fine_tuning_from_a_converted_hf_bert(tmp_path, tfds_dir):
  """`--config.init_from=hf:<dir>`: a randomly initialized Hugging Face BERT of the tiny preset's
  shape starts an SST-2 classification run end to end through the command line."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  hf_cfg = transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=256,
                                   max_position_embeddings=128, type_vocab_size=2)
  transformers.BertForMaskedLM(hf_cfg).save_pretrained(tmp_path / 'hf')
  r = run_main(['--config=configs/bert.py:tiny,task=classification',
                f'--config.init_from=hf:{tmp_path / "hf"}', '--config.num_steps=6',
                '--config.batch_size=8', '--config.data.seq_len=48', '--config.log_every=2',
                '--config.eval_every=0', '--config.checkpoint_every=6',
                '--config.data.eval_batches=1', '--config.progress=lines'],
               tmp_path / 'run', tfds_dir)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'initialized from hf:' in r.stderr
  assert 'classifier' in r.stderr.split('initialized from hf:')[1].splitlines()[0]  # fresh head
  final = metrics_lib.read_metrics(str(tmp_path / 'run'))
  assert any('eval/accuracy' in rec for rec in final)
  # the body really came from the checkpoint
  params = rundir.RunDir(str(tmp_path / 'run')).restore_params()
  hf_word = transformers.BertModel.from_pretrained(tmp_path / 'hf').embeddings.word_embeddings
  start = np.asarray(hf_word.weight.detach().numpy())
  # two independent N(0, 0.02) tables differ by ~0.023 on average; six small steps move far less
  assert np.abs(params['tokens']['embedding'] - start).mean() < 0.005
