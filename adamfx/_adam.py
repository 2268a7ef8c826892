r"""The Adam family's constructors, as optax spells them.

:func:`scale_by_adam`, :func:`adam`, :func:`adamw`, :func:`nadam`,
:func:`nadamw`, :func:`amsgrad`, :func:`scale_by_adamax` and :func:`adamax`
check their arguments and chain the update math of :mod:`adamfx._update`
(compiled leaf by leaf when called eagerly, :mod:`adamfx._fast`) with the
learning rate and AdamW's decoupled decay. :func:`inject_hyperparams` lives in
:mod:`adamfx._inject`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from typing import Optional
from typing import Union

import jax
import jax.numpy as jnp
import optax

from adamfx import _checks
from adamfx import _fast
from adamfx import _param_rounding
from adamfx import _update
from adamfx._update import AdaMaxState
from adamfx._update import ScalarOrSchedule


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
        new_updates, updates, is_leaf=_update._is_none,
    )
    return new_updates, state

  return optax.GradientTransformation(inner.init, update_fn)


def _nan_if_negative(
    inner: optax.GradientTransformation, value: Any
) -> optax.GradientTransformation:
  """``inner``, its updates NaN where an array ``value`` is negative or not finite.

  A learning rate or weight decay that is a traced array cannot be checked
  at construction: an invalid one must not give finite wrong steps (a
  negative rate ascends). Python numbers and schedules pass through as is.
  """
  if callable(value) and not _checks._is_numeric_like(value):
    return inner
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return inner

  def update_fn(updates, state, params=None):
    updates, state = inner.update(updates, state, params)
    x = jnp.asarray(value)
    invalid = jnp.any(~((x >= 0) & (x < jnp.inf)))
    return jax.tree.map(lambda u: None if u is None else _update.nan_where(invalid, u), updates,
                        is_leaf=_update._is_none), state

  return optax.GradientTransformation(inner.init, update_fn)


def _scale_by_learning_rate(learning_rate: ScalarOrSchedule):
  _checks.check_learning_rate(learning_rate)
  traced = _nan_if_negative(
      _keep_dtypes(optax.scale_by_learning_rate(learning_rate)), learning_rate
  )
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
    links.append(_nan_if_negative(
        _keep_dtypes(optax.add_decayed_weights(weight_decay, mask)), weight_decay
    ))
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
    _checks.check_chain_state(state, len(links))
    if decay is not None:
      _checks.check_mask(decay[1], updates, params)
    out = fused(updates, state, params)
    if out is not None:
      return out
    return chain.update(updates, state, params, **extra_args)

  init_fn = chain.init if decay is None else _init_checking_mask(chain, decay[1])
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
      is negative or not finite (Python, NumPy or concrete JAX values); at
      update time, if the gradient tree does not match the state, or if
      ``b1``/``b2`` rounds to 1.0 in the arithmetic dtype (``b2=0.99999999``
      with float32 params). A traced value outside its range makes the
      update NaN instead.
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
    return _update._family_init(params, mu_dtype, nu_dtype, amsgrad)

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
    param_rounding: str = 'nearest',
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
    param_rounding: how a new param is rounded to a params dtype narrower
      than float32: ``'nearest'`` (default), ``'kahan'`` (a compensation
      buffer in the params' dtype) or ``'stochastic'``; see
      :func:`adamfx.kahan_init` and the memory guide. ``update`` then
      needs ``params``; float32/float64 leaves are never affected.

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
  _param_rounding.check_mode(param_rounding)
  return _param_rounding.with_param_rounding(_chain_learning_rate(
      scale_by_adam(
          b1, b2, eps, eps_root, mu_dtype,
          nu_dtype=nu_dtype, nesterov=nesterov, amsgrad=amsgrad,
      ),
      learning_rate, b1, b2, eps, eps_root, nesterov=nesterov, amsgrad=amsgrad,
  ), param_rounding)


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
    param_rounding: str = 'nearest',
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
    param_rounding: how a new param is rounded to a params dtype narrower
      than float32: ``'nearest'`` (default), ``'kahan'`` (a compensation
      buffer in the params' dtype) or ``'stochastic'``; see
      :func:`adamfx.kahan_init` and the memory guide. ``update`` then
      needs ``params``; float32/float64 leaves are never affected.

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
  _param_rounding.check_mode(param_rounding)
  return _param_rounding.with_param_rounding(_chain_learning_rate(
      scale_by_adam(
          b1, b2, eps, eps_root, mu_dtype,
          nu_dtype=nu_dtype, nesterov=nesterov, amsgrad=amsgrad,
      ),
      learning_rate, b1, b2, eps, eps_root, decay=(weight_decay, mask),
      nesterov=nesterov, amsgrad=amsgrad,
  ), param_rounding)


def _decoupled_decay_chain(
    scaling: optax.GradientTransformation,
    learning_rate: ScalarOrSchedule,
    weight_decay: ScalarOrSchedule,
    mask: Any,
) -> optax.GradientTransformationExtraArgs:
  """``scaling``, then AdamW's decoupled decay, then the learning rate."""

  links = _links(scaling, learning_rate, (weight_decay, mask))
  chain = optax.chain(*links)

  def update_fn(updates, state, params=None, **extra_args):
    _checks.check_chain_state(state, len(links))
    _checks.check_mask(mask, updates, params)
    return chain.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(_init_checking_mask(chain, mask), update_fn)


def _init_checking_mask(chain: Any, mask: Any) -> Callable[[Any], Any]:
  def init_fn(params):
    _checks.check_mask(mask, params, params)
    return chain.init(params)

  return init_fn


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
    return AdaMaxState(*_update._family_init(params, None, None, amsgrad=False))

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
    *,
    param_rounding: str = 'nearest',
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
    param_rounding: how a new param is rounded to a params dtype narrower
      than float32: ``'nearest'`` (default), ``'kahan'`` (a compensation
      buffer in the params' dtype) or ``'stochastic'``; see
      :func:`adamfx.kahan_init` and the memory guide. ``update`` then
      needs ``params``; float32/float64 leaves are never affected.

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
  _param_rounding.check_mode(param_rounding)
  return _param_rounding.with_param_rounding(_chain_learning_rate(
      scale_by_adamax(b1, b2, eps), learning_rate, b1, b2, eps, 0.0, infinity_norm=True
  ), param_rounding)


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
    *,
    param_rounding: str = 'nearest',
) -> optax.GradientTransformationExtraArgs:
  """AMSGrad: :func:`adam` with ``amsgrad=True`` (``optax.amsgrad``'s defaults).

  Args:
    learning_rate: a number >= 0 or an optax schedule.
    b1: decay of the first moment, in [0, 1).
    b2: decay of the second moment, in [0, 1).
    eps: added to the root of the second moment, >= 0.
    eps_root: added inside the root, >= 0.
    mu_dtype: storage dtype of the first moment.
    param_rounding: how a new param is rounded to a params dtype narrower
      than float32: ``'nearest'`` (default), ``'kahan'`` (a compensation
      buffer in the params' dtype) or ``'stochastic'``; see
      :func:`adamfx.kahan_init` and the memory guide. ``update`` then
      needs ``params``; float32/float64 leaves are never affected.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return adam(
      learning_rate, b1, b2, eps, eps_root, mu_dtype, amsgrad=True,
      param_rounding=param_rounding,
  )


# Arguments that change what the state is or how it is laid out, not a value
# of the update: kept static by :func:`inject_hyperparams` without being named.
