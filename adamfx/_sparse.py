r"""Row-sparse gradients and lazy (row-sparse) Adam for embedding tables.

The gradient of an embedding lookup touches the rows the batch looked up and
is zero everywhere else. :class:`RowSparse` holds only those rows, and
:func:`lazy_adam` updates only those rows' moments and params (the semantics
of TensorFlow's ``LazyAdam`` and PyTorch's ``torch.optim.SparseAdam``), so a
step costs what the batch touches, not what the table holds. Dense leaves in
the same tree get exactly :func:`adamfx.adam`'s numbers: they go through the
same code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple
from typing import Optional
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamfx import _adam
from adamfx import _checks
from adamfx import _fast
from adamfx import _numerics
from adamfx import _param_rounding
from adamfx import _rounding
from adamfx import _update

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


@jax.tree_util.register_pytree_node_class
class RowSparse:
  """The gradient (or update) of a ``[num_rows, *row_shape]`` leaf, by rows.

  Row ``indices[i]`` of the dense array holds ``values[i]``; rows not listed
  are zero. Duplicate ids mean a sum (as ``torch.sparse`` coalesces). Ids
  outside ``[0, num_rows)`` (a padding id of -1, an id from a larger
  vocabulary) refer to no row: ``todense()`` and ``params + update`` drop
  them, never wrapping around to the last row nor writing past the end
  (:func:`lazy_adam` called eagerly refuses them with a ``ValueError``).

  A ``RowSparse`` is a pytree (its children are ``indices`` and ``values``;
  ``num_rows`` is static), so it crosses ``jit``. ``params + update`` -- what
  ``optax.apply_updates`` computes -- scatter-adds the rows, in place when
  the params are donated.

  Args:
    indices: integer array ``[k]``, the row ids.
    values: array ``[k, *row_shape]``, the rows.
    num_rows: the number of rows of the dense array, a Python int >= 0.

  Raises:
    TypeError: if ``indices`` has a floating or complex dtype (an optax
      transformation that maps over every leaf, ``optax.scale`` say, was
      applied to a ``RowSparse`` and scaled its ids).
    ValueError: if ``num_rows`` is negative. (Shapes are checked where the
      rows are used -- by the optimiser, ``todense()``, ``params + update``
      -- since a tree map may build a ``RowSparse`` of other leaves.)

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
  """

  __array_ufunc__ = None  # numpy arrays defer `array + RowSparse` to us

  def __init__(self, indices: Any, values: Any, num_rows: int):
    dtype = getattr(indices, 'dtype', None)
    if dtype is not None and (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating)
    ):
      raise TypeError(
          f'RowSparse indices must be integers, got dtype {np.dtype(dtype).name}: a'
          ' transformation that maps over every leaf (optax.scale,'
          ' optax.clip_by_global_norm, ...) was applied to a RowSparse update.'
          ' Put the scaling in lazy_adam\'s learning_rate, or use'
          ' adamfx.sparse_clip_by_global_norm.'
      )
    if not isinstance(num_rows, (int, np.integer)) or num_rows < 0:
      raise ValueError(f'RowSparse `num_rows` must be an int >= 0, got {num_rows!r}.')
    self.indices = indices
    self.values = values
    self.num_rows = int(num_rows)

  def tree_flatten(self):
    return (self.indices, self.values), self.num_rows

  @classmethod
  def tree_unflatten(cls, num_rows, children):
    return cls(*children, num_rows)

  @property
  def shape(self) -> tuple[int, ...]:
    """The dense array's shape, ``(num_rows, *row_shape)``."""
    return (self.num_rows, *self.values.shape[1:])

  @property
  def dtype(self) -> Any:
    return self.values.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def todense(self) -> jax.Array:
    """The dense array, with duplicate rows summed and out-of-range ids dropped."""
    return _scatter_add(jnp.zeros(self.shape, self.dtype), self)

  def __add__(self, other: Any) -> jax.Array:
    return _scatter_add(other, self)

  __radd__ = __add__

  def __repr__(self) -> str:
    return (
        f'RowSparse(indices={self.indices!r}, values={self.values!r},'
        f' num_rows={self.num_rows})'
    )


def _is_sparse(x: Any) -> bool:
  return isinstance(x, RowSparse)


def _is_leaf(x: Any) -> bool:
  return x is None or isinstance(x, RowSparse)


