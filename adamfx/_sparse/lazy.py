r"""Row-sparse gradients and lazy (row-sparse) Adam for embedding tables.

The gradient of an embedding lookup touches the rows the batch looked up and
is zero everywhere else. :class:`RowSparse` holds only those rows, and
:func:`lazy_adam` updates only those rows' moments and params (the semantics
of TensorFlow's ``LazyAdam`` and PyTorch's ``torch.optim.SparseAdam``), so a
step costs what the batch touches, not what the table holds. Dense leaves in
the same tree get exactly :func:`adamfx.adam`'s numbers: they go through the
same code. Every leaf is a step of the core's one tree driver
(:func:`adamfx._core.driver.tree_update`), a :class:`RowSparse` leaf's on its
touched rows, gathered and scattered through the moments' storage format.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple
from typing import Optional
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamfx._builders import adam as _adam
from adamfx._core import checks as _checks
from adamfx._core import driver as _update
from adamfx._core import eager as _fast
from adamfx._core import param_rounding as _param_rounding
from adamfx._core import rounding as _rounding
from adamfx._core import stable as _stable

ScalarOrSchedule = _update.ScalarOrSchedule


class _RowSparseMeta(type):
  """Names the fix in JAX's pytree-mismatch errors, which print the class.

  ``optax.add_decayed_weights`` (or any transformation that maps over the
  updates and the params together) after :func:`scale_by_lazy_adam` meets a
  ``RowSparse`` beside a dense param and fails in JAX's tree code, whose
  message shows only ``repr(RowSparse)``: this repr says what to use.
  """

  def __repr__(cls):
    return (
        "<class 'adamfx.RowSparse': a row-sparse update cannot be combined with"
        ' the dense params by a tree map (optax.add_decayed_weights, ...): for'
        ' weight decay use adamfx.lazy_adamw, for other per-leaf maps apply them'
        ' to the RowSparse values>'
    )


# The ids of a RowSparse are stored as float32 codes that any arithmetic on
# the tree's leaves either carries through exactly (a common scaling of every
# leaf: optax.scale_by_learning_rate, a schedule, ``2 * g``, ``-g``) or breaks
# detectably (adding two gradients with different ids, a per-element clip,
# a norm, a cast): an int id leaf would silently become other ids
# (``int(-0.1 * 5) = 0``). Per id, columns 0-3 hold the bytes of |id| (of
# ~id for a negative id), column 4 is 1 for a negative id, column 5 the sum
# of the squares of columns 0-4; a scalar ``unit`` leaf holds _UNIT. After a
# common scaling by s, unit / _UNIT = s recovers the columns. A convex
# combination of two different codes is not a code (column 5 is strictly
# convex), and a norm over the leaves overflows on the unit (inf, then NaN
# after optax's division), so it is caught too.
_UNIT = 2.0**70  # squared: 2**140, inf in float32
_COLS = 6
_MAX_ROWS = 2**31 - 1  # ids are int32 on the way in and out


def _encode(indices: Any) -> jax.Array:
  """float32 ``[k, 6]`` codes of integer ids (see the comment above)."""
  return _encode_ids(jnp.asarray(indices))


# Eagerly, encoding and decoding the ids are one compiled call each (a
# RowSparse built or read outside jit), not dozens of separate operations;
# under a trace they are inlined.
@jax.jit
def _encode_ids(ids: jax.Array) -> jax.Array:
  if ids.dtype.itemsize < 4:
    ids = ids.astype(jnp.int32)
  if jnp.issubdtype(ids.dtype, jnp.signedinteger):
    neg = ids < 0
    mag = jnp.where(neg, ~ids, ids)  # no overflow at the dtype's minimum
  else:
    neg = jnp.zeros(ids.shape, bool)
    mag = ids
  if mag.dtype.itemsize > 4:
    mag = jnp.minimum(mag, jnp.asarray(2**32 - 1, mag.dtype))
  mag = mag.astype(jnp.uint32)
  cols = [((mag >> jnp.uint32(8 * b)) & jnp.uint32(255)).astype(jnp.float32) for b in range(4)]
  cols.append(neg.astype(jnp.float32))
  cols.append(sum(c * c for c in cols))
  return jnp.stack(cols, axis=-1).reshape(ids.shape + (_COLS,))


def _decode(code: Any, unit: Any, num_rows: int, xp: Any = jnp) -> tuple[Any, Any, Any]:
  """``(ids, in_range, intact)`` from the codes.

  ``ids``: int32 ``[k]`` (ids outside int32 saturate); ``in_range``: per id,
  ``0 <= id < num_rows``; ``intact``: a bool scalar, False when the codes are
  not a scaled copy of valid codes (arithmetic treated the ids as numbers).
  All codes and the unit scaled by 0 (a learning rate of 0) are intact and
  name no row. ``xp``: ``jnp``, or ``np`` for a quick eager check.
  """
  if xp is jnp:
    return _decode_compiled(code, unit, num_rows)
  return _decode_ids(code, unit, num_rows, xp)


def _decode_ids(code: Any, unit: Any, num_rows: int, xp: Any) -> tuple[Any, Any, Any]:
  code = xp.asarray(code)
  unit = xp.asarray(unit)
  if code.dtype != xp.float32 or unit.dtype != xp.float32:
    intact_dtype = False
    code = code.astype(xp.float32)
    unit = unit.astype(xp.float32)
  else:
    intact_dtype = True
  s = unit / xp.float32(_UNIT)
  zero = (s == 0) & xp.all(code == 0)
  cols = code / xp.where(s == 0, xp.float32(1), s)
  r = xp.round(cols)
  limbs = r[..., :5]
  ok = xp.all(xp.abs(cols[..., :5] - limbs) <= 1e-3, axis=-1)
  ok &= xp.all((limbs[..., :4] >= 0) & (limbs[..., :4] <= 255), axis=-1)
  ok &= (limbs[..., 4] == 0) | (limbs[..., 4] == 1)
  ok &= xp.abs(cols[..., 5] - xp.sum(limbs * limbs, axis=-1)) <= 0.25
  intact = (xp.all(ok) & xp.isfinite(s) & (s != 0)) | zero
  if not intact_dtype:
    intact = xp.zeros([], bool)
  u = xp.clip(xp.nan_to_num(limbs[..., :4]), 0, 255).astype(xp.uint32)
  mag = u[..., 0] | (u[..., 1] << 8) | (u[..., 2] << 16) | (u[..., 3] << 24)
  neg = limbs[..., 4] == 1
  big = mag > xp.uint32(_MAX_ROWS)
  pos = xp.where(big, xp.int32(_MAX_ROWS), mag.astype(xp.int32))
  ids = xp.where(neg, ~pos, pos)
  in_range = ~neg & (mag < xp.uint32(num_rows)) & ~zero
  return ids, in_range, intact


@functools.partial(jax.jit, static_argnums=2)
def _decode_compiled(code: Any, unit: Any, num_rows: int) -> tuple[Any, Any, Any]:
  return _decode_ids(code, unit, num_rows, jnp)


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer)


def _is_ready(x: Any) -> bool:
  """A concrete array whose value is at hand (no wait on an async dispatch)."""
  if isinstance(x, np.ndarray):
    return True
  try:
    return _is_array(x) and x.is_fully_addressable and x.is_ready()
  except Exception:  # pylint: disable=broad-except  (deleted/donated buffers)
    return False


_CORRUPT = (
    'RowSparse ids were treated as numbers: a transformation mapped over'
    ' every leaf of a RowSparse ({what}). A common scaling of all leaves'
    ' (optax.scale_by_learning_rate, optax.scale_by_schedule, 2 * g) is'
    ' fine; adding two RowSparse with different ids (jax.tree.map(jnp.add,'
    ' g1, g2)), a norm (optax.clip_by_global_norm), a per-element clip or a'
    ' cast are not. Sum RowSparse gradients with `g1 + g2` (which'
    ' concatenates the rows), clip with adamfx.sparse_clip_by_global_norm,'
    ' and apply other per-leaf maps to `g.values` via `g.with_values(...)`.'
    ' Under jit such a RowSparse gives NaN rows, never a finite update of'
    ' another row.'
)


@jax.tree_util.register_pytree_node_class
class RowSparse(metaclass=_RowSparseMeta):
  """The gradient (or update) of a ``[num_rows, *row_shape]`` leaf, by rows.

  Row ``indices[i]`` of the dense array holds ``values[i]``; rows not listed
  are zero. Duplicate ids mean a sum (as ``torch.sparse`` coalesces). Ids
  outside ``[0, num_rows)`` (a padding id of -1, an id from a larger
  vocabulary) refer to no row: ``todense()`` and ``params + update`` drop
  them, never wrapping around to the last row nor writing past the end
  (:func:`lazy_adam` called eagerly refuses them with a ``ValueError``).

  A ``RowSparse`` is a pytree, so it crosses ``jit``, ``vmap`` and ``scan``;
  ``params + update`` -- what ``optax.apply_updates`` computes -- scatter-adds
  the rows, in place when the params are donated.

  **Arithmetic on the tree cannot move a row.** The ids are not stored as
  integer leaves (which ``optax.scale_by_learning_rate`` would multiply by
  ``int(-lr) = 0``) but as float32 codes plus a scalar unit, which a common
  scaling of every leaf carries through exactly: a schedule or
  ``optax.scale`` chained after :func:`scale_by_lazy_adam`, ``2 * g``, ``-g``
  and ``jax.tree.map(jnp.add, g1, g2)`` of two gradients with the same ids
  all give the right rows. Any other map over the leaves that treats the
  ids as numbers -- adding gradients with different ids, a global norm
  (``optax.clip_by_global_norm``), a per-element clip, a cast -- is detected:
  eagerly with a ``ValueError`` when the tree is rebuilt, and under ``jit``
  as NaN values (on rows ``0 .. k-1``), never a finite update of a row no
  gradient touched. A scaling by 0 (a learning rate of 0) names no row.
  Sum two ``RowSparse`` with ``g1 + g2`` (it concatenates the rows).

  The pytree children are ``(values, codes, unit)``; read the ids with
  ``indices`` (int32; ids beyond int32 saturate, still out of range).

  Args:
    indices: integer array ``[k]``, the row ids.
    values: array ``[k, *row_shape]``, the rows.
    num_rows: the number of rows of the dense array, a Python int in
      ``[0, 2**31)``.

  Raises:
    TypeError: if ``indices`` is not an integer array.
    ValueError: if ``num_rows`` is out of range. (Shapes are checked where
      the rows are used -- by the optimiser, ``todense()``, ``params +
      update``.)

  Examples:
    >>> import jax.numpy as jnp
    >>> import adamfx
    >>> g = adamfx.RowSparse(jnp.array([2, 0, 2]), jnp.ones((3, 2)), num_rows=4)
    >>> g.todense()
    Array([[1., 1.],
           [0., 0.],
           [2., 2.],
           [0., 0.]], dtype=float32)
    >>> jnp.zeros((4, 2)) + g  # what optax.apply_updates computes
    Array([[1., 1.],
           [0., 0.],
           [2., 2.],
           [0., 0.]], dtype=float32)
    >>> (-0.5 * g).indices  # arithmetic scales the values, not the ids
    Array([2, 0, 2], dtype=int32)
  """

  __array_ufunc__ = None  # numpy arrays defer `array + RowSparse` to us

  def __init__(self, indices: Any, values: Any, num_rows: int):
    dtype = getattr(indices, 'dtype', None)
    if dtype is None:
      indices = jnp.asarray(indices)
      dtype = indices.dtype
    if not jnp.issubdtype(dtype, jnp.integer):
      raise TypeError(
          f'RowSparse `indices` must be integers, got dtype {np.dtype(dtype).name}.'
      )
    if (not isinstance(num_rows, (int, np.integer)) or isinstance(num_rows, bool)
        or not 0 <= num_rows <= _MAX_ROWS):
      raise ValueError(
          f'RowSparse `num_rows` must be an int in [0, 2**31), got {num_rows!r}.'
      )
    self._code = _encode(indices)
    self._unit = jnp.asarray(_UNIT, jnp.float32)
    self._values = values
    self.num_rows = int(num_rows)

  @classmethod
  def _raw(cls, values, code, unit, num_rows) -> RowSparse:
    out = object.__new__(cls)
    out._values, out._code, out._unit, out.num_rows = values, code, unit, num_rows
    return out

  def tree_flatten(self):
    return (self._values, self._code, self._unit), self.num_rows

  @classmethod
  def tree_unflatten(cls, num_rows, children):
    out = cls._raw(*children, num_rows)
    # Eagerly, the map that just ran over the leaves is named where it broke
    # the ids (JAX also unflattens placeholders: only concrete arrays).
    _, code, unit = children
    if _is_ready(code) and _is_ready(unit) and np.ndim(code) == 2 and np.ndim(unit) == 0:
      with np.errstate(all='ignore'):  # broken codes overflow: that is the finding
        _, _, intact = _decode(np.asarray(code), np.asarray(unit), num_rows, np)
      if not bool(intact):
        raise ValueError(_CORRUPT.format(what='found when the tree was rebuilt'))
    return out

  @property
  def values(self) -> Any:
    return self._values

  @property
  def indices(self) -> jax.Array:
    """int32 ``[k]``, the row ids (eagerly, refused if arithmetic broke them)."""
    ids, _, intact = _decode(self._code, self._unit, self.num_rows)
    self._check_intact(intact)
    return ids

  def _check_intact(self, intact: Any) -> None:
    if not isinstance(intact, jax.core.Tracer) and not bool(intact):
      raise ValueError(_CORRUPT.format(what='found where the ids were read'))

  def with_values(self, values: Any) -> RowSparse:
    """The same ids with new ``values`` (``[k, *row_shape]``), without re-encoding."""
    return RowSparse._raw(values, self._code, self._unit, self.num_rows)

  @property
  def shape(self) -> tuple[int, ...]:
    """The dense array's shape, ``(num_rows, *row_shape)``."""
    return (self.num_rows, *self._values.shape[1:])

  @property
  def dtype(self) -> Any:
    return self._values.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def todense(self) -> jax.Array:
    """The dense array, with duplicate rows summed and out-of-range ids dropped."""
    return _scatter_add(jnp.zeros(self.shape, self.dtype), self)

  def coalesce(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`coalesce` of this gradient: ``(ids, values, valid)``, duplicates summed."""
    return coalesce(self)

  def __add__(self, other: Any) -> Any:
    if isinstance(other, RowSparse):  # the rows of both: a sum of gradients
      if other.num_rows != self.num_rows:
        raise ValueError(
            f'Cannot add RowSparse of {self.num_rows} and {other.num_rows} rows.'
        )
      with jax.numpy_dtype_promotion('standard'):
        values = jnp.concatenate([jnp.asarray(self._values), jnp.asarray(other._values)])
      return RowSparse(jnp.concatenate([self.indices, other.indices]), values, self.num_rows)
    return _scatter_add(other, self)

  __radd__ = __add__

  def __mul__(self, other: Any) -> RowSparse:
    """A scalar times the values (``2 * g``, ``-lr * g``)."""
    if jnp.ndim(other) != 0:
      raise TypeError('A RowSparse can be multiplied by a scalar only.')
    with jax.numpy_dtype_promotion('standard'):
      return self.with_values((other * self._values).astype(self._values.dtype))

  __rmul__ = __mul__

  def __neg__(self) -> RowSparse:
    return self.with_values(-self._values)

  def __repr__(self) -> str:
    try:
      ids = self.indices
    except ValueError:
      ids = '<corrupted>'
    return f'RowSparse(indices={ids!r}, values={self._values!r}, num_rows={self.num_rows})'


def _is_sparse(x: Any) -> bool:
  return isinstance(x, RowSparse)


def _is_leaf(x: Any) -> bool:
  return x is None or isinstance(x, RowSparse)


def safe_ids(indices: jax.Array, num_rows: int) -> jax.Array:
  """``indices`` as int32, with every id outside ``[0, num_rows)`` set to ``num_rows``.

  ``num_rows`` is out of bounds for a scatter with ``mode='drop'`` (dropped)
  and a gather with ``mode='fill'``; a negative id, which JAX's indexing
  would wrap around, never reaches one. The range is checked in the ids' own
  dtype, before the cast (a uint64 id of 2**32 + 3 is out of range, not 3).
  """
  ids = jnp.asarray(indices)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f'RowSparse indices must be integers, got dtype {ids.dtype}.')
  if num_rows > jnp.iinfo(ids.dtype).max:
    valid = jnp.ones(ids.shape, bool)
  else:
    valid = ids < jnp.asarray(num_rows, ids.dtype)
  if jnp.issubdtype(ids.dtype, jnp.signedinteger):
    valid &= ids >= 0
  return jnp.where(valid, ids.astype(jnp.int32), jnp.int32(num_rows))


def gather_rows(x: Any, ids: jax.Array) -> jax.Array:
  """``x[ids]`` for safe ids (see :func:`safe_ids`): zeros where an id is ``num_rows``.

  On an Explicit mesh (``jax.make_mesh(..., axis_types=Explicit)``) JAX
  needs the gather's output sharding spelled out: the gathered rows are
  replicated along the rows (any shard may hold them), the other dimensions
  keep ``x``'s spec.
  """
  x = jnp.asarray(x)
  out = None
  sharding = _explicit_sharding(x)
  if sharding is not None:
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(tuple(sharding.spec)))
    out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *spec[1:]))
  return x.at[ids].get(mode='fill', fill_value=0, out_sharding=out)


def scatter_rows(x: Any, ids: jax.Array, values: Any, op: str = 'set') -> jax.Array:
  """``x.at[ids].set(values)`` (or ``add``), dropping ids equal to ``num_rows``;
  on an Explicit mesh the result keeps ``x``'s sharding."""
  x = jnp.asarray(x)
  return getattr(x.at[ids], op)(values, mode='drop', out_sharding=_explicit_sharding(x))


def _explicit_sharding(x: Any) -> Any:
  """``x``'s NamedSharding when its mesh has Explicit axes, else None."""
  sharding = getattr(jax.typeof(x), 'sharding', None)
  mesh = getattr(sharding, 'mesh', None)
  if mesh is not None and not mesh.empty and any(
      t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return sharding
  return None


def rows_of(update: RowSparse) -> tuple[jax.Array, Any]:
  """``(ids, values)`` to scatter or gather: int32 ids with every id outside
  ``[0, num_rows)`` set to ``num_rows`` (dropped by ``mode='drop'``).

  Where arithmetic broke the ids (see :class:`RowSparse`): eagerly a
  ``ValueError``; traced, NaN values on rows ``0 .. k-1``, so that the
  damage shows as NaN and never as a finite update of another row.
  """
  ids, in_range, intact = _decode(update._code, update._unit, update.num_rows)
  update._check_intact(intact)
  ids = jnp.where(in_range, ids, jnp.int32(update.num_rows))
  values = update._values
  if isinstance(intact, jax.core.Tracer):
    k = ids.shape[0]
    poison = jnp.arange(k, dtype=jnp.int32) % max(update.num_rows, 1)
    ids = jnp.where(intact, ids, poison)
    values = jnp.asarray(values)
    if jnp.issubdtype(values.dtype, jnp.inexact):
      values = jnp.where(intact, values, jnp.asarray(jnp.nan, values.dtype))
  return ids, values


def _check_shapes(update: RowSparse) -> None:
  ishape = tuple(jnp.shape(update._code))[:-1]
  vshape = tuple(jnp.shape(update.values))
  if len(ishape) != 1 or len(vshape) < 1 or vshape[0] != ishape[0]:
    raise ValueError(
        'RowSparse needs `indices` of shape [k] and `values` of shape'
        f' [k, *row_shape], got {ishape} and {vshape}.'
    )


def _scatter_add(dense: Any, update: RowSparse) -> jax.Array:
  _check_shapes(update)
  dense = jnp.asarray(dense)
  if tuple(dense.shape) != update.shape:
    raise ValueError(
        f'Cannot add a RowSparse of shape {update.shape} to an array of shape'
        f' {tuple(dense.shape)}.'
    )
  ids, values = rows_of(update)
  values = jnp.asarray(values).astype(dense.dtype)
  return scatter_rows(dense, ids, values, 'add')


def coalesce(update: RowSparse) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Sums duplicate rows; returns ``(ids, values, valid)``, ``k`` entries each.

  Each distinct in-range id appears once in ``ids`` with the sum of its rows;
  the other entries (later duplicates, out-of-range ids) carry the id
  ``num_rows``, zero values and ``valid`` False. The size stays ``k``, so this
  traces with static shapes.

  One sort of the ids alone (a sort with a payload, or ``jnp.unique`` with an
  inverse, is 6x slower on CPU), a binary search of each id's first
  occurrence, and a segment sum.
  """
  ids, values = rows_of(update)
  k = ids.shape[0]
  values = jnp.asarray(values)
  if k == 0:
    return ids, values, jnp.zeros([0], bool)
  s = jax.lax.sort(ids)
  first = jnp.concatenate([jnp.ones([1], bool), s[1:] != s[:-1]])
  where = jnp.searchsorted(s, ids, side='left').astype(jnp.int32)
  summed = jax.ops.segment_sum(values, where, num_segments=k)
  valid = first & (s < update.num_rows)
  out_ids = jnp.where(valid, s, jnp.asarray(update.num_rows, s.dtype))
  summed = jnp.where(valid.reshape((k,) + (1,) * (values.ndim - 1)), summed, 0)
  return out_ids, summed.astype(values.dtype), valid


def _check_ids(path: Any, update: RowSparse) -> None:
  """Eagerly (concrete ids only) refuses ids outside ``[0, num_rows)``."""
  if not _is_array(update._code) or not _is_array(update._unit):
    return
  _ = update.indices  # refuses ids that arithmetic broke
  with np.errstate(all='ignore'):
    code = np.asarray(update._code, np.float64) / (float(update._unit) / _UNIT)
  limbs = np.round(code[:, :5]).astype(np.int64)
  mag = limbs[:, 0] | (limbs[:, 1] << 8) | (limbs[:, 2] << 16) | (limbs[:, 3] << 24)
  ids = np.where(limbs[:, 4] == 1, -mag - 1, mag)
  bad = (ids < 0) | (ids >= update.num_rows)
  if bad.any():
    first = int(ids[np.argmax(bad)])
    first = f'>= {first}' if first == 2**32 - 1 else first  # a wider id, saturated
    raise ValueError(
        f'RowSparse gradient for leaf {_checks._leaf_name(path)} has id {first}'
        f' outside [0, {update.num_rows}) (the leaf\'s rows); {int(bad.sum())} of'
        f' {ids.size} ids are out of range. Under jit such ids update no row;'
        ' eagerly they are refused, as a likely bug (a padding id, ids from a'
        ' larger vocabulary).'
    )


def _check_leaf(path: Any, update: RowSparse, ref: Any, check_dtype: bool = True) -> None:
  """Checks a RowSparse gradient against the state leaf (shape, dtype)."""
  name = _checks._leaf_name(path)
  try:
    _check_shapes(update)
  except ValueError as e:
    raise ValueError(f'Gradient leaf {name}: {e}') from None
  shape = tuple(getattr(ref, 'shape', ()))
  if len(shape) < 1 or update.shape != shape:
    raise ValueError(
        f'RowSparse gradient for leaf {name} has dense shape {update.shape}'
        f' (num_rows={update.num_rows}, rows of {tuple(update.values.shape[1:])}),'
        f' but the leaf has shape {shape}: values must be [k, *row_shape] of the'
        ' leaf and num_rows its first dimension.'
    )
  if check_dtype and jnp.dtype(update.values.dtype) != jnp.dtype(ref.dtype):
    raise TypeError(
        f'RowSparse gradient for leaf {name} has values of dtype'
        f' {np.dtype(update.values.dtype).name}, but the leaf is'
        f' {np.dtype(ref.dtype).name}: cast the values to the leaf\'s dtype.'
    )


class LazyAdamState(NamedTuple):
  """State of :func:`scale_by_lazy_adam`.

  Attributes:
    count: int32 scalar, the number of updates so far (the global step used
      by the bias correction, for dense and sparse leaves alike).
    mu: first moment, shaped like the params.
    nu: second moment, shaped like the params.
    last_step: with ``catch_up=True``, for every leaf of rank >= 1 an int32
      vector ``[num_rows]``, the step each row was last updated at (0:
      never); ``None`` leaves for scalars. ``None`` without ``catch_up``.
    nu_max: with ``amsgrad=True``, AMSGrad's running maximum of the
      bias-corrected second moment (stored like ``nu``; a row's changes only
      when the row is touched); else ``None``.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  last_step: Optional[optax.Updates] = None
  nu_max: Optional[optax.Updates] = None


def _row_zeros(p: Any) -> jax.Array:
  """int32 zeros ``[num_rows]``, sharded as ``p``'s rows when ``p`` is sharded."""
  z = jnp.zeros(p.shape[:1], jnp.int32)
  sharding = getattr(p, 'sharding', None)
  if isinstance(sharding, jax.sharding.NamedSharding) and not isinstance(p, jax.core.Tracer):
    spec = tuple(sharding.spec)
    z = jax.device_put(z, jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec(spec[0] if spec else None)))
  return z


class _Rows:
  """The row access the core's tree driver uses for :class:`RowSparse` leaves
  (see ``adamfx._core.driver._row_step``): one hashable instance, static under jit."""

  def __hash__(self):
    return 0

  def __eq__(self, other):
    return isinstance(other, _Rows)

  is_sparse = staticmethod(_is_sparse)
  coalesce = staticmethod(coalesce)
  gather = staticmethod(gather_rows)
  scatter = staticmethod(scatter_rows)

  @staticmethod
  def rebuild(g: RowSparse, ids: jax.Array, values: jax.Array) -> RowSparse:
    return RowSparse(ids, values, g.num_rows)

  @staticmethod
  def align(values: jax.Array, stored: Any, decode: Any) -> jax.Array:
    """On Explicit axes, the rows' values (replicated, say) laid out as the
    decoded moments' rows (``decode(stored)``), for the elementwise step; else
    as they are (nothing decoded)."""
    if all(_explicit_sharding(x) is None for x in jax.tree.leaves(stored)):
      return values
    sharding = _explicit_sharding(decode(stored))
    if sharding is not None and _explicit_sharding(values) != sharding:
      return jax.sharding.reshard(values, sharding)
    return values


ROWS = _Rows()


def scale_by_lazy_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[Any] = None,
    *,
    nu_dtype: Optional[Any] = None,
    catch_up: bool = False,
    moments: Optional[Any] = None,
    nesterov: bool = False,
    amsgrad: bool = False,
) -> optax.GradientTransformation:
  r"""Adam's moment ratio, updating only the rows a :class:`RowSparse` gradient touches.

  For a dense gradient leaf this is :func:`adamfx.scale_by_adam` (the same
  code, the same numbers). For a :class:`RowSparse` leaf, duplicate ids are
  summed, and then for each touched row :math:`r` only

  .. math::

    \begin{align*}
      m_{t,r} &\leftarrow \beta_1 m_{r} + (1 - \beta_1) g_{t,r} \\
      v_{t,r} &\leftarrow \beta_2 v_{r} + (1 - \beta_2) g_{t,r}^2 \\
      u_{t,r} &\leftarrow \frac{m_{t,r} / (1 - \beta_1^t)}
        {\sqrt{v_{t,r} / (1 - \beta_2^t) + \bar\varepsilon} + \varepsilon}
    \end{align*}

  with :math:`t` the global step count (TensorFlow's ``LazyAdam``,
  PyTorch's ``SparseAdam``; ``eps`` outside the root as in the paper's
  Algorithm 1). Other rows' moments are untouched, bit for bit, and the
  update is a :class:`RowSparse` of the touched rows.

  With ``catch_up=True`` the state records, per row, the step it was last
  touched at; a row untouched for :math:`k` steps first has its moments
  decayed by :math:`\beta_1^k` and :math:`\beta_2^k`, so the touched rows'
  ``mu`` and ``nu`` are dense Adam's (up to rounding: one power instead of
  :math:`k` products). What remains different from dense Adam is the
  drift: dense Adam keeps moving an untouched row by its stale momentum,
  :math:`-\alpha \hat m / (\sqrt{\hat v} + \varepsilon)` at every step of
  the gap; the lazy update never applies those steps.

  Args:
    b1: decay of the first moment, in [0, 1); default 0.9.
    b2: decay of the second moment, in [0, 1); default 0.999.
    eps: added to the root of the second moment, >= 0; default 1e-8.
    eps_root: added inside the root, >= 0; default 0.
    mu_dtype: storage dtype of the first moment; default: the params'.
    nu_dtype: storage dtype of the second moment; default: the params'.
    catch_up: keep ``last_step`` and decay a row's moments over the steps it
      missed (costs an int32 per row).
    moments: the moments' storage format (see :func:`adamfx.scale_by_adam`):
      with :class:`adamfx.Blockwise8bit`, a step gathers the touched rows'
      codes and scales, decodes, steps, encodes and scatters them back (a
      quantized table's rows must be whole blocks).
    nesterov: NAdam on the touched rows (as :func:`adamfx.nadam`, optax's
      form): :math:`\hat m_{t,r} = \beta_1 m_{t,r} / (1 - \beta_1^{t+1}) +
      (1 - \beta_1) g_{t,r} / (1 - \beta_1^t)`.
    amsgrad: AMSGrad on the touched rows (as :func:`adamfx.amsgrad`, optax's
      form): the state's ``nu_max`` keeps each row's running maximum of the
      bias-corrected second moment, which replaces :math:`\hat v_{t,r}`; an
      untouched row's maximum is unchanged (with ``catch_up``, its ``nu``
      decays over the missed steps, its maximum does not).

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`LazyAdamState`.

  Raises:
    ValueError: for hyperparameters outside their ranges; at update time, for
      a concrete (eager) ``RowSparse`` with an id outside ``[0, num_rows)``, or
      one whose dense shape is not the leaf's, naming the leaf.
    TypeError: for ``RowSparse`` values whose dtype is not the leaf's.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adamfx
    >>> tx = adamfx.scale_by_lazy_adam()
    >>> state = tx.init(jnp.zeros((4, 2)))
    >>> g = adamfx.RowSparse(jnp.array([1]), jnp.array([[0.5, -2.0]]), num_rows=4)
    >>> u, state = tx.update(g, state)
    >>> u.todense().round(4)  # only row 1 moves; the first step is sign(g)
    Array([[ 0.,  0.],
           [ 1., -1.],
           [ 0.,  0.],
           [ 0.,  0.]], dtype=float32)

  References:
    Kingma & Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, ICLR 2015.
  """
  return _lazy_scaling(b1, b2, eps, eps_root, mu_dtype, nu_dtype=nu_dtype, catch_up=catch_up,
                       moments=moments, nesterov=nesterov, amsgrad=amsgrad)[0]


