"""Tests of flaxformer_lab.sharding.

Device-count-dependent checks run in a subprocess with 8 CPU devices (the pytest process may have
initialized JAX with one): this file doubles as that subprocess's script (`python
tests/test_sharding.py checks` runs every `check_*` function and prints one JSON line per check;
`python tests/test_sharding.py multiprocess` is one process of the 2-process job).
"""

from __future__ import annotations

import json
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import multiprocess_util
from flaxformer_lab.presets import common
from flaxformer_lab import sharding

# --- checks that run with 8 CPU devices (in the subprocess) --------------------------------------


def _config(shape):
  cfg = common.base_config()
  cfg.mesh.shape = shape
  return cfg


def check_mesh_2x2x2():
  mesh = sharding.make_mesh(_config((2, 2, 2)).mesh)
  assert mesh.axis_names == ('data', 'fsdp', 'tensor'), mesh.axis_names
  assert tuple(mesh.devices.shape) == (2, 2, 2)
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3, mesh.axis_types


def check_minus_one_fills():
  for shape, want in [((-1, 1, 1), (8, 1, 1)), ((2, -1, 2), (2, 2, 2)), ((1, 1, -1), (1, 1, 8)),
                      ((-1, 4, 1), (2, 4, 1))]:
    mesh = sharding.make_mesh(_config(shape).mesh)
    assert tuple(mesh.devices.shape) == want, (shape, mesh.devices.shape)


def check_bad_shape_errors():
  for shape, pattern in [((2, 2, 1), 'multiplies to 4 but there are 8 devices'),
                         ((3, -1, 1), 'does not divide the 8 devices'),
                         ((-1, -1, 2), 'at most one -1')]:
    try:
      sharding.make_mesh(_config(shape).mesh)
    except ValueError as e:
      assert pattern in str(e), (shape, str(e))
      assert 'mesh.shape' in str(e), str(e)
    else:
      raise AssertionError(f'no error for {shape}')


class _Mlp:
  """A small linen module with logically annotated params and an activation constraint."""

  @staticmethod
  def make():
    import flax.linen as nn  # pylint: disable=g-import-not-at-top

    class Mlp(nn.Module):

      @nn.compact
      def __call__(self, x):
        wi = self.param('wi', nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                           ('embed', 'mlp')), (16, 32))
        wo = self.param('wo', nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                           ('mlp', 'embed')), (32, 16))
        b = self.param('b', nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)), (16,))
        h = nn.with_logical_constraint(x @ wi, ('activation_batch', 'activation_mlp'))
        return h @ wo + b, h

    return Mlp()


def _sharded_params(mesh, rules):
  model = _Mlp.make()
  x = jnp.ones((8, 16))
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)
  shardings = sharding.state_shardings(abstract, mesh, rules)
  params = jax.jit(lambda r: sharding.unbox(model.init(r, x)), out_shardings=shardings)(
      jax.random.key(0))
  return model, abstract, shardings, params


def check_params_sharded_fsdp_tensor():
  cfg = _config((2, 2, 2))
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.axis_rules(cfg)
  with sharding.use_mesh(mesh, rules):
    _, abstract, shardings, params = _sharded_params(mesh, rules)
  p = params['params']
  # embed -> fsdp (2), mlp -> tensor (2): each device holds a quarter of each kernel.
  assert p['wi'].shape == (16, 32) and p['wi'].addressable_shards[0].data.shape == (8, 16)
  assert p['wo'].addressable_shards[0].data.shape == (16, 8)
  assert p['b'].addressable_shards[0].data.shape == (8,)
  assert shardings['params']['wi'].spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  assert len(p['wi'].sharding.device_set) == 8
  # Abstract restore targets carry the shardings and no boxes.
  targets = sharding.abstract_with_shardings(abstract, shardings)
  assert isinstance(targets['params']['wi'], jax.ShapeDtypeStruct)
  assert targets['params']['wi'].sharding == shardings['params']['wi']


