r"""Converts a Hugging Face checkpoint directory into a lab run directory.

  python -m flaxformer_lab.convert --hf_dir=/path/to/bert --workdir=/tmp/bert_lab
  python -m flaxformer_lab.convert --hf_dir=/path/to/bert --workdir=/tmp/bert_sst2 \
      --head=classification --num_labels=2      # a body or other head: the new head starts fresh

writes `<workdir>/config.json` (the family preset's training config with the model section from the
checkpoint's config.json) and an orbax checkpoint of a fresh train state at step 0 around the
checkpoint's params (`<workdir>/checkpoints/0`, the layout flaxformer_lab.train restores), plus the
checkpoint's tokenizer in `<workdir>/hf_tokenizer` when it has one. Evaluate, decode
(rundir.RunDir(workdir).restore_params()) or keep training in that workdir; or start another run
from it with
`--config.init_from=<workdir>`. Fine-tuning straight from the Hugging Face directory needs no
conversion: `--config.init_from=hf:<dir>`.
"""

from __future__ import annotations

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
_WORKDIR = flags.DEFINE_string('workdir', None, 'Lab run directory to write.')
_ARCH = flags.DEFINE_string('architecture', None, 'Read the checkpoint as this HF class '
                            '(default: config.json architectures[0]).')
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


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax/jax INFO chatter off; --verbosity=0 restores it
  overrides = {}
  if _HEAD.value:
    overrides['head'] = _HEAD.value
  if _NUM_LABELS.value:
    overrides['num_labels'] = _NUM_LABELS.value
  overrides['scan_layers'] = _SCAN.value
  _, fresh = convert(_HF_DIR.value, _WORKDIR.value, architecture=_ARCH.value, **overrides)
  print(f'wrote {_WORKDIR.value}' + (f' (fresh: {", ".join(fresh)})' if fresh else ''))


if __name__ == '__main__':
  flags.mark_flags_as_required(['hf_dir', 'workdir'])
  errors.run(main)  # bad input (a missing or mismatched checkpoint) -> one line, exit status 2
