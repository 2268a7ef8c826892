"""A compiled ``update`` for eager calls, with the numbers of the traced one.

Called outside ``jit`` (in a notebook, say), the family update would run as
dozens of separate array operations per leaf, each a dispatch and a pass over
memory. :func:`family_update` instead runs every leaf through one compiled
call of the same :func:`adamfx._core.driver.tree_update` (whatever the moments'
storage format), leaves of one shape, dtype and storage in chunks of up to
``CHUNK``, so an eager step costs about one dispatch per chunk; every
member applies its learning rate, and AdamW its decoupled decay, in those
same calls (the core's :class:`adamfx._core.driver.Tail`, planned by
:func:`learning_rate_plan` and :func:`decay_plan`). Under a trace (``jit``,
``vmap``, ``grad``, ``scan``) or ``jax_disable_jit`` it is ``tree_update``
itself, so compiled code is unchanged.

The compiled function lives at module level and takes Python-number
hyperparameters as static arguments (the traced path folds them as Python
numbers, so the numbers stay identical) and array hyperparameters as
arguments: ``optax.inject_hyperparams``, which re-creates the transformation
every step with new hyperparameter arrays, reuses the compiled code. It is
compiled once per leaf shape, dtype and chunk length (8, 4, 2 or 1), not once
per tree, so a model of thousands of small leaves of a few shapes compiles in
about a second.

Leaves whose second moment is stored in a 16-bit float go through one
compiled call over the whole tree (the other leaves replaced by ``None``):
their stochastic rounding hashes the leaf's position in the tree.
"""

from __future__ import annotations

import functools
from typing import Any
from typing import NamedTuple
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamfx._core import checks as _checks
from adamfx._core import driver as _update
from adamfx._core import rounding as _rounding

_is_none = _update._is_none


def _concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


@functools.cache
def _narrow(dtype: Any) -> bool:
  """Whether a second moment stored in ``dtype`` is stochastically rounded."""
  return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def _positional(fmt: Any, m: Any) -> bool:
  """Whether ``fmt`` rounds the stored moment ``m`` with bits hashed from its leaf's position.

  Blockwise4bit's codes with ``rounding='stochastic'``, and Blockwise8bit's
  (which has no ``rounding`` option: its ``nu`` codes are always rounded
  stochastically, issue 24).
  """
  return getattr(fmt, 'rounding', 'stochastic') == 'stochastic' and fmt.is_stored(m)


