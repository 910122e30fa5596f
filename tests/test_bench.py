"""flaxformer_lab.bench: synthetic batches, FLOP counts, the HF equivalents, the command."""

from __future__ import annotations

import importlib
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from flaxformer_lab import bench
from flaxformer_lab.models.config import ModelConfig
from flaxformer_lab.models.transformer import build_model, dummy_inputs


def config(spec: str, **model):
  module, _, arg = spec.partition(':')
  c = importlib.import_module(f'configs.{module}').get_config(arg or None)
  for k, v in model.items():
    c.model[k] = v
  return c


def lab_param_count(c) -> int:
  cfg = ModelConfig.from_dict(c.model)
  shapes = jax.eval_shape(lambda: build_model(cfg).init(jax.random.PRNGKey(0),
                                                        **dummy_inputs(cfg, 1, 8))['params'])
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes))))


@pytest.mark.parametrize('spec, model, hf_name', [
    ('gpt2:tiny', {}, 'GPT2LMHeadModel'),
    ('bert:tiny', dict(head='mlm', pooler=False), 'BertForMaskedLM'),
    ('bert:tiny', dict(head='mlm_nsp', pooler=True), 'BertForPreTraining'),
    ('t5:tiny', {}, 'T5ForConditionalGeneration')])
def test_hf_equivalent_has_the_same_parameter_count(spec, model, hf_name):
  pytest.importorskip('transformers')
  c = config(spec, **model)
  hf, name, _ = bench.build_hf_model(c)
  assert name == hf_name
  assert sum(p.numel() for p in hf.parameters()) == lab_param_count(c)


@pytest.mark.parametrize('spec', ['gpt2:tiny', 'bert:tiny', 't5:tiny'])
def test_synthetic_batch_has_the_objectives_keys_and_shapes(spec):
  c = config(spec)
  batch = bench.synthetic_batch(c)
  b, l = c.batch_size, c.data.seq_len
  if c.task == 'seq2seq':
    assert batch['decoder_targets'].shape == (b, c.data.target_len or l)
  else:
    assert batch['inputs'].shape == (b, l)
    assert int(batch['inputs'].max()) < c.model.vocab_size
  if c.task == 'mlm':
    p = bench.num_predictions(c)
    assert p == int(np.ceil(c.data.mlm_probability * l))
    np.testing.assert_array_equal(batch['weights'].sum(1), p)  # a fixed number scored per row
    rows = np.arange(b)[:, None]
    np.testing.assert_array_equal(batch['targets'][rows, batch['masked_lm_positions']],
                                  batch['masked_lm_ids'])
    assert batch['weights'][rows, batch['masked_lm_positions']].min() == 1.0


def test_model_flops_by_hand_for_a_decoder():
  c = config('gpt2:tiny')
  cfg = ModelConfig.from_dict(c.model)
  shapes = jax.eval_shape(lambda: build_model(cfg).init(jax.random.PRNGKey(0),
                                                        **dummy_inputs(cfg, 1, 8))['params'])
  flops = bench.model_flops_per_step(c, nn.meta.unbox(shapes))
  d, f, n, v = cfg.d_model, cfg.hidden_dim, cfg.num_layers, cfg.vocab_size
  tokens = c.batch_size * c.data.seq_len
  per_layer = d * 3 * d + d * d + 2 * d * f  # qkv, out, mlp in/out
  assert flops['matmul'] == 6.0 * tokens * (n * per_layer + v * d)
  assert flops['attention'] == 12.0 * n * c.data.seq_len ** 2 * d * c.batch_size
  assert flops['total'] == flops['matmul'] + flops['attention']


def test_mlm_flops_count_the_head_at_scored_positions_only():
  c = config('bert:tiny', head='mlm', pooler=False)
  cfg = ModelConfig.from_dict(c.model)
  shapes = nn.meta.unbox(jax.eval_shape(lambda: build_model(cfg).init(
      jax.random.PRNGKey(0), **dummy_inputs(cfg, 1, 8))['params']))
  full = bench.model_flops_per_step(c, shapes)['matmul']
  c.data.mlm_probability = 1.0  # every position scored
  every = bench.model_flops_per_step(c, shapes)['matmul']
  head = cfg.vocab_size * cfg.d_model + cfg.d_model * cfg.d_model
  l, p = c.data.seq_len, int(np.ceil(0.15 * c.data.seq_len))
  assert every - full == pytest.approx(6.0 * c.batch_size * (l - p) * head)


