r"""Sharding helpers: ZeRO-1 layouts for the optimiser state.

adamfx's state already follows the params' shardings (see
:func:`adamfx._core.numerics.zeros_like`): under plain data or model parallelism
there is nothing to do. ZeRO stage 1 (Rajbhandari et al. 2020) goes further
for data parallelism: the params stay replicated on every device, but each
device keeps only a :math:`1/N` slice of the optimiser state, so Adam's two
moments cost :math:`2P/N` floats per device instead of :math:`2P`.
:func:`zero1_shardings` computes those layouts, for use as ``jax.jit``
``in_shardings``/``out_shardings``; XLA then updates each slice where it lives
and all-gathers the updates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from typing import Union

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

AxisNames = Union[str, Sequence[str]]


def _as_tuple(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def _same_mesh(a: Any, b: Mesh) -> bool:
  try:
    return tuple(a.axis_names) == tuple(b.axis_names) and dict(a.shape) == dict(b.shape) and (
        [d.id for d in a.devices.flat] == [d.id for d in b.devices.flat]
    )
  except AttributeError:  # An abstract mesh has no devices.
    return False


def _base_spec(leaf: Any, mesh: Mesh, ndim: int) -> list[tuple[str, ...]]:
  """The leaf's own spec on ``mesh`` (model parallelism), one tuple per dim."""
  spec: list[tuple[str, ...]] = [()] * ndim
  sharding = getattr(leaf, 'sharding', None)
  if isinstance(sharding, NamedSharding) and _same_mesh(sharding.mesh, mesh):
    for d, entry in enumerate(tuple(sharding.spec)[:ndim]):
      spec[d] = _as_tuple(entry)
  return spec


def state_layout(tx: Any, params: Any) -> Any:
  """Shapes, dtypes and shardings of ``tx.init(params)``, allocating nothing.

  The layout ``jax.jit(tx.init)`` gives the state: for adamfx, each moment
  with its param's sharding (and ``count`` replicated). Read from the
  compiled ``init``, so it is what XLA will actually do, also under an
  ``Auto`` mesh where ``jax.eval_shape`` knows no shardings. Feed it to
  :func:`zero1_shardings` to add a data-parallel split on top of the
  params' model-parallel layout.

  Args:
    tx: an ``optax.GradientTransformation`` (any, not only adamfx's).
    params: the params, as arrays or ``jax.ShapeDtypeStruct`` with shardings.

  Returns:
    A pytree of ``jax.ShapeDtypeStruct`` (with ``sharding``) shaped like the
    state.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import adamfx
    >>> layout = adamfx.state_layout(adamfx.adam(1e-3), {'w': jnp.zeros((4, 3))})
    >>> layout[0].mu['w'].shape, layout[0].mu['w'].dtype
    ((4, 3), dtype('float32'))
  """
  shapes = jax.eval_shape(tx.init, params)
  shardings = jax.jit(tx.init).lower(params).compile().output_shardings
  return jax.tree.map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      shapes, shardings,
  )


