r"""Storage rules for moments kept in a float narrower than the arithmetic.

Adam's second moment decays by ``b2 = 0.999`` per step. In bfloat16 (8
significant bits) ``0.999 * nu`` is closer to ``nu`` than to any other
bfloat16 number, so storing it with round-to-nearest gives back ``nu``: the
second moment never decays, and every increment ``(1 - b2) g**2`` smaller than
about ``0.4 %`` of ``nu`` is lost too. It only ratchets up.

Stochastic rounding stores ``x`` as the neighbour above with probability
equal to its distance from the neighbour below (in units of the gap), so the
stored value is ``x`` *in expectation* and small increments survive on
average. The random bits here are a counter-based hash of
``(count, leaf index, element index)``: no key in the state (``AdamState``
keeps its fields), the same inputs give the same result on every run and
every device, and a jitted step stays a pure function.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamfx._core import numerics as _numerics

_U32 = jnp.uint32


def _mix32(x: jax.Array) -> jax.Array:
  """A 32-bit integer hash with full avalanche ("lowbias32", C. Wellons)."""
  x = x ^ (x >> _U32(16))
  x = x * _U32(0x7FEB352D)
  x = x ^ (x >> _U32(15))
  x = x * _U32(0x846CA68B)
  return x ^ (x >> _U32(16))


def random_bits(
    shape: tuple[int, ...], count: Any, leaf_index: int, index: Any = None
) -> jax.Array:
  """uint32 bits, one per element, hashed from ``(count, leaf_index, element)``.

  Args:
    shape: shape of the array to round.
    count: the step count (an int32 scalar, possibly traced or batched by
      ``vmap``); the bits change with it from step to step.
    leaf_index: position of the leaf in the flattened tree, so equal leaves
      are rounded independently.
    index: optional, each element's flat position in the whole leaf (lazy
      Adam's gathered rows draw the bits the dense leaf would); default: the
      positions in ``shape``.

  Returns:
    A uint32 array of ``shape`` (broadcast with ``count``'s batch shape).

  Examples:
    >>> import jax.numpy as jnp
    >>> from adamfx._core import rounding as _rounding
    >>> a = _rounding.random_bits((3,), jnp.int32(1), 0)
    >>> b = _rounding.random_bits((3,), jnp.int32(2), 0)
    >>> a.dtype, bool((a == _rounding.random_bits((3,), jnp.int32(1), 0)).all())
    (dtype('uint32'), True)
    >>> bool((a != b).all())
    True
  """
  key = _mix32(jnp.asarray(count).astype(_U32) ^ _U32(0x9E3779B9))
  key = _mix32(key + _U32((leaf_index * 0x85EBCA6B + 0x27D4EB2F) % 2**32))
  if index is None:
    n = int(np.prod(shape, dtype=np.int64))
    index = jax.lax.iota(_U32, n).reshape(shape)
  else:  # the elements' flat positions in a larger array (gathered rows)
    index = jnp.asarray(index).astype(_U32).reshape(shape)
  key = jnp.reshape(key, key.shape + (1,) * len(shape))
  # Half a round of the hash per element: ``key`` is already fully mixed
  # from the count and the leaf, so for each element the input below is
  # uniform over steps, and every step after it is a bijection of 32-bit
  # words: the output is uniform too (what unbiased rounding needs). The
  # multiply by an odd constant spreads consecutive indices over all 32
  # bits; one xor-shift, one multiply and another xor-shift decorrelate
  # neighbours, and the last shift brings the multiply's well-mixed high
  # bits down to the low 16 that bfloat16 rounding adds.
  x = index * _U32(0x9E3779B1) + key
  x = (x ^ (x >> _U32(16))) * _U32(0x7FEB352D)
  return x ^ (x >> _U32(15))


def _is_slot(x: Any) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def leaf_positions(tree: Any) -> list[int]:
  """The ``leaf_index`` of each leaf of ``tree``: its position among the params.

  ``optax.multi_transform`` and ``optax.masked`` hand each inner transformation
  the whole tree with the other partitions' leaves replaced by
  ``optax.MaskedNode`` (which has no leaves). Counting those places keeps a
  leaf's index its position in the full params tree, so that leaves of
  different partitions never share random bits (with a plain count, the
  first leaf of every partition was leaf 0, and their rounding errors were
  the same). One entry per leaf of ``jax.tree.flatten(tree, is_leaf=lambda x:
  x is None)``, ``None`` leaves included.
  """
  slots = jax.tree.leaves(tree, is_leaf=_is_slot)
  return [i for i, x in enumerate(slots) if not isinstance(x, optax.MaskedNode)]


def _narrower(x_dtype: Any, dtype: Any) -> bool:
  dtype = jnp.dtype(dtype)
  return (
      jnp.issubdtype(dtype, jnp.floating)
      and jnp.finfo(dtype).nmant < jnp.finfo(x_dtype).nmant
      and jnp.finfo(dtype).nmant < jnp.finfo(jnp.float32).nmant
  )


def stochastic_round(x: jax.Array, dtype: Any, bits: jax.Array) -> jax.Array:
  r"""Rounds ``x`` to ``dtype``, up or down at random, unbiased.

  With :math:`a \le x < b` the neighbours of ``x`` in ``dtype``, the result
  is :math:`b` with probability :math:`(x - a) / (b - a)` and :math:`a`
  otherwise, so :math:`\mathbb{E}[\mathrm{round}(x)] = x`. Finite values
  beyond ``dtype``'s range saturate to its largest finite value; NaN stays
  NaN. For bfloat16 this is the usual bit trick (add 16 random bits below
  the kept ones, truncate); for other narrow floats (float16, float8) the two
  neighbours are found with ``nextafter``.

  Args:
    x: a real float array, float32 or wider.
    dtype: the storage dtype, a float narrower than float32.
    bits: uniform uint32 random bits of ``x``'s shape (see
      :func:`random_bits`).

  Returns:
    ``x`` rounded to ``dtype``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adamfx._core import rounding as _rounding
    >>> x = jnp.full((4096,), 1 + 2.0**-9)  # a quarter of the way to 1 + 2**-7
    >>> y = _rounding.stochastic_round(x, jnp.bfloat16, _rounding.random_bits(x.shape, 1, 0))
    >>> sorted(set(y.astype(float).tolist()))
    [1.0, 1.0078125]
    >>> bool(abs(y.astype(jnp.float32).mean() - x[0]) < 2e-4)
    True
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.dtype(jnp.bfloat16):
    return stochastic_round_float32(x, dtype, bits).astype(dtype)
  big = float(jnp.finfo(dtype).max)
  x = jnp.clip(x.astype(jnp.float32), -big, big)
  near = x.astype(dtype)
  near32 = near.astype(jnp.float32)
  toward = jnp.where(x > near32, jnp.inf, -jnp.inf).astype(dtype)
  other = jnp.nextafter(near, toward)
  gap = other.astype(jnp.float32) - near32
  # Probability of the other neighbour, in [0, 1/2]; 0 where x is exact.
  p = jnp.where(gap != 0, (x - near32) / jnp.where(gap != 0, gap, 1), 0)
  u = (bits >> _U32(8)).astype(jnp.float32) * np.float32(2.0**-24)
  return jnp.where(u < p, other, near)