def safe_ids(indices: jax.Array, num_rows: int) -> jax.Array:
  """``indices`` as int32, with every id outside ``[0, num_rows)`` set to ``num_rows``.

  ``num_rows`` is out of bounds for a scatter with ``mode='drop'`` (dropped)
  and a gather with ``mode='fill'``; a negative id, which JAX's indexing
  would wrap around, never reaches one.
  """
  ids = jnp.asarray(indices)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f'RowSparse indices must be integers, got dtype {ids.dtype}.')
  if ids.dtype != jnp.int32 and ids.dtype != jnp.int64:
    ids = ids.astype(jnp.int32)
  valid = (ids >= 0) & (ids < num_rows) if jnp.issubdtype(ids.dtype, jnp.signedinteger) else ids < num_rows
  return jnp.where(valid, ids, jnp.asarray(num_rows, ids.dtype))


def _check_shapes(update: RowSparse) -> None:
  ishape = tuple(jnp.shape(update.indices))
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
  ids = safe_ids(update.indices, update.num_rows)
  values = jnp.asarray(update.values).astype(dense.dtype)
  return dense.at[ids].add(values, mode='drop')


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
  ids = safe_ids(update.indices, update.num_rows)
  k = ids.shape[0]
  values = jnp.asarray(update.values)
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
  if isinstance(update.indices, jax.core.Tracer):
    return
  ids = np.asarray(update.indices)
  bad = (ids < 0) | (ids >= update.num_rows)
  if bad.any():
    first = int(ids[np.argmax(bad)])
    raise ValueError(
        f'RowSparse gradient for leaf {_checks._leaf_name(path)} has id {first}'
        f' outside [0, {update.num_rows}) (the leaf\'s rows); {int(bad.sum())} of'
        f' {ids.size} ids are out of range. Under jit such ids update no row;'
        ' eagerly they are refused, as a likely bug (a padding id, ids from a'
        ' larger vocabulary).'
    )


def _check_leaf(path: Any, update: RowSparse, ref: Any) -> None:
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
  if jnp.dtype(update.values.dtype) != jnp.dtype(ref.dtype):
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
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  last_step: Optional[optax.Updates] = None


def _row_zeros(p: Any) -> jax.Array:
  """int32 zeros ``[num_rows]``, sharded as ``p``'s rows when ``p`` is sharded."""
  z = jnp.zeros(p.shape[:1], jnp.int32)
  sharding = getattr(p, 'sharding', None)
  if isinstance(sharding, jax.sharding.NamedSharding) and not isinstance(p, jax.core.Tracer):
    spec = tuple(sharding.spec)
    z = jax.device_put(z, jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec(spec[0] if spec else None)))
  return z


def _store(m_new, v_new, m, v, count, i):
  """Stores moments as :func:`adamfx._update._family_update` does."""
  if _update._in_place(m_new.dtype, m.dtype, v.dtype):
    return m_new, v_new
  m_out = _numerics.saturate(m_new, m.dtype)
  v_out = _numerics.keep_positive(_rounding.store_second_moment(v_new, v.dtype, count, i), v_new)
  return m_out, v_out


def _sparse_leaf(g, m, v, last, count, b1, b2, eps, eps_root, scalars, i):
  """Lazy Adam on the rows of one leaf that ``g`` touches."""
  ids, g_rows, valid = coalesce(g)
  m_rows = m.at[ids].get(mode='fill', fill_value=0)
  v_rows = v.at[ids].get(mode='fill', fill_value=0)
  if last is not None:
    # Rows untouched since step s decay as dense Adam's would have over the
    # steps s+1 .. t-1, where their gradient was 0: by b**(t-1-s).
    gap = (count - 1) - last.at[ids].get(mode='fill', fill_value=0)
    cdt = _numerics.compute_dtype(g_rows.dtype, m.dtype, v.dtype)
    shape = (ids.shape[0],) + (1,) * (m_rows.ndim - 1)
    d1 = jax.lax.pow(jnp.asarray(b1, cdt) * jnp.ones(shape, cdt), gap.reshape(shape))
    d2 = jax.lax.pow(jnp.asarray(b2, cdt) * jnp.ones(shape, cdt), gap.reshape(shape))
    m_rows = (m_rows.astype(cdt) * d1).astype(m.dtype)
    v_rows = (v_rows.astype(cdt) * d2).astype(v.dtype)
    last = last.at[ids].set(count, mode='drop')
  u, m_new, v_new, _ = _update._moment_step(
      g_rows, m_rows, v_rows, None, count, b1, b2, eps, eps_root,
      nesterov=False, amsgrad=False, infinity_norm=False, scalars=scalars,
  )
  m_new, v_new = _store(m_new, v_new, m_rows, v_rows, count, i)
  u = jnp.where(valid.reshape((-1,) + (1,) * (u.ndim - 1)), u, 0).astype(g.dtype)
  m = m.at[ids].set(m_new, mode='drop')
  v = v.at[ids].set(v_new, mode='drop')
  return RowSparse(ids, u, g.num_rows), m, v, last


