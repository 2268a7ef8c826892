"""Flat-parameter mode: a model's params kept as one buffer per dtype.

An Adam step over thousands of small leaves is dominated by per-leaf loops
(each leaf's moments and params are separate buffers, each a separate loop in
the compiled step), not by arithmetic. Keeping the params as a few flat
buffers (one per dtype) makes the whole optimiser step a handful of loops.
The tree is rebuilt inside the loss with the returned ``unravel``, in the
spirit of ``jax.flatten_util.ravel_pytree`` -- but each dtype keeps its own
buffer, so no leaf changes dtype and the optimiser's numbers are those of the
tree-shaped params (its update is element-wise).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamfx._core import checks as _checks


def _sharded(x: Any) -> bool:
  if isinstance(x, jax.core.Tracer):
    # Traced on an Explicit mesh, the sharding is part of the type (issue 18:
    # jax.jit(pack_state(...).init) there raised JAX's ShardingTypeError).
    spec = getattr(getattr(jax.typeof(x), 'sharding', None), 'spec', None)
    return spec is not None and any(s is not None for s in spec)
  sharding = getattr(x, 'sharding', None)
  if sharding is None:
    return False
  return len(sharding.device_set) > 1 and not sharding.is_fully_replicated


def _n_devices(x: Any) -> int:
  if isinstance(x, jax.core.Tracer):  # Explicit axes: the mesh is in the type
    sharding = jax.typeof(x).sharding
    return int(np.prod([sharding.mesh.shape[a] for s in sharding.spec if s is not None
                        for a in ((s,) if isinstance(s, str) else s)]))
  return len(x.sharding.device_set)


def ravel_params(params: Any) -> tuple[dict[str, jax.Array], Callable[[Any], Any]]:
  r"""Packs a tree of arrays into one flat buffer per dtype.

  Use the flat buffers as the params of any adamfx (or optax) optimiser and
  rebuild the tree inside the loss: the optimiser step then runs over a few
  buffers instead of one per leaf, which for models of many small leaves is
  several times faster and compiles in a fraction of the time. Every leaf
  keeps its dtype, so the updates are the same numbers as with the tree:
  bit for bit on array leaves (0-d leaves, compiled by XLA as scalar code, may
  differ by one ulp), except where a 16-bit second moment is stochastically
  rounded, whose random bits are drawn per buffer, not per leaf.

  .. math::

    \mathrm{flat}[d] = \mathrm{concat}(\mathrm{ravel}(x) \text{ for leaves }
      x \text{ of dtype } d, \text{ in tree order})

  Args:
    params: a tree of arrays (or tracers). Leaves sharded over several devices
      are refused: concatenating them would gather them.

  Returns:
    ``(flat, unravel)``: ``flat`` a dict from dtype name to a 1-D array;
    ``unravel(flat)`` the tree again (works on tracers, so call it inside the
    loss, and on gradients of ``flat``).

  Raises:
    ValueError: if a leaf is sharded over several devices.
    TypeError: if a leaf is not an array.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import adamfx
    >>> params = {'w': jnp.ones((2, 3)), 'b': jnp.zeros(3)}
    >>> flat, unravel = adamfx.ravel_params(params)
    >>> flat['float32'].shape
    (9,)
    >>> loss = lambda p: jnp.sum(p['w'] ** 2) + jnp.sum(p['b'])
    >>> tx = adamfx.adam(1e-2)
    >>> state = tx.init(flat)
    >>> grads = jax.grad(lambda f: loss(unravel(f)))(flat)
    >>> updates, state = tx.update(grads, state, flat)
    >>> unravel(optax.apply_updates(flat, updates))['b']
    Array([-0.01, -0.01, -0.01], dtype=float32)
  """
  return _ravel(params, 'ravel_params')


def _ravel(params: Any, caller: str, plan: Any = None
           ) -> tuple[dict[str, jax.Array], Callable[[Any], Any]]:
  """:func:`ravel_params`, its errors naming ``caller``.

  ``plan`` (from :func:`_storage_plan`), if given, sets the buffers instead
  of one per dtype: ``((name, ((leaf, padded_size), ...)), ...)``, each leaf
  followed by zeros up to its padded size.
  """
  leaves, treedef = jax.tree.flatten(params)
  groups: dict[str, list[int]] = {}
  for i, leaf in enumerate(leaves):
    if not hasattr(leaf, 'dtype') or not hasattr(leaf, 'shape'):
      raise TypeError(
          f'{caller} needs array leaves; leaf {i} is {type(leaf).__name__}.'
      )
    if _sharded(leaf):
      raise ValueError(
          f'{caller}: leaf {i} (shape {tuple(leaf.shape)}) is sharded over'
          f' {_n_devices(leaf)} devices; flattening would gather it.'
          ' Keep sharded params as a tree'
          + (' (the optimiser without pack_state).' if caller == 'pack_state' else '.')
      )
    # The dtype the buffer will have: a NumPy float64 leaf becomes float32
    # when x64 is off, and its label must say so.
    groups.setdefault(np.dtype(jax.dtypes.canonicalize_dtype(leaf.dtype)).name, []).append(i)
  shapes = [tuple(leaf.shape) for leaf in leaves]
  sizes = [int(np.prod(x, dtype=np.int64)) for x in shapes]
  if plan is None:
    plan = tuple((name, tuple((i, sizes[i]) for i in idx)) for name, idx in groups.items())
  dtypes = {
      name: jax.dtypes.canonicalize_dtype(leaves[spans[0][0]].dtype) for name, spans in plan
  }
  layout, padded = {}, {}
  for name, spans in plan:
    offsets = np.cumsum([0] + [size for _, size in spans])
    layout[name] = [(i, int(offsets[k]), int(offsets[k]) + sizes[i])
                    for k, (i, _) in enumerate(spans)]
    padded[name] = int(offsets[-1])

  def pack(name, spans):
    xs = []
    for i, size in spans:
      xs.append(jnp.ravel(leaves[i]).astype(dtypes[name]))
      if size > sizes[i]:
        xs.append(jnp.zeros((size - sizes[i],), dtypes[name]))
    if not xs:
      return jnp.zeros((0,))
    return jnp.concatenate(xs) if len(xs) > 1 else xs[0]

  flat = {name: pack(name, spans) for name, spans in plan}

  def unravel(flat: Any) -> Any:
    out = [None] * len(leaves)
    if not isinstance(flat, dict) or set(flat) != set(layout):
      got = sorted(flat) if isinstance(flat, dict) else type(flat).__name__
      raise ValueError(f'unravel expects buffers {sorted(layout)}, got {got}.')
    for name, spans in layout.items():
      buf = flat[name]
      size = padded[name]
      if tuple(np.shape(buf)) != (size,):
        raise ValueError(
            f'unravel: buffer {name!r} has shape {tuple(np.shape(buf))}, but the'
            f' params packed by ravel_params give ({size},).'
        )
      for i, start, stop in spans:
        out[i] = buf[start:stop].reshape(shapes[i])
    return jax.tree.unflatten(treedef, out)

  return flat, unravel


def pack_state(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` on params packed per dtype, with tree-shaped params.

  The opt-in for models of many small leaves that keep their params as a
  tree: ``inner``'s state (Adam's ``mu`` and ``nu``) is kept as one flat
  buffer per dtype (:func:`ravel_params`' layout); each step packs the
  gradients (one concatenation per dtype), runs ``inner`` over the few flat
  buffers, and returns tree-shaped updates (slices, which XLA fuses into
  ``optax.apply_updates``). A jitted step over 2000 leaves is then about one
  loop per leaf instead of three. For an element-wise ``inner`` (the Adam
  family) the numbers are the tree's, bit for bit, except where a 16-bit
  second moment is stochastically rounded (its bits are drawn per buffer).
  A member that stores leaves by size in blocks (``adam8bit``) keeps each
  leaf's storage: the leaves it quantizes get a buffer each, padded to whole
  blocks (the tree's blocks), the others buffers below its ``min_8bit_size``
  (float32, as in the tree); their updates are the tree's to float32
  rounding, except that the stochastic rounding of its ``nu`` codes (issue
  24) hashes the buffer's place among the packed state's buffers (sorted by
  name) where the tree hashes the leaf's place among the params: the same
  rounding, other random bits.

  .. math::

    u = \mathrm{unravel}(\mathrm{inner}(\mathrm{ravel}(g)))

  The state's structure is not the params' (``mu`` is a dict from dtype name
  to a 1-D buffer): a state saved from ``inner`` alone does not restore into
  it, and the gradients must have the params' dtypes. It is meant for jitted
  steps: called eagerly, the packing and the slicing are a dispatch per
  leaf, slower than the plain eager ``update`` (for eager loops over many
  leaves, see :func:`ravel_params`).

  Args:
    inner: any optax transformation, e.g. ``adamfx.adam(1e-3)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`PackedState`: ``inner``'s state over the packed params, with the
    params' layout (checked against each gradient tree and by checkpoints).

  Raises:
    ValueError: at init or update, if a leaf is sharded over several devices
      (packing would gather it; keep such params with a plain ``inner``);
      at init, if ``inner`` holds a mask or labels shaped like the params
      (``adamw(mask=...)``, ``optax.masked``, ``optax.multi_transform``: the
      message says what to write instead); at update, if the gradient tree
      differs from the params' (structure, shapes, dtypes), naming the leaf.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import adamfx
    >>> params = {'w': jnp.ones((2, 3)), 'b': jnp.zeros(3)}
    >>> tx = adamfx.pack_state(adamfx.adam(1e-2))
    >>> state = tx.init(params)
    >>> state[0].mu['float32'].shape
    (9,)
    >>> updates, state = tx.update({'w': jnp.ones((2, 3)), 'b': -jnp.ones(3)}, state, params)
    >>> updates['b']
    Array([0.01, 0.01, 0.01], dtype=float32)
  """

  def init_fn(params):
    plan = _storage_plan(inner, params)
    flat, _ = _ravel(params, 'pack_state', plan)
    try:
      state = inner.init(flat)
    except (ValueError, TypeError, KeyError) as e:
      # An error about a leaf (an int32 param, say) must name the user's
      # leaf, not the buffer `['int32']`: the tree-shaped init names it.
      try:
        jax.eval_shape(inner.init, params)
      except (ValueError, TypeError, KeyError) as tree_error:
        raise tree_error from e
      raise ValueError(_MASK_HINT.format(what='`inner.init` failed on them') + f' ({e})') from e
    if _has_mask(state):
      raise ValueError(_MASK_HINT.format(what='a mask or labels in `inner` would see them'))
    return PackedState(state, _signature(params) + ((plan,) if plan is not None else ()))

  def update_fn(updates, state, params=None, **extra_args):
    if not isinstance(state, PackedState):
      got = 'None' if state is None else f'a {type(state).__name__}'
      raise TypeError(
          f'pack_state.update got {got} as the state; pass the PackedState'
          ' returned by its init(params) (and then by the previous update).'
      )
    if params is not None:
      check_like_params(updates, _signature(params), 'params')
    # Against init's layout: leaf by leaf (a framework may have handed init
    # its params boxed, e.g. nnx.Variable, and the gradients unboxed).
    check_like_params(updates, state.layout[:2], 'the params given to init', structure=False)
    plan = state.layout[2] if len(state.layout) > 2 else None
    flat, unravel = _ravel(updates, 'pack_state', plan)
    flat_params = None if params is None else _ravel(params, 'pack_state', plan)[0]
    flat, inner_state = optax.with_extra_args_support(inner).update(
        flat, state.inner, flat_params, **extra_args
    )
    return unravel(flat), PackedState(inner_state, state.layout)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@jax.tree_util.register_pytree_with_keys_class
