"""Device mesh, logical-axis shardings, global batches and multi-process start-up.

Typical use in the train loop:

  sharding.maybe_initialize_distributed()          # first, before anything touches JAX devices
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.axis_rules(config)               # validated against the mesh axes
  with sharding.use_mesh(mesh, rules):
    boxed = jax.eval_shape(init_fn, rng)            # abstract TrainState, params still boxed
    state_sh = sharding.state_shardings(boxed, mesh, rules)
    state = jax.jit(lambda r: sharding.unbox(init_fn(r)), out_shardings=state_sh)(rng)
    target = sharding.abstract_with_shardings(boxed, state_sh)   # for Checkpointer.restore
    batch_sh = sharding.batch_sharding(mesh)
    step = jax.jit(train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None))
    for local_batch in data:                        # this process's rows, numpy
      state, metrics = step(state, sharding.make_global_batch(local_batch, batch_sh))

Axis types are Auto (the jax default is now Explicit, which breaks linen's logical constraints), and
the mesh is entered with `jax.set_mesh` (the legacy `with mesh:` silently drops every
`nn.with_logical_constraint`).
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import sys
import threading
import time
from typing import Any, Iterator, Optional, Sequence

from absl import logging
import flax.linen as nn
import jax
import numpy as np

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_MESH_AXES = ('data', 'fsdp')  # the leading (batch) axis of inputs is split over these

# Environment of a local multi-process launch (see `maybe_initialize_distributed`).
ENV_COORDINATOR = 'FLAXFORMER_COORDINATOR'  # host:port of process 0's coordinator
ENV_NUM_PROCESSES = 'FLAXFORMER_NUM_PROCESSES'
ENV_PROCESS_ID = 'FLAXFORMER_PROCESS_ID'
ENV_NUM_CPU_DEVICES = 'FLAXFORMER_NUM_CPU_DEVICES'  # optional: CPU devices per process
ENV_AUTO_DETECT = 'FLAXFORMER_DISTRIBUTED'  # '1': call jax.distributed.initialize() with no args
# Seconds without a peer's heartbeat before the survivors stop with one line naming it (the lab's
# PeerWatchdog; jax's own service, whose loss detection ends in a C++ abort, is given a longer
# timeout as a backstop), and seconds to wait for every process at start-up (jax's default 300).
ENV_HEARTBEAT_TIMEOUT = 'FLAXFORMER_HEARTBEAT_TIMEOUT_S'
ENV_INIT_TIMEOUT = 'FLAXFORMER_INIT_TIMEOUT_S'
DEFAULT_HEARTBEAT_TIMEOUT_S = 30


def _seconds(env: str, default: Optional[int]) -> Optional[int]:
  value = os.environ.get(env)
  if not value:
    return default
  if not value.isdigit() or int(value) < 1:
    raise ValueError(f'${env}={value!r} must be a whole number of seconds >= 1')
  return int(value)


def heartbeat_timeout() -> int:
  """Seconds without a peer's heartbeat before a multi-process run stops ($%s)."""
  return _seconds(ENV_HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT_S)


def _timeouts() -> dict[str, int]:
  lab = heartbeat_timeout()
  out = {'heartbeat_timeout_seconds': max(2 * lab, lab + 30)}  # the lab's watchdog speaks first
  init = _seconds(ENV_INIT_TIMEOUT, None)
  if init is not None:
    out['initialization_timeout'] = init
  return out


