"""Orbax checkpoints of the train state, the data-iterator state and the config; SIGTERM handling.

Use in the train loop (every process runs the same calls; saves and restores are collective):

  ckpt = checkpoint.Checkpointer.from_config(workdir, config)   # <workdir>/checkpoints
  start = ckpt.latest_step()                                     # None: fresh start
  if start is not None:
    state, data_state = ckpt.restore(start, sharding.abstract_with_shardings(boxed, state_sh))
  guard = checkpoint.PreemptionGuard()                           # SIGTERM -> stop flag
  for step in range(start or 0, num_steps):
    state, metrics = train_step(state, batch)
    ckpt.maybe_save(step + 1, state, data_iter.get_state)       # every `checkpoint_every` steps
    if guard.should_stop(step + 1):                              # all processes agree
      ckpt.save(step + 1, state, data_iter.get_state)            # forced (no-op if just saved)
      break
  ckpt.save(final_step, state, data_iter.get_state)             # no-op if already saved
  ckpt.close()                                                   # waits for async saves

Layout: `<dir>/<step>/{state,data,config,meta}` (orbax). `state` is the unboxed train state (every leaf a
jax.Array), `data` holds every process's data-iterator state, `config` the resolved config as JSON
(it records e.g. `model.scan_layers`; a restore whose tree does not match names the leaves and the
config fields that differ).

Incomplete checkpoints: orbax writes a step to `<step>.orbax-checkpoint-tmp-*` and renames it when
the save is complete, so `latest_step()` never returns an interrupted save (those tmp dirs are
ignored, and removed when the next Checkpointer opens the directory). A finalized step directory
that later loses files is still listed by `latest_step()`; `restore()` then raises
`CheckpointError` naming that directory (no silent fallback to an older step).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import threading
from typing import Any, Callable, Sequence

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored (missing, corrupt, incomplete, or the wrong tree)."""


def _path_str(path) -> str:
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def _flat(tree: Any) -> dict[str, Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_str(p): x for p, x in leaves}


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def _check_saveable(state: Any) -> None:
  """Every leaf must be a jax.Array, not boxed, not a numpy or Python scalar (see DESIGN.md)."""
  if any(_is_box(x) for x in jax.tree.leaves(state, is_leaf=_is_box)):
    raise TypeError('the state to save holds nn.LogicallyPartitioned boxes; save '
                    'nn.meta.unbox(state) (a boxed state restores into a different tree)')
  for path, x in _flat(state).items():
    if not isinstance(x, jax.Array):
      raise TypeError(
          f'state leaf {path!r} has type {type(x).__name__}, not jax.Array: numpy/Python scalars '
          'fail on restore and host-local values fail in multi-process runs; create the state '
          'inside jax.jit (out_shardings=...) or convert it with jnp.asarray')


def _config_json(config: Any) -> Any:
  if config is None:
    return None
  if hasattr(config, 'to_json_best_effort'):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def _dict_diff(old: Any, new: Any, prefix: str = '') -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      out += _dict_diff(old.get(k, '<absent>'), new.get(k, '<absent>'), f'{prefix}{k}.')
    return out
  return [] if old == new else [f'{prefix[:-1]}: {old!r} (checkpoint) vs {new!r} (now)']


