r"""8-bit blockwise Adam moments (Dettmers et al. 2022), in about 2 bytes/param.

Each large leaf's moments are stored as one uint8 code per element plus one
float32 scale per block of ``block_size`` elements (the block's largest
magnitude, "absmax"): :math:`8 + 32 / 256 = 8.125` bits per moment, so
:math:`2.03` bytes per parameter for Adam's two moments instead of 8.

A code indexes a fixed table of 256 values in [-1, 1] (first moment, signed)
or [0, 1] (second moment, unsigned): the *dynamic* map, whose values are
spaced like a floating-point number with a variable-length exponent, so small
entries of a block keep relative precision (down to ~1e-7 of the block's
absmax) while the largest keep about 2-3 significant digits. A step
dequantizes (code value times block scale), runs the float32 Adam update
(:func:`adamfx._core.driver._moment_step`, the same math as :func:`adamfx.adam`),
and requantizes, all inside the same jitted function: ``mu`` to the nearest
code, ``nu`` (and AMSGrad's ``nu_max``) to one of its two neighbouring codes
at random, unbiased (stochastic rounding, bits hashed from the step count,
the leaf and the element: see :func:`nu_bits`), so that ``nu`` decays by
``b2`` instead of stalling on its code (issue 24).
Leaves smaller than ``min_8bit_size`` (biases, norms) keep float32 moments:
their bytes don't matter, their precision might.

Blocks run along the last axis when its length is a multiple of
``block_size`` (so a leaf sharded on its leading axes quantizes shard by
shard), else along the flattened leaf. Codes have the param's shape (and its
sharding); the state is a plain pytree of arrays (:class:`QuantizedArray`
leaves inside :class:`adamfx.AdamState`), so ``jit``, ``vmap``, sharding and
checkpoints work as for float32 state.
"""

from __future__ import annotations

import functools
import math
from typing import Any
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from adamfx._core import checks as _checks
from adamfx._core import driver as _update
from adamfx._core import numerics as _numerics
from adamfx._formats import codec8 as _codec8


@jax.tree_util.register_pytree_with_keys_class
class QuantizedArray:
  """A moment stored in 8 bits: ``codes`` index the dynamic map, per-block ``scale``.

  A pytree with two children, ``codes`` and ``scale``; ``block_size`` and
  ``signed`` (the configuration that gives the codes their meaning) are static
  auxiliary data, so they survive ``jax.tree`` maps, ``jit``, orbax and
  ``nnx.update``, and two states quantized with different block sizes have
  different tree structures.

  Attributes:
    codes: uint8, the shape of the param: each element's index into the
      256-entry code map (signed for ``mu``, unsigned for ``nu``).
    scale: float32, one per block (the block's absmax): shape
      ``param.shape[:-1] + (param.shape[-1] // block_size,)`` when the last
      axis splits into blocks, else ``(ceil(param.size / block_size),)``.
    block_size: elements per block (static).
    signed: whether the codes index the signed map (``mu``) or the unsigned
      one (``nu``) (static).
  """

  __slots__ = ('codes', 'scale', 'block_size', 'signed')

  def __init__(self, codes: Any, scale: Any, block_size: int = 256, signed: bool = True):
    self.codes = codes
    self.scale = scale
    self.block_size = block_size
    self.signed = signed

  def tree_flatten_with_keys(self):
    keys = jax.tree_util.GetAttrKey
    return (
        ((keys('codes'), self.codes), (keys('scale'), self.scale)),
        (self.block_size, self.signed),
    )

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  def dequantize(self) -> jax.Array:
    """The float32 moment these codes stand for."""
    return dequantize(self, signed=self.signed, block_size=self.block_size)

  def _replace(self, **kwargs: Any) -> QuantizedArray:
    fields = {k: getattr(self, k) for k in self.__slots__}
    return QuantizedArray(**{**fields, **kwargs})

  def __repr__(self) -> str:
    return (
        f'QuantizedArray(codes={self.codes!r}, scale={self.scale!r},'
        f' block_size={self.block_size}, signed={self.signed})'
    )