def _lazy_scaling(b1, b2, eps, eps_root, mu_dtype, *, nu_dtype, catch_up, moments, nesterov,
                  amsgrad):
  """:func:`scale_by_lazy_adam` and its ``run(updates, state, tail)``, which
  takes a tail maker (:func:`_tail`) for the chains of :func:`lazy_adam` and
  :func:`lazy_adamw` (their learning rate and decay fused into the step)."""
  fmt, mu_dtype, nu_dtype = _adam._storage(moments, mu_dtype, nu_dtype)
  _adam._check_adam_args(b1, b2, eps, eps_root, None, None)
  for name, flag in (('catch_up', catch_up), ('nesterov', nesterov), ('amsgrad', amsgrad)):
    if not isinstance(flag, bool):  # as torch_adam(amsgrad=1): flags are bools
      raise TypeError(f'`{name}` must be True or False, got {flag!r}.')
  hps = {'b1': b1, 'b2': b2, 'eps': eps, 'eps_root': eps_root}
  formatted = None if fmt is None else _adam._scale_by_format(
      b1, b2, eps, eps_root, fmt=fmt, nesterov=nesterov, amsgrad=amsgrad)

  def init_fn(params):
    base = (_update._family_init(params, mu_dtype, nu_dtype, amsgrad) if fmt is None
            else formatted.init(params))
    last = None
    if catch_up:
      params = jax.tree.map(lambda p: p if hasattr(p, 'ndim') else jnp.asarray(p), params)
      last = jax.tree.map(lambda p: _row_zeros(p) if p.ndim >= 1 else None, params)
    return LazyAdamState(count=base.count, mu=base.mu, nu=base.nu, last_step=last,
                         nu_max=base.nu_max)

  def run(updates, state, tail=None):
    """``(updates, state, tail's new state)``: one step of the core's tree
    driver, the :class:`RowSparse` leaves on their touched rows."""
    if isinstance(updates, LazyAdamState):  # pragma: no cover - misuse guard
      raise TypeError('scale_by_lazy_adam.update got a state as its updates.')
    state = _checks.adam_like_state(state, 'scale_by_lazy_adam')
    leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_leaf)
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_leaf)[0]]
    mu = state.mu if fmt is None else fmt.prepare(state.mu, True, 'mu')
    like = mu if fmt is None else jax.tree.map(
        fmt.param_like, mu, is_leaf=lambda x: x is None or fmt.is_stored(x))
    dense_like = jax.tree.map(
        lambda u: jax.ShapeDtypeStruct(u.shape, u.dtype) if _is_sparse(u) else u,
        updates, is_leaf=_is_leaf)
    try:
      m_leaves = treedef.flatten_up_to(like)
    except (ValueError, TypeError):
      _checks.check_matching_trees(dense_like, like)
      raise
    if catch_up and getattr(state, 'last_step', None) is None:
      raise ValueError('catch_up=True needs a state made by the same transformation.')
    if amsgrad and getattr(state, 'nu_max', None) is None:
      raise ValueError('amsgrad=True needs a state made by the same transformation (nu_max).')
    for i, u in enumerate(leaves):
      if _is_sparse(u):
        _check_leaf(paths[i], u, m_leaves[i], check_dtype=fmt is None and mu_dtype is None)
        _check_ids(paths[i], u)
    _checks.check_matching_trees(dense_like, like)
    if not catch_up:
      state = state._replace(last_step=None)
    made, new_tail_state = (None, None) if tail is None else tail()
    u, state = _fast.rows_update(
        updates, state, hps, rows=ROWS, state_type=LazyAdamState, fmt=fmt,
        nesterov=nesterov, amsgrad=amsgrad, tail=made)
    return u, state, new_tail_state

  def update_fn(updates, state, params=None):
    del params
    return run(updates, state)[:2]

  return optax.GradientTransformation(init_fn, update_fn), run


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _out_of_range(x: Any) -> jax.Array:
  """True where an array hyperparameter (traced, unchecked) is negative or not finite."""
  x = jnp.asarray(x)
  return jnp.any(~((x >= 0) & (x < jnp.inf)))


