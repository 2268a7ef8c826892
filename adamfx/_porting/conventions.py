r"""Framework-exact Adam: torch.optim.Adam/AdamW and Keras 3's Adam/AdamW.

Frameworks write Adam in ways that agree on paper and differ in numbers
(optax issues 571, 1389, 417, 532):

========================  ==============================  ==============================
                          torch                           Keras 3
========================  ==============================  ==============================
epsilon                   ``sqrt(v) / sqrt(1 - b2**t) +   ``sqrt(v) + epsilon``, scaled
                          eps`` (after bias correction)   into the step size (before it)
default epsilon           ``1e-8``                        ``1e-7``
AMSGrad                   max of the raw ``v``, then      max of the raw ``v``
                          bias-corrected
``Adam(weight_decay)``    L2: ``g + wd * p``              (none)
``AdamW(weight_decay)``   ``p *= 1 - lr * wd`` first      ``p -= lr * wd * p`` first
========================  ==============================  ==============================

Each builder here takes its framework's argument names and defaults and
computes the step in that framework's order of operations, so a run ported
from torch (float64: ~1e-15 relative; float32: a few ulps, torch's bias
corrections being doubles) or Keras (float32: one ulp) follows the same
trajectory. The state, :class:`FrameworkAdamState`, is a
NamedTuple of arrays shaped like the params, so it jits, shards (each moment
follows its param's sharding) and checkpoints like the rest of adamfx; torch
optimiser state converts to and from it with :func:`adamfx.from_torch_state`
and :func:`adamfx.to_torch_state`.

adamfx's hardening is kept where it changes no finite number: concrete
hyperparameters are checked when the transformation is built; arithmetic runs
in at least float32 (moments of bfloat16/float16 params are stored in
float32, where torch and Keras would store them in the params' dtype); and a
gradient above ``2**63`` (float32) is clipped to it before squaring, so a
single overflowing ``g**2`` no longer sets ``v`` to ``inf``, which in torch
and Keras freezes the parameter for good.

Each builder also takes issue 23's ``update_clipping=`` (StableAdamW's
per-tensor ``lr / max(1, RMS)``, on the step and the decoupled decay) and
``cautious=`` (C-AdamW's mask on the first moment, the decay unmasked),
defined on the framework's own step: the RMS reads the second moment and
epsilon as the framework's denominator uses them, the mask the gradient the
moments see (see each builder and the stable steps guide).
"""

from __future__ import annotations

import math
from typing import Any
from typing import NamedTuple
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from adamfx._core import checks as _checks
from adamfx._core import driver as _update
from adamfx._core import eager as _eager
from adamfx._core import numerics as _numerics
from adamfx._core import param_rounding as _param_rounding
from adamfx._core import rounding as _rounding
from adamfx._core import stable as _stable

__all__ = ['FrameworkAdamState', 'keras_adam', 'keras_adamw', 'torch_adam', 'torch_adamw']