class PackedState:
  """:func:`pack_state`'s state: ``inner``'s state over the packed buffers.

  ``layout`` (static, part of the tree structure) records the params' tree,
  leaf shapes and dtypes that the buffers pack, so that gradients are checked
  against it and a checkpoint restores only into the same layout. Indexing
  reads ``inner`` (``state[0].mu`` is the inner chain's first state).
  """

  __slots__ = ('inner', 'layout')

  def __init__(self, inner: Any, layout: Any):
    self.inner = inner
    self.layout = layout

  def tree_flatten_with_keys(self):
    return ((jax.tree_util.GetAttrKey('inner'), self.inner),), self.layout

  @classmethod
  def tree_unflatten(cls, layout, children):
    return cls(children[0], layout)

  def __getitem__(self, i: Any) -> Any:
    return self.inner[i]

  def __len__(self) -> int:
    return len(self.inner)

  def describe_layout(self) -> list[list[Any]]:
    """The layout as JSON-able ``[path, shape, dtype]`` rows (for checkpoints)."""
    return [
        [jax.tree_util.keystr(tuple(path)), list(shape), np.dtype(dtype).name]
        for path, shape, dtype in self.layout[1]
    ]

  def __repr__(self) -> str:
    return f'PackedState(inner={self.inner!r}, leaves={len(self.layout[1])})'


