"""The sweep system: grid helpers, one-line errors, the local backend end to end (resume after a
SIGKILL, failures and divergences), the run lock, the submitit and gcloud back-ends, the summary,
and W&B's offline resume. Runs are tiny (tests/tiny_sweep.py); the prepost_ln smoke is `slow`."""

from __future__ import annotations

import csv
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

from flaxformer_lab import metrics as metrics_lib
from flaxformer_lab import runlock
from flaxformer_lab.sweeps import spec as spec_lib
from flaxformer_lab.sweeps import state as state_lib
from multiprocess_util import REPO_ROOT, base_env

TINY = os.path.join(REPO_ROOT, 'tests', 'tiny_sweep.py')


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  """One prepared copy of tiny shakespeare for the module (parallel runs then only read it)."""
  path = str(tmp_path_factory.mktemp('tfds'))
  os.environ['FLAXFORMER_TFDS_DIR'] = path
  from flaxformer_lab import data as data_lib  # pylint: disable=g-import-not-at-top
  import tiny_sweep  # pylint: disable=g-import-not-at-top
  data_lib.prepare(tiny_sweep.get_config())
  return path


def sweep_cmd(args, tfds_dir, env=None, timeout=400, **kw):
  env = base_env({'FLAXFORMER_TFDS_DIR': tfds_dir, **(env or {})})
  return subprocess.run([sys.executable, '-m', 'flaxformer_lab.sweep', *args], env=env,
                        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, **kw)


def final(workdir, key):
  recs = metrics_lib.read_metrics(str(workdir))
  return [r[key] for r in recs if key in r][-1]


# --- grid helpers, names, validation (no training) ---------------------------------------------------
def test_product_zip_and_run_names():
  runs = spec_lib.product({'model.norm_position': ['pre', 'post']},
                          spec_lib.zipped({'optim.learning_rate': [1e-3, 3e-3],
                                           'optim.warmup_steps': [0, 100]}))
  assert runs == [
      {'model.norm_position': 'pre', 'optim.learning_rate': 1e-3, 'optim.warmup_steps': 0},
      {'model.norm_position': 'pre', 'optim.learning_rate': 3e-3, 'optim.warmup_steps': 100},
      {'model.norm_position': 'post', 'optim.learning_rate': 1e-3, 'optim.warmup_steps': 0},
      {'model.norm_position': 'post', 'optim.learning_rate': 3e-3, 'optim.warmup_steps': 100}]
  assert spec_lib.run_name(runs[1]) == 'norm_position=pre,learning_rate=0.003,warmup_steps=100'
  # a leaf shared by two keys keeps the full key; tuples and booleans read well
  assert spec_lib.run_name({'model.dropout_rate': 0.1, 'data.dropout_rate': 0.0,
                            'mesh.shape': (2, 2, 1), 'data.pack': False}) == (
                                'model.dropout_rate=0.1,data.dropout_rate=0,shape=2x2x1,'
                                'pack=False')
  assert spec_lib.run_name({}) == 'base'
  with pytest.raises(spec_lib.SweepError, match='different lengths'):
    spec_lib.zipped({'a': [1, 2], 'b': [1]})
  with pytest.raises(spec_lib.SweepError, match='set twice'):
    spec_lib.product({'seed': [0]}, {'seed': [1]})


def test_load_validates_and_builds_commands(tmp_path):
  sweep = spec_lib.load(TINY, str(tmp_path))
  assert sweep.name == 'tiny_sweep' and len(sweep.runs) == 4
  assert sweep.swept_keys == ['model.norm_position', 'seed']
  run = sweep.runs[1]
  assert run.workdir == str(tmp_path / 'norm_position=pre,seed=1')
  argv = sweep.run_argv(run)
  assert argv[1:3] == ['-m', 'flaxformer_lab.main'] and f'--config={TINY}' in argv
  assert '--config.model.norm_position=pre' in argv and '--config.seed=1' in argv
  coords = [a for a in argv if a.startswith('--config.sweep.coordinates=')][0]
  assert json.loads(coords.split('=', 1)[1]) == {'model.norm_position': 'pre', 'seed': 1}
  with pytest.raises(spec_lib.SweepError, match="'optim.lerning_rate' names no config key; "
                     'closest valid keys: optim.learning_rate'):
    spec_lib.load(TINY + ':badkey', str(tmp_path))
  scratch = spec_lib.load(TINY, str(tmp_path)).base_config
  with pytest.raises(spec_lib.SweepError, match='num_steps'):
    spec_lib.check_override(scratch, 'num_steps', 'many', 'run 0')


