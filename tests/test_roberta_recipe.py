"""experiments/roberta_recipe: the arms' resolved configs differ exactly as intended, and the
`:smoke` sweeps (pre-training, then SST-2 fine-tuning of each arm) end to end (eight
training subprocesses, in the quick CI set: about 1.5 minutes on 2 cores)."""

import json
import os
import subprocess
import sys

import pytest

from experiments.roberta_recipe import analyze
from experiments.roberta_recipe import config as rr_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sweep_arms_switch_only_the_data_recipe():
  rows = list(rr_config.get_sweep('smoke'))
  assert len(rows) == len(rr_config.ARMS) == 4
  for row, spec in zip(rows, rr_config.ARMS.values()):
    assert tuple(row[k] for k in rr_config.KEYS) == spec
  with pytest.raises(ValueError, match='pretrain'):
    rr_config.get_sweep('smoke,stage=finetune')


def test_smoke_sweeps_write_the_table_with_every_arm(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  pre, ft = tmp_path / 'pretrain', tmp_path / 'finetune'
  for spec, work in (('smoke', pre), (f'smoke,stage=finetune,pretrain={pre}', ft)):
    subprocess.run([sys.executable, '-m', 'flaxformer_lab.sweep',
                    f'--sweep=experiments/roberta_recipe/config.py:{spec}', f'--workdir={work}',
                    '--parallel=2'], cwd=ROOT, env=env, check=True)
  runs = rr_config.pretrain_runs(str(pre))
  assert list(runs) == list(rr_config.ARMS)
  for arm, (masking, pairs, inputs, head) in rr_config.ARMS.items():
    cfg = json.load(open(os.path.join(runs[arm], 'config.json')))  # the resolved config
    assert (cfg['data']['mlm_masking'], cfg['data']['mlm_pairs'], cfg['data']['mlm_inputs'],
            cfg['model']['head']) == (masking, pairs, inputs, head)
    recs = [json.loads(l) for l in open(os.path.join(runs[arm], 'metrics.jsonl'))]
    has_pair = any('eval/pair_loss' in r or 'train/pair_loss' in r for r in recs)
    assert has_pair == bool(pairs), arm  # NSP trained only where on
  out = analyze.main([f'--pretrain={pre}', f'--finetune={ft}', f'--out={tmp_path / "out"}'])
  assert [r['arm'] for r in out['rows']] == list(rr_config.ARMS) and not out['missing']
  for r in out['rows']:
    assert 0.0 < r['mlm_loss'] < 20 and 0.0 <= r['sst2_accuracy'] <= 1.0
  md = (tmp_path / 'out' / 'results.md').read_text()
  assert all(f'| {arm} |' in md for arm in rr_config.ARMS)
  assert os.path.getsize(out['png']) > 10_000


def test_seeds_combine_to_the_mean_with_each_seed_shown():
  def row(loss, acc):
    return {'arm': 'roberta', 'masking': 'dynamic', 'inputs': 'full_sentences', 'nsp': False,
            'train_mlm_loss': loss - 0.1, 'mlm_loss': loss, 'own_mlm_loss': loss,
            'sst2_accuracy': acc}
  (r,) = analyze.combine([[row(5.0, 0.70)], [row(6.0, 0.80)]])
  assert r['mlm_loss'] == 5.5 and abs(r['sst2_accuracy'] - 0.75) < 1e-12
  assert analyze.cells(r)[5] == '5.500 (5.000 / 6.000)'
  assert analyze.cells(r)[7] == '75.0 (70.0 / 80.0)'
  (r,) = analyze.combine([[row(5.0, 0.70)], [{**row(6.0, 0.8), 'sst2_accuracy': None}]])
  assert r['sst2_accuracy'] is None and r['mlm_loss'] == 5.5  # a seed without its run: '-'
