"""Row-sparse gradients of embedding tables, without a table-sized gradient.

``jax.grad`` of ``table[ids]`` is a dense, table-sized array that is zero
almost everywhere. :func:`value_and_row_sparse_grad` instead gathers the rows
first and differentiates the function with respect to the gathered rows, so
the gradient is ``[k, *row_shape]``, returned as a :class:`RowSparse`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from adamfx._sparse.lazy import RowSparse
from adamfx._sparse.lazy import gather_rows
from adamfx._sparse.lazy import safe_ids


class _Marker:
  __slots__ = ('i',)

  def __init__(self, i: int):
    self.i = i


def _table_positions(where: Callable[[Any], Any], leaves: list, treedef: Any) -> list[int]:
  """The flat positions of the leaves ``where`` selects (the eqx.tree_at way)."""
  markers = jax.tree.unflatten(treedef, [_Marker(i) for i in range(len(leaves))])
  picked = where(markers)
  found = jax.tree.leaves(picked, is_leaf=lambda x: isinstance(x, _Marker))
  if not found or not all(isinstance(x, _Marker) for x in found):
    raise ValueError(
        '`where` must return a leaf of the params (the embedding table), or a'
        f' tuple of them; it returned {picked!r}.'
    )
  return [x.i for x in found]


def _inexact(x: Any) -> bool:
  return isinstance(x, (jax.Array, jnp.ndarray)) and jnp.issubdtype(x.dtype, jnp.inexact)


# Ops that only move or retype the rows: a matrix product after them is
# still a product with the whole table of gathered rows.
_FOLLOW = frozenset({
    'transpose', 'convert_element_type', 'reshape', 'copy', 'copy_p', 'squeeze',
    'expand_dims', 'broadcast_in_dim', 'rev',
})
_MATRIX = frozenset({'dot_general', 'conv_general_dilated', 'ragged_dot_general'})


def _matrix_use(jaxpr: Any, var: Any) -> Any:
  """The first matrix product (``h @ table.T``) that takes ``var`` whole, or None."""
  targets = {var}
  for eqn in jaxpr.eqns:
    hit = [k for k, v in enumerate(eqn.invars) if type(v).__name__ != 'Literal' and v in targets]
    if not hit:
      continue
    name = eqn.primitive.name
    if name in _MATRIX:
      return name
    if name in _FOLLOW:
      targets.update(eqn.outvars)
      continue
    for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
      sub = eqn.params.get(key)
      if sub is None or not hasattr(getattr(sub, 'jaxpr', sub), 'eqns'):
        continue
      sub = getattr(sub, 'jaxpr', sub)
      for k in hit:
        if k < len(sub.invars):
          found = _matrix_use(sub, sub.invars[k])
          if found:
            return found
  return None


def _refuse_matrix_use(inner: Callable[[list], Any], start: list, tables: list[int]) -> None:
  """Refuses a table whose gathered rows ``fun`` multiplies as a matrix.

  ``fun`` sees the rows the ids gathered, not the table: ``h @ table.T``
  (an output projection tied to the embedding) would silently be a product
  with ``k`` rows instead of the vocabulary.
  """
  jaxpr = jax.make_jaxpr(inner)(start).jaxpr
  for k in tables:
    found = _matrix_use(jaxpr, jaxpr.invars[k])
    if found:
      raise ValueError(
          'value_and_row_sparse_grad: `fun` uses a table that `where` picked as a'
          f' matrix ({found}, e.g. `h @ table.T`), but it gets only the rows the ids'
          ' gathered. A table tied to an output projection (lookup + h @ table.T)'
          ' has a dense gradient: leave it out of `where` and take'
          ' jax.value_and_grad of the model as written for the whole table'
          ' (adamfx.lazy_adam steps a dense leaf exactly as adamfx.adam). If a'
          ' product over the gathered rows is what you mean (a sampled softmax'
          ' over the looked-up rows), index them first: p[...][positions] @ w.'
      )


def value_and_row_sparse_grad(
    fun: Callable[..., Any],
    where: Callable[[Any], Any],
    *,
    has_aux: bool = False,
) -> Callable[..., tuple[Any, Any]]:
  """``jax.value_and_grad`` of ``fun``, with a :class:`RowSparse` gradient for the tables.

  The returned function takes ``(params, ids, *args, **kwargs)``. For each
  table leaf ``where(params)`` selects, it gathers ``rows = table[ids]``
  (``[k, *row_shape]``; out-of-range ids gather zeros) and calls
  ``fun(params_with_rows, *args, **kwargs)``, where the table leaf is
  replaced by ``rows``. ``fun`` must therefore look rows up by *position*
  in ``ids`` (``rows[j]`` is row ``ids[j]``), not by id: for a batch of token
  ids ``x``, pass ``ids = x.reshape(-1)`` and look up
  ``jnp.arange(x.size).reshape(x.shape)``. The gradient is taken with respect
  to the gathered rows, so nothing table-sized is ever made; it is returned
  as ``RowSparse(ids, d rows, num_rows)``, which :func:`adamfx.lazy_adam`
  takes directly (duplicate ids are summed there).

  A table tied to an output projection (the same leaf used for the lookup
  and as ``h @ table.T``) is refused with a ``ValueError``: ``fun`` gets
  the gathered rows, not the table, and its gradient is dense (the
  projection touches every row); take ``jax.value_and_grad`` for such a
  table (see the sparse guide).

  Only inexact (floating or complex) array leaves are differentiated; other
  leaves (an Equinox module's functions, integer buffers) get ``None``, as
  ``equinox.filter_grad`` does.

  Args:
    fun: the loss, ``fun(params, *args, **kwargs) -> scalar`` (or
      ``(scalar, aux)`` with ``has_aux``), written for gathered rows.
    where: ``where(params)`` returns the table leaf, or a tuple of them (as
      in ``equinox.tree_at``); for a Flax NNX ``State``, the table's
      ``Variable`` or its value. A table may appear several times, with one
      id array each (centre and context words of one table): ``fun`` then
      gets the rows of all its id arrays concatenated in that order (the
      second array's rows start at position ``len(ids_1)``), and the
      gradient is one ``RowSparse`` over all of them.
    has_aux: whether ``fun`` returns ``(value, aux)``.

  Returns:
    ``vg(params, ids, *args, **kwargs) -> (value, grads)`` (``((value, aux),
    grads)`` with ``has_aux``), ``grads`` shaped like ``params`` with
    :class:`RowSparse` leaves for the tables. ``ids`` is one integer array,
    or a tuple of them matching ``where``'s tuple.

  Raises:
    ValueError: if ``where`` does not pick leaves of ``params``, the number
      of id arrays does not match the number of tables, or ``fun`` multiplies
      a table's gathered rows as a matrix (a tied output projection).

  Examples:
    A plain function, an embedding bag with a dense head:

    >>> import jax, jax.numpy as jnp
    >>> import adamfx
    >>> params = {'emb': jnp.ones((1000, 4)), 'w': jnp.ones(4)}
    >>> tokens = jnp.array([[3, 5, 3], [7, 7, 1]])  # a batch of 2 bags
    >>> def loss(p, positions):  # p['emb'] holds the gathered rows
    ...   bags = p['emb'][positions].sum(axis=1)  # [2, 4]
    ...   return jnp.sum((bags @ p['w']) ** 2)
    >>> positions = jnp.arange(tokens.size).reshape(tokens.shape)
    >>> vg = adamfx.value_and_row_sparse_grad(loss, where=lambda p: p['emb'])
    >>> value, grads = vg(params, tokens.reshape(-1), positions)
    >>> grads['emb'].values.shape, grads['emb'].num_rows
    ((6, 4), 1000)

    See ``docs/guides/sparse.md`` for Flax NNX and Equinox models.
  """

  def vg(params, ids, *args, **kwargs):
    leaves, treedef = jax.tree.flatten(params)
    positions = _table_positions(where, leaves, treedef)
    id_list = list(ids) if isinstance(ids, (tuple, list)) else [ids]
    if len(id_list) != len(positions):
      raise ValueError(
          f'`where` picks {len(positions)} table(s) but {len(id_list)} id array(s)'
          ' were given: pass one id array per table, in the same order.'
      )
    picked = {}
    for pos, i in zip(positions, id_list):
      table = leaves[pos]
      if not _inexact(table) or table.ndim < 1:
        raise ValueError(
            f'`where` picked a leaf of type {type(table).__name__} and shape'
            f' {getattr(table, "shape", None)}; a table must be a floating array of'
            ' rank >= 1.'
        )
      # A table picked several times (centre and context words of one
      # table) keeps every id array: its rows are those of all of them, in
      # order (issue 18: only the last was kept).
      picked.setdefault(pos, []).append(jnp.asarray(i).reshape(-1))
    table_ids = {}
    for pos, id_arrays in picked.items():
      n = leaves[pos].shape[0]
      if len({a.dtype for a in id_arrays}) > 1:  # no promotion: each range-checked first
        id_arrays = [safe_ids(a, n) for a in id_arrays]
      i = id_arrays[0] if len(id_arrays) == 1 else jnp.concatenate(id_arrays)
      table_ids[pos] = (i, safe_ids(i, n))
    diff = [
        j for j, x in enumerate(leaves) if j in table_ids or _inexact(x)
    ]
    start = []
    for j in diff:
      if j in table_ids:
        start.append(gather_rows(leaves[j], table_ids[j][1]))
      else:
        start.append(leaves[j])

    def inner(diff_leaves):
      full = list(leaves)
      for j, x in zip(diff, diff_leaves):
        full[j] = x
      return fun(jax.tree.unflatten(treedef, full), *args, **kwargs)

    _refuse_matrix_use(inner, start, [k for k, j in enumerate(diff) if j in table_ids])
    value, d = jax.value_and_grad(inner, has_aux=has_aux)(start)
    out = [None] * len(leaves)
    for j, g in zip(diff, d):
      if j in table_ids:
        out[j] = RowSparse(table_ids[j][0], g, leaves[j].shape[0])
      else:
        out[j] = g
    return value, jax.tree.unflatten(treedef, out)

  return vg


def row_sparse_grad(
    fun: Callable[..., Any],
    where: Callable[[Any], Any],
    *,
    has_aux: bool = False,
) -> Callable[..., Any]:
  """The gradient part of :func:`value_and_row_sparse_grad` (``(grads, aux)`` with ``has_aux``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import adamfx
    >>> g = adamfx.row_sparse_grad(lambda p: jnp.sum(p['emb'] ** 2), where=lambda p: p['emb'])
    >>> grads = g({'emb': jnp.ones((10, 2))}, jnp.array([4, 4]))
    >>> grads['emb'].todense()[4]  # the duplicate id sums: 2 * (2 * 1)
    Array([4., 4.], dtype=float32)
  """
  vg = value_and_row_sparse_grad(fun, where, has_aux=has_aux)

  def g(params, ids, *args, **kwargs):
    value, grads = vg(params, ids, *args, **kwargs)
    if has_aux:
      return grads, value[1]
    return grads

  return g
