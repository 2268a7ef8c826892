r"""The 4-bit moments' codes: maps, two codes a byte, blockwise (and rank-1) scales.

A moment stored in 4 bits is, per block of ``block_size`` elements, one
float32 scale and a 4-bit code per element that indexes a 16-entry *map*
of values in [-1, 1] (first moment) or (0, 1] (second moment); the stored
value is ``map[code] * scale``. Two codes share a byte: within each block,
element ``i`` of the first half is the low nibble and element ``i`` of the
second half the high nibble of byte ``i`` (:func:`pack`). Both halves are
contiguous runs, so packing and unpacking are a shift, a mask and an
``or`` over whole vector lanes, with no interleaving shuffles.

The maps (all sorted, float32):

* ``'dynamic'`` (signed, first moment): bitsandbytes' dynamic map with 3
  exponent bits and 4 bits in all, the map of torchao's ``AdamW4bit`` and of
  Li et al. (2023): 0, seven magnitudes from 0.0055 to 0.8875 of each sign,
  and 1.
* ``'linear'`` (unsigned, second moment): ``linspace(0, 1, 17)[1:]``, torchao's
  zero-free linear map: ``1/16 .. 1``, so a positive second moment never
  decodes to 0 (``1 / sqrt(0)`` would blow its step up).
* ``'power2'`` (unsigned, second moment): ``2**-15 .. 2**-1, 1``, sixteen
  powers of two; zero-free too, but reaching 3e-5 of the block's largest
  value instead of 1/16, so elements whose gradients are far below their
  block's largest do not have their second moment floored at a sixteenth
  of it (their steps would stall at a quarter of Adam's and less). Coding
  and decoding are exponent-bit arithmetic. Not the default of
  :class:`adamfx.Blockwise4bit`: stochastically rounded, codes whose gaps
  are as wide as their values wander a level or more from the true moment.

Rounding is to the nearest value (ties down) or stochastic: ``x`` between
neighbours ``lo <= x < hi`` becomes ``hi`` with probability ``(x - lo) / (hi
- lo)``, so its expected stored value is ``x`` and a moment that decays by
``b2`` per step does decay (round-to-nearest keeps it on its code forever:
the stall of issue 24). Values outside the map's range clamp to its ends:
a second moment below the smallest value is stored *up* to it (never 0).

Everything here is elementwise arithmetic, compares and selects: no gather
(XLA's CPU backend runs gathers as scalar loops; see :mod:`adamfx._formats.codec8`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_U32 = jnp.uint32
_I32 = jnp.int32
_F32 = jnp.float32

MAPS = ('dynamic', 'linear', 'power2')


@functools.cache
def code_map(name: str) -> np.ndarray:
  """The 16 sorted float32 values of the map ``name`` (see the module docstring).

  Args:
    name: ``'dynamic'`` (signed), ``'linear'`` or ``'power2'`` (unsigned).

  Returns:
    A read-only float32 NumPy array of 16 increasing values.

  Examples:
    >>> from adamfx._formats import codec4 as _codec4
    >>> [round(float(v), 4) for v in _codec4.code_map('dynamic')[6:10]]
    [-0.0055, 0.0, 0.0055, 0.0325]
    >>> float(_codec4.code_map('linear')[0]), float(_codec4.code_map('power2')[0])
    (0.0625, 3.0517578125e-05)
  """
  if name == 'dynamic':
    # create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4):
    # for e = 0, 1, 2 the midpoints of an even split of [0.1, 1] into 2**e
    # parts, times 10**(e - 2), with both signs; plus 0 and 1.
    data = [0.0, 1.0]
    for e in range(3):
      edges = np.linspace(0.1, 1.0, 2**e + 1)
      means = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 2)
      data += means.tolist() + (-means).tolist()
    out = np.sort(np.asarray(data, np.float64)).astype(np.float32)
  elif name == 'linear':
    out = np.linspace(0.0, 1.0, 17, dtype=np.float64)[1:].astype(np.float32)
  elif name == 'power2':
    out = (2.0 ** np.arange(-15, 1, dtype=np.float64)).astype(np.float32)
  else:
    raise ValueError(f'unknown 4-bit code map {name!r}; one of {MAPS}.')
  assert out.shape == (16,) and np.all(np.diff(out) > 0)
  out.setflags(write=False)
  return out


def signed_map(name: str) -> bool:
  """Whether map ``name`` holds negative values (a first-moment map)."""
  return bool(code_map(name)[0] < 0)


# --- packing -----------------------------------------------------------------


def pack(codes: jax.Array) -> jax.Array:
  """Two 4-bit codes a byte: ``(..., n)`` codes in [0, 16) -> ``(..., n // 2)`` uint8.

  Byte ``i`` holds code ``i`` in its low nibble and code ``i + n // 2`` in
  its high nibble (``n`` even; the callers pass whole blocks).

  Examples:
    >>> import jax.numpy as jnp
    >>> from adamfx._formats import codec4 as _codec4
    >>> _codec4.pack(jnp.array([1, 2, 3, 15], jnp.uint8))
    Array([ 49, 242], dtype=uint8)
    >>> _codec4.unpack(_codec4.pack(jnp.array([1, 2, 3, 15], jnp.uint8)))
    Array([ 1,  2,  3, 15], dtype=uint8)
  """
  half = codes.shape[-1] // 2
  c = codes.astype(jnp.uint8)
  return c[..., :half] | (c[..., half:] << np.uint8(4))


def unpack(packed: jax.Array) -> jax.Array:
  """The inverse of :func:`pack`: ``(..., m)`` uint8 -> ``(..., 2 m)`` codes."""
  return jnp.concatenate([packed & np.uint8(15), packed >> np.uint8(4)], axis=-1)


# --- decoding ----------------------------------------------------------------


def decode(codes: jax.Array, name: str) -> jax.Array:
  """``code_map(name)[codes]`` as float32, by arithmetic or a tree of selects.

  Args:
    codes: integer codes in [0, 16) (any shape; uint8 or int32).
    name: the map.

  Returns:
    float32 values of ``codes``' shape, bit for bit the map's.
  """
  c = codes.astype(_I32)
  if name == 'power2':
    # 2**(c - 15): biased exponent c - 15 + 127, no mantissa bits.
    return jax.lax.bitcast_convert_type((c + np.int32(112)) << 23, _F32)
  if name == 'linear':
    return (c + np.int32(1)).astype(_F32) * np.float32(1 / 16)
  values = code_map(name)
  # A binary tree of selects on the code's bits, lowest bit first: 8 + 4 +
  # 2 + 1 selects between constants, all fused into the reader.
  level = [np.float32(v) for v in values]
  for bit in range(4):
    b = (c & np.int32(1 << bit)) != 0
    level = [jnp.where(b, hi, lo) for lo, hi in zip(level[0::2], level[1::2])]
  return level[0]


# --- encoding ----------------------------------------------------------------


def uniform(bits: jax.Array) -> jax.Array:
  """float32 in [0, 1) from uniform uint32 ``bits`` (their top 24 bits)."""
  return (bits >> _U32(8)).astype(_F32) * np.float32(2.0**-24)


def encode(a: jax.Array, name: str, bits: jax.Array | None = None) -> jax.Array:
  """The codes of ``a`` (values normalised by their scale) in the map ``name``.

  Args:
    a: float32, in [-1, 1] for a signed map, [0, 1] for an unsigned one;
      values outside the map's range clamp to its ends. No NaN.
    name: the map.
    bits: uniform uint32 random bits of ``a``'s shape for stochastic
      rounding (see :func:`adamfx._core.rounding.random_bits`), or None for
      round-to-nearest (ties to the lower value).

  Returns:
    int32 codes in [0, 16) of ``a``'s shape.
  """
  values = code_map(name)
  if name == 'power2':
    return _encode_power2(a, bits)
  if name == 'linear':
    t = a * np.float32(16)
    if bits is None:
      # nearest of (k + 1) / 16: ties (t = k + 1/2) go down.
      k = jnp.ceil(t - np.float32(0.5)).astype(_I32) - 1
    else:
      f = jnp.floor(t)
      k = f.astype(_I32) - 1 + (uniform(bits) < t - f).astype(_I32)
    return jnp.clip(k, 0, 15)
  if bits is None:
    mids = (values[:-1].astype(np.float64) + values[1:]) / 2
    mids = mids.astype(np.float32)
    k = jnp.zeros(a.shape, _I32)
    for m in mids:
      k = k + (a > m).astype(_I32)
    return k
  # Stochastic: the lower neighbour's index k (values[k] <= a), its value
  # and the reciprocal of the gap above it, all accumulated over the 15
  # compares with the map's values (no gather).
  k = jnp.zeros(a.shape, _I32)
  lo = jnp.full(a.shape, values[0], _F32)
  gaps = np.diff(values.astype(np.float64))
  inv = (1 / gaps).astype(np.float32)
  r = jnp.full(a.shape, inv[0], _F32)
  for j in range(1, 16):
    ge = a >= values[j]
    k = k + ge.astype(_I32)
    lo = jnp.where(ge, values[j], lo)
    r = jnp.where(ge, inv[j] if j < 15 else np.float32(0), r)
  p = (a - lo) * r  # in [0, 1); <= 0 below the map, 0 at its top
  return k + (uniform(bits) < p).astype(_I32)


def _encode_power2(a: jax.Array, bits: jax.Array | None) -> jax.Array:
  """:func:`encode` for ``'power2'``: the exponent and mantissa of ``a``.

  ``a = 2**e (1 + f)`` lies between the map's ``2**e`` and ``2**(e + 1)``,
  a fraction ``f`` of the way (the mantissa): the code is ``e + 15`` plus
  one where ``f`` is past one half (nearest) or past a uniform draw
  (stochastic). Codes below 0 (``a < 2**-15``, zero included) clamp to 0.
  """
  b = jax.lax.bitcast_convert_type(a, _I32)
  e = (b >> 23) - np.int32(127 - 15)
  mant = b & np.int32((1 << 23) - 1)
  if bits is None:
    up = mant > np.int32(1 << 22)
  else:
    up = (bits >> _U32(9)).astype(_I32) < mant
  return jnp.clip(e + up.astype(_I32), 0, 15)


# --- blockwise -----------------------------------------------------------------


def block_view(shape: tuple[int, ...], block_size: int) -> tuple[tuple[int, ...], int]:
  """The blocked view ``(..., n_blocks, block_size)`` of a leaf and its padding.

  Blocks run along the last axis where its length is a multiple of
  ``block_size`` (padding ``-1``: a reshape, so a leaf sharded on its
  leading axes quantizes shard by shard), else along the flattened leaf,
  padded with that many zeros.
  """
  if len(shape) >= 1 and shape[-1] > 0 and shape[-1] % block_size == 0:
    return tuple(shape[:-1]) + (shape[-1] // block_size, block_size), -1
  n = int(np.prod(shape, dtype=np.int64))
  blocks = max(1, -(-n // block_size))
  return (blocks, block_size), blocks * block_size - n


def codes_shape(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
  """Shape of the packed uint8 codes of a leaf of ``shape``.

  The param's shape with the last axis halved wherever the blocks need no
  padding and that axis is even (blocks along the last axis, or along the
  flattened leaf when its size is a multiple of ``block_size``): the same
  bytes, laid out like the param (so sharded like it, and the param's shape
  can be read back from them). Otherwise ``(n_blocks * block_size // 2,)``.

  Examples:
    >>> from adamfx._formats import codec4 as _codec4
    >>> _codec4.codes_shape((64, 256), 128), _codec4.codes_shape((4, 64), 128)
    ((64, 128), (4, 32))
    >>> _codec4.codes_shape((1000, 10), 128)
    (5056,)
  """
  shape = tuple(shape)
  view, pad = block_view(shape, block_size)
  if pad <= 0 and len(shape) >= 1 and shape[-1] % 2 == 0:
    return shape[:-1] + (shape[-1] // 2,)
  return (view[0] * block_size // 2,)


def shape_from_codes(codes_shape_: tuple[int, ...], block_size: int) -> tuple[int, ...] | None:
  """The param shape whose codes have ``codes_shape_``, where it is unambiguous (else None)."""
  if not codes_shape_:
    return None
  shape = tuple(codes_shape_[:-1]) + (2 * codes_shape_[-1],)
  return shape if codes_shape(shape, block_size) == tuple(codes_shape_) and (
      block_view(shape, block_size)[1] <= 0) else None


def scale_shape(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
  """Shape of the per-block scales of a leaf of ``shape``."""
  return block_view(tuple(shape), block_size)[0][:-1]


def to_blocks(x: jax.Array, block_size: int) -> jax.Array:
  view, pad = block_view(x.shape, block_size)
  if pad >= 0:
    x = jnp.pad(x.reshape(-1), (0, pad))
  return x.reshape(view)


def from_blocks(xb: jax.Array, shape: tuple[int, ...], block_size: int) -> jax.Array:
  _, pad = block_view(tuple(shape), block_size)
  if pad >= 0:
    return xb.reshape(-1)[: int(np.prod(shape, dtype=np.int64))].reshape(shape)
  return xb.reshape(shape)


def packed_blocks(codes: jax.Array, shape: tuple[int, ...], block_size: int) -> jax.Array:
  """Packed codes viewed per block: ``(..., n_blocks, block_size // 2)``."""
  view, _ = block_view(tuple(shape), block_size)
  return codes.reshape(view[:-1] + (block_size // 2,))


def block_scale(xb: jax.Array, signed: bool) -> jax.Array:
  """Each block's scale: its largest element, signed (first moment) or not.

  A signed block's scale is its element of largest magnitude *with its
  sign* (the larger of ``max`` and ``-min``, the positive one on a tie), so
  that element normalises to +1, which the dynamic map holds exactly (it
  has no -1). An unsigned block's scale is its maximum. Non-finite
  elements are the caller's to remove.
  """
  hi = jnp.max(xb, axis=-1)
  if not signed:
    return hi
  lo = jnp.min(xb, axis=-1)
  return jnp.where(hi >= -lo, hi, lo)


def normalize(xb: jax.Array, scale: jax.Array) -> jax.Array:
  """``xb / scale`` per block as one multiply an element (0 for a zero scale).

  The reciprocal is computed once per block. Above ``2**120`` in magnitude
  (where ``1 / scale`` would be subnormal, flushed to 0 on CPUs) the scale
  is first multiplied by ``2**-8`` and the product scaled back, exactly.
  """
  big = jnp.abs(scale) > np.float32(2.0**120)
  s = jnp.where(big, np.float32(2.0**-8), np.float32(1))
  r = jax.lax.div(np.float32(1), jnp.where(scale != 0, scale, 1) * s)
  r = jnp.where(scale != 0, r, 0)
  return xb * r[..., None] * s[..., None]


def quantize(
    x: jax.Array, name: str, block_size: int, bits: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """``(packed codes, scales)`` of a finite float32 ``x`` in blocks of ``block_size``.

  Args:
    x: float32, finite (any shape); ``>= 0`` for an unsigned map.
    name: the map (signed maps take signed scales, see :func:`block_scale`).
    block_size: elements per block, even.
    bits: uniform uint32 bits shaped like the blocked view of ``x`` for
      stochastic rounding, or None for nearest.

  Returns:
    uint8 codes of :func:`codes_shape` and float32 scales of
    :func:`scale_shape`.
  """
  shape = x.shape
  xb = to_blocks(x, block_size)
  scale = block_scale(xb, signed_map(name))
  k = encode(normalize(xb, scale), name, bits)
  return pack(k).reshape(codes_shape(shape, block_size)), scale


def dequantize(
    codes: jax.Array, scale: jax.Array, shape: tuple[int, ...], name: str, block_size: int
) -> jax.Array:
  """The float32 values of packed ``codes`` with per-block ``scale`` (a leaf of ``shape``)."""
  k = unpack(packed_blocks(codes, shape, block_size))
  return from_blocks(decode(k, name) * scale[..., None], shape, block_size)


# --- rank-1 (second moment of a matrix) -----------------------------------------


def rank1_scale(row: jax.Array, col: jax.Array) -> jax.Array:
  """``min(row[i], col[j])`` for each element ``(i, j)``: the rank-1 normaliser."""
  return jnp.minimum(row[:, None], col[None, :])


def quantize_rank1(
    x: jax.Array, name: str, block_size: int, bits: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""``(packed codes, row maxima, column maxima)`` of a matrix ``x >= 0``.

  Li et al. (2023), section 4.2: element :math:`(i, j)` is normalised by
  :math:`\min(\max_k x_{ik}, \max_k x_{kj})`, the smaller of its row's and
  its column's largest value, so an outlier inflates the scale of its own
  row and column only (not its whole block). The codes are packed in
  blocks of ``block_size`` along the rows, as the blockwise layout does.
  """
  row = jnp.max(x, axis=1)
  col = jnp.max(x, axis=0)
  s = rank1_scale(row, col)
  a = x * jnp.where(s > 0, 1 / jnp.where(s > 0, s, 1), 0)
  ab = to_blocks(a, block_size)
  k = encode(ab, name, bits)
  return pack(k).reshape(codes_shape(x.shape, block_size)), row, col


def dequantize_rank1(
    codes: jax.Array, row: jax.Array, col: jax.Array, shape: tuple[int, ...], name: str,
    block_size: int,
) -> jax.Array:
  """The float32 values of rank-1 normalised ``codes`` (see :func:`quantize_rank1`)."""
  k = unpack(packed_blocks(codes, shape, block_size))
  v = from_blocks(decode(k, name), shape, block_size)
  return v * rank1_scale(row, col)


# --- random bits for stochastic rounding -------------------------------------------


def block_bits(rows: int, block_size: int, count: Any, salt: int, row0: Any = 0) -> jax.Array:
  """uint32 bits for ``rows`` blocks starting at block ``row0`` of a leaf.

  :func:`adamfx._core.rounding.random_bits` over the leaf's blocked view
  ``(n_blocks, block_size)`` (element index ``row * block_size + i``),
  restricted to rows ``row0 .. row0 + rows``: a leaf stepped chunk by chunk
  draws the same bits as in one piece.
  """
  from adamfx._core import rounding as _rounding  # noqa: PLC0415

  key = _rounding._mix32(jnp.asarray(count).astype(_U32) ^ _U32(0x9E3779B9))
  key = _rounding._mix32(key + _U32((salt * 0x85EBCA6B + 0x27D4EB2F) % 2**32))
  index = jax.lax.iota(_U32, rows * block_size).reshape(rows, block_size)
  index = index + jnp.asarray(row0).astype(_U32) * _U32(block_size)
  x = index * _U32(0x9E3779B1) + key
  x = (x ^ (x >> _U32(16))) * _U32(0x7FEB352D)
  return x ^ (x >> _U32(15))
