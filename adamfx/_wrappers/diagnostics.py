r"""Diagnostics: the quantities Adam's analysis reasons with, as loggable scalars.

Kingma & Ba argue about Adam through a handful of numbers: the bias-correction
factors :math:`1 - \beta^t`, the signal-to-noise ratio
:math:`|\hat m_t| / \sqrt{\hat v_t}` (section 2.1: it shrinks near an optimum,
so the steps shrink with it), the effective step :math:`|\Delta_t| / \alpha`
and its bounds (section 2.1), and how often :math:`\varepsilon` rather than
:math:`\sqrt{\hat v_t}` sets the step. :func:`adam_diagnostics` computes them
from an Adam state; everything is pure ``jax.numpy``, so it runs inside a
jitted train step and returns scalars ready to log.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamfx._core import checks as _checks
from adamfx._core import eager as _eager
from adamfx._core import stable as _stable
from adamfx._core.driver import AdaMaxState
from adamfx._core.driver import AdamState
from adamfx._porting.conventions import FrameworkAdamState

_STATE_TYPES = (AdamState, optax.ScaleByAdamState, optax.ScaleByAmsgradState)


def _is_adam_state(x: Any) -> bool:
  # Any NamedTuple with count, mu and nu (adamfx's, optax's, or a later
  # member's Adam-like state).
  return isinstance(x, _STATE_TYPES) or _checks.is_adam_like(x)


def _find_adam_state(state: Any) -> Any:
  """The first Adam state inside ``state`` (a chain, inject_hyperparams ...)."""
  found = [s for s in jax.tree.leaves(state, is_leaf=_is_adam_state) if _is_adam_state(s)]
  if not found:
    raise ValueError(
        'adam_diagnostics needs a state holding an adamfx.AdamState or '
        f'optax.ScaleByAdamState (e.g. from adamfx.adam(...).init), got {type(state).__name__}.'
    )
  if isinstance(found[0], AdaMaxState):
    raise ValueError(
        'adam_diagnostics got an AdaMax state (adamfx.adamax / scale_by_adamax):'
        ' its nu is an exponentially weighted infinity norm, not a second'
        ' moment, so the SNR and the bounds computed here would be wrong.'
        ' AdaMax is not supported.'
    )
  return found[0]


_dequantized = _stable.dequantized


def _flat(tree: Any) -> jax.Array:
  """All leaves of ``tree`` as one float32-or-wider vector."""
  leaves = [x for x in jax.tree.leaves(tree) if x is not None]
  if not leaves:
    return jnp.zeros([0], jnp.float32)
  dtype = jnp.float32
  if any(jnp.finfo(jnp.real(x).dtype).bits > 32 for x in leaves):
    dtype = jnp.float64
  return jnp.concatenate([jnp.abs(x).astype(dtype).ravel() for x in leaves])


def adam_step_bound(t: Any, b1: float = 0.9, b2: float = 0.999) -> Any:
  r"""The exact largest :math:`|\Delta_t| / \alpha` Adam can take at step ``t``.

  For any gradient history (with ``eps = 0``), Cauchy-Schwarz on
  :math:`m_t = (1-\beta_1)\sum_i \beta_1^{t-i} g_i` against
  :math:`v_t = (1-\beta_2)\sum_i \beta_2^{t-i} g_i^2` gives

  .. math::

    \frac{|\hat m_t|}{\sqrt{\hat v_t}} \le
      \frac{1-\beta_1}{\sqrt{1-\beta_2}}
      \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
      \sqrt{\sum_{k=0}^{t-1} \left(\frac{\beta_1^2}{\beta_2}\right)^k},

  with equality for the geometrically growing gradient
  :math:`g_i \propto (\beta_2/\beta_1)^i`. At the defaults it rises from 1 at
  ``t = 1`` towards :math:`(1-\beta_1)/\sqrt{(1-\beta_2)(1-\beta_1^2/\beta_2)}
  \approx 7.27` (about 7.1 at ``t = 3000``), above the paper's approximate
  :math:`(1-\beta_1)/\sqrt{1-\beta_2} \approx 3.16`, which holds for a single
  spike. If :math:`\beta_1^2 \ge \beta_2` the bound grows without limit.

  Computed in log space (``expm1``/``log1p``, constants in float64), so it
  is exact at ``t = 1``, accurate for long horizons with ``b2`` close to 1,
  and finite wherever the bound is (it is ``inf`` only past the dtype's
  range, when :math:`\beta_1^2 > \beta_2`).

  Args:
    t: the step count, >= 1 (a Python int or an integer array).
    b1: decay of the first moment, in [0, 1).
    b2: decay of the second moment, in [0, 1); 0 only with ``b1 = 0``.

  Returns:
    The bound, a float (or, for an array ``t``, an array in float64 under
    ``jax_enable_x64``, else float32).

  Raises:
    ValueError: if ``t < 1`` (checked where ``t`` is concrete), ``b1`` or
      ``b2`` is outside [0, 1), or ``b2 = 0`` with ``b1 > 0`` (unbounded).
    TypeError: if ``t`` is not an integer.

  Examples:
    >>> import adamfx
    >>> round(adamfx.adam_step_bound(1), 6)
    1.0
    >>> round(adamfx.adam_step_bound(10**6), 2)
    7.27
  """
  b1, b2 = _bound_decays(b1, b2)
  if isinstance(t, bool):
    raise TypeError(f'`t` must be an int >= 1 or an integer array, got {t!r}.')
  if isinstance(t, (int, np.integer)):
    if t < 1:
      raise ValueError(f'`t` must be >= 1 (the bound is for step t of Adam), got {t!r}.')
    if t == 1:
      return 1.0
    return float(np.exp(_log_bound(np, np.float64(t), b1, b2)))
  t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise TypeError(f'`t` must be an int >= 1 or an integer array, got dtype {t.dtype}.')
  if not isinstance(t, jax.core.Tracer) and t.size and int(jnp.min(t)) < 1:
    raise ValueError(f'`t` must be >= 1 everywhere, got a minimum of {int(jnp.min(t))}.')
  dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  tf = t.astype(dtype)
  value = jnp.exp(_log_bound(jnp, tf, b1, b2))
  return jnp.where(t == 1, jnp.asarray(1, dtype), value)


def _check_diagnostics_args(eps: Any, quantiles: Any, learning_rate: Any) -> None:
  """Named errors for :func:`adam_diagnostics`' concrete arguments."""
  x = _checks._concrete_number(eps)
  if x is None or not 0 <= x < math.inf:
    raise ValueError(f'`eps` must be a number >= 0, got {eps!r}.')
  for q in quantiles:
    x = _checks._concrete_number(q)
    if x is None or not 0 <= x <= 1:
      raise ValueError(
          f'each of `quantiles` must be a number in [0, 1], got {q!r} (in {tuple(quantiles)!r}).')
  if learning_rate is None:
    return
  x = _checks._concrete_number(learning_rate)
  if x is not None and not 0 < x < math.inf:  # a traced rate passes through
    raise ValueError(
        f'`learning_rate` must be > 0 and finite, got {learning_rate!r}: the step'
        ' is reported as |update| / learning_rate.')