def test_bad_override_is_one_line_exit_2_before_anything_runs(tmp_path):
  out = sweep_cmd([f'--sweep={TINY}:badkey', f'--workdir={tmp_path / "w"}'], tfds_dir='')
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and 'optim.lerning_rate' in lines[0] and 'run 0' in lines[0], lines
  assert not (tmp_path / 'w').exists()


# --- the run lock ------------------------------------------------------------------------------------
def test_run_lock_refuses_a_second_holder_and_a_dead_holder_is_taken_over(tmp_path):
  d = str(tmp_path / 'run')
  with runlock.RunLock(d) as lock:
    assert lock.held
    info = runlock.holder(d)
    assert info['pid'] == os.getpid() and info['host']
    with pytest.raises(runlock.RunLockedError, match=rf'in use by pid {os.getpid()} on '):
      runlock.RunLock(d, timeout_s=0.1).acquire()
  assert runlock.holder(d) is None
  # a holder that dies by SIGKILL leaves its record but no lock: the next run takes over
  code = ('import sys, time; from flaxformer_lab import runlock; '
          f'runlock.RunLock({d!r}).acquire(); print("held", flush=True); time.sleep(60)')
  proc = subprocess.Popen([sys.executable, '-c', code], env=base_env(), stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == 'held'
  assert runlock.holder(d)['pid'] == proc.pid
  proc.kill()
  proc.wait()
  assert json.load(open(os.path.join(d, runlock.LOCK_FILE)))['pid'] == proc.pid  # stale record
  assert runlock.holder(d) is None
  with runlock.RunLock(d):
    assert runlock.holder(d)['pid'] == os.getpid()
  assert not runlock.RunLock('gs://bucket/run').enabled  # no locks on object stores


def test_main_refuses_a_locked_workdir_in_one_line(tmp_path):
  d = str(tmp_path / 'run')
  with runlock.RunLock(d):
    out = subprocess.run([sys.executable, '-m', 'flaxformer_lab.main', f'--config={TINY}',
                          f'--workdir={d}'], env=base_env(), capture_output=True, text=True,
                         timeout=300, cwd=REPO_ROOT)
  assert out.returncode == 2, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: run directory') and f'pid {os.getpid()}' in last, last
  assert not os.path.exists(os.path.join(d, 'checkpoints'))


# --- the local backend -------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def reference(tfds_dir, tmp_path_factory):
  """The 4-run tiny sweep, uninterrupted, 2 runs at a time."""
  workdir = tmp_path_factory.mktemp('reference')
  out = sweep_cmd([f'--sweep={TINY}', f'--workdir={workdir}', '--parallel=2'], tfds_dir)
  return workdir, out


def test_local_sweep_end_to_end(reference):
  workdir, out = reference
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  sweep = spec_lib.load(TINY, str(workdir))
  for run in sweep.runs:
    st = state_lib.run_state(run.workdir)
    assert st.status == 'done' and st.ckpt == 300 and st.attempts == 1, (run.name, st)
    config = json.load(open(os.path.join(run.workdir, 'config.json')))
    assert config['sweep']['name'] == 'tiny_sweep' and config['sweep']['run'] == run.name
    assert json.loads(config['sweep']['coordinates']) == run.overrides
    assert config['model']['norm_position'] == run.overrides['model.norm_position']
    assert config['seed'] == run.overrides['seed']
    assert 'step 300/300' in open(os.path.join(run.workdir, state_lib.LOG_FILE)).read()
  # the placements really differ, the seeds too
  losses = {r.name: final(r.workdir, 'eval/loss') for r in sweep.runs}
  assert len(set(losses.values())) == 4, losses
  manifest = json.load(open(workdir / 'sweep.json'))
  assert [r['name'] for r in manifest['runs']] == [r.name for r in sweep.runs]
  status = sweep_cmd([f'--sweep={TINY}', f'--workdir={workdir}', '--status'], '')
  assert status.returncode == 0 and status.stdout.count('| done ') == 4, status.stdout
  assert '300/300' in status.stdout
  again = sweep_cmd([f'--sweep={TINY}', f'--workdir={workdir}'], '')  # nothing left to run
  assert again.returncode == 0 and '4 done; starting 0' in again.stdout, again.stdout


def test_summary_equals_each_runs_metrics(reference):
  workdir, out = reference
  assert out.returncode == 0
  summ = sweep_cmd([f'--sweep={TINY}', f'--workdir={workdir}', '--summarize'], '')
  assert summ.returncode == 0, summ.stderr[-2000:]
  rows = list(csv.DictReader(open(workdir / 'results.csv')))
  sweep = spec_lib.load(TINY, str(workdir))
  assert [r['run'] for r in rows] == [r.name for r in sweep.runs]
  for row, run in zip(rows, sweep.runs):
    recs = metrics_lib.read_metrics(run.workdir)
    evals = [r['eval/loss'] for r in recs if 'eval/loss' in r]
    trains = [r['train/loss'] for r in recs if 'train/loss' in r]
    assert float(row['final_eval/loss']) == pytest.approx(evals[-1], rel=1e-5)
    assert float(row['best_eval/loss']) == pytest.approx(min(evals), rel=1e-5)
    assert float(row['final_train/loss']) == pytest.approx(trains[-1], rel=1e-5)
    assert row['norm_position'] == run.overrides['model.norm_position']
    assert int(row['seed']) == run.overrides['seed'] and int(row['steps']) == 300
    assert row['diverged'] == 'False' and row['status'] == 'done'
    assert float(row['wall_s']) > 0 and float(row['tokens_per_s']) > 0
  # Accuracy-like metrics are best when highest.
  from flaxformer_lab.sweeps import results as results_lib  # pylint: disable=g-import-not-at-top
  for row, run in zip(results_lib.summary_rows(sweep, 'eval/accuracy'), sweep.runs):
    accs = [r['eval/accuracy'] for r in metrics_lib.read_metrics(run.workdir)
            if 'eval/accuracy' in r]
    assert row['best_eval/accuracy'] == pytest.approx(max(accs))
  assert [results_lib.higher_is_better(m) for m in
          ('eval/accuracy', 'eval/bleu', 'eval/teacher_agreement', 'eval/loss', 'eval/perplexity')
          ] == [True, True, True, False, False]
  assert rows[0]['run'] in summ.stdout and '| final_eval/loss' in summ.stdout  # the markdown table
  assert (workdir / 'results.md').read_text().count('\n| norm_position=') == 4
  for png in ('loss_curves.png', 'final_eval_loss_vs_seed.png'):
    assert (workdir / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', png
  hp = workdir / 'tensorboard_hparams'
  assert sorted(p.name for p in hp.iterdir() if p.is_dir()) == sorted(r.name for r in sweep.runs)


def _wait_for(predicate, timeout, what):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    time.sleep(0.02)
  raise AssertionError(f'timed out waiting for {what}')


def _dead(pid: int) -> bool:
  """Gone, or a zombie waiting for a reaper (a container's init may not reap)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] in ('Z', 'X')
  except FileNotFoundError:
    return True


def test_sigkilled_sweep_resumes_and_matches_the_uninterrupted_one(reference, tfds_dir, tmp_path):
  ref_dir, ref_out = reference
  assert ref_out.returncode == 0
  workdir = tmp_path / 'killed'
  sweep = spec_lib.load(TINY, str(workdir))
  first, second = sweep.runs[0], sweep.runs[1]
  env = base_env({'FLAXFORMER_TFDS_DIR': tfds_dir})
  proc = subprocess.Popen([sys.executable, '-m', 'flaxformer_lab.sweep', f'--sweep={TINY}',
                           f'--workdir={workdir}', '--parallel=1'], env=env, cwd=REPO_ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    # the second run has saved a checkpoint: freeze it there (so it cannot finish meanwhile),
    # then SIGKILL the sweep command
    _wait_for(lambda: state_lib.checkpoint_steps(second.workdir), 300, 'a checkpoint of run 2')
    holder = runlock.holder(second.workdir)
    assert holder, 'the running training holds its run lock'
    os.kill(holder['pid'], signal.SIGSTOP)
    proc.kill()
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
  # the run dies with its sweep (PR_SET_PDEATHSIG): no orphan keeps the directory
  _wait_for(lambda: runlock.holder(second.workdir) is None, 30, 'the run to die')
  _wait_for(lambda: _dead(holder['pid']), 30, 'the run process to exit')
  interrupted_at = state_lib.checkpoint_steps(second.workdir)[-1]
  assert 0 < interrupted_at < 300
  assert state_lib.run_state(first.workdir).status == 'done'
  assert state_lib.run_state(second.workdir).status == 'pending'
  first_ckpt_mtime = os.path.getmtime(os.path.join(first.workdir, 'checkpoints', '300'))

  out = sweep_cmd([f'--sweep={TINY}', f'--workdir={workdir}', '--parallel=2'], tfds_dir)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert '1 done, 3 pending; starting 3' in out.stdout, out.stdout
  # the finished run was not rerun: one attempt, its final checkpoint untouched
  assert state_lib.count_attempts(first.workdir) == 1
  assert os.path.getmtime(os.path.join(first.workdir, 'checkpoints', '300')) == first_ckpt_mtime
  # the interrupted one resumed from its checkpoint in a second attempt
  log = open(os.path.join(second.workdir, state_lib.LOG_FILE)).read()
  assert state_lib.count_attempts(second.workdir) == 2
  assert f'resumed from step {interrupted_at}' in log.split('=== sweep attempt 2')[1]
  for run in sweep.runs:
    ref = os.path.join(str(ref_dir), run.name)
    assert state_lib.run_state(run.workdir).status == 'done'
    for key in ('eval/loss', 'train/loss'):
      assert final(run.workdir, key) == pytest.approx(final(ref, key), rel=1e-5), (run.name, key)


def test_failed_run_is_reported_while_the_others_complete(tfds_dir, tmp_path):
  out = sweep_cmd([f'--sweep={TINY}:failing', f'--workdir={tmp_path}', '--parallel=2'], tfds_dir)
  assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
  err = out.stderr.strip().splitlines()[-1]
  assert err.startswith('error: 1 run(s) failed: num_heads=3 '), err
  states = {r.name: state_lib.run_state(r.workdir).status
            for r in spec_lib.load(f'{TINY}:failing', str(tmp_path)).runs}
  assert states == {'num_heads=3': 'failed', 'learning_rate=1e+30': 'diverged',
                    'norm_position=pre': 'done'}, states
  assert 'num_heads' in open(tmp_path / 'num_heads=3' / state_lib.LOG_FILE).read()
  status = sweep_cmd([f'--sweep={TINY}:failing', f'--workdir={tmp_path}', '--status'], '')
  assert '| failed ' in status.stdout and '| diverged ' in status.stdout
  summ = sweep_cmd([f'--sweep={TINY}:failing', f'--workdir={tmp_path}', '--summarize'], '')
  assert summ.returncode == 0, summ.stderr[-2000:]
  rows = {r['run']: r for r in csv.DictReader(open(tmp_path / 'results.csv'))}
  assert rows['learning_rate=1e+30']['diverged'] == 'True'
  assert rows['norm_position=pre']['diverged'] == 'False'


# --- SLURM (submitit's local executor) and TPU (a fake gcloud) -----------------------------------
def test_slurm_backend_runs_a_two_run_sweep_with_submitits_local_executor(tfds_dir, tmp_path):
  pytest.importorskip('submitit')
  dry = sweep_cmd([f'--sweep={TINY}:pair', f'--workdir={tmp_path}', '--backend=slurm',
                   '--slurm_partition=gpu', '--slurm_gpus_per_node=8', '--slurm_nodes=2',
                   '--dry_run'], '')
  assert dry.returncode == 0, dry.stderr
  specs = [json.loads(l) for l in dry.stdout.splitlines() if l.startswith('{')]
  assert [s['run'] for s in specs] == ['norm_position=pre', 'norm_position=deepnorm']
  assert specs[0]['executor']['slurm_partition'] == 'gpu' and specs[0]['distributed']
  assert specs[0]['executor']['nodes'] == 2 and specs[0]['executor']['gpus_per_node'] == 8
  assert not any(p.is_dir() and p.name.startswith('norm_position') for p in tmp_path.iterdir())
  out = sweep_cmd([f'--sweep={TINY}:pair', f'--workdir={tmp_path}', '--backend=slurm',
                   '--slurm_cluster=local'], tfds_dir)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert out.stdout.count('submitted norm_position=') == 2
  for name in ('norm_position=pre', 'norm_position=deepnorm'):
    st = state_lib.run_state(str(tmp_path / name))
    assert st.status == 'done' and st.ckpt == 300 and st.outcome['returncode'] == 0, (name, st)
    assert '[slurm job ' in open(tmp_path / name / state_lib.LOG_FILE).read()
    config = json.load(open(tmp_path / name / 'config.json'))
    assert config['model']['norm_position'] == name.split('=')[1]


FAKE_GCLOUD = '''#!{python}
import json, os, sys
with open(os.environ['FAKE_GCLOUD_LOG'], 'a') as f:
    f.write(json.dumps(sys.argv[1:]) + '\\n')
command = [a for a in sys.argv if a.startswith('--command=')]
sys.exit(3 if command and 'learning_rate=1e+30' in command[0] else 0)
'''


def test_tpu_backend_dry_run_and_fake_gcloud_issue_the_expected_commands(tmp_path):
  bindir = tmp_path / 'bin'
  bindir.mkdir()
  gcloud = bindir / 'gcloud'
  gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
  log = tmp_path / 'gcloud.jsonl'
  env = {'PATH': f'{bindir}{os.pathsep}{os.environ["PATH"]}', 'FAKE_GCLOUD_LOG': str(log)}
  workdir = tmp_path / 'sweep'  # stands for gs://bucket/sweep (epath handles both)
  args = [f'--sweep={TINY}:failing', f'--workdir={workdir}', '--backend=tpu', '--tpu=pod-1',
          '--tpu_zone=us-central2-b', '--tpu_project=lab', '--tpu_setup=pip install -q .']
  dry = sweep_cmd(args + ['--dry_run'], '', env=env)
  assert dry.returncode == 0, dry.stderr
  assert not log.exists()  # a dry run calls nothing
  printed = [l for l in dry.stdout.splitlines() if l.startswith('gcloud ')]
  out = sweep_cmd(args, '', env=env)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]  # no run failed: exit 3 =
  calls = [json.loads(l) for l in log.read_text().splitlines()]       # diverged
  import shlex  # pylint: disable=g-import-not-at-top
  assert [shlex.join(['gcloud'] + c) for c in calls] == printed  # the dry run printed these
  tail = ['--zone=us-central2-b', '--worker=all', '--project=lab']
  scp, unpack, setup, *runs = calls
  assert scp[:4] == ['compute', 'tpus', 'tpu-vm', 'scp'] and scp[-3:] == tail
  assert scp[5] == 'pod-1:flaxformer_lab.tgz'
  with tarfile.open(scp[4]) as tar:
    names = tar.getnames()
  assert 'flaxformer_lab/main.py' in names and 'tests/tiny_sweep.py' in names
  assert 'flaxformer_lab/sweeps/tpu.py' in names and not any('__pycache__' in n for n in names)
  assert unpack[:5] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'pod-1'] and unpack[-3:] == tail
  assert 'tar -xzf flaxformer_lab.tgz -C flaxformer_lab' in unpack[5]
  assert setup[5] == '--command=cd flaxformer_lab && pip install -q .'
  sweep = spec_lib.load(f'{TINY}:failing', str(workdir))
  assert len(runs) == len(sweep.runs)  # one at a time, in order, on every worker
  for call, run in zip(runs, sweep.runs):
    assert call[:5] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'pod-1'] and call[-3:] == tail
    remote = call[5][len('--command='):]
    assert remote.startswith('cd flaxformer_lab && FLAXFORMER_DISTRIBUTED=1 python3 -m '
                             'flaxformer_lab.main ')
    argv = shlex.split(remote.split(' && ', 1)[1])[1:]  # drop the env assignment
    assert '--config=tests/tiny_sweep.py:failing' in argv  # the path inside the copied code
    assert f'--workdir={run.workdir}' in argv
    assert all(f'--config.{k}={spec_lib.flag_value(v)}' in argv for k, v in run.overrides.items())
  statuses = {r.name: state_lib.read_outcome(r.workdir)['status'] for r in sweep.runs}
  assert statuses == {'num_heads=3': 'done', 'learning_rate=1e+30': 'diverged',
                      'norm_position=pre': 'done'}  # the fake's exit statuses
  # rerunning skips finished runs: nothing is issued
  out = sweep_cmd(args, '', env=env)
  assert out.returncode == 0 and len(log.read_text().splitlines()) == len(calls), out.stdout


# --- Weights & Biases, offline -----------------------------------------------------------------------
def test_wandb_offline_run_resumes_into_the_same_run_id(tmp_path, monkeypatch):
  pytest.importorskip('wandb')
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  workdir = str(tmp_path / 'run')
  config = {'wandb': {'project': 'lab-tests', 'entity': '', 'group': '', 'mode': 'offline'},
            'sweep': {'name': 'tiny_sweep', 'run': 'seed=0', 'coordinates': '{"seed": 0}'},
            'seed': 0}
  w = metrics_lib.MetricWriter(workdir, progress='off', tensorboard=False, is_primary=True,
                               config=config)
  first_id = w._wandb.id  # pylint: disable=protected-access
  assert w._wandb.run.group == 'tiny_sweep'  # pylint: disable=protected-access
  w.write_scalars(1, {'train/loss': 2.0})
  w.write_scalars(2, {'train/loss': 1.5})
  w.close()
  saved = open(os.path.join(workdir, metrics_lib.WANDB_ID_FILE)).read().strip()
  assert saved == first_id
  # a resumed run (reading config.json, as the train loop's writer does) continues that run
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config, f)
  w = metrics_lib.MetricWriter(workdir, progress='off', tensorboard=False, is_primary=True,
                               start_step=1)
  assert w._wandb.id == first_id and w._wandb.run.id == first_id  # pylint: disable=protected-access
  w.write_scalars(2, {'train/loss': 1.4})
  w.close()
  offline = sorted(p for p in os.listdir(os.path.join(workdir, 'wandb')) if p.startswith('offline-run'))
  assert len(offline) == 2 and all(p.endswith('-' + first_id) for p in offline), offline
  assert [r['train/loss'] for r in metrics_lib.read_metrics(workdir)] == [2.0, 1.4]


# --- the experiment ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_prepost_ln_smoke_sweep_and_summary(tfds_dir, tmp_path):
  spec = os.path.join(REPO_ROOT, 'experiments', 'prepost_ln', 'config.py') + ':smoke'
  out = sweep_cmd([f'--sweep={spec}', f'--workdir={tmp_path}', '--parallel=2'], tfds_dir)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  summ = sweep_cmd([f'--sweep={spec}', f'--workdir={tmp_path}', '--summarize'], '')
  assert summ.returncode == 0, summ.stderr[-2000:]
  rows = list(csv.DictReader(open(tmp_path / 'results.csv')))
  assert sorted(r['norm_position'] for r in rows) == ['deepnorm', 'post', 'pre']
  assert all(r['status'] == 'done' and float(r['final_eval/loss']) > 0 for r in rows)
