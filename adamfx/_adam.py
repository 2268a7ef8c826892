r"""AdamState and the update math of the Adam family, in one place.

Every member of the family -- Adam, NAdam (``nesterov=True``), AMSGrad
(``amsgrad=True``), AdamW (:func:`adamw`) and AdaMax (:func:`scale_by_adamax`)
-- goes through :func:`_moment_step`, which updates one leaf. The variants are
parameters of it, not copies of it.
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

from adamfx import _checks
from adamfx import _fast
from adamfx import _numerics
from adamfx import _rounding

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


class AdamState(NamedTuple):
  """State of :func:`scale_by_adam` and :func:`scale_by_adamax`.

  The fields are those of ``optax.ScaleByAdamState`` (and of
  ``optax.ScaleByAmsgradState`` when ``amsgrad=True``), so a state saved by
  optax restores into adamfx field by field.

  Attributes:
    count: int32 scalar, the number of updates so far; saturates at the int32
      maximum instead of wrapping.
    mu: first moment, a tree shaped like the params, in ``mu_dtype``.
    nu: second moment (AdaMax: the exponentially weighted infinity norm), in
      ``nu_dtype``.
    nu_max: running maximum of the bias-corrected second moment when
      ``amsgrad=True``, else ``None``.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  nu_max: Optional[optax.Updates] = None


ScaleByAdamState = AdamState  # optax's name for the same thing.


def _is_none(x: Any) -> bool:
  return x is None


def _hp(value: Any, dtype: Any) -> Any:
  """A hyperparameter in the arithmetic dtype; Python numbers stay weak."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return value
  return jnp.asarray(value).astype(dtype)


def _power(base: Any, count: jax.Array, dtype: Any) -> jax.Array:
  # lax.pow with an integer exponent, as optax computes ``decay**count``.
  return jax.lax.pow(jnp.asarray(base, dtype), count)


def _keep_dtypes(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Runs an optax transformation, returning updates in their incoming dtypes.

  ``optax.scale_by_learning_rate`` and ``optax.add_decayed_weights`` multiply
  by hyperparameters that may be float32 arrays (under ``inject_hyperparams``)
  or schedules of an int32 count; numpy promotion would turn bfloat16 updates
  into float32 and so change the params' dtype, and strict promotion refuses
  the mix. The state is ``inner``'s, unchanged.
  """

  def update_fn(updates, state, params=None):
    with jax.numpy_dtype_promotion('standard'):
      new_updates, state = inner.update(updates, state, params)
    new_updates = jax.tree.map(
        lambda n, u: None if n is None else n.astype(u.dtype),
        new_updates, updates, is_leaf=_is_none,
    )
    return new_updates, state

  return optax.GradientTransformation(inner.init, update_fn)


def _scale_by_learning_rate(learning_rate: ScalarOrSchedule):
  _checks.check_learning_rate(learning_rate)
  traced = _keep_dtypes(optax.scale_by_learning_rate(learning_rate))
  return _fast.scale_by_learning_rate(learning_rate, traced)  # compiled when eager


def _links(
    scaling: optax.GradientTransformation,
    learning_rate: ScalarOrSchedule,
    decay: Optional[tuple[Any, Any]],
) -> list[optax.GradientTransformation]:
  """``scaling``, AdamW's decoupled decay if ``decay`` (``(weight_decay,
  mask)``), then the learning rate: the links of the family's chains."""
  links = [scaling]
  if decay is not None:
    weight_decay, mask = decay
    if not callable(weight_decay):
      _checks.check_non_negative('weight_decay', weight_decay)
    links.append(_keep_dtypes(optax.add_decayed_weights(weight_decay, mask)))
  links.append(_scale_by_learning_rate(learning_rate))
  return links