def _bound_decays(b1: Any, b2: Any) -> tuple[float, float]:
  out = []
  for name, b in (('b1', b1), ('b2', b2)):
    x = _checks._concrete_number(b)
    if x is None:
      raise TypeError(f'`{name}` must be a concrete real number, got {b!r}.')
    if not 0.0 <= x < 1.0:
      raise ValueError(f'`{name}` must be in [0, 1), got {b!r}.')
    out.append(x)
  b1, b2 = out
  if b2 == 0 and b1 > 0:
    raise ValueError(
        f'`b2` = 0 with `b1` = {b1!r} > 0: v_hat is the last squared gradient'
        ' alone, so |m_hat| / sqrt(v_hat) is unbounded from step 2 on; the bound'
        ' is undefined.'
    )
  return b1, b2


def _log_bound(xp: Any, t: Any, b1: float, b2: float) -> Any:
  """The log of :func:`adam_step_bound`, in log space (no overflow, no 0/0).

  Constants are computed in Python's float64; only the ``t``-dependent terms
  run in ``t``'s dtype, through ``expm1``/``log1p`` so that ``1 - b**t`` keeps
  its relative precision when ``b**t`` is close to 1.
  """
  def log_one_minus_pow(b):  # log(1 - b**t)
    if b == 0:
      return xp.zeros_like(t)
    return xp.log(-xp.expm1(t * math.log(b)))

  out = math.log1p(-b1) - 0.5 * math.log1p(-b2)
  out = out + 0.5 * log_one_minus_pow(b2) - log_one_minus_pow(b1)
  # log of sum_{k<t} r**k, r = b1**2 / b2
  if b1 == 0:
    log_series = xp.zeros_like(t)
  else:
    log_r = 2 * math.log(b1) - math.log(b2)
    if log_r == 0:
      log_series = xp.log(t)
    elif log_r < 0:
      log_series = xp.log(-xp.expm1(t * log_r)) - math.log(-math.expm1(log_r))
    else:  # r > 1: r**t (1 - r**-t) / (r - 1), the bound grows without limit
      log_series = t * log_r + xp.log(-xp.expm1(-t * log_r)) - math.log(math.expm1(log_r))
  return out + 0.5 * log_series


