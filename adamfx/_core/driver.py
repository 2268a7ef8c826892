r"""The Adam core: its state, its per-leaf math and the one tree driver.

Every member -- Adam, NAdam (``nesterov=True``), AMSGrad (``amsgrad=True``),
AdamW's Adam part, AdaMax (``infinity_norm=True``), lazy Adam (its row-sparse
leaves on their touched rows, :func:`_row_step`), the 8-bit aliases and the
torch/Keras builders -- runs through
:func:`tree_update`, which owns flattening, None leaves, the count, the
checks, the NaN guard for invalid traced hyperparameters, the casts and the
fused tail ``-lr * (u + wd * p)`` (:class:`Tail`). Per leaf it runs the
storage's step: :func:`dense_step` for arrays, which uses one of two
formulations,

- :func:`_in_place_step` (float32 and wider moments, and 16-bit moments of
  16-bit or float32 params through :func:`_in_place_narrow_step`): the moments
  update in place and the update is read off the stored moments;
- :func:`_moment_step`, the general path (float16 moments, complex params,
  AMSGrad, AdaMax): rescaled arithmetic that neither overflows nor underflows;

or a storage format's step (:mod:`adamfx._formats`) around :class:`LeafMath`.
The variants are parameters of these, not copies of them. The constructors
(:mod:`adamfx._builders.adam`) and the compiled eager path (:mod:`adamfx._core.eager`) build
on this module; it imports neither.
"""

from __future__ import annotations

import functools
from typing import Any
from typing import NamedTuple
from typing import Optional
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamfx._core import checks as _checks
from adamfx._core import numerics as _numerics
from adamfx._core import rounding as _rounding
from adamfx._core import sharding as _sharding

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
ScaleByAmsgradState = AdamState  # optax's name for scale_by_amsgrad's state.


class Amsgrad(NamedTuple):
  """An ``amsgrad`` flag with optax's ``bias_correction_mu``/``bias_correction_nu``.

  Truthy and hashable, so it travels wherever ``amsgrad=True`` does (static
  under ``jit``); :func:`_moment_step` reads the two corrections from it.
  """

  correct_mu: bool = True
  correct_nu: bool = True


def _corrections(amsgrad: Any) -> tuple[bool, bool]:
  """``(correct mu?, correct nu?)`` of an ``amsgrad`` flag (True/False or :class:`Amsgrad`)."""
  return (amsgrad.correct_mu, amsgrad.correct_nu) if isinstance(amsgrad, Amsgrad) else (True, True)


class AdaMaxState(AdamState):
  """:class:`AdamState` of :func:`scale_by_adamax`: ``nu`` is the infinity norm.

  The same fields (a drop-in for optax's AdaMax state, field by field); the
  type tells tools such as :func:`adamfx.adam_diagnostics` that ``nu`` is not
  a second moment.
  """

  __slots__ = ()


_is_none = _numerics.is_none


