r"""``adamfx.MultiSteps``: gradient accumulation that costs its accumulator only.

``optax.MultiSteps`` runs the wrapped optimiser at every mini-step and keeps
its new state only at the k-th (``jnp.where`` over the whole inner state,
inside a ``lax.cond`` on skipping): the new and the old moments are both
live, and XLA copies the old ones so that the update can still read them.
Measured on a donated, jitted step that is several bytes per parameter on
top of the accumulator (see the memory guide).

Here the wrapped optimiser runs only at the k-th mini-step, inside a
``lax.cond`` whose other branch passes the state through untouched (no copy),
and the update it returns is written into the accumulator's own buffer: the
accumulator is spent once its mean has been read, so the update needs no
buffer of its own. What the caller gets back is ``where(emit, acc, 0)``,
which XLA fuses into ``optax.apply_updates``. The next mini-step starts the
mean afresh from its gradient (``mini_step == 0``), so the stale buffer is
never read.

Two accumulators beyond optax's float32:

* ``acc_dtype=jnp.bfloat16`` keeps the running mean in 2 bytes per parameter
  with *stochastic rounding* (:mod:`adamfx._core.rounding`'s counter-based bits):
  round-to-nearest stalls (a mean of 1.0s and 1.004s stays 1.0), stochastic
  rounding is unbiased. A float32 update would have no spent buffer of its
  size here, and a ``lax.cond`` returning it takes a fresh one (4 bytes per
  parameter, the k-th step's peak on a small batch): instead the mean is
  rounded into the accumulator's buffer, the wrapped optimiser runs in a
  ``lax.while_loop`` of zero or one trip (whose carry is updated in place)
  and its update is rounded stochastically to bfloat16 into that same
  buffer, then returned in its own dtype.
* ``accumulate='optimizer'`` keeps no accumulator at all: every micro-batch
  gradient goes straight into the wrapped optimiser's state (its moments and
  its count advance at every mini-step), and only the k-th update is applied
  -- the rule of optimi's ``optimizer_accumulation`` (Zhang et al., 2023).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import Optional
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamfx._core import rounding as _rounding
from adamfx._sparse.lazy import RowSparse

MultiStepsState = optax.MultiStepsState

_MODES = ('gradients', 'optimizer')
# Added to a leaf's index for the accumulator's rounding bits, so they are
# independent of the bits a bfloat16 second moment of the same leaf uses.
_SALT = 0x5A3C
_SALT_UPDATE = 0x3C5A


def _is_sparse(x: Any) -> bool:
  return isinstance(x, RowSparse)


def _is_leaf(x: Any) -> bool:
  return x is None or isinstance(x, RowSparse)


def _safe_increment(x: jax.Array) -> jax.Array:
  top = jnp.iinfo(x.dtype).max
  return jnp.where(x < top, x + jnp.ones([], x.dtype), x)


def _promote(*dtypes: Any) -> Any:
  """The smallest dtype holding all ``dtypes`` (JAX's standard lattice, whatever
  the promotion mode: this only picks a dtype to cast to)."""
  with jax.numpy_dtype_promotion('standard'):
    return jnp.dtype(jnp.result_type(*dtypes))


def _acc_dtype_of(param_dtype: Any, acc_dtype: Any) -> Any:
  """The accumulator's dtype for a leaf: ``acc_dtype`` or >= float32."""
  if acc_dtype is not None:
    if jnp.issubdtype(param_dtype, jnp.complexfloating):
      return _promote(param_dtype, jnp.complex64)
    return jnp.dtype(acc_dtype)
  if jnp.issubdtype(param_dtype, jnp.inexact):
    return _promote(param_dtype, jnp.float32)
  return jnp.dtype(jnp.float32)


