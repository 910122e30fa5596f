"""experiments/albert_sharing: the four arms' configs, and the `:smoke` sweeps (pre-training, then
SST-2 fine-tuning) end to end with the table's parameter counts checked against the formulas
(eight training subprocesses, in the quick CI set: about 1.5 minutes on 2 cores)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from flaxformer_lab.models.config import ConfigError, ModelConfig

from experiments.albert_sharing import analyze
from experiments.albert_sharing import config as exp_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _expected(m: dict, share: bool, emb_dim: int) -> dict[str, int]:
  """Layer-stack and embedding parameter counts from the shapes (written out, not read back)."""
  H, F, L, V = m['d_model'], m['mlp_dim'], m['num_layers'], m['vocab_size']
  layer = 4 * (H * H + H) + (H * F + F) + (F * H + H) + 2 * 2 * H  # q,k,v,o; MLP; two LayerNorms
  E = emb_dim or H
  emb = V * E + m['max_len'] * E + m['type_vocab_size'] * E + 2 * E  # tokens, positions, types, norm
  if emb_dim:
    emb += E * H + H  # the E -> H projection: V*E + E*H instead of V*H
  return {'layers': layer * (1 if share else L), 'embeddings': emb}


def test_arms_and_stages():
  sweep = exp_config.get_sweep('smoke')
  v = exp_config.VARIANTS['smoke']
  assert sweep == [{'model.share_layers': s, 'model.emb_dim': v['emb_dim'] if f else 0}
                   for s, f in exp_config.ARMS.values()]
  for stage in ('pretrain', 'finetune'):
    c = exp_config.get_config(f'smoke,stage={stage},pretrained=x')
    for arm in sweep:
      m = c.model.to_dict()
      m.update({k.split('.', 1)[1]: val for k, val in arm.items()})
      ModelConfig.from_dict(m)  # every arm is a valid model
      assert exp_config.arm_of(m) in exp_config.ARMS
  assert exp_config.get_config('smoke,stage=finetune,pretrained=x').model.head == 'classification'
  with pytest.raises(ValueError, match='pretrained'):
    exp_config.get_config('smoke,stage=finetune')
  with pytest.raises(ValueError, match='stage'):
    exp_config.get_config('smoke,stage=distill')
  with pytest.raises(ValueError, match='variant'):
    exp_config.get_config('huge')


def test_bad_arm_values_are_refused_by_the_model_validation():
  m = exp_config.get_config('smoke').model.to_dict()
  with pytest.raises(ConfigError, match='emb_dim'):
    ModelConfig.from_dict({**m, 'emb_dim': 2 * m['d_model']})
  with pytest.raises(ConfigError, match='share_layers'):
    ModelConfig.from_dict({**m, 'share_layers': 3})  # 3 groups do not divide 2 layers


def test_smoke_sweeps_write_the_table_with_every_arm(tmp_path):
  env = {**os.environ, 'FLAXFORMER_TFDS_DIR': str(tmp_path / 'tfds'), 'JAX_PLATFORMS': 'cpu'}
  pre, ft = tmp_path / 'pretrain', tmp_path / 'finetune'
  for arg, work in (('smoke,stage=pretrain', pre), (f'smoke,stage=finetune,pretrained={pre}', ft)):
    subprocess.run([sys.executable, '-m', 'flaxformer_lab.sweep',
                    f'--sweep=experiments/albert_sharing/config.py:{arg}', f'--workdir={work}',
                    '--parallel=2'], cwd=ROOT, env=env, check=True)
  out = analyze.main([f'--pretrain={pre}', f'--finetune={ft}', f'--out={tmp_path / "out"}'])
  rows = {r['arm']: r for r in out['rows']}
  assert list(rows) == list(exp_config.ARMS) and not out['missing']
  m = exp_config.get_config('smoke').model.to_dict()
  E = exp_config.VARIANTS['smoke']['emb_dim']
  for arm, (share, fact) in exp_config.ARMS.items():
    want = _expected(m, bool(share), E if fact else 0)
    assert rows[arm]['params_layers'] == want['layers'], arm
    assert rows[arm]['params_embeddings'] == want['embeddings'], arm
    assert np.isfinite(rows[arm]['mlm_loss']) and 0 <= rows[arm]['sst2_accuracy'] <= 1, arm
  # sharing keeps 1/L of the layer stack; factorizing swaps V*H for V*E + E*H (+ bias); the rest
  # of the model (heads, pooler) changes only through E
  L = m['num_layers']
  assert rows['not_shared_E=H']['params_layers'] == L * rows['shared_E=H']['params_layers']
  assert (rows['not_shared_E=H']['params_total'] - rows['shared_E=H']['params_total']
          == (L - 1) * rows['shared_E=H']['params_layers'])
  totals = [r['params_total'] for r in out['rows']]
  assert len(set(totals)) == 4 and min(totals) == rows['shared_factorized']['params_total']
  md = (tmp_path / 'out' / 'results.md').read_text()
  assert all(f'| {arm} |' in md for arm in exp_config.ARMS) and 'paper' in md
  assert os.path.getsize(out['png']) > 10_000