def _hp(value: Any, dtype: Any) -> Any:
  """A hyperparameter in the arithmetic dtype; Python numbers stay weak."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return value
  return jnp.asarray(value).astype(dtype)


def _power(base: Any, count: jax.Array, dtype: Any) -> jax.Array:
  # lax.pow with an integer exponent, as optax computes ``decay**count``.
  return jax.lax.pow(jnp.asarray(base, dtype), count)


def _one_minus_power(base: Any, count: jax.Array, dtype: Any) -> jax.Array:
  """``1 - base**count`` in ``dtype``: the bias correction.

  Under ``jax_enable_x64`` it is computed in float64 and then rounded, as
  optax's weakly typed ``1 - decay**count`` is there: in float32,
  ``1 - 0.999**3`` loses ~2e-5 of its value to cancellation.
  """
  if jax.config.jax_enable_x64 and jnp.finfo(dtype).bits < 64:
    return (1 - _power(base, count, jnp.float64)).astype(dtype)
  return 1 - _power(base, count, dtype)


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


def _leaf_scalars(cache, dtype, count, b1, b2, eps, eps_root, nesterov,
                  correct=(True, True)) -> _Scalars:
  """:class:`_Scalars` in ``dtype``, made once per update and dtype (``cache``).

  Python numbers become NumPy constants of ``dtype`` (``1 - b1`` computed in
  Python first, as optax's weakly typed arithmetic does); arrays are cast.
  The bias corrections enter as reciprocals (see :func:`_in_place_step`);
  ``correct`` (mu's, nu's) False makes one exactly 1 (AMSGrad's
  ``bias_correction_mu``/``_nu``).
  """
  key = (dtype, nesterov, correct)
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

  def inverse_correction(b, t, on=True):  # 1 / (1 - b**t)
    if not on:
      return np.asarray(1, dtype)
    return jax.lax.div(np.asarray(1, dtype), _one_minus_power(b, t, dtype))

  k = _Scalars(
      b1=const(b1), one_minus_b1=one_minus(b1), b2=const(b2), one_minus_b2=one_minus(b2),
      inv_bc1=inverse_correction(b1, count, correct[0]),
      inv_bc2=inverse_correction(b2, count, correct[1]),
      inv_bc1_next=(
          inverse_correction(b1, optax.safe_increment(count), correct[0]) if nesterov else None
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
  numbers are optax's operations, in its order: equal to float32 rounding
  (a step-1 update may differ by 1 ulp, where XLA compiles a division by the
  bias correction differently).

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
    index: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""The Adam step for moments stored in bfloat16 (see :func:`_in_place_narrow`).

  ``index``: the elements' flat positions in the whole leaf, for lazy Adam's
  gathered rows (the stochastic rounding bits of those elements).

  Returns ``(update, mu, nu)``, the moments as stored. The arithmetic is
  float32 and the gradient is clipped as in :func:`_in_place_step`; ``mu``
  is stored rounded to nearest, ``nu`` with unbiased stochastic rounding
  (:mod:`adamfx._core.rounding`, so that ``0.999 * nu`` decays), and the update
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
      v_new, v.dtype, count, leaf_index, index)
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
  correct = _corrections(amsgrad)
  if not infinity_norm and _in_place(cdt, m.dtype, v.dtype):
    k = _leaf_scalars(scalars, cdt, count, b1, b2, eps, eps_root, nesterov, correct)
    return _in_place_step(g.astype(cdt), m, v, v_max, k, nesterov=nesterov)
  nu_limit = float(jnp.finfo(_numerics.real_dtype(v.dtype)).max)
  g = g.astype(cdt)
  m = m.astype(cdt)
  v = jnp.real(v).astype(rdt)
  b1c, b2r = _hp(b1, cdt), _hp(b2, rdt)
  one = jnp.ones([], rdt)
  bc1 = _one_minus_power(b1, count, rdt) if correct[0] else one
  bc2 = _one_minus_power(b2, count, rdt) if correct[1] else one

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
    bc1_next = _one_minus_power(b1, optax.safe_increment(count), rdt) if correct[0] else one
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


def nan_where(invalid: Any, u: jax.Array) -> jax.Array:
  """``u``, or NaN everywhere if ``invalid`` (see ``_checks.invalid_hyperparams``)."""
  if invalid is None:
    return u
  return jnp.where(invalid, jnp.asarray(jnp.nan, u.dtype), u)


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
  nu = zeros(nu_dtype)
  _checks.warn_float16_second_moment(nu)  # where float16 stops being safe
  return AdamState(
      count=jnp.zeros([], jnp.int32),
      # mu_dtype names a precision: complex params keep a complex mu (a real
      # one would silently drop the momentum's imaginary part).
      mu=jax.tree.map(
          lambda p: _numerics.zeros_like(p, _mu_dtype(p.dtype, mu_dtype)), params
      ),
      nu=nu,
      nu_max=zeros(nu_dtype) if amsgrad else None,
  )


class LeafMath(NamedTuple):
  """The core's per-leaf Adam math, handed to a storage format's ``step``.

  ``math(g, m, v, vm=None)`` takes the gradient and the decoded (float32 or
  wider) moments and returns ``(update, m_new, v_new, vm_new)`` before any
  storage cast (:func:`_moment_step`); ``vm`` is AMSGrad's running maximum
  (None without it). ``step_size`` is the learning rate (``-lr``, a Python
  number) a format may apply inside its own loop (it then returns
  ``scaled=True``); None when the leaf's tail must run first (decay).
  """

  count: Any
  hps: dict[str, Any]
  nesterov: bool = False
  amsgrad: bool = False
  infinity_norm: bool = False
  step_size: Optional[float] = None
  scalars: Optional[dict[Any, Any]] = None  # the step's scalars, per dtype

  def __call__(self, g, m, v, vm=None):
    return _moment_step(
        g, m, v, vm, count=self.count, **self.hps, nesterov=self.nesterov,
        amsgrad=self.amsgrad, infinity_norm=self.infinity_norm, scalars=self.scalars,
    )


def dense_step(g, m, v, vm, leaf_index, math, index=None):
  """The step of one leaf whose moments are arrays (dense storage, any dtype).

  Returns ``(update, mu, nu, nu_max, scaled=False)``, the moments as stored:
  bfloat16 moments of float32 arithmetic take :func:`_in_place_narrow_step`,
  the rest :func:`_moment_step` and the storage casts below. ``index``: the
  elements' flat positions in the whole leaf when ``g`` is lazy Adam's
  gathered rows (:func:`element_index`), so that a 16-bit ``nu`` draws the
  rounding bits of those elements.
  """
  b1, b2, eps, eps_root = (math.hps[k] for k in ('b1', 'b2', 'eps', 'eps_root'))
  count, nesterov = math.count, math.nesterov
  cdt = _numerics.compute_dtype(g.dtype, m.dtype, v.dtype)
  if not (math.infinity_norm or math.amsgrad) and _in_place_narrow(cdt, m.dtype, v.dtype):
    _checks.check_decay_in_dtype('b1', b1, cdt)
    _checks.check_decay_in_dtype('b2', b2, cdt)
    k = _leaf_scalars(math.scalars, cdt, count, b1, b2, eps, eps_root, nesterov)
    u, m_new, v_new = _in_place_narrow_step(
        g, m, v, k, count, leaf_index, nesterov=nesterov, index=index)
    return u, m_new, v_new, None, False
  u, m_new, v_new, vm_new = math(g, m, v, vm)
  if not math.infinity_norm and _in_place(m_new.dtype, m.dtype, v.dtype):
    # Stored as computed: the in-place formulation's moments always fit,
    # and a clamp here would keep XLA from updating m and v in place.
    return u, m_new, v_new, vm_new, False
  # A 16-bit nu is stored with unbiased stochastic rounding: round-to-nearest
  # would return 0.999 * nu as nu (see adamfx._core.rounding).
  # A positive nu stored as 0 (float16 underflow) would make the next step
  # m_hat / eps, inf in float16: keep_positive stores the smallest instead.
  v_s = _numerics.keep_positive(
      _rounding.store_second_moment(v_new, v.dtype, count, leaf_index, index), v_new)
  vm_s = None if vm is None else _numerics.keep_positive(
      _numerics.saturate(vm_new, vm.dtype), vm_new)
  return u, _numerics.saturate(m_new, m.dtype), v_s, vm_s, False


def default_step(fmt, g, m, v, vm, leaf_index, math, decay=None):
  """A format's step without a fused one: decode, :class:`LeafMath`, encode.

  An element whose gradient is not finite keeps its stored history (its
  update is NaN, as for float32 Adam), so that one bad element does not
  poison a block's scale. ``decay``: lazy Adam's catch-up, a function of
  the decoded ``(mu, nu)`` applied before the step (see :func:`_row_step`).
  Returns ``(update, mu, nu, nu_max, False)``.
  """
  olds = [fmt.decode(x, s) for x, s in ((m, True), (v, False))]
  if decay is not None:
    olds = list(decay(*olds))
  if vm is not None:
    olds.append(fmt.decode(vm, False))
  u, *news = math(g, olds[0], olds[1], olds[2] if vm is not None else None)
  bad = ~jnp.isfinite(g)
  stored = []
  for old, new, like, signed in zip(olds, news, (m, v, vm), (True, False, False)):
    new = jnp.where(bad, old.astype(new.dtype), new)
    stored.append(fmt.encode(new, signed, count=math.count, leaf_index=leaf_index, like=like))
  if vm is None:
    stored.append(None)
  return (u, *stored, False)


def element_index(ids: jax.Array, rows: jax.Array) -> jax.Array:
  """uint32 ``[k, row_size]``: the flat position in the whole leaf of each
  element of the rows ``ids`` gathered as ``rows``."""
  row = int(np.prod(rows.shape[1:], dtype=np.int64))
  return (ids.astype(jnp.uint32)[:, None] * jnp.uint32(row)
          + jax.lax.iota(jnp.uint32, row)[None, :])


def _catch_up(ids: jax.Array, gap: jax.Array, hps: dict[str, Any], cdt: Any):
  """Lazy Adam's catch-up of gathered rows: ``(m, v) -> (m * b1**gap, v * b2**gap)``,
  in ``cdt``, each stored back in its dtype."""

  def decay(m, v):
    shape = (ids.shape[0],) + (1,) * (m.ndim - 1)
    d1 = jax.lax.pow(jnp.asarray(hps['b1'], cdt) * jnp.ones(shape, cdt), gap.reshape(shape))
    d2 = jax.lax.pow(jnp.asarray(hps['b2'], cdt) * jnp.ones(shape, cdt), gap.reshape(shape))
    return (m.astype(cdt) * d1).astype(m.dtype), (v.astype(cdt) * d2).astype(v.dtype)

  return decay


def _row_step(rows, fmt, g, m, v, vm, last, i, math, tail, invalid):
  """Lazy Adam's step of a row-sparse leaf ``g``: the leaf's step on its touched rows.

  ``rows`` is the row access of :mod:`adamfx._sparse.lazy` (``coalesce``,
  ``gather``, ``scatter``, ``rebuild``). Duplicate ids are summed; the
  touched rows of ``m``, ``v`` (and ``vm``) are gathered (through the
  format's ``gather_rows``), stepped by :func:`dense_step` (a 16-bit ``nu``
  rounded with the bits of those rows' elements, so that touching every row
  is the dense leaf's step) or, stored in a format, by :func:`default_step`
  (decode, :class:`LeafMath`, encode), and scattered back. With ``last``
  (``catch_up``: the step each row was last touched at), a row untouched
  since step ``s`` first decays as dense Adam's would have over the steps
  ``s+1 .. t-1``, where its gradient was 0: by ``b**(t-1-s)`` (stored moments
  in their dtype; a format's decoded ones before the step). The update's
  rows go through the one tail (the decay reads the touched params' rows).
  Returns ``(update, mu, nu, nu_max, last)``, the update a row-sparse leaf.
  """
  count = math.count
  ids, g_rows, valid = rows.coalesce(g)
  if fmt is None:
    take, put = rows.gather, rows.scatter
  else:
    take = lambda x, ids: fmt.gather_rows(x, ids, rows.gather)
    put = lambda x, ids, r: fmt.scatter_rows(x, ids, r, rows.scatter)
  m_r, v_r = take(m, ids), take(v, ids)
  vm_r = None if vm is None else take(vm, ids)
  decay = None
  if last is not None:
    # Once the int32 count saturates, count - 1 - last would be -1 (a
    # growth by 1 / b): no catch-up there, the step's own decay only.
    gap = jnp.maximum((count - 1) - rows.gather(last, ids), 0)
    last = rows.scatter(last, ids, jnp.broadcast_to(count, ids.shape))
    if fmt is None:
      cdt = _numerics.compute_dtype(g_rows.dtype, m.dtype, v.dtype)
      m_r, v_r = _catch_up(ids, gap, math.hps, cdt)(m_r, v_r)
    else:
      decay = lambda m_x, v_x: _catch_up(ids, gap, math.hps, m_x.dtype)(m_x, v_x)
  if fmt is None:
    narrow = jnp.issubdtype(v.dtype, jnp.floating) and jnp.finfo(v.dtype).bits < 32
    index = element_index(ids, v_r) if narrow else None
    u, m_n, v_n, vm_n, _ = dense_step(g_rows, m_r, v_r, vm_r, i, math, index=index)
  else:
    g_rows = rows.align(g_rows, m_r, lambda x: fmt.decode(x, True))
    u, m_n, v_n, vm_n, _ = default_step(fmt, g_rows, m_r, v_r, vm_r, i, math, decay=decay)
  u = jnp.where(valid.reshape((-1,) + (1,) * (u.ndim - 1)), u, 0).astype(g.dtype)
  u = nan_where(invalid, u)
  param = rows.gather(tail.params[i], ids) if decays(tail, i) else None
  u = apply_tail(u, i, tail, False, param)
  return (rows.rebuild(g, ids, u), put(m, ids, m_n), put(v, ids, v_n),
          None if vm is None else put(vm, ids, vm_n), last)


class Tail(NamedTuple):
  """The fused tail ``-lr * (u + wd * p)`` of one tree update, leaf by leaf.

  Applied to each update after its cast to the gradient's dtype, with the
  numbers of optax's chain (``add_decayed_weights``, then
  ``scale_by_learning_rate``, each cast back to the update's dtype): AdamW's
  decay where ``decay_on`` (the mask, as optax's: it sees the params), then
  the learning rate. Options that act on the final update (update clipping,
  cautious masking, param rounding) plug in here, in :func:`apply_tail`.
  """

  lr_static: Any = None  # -lr as a Python number (hashed), or None
  lr_size: Any = None  # else -lr as an array, or -schedule(count)
  lr_kind: Optional[str] = None  # 'number', 'array', 'schedule' or None: no lr
  decay_static: Any = None  # weight decay as a Python number, or None
  decay_size: Any = None  # else an array
  decay_on: Optional[tuple[bool, ...]] = None  # per leaf; None: no decay
  params: Optional[list[Any]] = None  # the params' leaves, for the decay
  invalid: Any = None  # a traced learning rate or decay out of range: NaN updates


def decays(tail: Optional[Tail], i: int) -> bool:
  """Whether ``tail`` decays leaf ``i``."""
  return tail is not None and tail.decay_on is not None and bool(tail.decay_on[i])


def apply_tail(
    u: jax.Array, i: int, tail: Optional[Tail], scaled: bool, param: Any = None
) -> jax.Array:
  """Leaf ``i``'s update through ``tail`` (see :class:`Tail`); ``scaled``: the
  format already applied the learning rate. ``param``: the params the decay
  reads, when not leaf ``i`` of ``tail.params`` (lazy Adam's gathered rows)."""
  if tail is None:
    return u
  u = nan_where(tail.invalid, u)
  with jax.numpy_dtype_promotion('standard'):
    if decays(tail, i):
      size = tail.decay_static if tail.decay_static is not None else tail.decay_size
      u = (u + size * (tail.params[i] if param is None else param)).astype(u.dtype)
    if tail.lr_kind is not None and not scaled:
      if tail.lr_static is not None:
        u = (tail.lr_static * u).astype(u.dtype)
      else:
        size = tail.lr_size.astype(u.dtype) if tail.lr_kind == 'schedule' else tail.lr_size
        u = (size * u).astype(u.dtype)
  return u


def _step_size(tail: Optional[Tail], i: int) -> Optional[float]:
  """The learning rate a format may fuse into leaf ``i``'s step, or None."""
  if tail is None or tail.lr_static is None:
    return None
  if decays(tail, i) or tail.invalid is not None:
    return None  # the decay (or the NaN guard) comes first
  return tail.lr_static


def tree_update(
    updates: optax.Updates,
    state: AdamState,
    hps: dict[str, Any],
    *,
    fmt: Any = None,
    nesterov: bool = False,
    amsgrad: bool = False,
    infinity_norm: bool = False,
    tail: Optional[Tail] = None,
    who: Optional[str] = None,
    state_type: Optional[type] = None,
    rows: Any = None,
) -> tuple[optax.Updates, AdamState]:
  """The one tree driver of the Adam family.

  Owns what every member shares: the state check, the format's coercion of
  restored moments (``fmt.prepare``), the tree check, None leaves, the
  count, the NaN guard for invalid traced hyperparameters, the cast of each
  update to its gradient's dtype and the fused tail (:class:`Tail`). Per
  leaf it runs the storage's step: :func:`dense_step` (``fmt`` None: arrays
  of any floating dtype), ``fmt.step(g, m, v, vm, leaf_index, math)`` or
  :func:`default_step`, with the core's :class:`LeafMath` (the torch/Keras
  builders' own arithmetic is such a step, their state ``state_type``).

  ``rows``: lazy Adam's row access (:mod:`adamfx._sparse.lazy`); a leaf it calls
  row-sparse takes :func:`_row_step`, the same step on the touched rows.
  The state may then hold ``last_step`` (``catch_up``), and ``state_type``
  takes it.
  """
  b1, b2, eps, eps_root = (hps[k] for k in ('b1', 'b2', 'eps', 'eps_root'))
  state = _checks.adam_like_state(
      state, who or ('scale_by_adamax' if infinity_norm else 'scale_by_adam'))
  if fmt is not None:
    prepare = getattr(fmt, 'prepare', lambda tree, signed, what: tree)
    state = state._replace(
        mu=prepare(state.mu, True, 'mu'), nu=prepare(state.nu, False, 'nu'),
        nu_max=prepare(state.nu_max, False, 'nu_max') if amsgrad else None,
    )
  updates = jax.tree.map(jnp.asarray, updates)  # Python-number leaves too
  is_leaf, holed = _is_none, updates
  if rows is not None:
    is_leaf = lambda x: x is None or rows.is_sparse(x)
    holed = jax.tree.map(lambda x: None if rows.is_sparse(x) else x, updates, is_leaf=is_leaf)
  # (lazy Adam checks its tree of row-sparse leaves against the state itself)
  if fmt is None:
    if rows is None:
      _checks.check_matching_trees(updates, state.mu)
    step = dense_step
  else:
    is_stored = lambda x: x is None or fmt.is_stored(x)
    if rows is None:
      _checks.check_matching_trees(
          updates, jax.tree.map(fmt.param_like, state.mu, is_leaf=is_stored))
    step = getattr(fmt, 'step', None) or functools.partial(default_step, fmt)
  _checks.check_hyperparam_dtype('b1', b1)
  _checks.check_hyperparam_dtype('b2', b2)
  count = optax.safe_increment(state.count)
  invalid = _checks.invalid_hyperparams(b1, b2, eps, eps_root)
  g_leaves, treedef = jax.tree.flatten(updates, is_leaf=is_leaf)
  m_leaves = treedef.flatten_up_to(state.mu)
  v_leaves = treedef.flatten_up_to(state.nu)
  vm_leaves = treedef.flatten_up_to(state.nu_max) if amsgrad else [None] * len(g_leaves)
  last = getattr(state, 'last_step', None) if rows is not None else None
  l_leaves = treedef.flatten_up_to(last) if last is not None else [None] * len(g_leaves)
  # Each leaf's index (stochastic rounding, the tail's per-leaf lists): its
  # place among the params, optax.MaskedNode places (other multi_transform
  # partitions, or the eager path's other leaves) counted.
  positions = _rounding.leaf_positions(holed)
  math = LeafMath(count, hps, nesterov, amsgrad, infinity_norm, None, {})
  outs = []
  for i, g, m, v, vm, lt in zip(positions, g_leaves, m_leaves, v_leaves, vm_leaves, l_leaves):
    if g is None:
      outs.append((None,) * 4 + (lt,))
      continue
    if rows is not None and rows.is_sparse(g):
      outs.append(_row_step(rows, fmt, g, m, v, vm, lt, i, math, tail, invalid))
      continue
    u, m_s, v_s, vm_s, scaled = step(g, m, v, vm, i, math._replace(step_size=_step_size(tail, i)))
    if fmt is not None and fmt.is_stored(m):
      u, (m_s, v_s, vm_s) = _sharding.follow(g, (m, v, vm), u, (m_s, v_s, vm_s))
    u = apply_tail(nan_where(invalid, u).astype(g.dtype), i, tail, scaled)
    outs.append((u, m_s, v_s, vm_s, None if lt is None else jnp.full_like(lt, count)))
  u, mu, nu, nu_max, last_step = (
      (jax.tree.unflatten(treedef, list(c)) for c in zip(*outs)) if outs else
      (jax.tree.unflatten(treedef, []),) * 5)
  extra = {} if rows is None else {'last_step': last_step if last is not None else None}
  new_state = (state_type or (AdaMaxState if infinity_norm else AdamState))(
      count=count, mu=mu, nu=nu, nu_max=nu_max if amsgrad else None, **extra)
  return u, new_state


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
  """:func:`tree_update` of dense moments, with the hyperparameters as arguments."""
  return tree_update(
      updates, state, {'b1': b1, 'b2': b2, 'eps': eps, 'eps_root': eps_root},
      nesterov=nesterov, amsgrad=amsgrad, infinity_norm=infinity_norm,
  )