def _tail(updates: Any, params: Any, *, learning_rate: Any = None, lr_state: Any = None,
          decay: Any = None) -> tuple[_update.Tail, Any]:
  """The core's :class:`adamfx._core.driver.Tail` of a lazy step: ``(tail, lr_state)``.

  ``-lr * (u + wd * p)``: the learning rate (a number, an array or a
  schedule of ``lr_state.count``, as ``optax.scale_by_learning_rate``) and
  AdamW's decay ``decay = (weight_decay, mask)`` (a number or an array; the
  mask, a tree or a function of the params, says which leaves, as optax's).
  Per-leaf lists are indexed as the driver indexes leaves (their places
  among the params); a :class:`RowSparse` leaf's decay reads its touched rows.
  """
  leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_leaf)
  holed = jax.tree.map(lambda x: None if _is_sparse(x) else x, updates, is_leaf=_is_leaf)
  places = _rounding.leaf_positions(holed)
  slots = max(places, default=-1) + 1
  parts, invalid = {}, None
  if learning_rate is not None:
    with jax.numpy_dtype_promotion('standard'):
      if callable(learning_rate):  # a schedule, as optax.scale_by_schedule
        parts.update(lr_size=jnp.asarray(-1 * learning_rate(lr_state.count)), lr_kind='schedule')
        lr_state = optax.ScaleByScheduleState(count=optax.safe_increment(lr_state.count))
      elif _is_number(learning_rate):
        parts.update(lr_static=-1 * learning_rate, lr_kind='number')
      else:
        parts.update(lr_size=-1 * learning_rate, lr_kind='array')
        invalid = _out_of_range(learning_rate)
  if decay is not None:
    weight_decay, mask = decay
    if params is None:
      raise ValueError('lazy_adamw needs `params` in update() for the weight decay.')
    if _is_number(weight_decay):
      parts['decay_static'] = weight_decay
    else:
      parts['decay_size'] = weight_decay
      bad = _out_of_range(weight_decay)
      invalid = bad if invalid is None else invalid | bad
    mask_tree = mask(params) if callable(mask) else mask
    if mask_tree is None:
      on = [True] * len(leaves)
    else:  # a tree of bools, or a prefix of the updates' tree
      on = treedef.flatten_up_to(jax.tree.map(
          lambda m, sub: jax.tree.map(lambda _: m, sub, is_leaf=_is_leaf), mask_tree, updates,
          is_leaf=_is_leaf))
    decay_on, p_slots = [False] * slots, [None] * slots
    for j, (u, keep, p) in enumerate(zip(leaves, on, treedef.flatten_up_to(params))):
      decay_on[places[j]] = u is not None and bool(keep)
      p_slots[places[j]] = p
    parts.update(decay_on=tuple(decay_on), params=p_slots)
  return _update.Tail(**parts, invalid=invalid), lr_state