class PeerWatchdog:
  """Stops a multi-process run with one line when a peer process is lost.

  Each process publishes a heartbeat (a counter, every `interval` s) in the distributed service's
  key-value store and reads its peers'. A peer whose counter has not moved for `timeout` s, or
  the coordinator (process 0, which holds the store) no longer answering for `timeout` s, is
  lost: `error: process <i> of <n> was lost ...` goes to stderr and this process leaves with
  exit status errors.PEER_LOST at once (a collective waiting on the dead peer would otherwise
  hang, or end in a C++ abort after jax's own heartbeat timeout). A process that leaves announces
  it (`announce_exit`): a clean exit is never a loss; a failed one is reported by its peers after
  a short grace period (its own error line says why).

  Two threads: one does the store's I/O (it may block on a dead coordinator), the other only
  compares timestamps, so the verdict comes within `timeout` + `interval` s whatever blocks.
  """

  PREFIX = 'flaxformer_lab/peer'

  def __init__(self, client, process_index: int, process_count: int, timeout: float,
               interval: float = 1.0, on_lost: Optional[Any] = None):
    """`client`: jax's DistributedRuntimeClient (key_value_set / key_value_dir_get);
    `on_lost(line)`: what a loss does (default: print `error: <line>` and exit PEER_LOST)."""
    self._client = client
    self._on_lost = on_lost
    self.pid, self.n = int(process_index), int(process_count)
    self.timeout, self.interval = float(timeout), float(interval)
    now = time.monotonic()
    self._seen = {p: (None, now) for p in range(self.n) if p != self.pid}  # (counter, when)
    self._exited: dict[int, tuple[int, float]] = {}  # peer -> (exit status, when seen)
    self._store_ok = now
    self._stop = threading.Event()
    self._lock = threading.Lock()
    self.verdict: Optional[str] = None
    self._threads = [threading.Thread(target=self._io, name='peer-heartbeat', daemon=True),
                     threading.Thread(target=self._judge, name='peer-watchdog', daemon=True)]

  def start(self) -> 'PeerWatchdog':
    for t in self._threads:
      t.start()
    return self

  def stop(self) -> None:
    self._stop.set()

  def announce_exit(self, code: int) -> None:
    """Tells the peers this process is leaving with `code` (0: never reported as lost)."""
    self._stop.set()
    try:
      self._client.key_value_set(f'{self.PREFIX}/exit/{self.pid}', str(int(code)), True)
    except Exception:  # pylint: disable=broad-except
      pass
    if code and _COORDINATOR is not None:
      _COORDINATOR.failed()

  def _io(self) -> None:
    count = 0
    while not self._stop.is_set():
      count += 1
      try:
        self._client.key_value_set(f'{self.PREFIX}/beat/{self.pid}', str(count), True)
        beats = dict(self._client.key_value_dir_get(f'{self.PREFIX}/'))
      except Exception:  # pylint: disable=broad-except
        beats = None  # the store (process 0) does not answer
      now = time.monotonic()
      if beats is not None:
        with self._lock:
          self._store_ok = now
          for key, value in beats.items():
            parts = key.rstrip('/').split('/')
            kind, peer = (parts[-2], parts[-1]) if len(parts) >= 2 else ('', '')
            if not peer.isdigit() or int(peer) == self.pid or int(peer) >= self.n:
              continue
            peer = int(peer)
            if kind == 'beat' and self._seen[peer][0] != value:
              self._seen[peer] = (value, now)
            elif kind == 'exit' and peer not in self._exited:
              self._exited[peer] = (int(value), now)
      self._stop.wait(self.interval)

  EXIT_GRACE_S = 5.0  # a peer that failed with its own error line: reported after this

  def _judge(self) -> None:
    grace = min(self.timeout, self.EXIT_GRACE_S)
    while not self._stop.wait(self.interval / 2):
      now = time.monotonic()
      with self._lock:
        lost = None
        if self.pid != 0 and now - self._store_ok > self.timeout:
          lost = (0, f'the coordinator (it holds the distributed service) has not answered for '
                     f'{self.timeout:.0f} s')
        for peer, (_, when) in sorted(self._seen.items()):
          if lost:
            break
          if peer in self._exited:
            code, seen = self._exited[peer]
            if code and now - seen > grace:
              lost = (peer, f'it stopped with exit status {code} (its own output says why)')
            continue
          if now - when > self.timeout:
            lost = (peer, f'no heartbeat for {self.timeout:.0f} s: it crashed, was killed or its '
                          'host went down')
      if lost and not self._stop.is_set():
        self._lost(*lost)
        return

  def _lost(self, peer: int, why: str) -> None:
    from flaxformer_lab import errors  # pylint: disable=g-import-not-at-top
    self.verdict = (f'process {peer} of {self.n} was lost ({why}); process {self.pid} stops too: '
                    'rerun the same command on every process to resume from the last complete '
                    'checkpoint')
    if self._on_lost is not None:
      self._on_lost(self.verdict)
      return
    print(f'error: {self.verdict}', file=sys.stderr, flush=True)
    errors.quiet_exit(errors.PEER_LOST)

  def wait_for_verdict(self, seconds: float) -> Optional[str]:
    """Blocks up to `seconds` for a lost peer to be named (the watchdog then ends the process);
    None when every peer is alive. For an error the main thread cannot explain."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and self.verdict is None and not self._stop.is_set():
      time.sleep(0.2)
    return self.verdict


_WATCHDOG: Optional[PeerWatchdog] = None

# The distributed service, run by process 0 in a child process of its own (see
# `CoordinatorProcess`): its stdin carries the spec, then 'stop' (a clean shutdown) or 'failed'.
_COORDINATOR_SCRIPT = r"""
import json, os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
spec = json.loads(sys.stdin.readline())
from jax._src.lib import _jax
try:
  service = _jax.get_distributed_runtime_service(spec['address'], spec['num_nodes'],
                                                 **spec['kwargs'])