def _chain_learning_rate(
    scaling: optax.GradientTransformation,
    learning_rate: ScalarOrSchedule,
    b1: Any,
    b2: Any,
    eps: Any,
    eps_root: Any,
    *,
    decay: Optional[tuple[Any, Any]] = None,
    **flags: bool,
) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(scaling, [decay,] learning-rate scaling)``, one call when eager.

  ``scaling`` is :func:`scale_by_adam` or :func:`scale_by_adamax` with these
  hyperparameters and ``flags``; ``decay``, AdamW's ``(weight_decay, mask)``.
  The state and, under a trace, the update are the chain's. Called eagerly,
  the decay (a number or array, not a schedule) and the learning rate are
  applied inside the family's compiled calls, so a step is one dispatch per
  chunk of leaves and one or two passes less over memory, with the chain's
  numbers.
  """
  links = _links(scaling, learning_rate, decay)
  chain = optax.chain(*links)

  def fused(updates, state, params):
    if not (isinstance(state, tuple) and len(state) == len(links)):
      return None
    if not _fast.eager(updates, state, params, (b1, b2, eps, eps_root)):
      return None
    plan = _fast.learning_rate_plan(learning_rate, state[-1])
    if plan is None:
      return None
    decay_plan = None
    if decay is not None:
      decay_plan = _fast.decay_plan(*decay, updates, params)
      if decay_plan is None:
        return None
    updates, inner = _fast.family_update(
        updates, state[0], b1, b2, eps, eps_root, lr=plan, decay=decay_plan, **flags
    )
    # The decay's state (EmptyState, or MaskedState of it) does not change.
    return updates, (inner, *state[1:-1], plan.new_state)

  def update_fn(updates, state, params=None, **extra_args):
    out = fused(updates, state, params)
    if out is not None:
      return out
    return chain.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(chain.init, update_fn)


def _in_place(cdt: Any, m_dtype: Any, v_dtype: Any) -> bool:
  """Whether a leaf takes the in-place formulation of :func:`_moment_step`.

  Real moments (and AMSGrad's maximum, stored like ``nu``) in the arithmetic
  dtype (float32 or float64). Narrower storage (whose casts may saturate and
  must scale m and v together) and complex moments take the general
  formulation.
  """
  return (
      jnp.dtype(m_dtype) == cdt
      and jnp.dtype(v_dtype) == cdt
      and jnp.issubdtype(cdt, jnp.floating)
  )


def _in_place_narrow(cdt: Any, m_dtype: Any, v_dtype: Any) -> bool:
  """Whether a leaf takes :func:`_in_place_narrow_step`.

  float32 arithmetic with each moment stored in float32 or bfloat16, at
  least one of them bfloat16. bfloat16 has float32's exponent range, so the
  clip of :func:`_in_place_step` keeps every stored moment finite there too:
  nothing saturates, and m and v never need rescaling together. float16
  (whose ``nu`` overflows for a gradient of 256) keeps the general
  formulation.
  """
  ok = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
  m_dtype, v_dtype = jnp.dtype(m_dtype), jnp.dtype(v_dtype)
  return (
      jnp.dtype(cdt) == jnp.float32
      and m_dtype in ok and v_dtype in ok
      and jnp.dtype(jnp.bfloat16) in (m_dtype, v_dtype)
  )


class _Scalars(NamedTuple):
  """The scalars of one step in one arithmetic dtype, shared by its leaves."""

  b1: Any
  one_minus_b1: Any
  b2: Any
  one_minus_b2: Any
  inv_bc1: Any  # 1 / (1 - b1**t)
  inv_bc2: Any  # 1 / (1 - b2**t)
  inv_bc1_next: Any  # 1 / (1 - b1**(t+1)), for NAdam
  eps: Any
  eps_root: Any  # None when it is a Python 0
  guard: bool  # whether the denominator can be 0 (eps not a positive number)


def _leaf_scalars(cache, dtype, count, b1, b2, eps, eps_root, nesterov) -> _Scalars:
  """:class:`_Scalars` in ``dtype``, made once per update and dtype (``cache``).

  Python numbers become NumPy constants of ``dtype`` (``1 - b1`` computed in
  Python first, as optax's weakly typed arithmetic does); arrays are cast.
  The bias corrections enter as reciprocals (see :func:`_in_place_step`).
  """
  key = (dtype, nesterov)
  if cache is not None and key in cache:
    return cache[key]

  def const(x):
    if isinstance(x, (int, float)) and not isinstance(x, bool):
      return np.asarray(x, dtype)
    return jnp.asarray(x).astype(dtype)

  def one_minus(x):
    if isinstance(x, (int, float)) and not isinstance(x, bool):
      return np.asarray(1 - x, dtype)
    return 1 - const(x)

  def inverse_correction(b, t):  # 1 / (1 - b**t)
    return jax.lax.div(np.asarray(1, dtype), 1 - _power(b, t, dtype))

  k = _Scalars(
      b1=const(b1), one_minus_b1=one_minus(b1), b2=const(b2), one_minus_b2=one_minus(b2),
      inv_bc1=inverse_correction(b1, count), inv_bc2=inverse_correction(b2, count),
      inv_bc1_next=(
          inverse_correction(b1, optax.safe_increment(count)) if nesterov else None
      ),
      eps=const(eps),
      # v_hat >= 0 is never -0.0, so v_hat + 0.0 is v_hat: skip the add.
      eps_root=None if isinstance(eps_root, (int, float)) and eps_root == 0 else const(eps_root),
      guard=not (isinstance(eps, (int, float)) and eps > 0),
  )
  if cache is not None:
    cache[key] = k
  return k


def _in_place_step(
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    v_max: Optional[jax.Array],
    k: _Scalars,
    *,
    nesterov: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, Optional[jax.Array]]:
  r"""The Adam step for moments stored in the arithmetic dtype.

  Returns ``(update, mu, nu, nu_max)`` as stored (``nu_max``, AMSGrad's
  running maximum of the bias-corrected ``nu``, None without it). Nothing is cast
  on the way to storage, so the update is read off the stored moments, and
  the overflow guard is a clip of ``g`` at ``±2**63`` (float32; ``±2**511``
  in float64), past which ``g**2`` could overflow: ``mu``'s new value reads
  ``g`` and ``mu`` only, ``nu``'s ``g`` and ``nu``, and XLA updates donated
  moments in place in one loop each, as for optax: no copies, no
  temporaries. Every ``nu`` is then an average of squares below a quarter
  of the dtype's maximum, so nothing overflows, and below the clip the
  numbers are optax's (its operations, in its order, bit for bit).

  Written with ``lax`` operations, not ``jnp``: a model of thousands of
  leaves traces and compiles this once per leaf.
  """
  lax = jax.lax
  big = _numerics.square_safe_limit(g.dtype)
  clipped = lax.clamp(-big, g, big)
  m = lax.add(lax.mul(k.one_minus_b1, clipped), lax.mul(k.b1, m))
  # g - g is 0, or NaN where g is inf or NaN: a non-finite gradient still
  # gives a NaN update and moment, as in optax, not a clipped finite one.
  m = lax.add(m, lax.sub(g, g))
  v = lax.add(lax.mul(k.one_minus_b2, lax.mul(clipped, clipped)), lax.mul(k.b2, v))
  u, v_max = _update_from_moments(m, v, clipped, v_max, k, nesterov=nesterov)
  return u, m, v, v_max


def _update_from_moments(
    m: jax.Array,
    v: jax.Array,
    g: jax.Array,
    v_max: Optional[jax.Array],
    k: _Scalars,
    *,
    nesterov: bool,
) -> tuple[jax.Array, Optional[jax.Array]]:
  """The tail of :func:`_in_place_step`: ``(update, nu_max)`` from the new
  moments ``m``, ``v`` and the clipped gradient ``g`` (read by NAdam only)."""
  lax = jax.lax
  # x / (1 - b**t) as x * (1 / (1 - b**t)): what XLA compiles optax's
  # division by a broadcast scalar into on CPU, written out so that a 0-d
  # leaf (scalar code, where XLA keeps a division) and a step compiled over
  # other leaves get the same bits.
  if nesterov:  # Dozat 2016, in optax's form.
    m_hat = lax.add(
        lax.mul(k.b1, lax.mul(m, k.inv_bc1_next)), lax.mul(k.one_minus_b1, lax.mul(g, k.inv_bc1))
    )
  else:
    m_hat = lax.mul(m, k.inv_bc1)
  # v_hat = v / (1 - b2**t) fits for any state reached from zeros. In one
  # made elsewhere (optax's moments with a reset count, say) it may
  # overflow: that element's step is then 0 (m_hat / inf), not NaN, until
  # 1 - b2**t has grown enough, a few steps later.
  v_hat = lax.mul(v, k.inv_bc2)
  if v_max is not None:  # AMSGrad, as optax: the max of the bias-corrected nu
    v_max = v_hat = lax.max(v_max, v_hat)
  if k.eps_root is not None:
    v_hat = lax.add(v_hat, k.eps_root)
  denom = lax.add(lax.sqrt(v_hat), k.eps)
  if k.guard:  # eps == eps_root == 0 and no gradient yet: 0, not 0/0
    denom = lax.select(lax.gt(denom, lax.full_like(denom, 0)), denom, lax.full_like(denom, 1))
  return lax.div(m_hat, denom), v_max


def _in_place_narrow_step(
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    k: _Scalars,
    count: jax.Array,
    leaf_index: int,
    *,
    nesterov: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""The Adam step for moments stored in bfloat16 (see :func:`_in_place_narrow`).

  Returns ``(update, mu, nu)``, the moments as stored. The arithmetic is
  float32 and the gradient is clipped as in :func:`_in_place_step`; ``mu``
  is stored rounded to nearest, ``nu`` with unbiased stochastic rounding
  (:mod:`adamfx._rounding`, so that ``0.999 * nu`` decays), and the update
  is read off the *stored* moments, as the float32 in-place step reads it
  off its stored ones. Each output is then an elementwise function of
  ``g``, ``m`` and ``v`` that XLA fuses into one loop, updating donated
  moments in place, with no float32 temporaries. The update differs from
  one computed before the rounding by the rounding of ``mu`` (2**-9
  relative) and ``nu`` (unbiased, 2**-8 relative at most).
  """
  lax = jax.lax
  f32 = jnp.float32
  g = g.astype(f32)
  big = _numerics.square_safe_limit(f32)
  clipped = lax.clamp(-big, g, big)
  m_new = lax.add(lax.mul(k.one_minus_b1, clipped), lax.mul(k.b1, m.astype(f32)))
  m_new = lax.add(m_new, lax.sub(g, g))  # NaN where g is not finite, as in optax
  v_new = lax.add(
      lax.mul(k.one_minus_b2, lax.mul(clipped, clipped)), lax.mul(k.b2, v.astype(f32))
  )
  m_s = m_new.astype(m.dtype)
  v_s = v_new if v.dtype == f32 else _rounding.store_second_moment(
      v_new, v.dtype, count, leaf_index)
  m_r, v_r = m_s.astype(f32), v_s.astype(f32)
  if nesterov:
    m_hat = lax.add(
        lax.mul(k.b1, lax.mul(m_r, k.inv_bc1_next)),
        lax.mul(k.one_minus_b1, lax.mul(clipped, k.inv_bc1)),
    )
  else:
    m_hat = lax.mul(m_r, k.inv_bc1)
  v_hat = lax.mul(v_r, k.inv_bc2)
  if k.eps_root is not None:
    v_hat = lax.add(v_hat, k.eps_root)
  denom = lax.add(lax.sqrt(v_hat), k.eps)
  if k.guard:
    denom = lax.select(lax.gt(denom, lax.full_like(denom, 0)), denom, lax.full_like(denom, 1))
  return lax.div(m_hat, denom), m_s, v_s


def _moment_step(
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    v_max: Optional[jax.Array],
    count: jax.Array,
    b1: Any,
    b2: Any,
    eps: Any,
    eps_root: Any,
    *,
    nesterov: bool,
    amsgrad: bool,
    infinity_norm: bool,
    scalars: Optional[dict[Any, Any]] = None,
) -> tuple[jax.Array, jax.Array, jax.Array, Optional[jax.Array]]:
  r"""One Adam-family step for one leaf, in at least float32.

  Returns ``(update, mu, nu, nu_max)`` in the arithmetic dtype, before the
  storage casts. A finite gradient never produces ``inf`` or ``NaN``, and
  wherever nothing would overflow the operations are those of optax, in
  optax's order. Two formulations:

  - moments stored in the arithmetic dtype (float32/float64, see
    :func:`_in_place`): :func:`_in_place_step`, which clips ``|g|`` at
    ``2**63`` (float32), so that XLA updates donated moments in place;
  - otherwise (float16 storage, complex; bfloat16 storage takes
    :func:`_in_place_narrow_step` in :func:`_family_update`, or this
    formulation under AMSGrad or AdaMax): elements whose gradient or
    second moment would overflow when squared are computed on values
    rescaled by an exact power of two, the update is computed before the
    storage casts, and a saturating element's m and v are scaled together.

  ``scalars`` caches the step's scalars across the leaves of one update.
  """
  cdt = _numerics.compute_dtype(g.dtype, m.dtype, v.dtype)
  rdt = _numerics.real_dtype(cdt)
  _checks.check_decay_in_dtype('b1', b1, rdt)
  _checks.check_decay_in_dtype('b2', b2, rdt)
  if not infinity_norm and _in_place(cdt, m.dtype, v.dtype):
    k = _leaf_scalars(scalars, cdt, count, b1, b2, eps, eps_root, nesterov)
    return _in_place_step(g.astype(cdt), m, v, v_max, k, nesterov=nesterov)
  nu_limit = float(jnp.finfo(_numerics.real_dtype(v.dtype)).max)
  g = g.astype(cdt)
  m = m.astype(cdt)
  v = jnp.real(v).astype(rdt)
  b1c, b2r = _hp(b1, cdt), _hp(b2, rdt)
  bc1 = 1 - _power(b1, count, rdt)
  bc2 = 1 - _power(b2, count, rdt)

  if infinity_norm:  # AdaMax, Kingma & Ba section 7.1.
    m = (1 - b1c) * g + b1c * m
    v = jnp.maximum(jnp.abs(g) + _hp(eps, rdt), b2r * v)
    m_hat = m / bc1.astype(cdt)
    safe_v = jnp.where(v > 0, v, 1).astype(cdt)
    return m_hat / safe_v, m, v, None

  g_big, v_big, small = _numerics.huge_thresholds(rdt)
  absg = jnp.abs(g)
  # v_hat = v / (1 - b2**t) is up to 1 / (1 - b2) times v: test v against
  # v_big scaled the same way, so that v_hat (<= 2 v_big) cannot overflow.
  huge = (absg > g_big) | (v > v_big * bc2)
  if amsgrad:
    v_max = jnp.real(v_max).astype(rdt)
    huge = huge | (v_max > v_big)
  scale = jnp.where(huge, small, 1).astype(rdt)
  g = g * scale.astype(cdt)
  m = m * scale.astype(cdt)
  v = v * scale * scale

  sq = jnp.square(absg * scale) if jnp.iscomplexobj(g) else jnp.square(g)
  m = (1 - b1c) * g + b1c * m
  v = (1 - _hp(b2, rdt)) * sq + b2r * v
  if nesterov:  # Dozat 2016, in optax's form.
    bc1_next = 1 - _power(b1, optax.safe_increment(count), rdt)
    m_hat = b1c * (m / bc1_next.astype(cdt)) + (1 - b1c) * (g / bc1.astype(cdt))
  else:
    m_hat = m / bc1.astype(cdt)
  v_hat = v / bc2
  if amsgrad:
    v_hat = jnp.maximum(v_max * scale * scale, v_hat)
    v_max = v_hat
  denom = jnp.sqrt(v_hat + _hp(eps_root, rdt) * scale * scale) + _hp(eps, rdt) * scale
  # denom == 0 only when eps == eps_root == 0 and every gradient so far was 0,
  # where m_hat is 0 too: return 0, not 0/0.
  update = m_hat / jnp.where(denom > 0, denom, 1).astype(cdt)

  # What is stored must fit the state's dtype. Where the second moment would
  # not, scale this leaf element's history (m by c, v by c**2, c a power of
  # two) so it does: m / sqrt(v) keeps its value, and the history reads as
  # that of a gradient c times smaller, which Adam is invariant to.
  limit = nu_limit * scale * scale
  over = v > limit
  if amsgrad:
    over = over | (v_max > limit)
  fits = _numerics.fit_exponent(jnp.maximum(v, v_max) if amsgrad else v, limit)
  c = jnp.where(over, fits, 1).astype(rdt)
  unscale = jnp.where(huge, 1 / small, 1).astype(rdt) * c
  m = m * unscale.astype(cdt)
  v = v * unscale * unscale
  if amsgrad:
    v_max = v_max * unscale * unscale
  return update, m, v, v_max


def _family_update(
    updates: optax.Updates,
    state: AdamState,
    b1: Any,
    b2: Any,
    eps: Any,
    eps_root: Any,
    *,
    nesterov: bool = False,
    amsgrad: bool = False,
    infinity_norm: bool = False,
) -> tuple[optax.Updates, AdamState]:
  """Applies :func:`_moment_step` to every leaf and stores the results."""
  updates = jax.tree.map(jnp.asarray, updates)  # Python-number leaves too
  _checks.check_matching_trees(updates, state.mu)
  _checks.check_hyperparam_dtype('b1', b1)
  _checks.check_hyperparam_dtype('b2', b2)
  count = optax.safe_increment(state.count)
  g_leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_none)
  m_leaves = treedef.flatten_up_to(state.mu)
  v_leaves = treedef.flatten_up_to(state.nu)
  if amsgrad:
    vm_leaves = treedef.flatten_up_to(state.nu_max)
  else:
    vm_leaves = [None] * len(g_leaves)
  out_u, out_m, out_v, out_vm = [], [], [], []
  scalars = {}
  for i, (g, m, v, vm) in enumerate(zip(g_leaves, m_leaves, v_leaves, vm_leaves)):
    if g is None:
      for out in (out_u, out_m, out_v, out_vm):
        out.append(None)
      continue
    cdt = _numerics.compute_dtype(g.dtype, m.dtype, v.dtype)
    if not (infinity_norm or amsgrad) and _in_place_narrow(cdt, m.dtype, v.dtype):
      _checks.check_decay_in_dtype('b1', b1, cdt)
      _checks.check_decay_in_dtype('b2', b2, cdt)
      k = _leaf_scalars(scalars, cdt, count, b1, b2, eps, eps_root, nesterov)
      u, m_new, v_new = _in_place_narrow_step(g, m, v, k, count, i, nesterov=nesterov)
      out_u.append(u.astype(g.dtype))
      out_m.append(m_new)
      out_v.append(v_new)
      out_vm.append(None)
      continue
    u, m_new, v_new, vm_new = _moment_step(
        g, m, v, vm, count, b1, b2, eps, eps_root,
        nesterov=nesterov, amsgrad=amsgrad, infinity_norm=infinity_norm,
        scalars=scalars,
    )
    out_u.append(u.astype(g.dtype))
    if not infinity_norm and _in_place(m_new.dtype, m.dtype, v.dtype):
      # Stored as computed: the in-place formulation's moments always fit,
      # and a clamp here would keep XLA from updating m and v in place.
      out_m.append(m_new)
      out_v.append(v_new)
      out_vm.append(vm_new)
      continue
    out_m.append(_numerics.saturate(m_new, m.dtype))
    # A 16-bit nu is stored with unbiased stochastic rounding: round-to-nearest
    # would return 0.999 * nu as nu (see adamfx._rounding).
    # A positive nu stored as 0 (float16 underflow) would make the next step
    # m_hat / eps, inf in float16: keep_positive stores the smallest instead.
    out_v.append(_numerics.keep_positive(
        _rounding.store_second_moment(v_new, v.dtype, count, i), v_new))
    out_vm.append(None if vm is None else _numerics.keep_positive(
        _numerics.saturate(vm_new, vm.dtype), vm_new))
  unflatten = functools.partial(jax.tree.unflatten, treedef)
  new_state = AdamState(
      count=count,
      mu=unflatten(out_m),
      nu=unflatten(out_v),
      nu_max=unflatten(out_vm) if amsgrad else None,
  )
  return unflatten(out_u), new_state


def _mu_dtype(param_dtype: Any, mu_dtype: Any) -> Any:
  """``mu_dtype`` for one leaf: its complex counterpart for complex params."""
  if (
      mu_dtype is None
      or not jnp.issubdtype(param_dtype, jnp.complexfloating)
      or jnp.issubdtype(mu_dtype, jnp.complexfloating)
  ):
    return mu_dtype
  return jnp.complex128 if jnp.finfo(mu_dtype).bits == 64 else jnp.complex64


def _family_init(
    params: optax.Params, mu_dtype: Any, nu_dtype: Any, amsgrad: bool
) -> AdamState:
  _checks.check_param_leaves(params)
  # Python-number leaves become arrays; arrays, tracers and ShapeDtypeStructs
  # are used as they are.
  params = jax.tree.map(
      lambda p: p if hasattr(p, 'dtype') else jnp.asarray(p), params
  )
  zeros = lambda dtype: jax.tree.map(
      lambda p: _numerics.zeros_like(p, dtype), params
  )
  return AdamState(
      count=jnp.zeros([], jnp.int32),
      # mu_dtype names a precision: complex params keep a complex mu (a real
      # one would silently drop the momentum's imaginary part).
      mu=jax.tree.map(
          lambda p: _numerics.zeros_like(p, _mu_dtype(p.dtype, mu_dtype)), params
      ),
      nu=zeros(nu_dtype),
      nu_max=zeros(nu_dtype) if amsgrad else None,
  )


def _check_adam_args(b1, b2, eps, eps_root, mu_dtype, nu_dtype):
  _checks.check_decay('b1', b1)
  _checks.check_decay('b2', b2)
  _checks.check_non_negative('eps', eps)
  _checks.check_non_negative('eps_root', eps_root)
  return (
      _checks.check_state_dtype('mu_dtype', mu_dtype),
      _checks.check_state_dtype('nu_dtype', nu_dtype),
  )


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[Any] = None,
    *,
    nu_dtype: Optional[Any] = None,
    nesterov: bool = False,
    amsgrad: bool = False,
) -> optax.GradientTransformation:
  r"""Rescales updates by Adam's bias-corrected moment ratio.

  Adam keeps exponential moving averages of the gradient and of its square,
  corrects both for their initialisation at zero, and divides one by the root
  of the other. Each coordinate's step is then about ``1`` in size whatever
  the gradient's scale; chain with a learning rate (or use :func:`adam`).

  .. math::

    \begin{align*}
      m_t &\leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
      v_t &\leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
      \hat m_t &\leftarrow m_t / (1 - \beta_1^t) \\
      \hat v_t &\leftarrow v_t / (1 - \beta_2^t) \\
      u_t &\leftarrow \hat m_t / \left(\sqrt{\hat v_t + \bar\varepsilon}
        + \varepsilon\right)
    \end{align*}

  where :math:`\beta_1` is ``b1``, :math:`\beta_2` is ``b2``,
  :math:`\varepsilon` is ``eps`` and :math:`\bar\varepsilon` is ``eps_root``.
  With ``nesterov=True`` (NAdam), :math:`\hat m_t \leftarrow \beta_1 m_t /
  (1 - \beta_1^{t+1}) + (1 - \beta_1) g_t / (1 - \beta_1^t)`. With
  ``amsgrad=True``, :math:`\hat v_t` is replaced by its running maximum
  :math:`\max(\hat v_{t-1}^{\max}, \hat v_t)`.

  The arithmetic runs in at least float32 whatever the params' dtype, and a
  finite gradient never yields ``inf`` or ``NaN``: with moments stored in
  float32 (float64) or bfloat16, gradient elements are clipped at ``±2**63``
  (``±2**511``), past which their square could overflow, and the update is
  read off the stored moments (with bfloat16 moments: off their rounded
  values); with float16 storage, elements that would overflow when squared
  are rescaled by an exact power of two.

  Args:
    b1: decay of the first moment, in [0, 1); default 0.9.
    b2: decay of the second moment, in [0, 1); default 0.999.
    eps: added to the root of the second moment, >= 0; default 1e-8.
    eps_root: added inside the root, >= 0; default 0. Use a positive value to
      differentiate through the update (meta-learning).
    mu_dtype: storage dtype of the first moment (floating); default: the
      params' dtype. For complex params, the complex dtype of that precision.
    nu_dtype: storage dtype of the second moment (floating); default: the
      params' dtype. The arithmetic stays in at least float32. A 16-bit
      ``nu`` is stored with stochastic rounding (deterministic bits hashed
      from the step count), so that ``0.999 * nu`` does not round back to
      ``nu``: see ``adamfx._rounding``.
    nesterov: use Nesterov momentum (NAdam, Dozat 2016).
    amsgrad: keep the running maximum of the bias-corrected second moment
      (AMSGrad, Reddi et al. 2018), as ``optax.amsgrad`` does.

  Returns:
    An ``optax.GradientTransformation`` whose state is an :class:`AdamState`.

  Raises:
    ValueError: if ``b1`` or ``b2`` is outside [0, 1), or ``eps``/``eps_root``
      is negative or not finite; at update time, if the gradient tree does
      not match the state, or if ``b1``/``b2`` rounds to 1.0 in the
      arithmetic dtype (``b2=0.99999999`` with float32 params).
    TypeError: if a hyperparameter is not a number, a dtype is not floating
      point, or a params leaf is an integer array.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adamfx
    >>> tx = adamfx.scale_by_adam()
    >>> state = tx.init(jnp.zeros(2))
    >>> updates, state = tx.update(jnp.array([0.5, -2.0]), state)
    >>> updates  # the first step is sign(g), up to eps
    Array([ 1., -1.], dtype=float32)

  References:
    Kingma & Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, ICLR 2015.

    Dozat, `Incorporating Nesterov Momentum into Adam
    <https://openreview.net/pdf?id=OM0jvwB8jIp57ZJjtNEZ>`_, 2016.

    Reddi, Kale & Kumar, `On the Convergence of Adam and Beyond
    <https://openreview.net/forum?id=ryQu7f-RZ>`_, ICLR 2018.

  .. warning::
    ``eps`` is added outside the square root, as in the paper's Algorithm 1,
    optax and PyTorch; Keras adds a different epsilon (``epsilon_hat``), so
    its numbers differ for small gradients. AMSGrad here takes the maximum of
    the *bias-corrected* second moment, as optax does; PyTorch's
    ``amsgrad=True`` takes it over the raw moment and corrects afterwards.
  """
  mu_dtype, nu_dtype = _check_adam_args(b1, b2, eps, eps_root, mu_dtype, nu_dtype)

  def init_fn(params):
    return _family_init(params, mu_dtype, nu_dtype, amsgrad)

  def update_fn(updates, state, params=None):
    del params
    return _fast.family_update(  # compiled when eager
        updates, state, b1, b2, eps, eps_root, nesterov=nesterov, amsgrad=amsgrad
    )

  return optax.GradientTransformation(init_fn, update_fn)