def dynamic_map(signed: bool) -> np.ndarray:
  """The 256 values of the dynamic code map, sorted, as float32.

  bitsandbytes' ``create_dynamic_map(signed, max_exponent_bits=7,
  total_bits=8)``: for exponents ``e = 0 .. 6`` the midpoints of an even
  split of [0.1, 1] into ``2**e`` parts (signed: each with both signs) or
  ``2**(e + 1)`` parts (unsigned), scaled by ``10**(e - 6)``; plus 0 and 1.

  Args:
    signed: the map for signed values (first moment) or non-negative ones
      (second moment).

  Returns:
    A float32 NumPy array of 256 increasing values in [-1, 1] (signed) or
    [0, 1] (unsigned).

  Examples:
    >>> from adamfx._formats import quant as _quant
    >>> m = _quant.dynamic_map(signed=False)
    >>> m.shape, float(m[0]), float(m[1]), float(m[-1])
    ((256,), 0.0, 3.25e-07, 1.0)
  """
  data = [0.0, 1.0]
  for e in range(7):
    parts = 2**e if signed else 2 ** (e + 1)
    edges = np.linspace(0.1, 1.0, parts + 1)
    means = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6)
    data += means.tolist()
    if signed:
      data += (-means).tolist()
  out = np.sort(np.asarray(data, np.float64)).astype(np.float32)
  assert out.shape == (256,)
  return out