except Exception as e:
  print('failed ' + ' '.join(str(e).split()), flush=True)
  os._exit(1)
print('ready', flush=True)
line = sys.stdin.readline().strip()
time.sleep({'stop': 2.0, 'failed': spec['grace']}.get(line, spec['linger']))
os._exit(0)
"""


class CoordinatorProcess:
  """jax's distributed service (the coordinator of a multi-process run) in a child process of
  process 0, in place of the thread jax starts inside it.

  Inside process 0, the service dies with it, and every peer's jax client then aborts at once
  with a C++ stack dump (jaxlib gives no usable callback). In a child that outlives process 0
  by the heartbeat timeout, the peers' PeerWatchdog sees process 0's heartbeat stop and says so
  in one line. The child ignores SIGTERM/SIGINT (a preempted job's processes still save through
  it) and leaves 2 s after jax shuts the service down cleanly, `grace` s after process 0 failed
  with an error line, and `linger` s after process 0 vanished.
  """

  def __init__(self, address: str, num_nodes: int, *, linger: float, grace: float, **kwargs):
    import json  # pylint: disable=g-import-not-at-top
    import subprocess  # pylint: disable=g-import-not-at-top
    self._proc = subprocess.Popen([sys.executable, '-c', _COORDINATOR_SCRIPT],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    spec = {'address': address, 'num_nodes': int(num_nodes), 'kwargs': kwargs,
            'linger': float(linger), 'grace': float(grace)}
    self._proc.stdin.write(json.dumps(spec) + '\n')
    self._proc.stdin.flush()
    answer = self._proc.stdout.readline().strip()
    self._proc.stdout.close()
    if answer != 'ready':
      raise RuntimeError(f'the distributed service could not start on {address}: '
                         f'{answer[len("failed "):] or "its process died"}')

  def _send(self, word: str) -> None:
    try:
      self._proc.stdin.write(word + '\n')
      self._proc.stdin.close()
    except (OSError, ValueError):
      pass

  def shutdown(self) -> None:
    """jax's `distributed.shutdown` (every client has passed the shutdown barrier)."""
    self._send('stop')

  def failed(self) -> None:
    """Process 0 leaves with an error: the peers need the service only to learn it."""
    self._send('failed')


def _initialize(**kwargs) -> None:
  """`jax.distributed.initialize(**kwargs)`, with process 0's service in a CoordinatorProcess."""
  global _COORDINATOR
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  original = _jax.get_distributed_runtime_service
  lab = heartbeat_timeout()

  def service(address, num_nodes, **service_kwargs):
    global _COORDINATOR
    _COORDINATOR = CoordinatorProcess(
        address, num_nodes, linger=service_kwargs.get('heartbeat_timeout', 2 * lab) + 15,
        grace=PeerWatchdog.EXIT_GRACE_S + 5, **service_kwargs)
    return _COORDINATOR

  _jax.get_distributed_runtime_service = service
  try:
    jax.distributed.initialize(**kwargs)
  finally:
    _jax.get_distributed_runtime_service = original


_COORDINATOR: Optional[CoordinatorProcess] = None


def peer_watchdog() -> Optional[PeerWatchdog]:
  """The running watchdog of this multi-process run (None single-process)."""
  return _WATCHDOG


def start_peer_watchdog() -> Optional[PeerWatchdog]:
  """Starts the PeerWatchdog after `jax.distributed.initialize` (idempotent; None when not
  multi-process). A clean interpreter exit announces itself to the peers."""
  global _WATCHDOG
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if _WATCHDOG is not None or client is None or jax.process_count() < 2:
    return _WATCHDOG
  _WATCHDOG = PeerWatchdog(client, jax.process_index(), jax.process_count(),
                           heartbeat_timeout()).start()
  atexit.register(_WATCHDOG.announce_exit, 0)  # before jax's client shuts down (LIFO)
  return _WATCHDOG