def adam_diagnostics(
    state: Any,
    updates: Optional[optax.Updates] = None,
    learning_rate: Optional[Any] = None,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    quantiles: Sequence[float] = (0.5, 0.9),
    grads: Optional[optax.Updates] = None,
) -> dict[str, jax.Array]:
  r"""Scalars describing an Adam state (and step), for logging from a train step.

  With :math:`t` the state's ``count`` and every statistic taken over all
  coordinates of all leaves:

  .. math::

    \begin{align*}
      \hat m_t &= m_t / (1 - \beta_1^t), \qquad
      \hat v_t = v_t / (1 - \beta_2^t) \\
      \mathrm{SNR} &= |\hat m_t| / \sqrt{\hat v_t} \quad (0 \text{ where }
        \hat v_t = 0) \\
      \mathrm{step} &= |\Delta_t| / \alpha
    \end{align*}

  Returned keys (each a scalar ``jax.Array``):

  * ``count``: :math:`t`.
  * ``bias_correction_mu``, ``bias_correction_nu``: :math:`1 - \beta_1^t` and
    :math:`1 - \beta_2^t`, the divisors of the bias correction (0 at
    :math:`t = 0`, tending to 1).
  * ``snr_mean``, ``snr_max``, ``snr_q50``, ``snr_q90`` (one per entry of
    ``quantiles``): the signal-to-noise ratio. Near an optimum the gradient's
    mean vanishes against its spread, the SNR shrinks, and so do Adam's steps.
  * ``eps_dominated_fraction``: the fraction of coordinates with
    :math:`\sqrt{\hat v_t} \le \varepsilon`, where ``eps`` rather than the
    gradient's scale sets the step size.
  * ``step_bound_approx``: the paper's approximate bound
    :math:`\max(1, (1-\beta_1)/\sqrt{1-\beta_2})` on the step;
    ``step_bound_exact``: the exact one, :func:`adam_step_bound` at :math:`t`.
  * Only with ``updates`` and ``learning_rate``: ``step_max``, ``step_mean``
    (:math:`|\Delta_t| / \alpha`) and ``step_over_approx_bound_fraction``, the
    fraction of coordinates whose step exceeds the approximate bound (by more
    than a relative 1e-5, float32 rounding).

  * Only with ``updates`` and ``learning_rate``: ``update_rms``, the RMS of
    :math:`\Delta_t / \alpha` over all coordinates (about 1 for Adam; a
    jump announces a spike).
  * Only with ``grads`` (the gradient of the same step): ``stable_rms_max``,
    the largest per-tensor :math:`\sqrt{\mathrm{mean}(g_t^2 / \max(\hat
    v_t, \varepsilon^2))}` (StableAdamW's RMS: above 1, the second moment
    underestimates the gradient, the precursor of a spike);
    ``clip_factor_min``, :math:`1 / \max(1, \cdot)` of it, the smallest
    factor ``update_clipping=True`` puts on a tensor's learning rate; and
    ``cautious_fraction``, the fraction of coordinates with :math:`m_t g_t
    > 0`, those ``cautious=True`` keeps.

  With AMSGrad (``state.nu_max`` present) :math:`\hat v_t` is the running
  maximum ``nu_max``, the denominator the update actually used: optax's and
  adamfx's ``nu_max`` is already bias-corrected; that of
  :func:`adamfx.torch_adam` and :func:`adamfx.keras_adam` (the max of the raw
  ``nu``, as in torch and Keras) is divided by :math:`1 - \beta_2^t` here.

  For the framework-exact builders' states, ``grads`` is the gradient their
  moments saw (:func:`adamfx.torch_adam`'s L2 term ``weight_decay * p``
  added, ``maximize``'s sign flipped), and ``eps`` the epsilon on
  :math:`\sqrt{\hat v_t}`: torch's ``eps``; for Keras, whose ``epsilon`` is
  added to the raw :math:`\sqrt{v_t}`, ``epsilon / sqrt(1 - beta_2**t)``
  reproduces the RMS its ``update_clipping=True`` computes (``epsilon``
  itself gives the same number unless some :math:`\hat v_t` is below
  ``epsilon**2 / (1 - beta_2**t)``).

  Args:
    state: an :class:`adamfx.AdamState` or ``optax.ScaleByAdamState``, or any
      optimizer state that contains one (e.g. that of ``adamfx.adam(...)`` or
      of an ``optax.chain``); the first one found is used. 8-bit and 4-bit
      moments are dequantized first. AdaMax states are
      refused: their ``nu`` is not a second moment.
    updates: the updates returned by the same step (optional).
    learning_rate: :math:`\alpha` of that step (a number or scalar array;
      needed with ``updates``). Must be > 0.
    b1: the ``b1`` the state was built with; default 0.9.
    b2: the ``b2`` the state was built with; default 0.999.
    eps: the ``eps`` the state was built with; default 1e-8.
    quantiles: SNR quantiles to report, in [0, 1]. Each needs a sort of all
      coordinates; pass ``()`` for large models.
    grads: the gradient of the same step (optional), for the update-clipping
      and cautious statistics.

  Returns:
    A dict of scalar arrays (float32, or float64 for float64 states; ``count``
    int32).

  Raises:
    ValueError: if ``state`` holds no Adam state or an AdaMax one,
      ``updates`` is given without ``learning_rate``, ``learning_rate`` is
      not > 0, ``b1`` or ``b2`` is outside [0, 1), ``eps`` < 0, or a
      quantile is outside [0, 1] (each error names the argument and value).
    TypeError: if ``b1`` or ``b2`` is not a concrete number.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adamfx
    >>> tx = adamfx.adam(0.1)
    >>> params = jnp.array([1.0, -2.0, 0.0])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state)  # gradient = params
    >>> d = adamfx.adam_diagnostics(state, updates, 0.1)
    >>> {k: round(float(d[k]), 4) for k in ('snr_max', 'eps_dominated_fraction')}
    {'snr_max': 1.0, 'eps_dominated_fraction': 0.3333}
    >>> round(float(d['step_max']), 4), round(float(d['step_bound_exact']), 4)
    (1.0, 1.0)

  References:
    Kingma & Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, ICLR 2015, sections 2.1 and 3.
  """
  adam_state = _find_adam_state(state)
  if updates is not None and learning_rate is None:
    raise ValueError('`learning_rate` is needed with `updates`, to compute |update| / lr.')
  b1, b2 = _bound_decays(b1, b2)  # named errors, not a ZeroDivisionError at b2 = 1
  _check_diagnostics_args(eps, quantiles, learning_rate if updates is not None else None)
  # Eagerly (a notebook logging every few steps), one compiled call rather than
  # dozens of separate array operations; the Python numbers are hashed into the
  # compiled code, as the traced code folds them.
  static, dynamic = _eager.split_hyperparams((learning_rate, eps))
  args = (adam_state, updates, grads, dynamic)
  statics = dict(b1=b1, b2=b2, quantiles=tuple(quantiles), static=static)
  if _eager.eager(*args) and _eager.hashable(*statics.values()):
    return _compiled_diagnostics(*args, **statics)
  return _diagnostics(*args, **statics)