class FrameworkAdamState(NamedTuple):
  """State of :func:`torch_adam`, :func:`torch_adamw`, :func:`keras_adam`, :func:`keras_adamw`.

  Attributes:
    count: int32 scalar, the number of steps taken (torch's ``step``, Keras's
      ``iterations``); saturates at the int32 maximum.
    mu: first moment (torch ``exp_avg``, Keras ``momentums``), shaped like
      the params, in their dtype (at least float32).
    nu: raw second moment, not bias-corrected (torch ``exp_avg_sq``, Keras
      ``velocities``).
    nu_max: with ``amsgrad``, the running maximum of the raw ``nu`` (torch
      ``max_exp_avg_sq``, Keras ``velocity_hats``); else ``None``.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  nu_max: Optional[optax.Updates] = None


_is_none = _numerics.is_none


class _Config(NamedTuple):
  convention: str  # 'torch' or 'keras'
  learning_rate: Any
  b1: Any
  b2: Any
  eps: Any
  l2: Any  # weight decay added to the gradient (torch Adam)
  decoupled: Any  # weight decay of the params, scaled by lr (AdamW)
  amsgrad: bool
  maximize: bool
  stable: _stable.Options = _stable.NONE  # update clipping, cautious


def _as(value: Any, dtype: Any) -> jax.Array:
  return jnp.asarray(value).astype(dtype)


def _is_zero(value: Any) -> bool:
  return not callable(value) and _checks._concrete_number(value) == 0.0


def _check_flag(name: str, value: Any) -> bool:
  if not isinstance(value, bool):
    raise TypeError(f'`{name}` must be True or False, got {value!r}.')
  return value


def _check_pair(name: str, value: Any) -> tuple[Any, Any]:
  try:
    b1, b2 = value
  except (TypeError, ValueError):
    raise TypeError(f'`{name}` must be a pair (beta1, beta2), got {value!r}.') from None
  return b1, b2


def _init(params: optax.Params, amsgrad: bool) -> FrameworkAdamState:
  _checks.check_param_leaves(params)
  params = jax.tree.map(lambda p: p if hasattr(p, 'dtype') else jnp.asarray(p), params)
  for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
    if jnp.issubdtype(p.dtype, jnp.complexfloating):
      raise TypeError(
          f'params leaf {_checks._leaf_name(path)} is complex ({jnp.dtype(p.dtype).name});'
          ' the framework-exact builders take real params only (torch treats the real'
          ' and imaginary parts as two real params: pass them as such), or use'
          ' adamfx.adam, which takes complex leaves.'
      )
  zeros = lambda: jax.tree.map(
      lambda p: _numerics.zeros_like(p, _numerics.compute_dtype(p.dtype)), params
  )
  return FrameworkAdamState(
      count=jnp.zeros([], jnp.int32),
      mu=zeros(),
      nu=zeros(),
      nu_max=zeros() if amsgrad else None,
  )


def _host(fn, *values) -> Any:
  """``fn(*values)`` in Python (double) arithmetic when all are concrete
  numbers, as torch and Keras compute ``1 - beta`` and ``1 - lr * wd``;
  ``None`` for traced values (computed in the arithmetic dtype instead)."""
  xs = [_checks._concrete_number(v) for v in values]
  return None if any(x is None for x in xs) else fn(*xs)


def _bias_correction(value: Any, b: jax.Array, t: jax.Array) -> jax.Array:
  """torch's ``1 - beta**step``, which torch computes in Python doubles.

  In float64 (and for traced betas) the same operations. In float32, ``1 -
  float32(beta)**t`` would be off by up to 1e-5 relative (float32(0.999) is
  0.999 + 1.3e-8, and the subtraction cancels): ``-expm1(t * log(beta))``,
  with the log taken in double, is within a few float32 ulps of torch's
  double value instead.
  """
  x = _checks._concrete_number(value)
  if x is None or jnp.finfo(b.dtype).bits >= 64:
    return jnp.ones((), b.dtype) - b**t
  if x == 0.0:
    return jnp.where(t > 0, jnp.ones((), b.dtype), jnp.zeros((), b.dtype))
  return -jnp.expm1(t * jnp.asarray(math.log(x), b.dtype))


def _leaf_step(cfg: _Config, g, p, m, v, vm, t, lr, scalars):
  """One leaf of one step; returns ``(update, m, v, vm)``. ``t`` is 1-based.

  With decoupled decay the new param is computed in the framework's order
  and the update is ``new - p``: exact (Sterbenz) wherever the step is less
  than half of ``|p|``, so ``p + update`` is the framework's number.
  """
  cdt = m.dtype
  b1, b2, eps, one_minus_b1, one_minus_b2, decay_factor, bc1, bc2 = scalars
  g = g.astype(cdt)
  if cfg.maximize:
    g = -g
  pc = None if p is None else p.astype(cdt)
  if cfg.l2 is not None:
    g = g + _as(cfg.l2, cdt) * pc
  # No freeze on overflow: a |g| whose square would overflow is clipped to
  # 2**63 (float32), so v stays finite. Every finite g**2 is unchanged.
  limit = _numerics.square_safe_limit(cdt)
  g = jnp.clip(g, -limit, limit)
  one = jnp.ones((), cdt)
  opts = cfg.stable
  if cfg.convention == 'torch':
    m = m + one_minus_b1 * (g - m)  # exp_avg.lerp_(grad, 1 - beta1)
    v = v * b2 + (one_minus_b2 * g) * g  # exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2)
    if vm is not None:
      vm = jnp.maximum(vm, v)
    v_use = v if vm is None else vm
    if opts.update_clipping:  # optimi's StableAdamW: on the debiased v, floor eps**2
      lr, decay_factor = _clipped(cfg, g, v_use / bc2, eps * eps, lr, decay_factor)
    bc2_sqrt = jnp.sqrt(bc2)
    step_size = lr / bc1
    denom = jnp.sqrt(v_use) / bc2_sqrt + eps
    m_dir = _cautious(m, g) if opts.cautious else m
    update = (-step_size * m_dir) / denom  # param.addcdiv_(exp_avg, denom, -step_size)
    if cfg.decoupled is not None:  # param.mul_(1 - lr * weight_decay) first
      update = (pc * decay_factor + update) - pc
  else:
    m = m + (g - m) * one_minus_b1
    v = v + (g * g - v) * one_minus_b2
    if vm is not None:
      vm = jnp.maximum(vm, v)
    v_use = v if vm is None else vm
    bc2_keras = one - b2**t
    if opts.update_clipping:
      # Keras' denominator sqrt(v) + epsilon is sqrt(v_hat) + epsilon /
      # sqrt(1 - b2**t): the RMS floors v_hat = v / (1 - b2**t) at the square
      # of that epsilon, i.e. g**2 (1 - b2**t) / max(v, epsilon**2).
      lr, _ = _clipped(cfg, g, v_use / bc2_keras, eps * eps / bc2_keras, lr, None)
    alpha = lr * jnp.sqrt(bc2_keras) / (one - b1**t)
    m_dir = _cautious(m, g) if opts.cautious else m
    delta = (m_dir * alpha) / (jnp.sqrt(v_use) + eps)
    if cfg.decoupled is not None:  # variable - variable * wd * lr first
      update = ((pc - pc * _as(cfg.decoupled, cdt) * lr) - delta) - pc
    else:
      update = -delta
  return update, m, v, vm


def _clipped(cfg, g, v_hat, floor, lr, decay_factor):
  r"""Update clipping's rate: ``(lr / max(1, RMS), 1 - that * wd)``.

  :math:`\mathrm{RMS} = \sqrt{\mathrm{mean}(g^2 / \max(\hat v, \mathrm{floor}))}`
  over the leaf. Where the RMS is at most 1 the rate and torch's decay
  factor are the unclipped numbers, bit for bit.
  """
  cdt = g.dtype
  rms = jnp.sqrt(jnp.sum(g * g / jnp.maximum(v_hat, floor)) / max(g.size, 1))
  clipped = lr / jnp.maximum(jnp.ones((), cdt), rms)
  if decay_factor is not None:
    decay_factor = jnp.where(
        rms > 1, jnp.ones((), cdt) - clipped * _as(cfg.decoupled, cdt), decay_factor)
  return clipped, decay_factor


def _cautious(m, g):
  """C-AdamW's reference code: ``m * mask / max(mean(mask), 1e-3)``,
  ``mask = 1[m * g > 0]`` (the direction has the sign of ``m``)."""
  cdt = m.dtype
  mask = (m * g > 0).astype(cdt)
  mean = jnp.sum(mask) / max(mask.size, 1)
  return m * (mask / jnp.maximum(mean, jnp.asarray(_stable.CAUTIOUS_FLOOR, cdt)))


class _Rules(NamedTuple):
  """A framework's arithmetic as a step of the core's tree driver
  (:func:`adamfx._core.driver.tree_update`): moments are plain arrays, the step
  is :func:`_leaf_step` with this update's scalars, cached per dtype."""

  cfg: _Config
  lr_value: Any
  p_leaves: Optional[dict[int, Any]]  # by leaf index (see tree_update)
  cache: dict[Any, Any]

  def is_stored(self, x: Any) -> bool:
    del x
    return False

  def param_like(self, x: Any) -> Any:
    return x

  def step(self, g, m, v, vm, leaf_index, math):
    scalars, t, lr = self.scalars_for(m.dtype, math.count)
    p = None if self.p_leaves is None else self.p_leaves[leaf_index]
    return (*_leaf_step(self.cfg, g, p, m, v, vm, t, lr, scalars), False)

  def scalars_for(self, cdt, count):
    cfg, cache, lr_value = self.cfg, self.cache, self.lr_value
    if cdt not in cache:
      names = ('beta1', 'beta2') if cfg.convention == 'torch' else ('beta_1', 'beta_2')
      for name, value in zip(names, (cfg.b1, cfg.b2)):
        _checks.check_decay_in_dtype(name, value, cdt)
      t = count.astype(cdt)
      b1, b2, lr = _as(cfg.b1, cdt), _as(cfg.b2, cdt), _as(lr_value, cdt)
      one = jnp.ones((), cdt)
      omb1 = _host(lambda b: 1 - b, cfg.b1)
      omb2 = _host(lambda b: 1 - b, cfg.b2)
      factor = None
      if cfg.decoupled is not None:
        factor = _host(lambda r, w: 1 - r * w, lr_value, cfg.decoupled)
        factor = one - lr * _as(cfg.decoupled, cdt) if factor is None else _as(factor, cdt)
      cache[cdt] = (
          (
              b1, b2, _as(cfg.eps, cdt),
              one - b1 if omb1 is None else _as(omb1, cdt),
              one - b2 if omb2 is None else _as(omb2, cdt),
              factor,
              _bias_correction(cfg.b1, b1, t),
              _bias_correction(cfg.b2, b2, t),
          ),
          t,
          lr,
      )
    return cache[cdt]