def zero1_shardings(tree: Any, mesh: Mesh, axis: AxisNames = 'data') -> Any:
  r"""Shardings that split every leaf of ``tree`` over a data-parallel axis.

  For ZeRO-1, pass the optimiser state's layout (:func:`state_layout`, or
  ``jax.eval_shape(tx.init, params)`` when the params are replicated): each
  leaf is split over ``axis`` on
  its first dimension whose size divides evenly, and kept whole (replicated
  over ``axis``) where none does -- ``count``, scalars, odd shapes. A leaf
  that already carries a ``NamedSharding`` on ``mesh`` (model parallelism:
  ``P(None, 'model')``) keeps it, and ``axis`` is added on top; a leaf
  already split over ``axis`` is left as it is. Each device then holds
  :math:`1/N` of every split leaf, with :math:`N` the size of ``axis``.

  The result has the structure of ``tree`` (``None`` stays ``None``) and
  works for any optax state, not only adamfx's.

  Args:
    tree: a pytree of arrays, ``jax.ShapeDtypeStruct`` (with or without a
      ``sharding``) or anything with ``shape``; typically
      ``adamfx.state_layout(tx, params)``.
    mesh: the ``jax.sharding.Mesh`` to lay the state out on.
    axis: the data-parallel mesh axis name (or a tuple of names, split over
      together); default ``'data'``.

  Returns:
    A pytree of ``jax.sharding.NamedSharding`` with the structure of ``tree``.

  Raises:
    ValueError: if ``axis`` is not an axis of ``mesh``.
    TypeError: if a leaf has no ``shape``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import adamfx
    >>> mesh = jax.make_mesh((1,), ('data',))
    >>> params = {'w': jnp.zeros((4, 3)), 'b': jnp.zeros(3)}
    >>> tx = adamfx.adam(1e-3)
    >>> shardings = adamfx.zero1_shardings(adamfx.state_layout(tx, params), mesh)
    >>> shardings[0].mu['w'].spec, shardings[0].count.spec
    (P('data',), P())

  References:
    Rajbhandari, Rasley, Ruwase & He, `ZeRO: Memory Optimizations Toward
    Training Trillion Parameter Models <https://arxiv.org/abs/1910.02054>`_,
    SC 2020.
  """
  axes = _as_tuple(axis)
  unknown = [a for a in axes if a not in mesh.axis_names]
  if not axes or unknown:
    raise ValueError(
        f'`axis` must name axes of the mesh {tuple(mesh.axis_names)}, got'
        f' {axis!r}.'
    )
  n = math.prod(mesh.shape[a] for a in axes)

  def one(path, leaf):
    shape = getattr(leaf, 'shape', None)
    if shape is None:
      raise TypeError(
          f'Leaf {jax.tree_util.keystr(path) or "<root>"} of type'
          f' {type(leaf).__name__} has no shape: pass arrays or'
          ' jax.ShapeDtypeStruct, e.g. adamfx.state_layout(tx, params).'
      )
    spec = _base_spec(leaf, mesh, len(shape))
    used = {a for entry in spec for a in entry}
    if not used.intersection(axes):
      for d, size in enumerate(shape):
        ways = math.prod(mesh.shape[a] for a in spec[d]) * n
        if size >= ways and size % ways == 0:
          spec[d] = spec[d] + axes
          break
    entries = [None if not e else (e[0] if len(e) == 1 else e) for e in spec]
    while entries and entries[-1] is None:
      entries.pop()
    return NamedSharding(mesh, PartitionSpec(*entries))

  return jax.tree_util.tree_map_with_path(one, tree)


def _pin(ref: Any, x: Any) -> Any:
  """``x`` laid out like ``ref`` (an array of its shape), where the mesh is Auto.

  Traced: ``shard_alike``, so XLA gives both one sharding (``ref``, an input
  of the step, brings its own). Concrete (``jax_disable_jit``): a
  ``device_put`` onto ``ref``'s ``NamedSharding``. On Explicit axes the types
  already carry the shardings (the steps pin them under ``auto_axes``).
  """
  if ref is None or x is None or getattr(ref, 'shape', None) != getattr(x, 'shape', None):
    return x
  for a in (ref, x):
    mesh = getattr(getattr(jax.typeof(a), 'sharding', None), 'mesh', None)
    if any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, 'axis_types', ()) or ()):
      return x
  if isinstance(ref, jax.core.Tracer) or isinstance(x, jax.core.Tracer):
    from jax.experimental.shard_alike import shard_alike  # pylint: disable=g-import-not-at-top
    return shard_alike(ref, x)[1]
  sharding = getattr(ref, 'sharding', None)
  if isinstance(sharding, NamedSharding) and not x.sharding.is_equivalent_to(sharding, x.ndim):
    return jax.device_put(x, sharding)
  return x


def follow(g: Any, olds: Any, u: Any, news: Any) -> tuple[Any, Any]:
  """One leaf's step outputs laid out like its inputs, on Auto meshes (issue 24 item 2).

  ``news`` (the new stored moments: codes, scales) of the param's rank keep
  the layout of ``olds`` (the same shapes; the state's layout, the params'
  since init),
  and the update ``u`` that of an old array of the param's shape (8-bit
  codes), else of the gradient ``g``. Without this, XLA's propagation
  through a step that views a leaf as flattened blocks loses its layout
  (8-bit codes on ``P('data')`` of a ``P('data', 'model')`` param, 4-bit
  updates replicated over ``'model'``).
  """
  old_leaves = jax.tree.leaves(olds)
  new_leaves, treedef = jax.tree.flatten(news)
  if len(old_leaves) != len(new_leaves):
    return u, news
  # Per-block arrays of another rank than the param (the scales of a leaf
  # blocked as a whole) are left to XLA: a group with an old array that is
  # replicated may come out split over an axis the propagation brings in.
  ndim = getattr(g, 'ndim', None)
  pinned = [_pin(a, b) if getattr(b, 'ndim', None) == ndim else b
            for a, b in zip(old_leaves, new_leaves)]
  ref = next((a for a in old_leaves if getattr(a, 'shape', None) == getattr(u, 'shape', ())), g)
  return _pin(ref, u), jax.tree.unflatten(treedef, pinned)
