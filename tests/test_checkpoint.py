"""Tests of flaxformer_lab.checkpoint.

This file is also the script of its subprocess tests: `python tests/test_checkpoint.py loop
<workdir> [kill_at]` runs a small training loop under a PreemptionGuard (one process, or one of a
multi-process job), and `... sharded <workdir>` saves and restores across shardings on 8 devices.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import multiprocess_util
from flaxformer_lab import checkpoint
from flaxformer_lab import sharding

# After a failed tensorstore read, orbax's event loop closes while tensorstore futures still call
# back; Python reports that as an unraisable exception at a later garbage collection (harmless).
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def _state(seed=0, shape=(4, 6)):
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {'dense': {'kernel': jax.random.normal(k1, shape), 'bias': jax.random.normal(k2, shape[1:])},
            'norm': {'scale': jnp.ones(shape[1:])}}
  tx = optax.adamw(1e-2)
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  grads = jax.tree.map(lambda p: 0.1 * p, params)
  state = state.apply_gradients(grads=grads)  # non-trivial moments, step -> jax array
  return state.replace(step=jnp.asarray(state.step, jnp.int32))


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _assert_equal_trees(a, b):
  # Paths, not treedefs: a TrainState's treedef includes its (static) optax object.
  la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (_, x), (_, y) in zip(la, lb):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_exact_with_data_state(tmp_path):
  state = _state()
  config = {'model': {'scan_layers': True}, 'batch_size': 8}
  ck = checkpoint.Checkpointer(str(tmp_path), every=10, keep=3, async_save=False, config=config)
  data_state = {'next_index': 123, 'epoch': 2, 'name': 'train'}
  assert ck.save(7, state, data_state)
  assert ck.latest_step() == 7 and os.path.isdir(tmp_path / 'checkpoints' / '7' / 'state')
  restored, restored_data = ck.restore(7, _abstract(_state(seed=1)))
  assert isinstance(restored, train_state.TrainState)
  _assert_equal_trees(restored, state)
  assert int(restored.step) == 1 and restored.step.dtype == jnp.int32
  assert restored_data == data_state
  assert ck.stored_config(7) == config
  ck.close()
  # Reopened later (a resumed run), bytes data states (grain DataLoader) round-trip too.
  ck = checkpoint.Checkpointer(str(tmp_path), every=10, keep=3)
  assert ck.latest_step() == 7
  assert ck.save(8, state, b'{"pos": 3}')
  assert ck.restore(None, _abstract(state))[1] == b'{"pos": 3}'
  ck.close()


def test_from_config_stores_resolved_config(tmp_path):
  from flaxformer_lab.presets import common
  config = common.base_config()
  config.checkpoint_every, config.keep_checkpoints, config.async_checkpoints = 5, 1, False
  with checkpoint.Checkpointer.from_config(str(tmp_path), config) as ck:
    assert not ck.maybe_save(4, _state()) and ck.maybe_save(5, _state())
    assert ck.maybe_save(10, _state())
    assert ck.all_steps() == [10]
    stored = ck.stored_config(10)
  assert stored['model']['scan_layers'] == config.model.scan_layers
  assert stored['mesh']['shape'] == [-1, 1, 1] and stored['checkpoint_every'] == 5


def test_maybe_save_interval_and_keep_last_k(tmp_path):
  state = _state()
  ck = checkpoint.Checkpointer(str(tmp_path), every=2, keep=2, async_save=False)
  calls = []
  data_fn = lambda: calls.append(1) or {'n': len(calls)}  # called only when saving
  saved = [s for s in range(1, 10) if ck.maybe_save(s, state, data_fn)]
  assert saved == [2, 4, 6, 8] and len(calls) == 4
  assert ck.restore(8, _abstract(state))[1] == {'n': 4}
  assert ck.save(9, state, {'s': 9})        # forced, off-interval
  assert not ck.save(9, state, {'s': 9})    # already saved: no-op
  assert not ck.maybe_save(8, state, {})    # already saved
  ck.wait_until_finished()
  assert ck.all_steps() == [8, 9]
  assert sorted(os.listdir(ck.directory)) == ['8', '9']
  ck.close()


def test_a_save_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
  from flaxformer_lab import errors  # pylint: disable=g-import-not-at-top
  state = _state()
  ck = checkpoint.Checkpointer(str(tmp_path), every=1, keep=3, async_save=False)
  assert ck.save(1, state, {'n': 1})
  real = shutil.disk_usage
  monkeypatch.setattr(checkpoint.shutil, 'disk_usage',
                      lambda p: real(p)._replace(free=100_000))  # less than 1 MB + the state
  with pytest.raises(OSError) as e:
    ck.save(2, state, {'n': 2})
  code, line = errors.classify(e.value)
  assert code == 2 and line.startswith('no space left') and ck.directory in line, line
  ck.wait_until_finished()
  assert ck.all_steps() == [1] and sorted(os.listdir(ck.directory)) == ['1']  # nothing partial
  monkeypatch.setattr(checkpoint.shutil, 'disk_usage', real)
  assert ck.save(2, state, {'n': 2})  # space again: saves
  ck.close()


def test_async_save_then_wait(tmp_path):
  state = _state(shape=(256, 512))
  ck = checkpoint.Checkpointer(str(tmp_path), every=1, keep=3, async_save=True)
  assert ck.maybe_save(1, state, {'s': 1})
  ck.wait_until_finished()
  assert ck.all_steps() == [1]
  assert not any('tmp' in name for name in os.listdir(ck.directory))
  restored, data = ck.restore(1, _abstract(state))
  _assert_equal_trees(restored, state)
  assert data == {'s': 1}
  ck.close()


def test_latest_step_ignores_interrupted_tmp_dir(tmp_path):
  state = _state()
  ck = checkpoint.Checkpointer(str(tmp_path), every=1, keep=3, async_save=False)
  ck.save(3, state)
  ck.close()
  tmp = tmp_path / 'checkpoints' / '5.orbax-checkpoint-tmp'  # an interrupted save
  (tmp / 'state').mkdir(parents=True)
  (tmp / 'state' / 'partial').write_text('x')
  ck = checkpoint.Checkpointer(str(tmp_path), every=1, keep=3)
  assert ck.latest_step() == 3
  _, data = ck.restore(None, _abstract(state))
  assert data is None
  ck.close()
  assert not tmp.exists()  # removed by the manager (cleanup_tmp_directories)


@pytest.mark.parametrize('victim', ['state/_METADATA', 'state/manifest.ocdbt',
                                    'state/d', 'data/metadata'])
def test_corrupt_checkpoint_names_directory(tmp_path, victim):
  state = _state()
  ck = checkpoint.Checkpointer(str(tmp_path), every=1, keep=3, async_save=False)
  ck.save(1, state, {'s': 1})
  ck.save(2, state, {'s': 2})
  target = tmp_path / 'checkpoints' / '2' / victim
  shutil.rmtree(target) if target.is_dir() else target.unlink()
  ck.close()
  ck = checkpoint.Checkpointer(str(tmp_path), every=1, keep=3)
  assert ck.latest_step() == 2  # no silent fallback to step 1
  with pytest.raises(checkpoint.CheckpointError) as err:
    ck.restore(None, _abstract(state))
  assert str(tmp_path / 'checkpoints' / '2') in str(err.value)
  assert 'other steps' in str(err.value)
  ck.close()


def test_mismatched_tree_names_leaves(tmp_path):
  state = _state(shape=(4, 6))
  ck = checkpoint.Checkpointer(str(tmp_path), every=1, keep=3, async_save=False,
                               config={'model': {'scan_layers': True, 'd_model': 6}})
  ck.save(1, state)
  ck.close()
  other = _state(shape=(4, 8))
  other = other.replace(params={**other.params, 'extra': {'kernel': jnp.zeros((2, 2))}})
  ck = checkpoint.Checkpointer(str(tmp_path), every=1, keep=3,
                               config={'model': {'scan_layers': False, 'd_model': 8}})
  with pytest.raises(checkpoint.CheckpointError) as err:
    ck.restore(1, _abstract(other))
  msg = str(err.value)
  assert 'params/dense/kernel: checkpoint float32[4, 6] vs target float32[4, 8]' in msg
  assert 'params/extra/kernel' in msg
  assert 'model.scan_layers: True (checkpoint) vs False (now)' in msg
  assert str(tmp_path / 'checkpoints' / '1') in msg
  ck.close()


def test_rejects_boxed_and_host_scalars(tmp_path):
  import flax.linen as nn
  ck = checkpoint.Checkpointer(str(tmp_path), every=1, keep=3, async_save=False)
  with pytest.raises(TypeError, match="leaf 'step' has type int"):
    ck.save(1, {'step': 3, 'w': jnp.ones(2)})
  with pytest.raises(TypeError, match="has type int32"):
    ck.save(1, {'step': np.int32(3), 'w': jnp.ones(2)})
  with pytest.raises(TypeError, match='unbox'):
    ck.save(1, {'w': nn.LogicallyPartitioned(jnp.ones(2), ('embed',))})
  with pytest.raises(checkpoint.CheckpointError, match='no checkpoint in'):
    ck.restore(None, {'w': jnp.ones(2)})


def test_preemption_guard_flag():
  with checkpoint.PreemptionGuard() as guard:
    assert not guard.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while not guard.requested and time.time() < deadline:
      time.sleep(0.01)
    assert guard.should_stop(2) and guard.signal_received == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# --- subprocess tests ----------------------------------------------------------------------------


def _loop_worker(workdir, kill_at=None):
  """A small loop: adam on a quadratic, checkpoint every 1000 steps, force-save on SIGTERM."""
  sharding.maybe_initialize_distributed()
  pid = jax.process_index()
  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  tx = optax.adam(1e-2)
  params = {'w': jnp.zeros((8, 4))}

  @jax.jit
  def init():
    return {'params': params, 'opt': tx.init(params), 'step': jnp.zeros((), jnp.int32)}

  @jax.jit
  def train_step(s):
    g = jax.grad(lambda p: jnp.sum((p['w'] - 1.0) ** 2))(s['params'])
    u, opt = tx.update(g, s['opt'], s['params'])
    return {'params': optax.apply_updates(s['params'], u), 'opt': opt, 'step': s['step'] + 1}

  state = jax.jit(init, out_shardings=rep)()
  ck = checkpoint.Checkpointer(workdir, every=1000, keep=2, async_save=True)
  guard = checkpoint.PreemptionGuard()
  for step in range(100_000):
    state = train_step(state)
    if step + 1 == 3:
      print('READY', flush=True)
    if kill_at is not None and step + 1 == kill_at and pid == 0:
      os.kill(os.getpid(), signal.SIGTERM)
    if guard.should_stop(step + 1):
      ck.save(step + 1, state, {'pos': step + 1, 'process': pid})
      break
    time.sleep(0.01)
  ck.close()
  total = float(jax.jit(lambda s: jnp.sum(s['params']['w']), out_shardings=rep)(state))
  # Restore right away (all processes): every process gets its own data state back.
  ck = checkpoint.Checkpointer(workdir, every=1000, keep=2)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored, data = ck.restore(None, abstract)
  assert data == {'pos': step + 1, 'process': pid}, data
  assert int(restored['step']) == step + 1
  print(json.dumps({'process': pid, 'stopped_at': step + 1, 'sum': total}), flush=True)


def _sharded_worker(workdir):
  """8 devices: save sharded one way, restore sharded another way."""
  assert jax.device_count() == 8
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  named = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  value = jnp.arange(16 * 32, dtype=jnp.float32).reshape(16, 32)
  state = {'params': {'kernel': jax.device_put(value, named('data', None))},
           'step': jax.device_put(jnp.asarray(4, jnp.int32), named())}
  ck = checkpoint.Checkpointer(workdir, every=1, keep=1)
  ck.save(4, state, {'pos': 4})
  ck.wait_until_finished()
  target = {'params': {'kernel': jax.ShapeDtypeStruct((16, 32), jnp.float32,
                                                      sharding=named('fsdp', 'tensor'))},
            'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=named())}
  restored, _ = ck.restore(4, target)
  k = restored['params']['kernel']
  assert k.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor'), k.sharding
  assert k.addressable_shards[0].data.shape == (8, 16)
  np.testing.assert_array_equal(np.asarray(k), np.asarray(value))
  assert int(restored['step']) == 4
  ck.close()
  print('SHARDED_OK', flush=True)


if __name__ == '__main__':
  if sys.argv[1] == 'loop':
    _loop_worker(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
  elif sys.argv[1] == 'sharded':
    _sharded_worker(sys.argv[2])
  sys.exit(0)


def test_restore_with_target_shardings_8_devices(tmp_path):
  out = multiprocess_util.run_python([__file__, 'sharded', str(tmp_path)], num_devices=8)
  assert 'SHARDED_OK' in out.stdout


def test_sigterm_leaves_restorable_checkpoint(tmp_path):
  workdir = str(tmp_path)
  proc = subprocess.Popen([sys.executable, __file__, 'loop', workdir], cwd=multiprocess_util.REPO_ROOT,
                          env=multiprocess_util.base_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    while proc.stdout.readline().strip() != 'READY':
      assert proc.poll() is None, proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, stderr[-3000:]
  rec = json.loads(stdout.strip().splitlines()[-1])
  ck = checkpoint.Checkpointer(workdir, every=1000, keep=2)
  assert ck.latest_step() == rec['stopped_at'] >= 3
  target = {'params': {'w': jax.ShapeDtypeStruct((8, 4), jnp.float32)},
            'opt': (optax.ScaleByAdamState(count=jax.ShapeDtypeStruct((), jnp.int32),
                                           mu={'w': jax.ShapeDtypeStruct((8, 4), jnp.float32)},
                                           nu={'w': jax.ShapeDtypeStruct((8, 4), jnp.float32)}),
                    optax.EmptyState()),
            'step': jax.ShapeDtypeStruct((), jnp.int32)}
  restored, data = ck.restore(None, target)
  assert int(restored['step']) == rec['stopped_at']
  assert float(jnp.sum(restored['params']['w'])) == pytest.approx(rec['sum'])
  assert data == {'pos': rec['stopped_at'], 'process': 0}


def test_two_processes_stop_together_on_sigterm(tmp_path):
  # Only process 0 receives SIGTERM (at step 5); both must stop at the same step and save.
  outs = multiprocess_util.launch_processes([__file__, 'loop', str(tmp_path), '5'],
                                            num_processes=2, devices_per_process=2, timeout=120)
  recs = [json.loads(o.stdout.strip().splitlines()[-1]) for o in outs]
  assert [r['process'] for r in recs] == [0, 1]
  assert recs[0]['stopped_at'] == recs[1]['stopped_at'] == 5
  assert recs[0]['sum'] == recs[1]['sum']
  # Here (1 process, 1 device): the state loads onto this device, but the two processes' data
  # positions differ, so resuming the data pipeline is refused unless with_data=False.
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  leaf = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=dev)
  target = {'params': {'w': leaf(8, 4)},
            'opt': (optax.ScaleByAdamState(count=leaf(dtype=jnp.int32), mu={'w': leaf(8, 4)},
                                           nu={'w': leaf(8, 4)}), optax.EmptyState()),
            'step': leaf(dtype=jnp.int32)}
  with checkpoint.Checkpointer(str(tmp_path), every=1000, keep=2) as ck:
    with pytest.raises(checkpoint.CheckpointError, match='restart with 2 processes'):
      ck.restore(5, target)
    state, data = ck.restore(5, target, with_data=False)
  assert data is None and int(state['step']) == 5
  assert float(jnp.sum(state['params']['w'])) == pytest.approx(recs[0]['sum'])