def _framework_update(cfg: _Config, updates: Any, state: FrameworkAdamState,
                      params: Any) -> tuple[Any, FrameworkAdamState]:
  """One step of the framework's Adam over the tree, by the core's tree driver."""
  lr_value = cfg.learning_rate
  if callable(lr_value):
    with jax.numpy_dtype_promotion('standard'):
      lr_value = lr_value(state.count)  # the rate of this step, as optax and torch
  p_leaves = None
  if params is not None:  # the params' leaves, aligned with the gradient's
    try:
      p_list = jax.tree.structure(updates, is_leaf=_is_none).flatten_up_to(params)
    except (ValueError, TypeError):
      _checks.check_matching_trees(updates, state.mu)  # names the leaf
      raise
    # Keyed by the driver's leaf index (the leaf's place among the params,
    # optax.MaskedNode places counted: _rounding.leaf_positions).
    p_leaves = dict(zip(_rounding.leaf_positions(updates), p_list))
  rules = _Rules(cfg, lr_value, p_leaves, {})
  hps = {'b1': cfg.b1, 'b2': cfg.b2, 'eps': cfg.eps, 'eps_root': 0.0}
  return _update.tree_update(
      updates, state, hps, fmt=rules, amsgrad=cfg.amsgrad,
      state_type=FrameworkAdamState, who=f'{cfg.convention}_adam',
  )


