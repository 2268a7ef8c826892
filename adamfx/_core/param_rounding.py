r"""How a new param is rounded to a params dtype narrower than float32.

Training with bfloat16 params stores each new param with round-to-nearest:
an update smaller than half a bfloat16 ulp of the param (``2**-9`` of it)
is lost, so ``1.0 + 1e-3`` is ``1.0`` however often it is added, and
training stalls once the steps shrink below the params' ulps. Two fixes,
chosen per builder with ``param_rounding=`` (keyword-only on every builder;
``with_param_rounding`` is the one implementation they all call):

* ``'kahan'``: Kahan summation. A compensation buffer in the params' dtype
  (2 bytes per bfloat16 param) holds what the last rounding lost; the next
  step adds it back before rounding, so the params follow the exact running
  sum of the updates to about one ulp (Kahan 1965; optimi's ``kahan_sum``,
  torchdistx's AnyPrecisionAdamW).
* ``'stochastic'``: the new param is rounded up or down at random with the
  probabilities that make it exact in expectation (Gupta et al. 2015;
  Zamirai et al. 2020). No buffer: the bits are a hash of ``(step, leaf,
  element)``, as :mod:`adamfx._core.rounding` draws them for a 16-bit ``nu``
  (no key argument, the same numbers on every run).

``'nearest'`` (the default) is today's round-to-nearest: the builder's
transformation unchanged. Leaves whose dtype is not a real float narrower
than float32 (float32, float64, complex) are never touched, in any mode.

For the rounded leaves the inner transformation runs on float32 gradients,
so its update (Adam's step, the weight decay and the learning rate) is
computed in float32 and rounded once, into the new param. The update
returned is ``new_p - p`` in the params' dtype, so that
``optax.apply_updates(params, updates)`` (``p + u`` in the params' dtype,
rounded to nearest) lands exactly on the new param. That difference is
exact whenever ``new_p`` is within a factor 2 of ``p`` (Sterbenz), that is
for every step smaller than half the param. For larger jumps (a param
crossing zero) the param lands on ``round(p + round(new_p - p))`` instead,
which the step computes the same way (both are forced roundings): with
``'kahan'`` the compensation then takes up the difference, so nothing is
lost either way.

XLA is free to compute a bfloat16 expression in float32 and may then fold
``x - round(x)`` to 0 (jax issue 23007) or drop a pair of converts (openxla
issue 41605). Every rounding here is forced: round-to-nearest with
``lax.reduce_precision`` (or a cast straight into an optimization barrier,
which XLA cannot see through), stochastic rounding with integer bit
operations.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamfx._core import eager as _eager
from adamfx._core import numerics as _numerics
from adamfx._core import rounding as _rounding

MODES = ('nearest', 'kahan', 'stochastic')

# Added to a leaf's index for its param-rounding bits, so they are drawn
# independently of the same leaf's ``nu`` rounding bits at the same step.
_LEAF_SALT = 0x5EED


class ParamRoundingState(NamedTuple):
  """State of ``with_param_rounding``, the last link of the builder's chain.

  Attributes:
    step: int32 scalar, the number of updates so far (the stochastic
      rounding bits are hashed from it).
    compensation: with ``'kahan'``, a tree like the params with, for each
      leaf rounded (a real float narrower than float32), what the last
      rounding lost, in the params' dtype; ``None`` for the other leaves
      and for every leaf with ``'stochastic'``.
  """

  step: jax.Array
  compensation: Any


def check_mode(param_rounding: Any) -> str:
  """``param_rounding`` if it names a mode, else a ValueError naming the valid ones."""
  if not isinstance(param_rounding, str) or param_rounding not in MODES:
    raise ValueError(
        f'`param_rounding` must be one of {", ".join(repr(m) for m in MODES)},'
        f' got {param_rounding!r}.'
    )
  return param_rounding


def rounds(dtype: Any) -> bool:
  """Whether params of ``dtype`` are rounded by ``'kahan'``/``'stochastic'``.

  Real floats narrower than float32 (bfloat16, float16, float8s) are; float32,
  float64, complex and integer leaves are not.
  """
  dtype = jnp.dtype(dtype)
  return bool(
      jnp.issubdtype(dtype, jnp.floating)
      and jnp.finfo(dtype).nmant < jnp.finfo(jnp.float32).nmant
  )


def round_nearest(x: jax.Array, dtype: Any) -> jax.Array:
  """``x`` (float32) rounded to nearest in ``dtype``, still float32; forced.

  ``lax.reduce_precision`` is the rounding itself, not a pair of converts
  that XLA may fold away, so the result is ``dtype``'s number under ``jit``
  on every backend; casting it to ``dtype`` afterwards is exact.
  """
  info = jnp.finfo(dtype)
  return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


_is_none = _numerics.is_none


def _leaf_dtype(p: Any) -> Any:
  return getattr(p, 'dtype', None) or jnp.result_type(p)


def _rounded_leaf(mode, p, u, c, step, index):
  """``(update, new compensation)`` of one rounded leaf; ``u`` is float32
  (or, from the 8-bit members, the params' dtype).

  Kahan runs in three passes over memory, each in place: the update joins
  the compensation (``c1 = rn(c + u)``, into ``c``'s buffer), the update
  returned is read off the param and ``c1`` (into the gradient's buffer),
  and what that update leaves out becomes the new compensation (``c1 -
  update``, into ``c``'s buffer again). Optimization barriers keep XLA from
  fusing the passes into two loops that each read the param and the
  compensation while the other overwrites them: on donated buffers XLA
  would then copy both first (4 bytes per bfloat16 param).

  A bfloat16 update and new compensation are rounded by their casts alone,
  each straight into an optimization barrier, so XLA cannot hand their
  float32 values through (not even to the next step of a scan); the cast
  rounds to nearest as ``reduce_precision`` does, the same bits, and on
  XLA:CPU the step is compute-bound, so two ``reduce_precision`` less per
  element cut the Kahan step's CPU time by about an eighth. float16 keeps
  them (``reduce_precision`` flushes float16 subnormals to zero, the cast
  keeps them), and so does ``c1``: with both ``c`` and ``u`` NaN, a cast
  alone changes which sign the NaN takes.
  """
  dtype = jnp.dtype(p.dtype)
  f32 = jnp.float32
  p32 = p.astype(f32)
  u32 = u.astype(f32)
  if rounds(u.dtype):
    # A narrow update (8-bit members) is the rounded number it says it is:
    # under jit XLA may hand its float32 value through, unrounded, to this
    # float32 consumer (the convert pair folded; jax#23007).
    u32 = round_nearest(u32, u.dtype)
  if mode == 'kahan':
    c1 = round_nearest(c.astype(f32) + u32, dtype).astype(dtype)
    c1 = jax.lax.optimization_barrier(c1)
    new = round_nearest(p32 + c1.astype(f32), dtype)
  else:
    bits = _rounding.random_bits(p.shape, step, index + _LEAF_SALT)
    new = _rounding.stochastic_round_float32(p32 + u32, dtype, bits)
  # The update: apply_updates (p + update, rounded to nearest) lands on
  # ``new`` itself unless the difference is inexact (see the module doc).
  if mode == 'kahan':
    # float16 keeps reduce_precision: it flushes float16 subnormals to zero,
    # the cast keeps them.
    cast = jnp.finfo(dtype).nexp == jnp.finfo(f32).nexp
    update = new - p32
    update = jax.lax.optimization_barrier(
        (update if cast else round_nearest(update, dtype)).astype(dtype))
    # ``c1 - update`` is exact in float32 where the update is (then it is
    # ``p + c1 - new``, at most half an ulp of ``new``); stored to nearest.
    c = c1.astype(f32) - update.astype(f32)
    if cast:
      c = jax.lax.optimization_barrier(c.astype(dtype))
    else:
      c = round_nearest(c, dtype).astype(dtype)
  else:
    update = round_nearest(new - p32, dtype).astype(dtype)
  return update, c


def with_param_rounding(
    inner: optax.GradientTransformation,
    param_rounding: str = 'nearest',
    *,
    upcast_gradients: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""``inner`` with its new params rounded by ``param_rounding``.

  The builders' one implementation of ``param_rounding=`` (see the module
  docstring). ``inner`` must be the builder's whole update (learning rate and
  weight decay included): its update is added to the param here.

  .. math::

    \begin{align*}
      \text{kahan:}\quad t &\leftarrow p + (c + u), &
        p' &\leftarrow \mathrm{rn}(t), & c' &\leftarrow \mathrm{rn}(t - p') \\
      \text{stochastic:}\quad p' &\leftarrow \mathrm{sr}(p + u) & &
    \end{align*}

  computed in float32, with :math:`\mathrm{rn}` round-to-nearest and
  :math:`\mathrm{sr}` unbiased stochastic rounding to the params' dtype, and
  the update returned is :math:`\mathrm{rn}(p' - p)`.

  Args:
    inner: the builder's transformation.
    param_rounding: ``'nearest'`` (``inner`` itself is returned), ``'kahan'``
      or ``'stochastic'``.
    upcast_gradients: give ``inner`` float32 gradients for the rounded
      leaves, so its update is float32 (default). The 8-bit members pass
      False: their step writes the update into the gradient's own buffer,
      in the params' dtype (one rounding of the update, none of the param).

  Returns:
    A transformation whose state is ``(inner_state, ParamRoundingState)``;
    ``update`` needs ``params``.

  Raises:
    ValueError: for an unknown ``param_rounding``, or, at update time,
      without ``params``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from adamfx._core import param_rounding as _param_rounding
    >>> tx = _param_rounding.with_param_rounding(optax.sgd(1e-3), 'kahan')
    >>> p = jnp.ones(4, jnp.bfloat16)
    >>> state = tx.init(p)
    >>> step = jax.jit(tx.update)
    >>> for _ in range(1000):
    ...   u, state = step(-jnp.ones(4, jnp.bfloat16), state, p)
    ...   p = optax.apply_updates(p, u)
    >>> p  # 1 + 1000 * 1e-3, where round-to-nearest stays at 1
    Array([2, 2, 2, 2], dtype=bfloat16)
  """
  mode = check_mode(param_rounding)
  if mode == 'nearest':
    return inner

  def init_fn(params):
    inner_state = inner.init(params)

    def comp(p):
      if p is None or mode != 'kahan' or not rounds(_leaf_dtype(p)):
        return None
      return _numerics.zeros_like(p, _leaf_dtype(p))  # laid out like p

    compensation = jax.tree.map(comp, params, is_leaf=_is_none)
    return inner_state, ParamRoundingState(jnp.zeros([], jnp.int32), compensation)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          f'param_rounding={mode!r} needs the params: call update(grads, state, params).'
      )
    if not (isinstance(state, tuple) and len(state) == 2
            and isinstance(state[1], ParamRoundingState)):
      raise ValueError(
          f'param_rounding={mode!r}: the state must be (inner state,'
          f' ParamRoundingState), as init returns; got {type(state).__name__}.'
      )
    inner_state, own = state
    p_leaves, treedef = jax.tree.flatten(params, is_leaf=_is_none)
    g_leaves = treedef.flatten_up_to(updates)
    rounded = [p is not None and rounds(_leaf_dtype(p)) for p in p_leaves]
    if upcast_gradients:
      g_leaves = [
          g.astype(jnp.float32) if r and g is not None and hasattr(g, 'astype') else g
          for g, r in zip(g_leaves, rounded)
      ]
    grads = jax.tree.unflatten(treedef, g_leaves)
    new_updates, inner_state = _call(inner, grads, inner_state, params, extra_args)
    step = optax.safe_increment(own.step)
    u_leaves = treedef.flatten_up_to(new_updates)
    if mode == 'kahan':
      c_leaves = treedef.flatten_up_to(own.compensation)
    else:
      c_leaves = [None] * len(p_leaves)
    args = (p_leaves, u_leaves, c_leaves, step)
    # Eagerly, every leaf's rounding in one compiled call (the traced code).
    rounding = _compiled_round_leaves if _eager.eager(*args) else _round_leaves
    out_u, out_c = rounding(*args, mode=mode, rounded=tuple(rounded))
    compensation = jax.tree.unflatten(treedef, out_c) if mode == 'kahan' else own.compensation
    return (
        jax.tree.unflatten(treedef, out_u),
        (inner_state, ParamRoundingState(step, compensation)),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _round_leaves(p_leaves, u_leaves, c_leaves, step, *, mode, rounded):
  """``(updates, compensations)``, leaf by leaf: the ``rounded`` leaves through
  :func:`_rounded_leaf`, the others as they are."""
  out_u, out_c = [], []
  for i, (p, u, c, r) in enumerate(zip(p_leaves, u_leaves, c_leaves, rounded)):
    if not r or u is None:
      out_u.append(u)
      out_c.append(c)
      continue
    if hasattr(u, 'todense'):  # a row-sparse update (lazy_adam): dense here
      u = u.todense()
    u, c = _rounded_leaf(mode, jnp.asarray(p), jnp.asarray(u), c, step, i)
    out_u.append(u)
    out_c.append(c)
  return out_u, out_c


_compiled_round_leaves = jax.jit(_round_leaves, static_argnames=('mode', 'rounded'))


def _call(inner, grads, state, params, extra_args):
  if isinstance(inner, optax.GradientTransformationExtraArgs):
    return inner.update(grads, state, params, **extra_args)
  return inner.update(grads, state, params)


def kahan_init(
    tx: optax.GradientTransformation, params: Any, dtype: Any = jnp.bfloat16
) -> tuple[Any, Any]:
  """Starts a narrow-params Kahan run from wider params, keeping their low bits.

  Rounds every float32 (or wider) real leaf of ``params`` to nearest in
  ``dtype`` and initialises ``tx`` (built with ``param_rounding='kahan'``) on
  the rounded params, with each compensation starting at what the rounding
  dropped (``p - round(p)``, itself rounded to ``dtype``). The next steps
  then continue from the wide params to about one ulp of ``dtype``'s
  compensation, instead of from their rounded copies: use it to move a
  float32 checkpoint to bfloat16 params.

  Args:
    tx: a transformation built with ``param_rounding='kahan'``.
    params: the wide params (float32 or float64 leaves are converted; other
      leaves are kept as they are).
    dtype: the narrow params' dtype, a real float narrower than float32;
      default bfloat16.

  Returns:
    ``(narrow_params, state)``.

  Raises:
    ValueError: if ``dtype`` is not narrower than float32, or ``tx``'s state
      has no Kahan compensation (not built with ``param_rounding='kahan'``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import adamfx
    >>> tx = adamfx.adam(1e-3, param_rounding='kahan')
    >>> params, state = adamfx.kahan_init(tx, {'w': jnp.full(2, 1 + 2.0**-10)})
    >>> params['w'], state[1].compensation['w']  # 1 + 2**-10 = 1 + residual
    (Array([1, 1], dtype=bfloat16), Array([0.000976562, 0.000976562], dtype=bfloat16))
  """
  if not rounds(dtype):
    raise ValueError(
        f'`dtype` must be a real float narrower than float32 (bfloat16, float16),'
        f' got {jnp.dtype(dtype).name}.'
    )
  dtype = jnp.dtype(dtype)

  def is_wide(p):
    d = jnp.dtype(_leaf_dtype(p))
    return jnp.issubdtype(d, jnp.floating) and not rounds(d)

  def narrow(p):
    if p is None or not is_wide(p):
      return p
    return round_nearest(jnp.asarray(p).astype(jnp.float32), dtype).astype(dtype)

  def residual(p):
    if p is None or not is_wide(p):
      return None
    p32 = jnp.asarray(p).astype(jnp.float32)
    return round_nearest(p32 - round_nearest(p32, dtype), dtype).astype(dtype)

  narrow_params = jax.tree.map(narrow, params, is_leaf=_is_none)
  state = tx.init(narrow_params)
  residuals = jax.tree.map(residual, params, is_leaf=_is_none)
  found = []

  def fill(node):
    if not isinstance(node, ParamRoundingState) or node.compensation is None:
      return node
    leaves = jax.tree.leaves(node.compensation)
    if not leaves:
      return node
    found.append(True)
    comp = jax.tree.map(
        lambda c, r: c if r is None else r.astype(c.dtype),
        node.compensation, residuals, is_leaf=_is_none,
    )
    return node._replace(compensation=comp)

  state = jax.tree.map(fill, state, is_leaf=lambda x: isinstance(x, ParamRoundingState))
  if not found:
    raise ValueError(
        '`tx` keeps no Kahan compensation for these params: build it with'
        " param_rounding='kahan' (and a params dtype narrower than float32)."
    )
  return narrow_params, state