def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[Any] = None,
    *,
    nu_dtype: Optional[Any] = None,
    nesterov: bool = False,
    amsgrad: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam: a drop-in for ``optax.adam``, with sturdier numerics.

  :func:`scale_by_adam` followed by ``optax.scale_by_learning_rate``, so the
  update is :math:`-\alpha_t \hat m_t / (\sqrt{\hat v_t + \bar\varepsilon} +
  \varepsilon)` with :math:`\alpha_t` the ``learning_rate``. Each step is
  roughly bounded by the learning rate and is invariant to rescaling the
  gradient.

  .. math::

    \theta_t \leftarrow \theta_{t-1} - \alpha_t \hat m_t /
      \left(\sqrt{\hat v_t + \bar\varepsilon} + \varepsilon\right)

  Args:
    learning_rate: :math:`\alpha`, a number >= 0 or an optax schedule of the
      step count.
    b1: decay of the first moment, in [0, 1); default 0.9.
    b2: decay of the second moment, in [0, 1); default 0.999.
    eps: added to the root of the second moment, >= 0; default 1e-8.
    eps_root: added inside the root, >= 0; default 0.
    mu_dtype: storage dtype of the first moment; default: the params' dtype.
    nu_dtype: storage dtype of the second moment; default: the params' dtype.
    nesterov: NAdam (``optax.nadam``).
    amsgrad: AMSGrad (``optax.amsgrad``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its state is
    ``(AdamState, optax.ScaleByScheduleState or EmptyState)`` as optax's.

  Raises:
    ValueError: for hyperparameters outside their ranges (see
      :func:`scale_by_adam`) or a negative learning rate.
    TypeError: for a learning rate that is neither a number nor a schedule.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import adamfx
    >>> loss = lambda w: jnp.sum((w - 3.0) ** 2)
    >>> params = jnp.zeros(3)
    >>> tx = adamfx.adam(learning_rate=0.1)
    >>> state = tx.init(params)
    >>> for _ in range(200):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(jnp.allclose(params, 3.0, atol=1e-2))
    True

  References:
    Kingma & Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, ICLR 2015.
  """
  return _chain_learning_rate(
      scale_by_adam(
          b1, b2, eps, eps_root, mu_dtype,
          nu_dtype=nu_dtype, nesterov=nesterov, amsgrad=amsgrad,
      ),
      learning_rate, b1, b2, eps, eps_root, nesterov=nesterov, amsgrad=amsgrad,
  )


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[Any] = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    *,
    nu_dtype: Optional[Any] = None,
    nesterov: bool = False,
    amsgrad: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW: Adam with decoupled weight decay, a drop-in for ``optax.adamw``.

  The decay is added to Adam's normalised update, not to the gradient, so it
  is not rescaled by the second moment (Loshchilov & Hutter 2019).

  .. math::

    \theta_t \leftarrow \theta_{t-1} - \alpha_t \left(\hat m_t /
      (\sqrt{\hat v_t + \bar\varepsilon} + \varepsilon)
      + \lambda \theta_{t-1}\right)

  with :math:`\lambda` the ``weight_decay``.

  Args:
    learning_rate: :math:`\alpha`, a number >= 0 or an optax schedule.
    b1: decay of the first moment, in [0, 1); default 0.9.
    b2: decay of the second moment, in [0, 1); default 0.999.
    eps: added to the root of the second moment, >= 0; default 1e-8.
    eps_root: added inside the root, >= 0; default 0.
    mu_dtype: storage dtype of the first moment; default: the params' dtype.
    weight_decay: :math:`\lambda` >= 0, or a schedule; default 1e-4.
    mask: a tree of booleans (or a function of the params returning one)
      selecting the leaves to decay, as in ``optax.add_decayed_weights``.
    nu_dtype: storage dtype of the second moment; default: the params' dtype.
    nesterov: NAdamW (``optax.nadamw``).
    amsgrad: AMSGrad's maximum of the second moment.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  Raises:
    ValueError: for hyperparameters outside their ranges, including a
      negative ``weight_decay``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import adamfx
    >>> params = {'w': jnp.ones(2)}
    >>> tx = adamfx.adamw(1e-2, weight_decay=0.1)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.zeros(2)}, state, params)
    >>> updates['w']  # pure decay: -lr * weight_decay * w
    Array([-0.001, -0.001], dtype=float32)

  References:
    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.
  """
  return _chain_learning_rate(
      scale_by_adam(
          b1, b2, eps, eps_root, mu_dtype,
          nu_dtype=nu_dtype, nesterov=nesterov, amsgrad=amsgrad,
      ),
      learning_rate, b1, b2, eps, eps_root, decay=(weight_decay, mask),
      nesterov=nesterov, amsgrad=amsgrad,
  )


def _decoupled_decay_chain(
    scaling: optax.GradientTransformation,
    learning_rate: ScalarOrSchedule,
    weight_decay: ScalarOrSchedule,
    mask: Any,
) -> optax.GradientTransformationExtraArgs:
  """``scaling``, then AdamW's decoupled decay, then the learning rate."""
  return optax.chain(*_links(scaling, learning_rate, (weight_decay, mask)))


def scale_by_adamax(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
  r"""Rescales updates by AdaMax's infinity-norm moment (paper section 7.1).

  AdaMax replaces Adam's second moment by an exponentially weighted infinity
  norm, which needs no bias correction and bounds each step by the learning
  rate exactly.

  .. math::

    \begin{align*}
      m_t &\leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
      u_t &\leftarrow \max(\beta_2 u_{t-1}, |g_t| + \varepsilon) \\
      \text{update} &\leftarrow m_t / \left((1 - \beta_1^t)\, u_t\right)
    \end{align*}

  with :math:`\beta_1` ``b1``, :math:`\beta_2` ``b2``, :math:`\varepsilon`
  ``eps``. The state's ``nu`` holds :math:`u_t`.

  Args:
    b1: decay of the first moment, in [0, 1); default 0.9.
    b2: decay of the infinity norm, in [0, 1); default 0.999.
    eps: added to ``|g|`` (as optax does), >= 0; default 1e-8.

  Returns:
    An ``optax.GradientTransformation`` whose state is an :class:`AdamState`.

  Raises:
    ValueError: if ``b1``/``b2`` is outside [0, 1) or ``eps`` is negative.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adamfx
    >>> tx = adamfx.scale_by_adamax()
    >>> state = tx.init(jnp.zeros(2))
    >>> updates, state = tx.update(jnp.array([4.0, -0.5]), state)
    >>> updates
    Array([ 1., -1.], dtype=float32)

  References:
    Kingma & Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, ICLR 2015, section 7.1.
  """
  _check_adam_args(b1, b2, eps, 0.0, None, None)

  def init_fn(params):
    return _family_init(params, None, None, amsgrad=False)

  def update_fn(updates, state, params=None):
    del params
    return _fast.family_update(  # compiled when eager
        updates, state, b1, b2, eps, 0.0, infinity_norm=True
    )

  return optax.GradientTransformation(init_fn, update_fn)


def adamax(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaMax, a drop-in for ``optax.adamax``.

  :func:`scale_by_adamax` followed by ``optax.scale_by_learning_rate``:
  :math:`\theta_t \leftarrow \theta_{t-1} - \alpha_t m_t / ((1 - \beta_1^t)
  u_t)`.

  Args:
    learning_rate: :math:`\alpha`, a number >= 0 or an optax schedule.
    b1: decay of the first moment, in [0, 1); default 0.9.
    b2: decay of the infinity norm, in [0, 1); default 0.999.
    eps: added to ``|g|``, >= 0; default 1e-8.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    ValueError: for hyperparameters outside their ranges.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adamfx
    >>> tx = adamfx.adamax(0.002)
    >>> state = tx.init(jnp.zeros(1))
    >>> updates, _ = tx.update(jnp.array([3.0]), state)
    >>> updates
    Array([-0.002], dtype=float32)

  References:
    Kingma & Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, ICLR 2015, section 7.1.
  """
  return _chain_learning_rate(
      scale_by_adamax(b1, b2, eps), learning_rate, b1, b2, eps, 0.0, infinity_norm=True
  )


nadam = functools.partial(adam, nesterov=True)
nadam.__doc__ = 'NAdam: :func:`adam` with ``nesterov=True`` (``optax.nadam``).'
nadamw = functools.partial(adamw, nesterov=True)
nadamw.__doc__ = 'NAdamW: :func:`adamw` with ``nesterov=True`` (``optax.nadamw``).'


def amsgrad(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """AMSGrad: :func:`adam` with ``amsgrad=True`` (``optax.amsgrad``'s defaults).

  Args:
    learning_rate: a number >= 0 or an optax schedule.
    b1: decay of the first moment, in [0, 1).
    b2: decay of the second moment, in [0, 1).
    eps: added to the root of the second moment, >= 0.
    eps_root: added inside the root, >= 0.
    mu_dtype: storage dtype of the first moment.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return adam(learning_rate, b1, b2, eps, eps_root, mu_dtype, amsgrad=True)


def inject_hyperparams(
    inner_factory: Callable[..., Any],
    static_args: Union[str, tuple[str, ...]] = (),
    hyperparam_dtype: Optional[Any] = None,
) -> Callable[..., optax.GradientTransformationExtraArgs]:
  """``optax.inject_hyperparams`` that keeps hyperparameters in >= float32.

  optax casts injected hyperparameters to the params' dtype, which in
  bfloat16 turns ``b2=0.999`` into ``1.0``. This wrapper defaults
  ``hyperparam_dtype`` to float32 when the params are narrower (and to the
  params' dtype otherwise), and is otherwise optax's function.

  Args:
    inner_factory: a function returning a transformation, e.g. :func:`adam`.
    static_args: names of arguments not to inject.
    hyperparam_dtype: dtype of the injected hyperparameters; default: at
      least float32.

  Returns:
    A factory with the signature of ``inner_factory``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adamfx
    >>> tx = adamfx.inject_hyperparams(adamfx.adam)(learning_rate=1e-3)
    >>> params = jnp.ones(3, jnp.bfloat16)
    >>> state = tx.init(params)
    >>> state.hyperparams['b2'].dtype
    dtype('float32')
  """
  if hyperparam_dtype is not None:
    return optax.inject_hyperparams(inner_factory, static_args, hyperparam_dtype)

  def dtype_for(tree):
    # The leaves' dtypes promoted together with float32, real part. Not
    # optax.tree.dtype(tree, 'highest'): it refuses a float64 + complex64
    # tree, and under strict promotion a bfloat16 + float32 one.
    dtypes = [jnp.result_type(x) for x in jax.tree.leaves(tree)]
    return _numerics.real_dtype(_numerics.compute_dtype(*dtypes))

  @functools.wraps(inner_factory)
  def factory(*args, **kwargs):
    def build(tree):
      return optax.inject_hyperparams(
          inner_factory, static_args, dtype_for(tree)
      )(*args, **kwargs)

    build(None)  # Bind (and so check) the arguments now, not at init.

    def init_fn(params):
      return build(params).init(params)

    def update_fn(updates, state, params=None, **extra_args):
      tree = params if params is not None else updates
      return build(tree).update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

  return factory