def _apply_tail(updates: Any, tail: _update.Tail) -> Any:
  """``tail`` on every leaf (a :class:`RowSparse` one: on its rows), as its own link."""
  leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_leaf)
  holed = jax.tree.map(lambda x: None if _is_sparse(x) else x, updates, is_leaf=_is_leaf)
  out = []
  for u, i in zip(leaves, _rounding.leaf_positions(holed)):
    if u is None:
      out.append(None)
    elif _is_sparse(u):
      ids, values = rows_of(u)
      param = gather_rows(tail.params[i], ids) if _update.decays(tail, i) else None
      out.append(u.with_values(_update.apply_tail(values, i, tail, False, param)))
    else:
      out.append(_update.apply_tail(u, i, tail, False))
  return jax.tree.unflatten(treedef, out)


def _tail_link(init: Callable[[Any], Any], **parts: Any) -> optax.GradientTransformation:
  """One part of the tail (the decay, or the learning rate) as a chain link,
  for :func:`adamfx._core.stable.chain`, which acts between them."""

  def update_fn(updates, state, params=None):
    tail, new_state = _tail(updates, params, lr_state=state, **parts)
    return _apply_tail(updates, tail), (state if 'learning_rate' not in parts else new_state)

  return optax.GradientTransformation(init, update_fn)


