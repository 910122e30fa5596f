r"""Fault injection: what survives what.

  python -m flaxformer_lab.faults            # quick form (CI-sized): bad inputs, a poisoned update,
                                             # corrupt checkpoints, 2 SIGKILLs, 1 SIGTERM, a lost
                                             # process 0 of a two-process run, full disk
  python -m flaxformer_lab.faults --full     # 20 SIGKILLs, 5 SIGTERMs, lost process 0 and 1
  python -m flaxformer_lab.faults --only=bad_inputs,kills --json=/tmp/faults.json

Every trial is a real `python -m flaxformer_lab.<entry>` process on a tiny decoder run, except the
bad-input table, whose cases run grouped by entry point: one process per entry point calls its
`main` in-process for every case (errors.call, the same code path as the command line minus the
process exit), so sixty cases cost a few processes. What each trial asserts:
- bad input: exit status 2, stderr is exactly one `error: ...` line holding the expected words,
  and the run directory's files (paths and bytes, the lock file aside) are unchanged;
- SIGKILL at a random moment (start-up, compilation, a step, an asynchronous checkpoint write),
  then the same command again: the final checkpoint's parameters, optimizer state, step and data
  position are bit-identical to an uninterrupted run's, and metrics.jsonl logs every step once;
- SIGTERM at a random moment: exit 0 after a save (or at once during start-up), same resume check;
- a poisoned update (the optimizer turns the parameters NaN while loss and gradient stay finite):
  exit 3, one line naming the last good step, no checkpoint with a non-finite value;
- corrupt or truncated checkpoint files: exit 2, one line naming the checkpoint;
- a process of a two-process run killed once it has saved a checkpoint: the survivor exits with
  status 4 within the heartbeat timeout, one line naming the lost process; both rerun resume
  bit-identical to an uninterrupted two-process run (quick: process 0, --full: 0 and 1);
  with --full also a two-process run whose compile outlasts the heartbeat timeout: no false loss;
- a full disk (a 3 MB tmpfs with synchronous and with asynchronous checkpoints, and an 8 MB one
  that another process fills mid-write; needs root, else skipped with the reason): one line,
  exit 2, and the checkpoints saved before it still restore.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK_FILE = '.run.lock'

# A tiny decoder run (no dropout, so every resume computes the same function).
TINY = ['--config=configs/gpt2.py:tiny', '--config.batch_size=8', '--config.data.seq_len=32',
        '--config.log_every=1', '--config.eval_every=0', '--config.data.eval_batches=1',
        '--config.model.dropout_rate=0.0', '--config.model.attention_dropout_rate=0.0',
        '--config.progress=off', '--config.optim.warmup_steps=0',
        '--config.evals.samples.every=-1']


def env_for(tfds_dir: str, extra: Optional[dict[str, str]] = None) -> dict[str, str]:
  env = dict(os.environ)
  env.update({'JAX_PLATFORMS': 'cpu', 'FLAXFORMER_TFDS_DIR': tfds_dir, 'HF_HUB_OFFLINE': '1',
              'PYTHONPATH': REPO_ROOT + os.pathsep + env.get('PYTHONPATH', '')})
  env.pop('XLA_FLAGS', None)
  env.update(extra or {})
  return env


def tiny_args(num_steps: int, **overrides: Any) -> list[str]:
  return TINY + [f'--config.num_steps={num_steps}'] + [
      f'--config.{k}={v}' for k, v in overrides.items()]


def run_entry(entry: str, args: Sequence[str], tfds_dir: str, timeout: float = 300,
              **popen) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', f'flaxformer_lab.{entry}', *args],
                        env=env_for(tfds_dir), cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=timeout, **popen)


def train(workdir: str, args: Sequence[str], tfds_dir: str) -> subprocess.CompletedProcess:
  r = run_entry('main', [f'--workdir={workdir}', *args], tfds_dir)
  if r.returncode != 0:
    raise RuntimeError(f'training {workdir} failed ({r.returncode}): {r.stderr[-2000:]}')
  return r


# --- what a run directory holds -------------------------------------------------------------------
def snapshot(path: str) -> dict[str, str]:
  """{relative path: sha256} of every file under `path` (the run lock's holder record aside)."""
  out = {}
  if not os.path.exists(path):
    return out
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      rel = os.path.relpath(full, path)
      if rel == LOCK_FILE:
        continue
      with open(full, 'rb') as f:
        out[rel] = hashlib.sha256(f.read()).hexdigest()
  return out


def steps_of(workdir: str) -> list[int]:
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return []
  return sorted(int(s) for s in os.listdir(d)
                if s.isdigit() and os.path.exists(os.path.join(d, s, 'commit_success.txt')))


def checkpoint_contents(workdir: str, step: Optional[int] = None) -> dict[str, Any]:
  """Everything a checkpoint restores: every state leaf (step, params, optimizer state) as numpy,
  and the data-iterator state. Read from the checkpoint's own metadata (no model built)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flaxformer_lab import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  step = steps_of(workdir)[-1] if step is None else step
  path = os.path.join(os.path.abspath(workdir), 'checkpoints', str(step))
  checkpointer = ocp.PyTreeCheckpointer()
  meta = checkpointer.metadata(os.path.join(path, 'state'))
  tree = getattr(meta, 'item_metadata', meta)
  tree = getattr(tree, 'tree', tree)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = checkpointer.restore(os.path.join(path, 'state'),
                               args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args))
  with open(os.path.join(path, 'data', 'metadata')) as f:
    data = json.load(f)
  flat = ckpt_lib._flat(state)  # pylint: disable=protected-access
  return {'step': step, 'leaves': {k: np.asarray(v) for k, v in flat.items()}, 'data': data}


def identical(a: dict[str, Any], b: dict[str, Any]) -> Optional[str]:
  """None when two checkpoint contents are bit-identical, else what differs."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if a['step'] != b['step']:
    return f'step {a["step"]} vs {b["step"]}'
  if set(a['leaves']) != set(b['leaves']):
    return f'leaves differ: {sorted(set(a["leaves"]) ^ set(b["leaves"]))[:4]}'
  for k, x in a['leaves'].items():
    y = b['leaves'][k]
    if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
      return f'leaf {k} differs (max |diff| {float(np.max(np.abs(x - y))):.3g})'
  if a['data'] != b['data']:
    return 'data-iterator state differs'
  return None


def logged_steps(workdir: str) -> list[int]:
  out = []
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        rec = json.loads(line)
        if 'train/loss' in rec:
          out.append(rec['step'])
  return out


def terminal_lines(text: str) -> list[str]:
  """The non-blank lines a terminal shows once `text` is written to it: carriage returns,
  newlines and cursor-up (ESC [ A, used by nested progress bars to redraw and clear themselves)
  are applied; other escape sequences are dropped."""
  import re  # pylint: disable=g-import-not-at-top
  screen, row, col = [[]], 0, 0
  for token in re.findall(r'\x1b\[[0-9;]*[A-Za-z]|[\r\n]|[^\x1b\r\n]+|\x1b', text):
    if token == '\n':
      row, col = row + 1, 0
      while len(screen) <= row:
        screen.append([])
    elif token == '\r':
      col = 0
    elif token.startswith('\x1b'):
      if token.endswith('A'):
        row = max(row - int(token[2:-1] or 1), 0)
    else:
      line = screen[row]
      line.extend(' ' * max(col - len(line), 0))
      line[col:col + len(token)] = list(token)
      col += len(token)
  return [''.join(l).rstrip() for l in screen if ''.join(l).strip()]


def one_error_line(stderr: str) -> Optional[str]:
  """The `error:` line when it is all that stays on the terminal (progress bars that redraw and
  clear themselves, e.g. the first preparation of a data set, leave nothing behind)."""
  lines = terminal_lines(stderr)
  if len(lines) == 1 and lines[0].startswith('error: '):
    return lines[0]
  return None


# --- the bad-input table --------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
  """One bad input: `entry` run with `args` (placeholders {run}, {tmp}, {fresh}) must exit with
  `code` and one `error:` line containing every string of `expect`; `prepare(tmp)` may build
  files first; `watch` is the directory whose files must be unchanged ({run} or {fresh})."""
  name: str
  entry: str
  args: list[str]
  expect: tuple[str, ...]
  code: int = 2
  prepare: Optional[str] = None
  watch: str = '{fresh}'


def _cfg(*args) -> list[str]:
  return ['--workdir={fresh}', '--config=configs/gpt2.py:tiny', *args]


def _c(name, *overrides, expect, **kw):
  return Case(name, 'main', _cfg(*[f'--config.{o}' for o in overrides]), tuple(expect), **kw)


BAD_INPUTS: list[Case] = [
    # config fields
    _c('keep_checkpoints=0', 'keep_checkpoints=0', expect=['keep_checkpoints']),
    _c('keep_checkpoints<0', 'keep_checkpoints=-2', expect=['keep_checkpoints']),
    _c('keep_checkpoints=0 on an existing run', 'keep_checkpoints=0',
       expect=['keep_checkpoints'], watch='{run}'),
    _c('checkpoint_every<0', 'checkpoint_every=-5', expect=['checkpoint_every']),
    _c('num_steps=0', 'num_steps=0', expect=['num_steps']),
    _c('num_steps<0', 'num_steps=-1', expect=['num_steps']),
    _c('batch_size=0', 'batch_size=0', expect=['batch_size']),
    _c('log_every=0', 'log_every=0', expect=['log_every']),
    _c('stop_at_step<0', 'stop_at_step=-1', expect=['stop_at_step']),
    _c('unknown optimizer', 'optim.name=sgd', expect=['optim.name', 'sgd']),
    _c('unknown schedule', 'optim.schedule=exp', expect=['optim.schedule', 'exp']),
    _c('negative warmup', 'optim.warmup_steps=-10', expect=['optim.warmup_steps']),
    _c('grad_accum_steps=0', 'optim.grad_accum_steps=0', expect=['optim.grad_accum_steps']),
    _c('negative learning rate', 'optim.learning_rate=-0.001', expect=['optim.learning_rate']),
    _c('optim.eps=0', 'optim.eps=0.0', expect=['optim.eps']),
    _c('optim.b1=1', 'optim.b1=1.0', expect=['optim.b1']),
    _c('optim.b2<0', 'optim.b2=-0.5', expect=['optim.b2']),
    _c('negative weight decay', 'optim.weight_decay=-0.1', expect=['optim.weight_decay']),
    _c('negative grad clip', 'optim.grad_clip_norm=-1.0', expect=['optim.grad_clip_norm']),
    _c('negative end_lr_fraction', 'optim.end_lr_fraction=-1.0', expect=['end_lr_fraction']),
    _c('label_smoothing=1', 'label_smoothing=1.0', expect=['label_smoothing']),
    _c('label_smoothing<0', 'label_smoothing=-0.1', expect=['label_smoothing']),
    Case('mlm_probability=0', 'main', ['--workdir={fresh}', '--config=configs/bert.py:tiny',
                                       '--config.data.mlm_probability=0.0'],
         ('mlm_probability',)),
    Case('mlm_probability=1', 'main', ['--workdir={fresh}', '--config=configs/bert.py:tiny',
                                       '--config.data.mlm_probability=1.0'],
         ('mlm_probability',)),
    _c('mesh.shape not a tuple', 'mesh.shape=abc', expect=['mesh.shape']),
    _c('mesh.shape of strings', 'mesh.shape=(a,b,c)', expect=['mesh.shape']),
    _c('mesh.shape wrong length', 'mesh.shape=(1,1)', expect=['mesh.shape']),
    _c('mesh.shape two -1', 'mesh.shape=(-1,-1,1)', expect=['mesh.shape']),
    _c('mesh.shape not the devices', 'mesh.shape=(3,1,1)', expect=['mesh.shape']),
    _c('heads do not divide d_model', 'model.d_model=66', expect=['num_heads']),
    _c('sequence longer than the table', 'data.seq_len=4096', expect=['position table']),
    _c('unknown norm position', 'model.norm_position=middle', expect=['norm_position']),
    _c('unknown position', 'model.position=spiral', expect=['position']),
    _c('unknown task', 'task=telepathy', expect=['task']),
    _c('unknown data set', 'data.name=no_such_data', expect=['data.name']),
    # refused before any data preparation: nothing is written to its data_dir
    _c('unknown tokenizer', 'data.tokenizer=morse', 'data.data_dir={tmp}/tfds_tok',
       expect=['data.tokenizer', 'morse'], watch='{tmp}/tfds_tok'),
    _c('vocab smaller than the tokenizer', 'model.vocab_size=64', expect=['vocab_size']),
    _c('sequence too short', 'data.seq_len=2', expect=['seq_len']),
    _c('empty manual_dir', "data.manual_dir=", expect=['data.manual_dir']),
    _c('manual_dir an empty folder', 'data.manual_dir={tmp}/empty', expect=['data.manual_dir'],
       prepare='empty_dir'),
    _c('manual_dir missing', 'data.manual_dir={tmp}/nowhere', expect=['data.manual_dir']),
    _c('unknown eval type', 'evals.samples.type=vibes', expect=['vibes']),
    _c('batch not divisible by grad accumulation', 'optim.grad_accum_steps=3',
       expect=['batch_size', 'grad_accum_steps']),
    # config files and flags
    _c('unknown config key', 'modle.d_model=64', expect=['modle.d_model', 'model.d_model']),
    _c('mistyped value', 'model.d_model=wide', expect=['model.d_model']),
    Case('config file missing', 'main', ['--workdir={fresh}', '--config={tmp}/nope.py'],
         ('nope.py', 'does not exist')),
    Case('config file syntax error', 'main', ['--workdir={fresh}', '--config={tmp}/syntax.py'],
         ('syntax.py', 'syntax error'), prepare='syntax_config'),
    Case('config without get_config', 'main', ['--workdir={fresh}', '--config={tmp}/empty.py'],
         ('get_config',), prepare='empty_config'),
    Case('unknown variant', 'main', ['--workdir={fresh}', '--config=configs/gpt2.py:huge'],
         ('huge',)),
    Case('unknown config argument', 'main',
         ['--workdir={fresh}', '--config=configs/gpt2.py:tiny,colour=red'], ('colour',)),
    Case('no --config', 'main', ['--workdir={fresh}'], ('--config',)),
    Case('no --workdir', 'main', ['--config=configs/gpt2.py:tiny'], ('--workdir',)),
    Case('unknown flag', 'main', ['--workdir={fresh}', '--config=configs/gpt2.py:tiny',
                                  '--num_stepz=3'], ('num_stepz',)),
    Case('workdir is a file', 'main', ['--workdir={tmp}/afile', '--config=configs/gpt2.py:tiny'],
         ('afile', 'not a directory'), prepare='a_file', watch='{tmp}/afile'),
    # data files
    _c('data file not UTF-8', 'data.manual_dir={tmp}/latin1', 'data.data_dir={tmp}/tfds_l1',
       expect=['latin1/tinyshakespeare/input.txt', 'not UTF-8'], prepare='latin1_data'),
    _c('data file gzipped', 'data.manual_dir={tmp}/gz', 'data.data_dir={tmp}/tfds_gz',
       expect=['gz/tinyshakespeare/input.txt', 'gzip'], prepare='gzip_data'),
    _c('data file empty', 'data.manual_dir={tmp}/emptyfile', 'data.data_dir={tmp}/tfds_e',
       expect=['emptyfile/tinyshakespeare/input.txt', 'empty'], prepare='empty_data'),
    _c('data file too small for one batch', 'data.manual_dir={tmp}/small',
       'data.data_dir={tmp}/tfds_s', expect=['one batch'], prepare='small_data'),
    # resuming a run the wrong way
    Case('resume with another d_model', 'main',
         ['--workdir={run}', *TINY, '--config.num_steps=6', '--config.model.d_model=128'],
         ('checkpoint', 'd_model'), watch='{run}'),
    Case('resume past num_steps', 'main', ['--workdir={run}', *TINY, '--config.num_steps=1'],
         ('num_steps',), watch='{run}'),
    Case('corrupt tokenizer in the run', 'main', ['--workdir={run_badtok}', *TINY,
                                                  '--config.num_steps=6'],
         ('tokenizer',), prepare='bad_tokenizer', watch='{run_badtok}'),
    # generate
    Case('generate: no such step', 'generate', ['--workdir={run}', '--step=7'], ('step 7',),
         watch='{run}'),
    Case('generate: negative temperature', 'generate',
         ['--workdir={run}', '--temperature=-1', '--strategy=sample'], ('--temperature',),
         watch='{run}'),
    Case('generate: top_p=0', 'generate', ['--workdir={run}', '--top_p=0'], ('--top_p',),
         watch='{run}'),
    Case('generate: top_p>1', 'generate', ['--workdir={run}', '--top_p=1.5'], ('--top_p',),
         watch='{run}'),
    Case('generate: max_new_tokens=0', 'generate', ['--workdir={run}', '--max_new_tokens=0'],
         ('--max_new_tokens',), watch='{run}'),
    Case('generate: negative top_k', 'generate', ['--workdir={run}', '--top_k=-3'], ('--top_k',),
         watch='{run}'),
    Case('generate: num_beams=0', 'generate', ['--workdir={run}', '--num_beams=0'],
         ('--num_beams',), watch='{run}'),
    Case('generate: empty prompt', 'generate', ['--workdir={run}', '--prompt='], ('--prompt',),
         watch='{run}'),
    Case('generate: prompt longer than the table', 'generate',
         ['--workdir={run}', '--prompt=' + 'x' * 300], ('position table',), watch='{run}'),
    Case('generate: --source on a decoder', 'generate', ['--workdir={run}', '--source=hi'],
         ('--prompt',), watch='{run}'),
    Case('generate: not a run directory', 'generate', ['--workdir={fresh}'], ('config.json',)),
    Case('generate: run without checkpoints', 'generate', ['--workdir={run_nockpt}'],
         ('checkpoint',), prepare='run_without_checkpoints', watch='{run_nockpt}'),
    Case('generate: corrupt config.json', 'generate', ['--workdir={run_badcfg}'],
         ('config.json',), prepare='bad_config_json', watch='{run_badcfg}'),
    Case('generate: corrupt tokenizer', 'generate', ['--workdir={run_badtok}'], ('tokenizer',),
         prepare='bad_tokenizer', watch='{run_badtok}'),
    Case('generate: no --workdir', 'generate', [], ('--workdir',)),
    # summary
    Case('summary: unknown key', 'summary', ['--config=configs/bert.py:tiny',
                                             '--config.model.d_modle=3'], ('d_modle',)),
    Case('summary: missing file', 'summary', ['--config={tmp}/nope.py'], ('nope.py',)),
    Case('summary: impossible model', 'summary',
         ['--config=configs/bert.py:tiny', '--config.model.d_model=66'], ('num_heads',)),
    Case('summary: no --config', 'summary', [], ('--config',)),
    # convert
    Case('convert: missing hf_dir', 'convert', ['--hf_dir={tmp}/nohf', '--workdir={fresh}'],
         ('nohf',)),
    Case('convert: corrupt config.json', 'convert', ['--hf_dir={tmp}/badhf', '--workdir={fresh}'],
         ('config.json', 'not valid JSON'), prepare='bad_hf'),
    Case('convert: garbage weights file', 'convert',
         ['--hf_dir={tmp}/hf_garbage', '--workdir={fresh}'],
         ('hf_garbage/model.safetensors', 'corrupt'), prepare='hf_garbage'),
    Case('convert: truncated weights file', 'convert',
         ['--hf_dir={tmp}/hf_truncated', '--workdir={fresh}'],
         ('hf_truncated/model.safetensors', 'corrupt'), prepare='hf_truncated'),
    _c('init_from a missing run', 'init_from={tmp}/no_run', expect=['init_from', 'no_run']),
    Case('init_from=hf: garbage weights file', 'main',
         ['--workdir={fresh}', '--config=configs/bert.py:tiny,task=classification',
          '--config.init_from=hf:{tmp}/hf_garbage'],
         ('hf_garbage/model.safetensors', 'corrupt'), prepare='hf_garbage'),
    Case('init_from=hf: truncated weights file', 'main',
         ['--workdir={fresh}', '--config=configs/bert.py:tiny,task=classification',
          '--config.init_from=hf:{tmp}/hf_truncated'],
         ('hf_truncated/model.safetensors', 'corrupt'), prepare='hf_truncated'),
    # sweep
    Case('sweep: missing sweep file', 'sweep', ['--sweep={tmp}/nope.py', '--workdir={fresh}'],
         ('nope.py',)),
    Case('sweep: no --workdir', 'sweep', ['--sweep=tests/tiny_sweep.py'], ('--workdir',)),
]


def _prepare(kind: str, tmp: str, places: dict[str, str]) -> None:
  data = os.path.join(os.environ.get('FLAXFORMER_DATA') or _default_data(), 'tinyshakespeare',
                      'input.txt')

  def data_dir(name: str, content: bytes) -> None:
    os.makedirs(os.path.join(tmp, name, 'tinyshakespeare'), exist_ok=True)
    with open(os.path.join(tmp, name, 'tinyshakespeare', 'input.txt'), 'wb') as f:
      f.write(content)

  def copy_run(name: str) -> str:
    dst = os.path.join(tmp, name)
    if not os.path.exists(dst):
      shutil.copytree(places['{run}'], dst)
    places['{' + name + '}'] = dst
    return dst

  if kind == 'empty_dir':
    os.makedirs(os.path.join(tmp, 'empty'), exist_ok=True)
  elif kind == 'syntax_config':
    with open(os.path.join(tmp, 'syntax.py'), 'w') as f:
      f.write('def get_config(arg=None:\n  return None\n')
  elif kind == 'empty_config':
    with open(os.path.join(tmp, 'empty.py'), 'w') as f:
      f.write('X = 1\n')
  elif kind == 'a_file':
    with open(os.path.join(tmp, 'afile'), 'w') as f:
      f.write('not a directory\n')
  elif kind == 'latin1_data':
    data_dir('latin1', 'Caf\u00e9 cr\u00e8me\n'.encode('latin-1') * 2000)
  elif kind == 'gzip_data':
    import gzip  # pylint: disable=g-import-not-at-top
    with open(data, 'rb') as f:
      data_dir('gz', gzip.compress(f.read()[:200_000]))
  elif kind == 'empty_data':
    data_dir('emptyfile', b'')
  elif kind == 'small_data':
    data_dir('small', b'First Citizen:\nBefore we proceed.\n')
  elif kind == 'bad_tokenizer':
    run = copy_run('run_badtok')
    for root, _, files in os.walk(os.path.join(run, 'tokenizer')):
      for name in files:
        with open(os.path.join(root, name), 'wb') as f:
          f.write(b'\x00garbage{')
  elif kind == 'run_without_checkpoints':
    run = copy_run('run_nockpt')
    shutil.rmtree(os.path.join(run, 'checkpoints'), ignore_errors=True)
  elif kind == 'bad_config_json':
    run = copy_run('run_badcfg')
    with open(os.path.join(run, 'config.json'), 'w') as f:
      f.write('{"model": ')
  elif kind in ('hf_garbage', 'hf_truncated'):
    # A BERT checkpoint of configs/bert.py:tiny's shape whose weights file is damaged.
    d = os.path.join(tmp, kind)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, 'config.json'), 'w') as f:
      json.dump({'architectures': ['BertForMaskedLM'], 'model_type': 'bert', 'vocab_size': 512,
                 'hidden_size': 64, 'num_hidden_layers': 2, 'num_attention_heads': 4,
                 'intermediate_size': 256, 'max_position_embeddings': 128,
                 'type_vocab_size': 2, 'hidden_act': 'gelu', 'layer_norm_eps': 1e-12}, f)
    weights = os.path.join(d, 'model.safetensors')
    if kind == 'hf_garbage':
      with open(weights, 'wb') as f:
        f.write(b'\x10\x00\x00\x00\x00\x00\x00\x00{garbage: not a header')
    else:
      import numpy as np  # pylint: disable=g-import-not-at-top
      from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
      save_file({'bert.embeddings.word_embeddings.weight': np.zeros((512, 64), np.float32)},
                weights)
      with open(weights, 'r+b') as f:
        f.truncate(os.path.getsize(weights) // 2)
  elif kind == 'bad_hf':
    os.makedirs(os.path.join(tmp, 'badhf'), exist_ok=True)
    with open(os.path.join(tmp, 'badhf', 'config.json'), 'w') as f:
      f.write('{not json')
  else:
    raise ValueError(kind)


def _default_data() -> str:
  from flaxformer_lab.presets import common  # pylint: disable=g-import-not-at-top
  return common.default_data_dir()


def _fill(text: str, places: dict[str, str]) -> str:
  for key, value in places.items():
    text = text.replace(key, value)
  return text


@contextlib.contextmanager
def _captured_fds():
  """Captures file descriptors 1 and 2 (Python and C++ output alike) into a StringIO pair."""
  out = {}
  saved = {fd: os.dup(fd) for fd in (1, 2)}
  files = {fd: tempfile.TemporaryFile(mode='w+b') for fd in (1, 2)}
  sys.stdout.flush()
  sys.stderr.flush()
  for fd, f in files.items():
    os.dup2(f.fileno(), fd)
  try:
    yield out
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd in (1, 2):
      os.dup2(saved[fd], fd)
      os.close(saved[fd])
      files[fd].seek(0)
      out[fd] = files[fd].read().decode('utf-8', 'replace')
      files[fd].close()


def _worker(entry: str, cases_path: str, out_path: str) -> None:
  """Runs the cases of one entry point in this process (see the module docstring)."""
  import importlib  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from flaxformer_lab import errors  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f'flaxformer_lab.{entry}')
  if entry == 'convert':
    flags.mark_flags_as_required(['hf_dir', 'workdir'])
  parser = getattr(module, 'parse_flags', None) or errors._parse_plain_flags  # pylint: disable=protected-access
  if entry == 'summary':
    parser = errors.parse_config_flags
  with open(cases_path) as f:
    cases = json.load(f)
  del logging
  results = []
  for i, case in enumerate(cases):
    # Each case in a fork of this process: the imports are paid once, and every case starts
    # from unparsed flags and untouched JAX state, as a fresh process would.
    result_path = f'{out_path}.{i}'
    start = time.time()
    pid = os.fork()
    if pid == 0:
      code, trace = 1, ''
      with _captured_fds() as captured:
        try:
          code = errors.call(module.main, [entry, *case['args']], parser)
        except BaseException:  # pylint: disable=broad-except
          code, trace = 'traceback', traceback.format_exc()
      with open(result_path, 'w') as f:
        json.dump({'code': code, 'stderr': captured[2] + trace}, f)
      os._exit(0)  # pylint: disable=protected-access
    os.waitpid(pid, 0)
    try:
      with open(result_path) as f:
        rec = json.load(f)
    except (OSError, ValueError):
      rec = {'code': 'crashed', 'stderr': ''}
    results.append({'name': case['name'], **rec, 'seconds': round(time.time() - start, 2)})
  with open(out_path, 'w') as f:
    json.dump(results, f)