def _diagnostics(adam_state, updates, grads, dynamic, *, b1, b2, quantiles, static):
  learning_rate, eps = (s if d is None else d for s, d in zip(static, dynamic))
  mu = _flat(_dequantized(adam_state.mu))
  nu_max = getattr(adam_state, 'nu_max', None)
  nu = _flat(_dequantized(adam_state.nu if nu_max is None else nu_max))
  # torch's max_exp_avg_sq and Keras's velocity_hats (FrameworkAdamState) are
  # the max of the *raw* nu, corrected at use; optax's and adamfx's nu_max is
  # already bias-corrected.
  raw_max = nu_max is not None and isinstance(adam_state, FrameworkAdamState)
  dtype = mu.dtype
  count = jnp.asarray(adam_state.count)
  power = lambda base: jax.lax.pow(jnp.asarray(base, dtype), count)
  bc1, bc2 = 1 - power(b1), 1 - power(b2)
  m_hat = mu / jnp.where(bc1 > 0, bc1, 1)
  v_hat = nu if nu_max is not None and not raw_max else nu / jnp.where(bc2 > 0, bc2, 1)
  root = jnp.sqrt(v_hat)
  snr = m_hat / jnp.where(root > 0, root, 1)
  n = max(int(mu.size), 1)
  empty = mu.size == 0
  out = {
      'count': count,
      'bias_correction_mu': bc1,
      'bias_correction_nu': bc2,
      'snr_mean': jnp.sum(snr) / n,
      'snr_max': jnp.zeros([], dtype) if empty else jnp.max(snr),
  }
  for q in quantiles:
    key = f'snr_q{round(100 * q):d}'
    out[key] = jnp.zeros([], dtype) if empty else jnp.quantile(snr, jnp.asarray(q, dtype))
  out['eps_dominated_fraction'] = jnp.sum(root <= eps).astype(dtype) / n
  approx = max(1.0, (1 - b1) / math.sqrt(1 - b2))
  out['step_bound_approx'] = jnp.asarray(approx, dtype)
  out['step_bound_exact'] = adam_step_bound(jnp.maximum(count, 1), b1, b2).astype(dtype)
  if updates is not None:
    lr = jnp.asarray(learning_rate).astype(dtype)
    # A lazy Adam update holds RowSparse leaves: their dense arrays (the
    # codes of their ids are no numbers to take a step size of; issue 18).
    updates = jax.tree.map(
        lambda u: u.todense() if type(u).__name__ == 'RowSparse' else u, updates,
        is_leaf=lambda u: type(u).__name__ == 'RowSparse')
    step = _flat(updates).astype(dtype) / lr
    out['step_max'] = jnp.zeros([], dtype) if empty else jnp.max(step)
    out['step_mean'] = jnp.sum(step) / n
    # 1e-5 relative slack: a first step of exactly lr reads 1 + rounding.
    over = step > approx * (1 + 1e-5)
    out['step_over_approx_bound_fraction'] = jnp.sum(over).astype(dtype) / n
    out['update_rms'] = jnp.sqrt(jnp.sum(step * step) / n)
  if grads is not None:
    out.update(_stable.diagnostics(grads, adam_state, b2, eps))
  return out


_compiled_diagnostics = jax.jit(_diagnostics, static_argnames=('b1', 'b2', 'quantiles', 'static'))
