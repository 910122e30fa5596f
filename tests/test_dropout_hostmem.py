"""models/dropout.py (fewer random bits per decision) and hostmem.py (the CPU malloc re-exec)."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lab import hostmem
from flaxformer_lab.models.config import ConfigError, ModelConfig
from flaxformer_lab.models.dropout import Dropout, applied_rate, keep_mask, random_words

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_32_bits_is_flax_dropout_exactly():
  x = jax.random.normal(jax.random.key(0), (4, 33, 17))
  rngs = {'dropout': jax.random.key(7)}
  ours = Dropout(0.1, 32).apply({}, x, deterministic=False, rngs=rngs)
  flax_ = nn.Dropout(0.1).apply({}, x, deterministic=False, rngs=rngs)
  np.testing.assert_array_equal(ours, flax_)
  np.testing.assert_array_equal(Dropout(0.1, 16).apply({}, x, deterministic=True), x)


def test_applied_rate_is_the_threshold_over_two_to_the_bits():
  assert applied_rate(0.1, 16) == 6554 / 65536
  assert applied_rate(0.1, 8) == 26 / 256
  assert applied_rate(0.1, 32) == 0.1


@pytest.mark.parametrize('bits', [8, 16])
def test_keep_fraction_pairs_and_mean_match_bernoulli(bits):
  """Over 2**21 decisions: the kept fraction is 1 - applied_rate, two decisions cut from one PRNG
  word are independent (P(both kept) = p^2), and the output's mean is the input's, each within 5
  standard errors of the binomial."""
  n, rate = 2 ** 21, 0.1
  p = 1.0 - applied_rate(rate, bits)
  keep = np.asarray(keep_mask(jax.random.key(3), rate, (n,), bits))
  se = np.sqrt(p * (1 - p) / n)
  assert abs(keep.mean() - p) < 5 * se
  both = (keep[0::2] & keep[1::2]).mean()  # neighbours share a 32-bit word
  assert abs(both - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / (n // 2))
  y = Dropout(rate, bits).apply({}, jnp.ones((n,)), deterministic=False,
                                rngs={'dropout': jax.random.key(4)})
  kept = np.asarray(y) != 0
  np.testing.assert_allclose(np.asarray(y)[kept], 1.0 / p, rtol=1e-6)
  assert abs(float(y.mean()) - 1.0) < 5 * se / p


@pytest.mark.parametrize('bits', [8, 16])
def test_odd_sizes_and_keys_give_different_masks(bits):
  a = keep_mask(jax.random.key(0), 0.5, (3, 5, 7), bits)
  b = keep_mask(jax.random.key(1), 0.5, (3, 5, 7), bits)
  assert a.shape == (3, 5, 7) and a.dtype == jnp.bool_
  assert bool(jnp.any(a != b))


@pytest.mark.parametrize('key', [
    lambda: jax.random.key(42), lambda: jax.random.PRNGKey(3),
    lambda: jax.random.fold_in(jax.random.split(jax.random.key(9))[1], 123),
    lambda: jax.random.key(5, impl='rbg'), lambda: jax.random.key(5, impl='unsafe_rbg')])
def test_random_words_are_jax_random_bits_bit_for_bit(key):
  """The unrolled threefry (and the fallback for other PRNGs) gives jax.random.bits' words, jitted
  and not, for sizes odd and even, so every dropout mask is what it was before."""
  for n in (1, 2, 7, 1000, 65537):
    want = np.asarray(jax.random.bits(key(), (n,), jnp.uint32))
    np.testing.assert_array_equal(np.asarray(random_words(key(), n)), want)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(random_words, static_argnums=1)(key(), n)), want)


def test_threefry_words_are_straight_line_ops():
  """No threefry2x32 primitive (lowered on the CPU as a rolled `while` loop) in the mask's jaxpr:
  XLA can fuse the hash into the compare and select that consume it."""
  jaxpr = str(jax.make_jaxpr(lambda k: keep_mask(k, 0.1, (64, 33), 16))(jax.random.key(0)))
  assert 'threefry2x32' not in jaxpr and 'while' not in jaxpr
  rbg = str(jax.make_jaxpr(lambda k: keep_mask(k, 0.1, (64, 33), 16))(
      jax.random.key(0, impl='rbg')))
  assert 'random_bits' in rbg  # other implementations keep jax.random.bits


def test_config_refuses_other_bit_widths():
  with pytest.raises(ConfigError, match=r'model.dropout_bits=12 is not one of 8, 16, 32'):
    ModelConfig(dropout_bits=12).validate()


def test_hostmem_decides_from_the_environment(monkeypatch):
  monkeypatch.setattr(hostmem, 'accelerator_visible', lambda: False)
  monkeypatch.setattr(hostmem.platform, 'libc_ver', lambda: ('glibc', '2.36'))
  monkeypatch.setattr(hostmem.sys, 'platform', 'linux')
  assert hostmem.should_reexec({})
  assert not hostmem.should_reexec({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
  assert not hostmem.should_reexec({hostmem.ENV_SWITCH: 'system'})
  with pytest.raises(ValueError, match='FLAXFORMER_HOST_MALLOC'):
    hostmem.should_reexec({hostmem.ENV_SWITCH: 'fast'})
  monkeypatch.setattr(hostmem, 'accelerator_visible', lambda: True)
  assert not hostmem.should_reexec({})


def test_hostmem_never_replaces_a_process_that_only_imported_the_module(monkeypatch):
  """pytest's __main__ is not `python -m flaxformer_lab.main`: nothing is executed."""
  monkeypatch.setattr(hostmem, 'should_reexec', lambda environ=None: True)
  monkeypatch.setattr(hostmem.os, 'execve', lambda *a: pytest.fail(f'execve{a}'))
  assert hostmem.main_module() != 'flaxformer_lab.main'
  hostmem.reexec_with_tunables('flaxformer_lab.main')


def test_accelerator_visible_follows_jax_platforms(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')
  assert hostmem.accelerator_visible()
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert not hostmem.accelerator_visible()


@pytest.mark.skipif(not (sys.platform.startswith('linux') and
                         __import__('platform').libc_ver()[0] == 'glibc'), reason='glibc only')
def test_bench_command_reexecs_with_the_tunables_and_records_them(tmp_path):
  """`python -m flaxformer_lab.bench` on the CPU runs under GLIBC_TUNABLES (same pid, exit 0) and
  says so in its JSON; a bad FLAXFORMER_HOST_MALLOC is one line, exit 2."""
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', hostmem.ENV_SWITCH)}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  out = tmp_path / 'b.json'
  cmd = [sys.executable, '-m', 'flaxformer_lab.bench', '--config=configs/gpt2.py:tiny',
         '--config.batch_size=2', '--config.data.seq_len=16', '--steps=1', '--rounds=1',
         '--warmup=0', f'--json={out}']
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert json.loads(out.read_text())['machine']['glibc_tunables'] == hostmem.TUNABLES
  bad = subprocess.run(cmd, cwd=ROOT, env=dict(env, FLAXFORMER_HOST_MALLOC='fast'),
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
      "error: FLAXFORMER_HOST_MALLOC='fast' is not one of tuned, system"]