def _lazy_chain(scaling: Any, learning_rate: Any, decay: Any, stable: Any, *, b2: Any,
                eps: Any, param_rounding: str) -> optax.GradientTransformationExtraArgs:
  """The chain of :func:`lazy_adam` / :func:`lazy_adamw`: the scaling, [the
  decay,] the learning rate, as optax's chain (its state), in one step of the
  core's driver with the tail fused (or, with update clipping or cautious
  updates, link by link through :func:`adamfx._core.stable.chain`)."""
  scaling, run = scaling
  _checks.check_learning_rate(learning_rate)
  _param_rounding.check_mode(param_rounding)
  links = [scaling]
  if decay is not None:
    links.append(_tail_link(lambda params: optax.EmptyState(), decay=decay))
  links.append(_tail_link(optax.scale_by_learning_rate(learning_rate).init,
                          learning_rate=learning_rate))
  if stable.active:
    tx = _stable.chain(links[0], links[1:], stable, b2=b2, eps=eps, decayed=decay is not None)
  else:
    def update_fn(updates, state, params=None, **extra_args):
      del extra_args
      _checks.check_chain_state(state, len(links))
      tail = lambda: _tail(updates, params, learning_rate=learning_rate, lr_state=state[-1],
                           decay=decay)
      u, inner, lr_state = run(updates, state[0], tail)
      return u, (inner, *state[1:-1], lr_state)

    tx = optax.GradientTransformationExtraArgs(optax.chain(*links).init, update_fn)
  return _param_rounding.with_param_rounding(tx, param_rounding)