# Called eagerly (every leaf a concrete array), the step is one compiled call
# over the tree, as the family's (adamfx._core.eager): the configuration, its
# numbers and schedule included, is hashed into the compiled code, so eager
# and jitted steps are the same program. A configuration holding arrays
# (optax.inject_hyperparams) runs the traced code as it is.
_compiled_update = jax.jit(_framework_update, static_argnums=0)


def _transformation(cfg: _Config) -> optax.GradientTransformation:
  needs_params = cfg.l2 is not None or cfg.decoupled is not None

  def init_fn(params):
    return _init(params, cfg.amsgrad)

  def update_fn(updates, state, params=None):
    if needs_params and params is None:
      raise ValueError(
          'weight_decay needs the params: call update(grads, state, params).'
      )
    params = params if needs_params else None
    if _eager.hashable(cfg) and _eager.eager(updates, state, params):
      return _compiled_update(cfg, updates, state, params)
    return _framework_update(cfg, updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)


def _build(convention, learning_rate, b1, b2, eps, l2, decoupled, amsgrad, maximize,
           param_rounding='nearest', update_clipping=False, cautious=False):
  _param_rounding.check_mode(param_rounding)
  stable = _stable.options(update_clipping, cautious)
  _checks.check_learning_rate(learning_rate, 'lr' if convention == 'torch' else 'learning_rate')
  _checks.check_decay('beta1' if convention == 'torch' else 'beta_1', b1)
  _checks.check_decay('beta2' if convention == 'torch' else 'beta_2', b2)
  _checks.check_non_negative('eps' if convention == 'torch' else 'epsilon', eps)
  for value in (l2, decoupled):
    if value is not None:
      _checks.check_non_negative('weight_decay', value)
  return _param_rounding.with_param_rounding(_transformation(_Config(
      convention,
      learning_rate,
      b1,
      b2,
      eps,
      None if l2 is None or _is_zero(l2) else l2,
      None if decoupled is None or _is_zero(decoupled) else decoupled,
      _check_flag('amsgrad', amsgrad),
      _check_flag('maximize', maximize),
      stable,
  )), param_rounding)


