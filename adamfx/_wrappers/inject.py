r"""``adamfx.inject_hyperparams``: optax's, with the family's structure kept static."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any
from typing import Optional
from typing import Union

import jax
import jax.numpy as jnp
import optax

from adamfx._core import driver as _update
from adamfx._core import numerics as _numerics

STRUCTURAL_ARGS = frozenset({
    'amsgrad', 'block_size', 'mask', 'min_4bit_size', 'min_8bit_size', 'moments', 'mu_dtype',
    'nesterov', 'nu_dtype',
})


def _structural(inner_factory: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[str, ...]:
  """The names among ``inner_factory``'s bound arguments to keep static."""
  try:
    bound = inspect.signature(inner_factory).bind(*args, **kwargs)
    bound.apply_defaults()
  except (TypeError, ValueError):
    return ()
  names = []
  for name, value in bound.arguments.items():
    if name in STRUCTURAL_ARGS or isinstance(value, bool) or value is None:
      names.append(name)
  return tuple(names)


def _at_step_0(value: Any) -> Any:
  """A schedule's value at count 0 (what optax.inject_hyperparams passes first)."""
  if not callable(value) or isinstance(value, type):
    return value
  try:
    with jax.numpy_dtype_promotion('standard'):  # optax schedules mix int and float
      return value(jnp.zeros([], jnp.int32))
  except Exception:  # pylint: disable=broad-except  (not a schedule: let the factory say)
    return value


def inject_hyperparams(
    inner_factory: Callable[..., Any],
    static_args: Union[str, tuple[str, ...]] = (),
    hyperparam_dtype: Optional[Any] = None,
) -> Callable[..., optax.GradientTransformationExtraArgs]:
  """``optax.inject_hyperparams`` that keeps hyperparameters in >= float32.

  optax casts injected hyperparameters to the params' dtype, which in
  bfloat16 turns ``b2=0.999`` into ``1.0``. This wrapper defaults
  ``hyperparam_dtype`` to float32 when the params are narrower (and to the
  params' dtype otherwise), and returns updates in the gradients' dtypes.

  Every numeric hyperparameter may be a schedule (a function of the step
  count), as with ``optax.inject_hyperparams``: ``b1`` of :func:`adam`,
  ``eps`` of :func:`torch_adam`, ``weight_decay`` of :func:`lazy_adamw`,
  :func:`torch_adamw`, :func:`keras_adamw`, ...; its value at step 0 is
  checked when the factory is called, and the numbers are optax's.

  Structural arguments -- those that decide the state's layout rather than a
  value of the update: ``block_size``, ``min_8bit_size``, ``mu_dtype``,
  ``nu_dtype``, ``mask``, and flags such as ``nesterov`` or ``amsgrad`` (any
  ``bool``) -- are kept static without being listed in ``static_args``. The
  arguments are checked when the factory is called (a concrete ``b2=1.0``
  raises there); a traced invalid value gives NaN updates, as in optax.
  Eager updates with new values of the injected hyperparameters reuse the
  compiled steps (no recompilation).

  Args:
    inner_factory: a function returning a transformation, e.g. :func:`adam`.
    static_args: names of further arguments not to inject.
    hyperparam_dtype: dtype of the injected hyperparameters; default: at
      least float32.

  Returns:
    A factory with the signature of ``inner_factory``.

  Raises:
    ValueError, TypeError: when the factory is called, for arguments
      ``inner_factory`` refuses.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adamfx
    >>> tx = adamfx.inject_hyperparams(adamfx.adam)(learning_rate=1e-3)
    >>> params = jnp.ones(3, jnp.bfloat16)
    >>> state = tx.init(params)
    >>> state.hyperparams['b2'].dtype
    dtype('float32')
    >>> tx8 = adamfx.inject_hyperparams(adamfx.adam8bit)(1e-3, block_size=128)
    >>> sorted(tx8.init(jnp.ones(8)).hyperparams)
    ['b1', 'b2', 'eps', 'eps_root', 'learning_rate']
  """
  if isinstance(static_args, str):
    static_args = (static_args,)
  user_static = tuple(static_args)

  def dtype_for(tree):
    if hyperparam_dtype is not None:
      return hyperparam_dtype
    # The leaves' dtypes promoted together with float32, real part. Not
    # optax.tree.dtype(tree, 'highest'): it refuses a float64 + complex64
    # tree, and under strict promotion a bfloat16 + float32 one.
    dtypes = [jnp.result_type(x) for x in jax.tree.leaves(tree)]
    return _numerics.real_dtype(_numerics.compute_dtype(*dtypes))

  @functools.wraps(inner_factory)
  def factory(*args, **kwargs):
    # Check the arguments now, not at init; a schedule (any callable, as
    # optax.inject_hyperparams takes for every numeric hyperparameter) is
    # checked by its value at step 0, the first value the factory will get.
    # The learning rate stays a schedule: every builder takes one as it is,
    # and some check it as such (decouple_lr=True needs max_lr with one).
    sig = inspect.signature(inner_factory)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
      inner_factory(*[_at_step_0(a) for a in args],
                    **{k: _at_step_0(v) for k, v in kwargs.items()})
    else:
      try:
        bound = sig.bind(*args, **kwargs)
      except TypeError:
        inner_factory(*args, **kwargs)  # let the factory say what is wrong
        raise
      inner_factory(**{
          k: v if k in ('learning_rate', 'lr') else _at_step_0(v)
          for k, v in bound.arguments.items()
      })
    static = tuple(dict.fromkeys(user_static + _structural(inner_factory, args, kwargs)))

    def build(tree):
      return optax.inject_hyperparams(inner_factory, static, dtype_for(tree))(*args, **kwargs)

    build(None)  # Bind the arguments now too.

    def init_fn(params):
      return build(params).init(params)

    def update_fn(updates, state, params=None, **extra_args):
      tree = params if params is not None else updates
      new_updates, state = build(tree).update(updates, state, params, **extra_args)
      # Updates in the gradients' dtypes (optax's own members promote bf16
      # gradients with float32 hyperparameters to float32).
      new_updates = jax.tree.map(
          lambda n, u: n if n is None or u is None or not hasattr(u, 'dtype')
          else n.astype(u.dtype),
          new_updates, updates, is_leaf=_update._is_none,
      )
      return new_updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

  return factory