def scale_by_lazy_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    catch_up: bool = False,
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
    catch_up: keep ``last_step`` and decay a row's moments over the steps it
      missed (costs an int32 per row).

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
  _adam._check_adam_args(b1, b2, eps, eps_root, None, None)

  def init_fn(params):
    base = _update._family_init(params, None, None, False)
    last = None
    if catch_up:
      last = jax.tree.map(lambda p: _row_zeros(p) if p.ndim >= 1 else None, base.mu)
    return LazyAdamState(count=base.count, mu=base.mu, nu=base.nu, last_step=last)

  def update_fn(updates, state, params=None):
    del params
    if isinstance(updates, LazyAdamState):  # pragma: no cover - misuse guard
      raise TypeError('scale_by_lazy_adam.update got a state as its updates.')
    leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_leaf)
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_leaf)[0]]
    try:
      m_leaves = treedef.flatten_up_to(state.mu)
      v_leaves = treedef.flatten_up_to(state.nu)
    except (ValueError, TypeError):
      dense_like = jax.tree.map(
          lambda u: jax.ShapeDtypeStruct(u.shape, u.dtype) if _is_sparse(u) else u,
          updates, is_leaf=_is_leaf,
      )
      _checks.check_matching_trees(dense_like, state.mu)
      raise
    if catch_up:
      l_leaves = treedef.flatten_up_to(state.last_step) if state.last_step is not None else None
      if l_leaves is None:
        raise ValueError('catch_up=True needs a state made by the same transformation.')
    else:
      l_leaves = [None] * len(leaves)
    sparse = [i for i, u in enumerate(leaves) if _is_sparse(u)]
    for i in sparse:
      _check_leaf(paths[i], leaves[i], m_leaves[i])
      _check_ids(paths[i], leaves[i])

    # Dense leaves: adamfx.adam's own update, on the tree with the sparse
    # leaves set to None (same leaf order, so the same stochastic-rounding
    # streams for 16-bit nu).
    hole = lambda xs: jax.tree.unflatten(
        treedef, [None if i in sparse else x for i, x in enumerate(xs)]
    )
    dense_updates, dense_state = _fast.family_update(
        hole(leaves), _update.AdamState(state.count, hole(m_leaves), hole(v_leaves)),
        b1, b2, eps, eps_root,
    )
    count = dense_state.count
    out_u = treedef.flatten_up_to(dense_updates)
    out_m = treedef.flatten_up_to(dense_state.mu)
    out_v = treedef.flatten_up_to(dense_state.nu)
    out_l = list(l_leaves)
    if catch_up:
      for i, u in enumerate(leaves):
        if u is not None and not _is_sparse(u) and out_l[i] is not None:
          out_l[i] = jnp.full_like(out_l[i], count)
    if sparse:
      _checks.check_hyperparam_dtype('b1', b1)
      _checks.check_hyperparam_dtype('b2', b2)
      scalars = {}
      for i in sparse:
        out_u[i], out_m[i], out_v[i], out_l[i] = _sparse_leaf(
            leaves[i], m_leaves[i], v_leaves[i], l_leaves[i], count,
            b1, b2, eps, eps_root, scalars, i,
        )
    unflatten = lambda xs: jax.tree.unflatten(treedef, xs)
    new_state = LazyAdamState(
        count=count, mu=unflatten(out_m), nu=unflatten(out_v),
        last_step=unflatten(out_l) if catch_up else None,
    )
    return unflatten(out_u), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _with_holes(tree: Any):
  """``(leaves, treedef, sparse positions, tree with RowSparse leaves as None)``."""
  leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_leaf)
  sparse = [i for i, u in enumerate(leaves) if _is_sparse(u)]
  holed = jax.tree.unflatten(treedef, [None if i in sparse else u for i, u in enumerate(leaves)])
  return leaves, treedef, sparse, holed


def _scale_rows(update: RowSparse, step: Any) -> RowSparse:
  with jax.numpy_dtype_promotion('standard'):
    values = (step * update.values).astype(update.values.dtype)
  return RowSparse(update.indices, values, update.num_rows)