def check_train_state_shardings_with_optimizer():
  """The train loop's path: boxed TrainState -> shardings -> jit init -> unboxed sharded state."""
  import optax  # pylint: disable=g-import-not-at-top
  from flax.training import train_state  # pylint: disable=g-import-not-at-top
  from flaxformer_lab import optim  # pylint: disable=g-import-not-at-top
  cfg = _config((2, 2, 2))
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.axis_rules(cfg)
  model = _Mlp.make()
  tx, _ = optim.make_optimizer(cfg.optim, 10)
  x = jnp.ones((8, 16))

  def init(rng):
    params = model.init(rng, x)['params']
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  with sharding.use_mesh(mesh, rules):
    boxed = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding.state_shardings(boxed, mesh, rules)
    state = jax.jit(lambda r: sharding.unbox(init(r)), out_shardings=shardings)(jax.random.key(0))
    targets = sharding.abstract_with_shardings(boxed, shardings)

    def train_step(state, batch):
      def loss_fn(p):
        y, _ = state.apply_fn({'params': p}, batch)
        return jnp.mean(y ** 2)
      grads = jax.grad(loss_fn)(state.params)
      return state.apply_gradients(grads=grads)

    bs = sharding.batch_sharding(mesh)
    step = jax.jit(train_step, in_shardings=(shardings, bs), out_shardings=shardings)
    state = step(state, sharding.make_global_batch(np.ones((8, 16), np.float32), bs))
  adam = state.opt_state[1][0]
  assert isinstance(adam, optax.ScaleByAdamState)
  assert adam.mu['wi'].sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  assert adam.mu['wi'].addressable_shards[0].data.shape == (8, 16)
  assert state.params['wi'].addressable_shards[0].data.shape == (8, 16)
  assert int(state.step) == 1 and state.step.sharding.is_fully_replicated
  assert targets.params['wo'].sharding.spec == jax.sharding.PartitionSpec('tensor', 'fsdp')


def check_logical_constraint_applied_under_set_mesh():
  cfg = _config((2, 2, 2))
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.axis_rules(cfg)
  with sharding.use_mesh(mesh, rules):
    model, _, _, params = _sharded_params(mesh, rules)
    rep = sharding.replicated(mesh)
    # Everything replicated in and out except the constrained activation: only the constraint
    # can shard it as (('data', 'fsdp'), 'tensor').
    params = jax.device_put(params, rep)
    x = jax.device_put(jnp.ones((8, 16)), rep)
    fn = jax.jit(model.apply, in_shardings=(rep, rep), out_shardings=(rep, None))
    y, h = fn(params, x)
    text = fn.lower(params, x).as_text()
  assert 'sharding_constraint' in text
  assert h.sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'), 'tensor'), h.sharding
  assert h.addressable_shards[0].data.shape == (2, 16)
  assert y.sharding.is_fully_replicated


def check_global_batch_and_jit():
  cfg = _config((2, 2, 2))
  mesh = sharding.make_mesh(cfg.mesh)
  bs = sharding.batch_sharding(mesh)
  local = {'x': np.arange(16 * 3, dtype=np.float32).reshape(16, 3), 'y': np.ones((16,), np.int32)}
  batch = sharding.make_global_batch(local, bs)
  assert batch['x'].shape == (16, 3) and batch['x'].addressable_shards[0].data.shape == (4, 3)
  assert batch['y'].sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'))
  with sharding.use_mesh(mesh, sharding.axis_rules(cfg)):
    total = jax.jit(lambda b: jnp.sum(b['x']) + jnp.sum(b['y']))(batch)
  assert float(total) == float(local['x'].sum() + 16)


CHECKS = sorted(name for name in globals() if name.startswith('check_'))


def _run_checks():
  jax.config.update('jax_num_cpu_devices', 8)
  assert jax.device_count() == 8, jax.devices()
  for name in CHECKS:
    try:
      globals()[name]()
      print(json.dumps({'check': name, 'ok': True}), flush=True)
    except Exception:  # pylint: disable=broad-except
      print(json.dumps({'check': name, 'ok': False, 'error': traceback.format_exc()}), flush=True)


def _multiprocess_worker():
  """One of 2 processes with 4 CPU devices each: a 2x2x2 mesh over the 8 global devices."""
  assert sharding.maybe_initialize_distributed()
  pid = jax.process_index()
  assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
  cfg = _config((2, 2, 2))
  mesh = sharding.make_mesh(cfg.mesh)
  bs = sharding.batch_sharding(mesh)
  # Each process feeds its own 4 rows, filled with its process index + 1.
  rows = sharding.local_batch_size(8)
  batch = sharding.make_global_batch(np.full((rows, 2), pid + 1, np.float32), bs)
  assert batch.shape == (8, 2)
  with sharding.use_mesh(mesh, sharding.axis_rules(cfg)):
    total = jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh))(batch)
    psum = jax.jit(jax.shard_map(lambda x: jax.lax.psum(jnp.sum(x), ('data', 'fsdp')),
                                 mesh=mesh, in_specs=jax.sharding.PartitionSpec(('data', 'fsdp')),
                                 out_specs=jax.sharding.PartitionSpec()))(batch)
  want = 4 * 2 * 1 + 4 * 2 * 2
  assert float(total) == want, float(total)
  assert float(psum) == want, float(psum)
  print(json.dumps({'process': pid, 'total': float(total), 'psum': float(psum)}), flush=True)