def torch_adam(
    lr: Any = 1e-3,
    betas: tuple[Any, Any] = (0.9, 0.999),
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    param_rounding: str = 'nearest',
    update_clipping: bool = False,
    cautious: bool = False,
) -> optax.GradientTransformation:
  r"""``torch.optim.Adam``, number for number, as an optax transformation.

  torch's order of operations, with ``weight_decay`` added to the gradient
  (L2 regularisation, not AdamW's decay) and AMSGrad's maximum taken over the
  raw second moment before the bias correction:

  .. math::

    g_t &= \pm\nabla f(p_{t-1}) + \lambda p_{t-1} \\
    m_t &= m_{t-1} + (1 - \beta_1)(g_t - m_{t-1}), \quad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
    \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ (amsgrad) or } v_t \\
    p_t &= p_{t-1} - \frac{\eta_t}{1 - \beta_1^t}\,
      \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

  with :math:`\eta_t` = ``lr``, :math:`\beta_1, \beta_2` = ``betas``,
  :math:`\epsilon` = ``eps``, :math:`\lambda` = ``weight_decay`` and the sign
  of the gradient flipped with ``maximize``.

  Args:
    lr: learning rate >= 0, or an optax schedule of the step count (step ``k``,
      0-based, uses ``lr(k)``: torch's ``LambdaLR`` stepped after each
      ``optimizer.step()``). Default 1e-3.
    betas: ``(beta1, beta2)``, each in [0, 1). Default ``(0.9, 0.999)``.
    eps: >= 0, added to ``sqrt(v) / sqrt(1 - beta2**t)``. Default 1e-8.
    weight_decay: L2 coefficient >= 0, added to the gradient as
      ``weight_decay * p``. Default 0.
    amsgrad: keep the maximum of the raw second moment. Default False.
    maximize: ascend the objective instead. Default False.
    param_rounding: how a new param is rounded to a params dtype narrower
      than float32: ``'nearest'`` (default), ``'kahan'`` (a compensation
      buffer in the params' dtype) or ``'stochastic'``; see
      :func:`adamfx.kahan_init` and the memory guide. ``update`` then
      needs ``params``; float32/float64 leaves are never affected.
    update_clipping: StableAdamW's update clipping (Wortsman et al. 2023)
      in torch's arithmetic: per tensor, ``lr`` is divided by ``max(1,
      RMS)``, :math:`\mathrm{RMS} = \sqrt{\mathrm{mean}(g_t^2 / \max(\hat
      v_t / (1 - \beta_2^t), \epsilon^2))}`, with :math:`g_t` the gradient
      the moments see (the L2 term added, ``maximize``'s sign flipped) and
      the bias-corrected :math:`\hat v_t` and ``eps`` of torch's
      denominator. Default False.
    cautious: cautious updates (Liang et al. 2024, their reference code):
      ``exp_avg`` is replaced in the step by ``exp_avg * mask / max(mean(mask),
      1e-3)``, ``mask = 1[exp_avg * g_t > 0]`` per tensor. The L2 term is
      part of :math:`g_t` and of ``exp_avg``, so it is masked with them
      (:func:`torch_adamw` leaves its decay unmasked). Default False.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`FrameworkAdamState`; ``update`` needs ``params`` when
    ``weight_decay`` is not 0.

  Raises:
    ValueError: a concrete hyperparameter out of its range.
    TypeError: a hyperparameter that is not a number (or ``lr`` a schedule).

  Examples:
    >>> import jax.numpy as jnp, optax, adamfx
    >>> params = {'w': jnp.array([1.0, -2.0])}
    >>> tx = adamfx.torch_adam(lr=0.1)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.array([0.5, -0.5])}, state, params)
    >>> optax.apply_updates(params, updates)['w']
    Array([ 0.9, -1.9], dtype=float32)

  .. warning::
    ``weight_decay`` here is L2 regularisation (it passes through the moments);
    for decoupled decay use :func:`torch_adamw`. optax's ``eps`` sits on
    ``sqrt(v_hat)``, torch's on ``sqrt(v) / sqrt(1 - beta2**t)``: the same
    number, in another order of operations.

  References:
    Kingma & Ba, 2015, Adam: A Method for Stochastic Optimization.
    Reddi et al., 2018, On the Convergence of Adam and Beyond.
  """
  b1, b2 = _check_pair('betas', betas)
  return _build('torch', lr, b1, b2, eps, weight_decay, None, amsgrad, maximize,
                param_rounding, update_clipping, cautious)