def split_hyperparams(values: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
  """Python/NumPy scalars become static (hashed), arrays stay arguments."""
  static, dynamic = [], []
  for v in values:
    if isinstance(v, (jax.Array, np.ndarray)):
      static.append(None)
      dynamic.append(v)
    else:
      static.append(v)
      dynamic.append(None)
  return tuple(static), tuple(dynamic)


@functools.partial(
    jax.jit,
    static_argnames=('static', 'fmt', 'nesterov', 'amsgrad', 'infinity_norm', 'lr_static',
                     'lr_kind', 'decay_static', 'decay_mask', 'rows', 'state_type'),
)
def _leaf_update(
    g, m, v, vm, count, dynamic, lr_size=None, p=None, decay_size=None, last=None,
    invalid=None, *, static, fmt=None, nesterov, amsgrad, infinity_norm, lr_static=None,
    lr_kind=None, decay_static=None, decay_mask=None, rows=None, state_type=None,
):
  """The core's tree driver on a list of leaves (or a tree), its tail fused in."""
  hps = [s if d is None else d for s, d in zip(static, dynamic)]
  tail = None
  if lr_kind is not None or decay_mask is not None:
    tail = _update.Tail(lr_static, lr_size, lr_kind, decay_static, decay_size, decay_mask, p,
                        invalid)
  if rows is None:
    state = _update.AdamState(count, m, v, vm)
  else:
    state = state_type(count=count, mu=m, nu=v, nu_max=vm, last_step=last)
  return _update.tree_update(
      g, state, dict(zip(('b1', 'b2', 'eps', 'eps_root'), hps)),
      fmt=fmt, nesterov=nesterov, amsgrad=amsgrad, infinity_norm=infinity_norm, tail=tail,
      rows=rows, state_type=state_type,
  )


CHUNK = 8  # leaves per compiled eager call: fewer dispatches, short compiles
SMALL_CHUNK = 64  # for leaves of fewer than SMALL elements, where dispatch dominates
SMALL = 1 << 14


def _chunks(indices: list[int], signature: Any, size_of: Any) -> list[list[int]]:
  """Splits leaf indices into runs of equal signature, of power-of-two lengths.

  Leaves of one shape and dtype share compiled code; a chunk of ``CHUNK``
  leaves (``SMALL_CHUNK`` of leaves with fewer than ``SMALL`` elements, whose
  step is mostly dispatch) is one dispatch, and the power-of-two lengths
  bound the variants compiled per signature to four (seven).
  """
  groups: dict[Any, list[int]] = {}
  for i in indices:
    groups.setdefault(signature(i), []).append(i)
  out = []
  for members in groups.values():
    start = 0
    longest = SMALL_CHUNK if size_of(members[0]) < SMALL else CHUNK
    while start < len(members):
      size = longest
      while size > len(members) - start:
        size //= 2
      out.append(members[start:start + size])
      start += size
  return out


def family_update(
    updates: Any,
    state: Any,
    b1: Any,
    b2: Any,
    eps: Any,
    eps_root: Any,
    *,
    nesterov: bool = False,
    amsgrad: bool = False,
    infinity_norm: bool = False,
    lr: Any = None,
    decay: Any = None,
    fmt: Any = None,
) -> tuple[Any, Any]:
  """``_update.tree_update``, compiled chunk by chunk of leaves when called eagerly.

  Args:
    updates: the gradient tree.
    state: an ``AdamState``.
    b1: decay of the first moment (number or array).
    b2: decay of the second moment (number or array).
    eps: added to the root of the second moment.
    eps_root: added inside the root.
    nesterov: NAdam.
    amsgrad: AMSGrad.
    infinity_norm: AdaMax.
    lr: a :class:`_LearningRate` to scale the updates by in the same compiled
      calls (eager only; the caller checks :func:`eager`), or None.
    decay: a :class:`_Decay` (AdamW's decoupled decay, applied before ``lr``),
      or None.
    fmt: the moments' storage format (None: dense arrays).

  Returns:
    ``(updates, state)`` exactly as ``_update._family_update`` returns them
    (then scaled as the learning-rate transformation would).
  """

  flags = dict(nesterov=nesterov, amsgrad=amsgrad, infinity_norm=infinity_norm)
  hps = (b1, b2, eps, eps_root)
  _checks.adam_like_state(state, 'scale_by_adamax' if infinity_norm else 'scale_by_adam')
  traced = lambda: _update.tree_update(
      updates, state, dict(zip(('b1', 'b2', 'eps', 'eps_root'), hps)),
      **{**flags, 'fmt': fmt})
  if not eager(updates, state, hps):
    return traced()

  updates = jax.tree.map(
      lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), updates
  )
  if fmt is None:
    _checks.check_matching_trees(updates, state.mu)
  else:
    state = state._replace(
        mu=fmt.prepare(state.mu, True, 'mu'), nu=fmt.prepare(state.nu, False, 'nu'),
        nu_max=fmt.prepare(state.nu_max, False, 'nu_max') if amsgrad else None)
    _checks.check_matching_trees(updates, jax.tree.map(
        fmt.param_like, state.mu, is_leaf=lambda x: x is None or fmt.is_stored(x)))
  flags['fmt'] = fmt
  g_leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_none)
  m_leaves = treedef.flatten_up_to(state.mu)
  v_leaves = treedef.flatten_up_to(state.nu)
  if amsgrad:
    vm_leaves = treedef.flatten_up_to(state.nu_max)
  else:
    vm_leaves = [None] * len(g_leaves)
  static, dynamic = split_hyperparams(hps)
  static_args = {} if lr is None else dict(lr_static=lr.static, lr_kind=lr.kind)
  lr_size = None if lr is None else lr.size
  if decay is not None:
    p_leaves = decay.params
    decay_on = decay.on
    decay_size = decay.size
    static_args['decay_static'] = decay.static
  else:
    p_leaves = decay_on = [None] * len(g_leaves)
    decay_size = None
  # A 16-bit nu's stochastic rounding hashes the leaf's position in the tree,
  # and so does a format's (Blockwise4bit's codes, rounding='stochastic';
  # Blockwise8bit's nu codes).
  narrow = [g is not None and (_positional(fmt, m) if fmt is not None else _narrow(v.dtype))
            for g, m, v in zip(g_leaves, m_leaves, v_leaves)]
  outs = [(None, None, None, None)] * len(g_leaves)
  count = None
  if any(narrow):
    # Stochastic rounding of a 16-bit nu hashes the leaf's position in the
    # tree: these leaves go through one compiled call over the whole list,
    # the other leaves replaced by None and the places of other
    # multi_transform partitions by optax.MaskedNode (see
    # _rounding.leaf_positions), so that every position is kept.
    places = _rounding.leaf_positions(updates)
    slots = max(places, default=-1) + 1

    def pick(xs):
      out = [optax.MaskedNode()] * slots
      for j, (x, k) in enumerate(zip(xs, narrow)):
        out[places[j]] = x if k else None
      return out

    u, sub = _leaf_update(  # the same function; traced once per tree structure
        pick(g_leaves), pick(m_leaves), pick(v_leaves),
        pick(vm_leaves) if amsgrad else None, state.count, dynamic, lr_size,
        pick(p_leaves), decay_size, static=static, **flags, **static_args,
        decay_mask=None if decay is None else tuple(bool(x) for x in pick(decay_on)),
    )
    count = sub.count
    columns = (u, sub.mu, sub.nu, sub.nu_max if amsgrad else [None] * len(u))
    outs = [o if not k else tuple(c[places[j]] for c in columns)
            for j, (o, k) in enumerate(zip(outs, narrow))]
  rest = [i for i, g in enumerate(g_leaves) if g is not None and not narrow[i]]
  def signature(i):  # shapes agree (checked above): the gradient's, and dtypes
    g, q = g_leaves[i], p_leaves[i]
    stored = jax.tree.map(lambda x: (x.shape, x.dtype), (m_leaves[i], v_leaves[i], vm_leaves[i]))
    return (g.shape, g.dtype, g.weak_type, jax.tree.structure(stored), tuple(jax.tree.leaves(stored)),
            decay_on[i], None if q is None else (q.dtype, getattr(q, 'weak_type', False)))

  for chunk in _chunks(rest, signature, lambda i: g_leaves[i].size):
    take = lambda xs: [xs[i] for i in chunk]
    u, sub = _leaf_update(
        take(g_leaves), take(m_leaves), take(v_leaves),
        take(vm_leaves) if amsgrad else None, state.count, dynamic, lr_size,
        take(p_leaves), decay_size, static=static, **flags, **static_args,
        decay_mask=None if decay is None else (bool(decay_on[chunk[0]]),) * len(chunk),
    )
    count = sub.count
    for j, i in enumerate(chunk):
      outs[i] = (u[j], sub.mu[j], sub.nu[j], sub.nu_max[j] if amsgrad else None)
  if count is None:  # no leaf to update
    assert lr is None and decay is None or not any(x is not None for x in g_leaves)
    return traced()
  u, mu, nu, nu_max = (
      jax.tree.unflatten(treedef, list(column)) for column in zip(*outs)
  )
  state_type = _update.AdaMaxState if infinity_norm else _update.AdamState
  return u, state_type(count, mu, nu, nu_max if amsgrad else None)