class MultiSteps:
  r"""Accumulates gradients over mini-steps: optax's ``MultiSteps``, lean.

  A drop-in for :class:`optax.MultiSteps` (same constructor, ``init``,
  ``update``, ``gradient_transformation()``, ``has_updated`` and state,
  :class:`optax.MultiStepsState`) that adds nothing to a donated, jitted
  training step but its accumulator. Over ``k`` mini-steps the gradients
  :math:`g_1 \dots g_k` are averaged as optax does (Welford's running mean,
  in float32):

  .. math::

    a_n = a_{n-1} + (g_n - a_{n-1}) / n, \qquad a_1 = g_1,

  and at the k-th mini-step the wrapped optimiser ``opt`` is called once on
  :math:`a_k` (on :math:`k a_k` with ``use_grad_mean=False``); the other
  mini-steps return zero updates and leave ``opt``'s state untouched. With
  float32 accumulation the numbers are optax's.

  With ``accumulate='optimizer'`` there is no accumulator: each mini-step
  calls ``opt`` on its own gradient :math:`g_n` and keeps the new state, and
  the update of the k-th call is returned (zeros before it). This is optimi's
  ``optimizer_accumulation``: the moments see k gradients of a micro-batch
  rather than one of the mean, so :math:`\mu` decays by :math:`\beta_1^k`
  per applied step and weights recent micro-batches more (:math:`\nu` holds
  :math:`\overline{g^2}` rather than :math:`\bar g^2`, larger by the
  micro-batches' variance), the count (bias correction, schedules inside
  ``opt``) advances k per applied step, and a weight decay inside ``opt`` is
  applied once per applied step when it is part of the update (AdamW) but
  at every mini-step when it is added to the gradient. Not the numbers of
  gradient accumulation; see the memory guide for its measured quality.

  Args:
    opt: the wrapped :class:`optax.GradientTransformation` (any: every adamfx
      member, an ``optax.chain``, ...).
    every_k_schedule: the number of mini-steps per update, an ``int >= 1``
      or a function of the update count (``gradient_step``) returning one.
    use_grad_mean: ``True`` (default): ``opt`` sees the mean of the
      mini-steps' gradients; ``False``: their sum.
    should_skip_update_fn: optional ``fn(updates, gradient_step, params) ->
      (bool scalar, skip_state)``, as :func:`optax.skip_not_finite`: a
      mini-step it rejects changes nothing but ``skip_state`` and returns
      zeros.
    acc_dtype: dtype of the accumulator (keyword-only): ``None`` (default)
      for float32 (the params' dtype where that is wider: float64,
      complex); ``jnp.bfloat16`` or ``jnp.float16`` for half the bytes,
      accumulated with stochastic rounding (unbiased; the bits are hashed
      from the counts, so runs are reproducible). With these the wrapped
      optimiser sees the mean as stored (rounded) and its update is rounded
      stochastically to bfloat16 (unbiased, a relative error below one
      bfloat16 ulp, ``2**-7``) before it is returned: the price of a step
      that holds nothing beyond the 2-byte accumulator (see the memory
      guide).
    accumulate: ``'gradients'`` (default) or ``'optimizer'`` (no
      accumulator; see above).
    accumulator_dtype: optax's name of ``acc_dtype``, accepted so that code
      written for optax runs unchanged.

  Raises:
    ValueError: for an ``every_k_schedule`` int below 1, an ``accumulate``
      other than the two modes, an ``acc_dtype`` that is not a real float
      of 2 bytes or more (float8) or one given with
      ``accumulate='optimizer'`` (which has no accumulator); at ``update``,
      for gradients not shaped like the params and for
      :class:`adamfx.RowSparse` gradients in ``'gradients'`` mode
      (their rows vary from mini-step to mini-step: use
      ``accumulate='optimizer'``, which feeds them to ``lazy_adam`` as they
      come).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import adamfx
    >>> ms = adamfx.MultiSteps(adamfx.adam(0.1), every_k_schedule=2)
    >>> params = jnp.array([1.0, 2.0])
    >>> state = ms.init(params)
    >>> u, state = ms.update(jnp.array([1.0, 1.0]), state, params)
    >>> u, bool(ms.has_updated(state))
    (Array([0., 0.], dtype=float32), False)
    >>> u, state = ms.update(jnp.array([3.0, -1.0]), state, params)
    >>> u, bool(ms.has_updated(state))
    (Array([-0.1, -0. ], dtype=float32), True)

  .. warning::
    With a float32 (or wider) accumulator, after a mini-step that updated,
    ``state.acc_grads`` holds that update (its buffer is reused for it,
    which is what keeps the step lean) where optax's holds zeros; the next
    mini-step starts the mean from its own gradient and never reads it (a
    16-bit accumulator holds zeros, as optax's). A ``should_skip_update_fn``
    needs the whole gradient before it decides, so every micro-gradient is
    live at once.

  References:
    Zhang et al., `Adam Accumulation to Reduce Memory Footprints of both
    Activations and Gradients for Large-scale DNN Training
    <https://arxiv.org/abs/2305.19982>`_, 2023.
  """

  def __init__(
      self,
      opt: optax.GradientTransformation,
      every_k_schedule: Union[int, Callable[[jax.Array], Any]],
      use_grad_mean: bool = True,
      should_skip_update_fn: Optional[Callable[..., Any]] = None,
      *,
      acc_dtype: Any = None,
      accumulate: str = 'gradients',
      accumulator_dtype: Any = None,
  ):
    if accumulate not in _MODES:
      raise ValueError(
          f"`accumulate` must be one of {_MODES}, got {accumulate!r}.")
    if accumulator_dtype is not None:
      if acc_dtype is not None:
        raise ValueError(
            '`acc_dtype` and `accumulator_dtype` (its optax name) were both given:'
            ' pass one.')
      acc_dtype = accumulator_dtype
    if acc_dtype is not None:
      if accumulate == 'optimizer':
        raise ValueError(
            f"`acc_dtype` must be None with accumulate='optimizer' (it keeps no"
            f' accumulator), got {acc_dtype!r}.')
      try:
        dt = jnp.dtype(acc_dtype)
      except TypeError:
        dt = None
      if dt is None or not jnp.issubdtype(dt, jnp.floating) or dt.itemsize < 2:
        raise ValueError(
            '`acc_dtype` must be a real float dtype of 2 bytes or more (float32,'
            f' bfloat16, float16, float64), got {acc_dtype!r}.')
      acc_dtype = dt
    if isinstance(every_k_schedule, (bool, np.bool_)) or (
        isinstance(every_k_schedule, (int, np.integer)) and every_k_schedule < 1):
      raise ValueError(
          f'`every_k_schedule` must be an int >= 1 or a schedule, got {every_k_schedule!r}.')
    if isinstance(every_k_schedule, (int, np.integer)):
      k = int(every_k_schedule)
      self._every_k_schedule = lambda step: k
    elif callable(every_k_schedule):
      self._every_k_schedule = every_k_schedule
    else:
      raise ValueError(
          f'`every_k_schedule` must be an int >= 1 or a schedule, got {every_k_schedule!r}.')
    self._opt = optax.with_extra_args_support(opt)
    self._use_grad_mean = bool(use_grad_mean)
    self._skip_fn = should_skip_update_fn
    self._acc_dtype = acc_dtype
    self._mode = accumulate
    # Called eagerly, the update runs as one compiled call (its lax.cond's
    # branches are new closures at every call, which eager dispatch would
    # compile again each time).
    self._eager = jax.jit(self._update)

  @property
  def inner_opt(self) -> optax.GradientTransformationExtraArgs:
    """The wrapped transformation (as ``optax.MultiSteps.inner_opt``)."""
    return self._opt

  def init(self, params: Any) -> MultiStepsState:
    """The initial :class:`optax.MultiStepsState` (counts 0, a zero accumulator)."""
    gradient_step = jnp.zeros([], jnp.int32)
    if self._mode == 'optimizer':
      acc = ()
    else:
      acc = jax.tree.map(
          lambda p: jnp.zeros_like(p, _acc_dtype_of(jnp.result_type(p), self._acc_dtype)),
          params)
    skip_state = ()
    if self._skip_fn is not None:
      _, skip_state = self._skip_fn(optax.tree.zeros_like(params), gradient_step, params)
    return MultiStepsState(
        mini_step=jnp.zeros([], jnp.int32), gradient_step=gradient_step,
        inner_opt_state=self._opt.init(params), acc_grads=acc, skip_state=skip_state)

  def has_updated(self, state: Any) -> jax.Array:
    """Whether the last ``update`` applied the wrapped optimiser's step."""
    return jnp.logical_and(state.mini_step == 0, state.gradient_step > 0)

  def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
    """This wrapper as an :class:`optax.GradientTransformationExtraArgs`."""
    return optax.GradientTransformationExtraArgs(init=self.init, update=self.update)

  # ------------------------------------------------------------------ update

  def _skip(self, updates, state, params):
    if self._skip_fn is None:
      return None, state.skip_state
    skip, skip_state = self._skip_fn(updates, state.gradient_step, params)
    skip = jnp.asarray(skip)
    if (skip.dtype, skip.shape) != (jnp.bool_, ()):
      raise ValueError(
          '`should_skip_update_fn` must return a boolean scalar array, got dtype'
          f' {skip.dtype} and shape {skip.shape}.')
    return skip, skip_state

  def _counts(self, state, skip, k):
    emit = state.mini_step == k - 1
    mini = _safe_increment(state.mini_step) % k
    if skip is not None:
      emit = jnp.logical_and(emit, jnp.logical_not(skip))
      mini = jnp.where(skip, state.mini_step, mini)
    gradient_step = jnp.where(emit, _safe_increment(state.gradient_step), state.gradient_step)
    return emit, mini, gradient_step

  def update(
      self, updates: Any, state: MultiStepsState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, MultiStepsState]:
    """Accumulates ``updates``; every k-th call returns the wrapped optimiser's update.

    Args:
      updates: the gradients of this mini-step, shaped like the params.
      state: the state from :meth:`init` or the previous ``update``.
      params: the params (passed on to the wrapped optimiser and the skip
        function).
      **extra_args: passed on to the wrapped optimiser.

    Returns:
      ``(updates, state)``: zeros except at the k-th mini-step.
    """
    leaves = jax.tree.leaves((updates, state, params, extra_args))
    if any(isinstance(x, jax.core.Tracer) for x in leaves) or not all(
        isinstance(x, (jax.Array, np.ndarray, np.generic, float, int, complex))
        for x in jax.tree.leaves(extra_args)):
      return self._update(updates, state, params, **extra_args)
    return self._eager(updates, state, params, **extra_args)

  def _update(self, updates, state, params=None, **extra_args):
    k = jnp.asarray(self._every_k_schedule(state.gradient_step)).astype(jnp.int32)
    skip, skip_state = self._skip(updates, state, params)
    emit, mini, gradient_step = self._counts(state, skip, k)
    if self._mode == 'optimizer':
      out, inner = self._update_optimizer(updates, state, params, extra_args, skip, emit, k)
      acc = ()
    else:
      out, inner, acc = self._update_gradients(
          updates, state, params, extra_args, skip, emit, k)
    return out, MultiStepsState(
        mini_step=mini, gradient_step=gradient_step, inner_opt_state=inner,
        acc_grads=acc, skip_state=skip_state)

  def _check(self, updates, acc):
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_leaf)
    for path, g in flat:
      if _is_sparse(g):
        raise ValueError(
            f'MultiSteps: the gradient at {jax.tree_util.keystr(path)} is a RowSparse;'
            " accumulate='gradients' cannot sum rows that differ from mini-step to"
            " mini-step into a fixed-size state. Use accumulate='optimizer' (each"
            " micro-batch's rows go straight into lazy_adam's moments) or pass"
            ' g.todense().')
    want = jax.tree.structure(acc, is_leaf=_is_leaf)
    if treedef != want:
      raise ValueError(
          f'MultiSteps: the gradients\' tree {treedef} is not the params\' tree {want}.')
    for (path, g), a in zip(flat, jax.tree.leaves(acc, is_leaf=_is_leaf)):
      if g is not None and a is not None and jnp.shape(g) != jnp.shape(a):
        raise ValueError(
            f'MultiSteps: the gradient at {jax.tree_util.keystr(path)} has shape'
            f' {jnp.shape(g)}, its param has shape {jnp.shape(a)}.')

  def _update_gradients(self, updates, state, params, extra_args, skip, emit, k):
    self._check(updates, state.acc_grads)
    a_leaves, a_def = jax.tree.flatten(state.acc_grads, is_leaf=_is_leaf)
    g_leaves = jax.tree.leaves(updates, is_leaf=_is_leaf)
    first = state.mini_step == 0
    n = state.mini_step + 1

    def as_grads(ms):
      out = []
      for m, g in zip(ms, g_leaves):
        if m is not None and not self._use_grad_mean:
          m = m * k.astype(m.dtype)
        out.append(None if m is None else m.astype(g.dtype))
      return jax.tree.unflatten(a_def, out)

    call = lambda ms, inner: self._opt.update(as_grads(ms), inner, params, **extra_args)

    # The running mean is kept in >= float32 (the accumulator's dtype if
    # wider) and, at the k-th mini-step, in a dtype that also holds the
    # update: the update is written over the mean (see the module's
    # docstring), so it needs no buffer of its own.
    def wide(a, g):
      return _promote(a.dtype, jnp.float32, g.dtype)

    probe = [None if a is None else jax.ShapeDtypeStruct(a.shape, wide(a, g))
             for a, g in zip(a_leaves, g_leaves)]
    shapes = jax.eval_shape(call, probe, state.inner_opt_state)[0]
    u_leaves, u_def = jax.tree.flatten(shapes, is_leaf=_is_leaf)
    if u_def != a_def or any(
        u is None or _is_sparse(u) or u.shape != a.shape
        for u, a in zip(u_leaves, a_leaves) if a is not None):
      raise ValueError(
          'MultiSteps: the wrapped optimiser returns updates not shaped like the'
          " params; accumulate='optimizer' makes no assumption on them.")
    dtypes = [None if a is None else _promote(wide(a, g), u.dtype)
              for a, g, u in zip(a_leaves, g_leaves, u_leaves)]

    def mean(g, a, dt):
      g, a32 = g.astype(dt), a.astype(dt)
      # Welford's mean, as optax; the first mini-step takes its gradient as
      # it is (the accumulator may hold the previous update).
      m = jnp.where(first, g, a32 + (g - a32) / n.astype(dt))
      return m if skip is None else jnp.where(skip, a32, m)

    if any(a is not None and a.dtype != dt and a.dtype.itemsize == 2
           for a, dt in zip(a_leaves, dtypes)):
      out, inner, acc = self._update_narrow(
          call, g_leaves, a_leaves, u_leaves, dtypes, mean, state, emit)
      return jax.tree.unflatten(u_def, out), inner, jax.tree.unflatten(a_def, acc)

    means = [None if a is None else mean(g, a, dt)
             for g, a, dt in zip(g_leaves, a_leaves, dtypes)]

    def emit_branch(ms, inner):
      u, new_inner = call(ms, inner)
      u = jax.tree.leaves(u, is_leaf=_is_leaf)
      return [None if m is None else uu.astype(m.dtype) for uu, m in zip(u, ms)], new_inner

    carry, inner = jax.lax.cond(
        emit, emit_branch, lambda ms, inner: (ms, inner), means, state.inner_opt_state)

    salt = (state.gradient_step.astype(jnp.uint32) * jnp.uint32(0x9E3779B1)
            + state.mini_step.astype(jnp.uint32))

    def store(c, a, i):
      if c.dtype == a.dtype:
        return c  # after the k-th mini-step: the update, never read again
      if jnp.issubdtype(a.dtype, jnp.floating) and _rounding._narrower(c.dtype, a.dtype):
        c = _rounding.stochastic_round(c, a.dtype, _rounding.random_bits(c.shape, salt, i + _SALT))
      return jnp.where(emit, jnp.zeros([], a.dtype), c.astype(a.dtype))

    acc = [None if a is None else store(c, a, i)
           for i, (c, a) in enumerate(zip(carry, a_leaves))]
    out = [None if u is None else jnp.where(emit, c.astype(u.dtype), jnp.zeros([], u.dtype))
           for u, c in zip(u_leaves, carry)]
    return jax.tree.unflatten(u_def, out), inner, jax.tree.unflatten(a_def, acc)

  def _update_narrow(self, call, g_leaves, a_leaves, u_leaves, dtypes, mean, state, emit):
    """The k-th mini-step's update without a buffer of the update's dtype.

    A 2-byte accumulator (bfloat16, float16) leaves no spent buffer for a
    float32 update to be written into, and returning it from a ``lax.cond``
    takes a fresh one (4 bytes per param, the k-th step's peak on a small
    batch). Here the mean is rounded stochastically into the accumulator's
    own buffer as each micro-gradient arrives (each is spent as soon as the
    backward pass has made it, as in a step without accumulation), the
    wrapped optimiser runs in a ``lax.while_loop`` of zero or one trip whose
    carry, one buffer in and out, is the accumulator, and the update is
    rounded stochastically to bfloat16 into it (unbiased, a relative error
    below ``2**-7``; as bfloat16 bits in a float16 accumulator, whose range
    would lose small updates). The accumulator is zeroed once the update has
    been read. Leaves whose accumulator has the update's dtype (complex
    leaves) carry their mean and update unrounded.
    """
    salt = (state.gradient_step.astype(jnp.uint32) * jnp.uint32(0x9E3779B1)
            + state.mini_step.astype(jnp.uint32))

    def rnd(x, dtype, i):
      if _rounding._narrower(x.dtype, dtype):
        x = x.astype(_promote(x.dtype, jnp.float32))
        return _rounding.stochastic_round(x, dtype, _rounding.random_bits(x.shape, salt, i))
      return x.astype(dtype)

    def carrier(a, dt):
      """The dtype the update is rounded to in the accumulator's buffer."""
      if a.dtype == dt or jnp.finfo(a.dtype).maxexp >= jnp.finfo(dt).maxexp:
        return a.dtype
      return jnp.dtype(jnp.bfloat16)  # same 2 bytes as float16, float32's range

    kinds = [None if a is None else carrier(a, dt) for a, dt in zip(a_leaves, dtypes)]
    xs = [None if a is None else rnd(mean(g, a, dt), a.dtype, i + _SALT)
          for i, (g, a, dt) in enumerate(zip(g_leaves, a_leaves, dtypes))]

    def body(c):
      _, xs, inner = c
      ms = [None if x is None else x.astype(dt) for x, dt in zip(xs, dtypes)]
      u, new_inner = call(ms, inner)
      out = []
      for i, (uu, x, kind) in enumerate(zip(jax.tree.leaves(u, is_leaf=_is_leaf), xs, kinds)):
        if x is not None:
          uu = jax.lax.bitcast_convert_type(rnd(uu, kind, i + _SALT_UPDATE), x.dtype)
        out.append(None if x is None else uu)
      return jnp.zeros([], jnp.bool_), out, new_inner

    _, xs, inner = jax.lax.while_loop(lambda c: c[0], body, (emit, xs, state.inner_opt_state))

    def read(x, kind, u):
      x = jax.lax.bitcast_convert_type(x, kind)
      return jnp.where(emit, x.astype(u.dtype), jnp.zeros([], u.dtype))

    acc = [None if x is None else jnp.where(emit, jnp.zeros([], x.dtype), x) for x in xs]
    out = [None if u is None else read(x, kind, u) for u, x, kind in zip(u_leaves, xs, kinds)]
    return out, inner, acc

  def _update_optimizer(self, updates, state, params, extra_args, skip, emit, k):
    grads = updates
    if not self._use_grad_mean:
      def scale(g):
        if _is_sparse(g):
          return RowSparse(g.indices, g.values * k.astype(g.values.dtype), g.num_rows)
        return None if g is None else g * k.astype(g.dtype)
      grads = jax.tree.map(scale, grads, is_leaf=_is_leaf)

    def zero_unless(x):
      if x is None:
        return None
      if _is_sparse(x):
        v = x.values
        return RowSparse(x.indices, jnp.where(emit, v, jnp.zeros([], v.dtype)), x.num_rows)
      return jnp.where(emit, x, jnp.zeros([], x.dtype))

    if skip is None:
      u, inner = self._opt.update(grads, state.inner_opt_state, params, **extra_args)
    else:
      call = lambda g, s: self._opt.update(g, s, params, **extra_args)
      shapes = jax.eval_shape(call, grads, state.inner_opt_state)[0]
      keep = lambda g, s: (jax.tree.map(
          lambda x: jnp.zeros(x.shape, x.dtype), shapes), s)
      u, inner = jax.lax.cond(skip, keep, call, grads, state.inner_opt_state)
    return jax.tree.map(zero_unless, u, is_leaf=_is_leaf), inner