def _allgather_json(value: Any) -> list[Any]:
  """Each process's JSON-serializable `value`, in process order (collective when multi-process)."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([data.size], np.int32))
  padded = np.zeros((int(np.max(lengths)),), np.uint8)
  padded[:data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(gathered, lengths.reshape(-1))]


def _encode_data_state(data_state: Any) -> Any:
  if isinstance(data_state, bytes):  # grain DataLoader iterators return JSON bytes
    return {'__bytes__': data_state.decode('utf-8')}
  return data_state


def _decode_data_state(value: Any) -> Any:
  if isinstance(value, dict) and set(value) == {'__bytes__'}:
    return value['__bytes__'].encode('utf-8')
  return value


class Checkpointer:
  """Keeps the last `keep` checkpoints of `<workdir>/checkpoints`, saved every `every` steps."""

  def __init__(self, workdir: str, *, every: int, keep: int = 3, async_save: bool = True,
               config: Any = None, meta: Any = None):
    """Opens (creates) `<workdir>/checkpoints`.

    Args:
      workdir: the run directory.
      every: `maybe_save` saves when `step % every == 0` (0 = only forced saves).
      keep: number of most recent checkpoints kept.
      async_save: write in a background thread (`wait_until_finished`/`close` wait for it).
      config: the resolved config (ConfigDict or dict), stored as JSON with every checkpoint.
      meta: a JSON dict stored with every checkpoint (e.g. the frozen teacher's source and
        fingerprint); read back with `stored_meta`.
    """
    if int(keep) < 1:
      raise ValueError(f'keep_checkpoints={keep} must be >= 1 (0 would keep no checkpoint and '
                       'delete the existing ones)')
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._config = _config_json(config)
    self._meta = dict(meta or {})
    self._every = int(every)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(int(keep)),
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(max(self._every, 1)),
        enable_async_checkpointing=bool(async_save),
        cleanup_tmp_directories=True,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler(),
                       'config': ocp.JsonCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})
    self._last_saved = None

  @classmethod
  def from_config(cls, workdir: str, config: Any, meta: Any = None) -> 'Checkpointer':
    """Uses config.checkpoint_every, keep_checkpoints, async_checkpoints; stores `config`."""
    return cls(workdir, every=config.checkpoint_every, keep=config.keep_checkpoints,
               async_save=config.async_checkpoints, config=config, meta=meta)

  # --- saving --------------------------------------------------------------------------------

  def maybe_save(self, step: int, state: Any, data_state: Any | Callable[[], Any] = None,
                 force: bool = False) -> bool:
    """Saves when `step` is a multiple of `every` (or `force`); returns whether it saved.

    `state` must be the unboxed train state with jax.Array leaves; `data_state` any JSON value
    (dict, or bytes from a grain DataLoader iterator) describing this process's data position, or
    a zero-argument callable returning it (e.g. `data_iter.get_state`), called only when saving.
    A step that is already saved is skipped (returns False), so a final forced save after a
    periodic one is harmless. Call it on every process.
    """
    step = int(step)
    # Decided here from the step alone (FixedIntervalPolicy's rule), never from per-process state
    # such as "a save is in progress", so that every process takes the same branch.
    if not force and (self._every <= 0 or step % self._every):
      return False
    if step == self._last_saved or step in self._manager.all_steps():
      return False
    _check_saveable(state)
    self._check_space(step, state)
    if callable(data_state):
      data_state = data_state()
    per_process = _allgather_json(_encode_data_state(data_state))
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({'num_processes': len(per_process), 'per_process': per_process}),
        config=ocp.args.JsonSave(self._config),
        meta=ocp.args.JsonSave(self._meta))
    saved = self._manager.save(step, args=args, force=True)
    if saved:
      self._last_saved = step
      logging.info('checkpoint: saving step %d to %s', step, self.directory)
    return saved

  def _check_space(self, step: int, state: Any) -> None:
    """Refuses a save that cannot fit on the disk before anything is written (an OSError
    ENOSPC naming the directory: one line at the entry point, no partial checkpoint, none of
    the writer's background-thread tracebacks). Local directories only; a disk that fills
    during the save still fails in the writer."""
    need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) + (1 << 20)
    path = self.directory
    while not os.path.exists(path) and os.path.dirname(path) != path:
      path = os.path.dirname(path)
    try:
      free = shutil.disk_usage(path).free
    except (OSError, ValueError):
      return
    if free < need * 1.1:
      raise OSError(errno.ENOSPC, f'No space left on device: checkpoint step {step} needs about '
                    f'{need / 1e6:.1f} MB, {free / 1e6:.1f} MB are free', self.directory)

  def save(self, step: int, state: Any, data_state: Any | Callable[[], Any] = None) -> bool:
    """A forced save (end of training, preemption); False when `step` is already saved."""
    return self.maybe_save(step, state, data_state, force=True)

  def wait_until_finished(self) -> None:
    """Blocks until the background save (if any) is written and committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # --- reading -------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest finalized step (orbax's interrupted `*.orbax-checkpoint-tmp-*` dirs are never
    listed), or None when there is no checkpoint."""
    return self._manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def stored_config(self, step: int) -> Any:
    """The config JSON saved with `step` (a dict), or None if none was given."""
    self.wait_until_finished()
    try:
      out = self._manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise self._corrupt(step, e) from e
    return out['config']

  def stored_meta(self, step: int) -> Any:
    """The meta JSON saved with `step`, or None for a checkpoint written without one."""
    self.wait_until_finished()
    if not os.path.isdir(os.path.join(self.step_dir(step), 'meta')):
      return None
    try:
      out = self._manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise self._corrupt(step, e) from e
    return out['meta']

  def _corrupt(self, step: int, err: Exception) -> CheckpointError:
    others = [s for s in self.all_steps() if s != int(step)]
    return CheckpointError(
        f'checkpoint {self.step_dir(step)} is corrupt or incomplete '
        f'({type(err).__name__}: {str(err)[:500]}). Delete that directory to resume from an '
        f'earlier checkpoint (other steps in {self.directory}: {others or "none"}).')

  def _stored_tree(self, step: int) -> dict[str, Any]:
    path = self.step_dir(step)
    if not os.path.isdir(os.path.join(path, 'state')):
      raise CheckpointError(f'checkpoint {path} is incomplete: it has no state/ directory')
    try:
      meta = self._manager.item_metadata(int(step))
      tree = meta['state'] if meta is not None else None
      tree = getattr(tree, 'tree', tree)
    except Exception as e:  # pylint: disable=broad-except
      raise self._corrupt(step, e) from e
    if tree is None:
      raise self._corrupt(step, FileNotFoundError('no readable state metadata'))
    return _flat(tree)

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Raises CheckpointError naming every leaf whose path, shape or dtype differs from `step`."""
    stored = self._stored_tree(step)
    target = _flat(abstract_state)
    missing = sorted(set(target) - set(stored))
    unexpected = sorted(set(stored) - set(target))
    problems = []
    if missing:
      problems.append(f'{len(missing)} leaves of the target are not in the checkpoint: '
                      + ', '.join(missing[:8]) + (' ...' if len(missing) > 8 else ''))
    if unexpected:
      problems.append(f'{len(unexpected)} checkpoint leaves are not in the target: '
                      + ', '.join(unexpected[:8]) + (' ...' if len(unexpected) > 8 else ''))
    for key in sorted(set(stored) & set(target)):
      s, t = stored[key], target[key]
      s_shape, t_shape = tuple(s.shape), tuple(np.shape(t))
      s_dtype, t_dtype = np.dtype(s.dtype), np.dtype(t.dtype)
      if s_shape != t_shape or s_dtype != t_dtype:
        problems.append(f'leaf {key}: checkpoint {s_dtype}{list(s_shape)} vs target '
                        f'{t_dtype}{list(t_shape)}')
    if not problems:
      return
    hint = ''
    if self._config is not None:
      try:
        old = self.stored_config(step)
      except CheckpointError:
        old = None
      if isinstance(old, dict) and isinstance(self._config, dict):
        diff = _dict_diff(old.get('model', {}), self._config.get('model', {}), 'model.')
        if diff:
          hint = (' (the model config differs: ' + '; '.join(diff[:10]) + '; resume with the '
                  "checkpoint's model config, or use a new workdir)")
    raise CheckpointError(f'checkpoint {self.step_dir(step)} does not match the train state{hint}:'
                          '\n  ' + '\n  '.join(problems[:20]))

  def restore(self, step: int | None, abstract_state: Any,
              with_data: bool = True) -> tuple[Any, Any]:
    """Restores `step` (None = latest) into the structure, shapes and shardings of `abstract_state`.

    Args:
      step: the step to restore, or None for `latest_step()`.
      abstract_state: the unboxed target: `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` leaves
        (see `sharding.abstract_with_shardings`) or live arrays (their shardings are used).
      with_data: also restore this process's data-iterator state (False: e.g. evaluation or
        export with another number of processes; data_state is then None).

    Returns:
      (state, data_state): the state as global jax.Arrays placed by the target shardings, and this
      process's data-iterator state as saved (None if none was saved).

    Raises:
      CheckpointError: no checkpoint, a mismatched tree (naming the leaves), or a corrupt or
        incomplete step directory (naming it).
    """
    self.wait_until_finished()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f'no checkpoint in {self.directory}')
    step = int(step)
    if step not in self._manager.all_steps():
      raise CheckpointError(f'no checkpoint for step {step} in {self.directory} '
                            f'(steps: {self.all_steps() or "none"})')
    if any(_is_box(x) for x in jax.tree.leaves(abstract_state, is_leaf=_is_box)):
      raise TypeError('restore target holds nn.LogicallyPartitioned boxes; pass the unboxed '
                      'abstract state (sharding.abstract_with_shardings)')
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
        abstract_state)
    self.check_compatible(step, target)
    items = {'state': ocp.args.StandardRestore(target)}
    if with_data:
      items['data'] = ocp.args.JsonRestore()
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      raise self._corrupt(step, e) from e
    data = self._this_process_data(out['data'], step) if with_data else None
    return out['state'], data

  def _this_process_data(self, data: Any, step: int) -> Any:
    if data is None:
      return None
    per_process = data['per_process']
    n, pid = jax.process_count(), jax.process_index()
    if len(per_process) == n:
      return _decode_data_state(per_process[pid])
    if all(p == per_process[0] for p in per_process):  # identical: safe to share
      return _decode_data_state(per_process[0])
    raise CheckpointError(
        f'checkpoint {self.step_dir(step)} holds data-iterator states of {len(per_process)} '
        f'processes but this run has {n}; restart with {len(per_process)} processes')