def torch_adamw(
    lr: Any = 1e-3,
    betas: tuple[Any, Any] = (0.9, 0.999),
    eps: Any = 1e-8,
    weight_decay: Any = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    param_rounding: str = 'nearest',
    update_clipping: bool = False,
    cautious: bool = False,
) -> optax.GradientTransformation:
  r"""``torch.optim.AdamW``, number for number, as an optax transformation.

  As :func:`torch_adam`, with decoupled decay instead of L2: the params are
  first multiplied by ``1 - lr * weight_decay`` (the step's ``lr``, scheduled
  or not), then take torch's Adam step.

  .. math::

    p_t = p_{t-1}(1 - \eta_t \lambda) - \frac{\eta_t}{1 - \beta_1^t}\,
      \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

  Args:
    lr: learning rate >= 0 or an optax schedule. Default 1e-3.
    betas: ``(beta1, beta2)``, each in [0, 1). Default ``(0.9, 0.999)``.
    eps: >= 0. Default 1e-8.
    weight_decay: decoupled decay >= 0, scaled by ``lr``. Default 1e-2.
    amsgrad: keep the maximum of the raw second moment. Default False.
    maximize: ascend the objective instead. Default False.
    param_rounding: how a new param is rounded to a params dtype narrower
      than float32: ``'nearest'`` (default), ``'kahan'`` (a compensation
      buffer in the params' dtype) or ``'stochastic'``; see
      :func:`adamfx.kahan_init` and the memory guide. ``update`` then
      needs ``params``; float32/float64 leaves are never affected.
    update_clipping: StableAdamW's update clipping in torch's arithmetic
      (the RMS of :func:`torch_adam`, with :math:`g_t` the gradient): the
      clipped rate ``lr / max(1, RMS)`` scales the step *and* the decay,
      ``p *= 1 - lr / max(1, RMS) * weight_decay``. This is torch-optimi's
      ``StableAdamW`` (``betas=(0.9, 0.99), eps=1e-6`` are its defaults),
      to rounding. Default False.
    cautious: cautious updates (see :func:`torch_adam`); the decay is not
      masked. Default False.

  Returns:
    An ``optax.GradientTransformation`` (state :class:`FrameworkAdamState`);
    ``update`` needs ``params`` when ``weight_decay`` is not 0.

  Raises:
    ValueError: a concrete hyperparameter out of its range.
    TypeError: a hyperparameter that is not a number.

  Examples:
    >>> import jax.numpy as jnp, adamfx
    >>> tx = adamfx.torch_adamw(lr=0.1, weight_decay=0.5)
    >>> params = jnp.array([2.0])
    >>> updates, _ = tx.update(jnp.array([1.0]), tx.init(params), params)
    >>> updates  # -0.1 * 0.5 * 2 (decay) - 0.1 (Adam's first step)
    Array([-0.2], dtype=float32)

  References:
    Loshchilov & Hutter, 2019, Decoupled Weight Decay Regularization.
  """
  b1, b2 = _check_pair('betas', betas)
  return _build('torch', lr, b1, b2, eps, None, weight_decay, amsgrad, maximize,
                param_rounding, update_clipping, cautious)