def _layout(shape: tuple[int, ...], block_size: int) -> tuple[tuple[int, ...], int]:
  """The blocked view's shape ``(..., n_blocks, block_size)`` and its padding.

  Padding -1 means the blocks run along the last axis (a pure reshape);
  otherwise the leaf is flattened and padded with that many elements.
  """
  if len(shape) >= 1 and shape[-1] > 0 and shape[-1] % block_size == 0:
    return tuple(shape[:-1]) + (shape[-1] // block_size, block_size), -1
  n = math.prod(shape)
  blocks = max(1, -(-n // block_size))
  return (blocks, block_size), blocks * block_size - n


def scale_shape(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
  """Shape of the per-block scales of a leaf of ``shape``.

  Examples:
    >>> from adamfx._formats import quant as _quant
    >>> _quant.scale_shape((64, 512), 256), _quant.scale_shape((1000, 10), 256)
    ((64, 2), (40,))
  """
  return _layout(tuple(shape), block_size)[0][:-1]


def _to_blocks(x: jax.Array, block_size: int) -> jax.Array:
  view, pad = _layout(x.shape, block_size)
  if pad >= 0:
    x = jnp.pad(x.reshape(-1), (0, pad))
  return x.reshape(view)


def _from_blocks(x: jax.Array, shape: tuple[int, ...], block_size: int) -> jax.Array:
  _, pad = _layout(shape, block_size)
  if pad >= 0:
    return x.reshape(-1)[: math.prod(shape)].reshape(shape)
  return x.reshape(shape)


@functools.lru_cache(maxsize=2)
def _magnitudes(signed: bool) -> np.ndarray:
  """The map's magnitudes, sorted from 0 to 1: what the nearest-code search
  runs over (:func:`adamfx._formats.codec8.nearest_index`). Signed: 0, the 127
  positive values and 1 (a negative element takes its magnitude's mirror)."""
  values = dynamic_map(signed)
  return values[127:] if signed else values


@functools.partial(jax.jit, static_argnames=('signed', 'block_size'))
def quantize(
    x: jax.Array, *, signed: bool, block_size: int = 256, bits: Any = None
) -> QuantizedArray:
  r"""Quantizes ``x`` blockwise to the nearest value of the dynamic map.

  Per block, :math:`s = \max |x_i|` over the block's *finite* elements and
  :math:`c_i = \arg\min_c |x_i / s - \mathrm{map}_c|`. An unsigned (second
  moment) element that is positive never gets the code of 0: its step
  would become :math:`m / \varepsilon`. Non-finite elements get an arbitrary
  code and do not affect the rest of their block (callers replace them
  first; see :func:`scale_by_adam8bit`).

  Args:
    x: a real float array (any shape).
    signed: use the signed map (first moment) or the unsigned one (second
      moment; ``x`` must then be >= 0).
    block_size: elements per block, >= 1.
    bits: optional uniform uint32 bits shaped like the blocked view of ``x``
      (:func:`nu_bits`): an unsigned element then takes the code above or
      below it at random, unbiased (see :func:`_encode`); None: nearest.

  Returns:
    A :class:`QuantizedArray`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adamfx._formats import quant as _quant
    >>> q = _quant.quantize(jnp.array([0.5, -2.0, 0.0, 1e-3]), signed=True)
    >>> q.codes.dtype, q.scale
    (dtype('uint8'), Array([2.], dtype=float32))
    >>> [round(float(v), 5) for v in _quant.dequantize(q, signed=True)]
    [0.49531, -1.98594, 0.0, 0.00099]
  """
  shape = x.shape
  if x.dtype != jnp.float32:
    x = _numerics.saturate(x, jnp.float32)
  xb = _to_blocks(x, block_size)
  finite = jnp.isfinite(xb)
  absmax = _codec8.block_max(jnp.where(finite, jnp.abs(xb), 0))
  xn = jnp.where(finite, _codec8.normalize(xb, absmax), 0)
  return QuantizedArray(_encode(xn, shape, signed, block_size, bits), absmax, block_size, signed)


def _quantize_finite(
    x: jax.Array, *, signed: bool, block_size: int, bits: Any = None
) -> QuantizedArray:
  """:func:`quantize` for a float32 ``x`` known to be finite (no NaN, no inf).

  The block's absmax is then ``max(max x, -min x)``: two plain reductions
  that read ``x`` where it is, with no ``|x|`` (or NaN-free copy) written
  first for them to read (XLA's CPU backend does not fuse the code making
  a reduction's input into the reduction).
  """
  xb = _to_blocks(x, block_size)
  absmax = jnp.maximum(jnp.max(xb, axis=-1), -jnp.min(xb, axis=-1))
  xn = _codec8.normalize(xb, absmax)
  return QuantizedArray(_encode(xn, x.shape, signed, block_size, bits), absmax, block_size, signed)


def nu_bits(shape: tuple[int, ...], block_size: int, count: Any, leaf_index: int,
            salt: int = 1, row0: Any = 0) -> jax.Array:
  """Uniform uint32 bits for stochastically rounding an unsigned moment's codes.

  The 4-bit format's bits (:func:`adamfx._formats.codec4.block_bits`, a hash of
  ``(count, 3 * leaf_index + salt, element)``, ``salt`` 1 for ``nu`` and 2
  for AMSGrad's ``nu_max``), shaped like the blocked view of a leaf of
  ``shape``. The element index is the element's position in the whole leaf
  (block ``row0 + r``, place ``i``: ``(row0 + r) * block_size + i``), so a
  leaf stepped chunk by chunk (``rows`` blocks from ``row0``) draws the bits
  it draws in one piece (a chunk's ``shape`` is its ``(rows, block_size)``).
  """
  from adamfx._formats import codec4 as _codec4  # noqa: PLC0415

  view, _ = _layout(tuple(shape), block_size)
  rows = math.prod(view[:-1])
  bits = _codec4.block_bits(rows, block_size, count, 3 * leaf_index + salt, row0)
  return bits.reshape(view)


def _encode(xn: jax.Array, shape: tuple[int, ...], signed: bool, block_size: int,
            bits: Any = None) -> jax.Array:
  """The codes of blocks ``xn`` normalised to [-1, 1] (see :func:`quantize`).

  With ``bits`` (unsigned map only), an element between map values
  ``lo <= a < hi`` takes ``hi`` with probability ``(a - lo) / (hi - lo)``:
  the stored value is ``a`` in expectation, so a small element of a block
  whose absmax stays large decays as it should instead of stalling at the
  nearest code (issue 24).
  """
  a = jnp.minimum(jnp.abs(xn), 1)
  k = _codec8.nearest_index(a, _magnitudes(signed))
  if bits is not None and not signed:
    from adamfx._formats import codec4 as _codec4  # noqa: PLC0415

    val = lambda c: _codec8.map_value(c.astype(jnp.uint8), False)
    k = jnp.where(val(k) > a, k - 1, k)  # the neighbour below (k >= 0: map[0] = 0)
    lo = val(k)
    hi = val(jnp.minimum(k + 1, 255))
    gap = hi - lo
    p = jnp.where(gap > 0, (a - lo) / jnp.where(gap > 0, gap, 1), 0)
    k = k + (_codec4.uniform(bits) < p).astype(k.dtype)
  if signed:
    idx = jnp.where(xn < 0, 127 - jnp.minimum(k, 127), 127 + k)
  else:
    idx = jnp.where(a > 0, jnp.maximum(k, 1), k)
  return _from_blocks(idx.astype(jnp.uint8), shape, block_size)


@functools.partial(jax.jit, static_argnames=('signed', 'block_size'))
def dequantize(q: QuantizedArray, *, signed: bool, block_size: int = 256) -> jax.Array:
  """The float32 values of a :class:`QuantizedArray`: ``map[codes] * scale``.

  Args:
    q: the quantized array.
    signed: which map ``q`` was quantized with.
    block_size: the block size it was quantized with.

  Returns:
    A float32 array of ``q.codes``' shape.
  """
  shape = q.codes.shape

  def run(codes, scale):
    vals = _codec8.map_value(codes, signed)
    return _from_blocks(_to_blocks(vals, block_size) * scale[..., None], shape, block_size)

  # On Explicit axes the blocked view's layout and the scales' may differ
  # (a leaf blocked as a whole): run under auto_axes, laid out as the codes.
  return _with_auto_axes(run, lambda sh: jax.typeof(q.codes).sharding, q.codes, q.scale)


def _explicit_sharding(x: Any) -> Any:
  """``x``'s sharding if it has Explicit mesh axes (``jax.make_mesh``'s default).

  Blocking reshapes a leaf across its shards, which explicit sharding types
  refuse; the callers then run the blockwise code under
  ``jax.sharding.auto_axes`` and pin the outputs' shardings.
  """
  try:
    sharding = jax.typeof(x).sharding
  except (AttributeError, TypeError):
    return None
  mesh = getattr(sharding, 'mesh', None)
  axis_types = getattr(mesh, 'axis_types', None) or ()
  if not any(t == jax.sharding.AxisType.Explicit for t in axis_types):
    return None
  return sharding


def _scale_sharding(sharding: Any, shape: tuple[int, ...]) -> Any:
  """A per-block array's sharding, from its param's ``sharding``.

  The param's spec where the array has the param's rank and every sharded
  dimension divides (blocks along the last axis: scales ``(..., n_blocks)``,
  4-bit codes with the last axis halved); for blocks along the flattened
  leaf (one axis, in the leaf's row-major order), the spec of the param's
  first axis where the block count divides by its devices (each device then
  holds the blocks of its rows' span); else replicated.
  """
  mesh = sharding.mesh
  spec = tuple(sharding.spec)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  ways = lambda e: math.prod(
      sizes[n] for n in (e if isinstance(e, tuple) else (e,)) if n is not None
  )
  named = lambda *s: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s))
  if len(spec) <= len(shape):
    full = spec + (None,) * (len(shape) - len(spec))
    if all(d % ways(e) == 0 for d, e in zip(shape, full)):
      return named(*full)
  if len(shape) == 1 and spec and shape[0] % ways(spec[0]) == 0:
    return named(spec[0])
  return named()


def _explicit_among(args: Any) -> Any:
  """The first Explicit-axes sharding among the arrays of ``args`` (None if none)."""
  for x in jax.tree.leaves(args):
    sharding = _explicit_sharding(x)
    if sharding is not None:
      return sharding
  return None


def _with_auto_axes(fn: Any, out_shardings: Any, *args: Any) -> Any:
  """``fn(*args)``; on Explicit axes (any of ``args``' arrays, ``args[0]`` first)
  under ``auto_axes``, the outputs pinned to ``out_shardings(sharding)``."""
  sharding = _explicit_among(args)
  if sharding is None:
    return fn(*args)
  mesh = sharding.mesh
  axes = tuple(
      n for n, t in zip(mesh.axis_names, mesh.axis_types)
      if t == jax.sharding.AxisType.Explicit
  )
  return jax.sharding.auto_axes(fn, axes=axes, out_sharding=out_shardings(sharding))(*args)


def _laid_out(x: Any, param: Any) -> Any:
  """``x`` (a concrete per-block array of ``param``) put on ``param``'s layout
  (:func:`_scale_sharding`); traced, or for a param without a mesh sharding,
  ``x`` as it is (under ``jit`` XLA lays it out from ``param``'s zeros)."""
  sharding = getattr(param, 'sharding', None)
  if (isinstance(x, jax.core.Tracer) or isinstance(param, jax.core.Tracer)
      or not isinstance(sharding, jax.sharding.NamedSharding)):
    return x
  want = _scale_sharding(sharding, tuple(x.shape))
  if x.sharding.is_equivalent_to(want, x.ndim):
    return x
  return jax.device_put(x, want)


def _is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedArray)


def _is_leaf(x: Any) -> bool:
  return x is None or isinstance(x, QuantizedArray)


_CHUNK = 1 << 15  # elements per chunk of a large leaf's 8-bit step (at least)
_CHUNK_MAX = 1 << 17  # elements per chunk where the blocks allow (at most)


def _chunks(shape: tuple[int, ...], block_size: int) -> Optional[int]:
  """Blocks per chunk of the 8-bit step for a leaf of ``shape``, or None.

  A chunk holds about ``_CHUNK`` elements (whole blocks, an even split of
  the leaf's blocks); leaves of fewer than four chunks' worth, or whose
  block count splits only into much smaller chunks, run in one piece.

  Where a block is a whole number of vector lanes (``block_size`` a
  multiple of 16), chunks grow to up to ``_CHUNK_MAX`` elements (still at
  least four a leaf; a few float32 temporaries of 512 KiB each, the
  stochastic rounding's bits among them; 128K elements step as fast as
  256K on this CPU and halve them): each trip
  round the loop runs a dozen loops over the chunk, split between the
  cores and joined, and on 2 busy cores a 4M-element leaf's step took
  0.7x-0.8x the time of 32K-element chunks. Blocks are independent and no
  loop then has a scalar tail, so the codes, scales and updates are the
  smaller chunks' to the bit (see tests/test_codec8.py).
  """
  view, _ = _layout(tuple(shape), block_size)
  rows = math.prod(view[:-1])
  want = max(1, _CHUNK // block_size)
  if rows < 4 * want:
    return None
  c = max(d for d in range(1, want + 1) if rows % d == 0)
  if 4 * c < want:
    return None
  if block_size % 16 == 0:
    most = min(_CHUNK_MAX // block_size, rows // 4)
    c = max(d for d in range(c, max(c, most) + 1) if rows % d == 0)
  return c


def _chunked(step, chunk_rows, block_size, g, m, v, count, arrays):
  """``step`` (one 8-bit step on whole blocks) chunk by chunk, in a loop.

  Each chunk's new moments are written to a float32 temporary that the
  absmax reductions, the encoding and the update read back (see
  :func:`_materialized_step`). For a whole large leaf those are two arrays
  of its size, first touched (page faults) and streamed through memory on
  every step; a chunk's fit in the core's cache, and XLA reuses them from
  one iteration to the next. The loop updates the (donated) codes and
  scales in place and the learning rate, when :func:`adam8bit` folds it
  in, is applied inside it. Blocks are independent, so the result is the
  same as one piece's.
  """
  shape = g.shape
  view, _ = _layout(shape, block_size)
  rows = math.prod(view[:-1])
  split = lambda x, last: x.reshape((rows // chunk_rows, chunk_rows) + last)
  xs = (
      split(_to_blocks(g, block_size), (block_size,)),
      split(_to_blocks(m.codes, block_size), (block_size,)), split(m.scale, (1,)),
      split(_to_blocks(v.codes, block_size), (block_size,)), split(v.scale, (1,)),
  )

  gb, mc, ms, vc, vs = xs
  take = lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False)

  def body(i, carry):
    # The codes and scales are updated in place, chunk by chunk: each
    # chunk's old codes are read before its new ones are written. So is
    # the gradient: each chunk's update, in the gradient's dtype (the
    # caller casts to it anyway), overwrites that chunk's gradient, so the
    # step holds no update-sized buffer beside the gradient (issue 20).
    gb, mc, ms, vc, vs = carry
    uc, mq, vq = step(
        take(gb, i), QuantizedArray(take(mc, i), take(ms, i), block_size, True),
        QuantizedArray(take(vc, i), take(vs, i), block_size, False), count, arrays,
        row0=i * chunk_rows)
    put = lambda x, y: jax.lax.dynamic_update_index_in_dim(x, y, i, 0)
    uc = uc.astype(gb.dtype)
    return put(gb, uc), put(mc, mq.codes), put(ms, mq.scale), put(vc, vq.codes), put(vs, vq.scale)

  u, mc, ms, vc, vs = jax.lax.fori_loop(0, rows // chunk_rows, body, (gb, mc, ms, vc, vs))
  back = lambda x: _from_blocks(x.reshape(view), shape, block_size)
  scales = view[:-1]
  return (
      back(u),
      QuantizedArray(back(mc), ms.reshape(scales), block_size, True),
      QuantizedArray(back(vc), vs.reshape(scales), block_size, False),
  )


def _materialized_step(g, m_new, v_new, bad, count, hps, *, nesterov):
  """``(m_new, v_new, update)`` with the new moments computed once, into memory.

  Three loops read each new moment: its block's absmax (a reduction, which
  XLA's CPU backend runs on an array in memory), its encoding, and the
  update. XLA repeats cheap elementwise code in each loop that reads it,
  but writes an *expensive* one's result (a division, say) to memory once.
  Dividing the new moments by a 1 it cannot fold (made from ``count``)
  makes them that: each is written once, as the float32 array the
  reduction needs anyway, and the decoding and the Adam arithmetic run
  once, instead of a decoded copy of the old moments and a second array
  for the reduction being written and read back. ``x / 1`` is ``x``
  exactly (NaN and infinities included). The update is then read off the
  new moments by :func:`adamfx._core.driver._update_from_moments`, the tail of
  the float32 step, so it is that step's arithmetic; where the gradient
  is not finite it is NaN, as there.
  """
  f32 = jnp.float32
  one = jnp.abs(jnp.sign(count | 1)).astype(f32)  # 1, as XLA cannot prove
  m_new = jax.lax.div(m_new, one)
  v_new = jax.lax.div(v_new, one)
  k = _update._leaf_scalars(
      None, f32, count, hps['b1'], hps['b2'], hps['eps'], hps['eps_root'], nesterov)
  big = _numerics.square_safe_limit(f32)
  clipped = jax.lax.clamp(-big, g.astype(f32), big)
  u, _ = _update._update_from_moments(m_new, v_new, clipped, None, k, nesterov=nesterov)
  return m_new, v_new, jnp.where(bad, np.float32(np.nan), u)


_BLOCK_SIZE, _MIN_8BIT_SIZE = 256, 4096  # the defaults (None in the signatures)


def _check_8bit_args(block_size: Any, min_8bit_size: Any) -> tuple[int, int]:
  """``(block_size, min_8bit_size)`` as Python ints, None giving the defaults.

  The signatures default to None, not to the numbers: ``optax.inject_hyperparams``
  turns every number it is given (defaults included) into an array it feeds
  back traced, and these two are structural (they shape the state). A
  concrete integer array (that wrapper's ``init``) is read as its int.
  """
  out = []
  for name, value, default, low in (
      ('block_size', block_size, _BLOCK_SIZE, 1), ('min_8bit_size', min_8bit_size, _MIN_8BIT_SIZE, 0)):
    if value is None:
      value = default
    elif isinstance(value, jax.core.Tracer):
      raise TypeError(
          f'`{name}` must be a Python int, got a traced {value!r}: it sets the state\'s'
          ' shapes, so it cannot be a hyperparameter. With optax.inject_hyperparams pass'
          f" static_args=('{name}',) (or leave it at its default, None), or use"
          ' adamfx.inject_hyperparams, which keeps it static by itself.'
      )
    elif (isinstance(value, (jax.Array, np.ndarray, np.integer)) and np.ndim(value) == 0
          and jnp.issubdtype(np.asarray(value).dtype, jnp.integer)):
      value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      if name == 'block_size':
        raise ValueError(
            f'`block_size` must be a positive int, got {value!r}; 256 (the'
            ' default) costs 0.03 bytes of scales per parameter and moment.'
        )
      raise ValueError(f'`min_8bit_size` must be an int >= 0, got {value!r}.')
    out.append(value)
  return out[0], out[1]


def init_moment(p: Any, signed: bool, block_size: int, min_size: int) -> Any:
  """One leaf's zero moment: a :class:`QuantizedArray` or, for a leaf too small
  (or not real floating), zeros in its compute dtype."""
  dtype = jnp.dtype(getattr(p, 'dtype', None) or jnp.result_type(p))
  shape = tuple(np.shape(p))
  if not (jnp.issubdtype(dtype, jnp.floating) and math.prod(shape) >= max(min_size, 1)):
    return _numerics.zeros_like(p, _numerics.compute_dtype(dtype))
  zeros = _numerics.zeros_like(p, jnp.float32)  # laid out like p
  return QuantizedArray(
      codes=_numerics.zeros_like(p, jnp.uint8),
      # A slice of p's blocked zeros, so that under jit(init) the scales
      # follow p's sharding (plain zeros would land on one device); on
      # Explicit axes and eagerly, pinned to _scale_sharding's layout.
      scale=_laid_out(_with_auto_axes(
          lambda z: _to_blocks(z, block_size)[..., 0],
          lambda sh: _scale_sharding(sh, scale_shape(shape, block_size)),
          zeros,
      ), p),
      block_size=block_size,
      signed=signed,
  )


def leaf_step(
    g: jax.Array,
    m: Any,
    v: Any,
    vm: Any,
    count: jax.Array,
    hps: dict[str, Any],
    *,
    nesterov: bool,
    amsgrad: bool,
    block_size: int,
    step_size: Optional[float] = None,
    leaf_index: int = 0,
) -> tuple[jax.Array, Any, Any, Any, bool]:
  """One leaf of the 8-bit step: ``(update, mu, nu, nu_max, scaled)``.

  ``m``, ``v`` (and AMSGrad's ``vm``) are :class:`QuantizedArray` or, for a
  small leaf, arrays in the compute dtype. ``scaled`` says whether
  ``step_size`` was applied (inside a chunked leaf's loop, float32 only).
  ``nu``'s (and ``nu_max``'s) codes are stochastically rounded with bits
  hashed from ``(count, leaf_index, element)`` (:func:`nu_bits`); ``mu``'s
  are rounded to the nearest.
  """
  step = functools.partial(
      _update._moment_step, count=count, **hps,
      nesterov=nesterov, amsgrad=amsgrad, infinity_norm=False,
  )
  if not _is_quantized(m):
    u, m_new, v_new, vm_new = step(g, m, v, vm)
    vm_new = None if vm is None else _numerics.saturate(vm_new, vm.dtype)
    return u, _numerics.saturate(m_new, m.dtype), _numerics.saturate(v_new, v.dtype), vm_new, False
  # count and array hyperparameters are arguments, not closures: under
  # auto_axes they must carry the function's (auto) mesh types.
  arrays = {k: x for k, x in hps.items() if not isinstance(x, (int, float))}
  if amsgrad:
    return (*_amsgrad_step(g, m, v, vm, count, arrays, hps, nesterov, block_size, leaf_index),
            False)

  def step_blocks(g, m, v, count, arrays, hps=hps, row0=0):
    hps = {**hps, **arrays}
    m_old = dequantize(m, signed=True, block_size=block_size)
    v_old = dequantize(v, signed=False, block_size=block_size)
    u, m_new, v_new, _ = _update._moment_step(
        g, m_old, v_old, None, count=count, **hps,
        nesterov=nesterov, amsgrad=False, infinity_norm=False,
    )
    # A non-finite element keeps its history and stays out of its
    # block's absmax (else one NaN gradient would poison the block).
    # From finite moments, the float32 step's m and v are finite
    # exactly where g is (it clips g below the square's overflow), so
    # this reads g alone: each moment's loops need not recompute the
    # other moment.
    bad = ~jnp.isfinite(g)
    m_new = jnp.where(bad, m_old.astype(m_new.dtype), m_new)
    v_new = jnp.where(bad, v_old.astype(v_new.dtype), v_new)
    bits = nu_bits(g.shape, block_size, count, leaf_index, 1, row0)
    if m_new.dtype != jnp.float32:
      return (
          u,
          quantize(m_new, signed=True, block_size=block_size),
          quantize(v_new, signed=False, block_size=block_size, bits=bits),
      )
    m_new, v_new, u = _materialized_step(
        g, m_new, v_new, bad, count, hps, nesterov=nesterov)
    if step_size is not None and g.dtype == jnp.float32:
      u = step_size * u  # the learning rate, inside the chunk loop
    return (
        u,
        _quantize_finite(m_new, signed=True, block_size=block_size),
        _quantize_finite(v_new, signed=False, block_size=block_size, bits=bits),
    )

  def quantized_step(g, m, v, count, arrays):
    chunks = _chunks(g.shape, block_size)
    if chunks is None or _explicit_sharding(g) is not None:
      return step_blocks(g, m, v, count, arrays)
    return _chunked(step_blocks, chunks, block_size, g, m, v, count, arrays)

  shardings = lambda sh: (
      _scale_sharding(sh, tuple(g.shape)),
      jax.tree.map(lambda a: jax.typeof(a).sharding, m),
      jax.tree.map(lambda a: jax.typeof(a).sharding, v),
  )
  u, m_q, v_q = _with_auto_axes(quantized_step, shardings, g, m, v, count, arrays)
  return u, m_q, v_q, None, step_size is not None and g.dtype == jnp.float32


def _amsgrad_step(g, m, v, vm, count, arrays, hps, nesterov, block_size, leaf_index=0):
  """AMSGrad's 8-bit leaf step: the running maximum ``vm`` is stored like ``nu``.

  Decodes the three moments, runs the float32 AMSGrad step and re-encodes
  them, in one piece (no chunk loop); a non-finite gradient element keeps
  its history, as in :func:`leaf_step`.
  """

  def run(g, m, v, vm, count, arrays):
    hps_all = {**hps, **arrays}
    olds = [dequantize(x, signed=s, block_size=block_size)
            for x, s in ((m, True), (v, False), (vm, False))]
    u, *news = _update._moment_step(
        g, *olds, count=count, **hps_all, nesterov=nesterov, amsgrad=True, infinity_norm=False)
    bad = ~jnp.isfinite(g)
    news = [jnp.where(bad, old.astype(new.dtype), new) for old, new in zip(olds, news)]
    bits = lambda salt: nu_bits(g.shape, block_size, count, leaf_index, salt)
    return (u, *(quantize(x, signed=s, block_size=block_size, bits=b)
                 for x, s, b in zip(news, (True, False, False), (None, bits(1), bits(2)))))

  shardings = lambda sh: (_scale_sharding(sh, tuple(g.shape)), *(jax.tree.map(lambda a: jax.typeof(a).sharding, x)
                                for x in (m, v, vm)))
  return _with_auto_axes(run, shardings, g, m, v, vm, count, arrays)


def _as_quantized(tree: Any, signed: bool, block_size: int, what: str) -> Any:
  """``tree`` with every 8-bit moment a :class:`QuantizedArray` of ``block_size``.

  Flax NNX (``nnx.update``) and other state containers may hand a moment back
  as a mapping with ``'codes'`` and ``'scale'`` entries; it is rebuilt here. A
  moment quantized with another block size (a checkpoint restored into
  another configuration) is refused: its codes would be read against the
  wrong blocks.
  """

  def is_leaf(x):
    return x is None or _is_quantized(x) or _is_code_mapping(x)

  def fix(path, x):
    if x is None:
      return x
    if _is_code_mapping(x):
      codes, scale = _unwrap(x['codes']), _unwrap(x['scale'])
      x = QuantizedArray(codes, scale, block_size, signed)
    if _is_quantized(x):
      if x.block_size != block_size or x.signed != signed:
        raise ValueError(
            f'state.{what} leaf {_checks._leaf_name(path)} was quantized with'
            f' block_size={x.block_size} (signed={x.signed}), but this optimiser'
            f' has block_size={block_size} (signed={signed}): the codes would be'
            ' read against the wrong blocks. Build the optimiser with the'
            ' block_size of the state, or start from a fresh init.'
        )
      _check_scale_shape(path, x, block_size, what)
    return x

  return jax.tree_util.tree_map_with_path(fix, tree, is_leaf=is_leaf)


def _check_scale_shape(path: Any, q: QuantizedArray, block_size: int, what: str) -> None:
  shape = tuple(np.shape(q.codes))
  want = scale_shape(shape, block_size)
  if tuple(np.shape(q.scale)) != want:
    raise ValueError(
        f'state.{what} leaf {_checks._leaf_name(path)}: scale has shape'
        f' {tuple(np.shape(q.scale))}, but codes of shape {shape} in blocks of'
        f' {block_size} need {want}.'
    )


def _unwrap(x: Any) -> Any:
  """An array out of a framework's variable box (``nnx.Variable`` ...), if any."""
  for attr in ('value', 'raw_value'):
    if not hasattr(x, 'shape') and hasattr(x, attr):
      x = getattr(x, attr)
  return x


def _is_code_mapping(x: Any) -> bool:
  try:
    keys = set(x.keys())
  except (AttributeError, TypeError):
    return False
  return keys == {'codes', 'scale'}