def rows_update(
    updates: Any,
    state: Any,
    hps: dict[str, Any],
    *,
    rows: Any,
    state_type: type,
    fmt: Any = None,
    nesterov: bool = False,
    amsgrad: bool = False,
    tail: Optional[_update.Tail] = None,
) -> tuple[Any, Any]:
  """``_update.tree_update`` of a tree with row-sparse leaves (lazy Adam), compiled
  as one call over the tree when called eagerly.

  The row-sparse leaves' shapes (their number of ids) are part of the compiled
  call's signature; the tail's Python numbers and mask are static, its
  arrays arguments.
  """
  traced = lambda: _update.tree_update(
      updates, state, hps, fmt=fmt, nesterov=nesterov, amsgrad=amsgrad, tail=tail, rows=rows,
      state_type=state_type)
  if not eager(updates, state, tuple(hps.values()), tail):
    return traced()
  static, dynamic = split_hyperparams(tuple(hps[k] for k in ('b1', 'b2', 'eps', 'eps_root')))
  tail_args = {}
  if tail is not None:
    tail_args = dict(
        lr_size=tail.lr_size, p=tail.params, decay_size=tail.decay_size, invalid=tail.invalid,
        lr_static=tail.lr_static, lr_kind=tail.lr_kind, decay_static=tail.decay_static,
        decay_mask=tail.decay_on)
  return _leaf_update(
      updates, state.mu, state.nu, state.nu_max if amsgrad else None, state.count, dynamic,
      last=state.last_step, static=static, fmt=fmt, nesterov=nesterov, amsgrad=amsgrad,
      infinity_norm=False, rows=rows, state_type=state_type, **tail_args)


