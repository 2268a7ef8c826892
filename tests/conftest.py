"""Shared test configuration and fixtures.

Strict dtype promotion is on for the whole suite, so an accidental implicit
promotion inside adamfx fails a test. optax's own code is not written for it
(``decay**count`` mixes a Python float and an int32 count; schedules do the
same), so run optax references inside ``optax_promotion()``.

The peer references (torch, torch-optimi, torchao, keras) are optional: without
them their tests skip. With ``ADAMFX_REQUIRE_PEERS=1`` (set by .ci/run) a missing
peer fails the session at its start, and a test that skips because of a peer fails.
"""

import collections
import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile

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


_CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'


def _share_compilations(config):
  """One JAX compilation cache for the run: the same program (an optimizer's
  step on the same shapes) is compiled by many tests, in both xdist workers and
  in the 8-device subprocesses. The folder is the run's own (made by the
  controller, inherited by the workers through the environment, removed at the
  end), so no entry outlives the code that compiled it. No size bound: a bound
  turns on the cache's eviction, which lists the whole folder under a file lock
  at every write (thousands of entries here: it made the run 3x slower). An entry
  read while another process writes it fails to load, and JAX compiles instead
  (with a warning)."""
  if hasattr(config, 'workerinput'):
    folder = os.environ.get('ADAMFX_TEST_JAX_CACHE')
  elif os.environ.get(_CACHE_ENV):  # the user's own cache: keep it as it is
    return
  else:
    folder = config.stash[_CACHE_KEY] = tempfile.mkdtemp(prefix='adamfx-jax-cache-')
    os.environ[_CACHE_ENV] = os.environ['ADAMFX_TEST_JAX_CACHE'] = folder
    os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  if folder:
    jax.config.update('jax_compilation_cache_dir', folder)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


_CACHE_KEY = pytest.StashKey[str]()


def pytest_unconfigure(config):
  folder = config.stash.get(_CACHE_KEY, None)
  if folder:
    shutil.rmtree(folder, ignore_errors=True)
    for name in (_CACHE_ENV, 'ADAMFX_TEST_JAX_CACHE', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS',
                 'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'):
      os.environ.pop(name, None)


def pytest_configure(config):
  _share_compilations(config)
  _refuse_ungrouped_xdist(config)


def _refuse_ungrouped_xdist(config):
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


# The README's `pytest` (issue 19: minutes, not a quarter of an hour) checks each
# parametrized test on its first case (DEFAULT_CASES); the other cases are marked
# `slow`, which .ci/run runs (`pytest -m slow`), so every case still runs in CI.
# A test marked ``default_cases(n)`` keeps n (None: all of them); a test named on the
# command line (path::test, path::test[case]) keeps all of them.
DEFAULT_CASES = 1
# The multi-process runs (the 8-device subprocesses, xdist group 'devices8') are
# `slow` too, unless their file or test is named on the command line: then the
# file's own default cases run (`pytest tests/test_sharding.py`).
MULTI_PROCESS_GROUP = 'devices8'


def _named(config):
  """The tests (``path::test``, ``path::test[case]``) and the files (``path``)
  named on the command line, as node id prefixes."""
  tests, files = [], []
  for arg in config.args:
    path, sep, rest = arg.partition('::')
    if sep or path.endswith('.py'):
      path = os.path.relpath(os.path.abspath(path), config.rootpath).replace(os.sep, '/')
      (tests if sep else files).append(f'{path}::{rest}')
  return tests, files


def _multi_process(item) -> bool:
  group = item.get_closest_marker('xdist_group')
  return group is not None and group.args[:1] == (MULTI_PROCESS_GROUP,)


@pytest.hookimpl(tryfirst=True)  # before pytest's -m deselection sees the marks
def pytest_collection_modifyitems(config, items):
  tests, files = _named(config)
  kept = collections.Counter()
  for item in items:
    if item.get_closest_marker('slow'):
      continue
    if item.get_closest_marker('notebooks'):  # run once, by the docs build: never `slow`
      continue
    named = any(item.nodeid.split('@')[0].startswith(n) for n in tests)
    if _multi_process(item) and not named and not any(item.nodeid.startswith(f) for f in files):
      item.add_marker(pytest.mark.slow)
      continue
    if not hasattr(item, 'callspec') or named:  # a named test keeps all its cases
      continue
    mark = item.get_closest_marker('default_cases')
    keep = mark.args[0] if mark else DEFAULT_CASES
    test = (item.path, item.cls, item.originalname)
    kept[test] += 1
    if keep is not None and kept[test] > keep:
      item.add_marker(pytest.mark.slow)


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
