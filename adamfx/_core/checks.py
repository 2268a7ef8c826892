"""Eager validation of hyperparameters and trees, with the error texts.

Concrete values -- Python and NumPy numbers, and concrete 0-d JAX arrays --
are checked at construction time. Traced values (under ``jit``, or
injected and changed inside a jitted step) and schedules pass through, so that
traced hyperparameters keep working; an invalid traced value then makes the
update NaN (:func:`invalid_hyperparams`), never a finite wrong step.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _concrete_number(value: Any) -> float | None:
  """Returns ``value`` as a Python float if it is a concrete real number."""
  if isinstance(value, bool):
    return None
  if isinstance(value, numbers.Real):
    return float(value)
  if isinstance(value, (np.ndarray, np.generic)) and value.ndim == 0 and value.dtype.kind in 'fiu':
    return float(value)
  if (
      isinstance(value, jax.Array)
      and not isinstance(value, jax.core.Tracer)
      and value.ndim == 0
      and (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer))
  ):
    try:
      return float(value)  # a concrete array: checked like a number
    except (jax.errors.ConcretizationTypeError, TypeError):
      return None
  return None


def invalid_hyperparams(b1: Any, b2: Any, eps: Any, eps_root: Any) -> Any:
  """A boolean scalar, True where a non-constant hyperparameter is out of range.

  Concrete values are checked at construction (:func:`check_decay`, ...);
  traced ones (under ``jit``, ``inject_hyperparams``, ``vmap``) cannot be. The
  update is then made NaN where this is True, so that an invalid traced
  ``b2 = 1`` or ``eps = -1`` shows as NaN, as in optax, never as a finite
  wrong step. None when every value is a Python number (nothing to guard).
  """
  bad = None

  def add(cond):
    nonlocal bad
    bad = cond if bad is None else jnp.logical_or(bad, cond)

  for x in (b1, b2):
    if not _python_number(x):
      x = jnp.asarray(x)
      add(jnp.any(~((x >= 0) & (x < 1))))
  for x in (eps, eps_root):
    if not _python_number(x):
      x = jnp.asarray(x)
      add(jnp.any(~((x >= 0) & (x < jnp.inf))))
  return bad


def _python_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_numeric_like(value: Any) -> bool:
  if isinstance(value, bool):
    return False
  if isinstance(value, (numbers.Number, np.ndarray, np.generic, jax.Array)):
    return True
  # Tracers and other array-likes (e.g. ``jax.ShapeDtypeStruct`` is not one).
  return hasattr(value, 'dtype') and hasattr(value, 'shape')


def check_decay(name: str, value: Any) -> None:
  """Checks that a decay rate ``b1``/``b2`` lies in [0, 1)."""
  _check_numeric(name, value)
  check_hyperparam_dtype(name, value)  # a 16-bit decay: say why, and the fix
  x = _concrete_number(value)
  if x is None:
    return
  if math.isnan(x) or math.isinf(x):
    raise ValueError(f'`{name}` must be a finite number in [0, 1), got {value!r}.')
  if not 0.0 <= x < 1.0:
    hint = ''
    if x == 1.0:
      hint = f': with {name} == 1 the bias correction 1 - {name}**t is 0'
    elif x < 0:
      hint = ': a negative decay makes the moving average oscillate in sign'
    raise ValueError(f'`{name}` must be in [0, 1), got {value!r}{hint}.')


def check_decay_in_dtype(name: str, value: Any, dtype: Any) -> None:
  """Checks that a concrete decay rate stays below 1 in the arithmetic dtype.

  ``b2 = 0.99999999`` passes :func:`check_decay` but is 1.0 in float32, where
  ``1 - b2**t`` is 0 and the step is ``inf`` or ``NaN``. Runs at trace time,
  when the params' dtype is known.
  """
  x = _concrete_number(value)
  if x is None or not 0.0 <= x < 1.0:
    return
  if float(np.asarray(x, dtype)) >= 1.0:
    raise ValueError(
        f'`{name}` = {value!r} rounds to 1.0 in {np.dtype(dtype).name}, the'
        ' dtype Adam\'s arithmetic runs in for these params; the bias'
        f' correction 1 - {name}**t would be 0. Use a value <='
        f' {float(np.nextafter(np.asarray(1.0, dtype), np.asarray(0.0, dtype)))!r},'
        ' or float64 params (jax.enable_x64).'
    )


def check_non_negative(name: str, value: Any) -> None:
  """Checks that ``eps``, ``eps_root``, ``weight_decay`` ... are finite and >= 0."""
  _check_numeric(name, value)
  x = _concrete_number(value)
  if x is None:
    return
  if math.isnan(x) or math.isinf(x):
    raise ValueError(f'`{name}` must be a finite number >= 0, got {value!r}.')
  if x < 0:
    raise ValueError(f'`{name}` must be >= 0, got {value!r}.')


def check_learning_rate(value: Any, name: str = 'learning_rate') -> None:
  """Checks a learning rate: a finite number >= 0, an array, or a schedule.

  ``name``: the argument's name in the caller's API (torch's ``lr``).
  """
  if callable(value) and not _is_numeric_like(value):
    return  # A schedule, evaluated on the step count.
  _check_numeric(name, value, schedule_ok=True)
  x = _concrete_number(value)
  if x is None:
    return
  if math.isnan(x) or math.isinf(x):
    raise ValueError(
        f'`{name}` must be a finite number >= 0, got {value!r}.'
    )
  if x < 0:
    raise ValueError(
        f'`{name}` must be >= 0, got {value!r}: Adam already steps'
        ' against the gradient, a negative rate would ascend.'
    )


def _check_numeric(name: str, value: Any, schedule_ok: bool = False) -> None:
  if _is_numeric_like(value):
    dtype = getattr(value, 'dtype', None)
    if dtype is not None and not (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    ):
      raise TypeError(
          f'`{name}` must be a real number, got an array of dtype {dtype}.'
      )
    if isinstance(value, complex):
      raise TypeError(f'`{name}` must be a real number, got {value!r}.')
    return
  expected = 'a real number' + (' or an optax schedule' if schedule_ok else '')
  raise TypeError(
      f'`{name}` must be {expected}, got {value!r} of type'
      f' {type(value).__name__}.'
  )


def check_state_dtype(name: str, dtype: Any) -> Any:
  """Canonicalises ``mu_dtype``/``nu_dtype``; they must be floating point."""
  if dtype is None:
    return None
  try:
    canonical = jax.dtypes.canonicalize_dtype(dtype)
  except TypeError as e:
    raise TypeError(f'`{name}` must be a floating dtype or None, got {dtype!r}.') from e
  if not (
      jnp.issubdtype(canonical, jnp.floating)
      or jnp.issubdtype(canonical, jnp.complexfloating)
  ):
    raise TypeError(
        f'`{name}` must be a floating dtype (float16, bfloat16, float32,'
        f' float64) or None, got {np.dtype(canonical).name}: an integer'
        ' moment would round every update to 0.'
    )
  return canonical


def warn_float16_second_moment(nu: Any) -> None:
  """Warns (once per call site) if any second moment is stored in float16.

  float16 holds ``nu`` up to 65504, so a sustained ``|g|`` above about 256
  saturates it. The step keeps ``m / sqrt(v)`` for the saturating step (m
  and v are scaled together), but the history then reads as that of a
  smaller gradient against which the next full-size gradients weigh too
  much: under a sustained ``|g| ~ 1e4`` the update drifts from float32
  Adam's by 6 % at step 5 and 2.4x at step 50 (median over elements).
  bfloat16 (same 2 bytes, float32's exponent range) keeps it within 1 %.
  """
  if any(jnp.dtype(getattr(x, 'dtype', np.float32)) == jnp.float16 for x in jax.tree.leaves(nu)):
    warnings.warn(
        'Adam\'s second moment `nu` is stored in float16 (float16 params, or'
        ' nu_dtype=float16): float16 holds nu up to 65504, so a sustained |gradient|'
        ' above about 256 saturates it, and the steps then drift from float32 Adam\'s'
        ' (6% at step 5, 2.4x at step 50 under |g| ~ 1e4). Pass nu_dtype=jnp.bfloat16'
        ' (the same 2 bytes, float32\'s range) or jnp.float32 unless gradients stay'
        ' well below 256.',
        UserWarning, stacklevel=4,
    )


def check_param_leaves(tree: Any, what: str = 'params') -> None:
  """Raises TypeError naming the first leaf whose dtype Adam cannot update."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  for path, leaf in leaves:
    dtype = getattr(leaf, 'dtype', None)
    if dtype is None:
      dtype = np.result_type(leaf)
    if not (
        jnp.issubdtype(dtype, jnp.floating)
        or jnp.issubdtype(dtype, jnp.complexfloating)
    ):
      raise TypeError(
          f'{what} leaf {_leaf_name(path)} has dtype {np.dtype(dtype).name};'
          ' Adam needs floating-point (or complex) leaves. Cast it, or keep'
          ' it out of the optimiser with optax.masked or'
          ' optax.multi_transform.'
      )


def tree_difference(got: list[str], want: list[str], got_def: Any, want_def: Any,
                    what: str, short: str | None = None) -> str:
  """What an update tree with leaf names ``got`` lacks or adds against ``want``
  (the leaves of ``what``; ``short`` names it beside a tree), for an error message."""
  missing = [p for p in want if p not in got]
  extra = [p for p in got if p not in want]
  detail = []
  if missing:
    detail.append(f'missing from the updates: {", ".join(missing[:5])}')
  if extra:
    detail.append(f'not in {what}: {", ".join(extra[:5])}')
  return '; '.join(detail) or f'updates {got_def} vs {short or what} {want_def}'


def _is_8bit(x: Any) -> bool:
  # adamfx.QuantizedArray, by name: _quant imports this module.
  return type(x).__name__ == 'QuantizedArray' and hasattr(x, 'codes')


def refuse_8bit_moments(moments: Any, what: str = 'state.mu') -> None:
  """TypeError if ``moments`` holds 8-bit leaves: the state is adam8bit's.

  Called where a float-moment member's trees do not match (so it costs
  nothing in a working step): the mismatch is then the state's type, not
  the gradients, and the error says so.
  """
  found = [
      path for path, x in jax.tree_util.tree_flatten_with_path(moments, is_leaf=_is_8bit)[0]
      if _is_8bit(x)
  ]
  if found:
    raise TypeError(
        f'{what} holds 8-bit moments (adamfx.QuantizedArray at {_leaf_name(found[0])}'
        f'{f" and {len(found) - 1} more" if len(found) > 1 else ""}): the state was made by'
        ' adamfx.adam8bit/adamw8bit, and this optimiser keeps float moments. Update'
        ' it with the optimiser that made it, or init this one.'
    )


def _is_row_sparse(x: Any) -> bool:
  return type(x).__name__ == 'RowSparse' and hasattr(x, 'todense')  # no import cycle


def refuse_row_sparse(updates: Any, who: str = 'this optimiser') -> None:
  """A TypeError naming the first :class:`adamfx.RowSparse` leaf, and the fix."""
  leaves = jax.tree_util.tree_flatten_with_path(
      updates, is_leaf=lambda x: x is None or _is_row_sparse(x))[0]
  for path, x in leaves:
    if _is_row_sparse(x):
      raise TypeError(
          f'Gradient leaf {_leaf_name(path)} is an adamfx.RowSparse (a row-sparse'
          f' embedding gradient); {who} takes dense gradients. Use'
          ' adamfx.lazy_adam or adamfx.lazy_adamw, which step only the touched'
          ' rows (or pass g.todense() for dense Adam on the table).'
      )


def check_matching_trees(updates: Any, reference: Any, what: str = 'state.mu') -> None:
  """Checks that ``updates`` has the structure and leaf shapes of ``reference``.

  Runs at trace time, on shapes only, so it costs nothing in a compiled step.
  """
  is_none = lambda x: x is None
  # The common case first, without key paths (an eager step over thousands
  # of leaves runs this every call): same structure, same shapes.
  up_flat, up_def = jax.tree.flatten(updates, is_leaf=is_none)
  ref_flat, ref_def = jax.tree.flatten(reference, is_leaf=is_none)
  if up_def == ref_def and all(
      (u is None and r is None)
      or (u is not None and r is not None and tuple(u.shape) == tuple(r.shape))
      for u, r in zip(up_flat, ref_flat)
  ):
    return
  refuse_8bit_moments(reference, what)
  refuse_row_sparse(updates)
  up_leaves, up_def = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_none)
  ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(reference, is_leaf=is_none)
  if up_def != ref_def:
    detail = tree_difference(
        [_leaf_name(p) for p, _ in up_leaves], [_leaf_name(p) for p, _ in ref_leaves],
        up_def, ref_def, 'the state', 'state')
    raise ValueError(
        f'The update tree does not match the optimiser state ({what}) it was'
        f' initialised with; {detail}.'
    )
  for (path, u), (_, r) in zip(up_leaves, ref_leaves):
    if u is None or r is None:
      if (u is None) != (r is None):
        raise ValueError(
            f'Leaf {_leaf_name(path)} is None in one of the updates and the'
            ' state but not in the other.'
        )
      continue
    if tuple(u.shape) != tuple(r.shape):
      raise ValueError(
          f'Leaf {_leaf_name(path)} of the updates has shape {tuple(u.shape)},'
          f' but {what} holds shape {tuple(r.shape)} for it: the gradient tree'
          ' must have the shapes of the params passed to init.'
      )


def check_hyperparam_dtype(name: str, value: Any) -> None:
  """Rejects decay rates that arrive in a 16-bit float, where they are broken.

  ``optax.inject_hyperparams`` casts hyperparameters to the params' dtype; in
  bfloat16 0.999 becomes 1.0 and Adam's bias correction divides by zero.
  """
  dtype = getattr(value, 'dtype', None)
  if dtype is None:
    return
  if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
    near_one = 0.9999 if np.dtype(dtype) == np.float16 else 0.999
    raise TypeError(
        f'`{name}` reached adamfx as {np.dtype(dtype).name}, which cannot hold'
        f' a decay rate ({near_one} rounds to'
        f' {float(np.asarray(near_one, dtype))!r} in {np.dtype(dtype).name}, and'
        f' the bias correction 1 - {name}**t becomes 0).'
        ' optax.inject_hyperparams casts hyperparameters to the params\' dtype:'
        ' use adamfx.inject_hyperparams, or pass hyperparam_dtype=jnp.float32.'
    )


def check_mask(mask: Any, updates: Any, params: Any) -> None:
  """Checks that AdamW's ``mask`` (a tree, or a function of the params) fits.

  Raises a ValueError naming ``mask`` instead of the raw pytree error optax
  gives deep inside ``add_decayed_weights``.
  """
  if mask is None:
    return
  tree = params if params is not None else updates
  mask_tree = mask(tree) if callable(mask) else mask
  try:
    jax.tree.map(lambda m, sub: None, mask_tree, updates, is_leaf=lambda x: x is None)
  except (ValueError, TypeError) as e:
    raise ValueError(
        '`mask` must be a tree of booleans with the structure of the params (or'
        ' a prefix of it), or a function of the params returning one; got one'
        f' that does not match the updates: {e}'
    ) from e


def _leaf_name(path: Any) -> str:
  name = jax.tree_util.keystr(tuple(path))
  return f'`{name}`' if name else '`<root>`'


def is_adam_like(state: Any) -> bool:
  """Whether ``state`` is an Adam-like state: a NamedTuple with count, mu, nu."""
  fields = getattr(type(state), '_fields', None)
  return isinstance(state, tuple) and fields is not None and {
      'count', 'mu', 'nu'
  } <= set(fields)


def adam_like_state(state: Any, who: str) -> Any:
  """Returns ``state`` if Adam-like, else raises a TypeError saying what came."""
  if is_adam_like(state):
    return state
  if state is None:
    raise TypeError(
        f'{who}.update got state=None; pass the state returned by'
        f' {who}.init(params) (and then by the previous update).'
    )
  raise TypeError(
      f'{who}.update got a state of type {type(state).__name__}, not the'
      ' AdamState its init returns (a NamedTuple with count, mu and nu): was'
      ' the state made by another optimiser? Use adamfx.convert_state to'
      ' bring an optax state over, or init this one.'
  )


def check_chain_state(state: Any, links: int) -> None:
  """A TypeError, not optax's raw one, for a state that is not the chain's."""
  if isinstance(state, tuple) and not hasattr(type(state), '_fields') and len(state) == links:
    return
  got = 'None' if state is None else f'a {type(state).__name__}'
  raise TypeError(
      f'update got {got} as the state; pass the state returned by init(params)'
      f' (a tuple of {links} states, the Adam state first), and then the one'
      ' returned by the previous update.'
  )


def check_adam_args(b1: Any, b2: Any, eps: Any, eps_root: Any) -> None:
  """Checks Adam's concrete hyperparameters (see :func:`check_decay`)."""
  check_decay('b1', b1)
  check_decay('b2', b2)
  check_non_negative('eps', eps)
  check_non_negative('eps_root', eps_root)
