r"""4-bit blockwise Adam moments (Li et al. 2023): about 1.06 bytes/param for both.

:class:`Blockwise4bit` is a storage format for the ``moments=`` argument of
the Adam builders. Each large leaf's moment is kept as 4-bit codes, two a
byte, and one float32 scale per block of ``block_size`` elements:
:math:`4 + 32 / 128 = 4.25` bits per moment, :math:`1.0625` bytes per
parameter for ``mu`` and ``nu`` together (8-bit: 2.03, float32: 8). The
codes and maps are :mod:`adamfx._formats.codec4`'s.

A step decodes the moments to float32, runs Adam's float32 arithmetic and
encodes the new moments, inside the same jitted function: only what is
kept between steps changes. Leaves smaller than ``min_size`` (biases,
norms) keep float32 moments, as with 8-bit.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adamfx._core import checks as _checks
from adamfx._core import driver as _update
from adamfx._core import numerics as _numerics
from adamfx._formats import codec4 as _codec4
from adamfx._formats import quant as _quant

# Recorded with every checkpoint that holds 4-bit moments (with the maps and
# block size): a change of what the codes mean changes this.
CODE_FORMAT = 'adamfx-4bit-v1'


@jax.tree_util.register_pytree_with_keys_class
class Quantized4bit:
  """A moment stored in 4 bits: packed ``codes`` and per-block ``scale``.

  A pytree with the children ``codes`` and ``scale`` (and ``col`` for a
  rank-1 normalised second moment); the configuration that gives the codes
  their meaning (``shape``, ``block_size``, ``code_map``, ``rank1``) is
  static auxiliary data, so it survives ``jax.tree`` maps, ``jit``, orbax and
  ``nnx.update``, and states of different configurations have different tree
  structures.

  Attributes:
    codes: uint8, two codes a byte (``adamfx._formats.codec4.pack``); the
      param's shape with the last axis halved when blocks run along it,
      else one axis of ``n_blocks * block_size // 2``.
    scale: float32, one per block (blockwise; the block's largest element,
      signed for ``mu``), or the row maxima of a rank-1 normalised matrix.
    col: the column maxima (rank-1 only), else None.
    shape: the param's shape (static).
    block_size: elements per block (static).
    code_map: the name of the 16-value map (static; see
      ``adamfx._formats.codec4.code_map``).
    rank1: whether ``scale`` and ``col`` are a rank-1 normaliser (static).
  """

  __slots__ = ('codes', 'scale', 'col', 'shape', 'block_size', 'code_map', 'rank1')

  def __init__(self, codes, scale, col=None, shape=(), block_size=128, code_map='dynamic',
               rank1=False):
    self.codes = codes
    self.scale = scale
    self.col = col
    self.shape = tuple(shape)
    self.block_size = block_size
    self.code_map = code_map
    self.rank1 = rank1

  def tree_flatten_with_keys(self):
    keys = jax.tree_util.GetAttrKey
    children = [(keys('codes'), self.codes), (keys('scale'), self.scale)]
    if self.rank1:
      children.append((keys('col'), self.col))
    return tuple(children), (self.shape, self.block_size, self.code_map, self.rank1)

  @classmethod
  def tree_unflatten(cls, aux, children):
    shape, block_size, code_map, rank1 = aux
    codes, scale, *col = children
    return cls(codes, scale, col[0] if col else None, shape, block_size, code_map, rank1)

  @property
  def signed(self) -> bool:
    return _codec4.signed_map(self.code_map)

  def dequantize(self) -> jax.Array:
    """The float32 moment these codes stand for, shaped like its param."""
    if self.rank1:
      return _codec4.dequantize_rank1(self.codes, self.scale, self.col, self.shape,
                                      self.code_map, self.block_size)
    return _codec4.dequantize(self.codes, self.scale, self.shape, self.code_map,
                              self.block_size)

  def config(self) -> dict[str, Any]:
    """What gives the codes their meaning, as checkpoints record it."""
    return {'format': CODE_FORMAT, 'block_size': self.block_size, 'code_map': self.code_map,
            'rank1': bool(self.rank1)}

  def __repr__(self) -> str:
    col = f', col={self.col!r}' if self.rank1 else ''
    return (f'Quantized4bit(codes={self.codes!r}, scale={self.scale!r}{col},'
            f' shape={self.shape}, block_size={self.block_size},'
            f' code_map={self.code_map!r}, rank1={self.rank1})')


def _check_int(name: str, value: Any, low: int, what: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f'`{name}` must be an int >= {low}{what}, got {value!r}.')


@dataclasses.dataclass(frozen=True)
class Blockwise4bit:
  r"""Adam's moments in 4 bits per element: a storage format for ``moments=``.

  Per large leaf, each moment is stored as 4-bit codes (two a byte) of a
  16-value map and one float32 scale per block of ``block_size`` elements
  of the leaf (along its last axis when that divides, else along the
  flattened leaf):

  .. math::

    \mathrm{deq}(c)_i = \mathrm{map}_{c_i}\, s_B, \qquad
    c_i = \mathrm{round}(x_i / s_B) \text{ to the map},

  with :math:`s_B` the largest element of element :math:`i`'s block
  :math:`B` (for ``mu``, the element of largest magnitude with its sign).

  * ``mu`` uses ``mu_map='dynamic'``, the signed dynamic map of torchao's
    ``AdamW4bit`` and Li et al.;
  * ``nu`` uses ``nu_map='linear'`` (default), torchao's zero-free
    ``linspace(0, 1, 17)[1:]``: a positive second moment never decodes to 0
    (its step would exceed Adam's bound), but it is floored at a sixteenth
    of its block's largest, so elements whose gradients stay ~4x or more
    below their block's largest take steps smaller than Adam's (``rank1``
    confines that to an outlier's row and column). ``'power2'`` (the powers
    of two from :math:`2^{-15}` to 1) reaches 3e-5 of the block's largest,
    but its stochastically rounded codes wander a level or more away from
    the true second moment (gaps as wide as the values), and the steps of
    small elements came out 1.2x-3x Adam's in the stall test of issue 24
    (``'linear'``: 0.99x-1.2x of the true ``nu`` until its floor); it is
    kept as an option, not the default.
  * ``rank1=True``: the second moment of 2-D leaves (whose rows split into
    blocks) is normalised by :math:`\min(\max_k \nu_{ik}, \max_k \nu_{kj})`
    instead of its block's largest (Li et al. 2023, section 4.2): an outlier
    then inflates only its own row's and column's scale.
  * ``rounding='stochastic'`` (default): the codes are rounded up or down at
    random, unbiased (bits hashed from the step count, the leaf and the
    element, so a step is deterministic), so small changes of a moment --
    the second moment's decay by ``b2`` -- accumulate instead of being
    rounded away each step (the stall of round-to-nearest). ``'nearest'``
    rounds to the nearest value, as torchao does.

  Bytes: :math:`2 (4 + 32 / \mathrm{block\_size}) / 8` per parameter for
  both moments, 1.0625 at the default block of 128 (``nbytes``).

  Attributes:
    block_size: elements per block (one float32 scale each), even, >= 2;
      default 128 (Li et al.: moments have outlier patterns that larger
      blocks miss).
    min_size: leaves with fewer elements keep float32 moments; default
      4096, as 8-bit.
    mu_map: the first moment's map: ``'dynamic'``.
    nu_map: the second moment's map: ``'linear'`` or ``'power2'``.
    rank1: rank-1 normalisation of 2-D leaves' second moment.
    rounding: ``'stochastic'`` or ``'nearest'``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adamfx
    >>> fmt = adamfx.Blockwise4bit()
    >>> p = jnp.zeros((64, 256))
    >>> fmt.applies(p), fmt.nbytes(p) / p.size
    (True, 0.53125)
    >>> stored = fmt.encode(jnp.linspace(-1, 1, p.size).reshape(p.shape), True,
    ...                     count=jnp.int32(1), leaf_index=0)
    >>> stored.codes.shape, stored.scale.shape
    ((64, 128), (64, 2))
    >>> fmt.decode(stored, True).shape
    (64, 256)

  References:
    Li, Chen & Zhu, `Memory Efficient Optimizers with 4-bit States
    <https://arxiv.org/abs/2309.01507>`_, NeurIPS 2023.
  """

  block_size: int = 128
  min_size: int = 4096
  mu_map: str = 'dynamic'
  nu_map: str = 'linear'
  rank1: bool = False
  rounding: str = 'stochastic'

  def __post_init__(self):
    _check_int('block_size', self.block_size, 2, ' and even')
    if self.block_size % 2:
      raise ValueError(f'`block_size` must be an even int >= 2 (two codes a byte), got'
                       f' {self.block_size!r}.')
    _check_int('min_size', self.min_size, 0, '')
    if self.mu_map not in _codec4.MAPS or not _codec4.signed_map(self.mu_map):
      raise ValueError(f"`mu_map` must be 'dynamic' (a signed map), got {self.mu_map!r}.")
    if self.nu_map not in _codec4.MAPS or _codec4.signed_map(self.nu_map):
      raise ValueError(
          f"`nu_map` must be 'linear' or 'power2' (zero-free maps), got {self.nu_map!r}.")
    if not isinstance(self.rank1, bool):
      raise ValueError(f'`rank1` must be a bool, got {self.rank1!r}.')
    if self.rounding not in ('stochastic', 'nearest'):
      raise ValueError(
          f"`rounding` must be 'stochastic' or 'nearest', got {self.rounding!r}.")

  # --- the protocol ------------------------------------------------------------

  def applies(self, param: Any) -> bool:
    """Whether ``param``'s moments are stored in 4 bits (else float32)."""
    dtype = jnp.dtype(getattr(param, 'dtype', None) or jnp.result_type(param))
    size = math.prod(np.shape(param))
    return bool(jnp.issubdtype(dtype, jnp.floating) and size >= max(self.min_size, 1))

  def _rank1(self, shape: tuple[int, ...], signed: bool) -> bool:
    return (self.rank1 and not signed and len(shape) == 2
            and shape[-1] % self.block_size == 0 and shape[0] > 0)

  def _map(self, signed: bool) -> str:
    return self.mu_map if signed else self.nu_map

  def init(self, param: Any, signed: bool) -> Any:
    """Zero moments for ``param`` (an array or a ``jax.ShapeDtypeStruct``).

    A :class:`Quantized4bit` where :meth:`applies`, else zeros in the
    param's compute dtype. The codes and scales are built from ``param``'s
    float32 zeros, so under ``jit(init)`` they follow its sharding where
    their shapes allow.
    """
    if not self.applies(param):
      dtype = jnp.dtype(getattr(param, 'dtype', None) or jnp.result_type(param))
      return _numerics.zeros_like(param, _numerics.compute_dtype(dtype))
    shape = tuple(np.shape(param))
    zeros = _numerics.zeros_like(param, jnp.float32)
    bs = self.block_size
    # Slices of p's (blocked) zeros, so that under jit(init) the codes and
    # scales follow p's sharding (plain zeros would land on one device); on
    # Explicit axes the blocking runs under auto_axes, pinned to the
    # per-block sharding (_quant._scale_sharding); eagerly each array is
    # put where that sharding says.
    blocked = lambda part, out_shape: _quant._laid_out(_quant._with_auto_axes(
        part, lambda sh: _quant._scale_sharding(sh, out_shape), zeros), param)
    if self._rank1(shape, signed):
      return Quantized4bit(
          blocked(_half_last, shape[:-1] + (shape[-1] // 2,)),
          blocked(lambda z: jax.lax.index_in_dim(z, 0, 1, keepdims=False), shape[:1]),
          _quant._laid_out(_quant._with_auto_axes(
              lambda z: jax.lax.index_in_dim(z, 0, 0, keepdims=False),
              lambda sh: _quant._scale_sharding(_drop_first(sh), shape[1:]), zeros),
              types.SimpleNamespace(sharding=_drop_first(getattr(param, 'sharding', None)))),
          shape, bs, self._map(signed), True)
    cshape = _codec4.codes_shape(shape, bs)
    if cshape == shape[:-1] + (shape[-1] // 2,):
      codes = blocked(_half_last, cshape)
    else:
      codes = blocked(
          lambda z: _half_last(_codec4.to_blocks(z, bs)).reshape(cshape), cshape)
    sshape = _codec4.scale_shape(shape, bs)
    scale = blocked(lambda z: _codec4.to_blocks(z, bs)[..., 0], sshape)
    return Quantized4bit(codes, scale, None, shape, bs, self._map(signed), False)

  def _bits(self, rows: int, count: Any, leaf_index: int, signed: bool, row0: Any = 0,
            moment: int | None = None):
    if self.rounding != 'stochastic':
      return None
    # mu, nu and AMSGrad's nu_max of one leaf draw independent bits: salt
    # 3 * leaf + 0, 1, 2 (``moment``; by default 0 for a signed moment, 1 else).
    if moment is None:
      moment = 0 if signed else 1
    salt = 3 * leaf_index + moment
    return _codec4.block_bits(rows, self.block_size, count, salt, row0)

  def encode(self, x: jax.Array, signed: bool, *, count: Any, leaf_index: int,
             like: Any = None) -> Any:
    """``x`` (float32, the param's shape) stored as ``like`` is (4-bit or not).

    Non-finite elements are stored as 0 and stay out of their block's scale
    (the core keeps the previous moments of a non-finite gradient).
    """
    return self._encode(x, signed, count=count, leaf_index=leaf_index, like=like)

  def _encode(self, x: jax.Array, signed: bool, *, count: Any, leaf_index: int,
              like: Any = None, moment: int | None = None) -> Any:
    """:meth:`encode`; ``moment`` 2 draws AMSGrad's ``nu_max`` bits (see :meth:`_bits`)."""
    if like is not None and not self.is_stored(like):
      return _numerics.saturate(x, like.dtype)
    x = x.astype(jnp.float32)
    x = jnp.where(jnp.isfinite(x), x, 0)
    shape, bs = tuple(x.shape), self.block_size
    name = self._map(signed)
    view, _ = _codec4.block_view(shape, bs)
    bits = self._bits(math.prod(view[:-1]), count, leaf_index, signed, moment=moment)
    if bits is not None:
      bits = bits.reshape(view)
    if self._rank1(shape, signed):
      codes, row, col = _codec4.quantize_rank1(x, name, bs, bits)
      return Quantized4bit(codes, row, col, shape, bs, name, True)
    codes, scale = _codec4.quantize(x, name, bs, bits)
    return Quantized4bit(codes, scale, None, shape, bs, name, False)

  def decode(self, stored: Any, signed: bool) -> jax.Array:
    """The float32 moment of ``stored``, shaped like its param (arrays pass through)."""
    del signed  # the map is recorded in stored
    return stored.dequantize() if self.is_stored(stored) else stored

  def config(self) -> dict[str, Any]:
    """The configuration checkpoints record: restoring into another one is refused."""
    return {'format': 'Blockwise4bit', 'code_format': CODE_FORMAT,
            **dataclasses.asdict(self)}

  def nbytes(self, param: Any) -> int:
    """Bytes of one moment of ``param`` (codes and scales; float32 if not quantized)."""
    shape = tuple(np.shape(param))
    if not self.applies(param):
      dtype = jnp.dtype(getattr(param, 'dtype', None) or jnp.result_type(param))
      return math.prod(shape) * np.dtype(_numerics.compute_dtype(dtype)).itemsize
    codes = math.prod(_codec4.codes_shape(shape, self.block_size))
    return codes + 4 * math.prod(_codec4.scale_shape(shape, self.block_size))

  def is_stored(self, x: Any) -> bool:
    """Whether ``x`` is one 4-bit moment (a pytree node of the state)."""
    return isinstance(x, Quantized4bit)

  def param_like(self, stored: Any) -> Any:
    """Something shaped like the param ``stored`` belongs to."""
    if self.is_stored(stored):
      return jax.ShapeDtypeStruct(stored.shape, jnp.float32)
    return stored

  def prepare(self, tree: Any, signed: bool, what: str) -> Any:
    """Moments handed back by a container (Flax NNX mappings) as :class:`Quantized4bit`.

    A moment stored with another configuration (a checkpoint restored into
    another format) is refused: its codes would be read with the wrong map
    or blocks.
    """
    name = self._map(signed)

    def fix(path, x):
      if _is_code_mapping(x):
        x = self._from_mapping(path, x, signed, what)
      if not self.is_stored(x):
        return x
      rank1 = self._rank1(x.shape, signed)
      if (x.block_size, x.code_map, bool(x.rank1)) != (self.block_size, name, rank1):
        raise ValueError(
            f'state.{what} leaf {_checks._leaf_name(path)} was stored with'
            f' block_size={x.block_size}, code_map={x.code_map!r}, rank1={x.rank1}, but'
            f' this optimiser has {self!r} (block_size={self.block_size},'
            f' code_map={name!r}, rank1={rank1}): the codes would be read wrongly.'
            ' Build the optimiser with the format of the state, or start from a'
            ' fresh init.'
        )
      want = _codec4.codes_shape(x.shape, x.block_size)
      if tuple(np.shape(x.codes)) != want:
        raise ValueError(
            f'state.{what} leaf {_checks._leaf_name(path)}: codes have shape'
            f' {tuple(np.shape(x.codes))}, but a param of shape {x.shape} in blocks of'
            f' {x.block_size} needs {want}.'
        )
      return x

    is_leaf = lambda x: x is None or self.is_stored(x) or _is_code_mapping(x)
    return jax.tree_util.tree_map_with_path(fix, tree, is_leaf=is_leaf)

  def _from_mapping(self, path: Any, x: Any, signed: bool, what: str) -> Quantized4bit:
    """A :class:`Quantized4bit` rebuilt from a container's ``{'codes', 'scale'[, 'col']}``.

    Containers that keep arrays but not the pytree's static data (Flax NNX's
    ``nnx.Optimizer`` hands state nodes back as mappings) lose the param's
    shape; it is read back from the codes' shape, which holds it wherever a
    leaf's blocks need no padding (see :func:`adamfx._formats.codec4.codes_shape`).
    """
    codes, scale = _quant._unwrap(x['codes']), _quant._unwrap(x['scale'])
    shape = _codec4.shape_from_codes(tuple(np.shape(codes)), self.block_size)
    if shape is None:
      raise ValueError(
          f'state.{what} leaf {_checks._leaf_name(path)} came back as a mapping of'
          f' arrays (codes of shape {tuple(np.shape(codes))}) without the param\'s shape,'
          f' which a leaf whose blocks are padded does not record in its codes. Use a'
          f' block_size dividing the leaf\'s size, a min_size above it, or keep the'
          ' state as returned by the optimiser.'
      )
    col = _quant._unwrap(x['col']) if 'col' in x else None
    return Quantized4bit(codes, scale, col, shape, self.block_size, self._map(signed),
                         col is not None)

  # --- lazy Adam: rows of an embedding table -------------------------------------

  def gather_rows(self, stored: Any, ids: Any, take: Any = None) -> Any:
    """Rows ``ids`` of a stored moment (ids out of range read zeros), for lazy Adam;
    ``take(array, ids)``, if given, is the caller's row gather (mesh-aware).

    A 4-bit table's blocks must lie within its rows (the last axis a
    multiple of ``block_size``), so that a row's codes and scales are its
    own; a rank-1 normalised moment is refused (its column maxima span every
    row).
    """
    get = ((lambda x: take(x, ids)) if take is not None else
           (lambda x: x.at[ids].get(mode='fill', fill_value=0)))
    if not self.is_stored(stored):
      return get(stored)
    shape = stored.shape
    if len(shape) < 2 or shape[-1] % self.block_size or stored.rank1:
      why = ('rank1=True normalises by column maxima over every row' if stored.rank1 else
             f'its rows are not whole blocks (last axis a multiple of block_size='
             f'{self.block_size})')
      raise ValueError(
          f'Lazy Adam with moments={self!r} cannot update rows of a leaf of shape {shape}:'
          f' {why}. Pass Blockwise4bit(block_size=b) with b dividing'
          f' {shape[-1] if shape else 1} (and rank1=False).'
      )
    rows = (int(np.shape(ids)[0]),) + tuple(shape[1:])
    return Quantized4bit(get(stored.codes), get(stored.scale), None, rows, stored.block_size,
                         stored.code_map, False)

  def scatter_rows(self, stored: Any, ids: Any, rows: Any, put_rows: Any = None) -> Any:
    """``stored`` with rows ``ids`` set to ``rows`` (ids out of range dropped);
    ``put_rows(array, ids, values)``, if given, is the caller's row scatter."""
    put = ((lambda x, r: put_rows(x, ids, r)) if put_rows is not None else
           (lambda x, r: x.at[ids].set(r, mode='drop')))
    if not self.is_stored(stored):
      return put(stored, rows)
    return Quantized4bit(put(stored.codes, rows.codes), put(stored.scale, rows.scale), None,
                         stored.shape, stored.block_size, stored.code_map, False)

  # --- the fused step ------------------------------------------------------------

  def step(self, g, m, v, vm, leaf_index, math_):
    """One leaf's step: ``(update, mu, nu, nu_max, scaled)``.

    Quantized leaves without AMSGrad run :func:`_fused_step`: the moments
    decoded, Adam's float32 arithmetic, the new moments encoded, chunk by
    chunk of whole blocks for large leaves (so the float32 temporaries stay
    in cache; blocks are independent and the random bits are indexed by the
    element, so chunks give the one-piece result bit for bit). Other leaves
    decode, step and encode (``scaled`` False: the core applies the
    learning rate).
    """
    if not self.is_stored(m) or vm is not None or m.rank1 or v.rank1:
      return _generic_step(self, g, m, v, vm, leaf_index, math_)
    return _fused_step(self, g, m, v, leaf_index, math_)


def _generic_step(fmt, g, m, v, vm, leaf_index, math_):
  """Decode, the core's math, encode (a non-finite gradient keeps its history).

  On Explicit axes the blocking reshapes run under ``auto_axes``, the
  update and the stored moments pinned to the layouts they had."""
  count = math_.count
  arrays = {k: x for k, x in math_.hps.items() if not isinstance(x, (int, float))}

  def run(g, m, v, vm, count, arrays):
    mth = math_._replace(count=count, hps={**math_.hps, **arrays}, scalars={})
    olds = [fmt.decode(m, True), fmt.decode(v, False)]
    if vm is not None:
      olds.append(fmt.decode(vm, False))
    u, *news = mth(g, olds[0], olds[1], olds[2] if vm is not None else None)
    bad = ~jnp.isfinite(g)
    stored = []
    for moment, (old, new, like, signed) in enumerate(
        zip(olds, news, (m, v, vm), (True, False, False))):
      new = jnp.where(bad, old.astype(new.dtype), new)
      stored.append(fmt._encode(new, signed, count=count, leaf_index=leaf_index, like=like,
                                moment=moment))
    if vm is None:
      stored.append(None)
    return (u, *stored)

  typeof = lambda x: jax.tree.map(lambda a: jax.typeof(a).sharding, x)
  shardings = lambda sh: (_quant._scale_sharding(sh, tuple(g.shape)), typeof(m), typeof(v),
                          typeof(vm))
  return (*_quant._with_auto_axes(run, shardings, g, m, v, vm, count, arrays), False)


def _fused_step(fmt, g, m, v, leaf_index, math_):
  """The 4-bit step of a blockwise-quantized leaf (see :meth:`Blockwise4bit.step`)."""
  bs = fmt.block_size
  shape = tuple(g.shape)
  view, _ = _codec4.block_view(shape, bs)
  rows = math.prod(view[:-1])
  hps = dict(math_.hps)
  arrays = {k: x for k, x in hps.items() if not isinstance(x, (int, float))}
  step_size = math_.step_size
  scaled = step_size is not None and g.dtype == jnp.float32

  def blocks(gb, mc, ms, vc, vs, count, arrays, row0):
    """One run of whole blocks: gb (r, bs); mc, vc (r, bs // 2); ms, vs (r,)."""
    h = {**hps, **arrays}
    m_old = _codec4.decode(_codec4.unpack(mc), fmt.mu_map) * ms[:, None]
    v_old = _codec4.decode(_codec4.unpack(vc), fmt.nu_map) * vs[:, None]
    u, m_new, v_new, _ = _update._moment_step(
        gb, m_old, v_old, None, count=count, **h,
        nesterov=math_.nesterov, amsgrad=False, infinity_norm=False)
    bad = ~jnp.isfinite(gb)
    m_new = jnp.where(bad, m_old.astype(m_new.dtype), m_new)
    v_new = jnp.where(bad, v_old.astype(v_new.dtype), v_new)
    if m_new.dtype == jnp.float32:
      m_new, v_new, u = _quant._materialized_step(
          gb, m_new, v_new, bad, count, h, nesterov=math_.nesterov)
      if scaled:
        u = step_size * u
    else:  # float64 under x64: back to float32 storage
      m_new = _numerics.saturate(m_new, jnp.float32)
      v_new = _numerics.saturate(v_new, jnp.float32)
    r = gb.shape[0]
    out = [u]
    for x, signed, name in ((m_new, True, fmt.mu_map), (v_new, False, fmt.nu_map)):
      scale = _codec4.block_scale(x, signed)
      bits = fmt._bits(r, count, leaf_index, signed, row0)
      out += [_codec4.pack(_codec4.encode(_codec4.normalize(x, scale), name, bits)), scale]
    return tuple(out)

  def run(g, mc, ms, vc, vs, count, arrays):
    gb = _codec4.to_blocks(g, bs).reshape(rows, bs)
    mc = mc.reshape(rows, bs // 2)
    vc = vc.reshape(rows, bs // 2)
    ms, vs = ms.reshape(rows), vs.reshape(rows)
    chunk = _quant._chunks(shape, bs)
    if chunk is None or _quant._explicit_sharding(g) is not None:
      u, mc, ms, vc, vs = blocks(gb, mc, ms, vc, vs, count, arrays, 0)
    else:
      n = rows // chunk
      split = lambda x: x.reshape((n, chunk) + x.shape[1:])
      gs, mc, ms, vc, vs = map(split, (gb, mc, ms, vc, vs))
      take = lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False)

      def body(i, carry):
        # The codes and scales update in place, chunk by chunk, and each
        # chunk's update overwrites that chunk of the gradient (read first):
        # with the gradient donated, no update-sized buffer is allocated.
        gs, mc, ms, vc, vs = carry
        outs = blocks(take(gs, i), take(mc, i), take(ms, i), take(vc, i), take(vs, i),
                      count, arrays, i * chunk)
        outs = (outs[0].astype(gs.dtype),) + outs[1:]
        put = lambda x, y: jax.lax.dynamic_update_index_in_dim(x, y, i, 0)
        return tuple(put(a, b) for a, b in zip((gs, mc, ms, vc, vs), outs))

      u, mc, ms, vc, vs = jax.lax.fori_loop(0, n, body, (gs, mc, ms, vc, vs))
    cshape = _codec4.codes_shape(shape, bs)
    sshape = _codec4.scale_shape(shape, bs)
    u = _codec4.from_blocks(u.reshape(view), shape, bs)
    return u, mc.reshape(cshape), ms.reshape(sshape), vc.reshape(cshape), vs.reshape(sshape)

  shardings = lambda sh: (
      _quant._scale_sharding(sh, shape), jax.typeof(m.codes).sharding, jax.typeof(m.scale).sharding,
      jax.typeof(v.codes).sharding, jax.typeof(v.scale).sharding)
  u, mc, ms, vc, vs = _quant._with_auto_axes(
      run, shardings, g, m.codes, m.scale, v.codes, v.scale, math_.count, arrays)
  mu = Quantized4bit(mc, ms, None, shape, bs, fmt.mu_map, False)
  nu = Quantized4bit(vc, vs, None, shape, bs, fmt.nu_map, False)
  return u, mu, nu, None, scaled


def _is_code_mapping(x: Any) -> bool:
  try:
    keys = set(x.keys())
  except (AttributeError, TypeError):
    return False
  return keys in ({'codes', 'scale'}, {'codes', 'scale', 'col'})


def _drop_first(sharding: Any) -> Any:
  """A NamedSharding without its spec's first entry (a rank-1 moment's column maxima)."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return None
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))


def _half_last(zeros: jax.Array) -> jax.Array:
  """uint8 zeros of ``zeros.shape`` with the last axis halved, laid out like ``zeros``."""
  half = zeros.shape[-1] // 2
  return jax.lax.slice_in_dim(zeros, 0, half, axis=zeros.ndim - 1).astype(jnp.uint8)