class PreemptionGuard:
  """Turns SIGTERM (by default) into a stop flag that the train loop polls once per step.

    guard = PreemptionGuard()          # installs the handler (main thread only)
    ...
    if guard.should_stop(step):        # every process, at the same steps
      ckpt.save(step, state, data_state); break

  Multi-process, `should_stop` all-reduces the flag (`process_allgather`), so every process
  stops at the same step even when only one received the signal; it is therefore collective and
  must be called by all processes at the same steps. `sync_every` > 1 limits that host sync to
  steps divisible by it. Single-process, it only reads the flag.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM,), sync_every: int = 1,
               install: bool = True):
    """`install=False`: the handlers are installed later by `install()` (until then the signals
    keep their current action; the train loop waits for the first compiled step)."""
    self.sync_every = max(int(sync_every), 1)
    self._flag = threading.Event()
    self._signals = tuple(signals)
    self._previous = {}
    self.signal_received = None
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError('PreemptionGuard must be created in the main thread (signal handlers)')
    if install:
      self.install()

  def install(self) -> None:
    """Installs the stop-flag handlers (idempotent)."""
    for sig in self._signals:
      if sig not in self._previous:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signal_received = signum
    self._flag.set()

  @property
  def requested(self) -> bool:
    """Whether this process received a stop signal (no synchronization)."""
    return self._flag.is_set()

  def request(self) -> None:
    """Sets the flag by hand (as if a signal arrived)."""
    self._flag.set()

  def should_stop(self, step: int) -> bool:
    """True when any process received a stop signal (checked at steps divisible by sync_every)."""
    if jax.process_count() == 1:
      return self._flag.is_set()
    if int(step) % self.sync_every:
      return False
    flags = multihost_utils.process_allgather(np.array([int(self._flag.is_set())], np.int32))
    return bool(np.any(flags))

  def uninstall(self) -> None:
    """Restores the previous signal handlers."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def __enter__(self) -> 'PreemptionGuard':
    return self

  def __exit__(self, *exc) -> None:
    self.uninstall()