def test_run_measures_the_lab_and_hf_eager_interleaved(tmp_path):
  """The real measurement path on a tiny model: lab vs HF eager, 2 rounds, JSON and markdown."""
  pytest.importorskip('torch')
  c = config('gpt2:tiny', num_layers=1, d_model=32, num_heads=2, mlp_dim=64)
  c.batch_size, c.data.seq_len = 4, 16
  result = bench.run(c, steps=2, rounds=2, warmup=1, vs_hf=True, hf_modes=('eager',),
                     label='tiny')
  lab, hf = result['lab'], result['hf']['eager']
  assert lab['steps_timed'] == 2 and hf['steps_timed'] == 2
  assert lab['tokens_per_s'] == pytest.approx(4 * 16 / lab['step_s_median'])
  assert lab['compile_s'] > 0 and 0 < lab['mfu'] < 1
  assert np.isfinite(lab['first_loss']) and lab['last_loss'] < lab['first_loss'] + 1.0
  assert hf['params'] == lab['params']
  assert hf['ratio_lab'] == pytest.approx(lab['tokens_per_s'] / hf['tokens_per_s'])
  table = bench.markdown([result])
  assert '| tiny |' in table and 'lab / compiled' in table and 'HF eager' in table
  json.dumps(result, default=str)  # serializable


def test_command_line_writes_json_and_markdown(tmp_path, capsys):
  out, md = tmp_path / 'r.json', tmp_path / 'r.md'
  code = bench.main(['bench', '--config=configs/gpt2.py:tiny', '--config.model.num_layers=1',
                     '--config.batch_size=2', '--config.data.seq_len=16', '--steps=2',
                     '--rounds=1', '--warmup=1', f'--json={out}', f'--markdown={md}'])
  assert code == 0
  result = json.loads(out.read_text())
  assert result['config']['model.num_layers'] == 1 and result['tokens_per_step'] == 32
  assert result['lab']['step_s_median'] > 0
  assert '| model | lab tokens/s |' in md.read_text()
  assert 'lab tokens/s' in capsys.readouterr().out


def test_profile_names_the_xla_ops_and_their_model_code(tmp_path):
  """`--profile` on XLA CPU: the trace's most expensive ops, each traced back to the model code
  (op_name metadata) it came from; the head matmuls of a wide vocabulary are among them."""
  c = config('gpt2:tiny', num_layers=1, d_model=32, num_heads=2, mlp_dim=64, vocab_size=8192)
  c.batch_size, c.data.seq_len = 4, 64
  result = bench.run(c, steps=1, rounds=1, warmup=1, profile_dir=str(tmp_path / 'trace'))
  top = result['profile']['top_ops']
  assert top and all(op['ms'] > 0 for op in top)
  assert top == sorted(top, key=lambda op: -op['ms'])
  assert not any(bench._CPU_BOOKKEEPING.match(op['op']) for op in top)  # pylint: disable=protected-access
  # Op times vary with load (CI runs tests two at a time), so no rank is asserted: the head's
  # three matmuls (forward, two gradients) are among the 15 listed, and most ops have a source.
  heads = [op for op in top if 'lm_head' in op['source'] and 'dot_general' in op['source']]
  assert len(heads) >= 2, top
  assert sum(bool(op['source']) for op in top) >= len(top) // 2, top
  assert bench.cpu_description() in bench.markdown([result])


def test_command_line_rejects_an_unknown_key(capsys):
  code = bench.main(['bench', '--config=configs/gpt2.py:tiny', '--config.model.num_layayers=1'])
  assert code == 2
  assert 'error' in capsys.readouterr().err


def test_gpu_benchmark_script_runs_in_its_tiny_cpu_form(tmp_path):
  """experiments/gpu_benchmark/run.py --tiny: every part, JSON and markdown written, no error."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  pytest.importorskip('torch')
  root = __import__('os').path.dirname(__import__('os').path.dirname(__file__))
  spec = importlib.util.spec_from_file_location(
      'gpu_benchmark_run', f'{root}/experiments/gpu_benchmark/run.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  out = tmp_path / 'out'
  assert module.main(['--tiny', f'--out={out}']) == 0
  result = json.loads((out / 'results.json').read_text())
  assert set(result['parts']) == {'gpt2', 'bert', 'decode'}
  for part in ('gpt2', 'bert'):
    r = result['parts'][part]
    assert r['lab']['tokens_per_s'] > 0 and r['hf']['eager']['tokens_per_s'] > 0
    assert r['hf']['eager']['params'] == r['lab']['params']
    assert r['config']['model.dtype'] == 'bfloat16'
  assert result['parts']['decode']['rows'][0]['same']
  md = (out / 'results.md').read_text()
  assert 'GPT-2 tiny' in md and 'BERT tiny' in md and 'Decoding vs generate' in md