class _Decay(NamedTuple):
  """AdamW's decay in one eager call: ``u + weight_decay * p`` on masked-in leaves."""

  static: Any  # a Python number, hashed into the compiled code, or None
  size: Any  # else the weight decay array
  params: list[Any]  # the params' leaves, aligned with the updates'
  on: list[bool]  # per leaf: decayed (the mask)


def decay_plan(weight_decay: Any, mask: Any, updates: Any, params: Any) -> Optional[_Decay]:
  """The eager form of ``optax.add_decayed_weights(weight_decay, mask)``, or None.

  None where the compiled path does not apply (no params, a schedule, a mask
  that is not a tree of Python booleans): the caller runs optax's code.
  """
  if params is None or callable(weight_decay):
    return None
  is_none = lambda x: x is None
  g_leaves, treedef = jax.tree.flatten(updates, is_leaf=is_none)
  try:
    p_leaves = treedef.flatten_up_to(params)
  except (ValueError, TypeError):
    return None
  if any(g is None for g in g_leaves):
    return None
  if mask is None:
    on = [True] * len(g_leaves)
  else:
    # One mask semantics for every member (lazy Adam's too): a mask function
    # is called on the params (optax.masked calls it on the params at init
    # and on the updates, of the same structure, at update); the mask may be
    # a prefix of the tree, each of its leaves covering a subtree.
    mask_tree = mask(params) if callable(mask) else mask
    try:
      on = jax.tree.leaves(jax.tree.map(
          lambda m, sub: jax.tree.map(lambda _: m, sub), mask_tree, updates
      ))
    except (ValueError, TypeError):
      return None
    if len(on) != len(g_leaves) or not all(isinstance(x, (bool, np.bool_)) for x in on):
      return None
  if isinstance(weight_decay, (int, float)) and weight_decay == 0:
    on = [False] * len(g_leaves)  # optax skips the add
  if isinstance(weight_decay, (jax.Array, np.ndarray)):
    return _Decay(None, weight_decay, p_leaves, on)
  return _Decay(weight_decay, None, p_leaves, on)


