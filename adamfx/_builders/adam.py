r"""The Adam family's constructors, as optax spells them.

:func:`scale_by_adam`, :func:`adam`, :func:`adamw`, :func:`nadam`,
:func:`nadamw`, :func:`amsgrad`, :func:`scale_by_adamax` and :func:`adamax`
check their arguments and chain the update math of :mod:`adamfx._core.driver`
(compiled leaf by leaf when called eagerly, :mod:`adamfx._core.eager`) with the
learning rate and AdamW's decoupled decay. :func:`inject_hyperparams` lives in
:mod:`adamfx._wrappers.inject`.
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

from adamfx._core import checks as _checks
from adamfx._core import driver as _update
from adamfx._core import eager as _fast
from adamfx._core import param_rounding as _param_rounding
from adamfx._core import stable as _stable
from adamfx._core.driver import AdaMaxState
from adamfx._core.driver import ScalarOrSchedule
from adamfx._formats.blockwise8bit import Blockwise8bit
from adamfx._formats.dense import Dense


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
    stable: _stable.Options = _stable.NONE,
    **flags: bool,
) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(scaling, [decay,] learning-rate scaling)``, one call when eager.

  ``scaling`` is :func:`scale_by_adam` or :func:`scale_by_adamax` with these
  hyperparameters and ``flags`` (``fmt``: the moments' storage format, None
  for dense); ``decay``, AdamW's ``(weight_decay, mask)``.
  The state and, under a trace, the update are the chain's. Called eagerly,
  the decay (a number or array, not a schedule) and the learning rate are
  applied inside the family's compiled calls, so a step is one dispatch per
  chunk of leaves and one or two passes less over memory, with the chain's
  numbers. With ``stable`` options (update clipping, cautious), the links
  run through :func:`adamfx._core.stable.chain` (same state, no fused call).
  """
  links = _links(scaling, learning_rate, decay)
  chain = optax.chain(*links)
  if stable.active:
    chain = _stable.chain(scaling, links[1:], stable, b2=b2, eps=eps, decayed=decay is not None)

  fmt = flags.get('fmt')

  def fused(updates, state, params):
    if stable.active or not (isinstance(state, tuple) and len(state) == len(links)):
      return None
    if not _fast.eager(updates, state, params, (b1, b2, eps, eps_root)):
      if fmt is None or decay is not None or not _checks._python_number(learning_rate):
        return None
      # Traced, a stored format takes a number learning rate inside its step
      # (an 8-bit leaf: inside its chunk loop), with the chain's numbers.
      hps = {'b1': b1, 'b2': b2, 'eps': eps, 'eps_root': eps_root}
      tail = _update.Tail(lr_static=-1 * learning_rate, lr_kind='number')
      updates, inner = _update.tree_update(updates, state[0], hps, tail=tail, **flags)
      return updates, (inner, *state[1:])
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
  _checks.check_adam_args(b1, b2, eps, eps_root)
  return (
      _checks.check_state_dtype('mu_dtype', mu_dtype),
      _checks.check_state_dtype('nu_dtype', nu_dtype),
  )


def _storage(moments: Any, mu_dtype: Any, nu_dtype: Any) -> tuple[Any, Any, Any]:
  """``(format, mu_dtype, nu_dtype)`` for ``moments=``; format None: dense.

  ``Dense(dtype)`` (or None) selects the dense step with those dtypes
  (``mu_dtype``/``nu_dtype``, when given, win); any other format object
  (``Blockwise8bit``, ...) runs through :func:`adamfx._core.driver.format_update`
  and cannot be combined with dtypes.
  """
  mu_dtype = _checks.check_state_dtype('mu_dtype', mu_dtype)
  nu_dtype = _checks.check_state_dtype('nu_dtype', nu_dtype)
  if moments is None:
    return None, mu_dtype, nu_dtype
  if isinstance(moments, Dense):
    return (None, *moments.dtypes(mu_dtype, nu_dtype))
  if not all(hasattr(moments, a) for a in ('init', 'decode', 'encode', 'is_stored')):
    raise TypeError(
        f'`moments` must be a storage format (adamfx.Dense(dtype),'
        f' adamfx.Blockwise8bit(...)) or None, got {moments!r}.'
    )
  if mu_dtype is not None or nu_dtype is not None:
    raise ValueError(
        f'`mu_dtype`/`nu_dtype` select dense storage and cannot be combined with'
        f' moments={moments!r}; drop them, or use moments=adamfx.Dense(dtype).'
    )
  return moments, None, None