def run_bad_inputs(tmp: str, tfds_dir: str, run_dir: str,
                   cases: Sequence[Case] = tuple(BAD_INPUTS)) -> list[dict[str, Any]]:
  """Runs the table; returns one record per case with `ok` and, when not ok, `why`."""
  places = {'{run}': run_dir, '{tmp}': tmp}
  prepared = set()
  by_entry: dict[str, list[dict[str, Any]]] = {}
  before: dict[str, dict[str, str]] = {}
  for i, case in enumerate(cases):
    if case.prepare and case.prepare not in prepared:
      _prepare(case.prepare, tmp, places)
      prepared.add(case.prepare)
    fresh = os.path.join(tmp, f'fresh{i}')
    p = dict(places, **{'{fresh}': fresh})
    args = [_fill(a, p) for a in case.args]
    watch = _fill(case.watch, p)
    before[case.name] = snapshot(watch)
    by_entry.setdefault(case.entry, []).append({'name': case.name, 'args': args, 'watch': watch,
                                                'fresh': fresh})
  records = {}
  for entry, entry_cases in by_entry.items():
    cases_path = os.path.join(tmp, f'cases_{entry}.json')
    out_path = os.path.join(tmp, f'results_{entry}.json')
    with open(cases_path, 'w') as f:
      json.dump(entry_cases, f)
    r = subprocess.run([sys.executable, '-m', 'flaxformer_lab.faults', '--_worker', entry,
                        cases_path, out_path], env=env_for(tfds_dir), cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0 or not os.path.exists(out_path):
      raise RuntimeError(f'bad-input worker {entry} failed: {r.stderr[-3000:]}')
    with open(out_path) as f:
      for rec in json.load(f):
        records[rec['name']] = rec
    for c in entry_cases:
      records[c['name']].update(watch=c['watch'], fresh=c['fresh'])
  out = []
  for case in cases:
    rec = records[case.name]
    line = one_error_line(rec['stderr'])
    why = []
    if rec['code'] != case.code:
      why.append(f'exit {rec["code"]}, expected {case.code}')
    if line is None:
      why.append(f'not one error line: {rec["stderr"][-600:]!r}')
    else:
      missing = [e for e in case.expect if e.lower() not in line.lower()]
      if missing:
        why.append(f'line lacks {missing}: {line}')
      if 'Unknown command line flag' in line and case.name != 'unknown flag':
        why.append(f'the override was not parsed: {line}')
    after = snapshot(rec['watch'])
    if after != before[case.name]:
      changed = sorted(set(after) ^ set(before[case.name]) |
                       {k for k in after if before[case.name].get(k) not in (None, after[k])})
      why.append(f'{rec["watch"]} changed: {changed[:5]}')
    if rec['watch'] != rec['fresh'] and os.path.exists(rec['fresh']):
      why.append(f'{rec["fresh"]} was created')
    out.append({'name': case.name, 'entry': case.entry, 'code': rec['code'], 'line': line,
                'ok': not why, 'why': '; '.join(why), 'seconds': rec['seconds']})
  return out


# --- kills ----------------------------------------------------------------------------------------
MOMENTS = ('random', 'checkpoint_write', 'resume')


def _writing(workdir: str) -> bool:
  """True while orbax is writing a step (its `<step>.orbax-checkpoint-tmp-*` directory exists)."""
  d = os.path.join(workdir, 'checkpoints')
  try:
    return any('.orbax-checkpoint-tmp' in name for name in os.listdir(d))
  except OSError:
    return False


def _start(workdir: str, args: Sequence[str], tfds_dir: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, '-m', 'flaxformer_lab.main', f'--workdir={workdir}',
                           *args], env=env_for(tfds_dir), cwd=REPO_ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _signal_when(proc: subprocess.Popen, sig: int, ready: Callable[[], bool],
                 timeout: float) -> bool:
  """Polls `ready()` every 2 ms while the process lives; sends `sig` the moment it holds."""
  end = time.time() + timeout
  while proc.poll() is None and time.time() < end:
    if ready():
      proc.send_signal(sig)
      return True
    time.sleep(0.002)
  return False


def kill_trial(rng: random.Random, workdir: str, args: Sequence[str], tfds_dir: str,
               reference: dict[str, Any], ref_steps: list[int], sig: int, window: float,
               moment: str = 'random') -> dict[str, Any]:
  """Starts the run, sends `sig` at a chosen moment, reruns the same command to the end, and
  compares with the uninterrupted reference.

  moment: 'random' -- uniformly in [0, window] s after the start; 'checkpoint_write' -- while
  orbax writes a checkpoint (its tmp directory exists), a random one of the run's saves;
  'resume' -- the run is first killed once it has a checkpoint, then the resuming process is
  killed at a random moment of its start-up and restore (in [0, window / 2] s), then resumed.
  """
  delay = rng.uniform(0.0, window) if moment == 'random' else 0.0
  proc = _start(workdir, args, tfds_dir)
  start = time.time()
  extra: dict[str, Any] = {}
  if moment == 'random':
    time.sleep(delay)
    sent = proc.poll() is None
    if sent:
      proc.send_signal(sig)
  elif moment == 'checkpoint_write':
    # Skip a random number of saves (each seen as its tmp directory appearing) before the kill.
    skip = rng.randrange(0, 3)  # the tiny run saves every 2 of its steps
    seen, was = 0, False

    def ready() -> bool:
      nonlocal seen, was
      now = _writing(workdir)
      if now and not was:
        seen += 1
      was = now
      return now and seen > skip
    sent = _signal_when(proc, sig, ready, timeout=300)
    extra['write_in_progress'] = sent and _writing(workdir)
  elif moment == 'resume':
    first = _signal_when(proc, signal.SIGKILL, lambda: bool(steps_of(workdir)), timeout=300)
    proc.communicate(timeout=300)
    extra['first_kill_checkpoints'] = steps_of(workdir)
    delay = rng.uniform(0.0, window / 2)
    proc = _start(workdir, args, tfds_dir)
    start = time.time()
    time.sleep(delay)
    sent = first and proc.poll() is None
    if sent:
      proc.send_signal(sig)
  else:
    raise ValueError(f'unknown kill moment {moment!r}: one of {MOMENTS}')
  sent_at = time.time()
  _, err = proc.communicate(timeout=300)
  exit_after = time.time() - sent_at
  ran_s = sent_at - start
  had = steps_of(workdir)
  problems = []
  if sig == signal.SIGTERM and sent and proc.returncode not in (0, -signal.SIGTERM):
    problems.append(f'SIGTERM exit {proc.returncode}: {err[-500:]}')
  r = run_entry('main', [f'--workdir={workdir}', *args], tfds_dir)
  if r.returncode != 0:
    problems.append(f'resume exit {r.returncode}: {r.stderr[-800:]}')
  else:
    diff = identical(checkpoint_contents(workdir), reference)
    if diff:
      problems.append(f'not bit-identical: {diff}')
    if logged_steps(workdir) != ref_steps:
      problems.append(f'metrics.jsonl steps {logged_steps(workdir)} vs {ref_steps}')
  return {'signal': signal.Signals(sig).name, 'moment': moment, 'delay_s': round(delay, 2),
          'sent': sent, 'ran_s': round(ran_s, 1),
          'exit': proc.returncode, 'exit_after_s': round(exit_after, 2),
          'checkpoints_after_signal': had, **extra, 'ok': not problems,
          'why': '; '.join(problems)}


def run_kills(tmp: str, tfds_dir: str, kills: int, terms: int, seed: int = 0,
              num_steps: int = 12, moments: Sequence[str] = MOMENTS) -> dict[str, Any]:
  """`kills` SIGKILLs and `terms` SIGTERMs, the moments cycling through `moments` (SIGKILLs) --
  a random time, during a checkpoint write, during a resume -- and random times (SIGTERMs)."""
  rng = random.Random(seed)
  args = tiny_args(num_steps, checkpoint_every=2, keep_checkpoints=3)
  ref_dir = os.path.join(tmp, 'reference')
  start = time.time()
  train(ref_dir, args, tfds_dir)
  window = time.time() - start  # a kill anywhere from start-up to the final save
  reference = checkpoint_contents(ref_dir)
  ref_steps = logged_steps(ref_dir)
  trials = []
  # A run that ends before its signal (the machine got faster than the reference run) is no
  # trial: the window shrinks to that run's length and the trial is drawn again (3 tries each).
  for i in range(kills + terms):
    sig = signal.SIGKILL if i < kills else signal.SIGTERM
    moment = moments[i % len(moments)] if i < kills else 'random'
    for attempt in range(3):
      t = kill_trial(rng, os.path.join(tmp, f'kill{i}_{attempt}'), args, tfds_dir, reference,
                     ref_steps, sig, window, moment=moment)
      trials.append(t)
      if t['sent']:
        break
      if moment == 'random':
        window = min(window, t['ran_s'])
  return {'window_s': round(window, 1), 'trials': trials}


# --- a lost process of a two-process run ---------------------------------------------------------
def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(('localhost', 0))
    return sock.getsockname()[1]


def start_two(workdir: str, args: Sequence[str], tfds_dir: str, heartbeat_s: int
              ) -> list[subprocess.Popen]:
  """Both processes of a 2 x 4-CPU-device run of `main` (not waited for)."""
  port = _free_port()
  procs = []
  for i in range(2):
    env = env_for(tfds_dir, {'FLAXFORMER_COORDINATOR': f'localhost:{port}',
                             'FLAXFORMER_NUM_PROCESSES': '2', 'FLAXFORMER_PROCESS_ID': str(i),
                             'FLAXFORMER_NUM_CPU_DEVICES': '4',
                             'FLAXFORMER_HEARTBEAT_TIMEOUT_S': str(heartbeat_s)})
    procs.append(subprocess.Popen([sys.executable, '-m', 'flaxformer_lab.main',
                                   f'--workdir={workdir}', *args], env=env, cwd=REPO_ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
  return procs


def _finish(procs: Sequence[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
  out = []
  deadline = time.time() + timeout
  for p in procs:
    try:
      _, err = p.communicate(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
      p.kill()
      _, err = p.communicate()
    out.append((p.returncode, err))
  return out


def peer_loss(tmp: str, tfds_dir: str, victims: Sequence[int] = (0, 1), heartbeat_s: int = 6,
              num_steps: int = 12) -> dict[str, Any]:
  """A two-process run; once it has saved step 2, SIGKILL process `victim`. The survivor must
  exit with status 4 within the heartbeat timeout (+20 s), its one `error:` line naming the lost
  process, no traceback or C++ abort; both processes rerun resume bit-identical to an
  uninterrupted two-process run."""
  args = tiny_args(num_steps, checkpoint_every=2, keep_checkpoints=3,
                   **{'mesh.shape': '(2,2,2)'})
  ref_dir = os.path.join(tmp, 'peer_reference')
  ref = _finish(start_two(ref_dir, args, tfds_dir, heartbeat_s), 600)
  if any(code for code, _ in ref):
    return {'ok': False, 'why': f'reference run failed: {ref[0][1][-1500:]} {ref[1][1][-1500:]}',
            'trials': []}
  reference = checkpoint_contents(ref_dir)
  trials = []
  for victim in victims:
    workdir = os.path.join(tmp, f'peer_kill{victim}')
    procs = start_two(workdir, args, tfds_dir, heartbeat_s)
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs) and not steps_of(workdir):
      time.sleep(0.1)
    sent = all(p.poll() is None for p in procs)
    problems = []
    if sent:
      procs[victim].kill()
    killed_at = time.time()
    (code, err), = _finish([procs[1 - victim]], heartbeat_s + 60)
    took = time.time() - killed_at
    _finish([procs[victim]], 30)
    lines = [l for l in terminal_lines(err) if l.startswith('error:')]
    if not sent:
      problems.append('the run ended before the kill')
    else:
      if code != 4:
        problems.append(f'survivor exit {code}')
      if took > heartbeat_s + 20:
        problems.append(f'survivor took {took:.0f} s')
      if len(lines) != 1 or f'process {victim} of 2 was lost' not in lines[0]:
        problems.append(f'error lines {lines}')
      if any(w in err for w in ('Traceback', 'Check failure', 'Fatal Python error')):
        problems.append(f'noise: {err[-800:]!r}')
    resumed = _finish(start_two(workdir, args, tfds_dir, heartbeat_s), 600)
    if any(c for c, _ in resumed):
      problems.append(f'resume failed: {[c for c, _ in resumed]} {resumed[0][1][-800:]}')
    else:
      diff = identical(checkpoint_contents(workdir), reference)
      if diff:
        problems.append(f'not bit-identical: {diff}')
    trials.append({'victim': victim, 'survivor_exit': code, 'exit_after_s': round(took, 1),
                   'line': lines[0] if lines else None, 'ok': not problems,
                   'why': '; '.join(problems)})
  return {'ok': all(t['ok'] for t in trials), 'trials': trials}


def long_compile_peers(tmp: str, tfds_dir: str, heartbeat_s: int = 6,
                       num_layers: int = 16) -> dict[str, Any]:
  """A two-process run whose first compile (an unrolled `num_layers` decoder) takes longer than
  the heartbeat timeout: no process may be reported lost (both exit 0). A compile that held the
  GIL would stop the heartbeat thread and end the run with a false loss (exit 4)."""
  args = tiny_args(3, checkpoint_every=3, **{'mesh.shape': '(2,2,2)',
                                             'model.num_layers': num_layers,
                                             'model.scan_layers': False})
  start = time.time()
  res = _finish(start_two(os.path.join(tmp, 'long_compile'), args, tfds_dir, heartbeat_s), 900)
  took = time.time() - start
  problems = [f'process {i} exit {c}: {(terminal_lines(e) or [""])[-1][:300]}'
              for i, (c, e) in enumerate(res) if c]
  if took < 2 * heartbeat_s:
    problems.append(f'the run took {took:.0f} s, not longer than twice the {heartbeat_s} s '
                    'timeout: raise num_layers')
  return {'ok': not problems, 'seconds': round(took, 1), 'heartbeat_s': heartbeat_s,
          'num_layers': num_layers, 'why': '; '.join(problems)}


# --- poisoned update, corrupt checkpoints, full disk ----------------------------------------------
def poisoned_update(tmp: str, poison_step: int = 3) -> dict[str, Any]:
  """In this process: an optimizer whose update at `poison_step` makes the parameters NaN while
  the loss and gradient stay finite. The run must stop (Diverged) naming the last good step, and
  no saved checkpoint may hold a non-finite value."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flaxformer_lab import errors  # pylint: disable=g-import-not-at-top
  from flaxformer_lab import optim as optim_lib  # pylint: disable=g-import-not-at-top
  from flaxformer_lab import train as train_lib  # pylint: disable=g-import-not-at-top
  from flaxformer_lab.presets import gpt2  # pylint: disable=g-import-not-at-top

  def poison() -> optax.GradientTransformation:
    def init(params):
      del params
      return {'count': jnp.zeros((), jnp.int32)}

    def update(updates, state, params=None):
      del params
      bad = state['count'] + 1 == poison_step
      updates = jax.tree.map(lambda u: jnp.where(bad, jnp.nan, u), updates)
      return updates, {'count': state['count'] + 1}
    return optax.GradientTransformation(init, update)

  original = optim_lib.make_optimizer

  def poisoned(optim_config, num_steps):
    tx, schedule = original(optim_config, num_steps)
    return optax.chain(tx, poison()), schedule

  c = gpt2.get_config('tiny')
  c.num_steps, c.batch_size, c.data.seq_len = 6, 4, 32
  c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 2
  c.data.eval_batches, c.progress, c.async_checkpoints = 1, 'off', True
  c.evals.samples.every = -1
  workdir = os.path.join(tmp, 'poisoned')
  optim_lib.make_optimizer = poisoned
  message, code = None, 0
  try:
    train_lib.train_and_evaluate(c, workdir)
  except errors.Diverged as e:
    message, code = str(e), errors.DIVERGED
  finally:
    optim_lib.make_optimizer = original
  saved = steps_of(workdir)
  finite = all(np.isfinite(v).all() for s in saved
               for v in checkpoint_contents(workdir, s)['leaves'].values()
               if np.issubdtype(v.dtype, np.inexact))
  problems = []
  if code != errors.DIVERGED:
    problems.append('the run did not stop')
  last_good = max([s for s in saved if s < poison_step], default=None)
  if saved != ([last_good] if last_good is not None else []):
    problems.append(f'checkpoints {saved}, expected only steps before {poison_step}')
  named = f'step {last_good}' if last_good is not None else 'no checkpoint was saved yet'
  if message and named not in message:
    problems.append(f'the message does not say {named!r}: {message}')
  if not finite:
    problems.append('a saved checkpoint holds a non-finite value')
  return {'ok': not problems, 'why': '; '.join(problems), 'message': message, 'saved': saved}


CORRUPTIONS = ('truncate_array_file', 'garbage_metadata', 'delete_state_dir', 'empty_data_json')


def corrupt(step_dir: str, how: str) -> None:
  state = os.path.join(step_dir, 'state')
  if how == 'truncate_array_file':
    files = [os.path.join(r, f) for r, _, fs in os.walk(state) for f in fs
             if os.path.getsize(os.path.join(r, f)) > 64 and 'metadata' not in f.lower()]
    victim = max(files, key=os.path.getsize)
    with open(victim, 'r+b') as f:
      f.truncate(os.path.getsize(victim) // 3)
  elif how == 'garbage_metadata':
    with open(os.path.join(state, '_METADATA'), 'w') as f:
      f.write('{garbage')
  elif how == 'delete_state_dir':
    shutil.rmtree(state)
  elif how == 'empty_data_json':
    with open(os.path.join(step_dir, 'data', 'metadata'), 'w') as f:
      f.write('')
  else:
    raise ValueError(how)


def run_corruptions(tmp: str, tfds_dir: str, run_dir: str) -> list[dict[str, Any]]:
  """Each corruption of the latest checkpoint, then a resume: exit 2, one line naming it."""
  out = []
  for how in CORRUPTIONS:
    workdir = os.path.join(tmp, f'corrupt_{how}')
    shutil.copytree(run_dir, workdir)
    step = steps_of(workdir)[-1]
    corrupt(os.path.join(workdir, 'checkpoints', str(step)), how)
    before = snapshot(workdir)
    r = run_entry('main', [f'--workdir={workdir}', *tiny_args(6)], tfds_dir)
    line = one_error_line(r.stderr)
    problems = []
    if r.returncode != 2:
      problems.append(f'exit {r.returncode}')
    if line is None:
      problems.append(f'not one line: {r.stderr[-800:]!r}')
    elif 'checkpoint' not in line:
      problems.append(f'does not name the checkpoint: {line}')
    if snapshot(workdir) != before:
      problems.append('the run directory changed')
    out.append({'corruption': how, 'exit': r.returncode, 'line': line, 'ok': not problems,
                'why': '; '.join(problems)})
  return out


# The full-disk cases: (name, tmpfs size, asynchronous checkpoints, filled by another process the
# moment a checkpoint write is under way).
DISK_MODES = (('sync', '3m', False, False), ('async', '3m', True, False),
              ('async, filled mid-write', '8m', True, True))


def full_disk(tmp: str, tfds_dir: str) -> dict[str, Any]:
  """Runs on a small tmpfs that fills up (DISK_MODES): one line, exit 2, every checkpoint written
  before still restores."""
  if os.geteuid() != 0 or shutil.which('mount') is None:
    return {'skipped': 'needs root and mount(8) for a size-limited tmpfs'}
  # Prepares the data set first (its first preparation draws progress bars on stderr).
  train(os.path.join(tmp, 'full_disk_prepare'), tiny_args(1), tfds_dir)
  modes, problems = [], []
  for i, (name, size, async_checkpoints, mid_write) in enumerate(DISK_MODES):
    mount = os.path.join(tmp, f'tmpfs{i}')
    os.makedirs(mount, exist_ok=True)
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', mount],
                       capture_output=True, text=True)
    if r.returncode != 0:
      return {'skipped': f'cannot mount a tmpfs here: {r.stderr.strip()[:200]}'}
    try:
      rec = _fill_disk(mount, tfds_dir, async_checkpoints, mid_write)
    finally:
      subprocess.run(['umount', mount], capture_output=True)
    modes.append({'mode': name, **rec})
    if rec['why']:
      problems.append(f'{name}: {rec["why"]}')
  return {'modes': modes, 'line': modes[-1]['line'],
          'checkpoints': sum(m['checkpoints'] for m in modes),
          'restorable': sum(m['restorable'] for m in modes), 'ok': not problems,
          'why': '; '.join(problems)}


def _fill_disk(mount: str, tfds_dir: str, async_checkpoints: bool,
               mid_write: bool) -> dict[str, Any]:
  workdir = os.path.join(mount, 'run')
  proc = _start(workdir, tiny_args(200, checkpoint_every=2 if mid_write else 1,
                                   keep_checkpoints=1000, async_checkpoints=async_checkpoints),
                tfds_dir)
  filled = False
  deadline = time.time() + 300
  while mid_write and not filled and proc.poll() is None and time.time() < deadline:
    # A save in progress (orbax's tmp directory) after one that finished: fill the disk now.
    if steps_of(workdir) and _writing(workdir):
      with open(os.path.join(mount, 'filler'), 'wb') as f:
        with contextlib.suppress(OSError):
          while True:
            f.write(b'\0' * (1 << 16))
      filled = True
    time.sleep(0.002)
  try:
    _, stderr = proc.communicate(timeout=max(1.0, deadline - time.time()))
  except subprocess.TimeoutExpired:
    proc.kill()
    _, stderr = proc.communicate()
  line = one_error_line(stderr)
  problems = []
  if mid_write and not filled:
    problems.append('the run ended before a checkpoint write could be caught')
  if proc.returncode != 2:
    problems.append(f'exit {proc.returncode}')
  if line is None:
    problems.append(f'not one line ({len(stderr.splitlines())} lines): {stderr[-800:]!r}')
  saved = steps_of(workdir)
  restorable = 0
  for s in saved:
    try:
      checkpoint_contents(workdir, s)
      restorable += 1
    except Exception:  # pylint: disable=broad-except
      problems.append(f'checkpoint {s} does not restore')
  if not saved:
    problems.append('no checkpoint was written before the disk filled (make the tmpfs larger)')
  return {'exit': proc.returncode, 'line': line, 'checkpoints': len(saved),
          'restorable': restorable, 'stderr_lines': len(stderr.splitlines()),
          'why': '; '.join(problems)}


# --- the command ----------------------------------------------------------------------------------
PARTS = ('bad_inputs', 'poison', 'corrupt', 'kills', 'peer', 'full_disk')


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--full', action='store_true', help='20 SIGKILLs and 5 SIGTERMs')
  parser.add_argument('--kills', type=int, default=None, help='SIGKILL trials (quick: 2)')
  parser.add_argument('--terms', type=int, default=None, help='SIGTERM trials (quick: 1)')
  parser.add_argument('--only', default=','.join(PARTS), help=f'comma list of {PARTS}')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default='', help='write the results here')
  parser.add_argument('--keep', action='store_true', help='keep the scratch directory')
  parser.add_argument('--_worker', nargs=3, help=argparse.SUPPRESS)
  a = parser.parse_args(argv)
  if a._worker:  # pylint: disable=protected-access
    _worker(*a._worker)  # pylint: disable=protected-access
    return 0
  parts = [p for p in a.only.split(',') if p]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    parser.error(f'unknown parts {unknown}; choose from {PARTS}')
  kills = a.kills if a.kills is not None else (20 if a.full else 2)
  terms = a.terms if a.terms is not None else (5 if a.full else 1)
  tmp = tempfile.mkdtemp(prefix='flaxformer_faults_')
  tfds_dir = os.path.join(tmp, 'tfds')
  results: dict[str, Any] = {}
  ok = True
  start = time.time()
  try:
    run_dir = os.path.join(tmp, 'run')
    if {'bad_inputs', 'corrupt'} & set(parts):
      train(run_dir, tiny_args(2, checkpoint_every=2), tfds_dir)
    if 'bad_inputs' in parts:
      os.makedirs(os.path.join(tmp, 'bad'))
      rows = run_bad_inputs(os.path.join(tmp, 'bad'), tfds_dir, run_dir)
      bad = [r for r in rows if not r['ok']]
      for r in bad:
        print(f'[bad input] FAIL {r["name"]}: {r["why"]}')
      print(f'[bad input] {len(rows) - len(bad)} of {len(rows)} bad inputs: exit 2 (or 3), one '
            'line naming the problem, run directory unchanged', flush=True)
      results['bad_inputs'] = rows
      ok &= not bad
    if 'poison' in parts:
      r = subprocess.run([sys.executable, '-c',
                          'import json,sys; from flaxformer_lab import faults; '
                          f'print("RESULT" + json.dumps(faults.poisoned_update({tmp!r})))'],
                         env=env_for(tfds_dir), cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=600)
      rec = (json.loads(r.stdout.split('RESULT', 1)[1]) if 'RESULT' in r.stdout else
             {'ok': False, 'why': r.stderr[-1500:]})
      print(f'[poisoned update] {"ok" if rec["ok"] else "FAIL"}: {rec.get("why") or rec["message"]}',
            flush=True)
      results['poison'] = rec
      ok &= rec['ok']
    if 'corrupt' in parts:
      rows = run_corruptions(tmp, tfds_dir, run_dir)
      for r in rows:
        print(f'[corrupt checkpoint] {"ok" if r["ok"] else "FAIL"} {r["corruption"]}: '
              f'{r["why"] or r["line"]}', flush=True)
      results['corrupt'] = rows
      ok &= all(r['ok'] for r in rows)
    if 'kills' in parts and kills + terms:
      rec = run_kills(tmp, tfds_dir, kills, terms, seed=a.seed)
      good = [t for t in rec['trials'] if t['ok']]
      for t in rec['trials']:
        if not t['ok']:
          print(f'[kill] FAIL {t}')

      def count(name):
        sent = [t for t in rec['trials'] if t['signal'] == name and t['sent']]
        late = sum(t['signal'] == name and not t['sent'] for t in rec['trials'])
        return (f'{sum(t["ok"] for t in sent)} of {len(sent)} {name}s sent mid-run ('
                f'{sum(not t["checkpoints_after_signal"] for t in sent)} before the first '
                f'checkpoint; {late} drawn after the run had ended, not counted)')
      print(f'[kill] {count("SIGKILL")} and {count("SIGTERM")} resumed bit-identical (params, '
            'optimizer state, step, data position; metrics once per step)', flush=True)
      for m in MOMENTS:
        sent = [t for t in rec['trials'] if t['sent'] and t['moment'] == m]
        if sent:
          writes = sum(bool(t.get('write_in_progress')) for t in sent)
          print(f'[kill]   moment {m}: {sum(t["ok"] for t in sent)} of {len(sent)} resumed '
                f'bit-identical' + (f' ({writes} with the checkpoint write still in progress '
                                    'at the signal)' if m == 'checkpoint_write' else ''),
                flush=True)
      results['kills'] = rec
      sent_ok = [t for t in rec['trials'] if t['sent']]
      ok &= len(good) == len(rec['trials']) and len(sent_ok) == kills + terms
    if 'peer' in parts:
      rec = peer_loss(tmp, tfds_dir, victims=(0, 1) if a.full else (0,))
      for t in rec['trials']:
        print(f'[lost peer] {"ok" if t["ok"] else "FAIL"} process {t["victim"]} killed: survivor '
              f'exit {t["survivor_exit"]} after {t["exit_after_s"]} s; {t["why"] or t["line"]}',
              flush=True)
      if not rec['trials']:
        print(f'[lost peer] FAIL {rec["why"]}', flush=True)
      results['peer'] = rec
      ok &= rec['ok']
      if a.full:
        rec = long_compile_peers(tmp, tfds_dir)
        print(f'[long compile] {"ok" if rec["ok"] else "FAIL " + rec["why"]}: a two-process run '
              f'of an unrolled {rec["num_layers"]}-layer decoder took {rec["seconds"]} s under a '
              f'{rec["heartbeat_s"]} s heartbeat timeout', flush=True)
        results['long_compile'] = rec
        ok &= rec['ok']
    if 'full_disk' in parts:
      rec = full_disk(tmp, tfds_dir)
      if 'skipped' in rec:
        print(f'[full disk] skipped: {rec["skipped"]}', flush=True)
      for m in rec.get('modes', []):
        print(f'[full disk] {m["mode"]}: {"FAIL " + m["why"] if m["why"] else "ok"} (exit '
              f'{m["exit"]}, {m["stderr_lines"]} line(s) of stderr: {m["line"]}; '
              f'{m["restorable"]} of {m["checkpoints"]} checkpoints restore)', flush=True)
      results['full_disk'] = rec
      ok &= rec.get('ok', True)
  finally:
    results['seconds'] = round(time.time() - start, 1)
    if a.json:
      with open(a.json, 'w') as f:
        json.dump(results, f, indent=1, default=str)
    if not a.keep:
      shutil.rmtree(tmp, ignore_errors=True)
  print(f'[faults] {"all held" if ok else "FAILURES"} in {results["seconds"]} s')
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
