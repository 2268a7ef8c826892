"""Overflow-safe moment arithmetic and dtype helpers.

Adam's second moment holds squared gradients, so it overflows long before the
gradient does: in float16 a single gradient above 256, in float32 one above
~1.8e19. The helpers here keep the arithmetic in at least float32, give the
clip that keeps float32 squares finite, rescale the rare huge elements of
narrower storage by an exact power of two, and saturate what is stored.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_none(x: Any) -> bool:
  """``is_leaf`` for trees whose None leaves count (optax's None updates)."""
  return x is None


def compute_dtype(*dtypes: Any) -> np.dtype:
  """The dtype moment arithmetic runs in: at least float32 (or complex64).

  The promotion of ``dtypes`` with float32 is explicit, so it holds under
  ``jax_numpy_dtype_promotion="strict"`` too.
  """
  with jax.numpy_dtype_promotion('standard'):
    dtype = functools.reduce(jnp.promote_types, dtypes, jnp.dtype(jnp.float32))
  return jnp.dtype(dtype)


def real_dtype(dtype: Any) -> np.dtype:
  """float32 for complex64, float64 for complex128, else ``dtype`` itself."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return jnp.finfo(dtype).dtype
  return dtype


def saturate(x: jax.Array, dtype: Any) -> jax.Array:
  """Casts ``x`` to ``dtype``, clamping finite values to its finite range.

  NaN stays NaN (a non-finite gradient is the caller's to handle, e.g. with
  ``optax.apply_if_finite``); a finite value never becomes ``inf``.
  """
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    return x.astype(dtype)
  big = min(float(jnp.finfo(dtype).max), float(jnp.finfo(x.dtype).max))
  return jnp.clip(x, -big, big).astype(dtype)


def keep_positive(stored: jax.Array, x: jax.Array) -> jax.Array:
  """``stored`` (``x`` cast to a storage dtype), never 0 where ``x > 0``.

  A second moment that underflows its storage dtype (float16: below 3e-8)
  would read back as 0 while the first moment is not, and the next step would
  be ``m_hat / eps``. Such elements are stored as the smallest positive value
  instead: the smallest subnormal where float32 arithmetic reads it as
  nonzero (float16), else the smallest normal number.
  """
  if jnp.issubdtype(stored.dtype, jnp.complexfloating):
    return stored
  if stored.dtype == x.dtype:  # no cast, so nothing underflowed: no work
    return stored
  info = jnp.finfo(stored.dtype)
  tiny = float(info.smallest_subnormal)
  if tiny < float(jnp.finfo(jnp.float32).tiny):
    tiny = float(info.tiny)  # CPUs may flush float32 subnormals to zero
  floor = jnp.asarray(tiny, stored.dtype)
  return jnp.where((stored == 0) & (jnp.real(x) > 0), floor, stored)


def fit_exponent(x: jax.Array, limit: Any) -> jax.Array:
  """A power of two ``c`` with ``c**2 * x <= limit``, for ``x > limit > 0``.

  Computed from the exponents alone (no sqrt, no division), so it is exact
  and cheap on the hot path; where ``x <= limit`` the value is unused.
  """
  _, ex = jnp.frexp(x)
  _, el = jnp.frexp(jnp.asarray(limit, x.dtype))
  k = jnp.maximum(ex - el + 2, 0) // 2
  # 2**-k built from its bits, as two normal factors (exact, subnormal
  # results included), not with jnp.ldexp: XLA treats ldexp's pow as
  # expensive and materialises it as an extra full-size pass and buffer.
  info = jnp.finfo(x.dtype)
  if info.bits not in (32, 64):  # the arithmetic dtypes are float32/64
    return jnp.ldexp(jnp.ones_like(x), -k)
  int_dtype = jnp.int64 if info.bits == 64 else jnp.int32
  k = jnp.minimum(k, 2 * (info.maxexp - 2)).astype(int_dtype)
  half = k // 2

  def power(n):  # 2**-n for 0 <= n <= maxexp - 2: a normal number
    biased = (jnp.asarray(info.maxexp - 1, int_dtype) - n) << info.nmant
    return jax.lax.bitcast_convert_type(biased, x.dtype)

  return power(half) * power(k - half)


def square_safe_limit(dtype: Any) -> np.ndarray:
  """``2**(e/2 - 1)`` in ``dtype``, ``e`` its maximum exponent: ``2**63`` for float32.

  A gradient clipped to ``±`` this has a square below a quarter of the
  dtype's largest value, so squares, and averages of squares, cannot
  overflow.
  """
  return np.asarray(2.0 ** (jnp.finfo(dtype).maxexp // 2 - 1), dtype)


def huge_thresholds(dtype: Any) -> tuple[float, float, float]:
  """Thresholds of the rescaled path of the moment update, for ``dtype``.

  Returns ``(g_max, v_max, scale)``: an element whose |gradient| exceeds
  ``g_max`` or whose second moment exceeds ``v_max`` would overflow when
  squared or bias-corrected, and is computed instead on values multiplied by
  ``scale`` (``v`` by ``scale**2``). The scale is an exact power of two, so
  the rescaled path is exact wherever it does not underflow.
  """
  half = jnp.finfo(dtype).maxexp // 2
  return 2.0 ** (half - 4), 2.0 ** (2 * half - 8), 2.0 ** -(half + 2)


def zeros_like(x: Any, dtype: Any = None) -> jax.Array:
  """Zeros shaped like ``x`` (an array, tracer or ``jax.ShapeDtypeStruct``).

  Keeps ``x``'s sharding, so optimiser state is laid out like the params it
  mirrors. Eagerly, the zeros are created with ``x``'s sharding. Under a
  trace (``jax.jit(tx.init)``) the sharding of an input is not known yet, and
  plain zeros would depend on no input: jit prunes the unused params and
  computes the state on device 0, whatever the params' layout (optax issue
  548). So there the zeros are an elementwise function of ``x`` (a select
  whose two branches are 0, exact for inf/NaN too), and XLA's sharding
  propagation gives them ``x``'s sharding.
  """
  dtype = x.dtype if dtype is None else dtype
  sharding = getattr(x, 'sharding', None)
  if isinstance(x, jax.ShapeDtypeStruct):
    if sharding is not None:
      return jnp.zeros(x.shape, dtype, device=sharding)
    return jnp.zeros(x.shape, dtype)
  if isinstance(x, jax.core.Tracer):
    zero = jnp.zeros((), dtype)
    return jnp.where(x == x, zero, zero)
  return jnp.zeros_like(x, dtype=dtype)