def _scale_by_format(
    b1: Any, b2: Any, eps: Any, eps_root: Any, *, fmt: Any, nesterov: bool, amsgrad: bool,
) -> optax.GradientTransformation:
  """:func:`scale_by_adam` with moments stored in ``fmt`` (not dense)."""
  _checks.check_adam_args(b1, b2, eps, eps_root)

  def init_fn(params):
    _checks.check_param_leaves(params)
    params = jax.tree.map(lambda p: p if hasattr(p, 'dtype') else jnp.asarray(p), params)
    zeros = lambda signed: jax.tree.map(lambda p: fmt.init(p, signed), params)
    return _update.AdamState(
        count=jnp.zeros([], jnp.int32), mu=zeros(True), nu=zeros(False),
        nu_max=zeros(False) if amsgrad else None,
    )

  def update_fn(updates, state, params=None):
    del params
    return _fast.family_update(  # compiled when eager
        updates, state, b1, b2, eps, eps_root, fmt=fmt, nesterov=nesterov, amsgrad=amsgrad)

  return optax.GradientTransformation(init_fn, update_fn)


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
    update_clipping: bool = False,
    cautious: bool = False,
    moments: Optional[Any] = None,
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
      ``nu``: see ``adamfx._core.rounding``.
    nesterov: use Nesterov momentum (NAdam, Dozat 2016).
    amsgrad: keep the running maximum of the bias-corrected second moment
      (AMSGrad, Reddi et al. 2018), as ``optax.amsgrad`` does.
    update_clipping: StableAdamW's update clipping (Wortsman et al. 2023):
      each tensor's direction is divided by
      ``max(1, sqrt(mean(g**2 / max(v_hat, eps**2))))`` on the new
      bias-corrected second moment; see :func:`stable_adamw`.
    cautious: cautious updates (Liang et al. 2024): the direction is zeroed
      where its sign disagrees with the gradient's and the rest rescaled per
      tensor by ``1 / max(mean(mask), 1e-3)``; the decay is not masked.
    moments: how the moments are stored: a format object,
      :class:`Dense` (the default, with ``mu_dtype``/``nu_dtype``) or
      :class:`Blockwise8bit` (8-bit codes, ~2 bytes/param for both moments;
      then ``mu_dtype``/``nu_dtype`` must be None).

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
  fmt, mu_dtype, nu_dtype = _storage(moments, mu_dtype, nu_dtype)
  _check_adam_args(b1, b2, eps, eps_root, None, None)
  stable = _stable.options(update_clipping, cautious)
  if fmt is not None:
    plain = _scale_by_format(b1, b2, eps, eps_root, fmt=fmt, nesterov=nesterov, amsgrad=amsgrad)
    if stable.active:
      return _stable.chain(plain, [], stable, b2=b2, eps=eps, decayed=False)
    return plain

  def init_fn(params):
    return _update._family_init(params, mu_dtype, nu_dtype, amsgrad)

  def update_fn(updates, state, params=None):
    del params
    return _fast.family_update(  # compiled when eager
        updates, state, b1, b2, eps, eps_root, nesterov=nesterov, amsgrad=amsgrad
    )

  plain = optax.GradientTransformation(init_fn, update_fn)
  if stable.active:
    return _stable.chain(plain, [], stable, b2=b2, eps=eps, decayed=False)
  return plain


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
    update_clipping: bool = False,
    cautious: bool = False,
    moments: Optional[Any] = None,
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
    update_clipping: StableAdamW's update clipping (Wortsman et al. 2023):
      each tensor's learning rate (and its decay) is divided by
      ``max(1, sqrt(mean(g**2 / max(v_hat, eps**2))))`` on the new
      bias-corrected second moment; see :func:`stable_adamw`.
    cautious: cautious updates (Liang et al. 2024): the direction is zeroed
      where its sign disagrees with the gradient's and the rest rescaled per
      tensor by ``1 / max(mean(mask), 1e-3)``; the decay is not masked.
    moments: the moments' storage format (:class:`Dense`,
      :class:`Blockwise8bit`); see :func:`scale_by_adam`.
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
  fmt, _, _ = _storage(moments, mu_dtype, nu_dtype)
  _param_rounding.check_mode(param_rounding)
  return _param_rounding.with_param_rounding(_chain_learning_rate(
      scale_by_adam(
          b1, b2, eps, eps_root, mu_dtype,
          nu_dtype=nu_dtype, nesterov=nesterov, amsgrad=amsgrad, moments=moments,
      ),
      learning_rate, b1, b2, eps, eps_root, nesterov=nesterov, amsgrad=amsgrad, fmt=fmt,
      stable=_stable.options(update_clipping, cautious),
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
    update_clipping: bool = False,
    cautious: bool = False,
    decouple_lr: bool = False,
    max_lr: Optional[Any] = None,
    moments: Optional[Any] = None,
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
    update_clipping: StableAdamW's update clipping (Wortsman et al. 2023):
      each tensor's learning rate (and its decay) is divided by
      ``max(1, sqrt(mean(g**2 / max(v_hat, eps**2))))`` on the new
      bias-corrected second moment; see :func:`stable_adamw`.
    cautious: cautious updates (Liang et al. 2024): the direction is zeroed
      where its sign disagrees with the gradient's and the rest rescaled per
      tensor by ``1 / max(mean(mask), 1e-3)``; the decay is not masked.
    decouple_lr: fully decoupled weight decay (optimi's ``decouple_lr``): the
      decay is ``(lr_t / max_lr) * weight_decay * params``, not ``lr_t *
      weight_decay * params``, so its strength does not change with the peak
      learning rate (typical ``weight_decay`` then 1e-5 to 1e-4).
    max_lr: the peak learning rate for ``decouple_lr``, > 0; default: the
      learning rate (a number). Required with a schedule.
    moments: the moments' storage format (:class:`Dense`,
      :class:`Blockwise8bit`); see :func:`scale_by_adam`.
    param_rounding: ``'nearest'`` (default), ``'kahan'`` or ``'stochastic'``, as in :func:`adam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  Raises:
    ValueError: for hyperparameters outside their ranges, including a
      negative ``weight_decay``; with ``decouple_lr=True``, a schedule as
      learning rate without ``max_lr`` or a ``max_lr`` <= 0; ``max_lr``
      without ``decouple_lr``.
    TypeError: for flags that are not Python bools.

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
  fmt, _, _ = _storage(moments, mu_dtype, nu_dtype)
  _param_rounding.check_mode(param_rounding)
  return _param_rounding.with_param_rounding(_chain_learning_rate(
      scale_by_adam(
          b1, b2, eps, eps_root, mu_dtype,
          nu_dtype=nu_dtype, nesterov=nesterov, amsgrad=amsgrad, moments=moments,
      ),
      learning_rate, b1, b2, eps, eps_root,
      decay=(_decay(weight_decay, learning_rate, decouple_lr, max_lr), mask),
      nesterov=nesterov, amsgrad=amsgrad, fmt=fmt,
      stable=_stable.options(update_clipping, cautious),
  ), param_rounding)


def _decay(weight_decay: Any, learning_rate: Any, decouple_lr: Any, max_lr: Any) -> Any:
  """``weight_decay``, checked, and divided by ``max_lr`` with ``decouple_lr``."""
  if not callable(weight_decay):
    _checks.check_non_negative('weight_decay', weight_decay)
  return _stable.decoupled_weight_decay(weight_decay, learning_rate, decouple_lr, max_lr)


def _init_checking_mask(chain: Any, mask: Any) -> Callable[[Any], Any]:
  def init_fn(params):
    _checks.check_mask(mask, params, params)
    return chain.init(params)

  return init_fn


def scale_by_adamax(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, moments: Optional[Any] = None
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
    moments: :class:`Dense` storage (its dtype for both ``mu`` and the
      infinity norm) or None; quantized formats do not apply: the infinity
      norm is a running maximum, not an average, so its blocks' scales
      would only grow.

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
  dtype = _adamax_dtype(moments)
  _check_adam_args(b1, b2, eps, 0.0, None, None)

  def init_fn(params):
    return AdaMaxState(*_update._family_init(params, dtype, dtype, amsgrad=False))

  def update_fn(updates, state, params=None):
    del params
    return _fast.family_update(  # compiled when eager
        updates, state, b1, b2, eps, 0.0, infinity_norm=True
    )

  return optax.GradientTransformation(init_fn, update_fn)


def _adamax_dtype(moments: Any) -> Any:
  if moments is None or isinstance(moments, Dense):
    return None if moments is None else moments.dtype
  raise ValueError(
      f'AdaMax cannot store its moments as {moments!r}: its second moment is an'
      ' exponentially weighted infinity norm (a running maximum); use'
      ' moments=adamfx.Dense(dtype), or adamfx.adam with this format.'
  )


def adamax(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    update_clipping: bool = False,
    cautious: bool = False,
    moments: Optional[Any] = None,
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
    update_clipping: see :func:`adam`, with :math:`\hat v_t = u_t^2`; since
      :math:`u_t \ge |g_t|`, the RMS is at most 1 and the clip never acts
      (accepted so that every member takes the same flags).
    cautious: see :func:`adam`.
    moments: :class:`Dense` storage or None (see :func:`scale_by_adamax`).
    param_rounding: ``'nearest'`` (default), ``'kahan'`` or ``'stochastic'``, as in :func:`adam`.

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
      scale_by_adamax(b1, b2, eps, moments=moments), learning_rate, b1, b2, eps, 0.0,
      infinity_norm=True, stable=_stable.options(update_clipping, cautious),
  ), param_rounding)


def adamaxw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    *,
    update_clipping: bool = False,
    cautious: bool = False,
    decouple_lr: bool = False,
    max_lr: Optional[Any] = None,
    moments: Optional[Any] = None,
    param_rounding: str = 'nearest',
) -> optax.GradientTransformationExtraArgs:
  r"""AdaMax with decoupled weight decay, a drop-in for ``optax.adamaxw``.

  :func:`adamax` with AdamW's decay: :math:`\theta_t \leftarrow
  \theta_{t-1} - \alpha_t (m_t / ((1 - \beta_1^t) u_t) + \lambda
  \theta_{t-1})`.

  Args:
    learning_rate: :math:`\alpha`, a number >= 0 or an optax schedule.
    b1: decay of the first moment, in [0, 1); default 0.9.
    b2: decay of the infinity norm, in [0, 1); default 0.999.
    eps: added to the infinity norm, >= 0; default 1e-8.
    weight_decay: :math:`\lambda` >= 0, or a schedule; default 1e-4.
    mask: a tree of booleans (or a function of the params returning one)
      selecting the leaves to decay, as in ``optax.add_decayed_weights``.
    update_clipping: as in :func:`adamw`.
    cautious: as in :func:`adamw`.
    decouple_lr: as in :func:`adamw`.
    max_lr: as in :func:`adamw`.
    moments: as in :func:`adamax` (dense storage only).
    param_rounding: as in :func:`adamw`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  Raises:
    ValueError: for hyperparameters outside their ranges.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adamfx
    >>> tx = adamfx.adamaxw(1e-2, weight_decay=0.1)
    >>> params = jnp.ones(2)
    >>> updates, _ = tx.update(jnp.zeros(2), tx.init(params), params)
    >>> updates  # pure decay: -lr * weight_decay * w
    Array([-0.001, -0.001], dtype=float32)
  """
  _param_rounding.check_mode(param_rounding)
  return _param_rounding.with_param_rounding(_chain_learning_rate(
      scale_by_adamax(b1, b2, eps, moments=moments), learning_rate, b1, b2, eps, 0.0,
      decay=(_decay(weight_decay, learning_rate, decouple_lr, max_lr), mask),
      infinity_norm=True, stable=_stable.options(update_clipping, cautious),
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
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    update_clipping: bool = False,
    cautious: bool = False,
    nu_dtype: Optional[Any] = None,
    moments: Optional[Any] = None,
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
    bias_correction_mu: whether the first moment is bias-corrected; False
      matches the AMSGrad paper (as optax's argument).
    bias_correction_nu: whether the second moment is bias-corrected before
      the running maximum; False matches the AMSGrad paper (as optax's).
    nu_dtype: storage dtype of the second moment (and of its maximum).
    moments: the moments' storage format; with :class:`Blockwise8bit` the
      running maximum is stored in 8 bits too.
    update_clipping: see :func:`adam`; the RMS is taken against the running
      maximum of the second moment, the denominator AMSGrad uses.
    cautious: see :func:`adam`.
    param_rounding: ``'nearest'`` (default), ``'kahan'`` or ``'stochastic'``, as in :func:`adam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return adam(
      learning_rate, b1, b2, eps, eps_root, mu_dtype,
      nu_dtype=nu_dtype, amsgrad=_amsgrad_flag(bias_correction_mu, bias_correction_nu),
      moments=moments,
      update_clipping=update_clipping, cautious=cautious,
      param_rounding=param_rounding,
  )


def scale_by_amsgrad(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[Any] = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    nu_dtype: Optional[Any] = None,
    moments: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""AMSGrad's rescaling, a drop-in for ``optax.scale_by_amsgrad``.

  :func:`scale_by_adam` with ``amsgrad=True``: the second moment's
  bias-corrected running maximum :math:`\hat v^{\max}_t = \max(\hat
  v^{\max}_{t-1}, \hat v_t)` replaces :math:`\hat v_t` (Reddi et al. 2018,
  in optax's form).

  Args:
    b1: decay of the first moment, in [0, 1); default 0.9.
    b2: decay of the second moment, in [0, 1); default 0.999.
    eps: added to the root of the second moment, >= 0; default 1e-8.
    eps_root: added inside the root, >= 0; default 0.
    mu_dtype: storage dtype of the first moment; default: the params'.
    bias_correction_mu: whether the first moment is bias-corrected; False
      matches the AMSGrad paper (as optax's argument).
    bias_correction_nu: whether the second moment is bias-corrected before
      the running maximum; False matches the AMSGrad paper (as optax's).
    nu_dtype: storage dtype of the second moment and its maximum.
    moments: the moments' storage format (see :func:`scale_by_adam`).

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`ScaleByAmsgradState` (an :class:`AdamState` with ``nu_max``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import adamfx
    >>> tx = adamfx.scale_by_amsgrad()
    >>> state = tx.init(jnp.zeros(2))
    >>> updates, state = tx.update(jnp.array([0.5, -2.0]), state)
    >>> updates, state.nu_max.shape
    (Array([ 1., -1.], dtype=float32), (2,))

  References:
    Reddi, Kale & Kumar, `On the Convergence of Adam and Beyond
    <https://openreview.net/forum?id=ryQu7f-RZ>`_, ICLR 2018.
  """
  return scale_by_adam(
      b1, b2, eps, eps_root, mu_dtype, nu_dtype=nu_dtype,
      amsgrad=_amsgrad_flag(bias_correction_mu, bias_correction_nu), moments=moments)


def _amsgrad_flag(bias_correction_mu: Any, bias_correction_nu: Any) -> Any:
  """``amsgrad=`` for the core: True, or the corrections optax lets AMSGrad turn off."""
  for name, value in (('bias_correction_mu', bias_correction_mu),
                      ('bias_correction_nu', bias_correction_nu)):
    if not isinstance(value, bool):
      raise TypeError(f'`{name}` must be a Python bool (True or False), got {value!r}.')
  if bias_correction_mu and bias_correction_nu:
    return True
  return _update.Amsgrad(bias_correction_mu, bias_correction_nu)


def scale_by_adam8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    nesterov: bool = False,
    block_size: Optional[int] = None,
    min_8bit_size: Optional[int] = None,
) -> optax.GradientTransformation:
  r""":func:`adamfx.scale_by_adam` with its moments stored in 8 bits per element.

  The update is Adam's (the same float32 code as :func:`adamfx.scale_by_adam`),
  computed from the dequantized moments; only what is stored between steps
  changes. Each leaf with at least ``min_8bit_size`` real floating elements
  keeps ``mu`` and ``nu`` as :class:`QuantizedArray`: uint8 codes of the
  dynamic map (signed for ``mu``, unsigned for ``nu``) and one float32 scale
  per block of ``block_size`` elements.

  .. math::

    \begin{align*}
      m, v &\leftarrow \mathrm{deq}(\mathrm{mu}), \mathrm{deq}(\mathrm{nu}) \\
      m, v, u &\leftarrow \text{Adam's step from } m, v, g_t
        \text{ in float32 (see scale\_by\_adam)} \\
      \mathrm{mu}, \mathrm{nu} &\leftarrow \mathrm{q}_{\pm}(m),\ \mathrm{q}_{+}(v)
    \end{align*}

  where :math:`\mathrm{q}_{\pm}(x)_i = \arg\min_c |x_i / s_B - \mathrm{map}_c|` with
  :math:`s_B = \max_{j \in B} |x_j|` the absmax of element :math:`i`'s block
  :math:`B`, and :math:`\mathrm{deq}(c)_i = \mathrm{map}_{c_i} s_B`.
  :math:`\mathrm{q}_{+}` rounds stochastically: with
  :math:`\mathrm{map}_c \le x_i / s_B < \mathrm{map}_{c+1}` it takes
  :math:`c + 1` with probability
  :math:`(x_i / s_B - \mathrm{map}_c) / (\mathrm{map}_{c+1} - \mathrm{map}_c)`, so
  the stored ``nu`` is right on average and decays by ``b2`` even in a block
  whose absmax stays large (round-to-nearest stalled there, issue 24). Its
  bits are a hash of (step count, leaf, element): no key in the state, the
  same bits eager or jitted, chunked or not.

  An element whose new moment is not finite (a NaN or inf gradient) keeps its
  previous moments, and the rest of its block is quantized as if it were not
  there: one bad element does not wipe its block. The update for that element
  is what float32 Adam returns (NaN); guard the params with
  ``optax.apply_if_finite`` as usual.

  Args:
    b1: decay of the first moment, in [0, 1); default 0.9.
    b2: decay of the second moment, in [0, 1); default 0.999.
    eps: added to the root of the second moment, >= 0; default 1e-8.
    eps_root: added inside the root, >= 0; default 0.
    nesterov: NAdam's momentum (Dozat 2016).
    block_size: elements per quantization block (one float32 scale each),
      a positive int; default 256 (Dettmers et al. use 2048 on GPUs; smaller
      blocks isolate outliers better for 1.5 % more memory).
    min_8bit_size: leaves with fewer elements keep float32 moments; default
      4096, as bitsandbytes. Both default to None (meaning these numbers), so
      that ``optax.inject_hyperparams`` does not make them arrays.

  Returns:
    An ``optax.GradientTransformation`` whose state is an
    :class:`adamfx.AdamState` with :class:`QuantizedArray` (or float32) leaves
    in ``mu`` and ``nu``.

  Raises:
    ValueError: for hyperparameters outside their ranges (see
      :func:`adamfx.scale_by_adam`), a ``block_size`` < 1 or a negative
      ``min_8bit_size``; at update time, if the gradient tree does not match.
    TypeError: for non-numeric hyperparameters or integer params.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import adamfx
    >>> tx = adamfx.scale_by_adam8bit(min_8bit_size=256)
    >>> state = tx.init({'w': jnp.zeros((4, 256)), 'b': jnp.zeros(4)})
    >>> state.mu['w'].codes.dtype, state.mu['w'].scale.shape, state.mu['b'].dtype
    (dtype('uint8'), (4, 1), dtype('float32'))
    >>> update = jax.jit(tx.update)  # one compiled step, as in training
    >>> updates, state = update({'w': jnp.ones((4, 256)), 'b': -jnp.ones(4)}, state)
    >>> updates['b']  # the first step is sign(g), as for float32 Adam
    Array([-1., -1., -1., -1.], dtype=float32)

  References:
    Dettmers, Lewis, Shleifer & Zettlemoyer, `8-bit Optimizers via Block-wise
    Quantization <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.

    Kingma & Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, ICLR 2015.
  """
  return scale_by_adam(
      b1, b2, eps, eps_root, nesterov=nesterov,
      moments=Blockwise8bit(block_size=block_size, min_size=min_8bit_size),
  )


def adam8bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    nesterov: bool = False,
    block_size: Optional[int] = None,
    min_8bit_size: Optional[int] = None,
    update_clipping: bool = False,
    cautious: bool = False,
    param_rounding: str = 'nearest',
) -> optax.GradientTransformationExtraArgs:
  r"""Adam with 8-bit blockwise moments: about 2.03 bytes of state per parameter.

  :func:`scale_by_adam8bit` followed by ``optax.scale_by_learning_rate``: the
  update :math:`-\alpha_t \hat m_t / (\sqrt{\hat v_t + \bar\varepsilon} +
  \varepsilon)` of :func:`adamfx.adam`, with ``mu`` and ``nu`` kept between
  steps as uint8 codes plus one float32 scale per block of ``block_size``.

  Args:
    learning_rate: :math:`\alpha`, a number >= 0 or an optax schedule.
    b1: decay of the first moment, in [0, 1); default 0.9.
    b2: decay of the second moment, in [0, 1); default 0.999.
    eps: added to the root of the second moment, >= 0; default 1e-8.
    eps_root: added inside the root, >= 0; default 0.
    nesterov: NAdam's momentum.
    block_size: elements per quantization block; default (None) 256.
    min_8bit_size: leaves with fewer elements keep float32 moments; default
      (None) 4096. Both are static: None defaults keep them out of
      ``optax.inject_hyperparams``' arrays (set either there with
      ``static_args``).
    update_clipping: StableAdamW's per-tensor update clipping, on the
      dequantized new second moment (see :func:`adamfx.adam`).
    cautious: cautious updates (see :func:`adamfx.adam`).
    param_rounding: ``'nearest'`` (default), ``'kahan'`` or ``'stochastic'``, as in :func:`adam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    ValueError: for hyperparameters outside their ranges.
    TypeError: for a learning rate that is neither a number nor a schedule.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import adamfx
    >>> loss = lambda w: jnp.sum((w - 3.0) ** 2)
    >>> params = jnp.zeros(8192)
    >>> tx = adamfx.adam8bit(learning_rate=0.1)
    >>> state = tx.init(params)
    >>> state[0].mu.codes.nbytes + state[0].mu.scale.nbytes  # vs 32768 in float32
    8320
    >>> step = jax.jit(tx.update)
    >>> for _ in range(200):
    ...   updates, state = step(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(jnp.allclose(params, 3.0, atol=2e-2))
    True

  References:
    Dettmers, Lewis, Shleifer & Zettlemoyer, `8-bit Optimizers via Block-wise
    Quantization <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.
  """
  return adam(
      learning_rate, b1, b2, eps, eps_root, nesterov=nesterov,
      update_clipping=update_clipping, cautious=cautious,
      moments=Blockwise8bit(block_size=block_size, min_size=min_8bit_size),
      param_rounding=param_rounding,
  )


def adamw8bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: None = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Optional[Any] = None,
    *,
    nesterov: bool = False,
    block_size: Optional[int] = None,
    min_8bit_size: Optional[int] = None,
    update_clipping: bool = False,
    cautious: bool = False,
    decouple_lr: bool = False,
    max_lr: Optional[Any] = None,
    param_rounding: str = 'nearest',
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW with 8-bit blockwise moments (see :func:`adam8bit`, :func:`adamfx.adamw`).

  .. math::

    \theta_t \leftarrow \theta_{t-1} - \alpha_t \left(\hat m_t /
      (\sqrt{\hat v_t + \bar\varepsilon} + \varepsilon)
      + \lambda \theta_{t-1}\right)

  Args:
    learning_rate: :math:`\alpha`, a number >= 0 or an optax schedule.
    b1: decay of the first moment, in [0, 1); default 0.9.
    b2: decay of the second moment, in [0, 1); default 0.999.
    eps: added to the root of the second moment, >= 0; default 1e-8.
    eps_root: added inside the root, >= 0; default 0.
    mu_dtype: None (8-bit moments have no dtype); here so that the
      arguments keep :func:`adamw`'s (and optax's) positions.
    weight_decay: :math:`\lambda` >= 0, or a schedule; default 1e-4.
    mask: a tree of booleans (or a function of the params returning one)
      selecting the leaves to decay.
    nesterov: NAdamW's momentum.
    block_size: elements per quantization block; default (None) 256.
    min_8bit_size: leaves with fewer elements keep float32 moments; default
      (None) 4096. Both are static: None defaults keep them out of
      ``optax.inject_hyperparams``' arrays (set either there with
      ``static_args``).
    update_clipping: StableAdamW's per-tensor update clipping, on the
      dequantized new second moment (see :func:`adamfx.adam`).
    cautious: cautious updates (see :func:`adamfx.adam`).
    decouple_lr: fully decoupled weight decay, ``(lr_t / max_lr) * wd * p``
      (see :func:`adamfx.adamw`).
    max_lr: the peak learning rate for ``decouple_lr``; default: the
      learning rate (a number); required with a schedule.
    param_rounding: ``'nearest'`` (default), ``'kahan'`` or ``'stochastic'``, as in :func:`adam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  Raises:
    ValueError: for hyperparameters outside their ranges.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import adamfx
    >>> tx = adamfx.adamw8bit(1e-2, weight_decay=0.1)
    >>> params = {'w': jnp.ones(2)}
    >>> updates, _ = jax.jit(tx.update)({'w': jnp.zeros(2)}, tx.init(params), params)
    >>> updates['w']
    Array([-0.001, -0.001], dtype=float32)

  References:
    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.
  """
  return adamw(
      learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nesterov=nesterov,
      update_clipping=update_clipping, cautious=cautious, decouple_lr=decouple_lr,
      max_lr=max_lr,
      moments=Blockwise8bit(block_size=block_size, min_size=min_8bit_size),
      param_rounding=param_rounding,
  )


# Arguments that change what the state is or how it is laid out, not a value
# of the update: kept static by :func:`inject_hyperparams` without being named.


def stable_adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-6,
    weight_decay: ScalarOrSchedule = 1e-2,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    *,
    eps_root: float = 0.0,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
    cautious: bool = False,
    decouple_lr: bool = False,
    max_lr: Optional[Any] = None,
    param_rounding: str = 'nearest',
) -> optax.GradientTransformationExtraArgs:
  r"""StableAdamW: AdamW with per-tensor update clipping (optimi's ``StableAdamW``).

  Loss spikes follow steps where the second moment underestimates the
  squared gradient (after a calm phase the gradient's scale jumps, and
  :math:`\hat v_t` lags for a few steps at large :math:`\beta_2`): Adam's
  step then grows to several times the learning rate. StableAdamW divides
  each tensor's learning rate by the RMS of :math:`g_t^2 / \hat v_t` when it
  exceeds 1, which keeps the step within the learning rate without global
  gradient clipping (Wortsman et al. 2023, Algorithm 1, with AdaFactor's
  update clipping).

  .. math::

    \begin{align*}
      \mathrm{RMS}_t &= \sqrt{\mathrm{mean}\left(g_t^2 /
        \max(\hat v_t, \varepsilon^2)\right)} \quad \text{(per tensor)} \\
      \alpha'_t &= \alpha_t / \max(1, \mathrm{RMS}_t) \\
      \theta_t &\leftarrow \theta_{t-1} - \alpha'_t \left(\hat m_t /
        (\sqrt{\hat v_t + \bar\varepsilon} + \varepsilon) + \lambda
        \theta_{t-1}\right)
    \end{align*}

  with :math:`\hat m_t, \hat v_t` Adam's bias-corrected moments (optimi keeps
  them debiased in its state; equal in exact arithmetic), :math:`\lambda`
  the ``weight_decay`` (with ``decouple_lr=True``: :math:`\lambda /
  \alpha_{\max}`). This is :func:`adamw` with ``update_clipping=True`` and
  optimi's defaults (``b2=0.99``, ``eps=1e-6``, ``weight_decay=1e-2``); every
  member takes ``update_clipping=True`` too.

  Args:
    learning_rate: :math:`\alpha`, a number >= 0 or an optax schedule.
    b1: decay of the first moment, in [0, 1); default 0.9.
    b2: decay of the second moment, in [0, 1); default 0.99.
    eps: added to the root of the second moment, and squared, the floor of
      :math:`\hat v_t` in the RMS, >= 0; default 1e-6.
    weight_decay: :math:`\lambda` >= 0, or a schedule; default 1e-2.
    mask: a tree of booleans (or a function of the params) selecting the
      leaves to decay, as in ``optax.add_decayed_weights``.
    eps_root: added inside the root, >= 0; default 0.
    mu_dtype: storage dtype of the first moment; default: the params' dtype.
    nu_dtype: storage dtype of the second moment; default: the params' dtype.
    cautious: cautious updates as well (see :func:`adam`).
    decouple_lr: fully decoupled weight decay, ``(lr_t / max_lr) * wd * p``
      scaled by the clip factor too (optimi's ``decouple_lr``).
    max_lr: the peak learning rate for ``decouple_lr``, > 0; default: the
      learning rate (a number); required with a schedule.
    param_rounding: ``'nearest'`` (default), ``'kahan'`` or ``'stochastic'``, as in :func:`adam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.
    Its state is :func:`adamw`'s.

  Raises:
    ValueError: as :func:`adamw`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adamfx
    >>> params = {'w': jnp.ones(4)}
    >>> tx = adamfx.stable_adamw(1e-2, weight_decay=0.0)
    >>> state = tx.init(params)
    >>> calm = {'w': jnp.full(4, 1e-3)}
    >>> for _ in range(50):
    ...   _, state = tx.update(calm, state, params)
    >>> spike = {'w': jnp.full(4, 1.0)}  # a gradient 1000x the calm one
    >>> updates, state = tx.update(spike, state, params)
    >>> bool(jnp.all(jnp.abs(updates['w']) <= 1e-2))  # within the learning rate
    True

  References:
    Wortsman, Dettmers, Zettlemoyer, Morcos, Farhadi & Schmidt, `Stable and
    low-precision training for large-scale vision-language models
    <https://arxiv.org/abs/2304.13013>`_, NeurIPS 2023.

    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear
    Memory Cost <https://arxiv.org/abs/1804.04235>`_, ICML 2018.
  """
  return adamw(
      learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask,
      nu_dtype=nu_dtype, update_clipping=True, cautious=cautious,
      decouple_lr=decouple_lr, max_lr=max_lr,
      param_rounding=param_rounding,
  )
