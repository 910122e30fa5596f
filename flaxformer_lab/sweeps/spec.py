"""A sweep file and its runs: grid helpers, loading, validation, run names and run commands.

A sweep is a Python file (big_vision style), usually `experiments/<name>/config.py`:

  def get_config(arg=None):   # the base training config (a ConfigDict), as any config file
  def get_sweep(arg=None):    # a list of {dotted config key: value} override dicts, one per run
  def get_plots(arg=None):    # optional: {'x': key, 'color': key, 'style': key, 'panels': [keys]}

built with the helpers below:

  from flaxformer_lab.sweeps import axis, product, zipped
  product(axis('model.norm_position', ['pre', 'post']), {'seed': [0, 1]})   # 4 runs
  zipped({'optim.learning_rate': [1e-3, 3e-3], 'optim.warmup_steps': [0, 100]})  # 2 runs

This module imports no JAX, so sweep files stay cheap to load.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import importlib.util
import itertools
import json
import os
import re
import sys
from typing import Any, Iterable, Mapping, Sequence

Overrides = dict[str, Any]
RESERVED = ('sweep.',)  # keys the sweep sets itself


class SweepError(ValueError):
  """A sweep that cannot run; the message is one line saying what to change."""


# --- grid helpers ----------------------------------------------------------------------------------
def axis(key: str, values: Iterable[Any]) -> list[Overrides]:
  """One swept key: [{key: v} for v in values]."""
  return [{key: v} for v in values]


def _as_list(part) -> list[Overrides]:
  """A list of override dicts, or a dict of lists (expanded as their product)."""
  if isinstance(part, Mapping):
    return product(*[axis(k, v) for k, v in part.items()])
  out = list(part)
  if not all(isinstance(d, Mapping) for d in out):
    raise SweepError('a sweep part must be a list of dicts or a dict of lists')
  return [dict(d) for d in out]


def _merge(dicts: Sequence[Mapping[str, Any]]) -> Overrides:
  out: Overrides = {}
  for d in dicts:
    for k, v in d.items():
      if k in out and out[k] != v:
        raise SweepError(f'key {k!r} is set twice in one run ({out[k]!r} and {v!r})')
      out[k] = v
  return out


def product(*parts) -> list[Overrides]:
  """The Cartesian product of parts (each a list of dicts or a dict of lists), merged per run; the
  first part varies slowest."""
  lists = [_as_list(p) for p in parts]
  return [_merge(combo) for combo in itertools.product(*lists)]


def zipped(*parts) -> list[Overrides]:
  """Element-wise merge of equally long parts; a dict of lists zips its own keys."""
  lists = []
  for p in parts:
    if isinstance(p, Mapping):
      lengths = {len(list(v)) for v in p.values()}
      if len(lengths) > 1:
        raise SweepError(f'zipped keys have different lengths: {sorted(lengths)}')
      lists.append([dict(zip(p, vals)) for vals in zip(*p.values())])
    else:
      lists.append(_as_list(p))
  lengths = {len(l) for l in lists}
  if len(lengths) > 1:
    raise SweepError(f'zipped parts have different lengths: {sorted(lengths)}')
  return [_merge(combo) for combo in zip(*lists)]


# --- names and values --------------------------------------------------------------------------------
def format_value(v: Any) -> str:
  """A value as it appears in run names (3e-3 -> 0.003, (2, 2) -> 2x2)."""
  if isinstance(v, bool):
    return str(v)
  if isinstance(v, float):
    return f'{v:g}'
  if isinstance(v, (tuple, list)):
    return 'x'.join(format_value(x) for x in v)
  return str(v)


def short_keys(keys: Iterable[str]) -> dict[str, str]:
  """Each dotted key's last component, or the whole key where two keys share it."""
  keys = list(dict.fromkeys(keys))
  leaf = {k: k.rsplit('.', 1)[-1] for k in keys}
  counts = {}
  for v in leaf.values():
    counts[v] = counts.get(v, 0) + 1
  return {k: leaf[k] if counts[leaf[k]] == 1 else k for k in keys}


def run_name(overrides: Mapping[str, Any]) -> str:
  """A readable, deterministic directory name from a run's overrides, in their order:
  {'model.norm_position': 'post', 'seed': 1} -> 'norm_position=post,seed=1'."""
  if not overrides:
    return 'base'
  short = short_keys(overrides)
  name = ','.join(f'{short[k]}={format_value(v)}' for k, v in overrides.items())
  name = re.sub(r'[^A-Za-z0-9._=,+-]', '_', name)
  if len(name) > 160:
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()
    name = f'{name[:140]}-{digest[:10]}'
  return name


def flag_value(v: Any) -> str:
  """A value as `--config.<key>=<text>` expects it (ml_collections parses by the field's type)."""
  if isinstance(v, bool):
    return 'True' if v else 'False'
  if isinstance(v, float):
    return repr(v)
  if isinstance(v, (tuple, list)):
    return '(' + ','.join(flag_value(x) for x in v) + (',)' if len(v) == 1 else ')')
  return str(v)


# --- the sweep ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Run:
  name: str  # directory name under the sweep workdir
  overrides: Overrides  # {dotted key: value}, in declaration order
  workdir: str  # <sweep workdir>/<name>
  index: int  # position in get_sweep's list