def keras_adam(
    learning_rate: Any = 1e-3,
    beta_1: Any = 0.9,
    beta_2: Any = 0.999,
    epsilon: Any = 1e-7,
    amsgrad: bool = False,
    *,
    param_rounding: str = 'nearest',
    update_clipping: bool = False,
    cautious: bool = False,
) -> optax.GradientTransformation:
  r"""Keras 3's ``keras.optimizers.Adam``, as an optax transformation.

  Keras folds both bias corrections into the step size and adds ``epsilon``
  to ``sqrt(v)`` itself ("epsilon hat" in the paper's section 2), so its
  ``epsilon`` weighs ``1 / sqrt(1 - beta_2**t)`` times more early on than
  optax's or torch's ``eps``:

  .. math::

    \alpha_t = \eta_t \sqrt{1 - \beta_2^t} / (1 - \beta_1^t), \quad
    p_t = p_{t-1} - \alpha_t\, m_t / (\sqrt{\hat v_t} + \epsilon)

  with :math:`m_t, v_t` the usual moving averages and :math:`\hat v_t` the
  running maximum of :math:`v_t` with ``amsgrad``, else :math:`v_t`.

  Args:
    learning_rate: >= 0 or an optax schedule of the 0-based step (Keras's
      ``iterations``). Default 1e-3.
    beta_1: in [0, 1). Default 0.9.
    beta_2: in [0, 1). Default 0.999.
    epsilon: >= 0. Default 1e-7 (Keras's, not optax's 1e-8).
    amsgrad: keep the maximum of the raw second moment. Default False.
    param_rounding: how a new param is rounded to a params dtype narrower
      than float32: ``'nearest'`` (default), ``'kahan'`` (a compensation
      buffer in the params' dtype) or ``'stochastic'``; see
      :func:`adamfx.kahan_init` and the memory guide. ``update`` then
      needs ``params``; float32/float64 leaves are never affected.
    update_clipping: StableAdamW's update clipping in Keras' arithmetic:
      per tensor, ``learning_rate`` (in :math:`\alpha_t`) is divided by
      ``max(1, RMS)``, :math:`\mathrm{RMS} = \sqrt{\mathrm{mean}((1 -
      \beta_2^t)\, g_t^2 / \max(\hat v_t, \epsilon^2))}`: StableAdamW's
      :math:`g^2 / \max(\hat v, e^2)` on the bias-corrected :math:`\hat v_t
      / (1 - \beta_2^t)`, with :math:`e = \epsilon / \sqrt{1 - \beta_2^t}`,
      the epsilon Keras' denominator :math:`\sqrt{\hat v_t} + \epsilon`
      puts on the bias-corrected root. Default False.
    cautious: cautious updates (Liang et al. 2024, their reference code):
      :math:`m_t` is replaced in the step by ``m * mask / max(mean(mask),
      1e-3)``, ``mask = 1[m_t * g_t > 0]`` per tensor. Default False.

  Returns:
    An ``optax.GradientTransformation`` (state :class:`FrameworkAdamState`).

  Raises:
    ValueError: a concrete hyperparameter out of its range.
    TypeError: a hyperparameter that is not a number.

  Examples:
    >>> import jax.numpy as jnp, adamfx
    >>> tx = adamfx.keras_adam(learning_rate=0.1)
    >>> params = jnp.array([1.0])
    >>> updates, _ = tx.update(jnp.array([3.0]), tx.init(params), params)
    >>> updates
    Array([-0.1], dtype=float32)

  .. warning::
    ``epsilon=1e-7`` sits outside the bias correction: a Keras run with
    ``epsilon=1e-7`` is not optax's ``adam(eps=1e-7)`` (optax issue 571).

  References:
    Kingma & Ba, 2015, Adam: A Method for Stochastic Optimization.
  """
  return _build('keras', learning_rate, beta_1, beta_2, epsilon, None, None, amsgrad, False,
                param_rounding, update_clipping, cautious)