def check_mesh_config(mesh_config) -> None:
  """`mesh.shape` is a tuple of ints (one per `mesh.axis_names`); raises ValueError naming it."""
  shape, names = mesh_config.shape, tuple(mesh_config.axis_names)
  if (not isinstance(shape, (tuple, list)) or
      not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
    raise ValueError(f'config.mesh.shape={shape!r} must be a tuple of ints, one per axis of '
                     f'{names}, e.g. --config.mesh.shape="(-1,1,1)"')
  if len(shape) != len(names):
    raise ValueError(f'config.mesh.shape={tuple(shape)} has {len(shape)} sizes for the '
                     f'{len(names)} axes {names}')


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces the single -1 of `shape` so that the product is `num_devices`; errors clearly."""
  shape = tuple(int(s) for s in shape)
  free = [i for i, s in enumerate(shape) if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'mesh.shape={shape}: use positive sizes and at most one -1')
  known = math.prod(s for s in shape if s != -1)
  if free:
    if num_devices % known:
      raise ValueError(
          f'mesh.shape={shape}: the fixed axes multiply to {known}, which does not divide the '
          f'{num_devices} devices; change mesh.shape so the fixed sizes divide {num_devices}')
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(
        f'mesh.shape={shape} multiplies to {math.prod(shape)} but there are {num_devices} devices '
        f'(jax.device_count()); change mesh.shape so the product is {num_devices}, or put -1 on '
        'one axis to fill the remaining devices')
  return shape


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh of `config.mesh` over all global devices, with Auto axis types."""
  names = tuple(mesh_config.axis_names)
  if len(names) != len(tuple(mesh_config.shape)):
    raise ValueError(f'mesh.shape={tuple(mesh_config.shape)} and mesh.axis_names={names} differ in '
                     'length')
  num = len(devices) if devices is not None else jax.device_count()
  shape = resolve_mesh_shape(mesh_config.shape, num)
  kwargs = {} if devices is None else {'devices': devices}
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                       **kwargs)


def validate_axis_rules(rules: Sequence[tuple[str, Any]], mesh_axis_names: Sequence[str]) -> None:
  """Raises ValueError unless every rule is (logical name, None | mesh axis | tuple of mesh axes),
  no logical name repeats, every mesh axis exists, and no rule uses a mesh axis twice."""
  seen = {}
  valid = tuple(mesh_axis_names)
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ValueError(f'logical_axis_rules[{i}]={rule!r}: expected (logical_name, mesh_axes)')
    name, target = rule
    if name in seen:
      raise ValueError(f'logical axis {name!r} appears twice in logical_axis_rules (entries '
                       f'{seen[name]} and {i}); keep one')
    seen[name] = i
    axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    for axis in axes:
      if axis not in valid:
        raise ValueError(f'logical axis {name!r} maps to mesh axis {axis!r}, which is not one of '
                         f'the mesh axes {valid}')
    if len(set(axes)) != len(axes):
      raise ValueError(f'logical axis {name!r} maps to {axes}, which repeats a mesh axis')


def axis_rules(config) -> tuple[tuple[str, Any], ...]:
  """`config.logical_axis_rules` as hashable tuples, validated against `config.mesh.axis_names`."""
  rules = tuple((name, tuple(t) if isinstance(t, list) else t)
                for name, t in config.logical_axis_rules)
  validate_axis_rules(rules, config.mesh.axis_names)
  return rules


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
  """Enters `mesh` with `jax.set_mesh` and the logical axis rules (for `nn.with_logical_constraint`)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
    yield


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh,
                    rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for every leaf of a boxed abstract state (from `jax.eval_shape`).

  The result has the structure of the *unboxed* state (a box becomes one NamedSharding); unboxed
  leaves (the step, optimizer counts) are replicated.
  """
  check_logical_names(abstract_state, rules)
  specs = nn.get_partition_spec(abstract_state)
  return nn.logical_to_mesh_sharding(specs, mesh, tuple(rules))


def check_logical_names(boxed_tree: Any, rules: Sequence[tuple[str, Any]]) -> None:
  """Raises ValueError naming a parameter whose logical axis has no rule (flax would silently
  replicate that axis)."""
  known = {name for name, _ in rules}
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  for path, leaf in jax.tree_util.tree_flatten_with_path(boxed_tree, is_leaf=is_box)[0]:
    if not is_box(leaf):
      continue
    unknown = [n for n in leaf.names if n is not None and n not in known]
    if unknown:
      raise ValueError(f'parameter {jax.tree_util.keystr(path)} uses logical axes {unknown} that '
                       'have no entry in logical_axis_rules; add them (None = replicated)')


def unbox(tree: Any) -> Any:
  """`nn.meta.unbox`: drops the partitioning boxes (the live and saved state is always unboxed).

  Under `use_mesh` each box's value gets a logical sharding constraint, which is what you want
  inside jit (`jax.jit(lambda r: unbox(init(r)), out_shardings=...)`) but fails on
  ShapeDtypeStructs outside jit: use `unbox_abstract` for an abstract (eval_shape'd) state.
  """
  return nn.meta.unbox(tree)