def _sparse_learning_rate(learning_rate: ScalarOrSchedule) -> optax.GradientTransformation:
  """adamfx's learning-rate link for dense leaves; ``-lr * values`` for RowSparse ones."""
  dense = _adam._scale_by_learning_rate(learning_rate)

  def update_fn(updates, state, params=None):
    leaves, treedef, sparse, holed = _with_holes(updates)
    if params is not None and sparse:
      params = jax.tree.unflatten(
          treedef, [None if i in sparse else p for i, p in
                    enumerate(treedef.flatten_up_to(params))]
      )
    new, new_state = dense.update(holed, state, params)
    if not sparse:
      return new, new_state
    if callable(learning_rate):
      step = -1 * learning_rate(state.count)
    else:
      step = -1 * learning_rate
    out = treedef.flatten_up_to(new)
    for i in sparse:
      out[i] = _scale_rows(leaves[i], step)
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformation(dense.init, update_fn)


def _sparse_decay(weight_decay: Any, mask: Any) -> optax.GradientTransformation:
  """AdamW's decoupled decay, ``u + wd * p``; on a RowSparse leaf, on its rows."""
  if callable(weight_decay):
    raise TypeError(
        '`weight_decay` of lazy_adamw must be a number or an array, got a'
        ' callable; for a schedule, use adamfx.inject_hyperparams(lazy_adamw).'
    )
  _checks.check_non_negative('weight_decay', weight_decay)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('lazy_adamw needs `params` in update() for the weight decay.')
    leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_leaf)
    p_leaves = treedef.flatten_up_to(params)
    m = mask(params) if callable(mask) else mask
    m_leaves = [True] * len(leaves) if m is None else treedef.flatten_up_to(m)
    out = []
    with jax.numpy_dtype_promotion('standard'):
      for u, p, keep in zip(leaves, p_leaves, m_leaves):
        if u is None or not keep:
          out.append(u)
        elif _is_sparse(u):
          ids, _, _ = u.indices, None, None
          rows = jnp.asarray(p).at[safe_ids(ids, u.num_rows)].get(mode='fill', fill_value=0)
          out.append(RowSparse(
              u.indices, (u.values + weight_decay * rows).astype(u.values.dtype), u.num_rows
          ))
        else:
          out.append((u + weight_decay * p).astype(u.dtype))
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def lazy_adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    catch_up: bool = False,
    param_rounding: str = 'nearest',
) -> optax.GradientTransformation:
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
    catch_up: decay a row's moments over the steps it missed when it is next
      touched (see :func:`scale_by_lazy_adam`).
    param_rounding: how a new param is rounded to a params dtype narrower
      than float32: ``'nearest'`` (default), ``'kahan'`` (a compensation
      buffer in the params' dtype) or ``'stochastic'``; see
      :func:`adamfx.kahan_init` and the memory guide. ``update`` then
      needs ``params``; float32/float64 leaves are never affected.
      A row-sparse update is made dense when its leaf is rounded.

  Returns:
    An ``optax.GradientTransformation``; its state is ``(LazyAdamState,
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
  _param_rounding.check_mode(param_rounding)
  return _param_rounding.with_param_rounding(optax.chain(
      scale_by_lazy_adam(b1, b2, eps, eps_root, catch_up=catch_up),
      _sparse_learning_rate(learning_rate),
  ), param_rounding)


def lazy_adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: Any = 1e-4,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    *,
    catch_up: bool = False,
    param_rounding: str = 'nearest',
) -> optax.GradientTransformation:
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
    weight_decay: :math:`\lambda` >= 0, a number or array (for a schedule,
      wrap with :func:`adamfx.inject_hyperparams`); default 1e-4.
    mask: a tree of booleans (or a function of the params returning one)
      selecting the leaves to decay, as in ``optax.add_decayed_weights``.
    catch_up: see :func:`scale_by_lazy_adam`.
    param_rounding: how a new param is rounded to a params dtype narrower
      than float32: ``'nearest'`` (default), ``'kahan'`` (a compensation
      buffer in the params' dtype) or ``'stochastic'``; see
      :func:`adamfx.kahan_init` and the memory guide. ``update`` then
      needs ``params``; float32/float64 leaves are never affected.
      A row-sparse update is made dense when its leaf is rounded.

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params``.

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
  _param_rounding.check_mode(param_rounding)
  return _param_rounding.with_param_rounding(optax.chain(
      scale_by_lazy_adam(b1, b2, eps, eps_root, catch_up=catch_up),
      _sparse_decay(weight_decay, mask),
      _sparse_learning_rate(learning_rate),
  ), param_rounding)