@dataclasses.dataclass
class Sweep:
  file: str  # absolute path of the sweep file
  arg: str  # text after the colon ('' = none)
  name: str  # '<experiment>' or '<experiment>:<arg>' (recorded as config.sweep.name)
  workdir: str
  base_config: Any  # ml_collections.ConfigDict
  runs: list[Run]
  plots: dict[str, Any]

  @property
  def config_flag(self) -> str:
    return self.file + (f':{self.arg}' if self.arg else '')

  @property
  def swept_keys(self) -> list[str]:
    """Keys whose value differs between runs, in first-seen order."""
    keys = list(dict.fromkeys(k for r in self.runs for k in r.overrides))
    return [k for k in keys
            if len({json.dumps(r.overrides.get(k), default=str) for r in self.runs}) > 1]

  def run_args(self, run: Run, config_flag: str | None = None,
               workdir: str | None = None) -> list[str]:
    """The arguments of `python -m flaxformer_lab.main` for `run`."""
    args = [f'--config={config_flag or self.config_flag}', f'--workdir={workdir or run.workdir}']
    args += [f'--config.{k}={flag_value(v)}' for k, v in run.overrides.items()]
    args += [f'--config.sweep.name={self.name}', f'--config.sweep.run={run.name}',
             '--config.sweep.coordinates=' + json.dumps(run.overrides, default=str)]
    return args

  def run_argv(self, run: Run, python: str | None = None) -> list[str]:
    return [python or sys.executable, '-m', 'flaxformer_lab.main', *self.run_args(run)]


def sweep_name(file: str, arg: str) -> str:
  stem = os.path.splitext(os.path.basename(file))[0]
  base = os.path.basename(os.path.dirname(os.path.abspath(file))) if stem == 'config' else stem
  return base + (f':{arg}' if arg else '')


def load_module(file: str):
  if not os.path.isfile(file):
    raise SweepError(f'sweep file {file} does not exist')
  spec = importlib.util.spec_from_file_location(f'_lab_sweep_{abs(hash(file))}', file)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise SweepError(f'could not load {file}: {type(e).__name__}: {e}') from e
  for fn in ('get_config', 'get_sweep'):
    if not callable(getattr(module, fn, None)):
      raise SweepError(f'{file} defines no {fn}(arg): a sweep file needs get_config and get_sweep')
  return module


def _call(fn, arg: str):
  try:
    return fn(arg) if arg else fn()
  except SweepError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise SweepError(f'{fn.__name__}({arg!r}): {type(e).__name__}: {e}') from e


def _valid_keys(config, prefix=''):
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if hasattr(value, 'items'):
      out.extend(_valid_keys(value, prefix + key + '.'))
  return out


def check_override(config, key: str, value: Any, where: str) -> None:
  """Sets `key` on (a copy of) the config: an unknown key or a mistyped value is a SweepError."""
  if any(key.startswith(r) for r in RESERVED):
    raise SweepError(f'{where}: {key!r} is set by the sweep itself')
  node, parts = config, key.split('.')
  for i, part in enumerate(parts):
    is_last = i == len(parts) - 1
    if not hasattr(node, 'keys') or part not in node.keys():
      close = difflib.get_close_matches(key, _valid_keys(config), n=3, cutoff=0.6)
      hint = f'; closest valid keys: {", ".join(close)}' if close else ''
      raise SweepError(f'{where}: override {key!r} names no config key{hint}')
    if is_last:
      try:
        node[part] = value
      except (TypeError, ValueError, AttributeError) as e:
        msg = ' '.join(str(e).split())
        raise SweepError(f'{where}: override {key}={value!r}: {msg}') from None
    else:
      node = node[part]


def load(spec: str, workdir: str) -> Sweep:
  """Loads `<file>[:<arg>]`, validates every run's overrides, and names the runs."""
  file, _, arg = spec.partition(':')
  file = os.path.abspath(file)
  module = load_module(file)
  base = _call(module.get_config, arg)
  if not hasattr(base, 'items'):
    raise SweepError(f'{file}: get_config must return a ConfigDict, got {type(base).__name__}')
  overrides_list = _call(module.get_sweep, arg)
  if not isinstance(overrides_list, (list, tuple)) or not all(
      isinstance(o, Mapping) for o in overrides_list):
    raise SweepError(f'{file}: get_sweep must return a list of dicts')
  if not overrides_list:
    raise SweepError(f'{file}: get_sweep({arg!r}) returned no runs')
  runs, seen = [], {}
  for i, overrides in enumerate(overrides_list):
    overrides = dict(overrides)
    name = run_name(overrides)
    where = f'run {i} ({name})'
    scratch = copy.deepcopy(base)
    for k, v in overrides.items():
      check_override(scratch, k, v, where)
    if name in seen:
      raise SweepError(f'runs {seen[name]} and {i} have the same overrides ({name})')
    seen[name] = i
    runs.append(Run(name, overrides, os.path.join(str(workdir), name), i))
  plots = _call(module.get_plots, arg) if callable(getattr(module, 'get_plots', None)) else {}
  return Sweep(file, arg, sweep_name(file, arg), str(workdir), base, runs, dict(plots or {}))
