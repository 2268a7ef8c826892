"""What the README's `pytest` selects, and what it leaves to `pytest -m slow` (conftest).

Collected by pytest itself in a subprocess, on two files only (the 8-device
averaging check lives in test_averaging.py): the default run never starts an
8-device subprocess, the `slow` run has every such test, and a file or test
named on the command line brings its own back.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MULTI = 'tests/test_averaging.py::test_sharded_like_params'
PLAIN = 'tests/test_averaging.py::test_debias_false_is_flax_nnx_ema'

pytestmark = pytest.mark.slow  # four pytest collections: 18 s on 2 cores


def _collected(*args: str) -> list[str]:
  out = subprocess.run(
      [sys.executable, '-m', 'pytest', '--collect-only', '-q', '-n', '0', '-p', 'no:cacheprovider',
       *args],
      cwd=ROOT, capture_output=True, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert out.returncode in (0, 5), out.stdout[-2000:] + out.stderr[-2000:]  # 5: none collected
  return [line.split('@')[0] for line in out.stdout.splitlines() if '::' in line]


def test_multi_process_runs_leave_the_default_run_for_slow():
  # The directory, as the README's `pytest` collects it (only test_a*.py, to be quick).
  everything = ('tests', '--ignore-glob=tests/test_[!a]*.py')
  default = _collected(*everything)
  assert PLAIN in default and MULTI not in default
  assert MULTI in _collected(*everything, '-m', 'slow')


def test_a_named_file_or_test_runs_its_multi_process_checks():
  assert MULTI in _collected('tests/test_averaging.py')
  assert _collected(MULTI) == [MULTI]