def _storage_plan(inner: Any, params: Any) -> Any:
  """The buffers that keep ``inner``'s per-leaf storage (8-bit moments), or None.

  A member that quantizes leaves by their size (``adam8bit``'s
  ``min_8bit_size``) and in blocks (``block_size``) would otherwise quantize
  the packed buffer as one leaf: small leaves (biases) in blocks shared with
  a large weight, their updates up to 112 % off the tree's. With a plan,
  the leaves the tree keeps in 8 bits get a buffer each, padded with zeros
  to whole blocks, so their blocks are the tree's
  (zero gradients keep the padding at zero); the others are packed in
  buffers no larger than the largest of them, which the member then keeps
  in float32 as it does the leaves themselves. None (one buffer per dtype)
  when no leaf, and no buffer, would be stored in blocks.
  """
  from adamfx._formats.quant import QuantizedArray  # noqa: PLC0415 (import cycle)

  leaves, treedef = jax.tree.flatten(params)
  is_q = lambda x: isinstance(x, QuantizedArray)
  try:
    tree_state = jax.eval_shape(inner.init, params)
  except Exception:  # noqa: BLE001 (init_fn reports init errors itself)
    return None
  has_q = lambda tree: any(is_q(x) for x in jax.tree.leaves(tree, is_leaf=is_q))
  blocks = [None] * len(leaves)
  for node in jax.tree.leaves(tree_state, is_leaf=_checks.is_adam_like):
    if _checks.is_adam_like(node):
      try:
        moments = treedef.flatten_up_to(node.mu)
      except (ValueError, TypeError):
        continue
      for i, q in enumerate(moments):
        if is_q(q):
          blocks[i] = q.block_size
  if not any(blocks):
    flat, _ = _ravel(params, 'pack_state')
    try:
      if not has_q(jax.eval_shape(inner.init, flat)):
        return None
    except Exception:  # noqa: BLE001
      return None
  dtype_name = lambda x: np.dtype(jax.dtypes.canonicalize_dtype(x.dtype)).name
  size = lambda x: int(np.prod(np.shape(x), dtype=np.int64))
  small = [size(x) for x, b in zip(leaves, blocks) if b is None]
  cap = max(small, default=1)
  plan: dict[str, list[tuple[int, int]]] = {}
  fill: dict[str, tuple[str, int]] = {}
  for i, (x, b) in enumerate(zip(leaves, blocks)):
    d = dtype_name(x)
    if b is not None:
      # One buffer each: a large leaf gains nothing from packing, and on its
      # own its blocks (and the chunks of its step) are exactly the tree's.
      plan[f'{d}_8bit_{i}'] = [(i, -(-size(x) // b) * b)]
      continue
    name, used = fill.get(d, (d, 0))
    if used and used + size(x) > cap:  # a new buffer below the 8-bit threshold
      name, used = f'{d}_{len([k for k in plan if k == d or k.startswith(d + "_") and k[len(d) + 1:].isdigit()])}', 0
    plan.setdefault(name, []).append((i, size(x)))
    fill[d] = (name, used + size(x))
  return tuple((name, tuple(spans)) for name, spans in plan.items())


_MASK_HINT = (
    'pack_state runs `inner` on one flat buffer per dtype, not on the params\''
    ' tree, so {what}. Masks and labels shaped like the params (adamw(...,'
    ' mask=...), optax.masked, optax.multi_transform) must sit outside the'
    ' packing: write optax.masked(adamfx.pack_state(inner), mask) or'
    ' optax.multi_transform({{label: adamfx.pack_state(tx), ...}}, labels);'
    ' for adamw\'s mask, optax.chain(adamfx.pack_state(adamfx.scale_by_adam(...)),'
    ' optax.add_decayed_weights(weight_decay, mask),'
    ' optax.scale_by_learning_rate(learning_rate)).'
)


def _has_mask(state: Any) -> bool:
  masked = (optax.MaskedState, optax.MultiTransformState)
  found = []
  jax.tree.map(
      lambda x: found.append(x) if isinstance(x, masked) else None,
      state, is_leaf=lambda x: isinstance(x, masked),
  )
  return bool(found)


def _signature(tree: Any) -> tuple[Any, tuple[tuple[Any, tuple[int, ...], Any], ...]]:
  """The tree's structure and its leaves' paths, shapes and dtypes (hashable)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return treedef, tuple(
      (tuple(path), tuple(np.shape(x)),
       jnp.dtype(jax.dtypes.canonicalize_dtype(getattr(x, 'dtype', None) or jnp.result_type(x))))
      for path, x in leaves
  )


def check_like_params(updates: Any, signature: Any, what: str, structure: bool = True) -> None:
  """Checks that ``updates`` has the tree, shapes and dtypes of ``signature``.

  Packing concatenates leaves, so a gradient of another shape (or a tree with
  a leaf missing but the same total size) would otherwise be accepted and
  sliced into the wrong leaves. Errors name the user's leaf path.
  """
  ref_def, ref = signature
  _checks.refuse_row_sparse(updates, 'pack_state')
  got_def, got = _signature(updates)
  name = lambda path: f'`{jax.tree_util.keystr(tuple(path)) or "<root>"}`'
  if not structure and len(got) != len(ref):
    raise ValueError(
        f'pack_state: the update tree has {len(got)} leaves, {what} had'
        f' {len(ref)} ({", ".join(name(p) for p, _, _ in ref[:5])}'
        f'{", ..." if len(ref) > 5 else ""}): the gradients must have the params\' tree.'
    )
  if structure and got_def != ref_def:
    detail = _checks.tree_difference(
        [name(p) for p, _, _ in got], [name(p) for p, _, _ in ref], got_def, ref_def, what)
    raise ValueError(f'pack_state: the update tree does not match {what}; {detail}.')
  for (path, shape, dtype), (_, rshape, rdtype) in zip(got, ref):
    if shape != rshape:
      raise ValueError(
          f'pack_state: leaf {name(path)} of the updates has shape {shape}, but'
          f' {what} have shape {rshape} there; the gradients must have the'
          ' params\' shapes.'
      )
    if dtype != rdtype:
      raise ValueError(
          f'pack_state: leaf {name(path)} of the updates has dtype {dtype.name},'
          f' but {what} have {rdtype.name} there; the state is packed per dtype,'
          ' so the gradients must have the params\' dtypes.'
      )