def keras_adamw(
    learning_rate: Any = 1e-3,
    weight_decay: Any = 0.004,
    beta_1: Any = 0.9,
    beta_2: Any = 0.999,
    epsilon: Any = 1e-7,
    amsgrad: bool = False,
    *,
    param_rounding: str = 'nearest',
    update_clipping: bool = False,
    cautious: bool = False,
) -> optax.GradientTransformation:
  r"""Keras 3's ``keras.optimizers.AdamW``, as an optax transformation.

  Keras first decays every param by ``learning_rate * weight_decay * p``,
  then takes :func:`keras_adam`'s step.

  Args:
    learning_rate: >= 0 or an optax schedule. Default 1e-3.
    weight_decay: decoupled decay >= 0, scaled by the learning rate.
      Default 0.004.
    beta_1: in [0, 1). Default 0.9.
    beta_2: in [0, 1). Default 0.999.
    epsilon: >= 0. Default 1e-7.
    amsgrad: keep the maximum of the raw second moment. Default False.
    param_rounding: how a new param is rounded to a params dtype narrower
      than float32: ``'nearest'`` (default), ``'kahan'`` (a compensation
      buffer in the params' dtype) or ``'stochastic'``; see
      :func:`adamfx.kahan_init` and the memory guide. ``update`` then
      needs ``params``; float32/float64 leaves are never affected.
    update_clipping: StableAdamW's update clipping in Keras' arithmetic
      (the RMS of :func:`keras_adam`): the clipped rate ``learning_rate /
      max(1, RMS)`` scales the step *and* the decay, ``p -= p *
      weight_decay * learning_rate / max(1, RMS)``. Default False.
    cautious: cautious updates (see :func:`keras_adam`); the decay is not
      masked. Default False.

  Returns:
    An ``optax.GradientTransformation`` (state :class:`FrameworkAdamState`);
    ``update`` needs ``params`` when ``weight_decay`` is not 0.

  Raises:
    ValueError: a concrete hyperparameter out of its range.
    TypeError: a hyperparameter that is not a number.

  Examples:
    >>> import jax.numpy as jnp, adamfx
    >>> tx = adamfx.keras_adamw(learning_rate=0.1, weight_decay=0.5)
    >>> params = jnp.array([2.0])
    >>> updates, _ = tx.update(jnp.array([1.0]), tx.init(params), params)
    >>> updates
    Array([-0.2], dtype=float32)

  References:
    Loshchilov & Hutter, 2019, Decoupled Weight Decay Regularization.
  """
  return _build(
      'keras', learning_rate, beta_1, beta_2, epsilon, None, weight_decay, amsgrad, False,
      param_rounding, update_clipping, cautious,
  )
