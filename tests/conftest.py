"""Shared test configuration and fixtures.

Strict dtype promotion is on for the whole suite, so an accidental implicit
promotion inside adamfx fails a test. optax's own code is not written for it
(``decay**count`` mixes a Python float and an int32 count; schedules do the
same), so run optax references inside ``optax_promotion()``.

The peer references (torch, torch-optimi, torchao, keras) are optional: without
them their tests skip. With ``ADAMFX_REQUIRE_PEERS=1`` (set by .ci/run) a missing
peer fails the session at its start, and a test that skips because of a peer fails.
"""

import contextlib
import importlib.metadata
import importlib.util
import os

import jax
import pytest

jax.config.update('jax_numpy_dtype_promotion', 'strict')

# Property tests: bounded so the default suite stays fast on 2 cores.
try:
  from hypothesis import HealthCheck
  from hypothesis import settings

  settings.register_profile(
      'adamfx',
      max_examples=int(os.environ.get('ADAMFX_HYPOTHESIS_EXAMPLES', '40')),
      deadline=None,
      suppress_health_check=[HealthCheck.too_slow],
      derandomize=True,
  )
  settings.load_profile('adamfx')
except ImportError:  # pragma: no cover
  pass


# The import name of each peer reference, and the words a skip for it contains.
PEERS = {'torch': 'torch', 'optimi': 'torch-optimi', 'torchao': 'torchao', 'keras': 'keras'}
_REQUIRE_PEERS = os.environ.get('ADAMFX_REQUIRE_PEERS') == '1'


def _peer_in(text: str) -> str | None:
  return next((p for p in PEERS if f"'{p}'" in text or p in text.split()), None) if text else None


def pytest_sessionstart(session):
  del session
  if not _REQUIRE_PEERS:
    return
  # Found, not imported: keras picks its backend once, on import (tests set it).
  missing = [package for module, package in PEERS.items()
             if importlib.util.find_spec(module) is None]
  if missing:
    raise pytest.UsageError(f'ADAMFX_REQUIRE_PEERS=1 but peers are missing: {missing}')


def _fail_peer_skip(report):
  """With ADAMFX_REQUIRE_PEERS=1, a skip that names a peer becomes a failure."""
  if not (_REQUIRE_PEERS and report.skipped) or hasattr(report, 'wasxfail'):
    return
  reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
  peer = _peer_in(reason)
  if peer:
    report.outcome = 'failed'
    report.longrepr = f'skipped for want of {PEERS[peer]}, required by ADAMFX_REQUIRE_PEERS=1: {reason}'


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  del item, call
  outcome = yield
  _fail_peer_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  del collector
  outcome = yield
  _fail_peer_skip(outcome.get_result())


def pytest_configure(config):
  """The 8-device tests share one xdist worker (``xdist_group('devices8')``): two
  8-device subprocesses at once starve XLA:CPU's collectives on 2 cores. On
  pytest 9.2, pytest-xdist 3.8's ``--dist loadgroup`` silently stops grouping
  (it writes the group into a node id field pytest 9.2 no longer reads;
  pytest-xdist issue 1386), so refuse that pair rather than run ungrouped."""
  if hasattr(config, 'workerinput') or config.getoption('dist', 'no') != 'loadgroup':
    return
  version = lambda name: tuple(int(p) for p in importlib.metadata.version(name).split('.')[:2]
                               if p.isdigit())
  if version('pytest') >= (9, 2) and version('pytest-xdist') <= (3, 8):
    raise pytest.UsageError(
        f'pytest {importlib.metadata.version("pytest")} with pytest-xdist '
        f'{importlib.metadata.version("pytest-xdist")}: --dist loadgroup does not group '
        '(pytest-xdist issue 1386). Install the pytest that pyproject.toml pins: '
        'pip install -e ".[test]"')


def optax_promotion():
  """Context for running optax reference code under standard promotion."""
  return jax.numpy_dtype_promotion('standard')


@pytest.fixture
def x64():
  """Enables float64 for one test."""
  with jax.enable_x64(True):
    yield


@contextlib.contextmanager
def no_recompile(fn):
  """Asserts that a jitted ``fn`` compiles at most once inside the block."""
  before = fn._cache_size()
  yield
  assert fn._cache_size() - before <= 1, 'recompiled'
