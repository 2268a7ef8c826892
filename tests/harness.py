"""Shared pieces of the reference tests: random trees, gradient streams, runners.

A run is ``steps`` optimiser steps on params of any tree structure, with the
gradient of step ``k`` given leafwise by ``a * (param - target[k]) + noise[k]``:
``a = 0`` gives a fixed stream (dense or sparse), ``a > 0`` a noisy quadratic
whose gradient feeds back on the params (so errors would compound, as in
training). The JAX runner compiles the whole run as one ``lax.scan``; the
NumPy runner (``reference.run``) takes the same streams.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
import pytest

SHAPES = [(), (1,), (5,), (3, 4), (2, 1, 3), (7,)]


def case(*values: Any, default: bool, id: str | None = None) -> Any:  # noqa: A002 (pytest's name)
  """One parametrized case: in the README's default run (all such cases of the test,
  ``default_cases(None)``, tests/conftest.py) or, if not ``default``, marked `slow`."""
  marks = pytest.mark.default_cases(None) if default else pytest.mark.slow
  return pytest.param(*values, id=id, marks=marks)


def subset(values: Any, default: Any) -> list[Any]:
  """``values`` as cases of one parameter: those in ``default`` in the default run."""
  return [case(v, default=v in default) for v in values]


@contextlib.contextmanager
def compiled_programs():
  """The names of the programs XLA compiles inside the block (``jax.log_compiles``):
  a step called eagerly on shapes no other test uses shows whether it runs as one
  compiled call or as dozens of separate array operations."""
  names: list[str] = []

  class _Names(logging.Handler):
    def emit(self, record):
      message = record.getMessage()
      if message.startswith('Compiling '):
        names.append(message.split(' with ')[0][len('Compiling '):])

  handler, logger = _Names(logging.WARNING), logging.getLogger('jax')
  logger.addHandler(handler)
  try:
    with jax.log_compiles():
      yield names
  finally:
    logger.removeHandler(handler)


def devices_env(n: int = 8, collective_timeout_s: int = 900) -> dict[str, str]:
  """The environment of a subprocess that runs JAX on ``n`` host CPU devices.

  XLA:CPU runs the ``n`` participants of a collective on a client thread pool
  of ``max(cores, n)`` threads, so on a machine with ``n`` or fewer cores a
  collective takes the whole pool, and work queued on it (a transfer, the next
  program) can leave a participant without a thread: the all-reduce waits
  forever at 0% CPU. ``PJRT_NPROC`` (XLA's ``DefaultThreadPoolSize``) gives the
  pool ``2 n`` threads. A collective stuck anyway aborts after
  ``collective_timeout_s`` seconds instead of hanging the run.
  """
  flags = (f' --xla_force_host_platform_device_count={n}'
           f' --xla_cpu_collective_call_terminate_timeout_seconds={collective_timeout_s}'
           f' --xla_cpu_collective_timeout_seconds={collective_timeout_s}')
  return {**os.environ, 'XLA_FLAGS': (os.environ.get('XLA_FLAGS', '') + flags).strip(),
          'JAX_PLATFORMS': 'cpu', 'PJRT_NPROC': str(max(2 * n, os.cpu_count() or 1))}


def random_tree(rng: np.random.Generator, dtype: Any, n_leaves: int = 3) -> Any:
  """A random nested tree of dicts, lists and tuples with ``n_leaves`` leaves.

  One leaf is a scalar (shape ``()``), the others random shapes; the root
  is always a container and most trees are nested two or three deep.
  """
  picks = rng.integers(1, len(SHAPES), size=n_leaves - 1)
  shapes = [()] + [SHAPES[i] for i in picks]
  shapes = [shapes[i] for i in rng.permutation(n_leaves)]

  def leaf(shape):
    x = rng.normal(size=shape)
    if np.issubdtype(np.dtype(dtype), np.complexfloating):
      x = x + 1j * rng.normal(size=shape)
    return np.asarray(x).astype(dtype)

  def build(items, depth):
    if len(items) == 1 and depth > 0 and rng.random() < 0.6:
      return leaf(items[0])
    n = int(rng.integers(1, min(3, len(items)) + 1))
    cuts = sorted(rng.choice(np.arange(1, len(items)), size=n - 1, replace=False)) if n > 1 else []
    groups = np.split(np.arange(len(items)), cuts)
    children = [build([items[i] for i in g], depth + 1) for g in groups]
    kind = rng.integers(3)
    if kind == 0:
      return {f'k{i}': c for i, c in enumerate(children)}
    if kind == 1:
      return children
    return tuple(children)

  return build(shapes, 0)


def streams(
    rng: np.random.Generator, params: Any, steps: int, *, scale: float = 1.0
) -> tuple[Any, Any, Any]:
  """``(a, targets, noise)`` trees for a run of ``steps`` steps.

  Leaves take turns at three kinds of gradient: a noisy quadratic with a
  drifting (non-stationary) optimum whose gradient feeds back on the params;
  a sparse fixed stream (90 % of elements, and some whole steps of the leaf,
  exactly zero, as for an embedding row that is not looked up); a dense
  heavy-tailed fixed stream. ``targets`` and ``noise`` leaves have a leading
  step axis.
  """
  counter = iter(range(10**9))

  def leaf(p):
    p = np.asarray(p)
    kind = next(counter) % 3
    shape = (steps,) + p.shape
    drift = np.cumsum(rng.normal(scale=0.05, size=shape), axis=0)
    noise = rng.normal(scale=scale, size=shape) * rng.lognormal(size=shape)
    if np.iscomplexobj(p):
      noise = noise + 1j * rng.normal(scale=scale, size=shape)
    if kind == 1:
      noise = noise * (rng.random(shape) >= 0.9)
      noise = noise * (rng.random((steps,) + (1,) * p.ndim) >= 0.45)
    return (
        float(rng.uniform(0.5, 2.0)) if kind == 0 else 0.0,
        drift.astype(p.dtype),
        noise.astype(p.dtype),
    )

  triples = jax.tree.map(leaf, params)
  is_triple = lambda x: isinstance(x, tuple) and len(x) == 3 and isinstance(x[0], float)
  pick = lambda i: jax.tree.map(lambda t: t[i], triples, is_leaf=is_triple)
  return pick(0), pick(1), pick(2)


def run_jax(
    tx: optax.GradientTransformation,
    params: Any,
    a: Any,
    targets: Any,
    noise: Any,
    *,
    promotion: Callable[[], Any] = contextlib.nullcontext,
) -> tuple[Any, Any, Any]:
  """Runs ``tx`` over the streams in one compiled ``lax.scan``.

  Returns ``(final_params, final_state, updates)``, the updates stacked on a
  leading step axis. ``promotion`` is entered while tracing (optax's own code
  needs standard dtype promotion).
  """

  def body(carry, xs):
    p, s = carry
    c, n = xs
    g = jax.tree.map(lambda p_, a_, c_, n_: a_ * (p_ - c_) + n_, p, a, c, n)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), u

  @jax.jit
  def go(params, targets, noise):
    state = tx.init(params)
    (p, s), us = jax.lax.scan(body, (params, state), (targets, noise))
    return p, s, us

  with promotion():
    return go(params, targets, noise)


def run_numpy(opt: Any, params: Any, a: Any, targets: Any, noise: Any, steps: int):
  """Runs a ``reference`` optimiser on the same streams; leaves are flat lists."""
  from reference import run

  a_l = jax.tree.leaves(a)
  t_l = [np.asarray(x) for x in jax.tree.leaves(targets)]
  n_l = [np.asarray(x) for x in jax.tree.leaves(noise)]

  def grads(k, ps):
    return [a_ * (p - t[k]) + n[k] for p, a_, t, n in zip(ps, a_l, t_l, n_l)]

  return run(opt, jax.tree.leaves(params), grads, steps)
