r"""The 8-bit moments' codes: nearest-code search by one table lookup, decoding by arithmetic.

:func:`adamfx._formats.quant.quantize` stores each element of a block, normalised by
the block's absmax to :math:`a \in [0, 1]`, as the index of the nearest
value of a fixed, sorted table of magnitudes (the dynamic map). A closed-form
search over the map's seven decades costs about 40 float operations an
element, and XLA then repeats it in every loop that reads the codes.
Decoding (:func:`map_value`) is exact arithmetic on the code's bits.

The map's values are spaced like a floating-point number's, at least
:math:`2^{-7}` apart relative to their size, and bfloat16 (a float32 cut to
its top 16 bits) has a relative spacing of at most :math:`2^{-7}` too, finer
than the map's gaps between midpoints. So

1. ``a``'s top 16 bits index a table (16257 entries for :math:`a \le 1`)
   holding the nearest value's index for the bottom of ``a``'s bfloat16
   interval, and
2. one compare of ``a`` with the midpoint above that value moves the index
   up by one where ``a`` is past it. That midpoint, where it lies inside
   ``a``'s bfloat16 interval, shares ``a``'s top 16 bits, so the compare
   reads bottom bits only, and these 16 bits are packed into the same
   table entry (:func:`_packed_table`):

an integer shift, one gather from a 64 KiB table that sits in the L2
cache, a compare and an add. The table is computed in float64 from the map
and checked, when it is built, to give the nearest value of every bfloat16
interval; the result is the index of the nearest float32 midpoint
bracket, with a tie (``a`` equal to a float32 midpoint) rounding down.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_TOP = 0x3F80  # bfloat16 bits of 1.0: every a in [0, 1] has top bits <= this


@functools.lru_cache(maxsize=4)
def _tables(values_bytes: bytes) -> tuple[np.ndarray, np.ndarray]:
  """``(start, upper)`` for the sorted float32 magnitudes in ``values_bytes``.

  ``start[h]``: the index of the value nearest to the bfloat16 number with
  bits ``h`` (ties down, by the float32 midpoints). ``upper[k]``: the float32
  midpoint between values ``k`` and ``k + 1`` (``inf`` after the last).
  """
  values = np.frombuffer(values_bytes, np.float32)
  assert values[0] == 0 and np.all(np.diff(values) > 0)
  upper = np.full(values.shape, np.inf, np.float32)
  upper[:-1] = ((values[:-1].astype(np.float64) + values[1:]) / 2).astype(np.float32)
  low = (np.arange(_TOP + 1, dtype=np.uint32) << 16).view(np.float32)
  start = np.searchsorted(upper, low, side='left').astype(np.int32)
  # The search's premise: at most one midpoint inside each bfloat16 interval
  # [low, next), so that the nearest index of any a in it is start or start + 1.
  nxt = np.append(low[1:], np.float32(np.inf))
  inside = np.searchsorted(upper, nxt, side='left') - start
  assert np.all(inside <= 1), 'a bfloat16 interval holds two midpoints of the map'
  return start, upper


@functools.lru_cache(maxsize=4)
def _packed_table(values_bytes: bytes) -> np.ndarray:
  """``start[h] | threshold[h] << 8``: both halves of the search in one table.

  The midpoint inside the bfloat16 interval ``h`` (if any) shares the
  interval's top 16 bits ``h``, so its bottom 16 bits are all a compare
  with ``a`` (whose top bits are ``h`` too) needs: ``a > upper[start[h]]``
  is ``a``'s bottom bits ``>`` the midpoint's. Without a midpoint inside,
  the threshold is 0xFFFF, which no bottom bits exceed. One gather,
  indexed by ``h``, then replaces a gather of ``start[h]`` and a gather of
  ``upper`` at that index (which had to wait for the first).
  """
  start, upper = _tables(values_bytes)
  low = (np.arange(_TOP + 1, dtype=np.uint32) << 16).view(np.float32)
  nxt = np.append(low[1:], np.float32(np.inf))
  thr = upper[np.minimum(start, len(upper) - 1)]
  inside = (start < len(upper)) & (thr >= low) & (thr < nxt)
  thr_bits = thr.view(np.uint32)
  assert np.all(thr_bits[inside] >> 16 == np.arange(_TOP + 1)[inside])
  thr_low = np.where(inside, thr_bits & 0xFFFF, 0xFFFF).astype(np.int64)
  assert np.all(start < 256)
  return (start.astype(np.int64) | thr_low << 8).astype(np.int32)


def nearest_index(a: jax.Array, values: np.ndarray) -> jax.Array:
  """Index of the nearest of the sorted ``values`` to each ``a`` in [0, 1].

  Args:
    a: float32 array of magnitudes in [0, 1] (normalised by the block's
      absmax; NaN is not expected).
    values: the sorted float32 magnitudes, ``values[0] == 0`` and
      ``values[-1] == 1``, with gaps wide enough for the bfloat16 lookup
      (checked when its tables are built).

  Returns:
    An int32 array of ``a``'s shape: ``k`` with ``upper[k-1] < a <=
    upper[k]`` for the float32 midpoints ``upper`` of ``values``.

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> from adamfx._formats import codec8 as _codec8
    >>> values = np.array([0, 0.1, 0.5, 1], np.float32)
    >>> _codec8.nearest_index(jnp.array([0.0, 0.04, 0.06, 0.31, 0.74, 0.76, 1.0]), values)
    Array([0, 0, 1, 2, 2, 3, 3], dtype=int32)
  """
  packed = _packed_table(np.asarray(values, np.float32).tobytes())
  bits = jax.lax.bitcast_convert_type(a, jnp.int32)
  # t = (threshold - bottom bits) << 8 | start: its low byte is start
  # (two's complement), its sign whether a is past the midpoint. One use of
  # the gather's result, which XLA then keeps inside the encoding loop.
  t = lookup(packed, jnp.minimum(bits >> 16, np.int32(_TOP))) - ((bits & 0xFFFF) << 8)
  return (t & 0xFF) - (t >> 31)


def map_value(codes: jax.Array, signed: bool) -> jax.Array:
  r"""The dynamic map's value of each uint8 code, by arithmetic: no gather.

  The map's magnitudes, past 0 and before 1, are for an exponent
  :math:`e = 0 .. 6` split into :math:`P = 2^{e + u}` parts (:math:`u = 1`
  for the unsigned map, 0 for the signed one), part :math:`i`:

  .. math::

    \Big(\frac{1}{10} + \frac{(2i + 1)\,9}{20 P}\Big)\,10^{e - 6}
      = \frac{N\,2^{-8-u}}{5^{7-e}}, \qquad N = 2P + 18 i + 9,

  an exact float32 numerator (an integer below :math:`2^{10}` times a power
  of two) over an exact float32 integer (at most :math:`5^7`): one IEEE
  division, correctly rounded, as every value of the float32 table
  (:func:`adamfx._formats.quant.dynamic_map`) is -- so the result is the table's
  value bit for bit (tests/test_codec8.py checks all 256 codes of both
  maps). ``t``, the magnitude's rank (``code + 1`` unsigned; ``|code -
  127|`` signed), is :math:`P + i`, so :math:`P` is ``t``'s leading bit.

  XLA's CPU backend emits a gather as a scalar loop and will not repeat it
  in each loop that reads the value, so a table lookup here was written to
  memory (a float32 temporary the size of the leaf) and read back; these
  twenty-odd vector operations fuse into their consumers instead.

  Args:
    codes: uint8 codes (any shape).
    signed: the signed map (first moment) or the unsigned one (second).

  Returns:
    float32 values of ``codes``' shape.
  """
  f32, i32 = jnp.float32, jnp.int32
  c = codes.astype(i32)
  u = 0 if signed else 1
  t = jnp.abs(c - 127) if signed else c + 1
  tf = t.astype(f32)
  tb = jax.lax.bitcast_convert_type(tf, i32)
  p = jax.lax.bitcast_convert_type(tb & np.int32(-(1 << 23)), f32)  # leading bit
  n = p + p + np.float32(18) * (tf - p) + np.float32(9)
  # 7 - e = 7 + u + 127 - (biased exponent of P), in 0 .. 7 where it matters.
  m = np.int32(7 + u + 127) - (tb >> 23)
  five = lambda bit, power: jnp.where(m & bit != 0, np.float32(5.0**power), np.float32(1))
  mag = jax.lax.div(n * np.float32(2.0 ** (-8 - u)), five(1, 1) * five(2, 2) * five(4, 4))
  top = 128 if signed else 256
  mag = jnp.where(t >= top, np.float32(1), jnp.where(t <= u, np.float32(0), mag))
  if signed:
    mag = jnp.where(c < 127, -mag, mag)
  return mag


def lookup(table: np.ndarray, index: jax.Array) -> jax.Array:
  """``table[index]`` for indices known to be in bounds: a plain gather.

  NumPy-style indexing would add a wrap of negative indices (a compare, an
  add and a select per element) that XLA cannot remove.
  """
  # On an Explicit mesh the (unsharded) table's gather takes the index's
  # sharding, which JAX wants spelled out (issue 18).
  sharding = getattr(jax.typeof(index), 'sharding', None)
  mesh = getattr(sharding, 'mesh', None)
  explicit = mesh is not None and not mesh.empty and any(
      t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
  return jnp.asarray(table).at[index].get(
      mode='promise_in_bounds', out_sharding=sharding if explicit else None)


def normalize(xb: jax.Array, absmax: jax.Array) -> jax.Array:
  """``xb / absmax[..., None]`` for blocks ``xb``, as one multiply an element.

  The reciprocal is computed once per block (a division, which XLA keeps
  out of the elementwise loops), and is ``1 / absmax`` rounded, as XLA's
  own rewrite of a division by a broadcast would make it. Above ``2**120``
  ``1 / absmax`` would be subnormal (0 on CPUs): there the absmax is
  first scaled by ``2**-8`` and the product scaled back, exactly. A zero
  absmax (an all-zero block) divides by 1.
  """
  big = absmax > np.float32(2.0**120)
  s = jnp.where(big, np.float32(2.0**-8), np.float32(1))
  r = jax.lax.div(np.float32(1), jnp.where(absmax > 0, absmax, 1) * s)
  return xb * r[..., None] * s[..., None]


def block_max(x: jax.Array) -> jax.Array:
  """``jnp.max(x, axis=-1)`` for ``x >= 0`` (no NaN), as an integer reduction.

  XLA's CPU backend hands a float max over the last axis to a library
  kernel that needs its input materialised -- here the new moments, a
  float32 temporary the size of the leaf, written and read again -- and
  that kernel was most of an 8-bit step's time on a busy 2-core machine.
  Non-negative floats order as their bit patterns do, so the same maximum
  is the int32 maximum of the bits, a reduction XLA emits itself, fused
  with the code computing ``x``.
  """
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  return jax.lax.bitcast_convert_type(jnp.max(bits, axis=-1), x.dtype)

