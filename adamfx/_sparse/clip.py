"""Global-norm clipping that understands :class:`RowSparse` leaves.

``optax.clip_by_global_norm`` maps over every array of the tree; on a
``RowSparse`` it would count the ids in the norm and scale them. It fails
at trace time instead (``lax.select`` refuses the int ids beside the float
scaled ones: a ``TypeError``), never silently. Use
:func:`sparse_clip_by_global_norm` in its place.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from adamfx._sparse.lazy import _is_leaf
from adamfx._sparse.lazy import _is_sparse
from adamfx._sparse.lazy import coalesce


def _sum_sq(x: Any) -> jax.Array:
  if _is_sparse(x):
    _, values, _ = coalesce(x)  # duplicates summed first: the dense norm
    x = values
  x = jnp.asarray(x)
  return jnp.sum(jnp.real(x * jnp.conj(x)) if jnp.iscomplexobj(x) else x * x)


def sparse_global_norm(updates: Any) -> jax.Array:
  """The global L2 norm of ``updates``, with :class:`RowSparse` leaves as their dense arrays.

  Duplicate ids are summed before squaring and out-of-range ids are left
  out, so the result is ``optax.tree.norm`` of the dense tree.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adamfx
    >>> g = adamfx.RowSparse(jnp.array([1, 1]), jnp.ones((2, 3)), num_rows=5)
    >>> adamfx.sparse_global_norm({'t': g, 'b': jnp.zeros(2)})  # sqrt(3 * 2**2)
    Array(3.4641016, dtype=float32)
  """
  leaves = [x for x in jax.tree.leaves(updates, is_leaf=_is_leaf) if x is not None]
  if not leaves:
    return jnp.zeros([], jnp.float32)
  sums = [_sum_sq(x) for x in leaves]
  dtype = jnp.result_type(*[s.dtype for s in sums])
  return jnp.sqrt(sum(s.astype(dtype) for s in sums))


def sparse_clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """``optax.clip_by_global_norm`` for trees with :class:`RowSparse` leaves.

  The norm is :func:`sparse_global_norm`; when it exceeds ``max_norm``, the
  dense leaves and the ``RowSparse`` values are scaled by ``max_norm /
  norm``, as optax does, and the ids are left alone. Chain it before
  :func:`adamfx.lazy_adam`.

  Args:
    max_norm: the largest global norm, > 0.

  Returns:
    An ``optax.GradientTransformation`` with an empty state.

  Raises:
    ValueError: if a concrete ``max_norm`` is not positive.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import adamfx
    >>> tx = optax.chain(adamfx.sparse_clip_by_global_norm(1.0), adamfx.lazy_adam(1e-3))
    >>> g = adamfx.RowSparse(jnp.array([0]), jnp.full((1, 2), 10.0), num_rows=3)
    >>> clipped, _ = adamfx.sparse_clip_by_global_norm(1.0).update(g, optax.EmptyState())
    >>> float(adamfx.sparse_global_norm(clipped))
    1.0
  """
  if isinstance(max_norm, (int, float)) and not max_norm > 0:
    raise ValueError(f'`max_norm` must be > 0, got {max_norm!r}.')

  def update_fn(updates, state, params=None):
    del params
    g_norm = sparse_global_norm(updates)
    trigger = jnp.squeeze(g_norm < max_norm)

    def clip(t):
      with jax.numpy_dtype_promotion('standard'):
        scaled = ((t / g_norm.astype(t.dtype)) * max_norm).astype(t.dtype)
      return jax.lax.select(trigger, t, scaled)

    def leaf(x):
      if x is None:
        return None
      if _is_sparse(x):
        return x.with_values(clip(jnp.asarray(x.values)))
      return clip(jnp.asarray(x))

    return jax.tree.map(leaf, updates, is_leaf=_is_leaf), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
