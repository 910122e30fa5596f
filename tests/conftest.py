"""Test setup: the repository root on sys.path (for `configs` and `experiments`), CPU only; tests
marked `slow` run only with --runslow."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import pytest  # pylint: disable=g-import-not-at-top,g-bad-import-order


def pytest_addoption(parser):
  parser.addoption('--runslow', action='store_true', default=False,
                   help='also run tests marked slow (or set FLAXFORMER_SLOW_TESTS=1)')


def pytest_collection_modifyitems(config, items):
  """Tests marked `slow` are left out of the quick CI set unless asked for."""
  if config.getoption('--runslow') or os.environ.get('FLAXFORMER_SLOW_TESTS') == '1':
    return
  skip = pytest.mark.skip(reason='slow: run with --runslow or FLAXFORMER_SLOW_TESTS=1')
  for item in items:
    if 'slow' in item.keywords:
      item.add_marker(skip)