def lazy_adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[Any] = None,
    *,
    nu_dtype: Optional[Any] = None,
    catch_up: bool = False,
    nesterov: bool = False,
    amsgrad: bool = False,
    update_clipping: bool = False,
    cautious: bool = False,
    moments: Optional[Any] = None,
    param_rounding: str = 'nearest',
) -> optax.GradientTransformationExtraArgs:
  r"""Lazy Adam: Adam that updates only the rows a :class:`RowSparse` gradient touches.

  :func:`scale_by_lazy_adam` followed by the learning rate. Dense gradient
  leaves get exactly :func:`adamfx.adam`'s numbers; on a :class:`RowSparse`
  leaf only the touched rows' moments and params change, with the global
  step's bias correction (TensorFlow ``LazyAdam``, ``torch.optim.SparseAdam``),
  and the update is a :class:`RowSparse` that ``optax.apply_updates``
  scatter-adds (in place when the params are donated). A step then costs
  what the batch touches, not what the table holds.

  .. math::

    \theta_{t,r} \leftarrow \theta_{t-1,r} - \alpha_t \hat m_{t,r} /
      \left(\sqrt{\hat v_{t,r} + \bar\varepsilon} + \varepsilon\right)
    \quad \text{for the touched rows } r

  Args:
    learning_rate: :math:`\alpha`, a number >= 0 or an optax schedule of the
      step count.
    b1: decay of the first moment, in [0, 1); default 0.9.
    b2: decay of the second moment, in [0, 1); default 0.999.
    eps: added to the root of the second moment, >= 0; default 1e-8.
    eps_root: added inside the root, >= 0; default 0.
    mu_dtype: storage dtype of the first moment; default: the params'.
    nu_dtype: storage dtype of the second moment; default: the params'.
    catch_up: decay a row's moments over the steps it missed when it is next
      touched (see :func:`scale_by_lazy_adam`).
    nesterov: NAdam's step on the touched rows (see :func:`scale_by_lazy_adam`).
    amsgrad: AMSGrad's step on the touched rows (see :func:`scale_by_lazy_adam`).
    moments: the moments' storage format (see :func:`scale_by_lazy_adam`).
    update_clipping: StableAdamW's per-tensor update clipping (see
      :func:`adamfx.adam`); for a :class:`RowSparse` leaf the untouched rows
      count as zero gradient, as dense Adam on the same gradient would.
    cautious: cautious updates (see :func:`adamfx.adam`); for a
      :class:`RowSparse` leaf the mask's mean is over the touched rows.
    param_rounding: how a new param is rounded to a params dtype narrower
      than float32: ``'nearest'`` (default), ``'kahan'`` (a compensation
      buffer in the params' dtype) or ``'stochastic'``; see
      :func:`adamfx.kahan_init` and the memory guide. ``update`` then
      needs ``params``; float32/float64 leaves are never affected.
      A row-sparse update is made dense when its leaf is rounded.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (optax's chain); its state is ``(LazyAdamState,
    optax.ScaleByScheduleState or EmptyState)``.

  Raises:
    ValueError: for hyperparameters outside their ranges, out-of-range ids
      in an eager call, or a ``RowSparse`` whose shape is not its leaf's.
    TypeError: for ``RowSparse`` values of another dtype than the leaf.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import adamfx
    >>> table = jnp.zeros((1000, 4))
    >>> tx = adamfx.lazy_adam(1e-2)
    >>> state = tx.init(table)
    >>> g = adamfx.RowSparse(jnp.array([3, 7, 3]), jnp.ones((3, 4)), num_rows=1000)
    >>> updates, state = tx.update(g, state, table)
    >>> table = optax.apply_updates(table, updates)
    >>> table[3], table[4]
    (Array([-0.01, -0.01, -0.01, -0.01], dtype=float32), Array([0., 0., 0., 0.], dtype=float32))

  .. warning::
    Lazy Adam is not dense Adam on a sparse gradient: dense Adam keeps
    moving every row by its momentum even when its gradient is 0. With
    ``catch_up=True`` the moments agree; the drift does not.
    ``optax.clip_by_global_norm`` and other transformations that map over
    every leaf cannot take a ``RowSparse`` (they would scale its ids): use
    :func:`sparse_clip_by_global_norm`.

  References:
    Kingma & Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, ICLR 2015.
  """
  return _lazy_chain(
      _lazy_scaling(b1, b2, eps, eps_root, mu_dtype, nu_dtype=nu_dtype, catch_up=catch_up,
                    moments=moments, nesterov=nesterov, amsgrad=amsgrad),
      learning_rate, None, _stable.options(update_clipping, cautious), b2=b2, eps=eps,
      param_rounding=param_rounding)