def unbox_abstract(tree: Any) -> Any:
  """Drops the boxes without sharding constraints (safe outside jit, e.g. on eval_shape output)."""
  def strip(x):
    while isinstance(x, nn.meta.AxisMetadata):
      x = x.unbox(apply_constraint=False) if hasattr(x, 'get_partition_spec') else x.unbox()
    return x
  return jax.tree.map(strip, tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  """Unboxed `jax.ShapeDtypeStruct`s carrying `shardings` (a restore target for checkpoint.py)."""
  plain = unbox_abstract(abstract_state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      plain, shardings)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading axis over ('data', 'fsdp'), the rest replicated; use for every leaf of a batch."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_MESH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Every device holds the whole array (scalars, metrics, small tables)."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def make_global_batch(local_batch: Any, sharding: jax.sharding.NamedSharding) -> Any:
  """A global jax.Array per leaf from this process's rows (numpy), via
  `jax.make_array_from_process_local_data`.

  Each process passes its own `global_batch / process_count` rows; the global leading dimension
  is the sum over processes. Single-process, this is a sharded device_put.
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def local_batch_size(global_batch_size: int) -> int:
  """Rows each process feeds: the global batch divided by `jax.process_count()` (must divide)."""
  n = jax.process_count()
  if global_batch_size % n:
    raise ValueError(f'batch_size={global_batch_size} is not divisible by the {n} processes')
  return global_batch_size // n


def maybe_initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize` when the environment says this is a multi-process launch.

  Call it first, before any JAX computation or device query. Returns True when initialized here.

  Environment variables:
    FLAXFORMER_COORDINATOR=host:port, FLAXFORMER_NUM_PROCESSES=N, FLAXFORMER_PROCESS_ID=i
        an explicit launch (e.g. several processes on one CPU machine). CPU collectives use gloo.
    FLAXFORMER_NUM_CPU_DEVICES=k
        optional, any launch: k CPU devices per process (`jax_num_cpu_devices`).
    FLAXFORMER_HEARTBEAT_TIMEOUT_S=s (default 30), FLAXFORMER_INIT_TIMEOUT_S=s (jax: 300)
        optional: a lost peer stops the survivors after s seconds without its heartbeat, with
        one line naming it (PeerWatchdog, exit status errors.PEER_LOST); every process must
        have started within the init timeout.
    JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES / JAX_PROCESS_ID or a cluster that JAX
    auto-detects: SLURM, Open MPI, TPU pods), or FLAXFORMER_DISTRIBUTED=1
        `jax.distributed.initialize()` with JAX's own environment/cluster auto-detection.
  Without any of these (or with FLAXFORMER_NUM_PROCESSES=1) nothing is initialized.
  """
  env = os.environ
  if jax.distributed.is_initialized():
    return False
  if env.get(ENV_NUM_CPU_DEVICES):
    num_cpu = int(env[ENV_NUM_CPU_DEVICES])
    if jax.config.jax_num_cpu_devices != num_cpu:  # settable only before JAX starts its backends
      jax.config.update('jax_num_cpu_devices', num_cpu)
  if env.get(ENV_COORDINATOR):
    missing = [k for k in (ENV_NUM_PROCESSES, ENV_PROCESS_ID) if not env.get(k)]
    if missing:
      raise ValueError(f'{ENV_COORDINATOR} is set but {", ".join(missing)} is not')
    num = int(env[ENV_NUM_PROCESSES])
    if num <= 1:
      return False
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    pid = int(env[ENV_PROCESS_ID])
    logging.info('jax.distributed.initialize(%s, num_processes=%d, process_id=%d)',
                 env[ENV_COORDINATOR], num, pid)
    _initialize(coordinator_address=env[ENV_COORDINATOR], num_processes=num, process_id=pid,
                **_timeouts())
    start_peer_watchdog()
    return True
  if env.get('JAX_COORDINATOR_ADDRESS') or env.get(ENV_AUTO_DETECT) == '1':
    if env.get('JAX_NUM_PROCESSES') == '1':
      return False
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    num = env.get('JAX_NUM_PROCESSES')
    pid = env.get('JAX_PROCESS_ID')
    _initialize(num_processes=int(num) if num else None, process_id=int(pid) if pid else None,
                **_timeouts())
    start_peer_watchdog()
    return True
  return False
