r"""The Adam paper's temporal averaging of the parameters (Kingma & Ba, section 7.2).

:func:`ema_params` wraps any transformation, leaves its updates unchanged,
and keeps in its state an exponential moving average of the params after each
update; :func:`averaged_params` reads it back. ``optax.ema`` averages updates,
not params; ``flax.nnx.EMA`` has no bias correction.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamfx._core import checks as _checks
from adamfx._core import numerics as _numerics

__all__ = ['EmaParamsState', 'averaged_params', 'ema_params']


class EmaParamsState(NamedTuple):
  """State of :func:`ema_params`.

  Attributes:
    count: int32 scalar, the number of updates averaged (saturates).
    correction: float32 (float64 under x64) scalar the average is divided by: ``1 - decay**count``
      with ``debias=True`` (0 before the first update), else 1.
    ema: the (biased) moving average, a tree shaped like the params in at
      least float32, laid out like the params.
    inner: the wrapped transformation's state.
  """

  count: jax.Array
  correction: jax.Array
  ema: optax.Params
  inner: optax.OptState


def ema_params(
    tx: optax.GradientTransformation, decay: Any = 0.999, *, debias: bool = True
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps ``tx`` to keep the paper's moving average of the params.

  The updates are ``tx``'s, unchanged. After each update the state folds the
  new params (``optax.apply_updates(params, updates)``, in the params' own
  dtype) into an average kept in at least float32: in bfloat16,
  ``0.999 * avg + 0.001 * p`` rounds back to ``avg`` and the average stalls.

  .. math::

    \bar\theta_t = \beta \bar\theta_{t-1} + (1 - \beta)\theta_t, \qquad
    \hat\theta_t = \bar\theta_t / (1 - \beta^t)

  with :math:`\beta` = ``decay``. ``debias=True`` (the paper, section 7.2)
  starts from :math:`\bar\theta_0 = 0` and divides by :math:`1 - \beta^t`;
  ``debias=False`` starts from the initial params and does not divide (the
  convention of ``flax.nnx.EMA`` and Levanter; Keras's ``use_ema`` differs
  in its first update only, which sets the average to the params).

  .. warning::
    Wrap the whole optimiser, learning rate included: the average is of
    ``params + updates``, so ``optax.chain(ema_params(adamfx.scale_by_adam()),
    optax.scale(-lr))`` would average params moved by the unscaled Adam
    direction (not the params you train) -- silently. Write
    ``ema_params(optax.chain(adamfx.scale_by_adam(), optax.scale(-lr)))`` or
    ``ema_params(adamfx.adam(lr))``.

  Args:
    tx: any optax transformation (a chain, an adamfx or optax optimiser)
      whose updates are the final ones (see the warning).
    decay: in [0, 1); a number or a traced array. Default 0.999.
    debias: see above. Default True.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`EmaParamsState`; ``update`` needs ``params``. Read the average
    with :func:`averaged_params`.

  Raises:
    ValueError: ``decay`` out of [0, 1), or ``update`` called without params.
    TypeError: ``debias`` not a bool, or ``tx`` not a transformation.

  Examples:
    >>> import jax.numpy as jnp, optax, adamfx
    >>> tx = adamfx.ema_params(optax.sgd(1.0), decay=0.5)
    >>> params = jnp.array([0.0])
    >>> state = tx.init(params)
    >>> for g in (-2.0, -2.0):
    ...   updates, state = tx.update(jnp.array([g]), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> params, adamfx.averaged_params(state)  # (0.5 * 2 + 4) / 1.5
    (Array([4.], dtype=float32), Array([3.3333333], dtype=float32))

  References:
    Kingma & Ba, 2015, Adam: A Method for Stochastic Optimization, section 7.2.
  """
  if not hasattr(tx, 'init') or not hasattr(tx, 'update'):
    raise TypeError(f'`tx` must be an optax GradientTransformation, got {tx!r}.')
  _checks.check_decay('decay', decay)
  if not isinstance(debias, bool):
    raise TypeError(f'`debias` must be True or False, got {debias!r}.')
  tx = optax.with_extra_args_support(tx)

  def average_dtype(p):
    return _numerics.compute_dtype(p.dtype)

  def init_fn(params):
    _checks.check_param_leaves(params)
    params = jax.tree.map(lambda p: p if hasattr(p, 'dtype') else jnp.asarray(p), params)
    if debias:
      ema = jax.tree.map(lambda p: _numerics.zeros_like(p, average_dtype(p)), params)
      correction = jnp.zeros([], _wide())
    else:
      ema = jax.tree.map(lambda p: jnp.asarray(p).astype(average_dtype(p)), params)
      correction = jnp.ones([], _wide())
    return EmaParamsState(
        count=jnp.zeros([], jnp.int32), correction=correction, ema=ema,
        inner=tx.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          'ema_params averages the params, so update needs them: call'
          ' update(grads, state, params).'
      )
    updates, inner = tx.update(updates, state.inner, params, **extra_args)
    new_params = optax.apply_updates(params, updates)
    count = optax.safe_increment(state.count)

    def fold(avg, p):
      if p is None:
        return avg
      d = jnp.asarray(decay).astype(avg.dtype)
      return d * avg + (jnp.ones((), avg.dtype) - d) * p.astype(avg.dtype)

    ema = jax.tree.map(fold, state.ema, new_params, is_leaf=lambda x: x is None)
    if debias:
      dw = jnp.asarray(decay).astype(_wide())
      correction = jnp.ones((), _wide()) - dw ** count.astype(_wide())
    else:
      correction = state.correction
    return updates, EmaParamsState(count=count, correction=correction, ema=ema, inner=inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _wide() -> Any:
  """float64 under ``jax.enable_x64``, else float32: the correction's dtype."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)


def _find(state: Any) -> tuple[EmaParamsState, Any]:
  """The one EmaParamsState in ``state`` (nested ones included) and, when it
  sits inside :func:`adamfx.pack_state`, the layout of the packed params."""
  from adamfx._wrappers.flat import PackedState  # pylint: disable=import-outside-toplevel

  found = []
  stop = lambda x: isinstance(x, (EmaParamsState, PackedState))

  def walk(tree, layout):
    for node in jax.tree.leaves(tree, is_leaf=stop):
      if isinstance(node, EmaParamsState):
        found.append((node, layout))
        walk(node.inner, layout)  # ema_params(ema_params(...)): both count
      elif isinstance(node, PackedState):
        walk(node.inner, node.layout)

  walk(state, None)
  if len(found) != 1:
    raise ValueError(
        f'`state` must hold exactly one EmaParamsState (the state of'
        f' adamfx.ema_params, possibly inside a chain), found {len(found)}'
        + ('' if len(found) < 2 else
           ' (ema_params nested in ema_params): pass the state of the one you'
           ' want, e.g. averaged_params(state.inner) for the inner average')
        + '.'
    )
  return found[0]


def _unbox(tree: Any) -> Any:
  """Flax NNX keeps an optimiser's state in ``OptArray``/``OptVariable`` boxes:
  their values (``nnx.Optimizer(...).opt_state`` then reads like optax's)."""
  boxed = lambda x: (type(x).__module__.startswith('flax')
                     and hasattr(type(x), 'value') and not isinstance(x, jax.Array))
  if not any(boxed(x) for x in jax.tree.leaves(tree, is_leaf=boxed)):
    return tree
  value = lambda x: x.get_value() if hasattr(x, 'get_value') else x.value
  return jax.tree.map(lambda x: value(x) if boxed(x) else x, tree, is_leaf=boxed)


def _unpack(ema: dict, layout: Any) -> Any:
  """pack_state's per-dtype buffers back into the params' tree (its layout)."""
  treedef, leaves = layout
  offsets: dict[str, int] = {}
  out = []
  for _, shape, dtype in leaves:
    key = np.dtype(dtype).name
    n = int(np.prod(shape, dtype=np.int64))
    start = offsets.get(key, 0)
    out.append(ema[key][start:start + n].reshape(shape))
    offsets[key] = start + n
  return jax.tree.unflatten(treedef, out)


def averaged_params(state: Any) -> optax.Params:
  """The averaged params held in the state of :func:`ema_params`.

  Args:
    state: the state of :func:`ema_params`, or any state (a chain's tuple,
      ``inject_hyperparams``'s, :func:`pack_state`'s, a Flax NNX
      ``Optimizer.opt_state`` with its boxed fields) holding exactly one
      :class:`EmaParamsState`. Under :func:`pack_state` the average is
      unpacked into the params' tree.

  Returns:
    A tree shaped like the params, in the average's dtype (at least float32;
    cast it to the params' dtype to evaluate a low-precision model). With
    ``debias=True`` it is ``ema / (1 - decay**t)``; before the first update
    there is no average, and it is all zeros.

  Raises:
    ValueError: ``state`` holds no (or several) :class:`EmaParamsState`,
      nested ones (``ema_params(ema_params(...))``) included.
  """
  s, layout = _find(state)
  correction = jnp.asarray(_unbox(s.correction))
  safe = jnp.where(correction > 0, correction, jnp.ones((), correction.dtype))
  average = jax.tree.map(lambda a: jnp.asarray(a) / safe.astype(a.dtype), _unbox(s.ema))
  return average if layout is None else _unpack(average, layout)
