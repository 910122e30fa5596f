"""The run directory: one module reads and writes it.

  <workdir>/config.json          the resolved config of the run
  <workdir>/tokenizer/           the tokenizer the run was trained with
  <workdir>/checkpoints/<step>/  orbax: state (step, params, opt_state), data, config, meta
  <workdir>/metrics.jsonl        metrics, one JSON object per logged step (metrics.py)

  run = rundir.RunDir(workdir)
  config = run.load_config()                 # ConfigDict; RunDirError (one line) if absent/corrupt
  params = run.restore_params(step=None)     # host numpy params, from the checkpoint's own
                                             # metadata: no optimizer, no mesh, no model built
  tokenizer = run.load_tokenizer()

Training, `generate`, `convert`, `init_from=<workdir>` and the distillation teacher all read runs
through this module. Paths go through `etils.epath`, so a run directory may live in a bucket
(`gs://...`, where orbax writes its own files too).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

from etils import epath
import jax
import ml_collections
import numpy as np

CONFIG_FILE = 'config.json'
TOKENIZER_DIR = 'tokenizer'
CHECKPOINT_DIR = 'checkpoints'
METRICS_FILE = 'metrics.jsonl'


class RunDirError(ValueError):
  """A run directory that is missing, incomplete or unreadable: the message says which file."""


class RunDir:
  """Paths and readers of one run directory."""

  def __init__(self, path: str | epath.Path):
    path = str(path)
    # Local paths are made absolute (orbax's metadata reader fails on relative ones).
    self.path = epath.Path(path if '://' in path else os.path.abspath(path))

  def __repr__(self) -> str:
    return f'RunDir({str(self.path)!r})'

  @property
  def config_path(self) -> epath.Path:
    return self.path / CONFIG_FILE

  @property
  def tokenizer_dir(self) -> epath.Path:
    return self.path / TOKENIZER_DIR

  @property
  def checkpoint_dir(self) -> epath.Path:
    return self.path / CHECKPOINT_DIR

  @property
  def metrics_path(self) -> epath.Path:
    return self.path / METRICS_FILE

  # --- config --------------------------------------------------------------------------------------

  def has_config(self) -> bool:
    return self.config_path.exists()

  def load_config(self) -> ml_collections.ConfigDict:
    if not self.config_path.exists():
      raise RunDirError(f'no {CONFIG_FILE} in {self.path}: is it a flaxformer_lab run directory?')
    try:
      return ml_collections.ConfigDict(json.loads(self.config_path.read_text()))
    except (ValueError, UnicodeDecodeError) as e:
      raise RunDirError(f'{self.config_path} is not valid JSON ({e}); restore it from '
                        'checkpoints/<step>/config or rerun the training command') from e

  def save_config(self, config: Any) -> None:
    """Writes config.json atomically (process 0 only)."""
    if jax.process_index() != 0:
      return
    self.path.mkdir(parents=True, exist_ok=True)
    text = config.to_json_best_effort(indent=2) if hasattr(config, 'to_json_best_effort') else (
        json.dumps(config, indent=2))
    tmp = self.path / (CONFIG_FILE + '.tmp')
    tmp.write_text(text)
    tmp.replace(self.config_path)  # overwrites (rename refuses an existing target)

  # --- tokenizer -----------------------------------------------------------------------------------

  def has_tokenizer(self) -> bool:
    return self.tokenizer_dir.exists() and any(self.tokenizer_dir.iterdir())

  def load_tokenizer(self):
    from flaxformer_lab.data import tokenizers  # pylint: disable=g-import-not-at-top
    if not self.has_tokenizer():
      raise RunDirError(f'no tokenizer in {self.tokenizer_dir}')
    try:
      return tokenizers.load_tokenizer(str(self.tokenizer_dir))
    except Exception as e:  # pylint: disable=broad-except
      raise RunDirError(f'the tokenizer in {self.tokenizer_dir} is corrupt or unreadable '
                        f'({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""})'
                        '; restore it from a backup or retrain in a new run directory') from e

  def save_tokenizer(self, tokenizer) -> None:
    if jax.process_index() == 0:
      tokenizer.save(str(self.tokenizer_dir))

  # --- checkpoints ---------------------------------------------------------------------------------

  def steps(self) -> list[int]:
    """Finalized checkpoint steps (orbax's interrupted tmp directories are not listed)."""
    if not self.checkpoint_dir.exists():
      return []
    out = []
    for child in self.checkpoint_dir.iterdir():
      if child.name.isdigit() and (child / 'state').exists():
        out.append(int(child.name))
    return sorted(out)

  def latest_step(self) -> Optional[int]:
    steps = self.steps()
    return steps[-1] if steps else None

  def _step_dir(self, step: Optional[int]) -> tuple[int, epath.Path]:
    steps = self.steps()
    if not steps:
      raise RunDirError(f'no checkpoint under {self.checkpoint_dir}')
    if step is None:
      step = steps[-1]
    if int(step) not in steps:
      raise RunDirError(f'no checkpoint for step {step} in {self.checkpoint_dir} '
                        f'(steps: {", ".join(map(str, steps))})')
    return int(step), self.checkpoint_dir / str(int(step))

  def restore_params(self, step: Optional[int] = None) -> dict[str, Any]:
    """The `params` of checkpoint `step` (default: the latest) as host numpy arrays.

    Read with the checkpoint's own metadata (shapes, dtypes) and orbax's partial restore: the
    optimizer state is not read, and no model, optimizer or mesh is built.
    """
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    step, directory = self._step_dir(step)
    path = directory / 'state'
    try:
      checkpointer = ocp.PyTreeCheckpointer()
      meta = checkpointer.metadata(path)
      tree = getattr(meta, 'item_metadata', meta)
      tree = getattr(tree, 'tree', tree)
      params_meta = tree['params']
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params_meta)
      out = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item={'params': params_meta}, restore_args={'params': restore_args},
          partial_restore=True))
    except Exception as e:  # pylint: disable=broad-except
      raise RunDirError(f'checkpoint {directory} could not be read ({type(e).__name__}: '
                        f'{str(e).splitlines()[0][:300] if str(e) else ""}); pass --step with '
                        f'another of {self.steps()}') from e
    return jax.tree.map(np.asarray, out['params'])

  def checkpoint_config(self, step: Optional[int] = None) -> dict[str, Any]:
    """The config stored with checkpoint `step` (a dict)."""
    step, directory = self._step_dir(step)
    path = directory / 'config' / 'metadata'
    if not path.exists():
      candidates = list((directory / 'config').glob('*')) if (directory / 'config').exists() else []
      files = [c for c in candidates if c.is_file()]
      if not files:
        raise RunDirError(f'checkpoint {directory} holds no config')
      path = files[0]
    return json.loads(path.read_text())


def source_tokenizer(source: str):
  """The tokenizer of a model source: a lab run directory or `hf:<dir>` (a Hugging Face
  checkpoint); None when it has none."""
  if source.startswith('hf:'):
    from flaxformer_lab.interop import hf_tokenizer  # pylint: disable=g-import-not-at-top
    from flaxformer_lab.interop import huggingface  # pylint: disable=g-import-not-at-top
    return hf_tokenizer.load_hf_tokenizer(source[3:], huggingface.read_hf_config(source[3:]))
  run = RunDir(source)
  return run.load_tokenizer() if run.has_tokenizer() else None


def fingerprint(params: Any) -> str:
  """A short content hash of a parameter tree: paths, shapes, dtypes and values."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  flat = traverse_util.flatten_dict(jax.device_get(params), sep='/')
  for key in sorted(flat):
    value = np.ascontiguousarray(np.asarray(flat[key]))
    h.update(key.encode())
    h.update(str(value.shape).encode())
    h.update(str(value.dtype).encode())
    h.update(value.tobytes())
  return h.hexdigest()[:16]
