"""Shared test configuration and fixtures.

Strict dtype promotion is on for the whole suite, so an accidental implicit
promotion inside adamfx fails a test. optax's own code is not written for it
(``decay**count`` mixes a Python float and an int32 count; schedules do the
same), so run optax references inside ``optax_promotion()``.
"""

import contextlib
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