def stochastic_round_float32(x: jax.Array, dtype: Any, bits: jax.Array) -> jax.Array:
  """:func:`stochastic_round`'s result as float32 (exact: a ``dtype`` number).

  For bfloat16 this skips the convert to bfloat16 and back that a float32
  consumer would otherwise pay (XLA cannot tell that it is exact): the
  bit trick leaves the low 16 bits zero, so the float32 value *is* the
  bfloat16 number (NaN stays NaN).
  """
  dtype = jnp.dtype(dtype)
  if dtype != jnp.dtype(jnp.bfloat16):
    return stochastic_round(x, dtype, bits).astype(jnp.float32)
  big = float(jnp.finfo(dtype).max)
  x = jnp.clip(x.astype(jnp.float32), -big, big)
  xb = jax.lax.bitcast_convert_type(x, _U32)
  yb = (xb + (bits & _U32(0xFFFF))) & _U32(0xFFFF0000)
  y = jax.lax.bitcast_convert_type(yb, jnp.float32)
  return jnp.where(jnp.isnan(x), x, y)


def store_second_moment(
    x: jax.Array, dtype: Any, count: Any, leaf_index: int, index: Any = None
) -> jax.Array:
  """Casts a second moment to its storage dtype without losing increments.

  Where ``dtype`` is a float narrower than float32 (bfloat16, float16), the
  value is stochastically rounded with bits hashed from ``(count,
  leaf_index, element)`` (deterministic; see :func:`random_bits`); else it is
  ``_numerics.saturate``'s clamped cast, which is exact or round-to-nearest.

  Args:
    x: the second moment in the arithmetic dtype.
    dtype: its storage dtype.
    count: the step count of this update.
    leaf_index: the leaf's position in the flattened tree.

  Returns:
    ``x`` in ``dtype``; finite values never become ``inf``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adamfx._core import rounding as _rounding
    >>> nu = jnp.full((1000,), 1.0, jnp.bfloat16)
    >>> (0.999 * nu.astype(jnp.float32)).astype(jnp.bfloat16)[0]  # stalls
    Array(1, dtype=bfloat16)
    >>> stored = _rounding.store_second_moment(
    ...     0.999 * nu.astype(jnp.float32), jnp.bfloat16, jnp.int32(1), 0)
    >>> float(stored.astype(jnp.float32).mean()) < 1.0  # decays on average
    True
  """
  if jnp.iscomplexobj(x) or not _narrower(x.dtype, dtype):
    return _numerics.saturate(x, dtype)
  return stochastic_round(x, dtype, random_bits(x.shape, count, leaf_index, index))