@functools.partial(jax.jit, static_argnames=('static', 'kind'))
def _scale_leaf(u, step, *, static, kind):
  # ``kind`` is static: a traced flag cannot choose a Python branch.
  # ``u`` is a list of leaves (one compiled call per chunk of leaves).
  tail = _update.Tail(lr_static=static, lr_size=step, lr_kind=kind)
  return [_update.apply_tail(x, 0, tail, False) for x in u]


class _LearningRate(NamedTuple):
  """How one eager call scales by the learning rate, and the state after."""

  static: Any  # a Python number (-lr), hashed into the compiled code, or None
  size: Any  # else an array: -lr, or -schedule(count)
  kind: str  # 'number', 'array' or 'schedule'
  new_state: Any


def learning_rate_plan(learning_rate: Any, state: Any) -> Optional[_LearningRate]:
  """The eager scaling by ``learning_rate`` from the state ``state``, or None.

  None where the compiled path does not apply (a traced learning rate, a
  schedule returning a Python number, whose rounding is optax's own).
  """
  import optax  # noqa: PLC0415

  if not callable(learning_rate):
    with jax.numpy_dtype_promotion('standard'):
      step = -1 * learning_rate  # as optax.scale_by_learning_rate computes it
    if isinstance(step, jax.core.Tracer):
      return None
    if isinstance(step, (jax.Array, np.ndarray)):
      return _LearningRate(None, step, 'array', state)
    return _LearningRate(step, None, 'number', state)
  if not all(isinstance(x, jax.Array) and _concrete(x) for x in jax.tree.leaves(state)):
    return None
  with jax.numpy_dtype_promotion('standard'):
    size = -1 * learning_rate(state.count)
  if not isinstance(size, jax.Array) or not _concrete(size):
    return None
  new_state = optax.ScaleByScheduleState(count=optax.safe_increment(state.count))
  return _LearningRate(None, size, 'schedule', new_state)


def hashable(*values: Any) -> bool:
  """Whether ``values`` can be static arguments of a compiled call (no arrays)."""
  try:
    hash(values)
  except TypeError:
    return False
  return True


def eager(*trees: Any) -> bool:
  """Whether the compiled eager path applies: every leaf a concrete array."""
  return not jax.config.jax_disable_jit and all(
      _concrete(x) for x in jax.tree.leaves(trees)
  )


def scale_by_learning_rate(learning_rate: Any, traced: Any) -> Any:
  """``traced`` (optax's learning-rate scaling), compiled per leaf when eager.

  Args:
    learning_rate: the number, array or schedule given to ``adam``.
    traced: ``_update._keep_dtypes(optax.scale_by_learning_rate(learning_rate))``,
      used under a trace and whenever the fast path does not apply.

  Returns:
    An ``optax.GradientTransformation`` with ``traced``'s init, state and
    numbers.
  """
  import optax  # noqa: PLC0415

  def update_fn(updates, state, params=None):
    leaves = jax.tree.leaves((updates, state))
    plan = None
    if not jax.config.jax_disable_jit and all(
        isinstance(x, jax.Array) and _concrete(x) for x in leaves
    ):
      plan = learning_rate_plan(learning_rate, state)
    if plan is None:
      return traced.update(updates, state, params)
    leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_none)
    out = list(leaves)
    present = [i for i, u in enumerate(leaves) if u is not None]
    signature = lambda i: (leaves[i].shape, leaves[i].dtype, leaves[i].weak_type)
    for chunk in _chunks(present, signature, lambda i: leaves[i].size):
      scaled = _scale_leaf(
          [leaves[i] for i in chunk], plan.size,
          static=plan.static, kind=plan.kind,
      )
      for i, u in zip(chunk, scaled):
        out[i] = u
    new_updates = jax.tree.unflatten(treedef, out)
    return new_updates, plan.new_state

  return optax.GradientTransformation(traced.init, update_fn)

