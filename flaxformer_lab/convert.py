r"""Converts between Hugging Face checkpoint directories and lab run directories.

Hugging Face -> lab:

  python -m flaxformer_lab.convert --hf_dir=/path/to/bert --workdir=/tmp/bert_lab
  python -m flaxformer_lab.convert --hf_dir=/path/to/bert --workdir=/tmp/bert_sst2 \
      --head=classification --num_labels=2      # a body or other head: the new head starts fresh

writes `<workdir>/config.json` (the family preset's training config with the model section from the
checkpoint's config.json) and an orbax checkpoint of a fresh train state at step 0 around the
checkpoint's params (`<workdir>/checkpoints/0`, the layout flaxformer_lab.train restores), plus the
checkpoint's tokenizer in `<workdir>/hf_tokenizer` when it has one. Evaluate, decode
(rundir.RunDir(workdir).restore_params()) or keep training in that workdir; or start another run
from it with `--config.init_from=<workdir>`. Fine-tuning straight from the Hugging Face directory
needs no conversion: `--config.init_from=hf:<dir>`.

lab -> Hugging Face (`--to_hf`):

  python -m flaxformer_lab.convert --to_hf --workdir=/tmp/bert_run --hf_dir=/tmp/bert_hf \
      [--step=N] [--architecture=BertForMaskedLM] [--family=xlmr]

writes the run's parameters (the latest checkpoint, or --step) as `config.json` +
`model.safetensors` in the Hugging Face layout of its family (`transformers.AutoModel*`
.from_pretrained opens it), with the class of its head unless --architecture names another. A
configuration Hugging Face cannot represent is refused with a line naming the field. The tokenizer
goes along in Hugging Face's format when the run has one (a converted checkpoint's); a lab-trained
tokenizer is copied into `<hf_dir>/lab_tokenizer/` (lab format). An existing checkpoint in --hf_dir
is never overwritten.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from absl import flags
from absl import logging
import jax

from flaxformer_lab import checkpoint as ckpt_lib
from flaxformer_lab import errors
from flaxformer_lab import rundir
from flaxformer_lab.interop import hf_tokenizer
from flaxformer_lab.interop import huggingface
from flaxformer_lab.models.config import ConfigError

HF_TOKENIZER_DIR = 'hf_tokenizer'

_HF_DIR = flags.DEFINE_string('hf_dir', None, 'Hugging Face checkpoint directory (config.json + '
                              'model.safetensors or pytorch_model.bin).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Lab run directory to write (with --to_hf: to '
                               'read).')
_TO_HF = flags.DEFINE_bool('to_hf', False, 'Export the lab run in --workdir to --hf_dir in the '
                           'Hugging Face layout (instead of importing --hf_dir).')
_STEP = flags.DEFINE_integer('step', None, 'With --to_hf: the checkpoint step (default: latest).')
_FAMILY = flags.DEFINE_string('family', None, 'With --to_hf: the Hugging Face family to write '
                              '(default: inferred from the model switches; e.g. xlmr).')
_ARCH = flags.DEFINE_string('architecture', None, 'Read the checkpoint as this HF class '
                            '(default: config.json architectures[0]); with --to_hf: write it as '
                            'this class (default: the one of the run\'s head).')
_HEAD = flags.DEFINE_string('head', None, 'Lab head to train (default: the checkpoint\'s); a head '
                            'the checkpoint lacks is freshly initialized.')
_NUM_LABELS = flags.DEFINE_integer('num_labels', None, 'Classes of a classification head.')
_SCAN = flags.DEFINE_bool('scan_layers', True, 'Scanned (`layers`) or looped (`layers_i`) params.')


def convert(hf_dir: str, workdir: str, *, architecture: Optional[str] = None,
            **model_overrides: Any):
  """Writes the run directory (see the module docstring); returns (config, fresh param paths)."""
  from flaxformer_lab import train  # pylint: disable=g-import-not-at-top
  config = huggingface.config_from_hf(hf_dir, architecture, **model_overrides)
  try:
    setup = train.build_setup(config)
  except ConfigError as e:
    if config.model.head == 'none':
      raise ConfigError(f'{hf_dir} is a body without a head, which no lab task trains: pass '
                        '--head=<mlm|lm|seq2seq_lm|classification> (it starts fresh)') from e
    raise
  state = train.create_state(config, setup)
  loaded, fresh = huggingface.load_params_for_config(hf_dir, setup.model_cfg,
                                                     architecture=architecture)
  params = train.merge_params(jax.device_get(state['params']), loaded, allowed_missing=fresh)
  state = train._replace_params(state, params, setup)  # pylint: disable=protected-access
  rundir.RunDir(workdir).save_config(config)
  ckpt = ckpt_lib.Checkpointer(workdir, every=0, async_save=False, config=config)
  try:
    ckpt.save(0, state)
  finally:
    ckpt.close()
  tok = hf_tokenizer.load_hf_tokenizer(hf_dir, huggingface.read_hf_config(hf_dir))
  if tok is not None and jax.process_index() == 0:
    tok.save(os.path.join(workdir, HF_TOKENIZER_DIR))
  return config, fresh


LAB_TOKENIZER_DIR = 'lab_tokenizer'
_HF_WEIGHT_FILES = (huggingface.CONFIG_NAME, huggingface.SAFE_WEIGHTS, 'pytorch_model.bin')


def export(workdir: str, hf_dir: str, *, step: Optional[int] = None,
           architecture: Optional[str] = None, family: Optional[str] = None) -> str:
  """Writes lab run `workdir` (checkpoint `step`, default the latest) to `hf_dir` in the Hugging
  Face layout; returns the architecture written. See the module docstring."""
  existing = [f for f in _HF_WEIGHT_FILES if os.path.exists(os.path.join(hf_dir, f))]
  if existing:
    errors.fail(f'--hf_dir={hf_dir} already holds a checkpoint ({", ".join(existing)}); '
                'export into a new or empty directory')
  run = rundir.RunDir(workdir)
  if not run.has_config():
    errors.fail(f'--workdir={workdir} is not a lab run directory (no config.json)')
  config = run.load_config()
  params = run.restore_params(step)
  try:
    huggingface.save((config, params), hf_dir, family=family, architecture=architecture)
  except (huggingface.UnsupportedError, huggingface.HFCheckpointError, KeyError) as e:
    errors.fail(f'cannot export {workdir}: {str(e).splitlines()[0]}')
  hf_tok_dir = os.path.join(workdir, HF_TOKENIZER_DIR)
  if os.path.isdir(hf_tok_dir):  # a converted checkpoint's own tokenizer, in HF's format
    from flaxformer_lab.data import tokenizers  # pylint: disable=g-import-not-at-top
    tokenizers.load_tokenizer(hf_tok_dir).save_hf(hf_dir)
  elif run.has_tokenizer():
    tok = run.load_tokenizer()
    if hasattr(tok, 'save_hf'):
      tok.save_hf(hf_dir)
    else:
      tok.save(os.path.join(hf_dir, LAB_TOKENIZER_DIR))
  with open(os.path.join(hf_dir, huggingface.CONFIG_NAME)) as f:
    return json.load(f)['architectures'][0]


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax/jax INFO chatter off; --verbosity=0 restores it
  for name in ('hf_dir', 'workdir'):
    if not flags.FLAGS[name].value:
      errors.fail(f'--{name} is required')
  if _TO_HF.value:
    arch = export(_WORKDIR.value, _HF_DIR.value, step=_STEP.value, architecture=_ARCH.value,
                  family=_FAMILY.value)
    print(f'wrote {_HF_DIR.value} ({arch})')
    return
  overrides = {}
  if _HEAD.value:
    overrides['head'] = _HEAD.value
  if _NUM_LABELS.value:
    overrides['num_labels'] = _NUM_LABELS.value
  overrides['scan_layers'] = _SCAN.value
  _, fresh = convert(_HF_DIR.value, _WORKDIR.value, architecture=_ARCH.value, **overrides)
  print(f'wrote {_WORKDIR.value}' + (f' (fresh: {", ".join(fresh)})' if fresh else ''))


if __name__ == '__main__':
  errors.run(main)  # bad input (a missing or mismatched checkpoint) -> one line, exit status 2