if __name__ == '__main__':
  if sys.argv[1:] == ['checks']:
    _run_checks()
  elif sys.argv[1:] == ['multiprocess']:
    _multiprocess_worker()
  else:
    raise SystemExit(f'usage: {sys.argv[0]} checks|multiprocess')

# --- pytest side ---------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def eight_device_results():
  out = multiprocess_util.run_python([__file__, 'checks'], num_devices=8, timeout=120)
  results = {}
  for line in out.stdout.splitlines():
    if line.startswith('{'):
      rec = json.loads(line)
      results[rec['check']] = rec
  return results, out.stderr


@pytest.mark.parametrize('name', CHECKS)
def test_with_8_devices(eight_device_results, name):
  results, stderr = eight_device_results
  assert name in results, f'check {name} did not run; stderr:\n{stderr[-4000:]}'
  assert results[name]['ok'], results[name].get('error')


def test_two_processes_psum_over_global_mesh():
  outs = multiprocess_util.launch_processes([__file__, 'multiprocess'], num_processes=2,
                                            devices_per_process=4, timeout=120)
  recs = [json.loads(next(l for l in o.stdout.splitlines() if l.startswith('{'))) for o in outs]
  assert sorted(r['process'] for r in recs) == [0, 1]
  assert all(r['total'] == 24.0 and r['psum'] == 24.0 for r in recs)


def test_resolve_mesh_shape():
  assert sharding.resolve_mesh_shape((-1, 1, 1), 1) == (1, 1, 1)
  assert sharding.resolve_mesh_shape((2, -1, 2), 16) == (2, 4, 2)
  with pytest.raises(ValueError, match=r'multiplies to 4 but there are 2 devices'):
    sharding.resolve_mesh_shape((2, 2, 1), 2)


def test_validate_axis_rules():
  mesh_axes = ('data', 'fsdp', 'tensor')
  sharding.validate_axis_rules(common.logical_axis_rules(), mesh_axes)
  with pytest.raises(ValueError, match="'embed' appears twice"):
    sharding.validate_axis_rules([('embed', 'fsdp'), ('mlp', None), ('embed', None)], mesh_axes)
  with pytest.raises(ValueError, match="maps to mesh axis 'model'.*not one of the mesh axes"):
    sharding.validate_axis_rules([('mlp', 'model')], mesh_axes)
  with pytest.raises(ValueError, match='repeats a mesh axis'):
    sharding.validate_axis_rules([('batch', ('data', 'data'))], mesh_axes)
  with pytest.raises(ValueError, match='expected'):
    sharding.validate_axis_rules([('batch',)], mesh_axes)


def test_unknown_logical_axis_is_an_error():
  import flax.linen as nn
  boxed = {'params': {'dense': {'kernel': nn.LogicallyPartitioned(
      jax.ShapeDtypeStruct((4, 8), jnp.float32), ('embed', 'hidden'))}}}
  mesh = sharding.make_mesh(common.mesh_config())
  with pytest.raises(ValueError, match=r"\['params'\]\['dense'\]\['kernel'\].*\['hidden'\]"):
    sharding.state_shardings(boxed, mesh, common.logical_axis_rules())


def test_no_distributed_init_without_env(monkeypatch):
  for key in ('FLAXFORMER_COORDINATOR', 'JAX_COORDINATOR_ADDRESS', 'FLAXFORMER_DISTRIBUTED',
              'FLAXFORMER_NUM_CPU_DEVICES'):
    monkeypatch.delenv(key, raising=False)
  assert sharding.maybe_initialize_distributed() is False
  monkeypatch.setenv('FLAXFORMER_COORDINATOR', 'localhost:1234')
  monkeypatch.delenv('FLAXFORMER_NUM_PROCESSES', raising=False)
  with pytest.raises(ValueError, match='FLAXFORMER_NUM_PROCESSES'):
    sharding.maybe_initialize_distributed()


def test_single_device_mesh_and_batch():
  cfg = common.base_config()
  mesh = sharding.make_mesh(cfg.mesh)
  assert mesh.devices.size == jax.device_count()
  batch = sharding.make_global_batch({'x': np.ones((4, 2), np.float32)}, sharding.batch_sharding(mesh))
  assert batch['x'].shape == (4, 2)