def lazy_adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[Any] = None,
    weight_decay: Any = 1e-4,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    *,
    nu_dtype: Optional[Any] = None,
    catch_up: bool = False,
    nesterov: bool = False,
    amsgrad: bool = False,
    update_clipping: bool = False,
    cautious: bool = False,
    decouple_lr: bool = False,
    max_lr: Optional[Any] = None,
    moments: Optional[Any] = None,
    param_rounding: str = 'nearest',
) -> optax.GradientTransformationExtraArgs:
  r"""Lazy AdamW: :func:`lazy_adam` with AdamW's decoupled decay on the touched rows.

  Dense leaves get :func:`adamfx.adamw`'s update, ``-lr * (u + wd * p)``; a
  :class:`RowSparse` leaf's touched rows get the same, and untouched rows
  are not decayed (the lazy semantics: a row costs nothing until used).

  Args:
    learning_rate: :math:`\alpha`, a number >= 0 or an optax schedule.
    b1: decay of the first moment, in [0, 1); default 0.9.
    b2: decay of the second moment, in [0, 1); default 0.999.
    eps: added to the root of the second moment, >= 0; default 1e-8.
    eps_root: added inside the root, >= 0; default 0.
    mu_dtype: storage dtype of the first moment (:func:`adamfx.adamw`'s
      sixth argument, as optax's).
    weight_decay: :math:`\lambda` >= 0, a number or array (for a schedule,
      wrap with :func:`adamfx.inject_hyperparams`); default 1e-4.
    mask: a tree of booleans (or a function of the params returning one)
      selecting the leaves to decay, as in ``optax.add_decayed_weights``.
    nu_dtype: storage dtype of the second moment.
    catch_up: see :func:`scale_by_lazy_adam`.
    nesterov: NAdamW's step on the touched rows (see :func:`scale_by_lazy_adam`).
    amsgrad: AMSGrad's step on the touched rows (see :func:`scale_by_lazy_adam`).
    moments: the moments' storage format (see :func:`scale_by_lazy_adam`).
    update_clipping: see :func:`lazy_adam`.
    cautious: see :func:`lazy_adam`.
    decouple_lr: fully decoupled weight decay, ``(lr_t / max_lr) * wd * p``
      (see :func:`adamfx.adamw`).
    max_lr: the peak learning rate for ``decouple_lr``; default: the
      learning rate (a number); required with a schedule.
    param_rounding: how a new param is rounded to a params dtype narrower
      than float32: ``'nearest'`` (default), ``'kahan'`` (a compensation
      buffer in the params' dtype) or ``'stochastic'``; see
      :func:`adamfx.kahan_init` and the memory guide. ``update`` then
      needs ``params``; float32/float64 leaves are never affected.
      A row-sparse update is made dense when its leaf is rounded.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  Raises:
    ValueError: as :func:`lazy_adam`, and for a negative ``weight_decay``.
    TypeError: for a callable ``weight_decay``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import adamfx
    >>> table = jnp.ones((5, 2))
    >>> tx = adamfx.lazy_adamw(1e-2, weight_decay=0.1)
    >>> state = tx.init(table)
    >>> g = adamfx.RowSparse(jnp.array([0]), jnp.zeros((1, 2)), num_rows=5)
    >>> updates, state = tx.update(g, state, table)
    >>> updates.todense()[:2]  # pure decay of the touched row: -lr * wd * p
    Array([[-0.001, -0.001],
           [ 0.   ,  0.   ]], dtype=float32)

  References:
    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.
  """
  if callable(weight_decay):
    raise TypeError(
        '`weight_decay` of lazy_adamw must be a number or an array, got a'
        ' callable: for a schedule of the weight decay, wrap the builder,'
        ' adamfx.inject_hyperparams(adamfx.lazy_adamw)(learning_rate,'
        ' weight_decay=schedule), which passes the schedule\'s value at each step.'
    )
  _checks.check_non_negative('weight_decay', weight_decay)
  return _lazy_chain(
      _lazy_scaling(b1, b2, eps, eps_root, mu_dtype, nu_dtype=nu_dtype, catch_up=catch_up,
                    moments=moments, nesterov=nesterov, amsgrad=amsgrad),
      learning_rate,
      (_stable.decoupled_weight_decay(weight_decay, learning_rate, decouple_lr, max_lr), mask),
      _stable.options(update_clipping, cautious), b2=b2, eps=eps, param_rounding=param_rounding)
