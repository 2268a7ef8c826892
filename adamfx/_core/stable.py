r"""Stable steps: update clipping, cautious updates and fully decoupled decay.

Three options every Adam-family builder takes, written once here:

* ``update_clipping=True`` (StableAdamW, Wortsman et al. 2023): each
  tensor's learning rate is divided by :math:`\max(1, \mathrm{RMS}_t)`, with
  :math:`\mathrm{RMS}_t = \sqrt{\mathrm{mean}(g_t^2 / \max(\hat v_t,
  \varepsilon^2))}` over the tensor's elements, on the new bias-corrected
  second moment. The clipped rate scales the step and the decay.
* ``cautious=True`` (C-AdamW, Liang et al. 2024): the Adam direction
  :math:`u_t` is zeroed where it disagrees in sign with the gradient,
  :math:`\phi_t = 1[u_t g_t > 0]`, and the rest is rescaled per tensor by
  :math:`1 / \max(\mathrm{mean}(\phi_t), 10^{-3})`. The decay is not masked.
* ``decouple_lr=True, max_lr=...`` (Loshchilov & Hutter's fully decoupled
  decay, optimi's ``decouple_lr``): the decay is :math:`(\alpha_t /
  \alpha_{\max}) \lambda \theta`, not :math:`\alpha_t \lambda \theta`.

A step of a member with these options is then

.. math::

  \theta_t \leftarrow \theta_{t-1} - \frac{\alpha_t}{\max(1, \mathrm{RMS}_t)}
    \left(\frac{\phi_t \odot u_t}{\max(\mathrm{mean}(\phi_t), 10^{-3})}
    + \lambda' \theta_{t-1}\right), \qquad
  \lambda' = \lambda / \alpha_{\max} \text{ with decouple\_lr, else } \lambda

:func:`chain` runs a member's links (the Adam scaling, the decay, the
learning rate) with the mask after the scaling and the clip factor after the
decay, reading the gradient and the scaling's new state; the state is the
links' own (a plain ``optax.chain``'s), so checkpoints, ``inject_hyperparams``
and the diagnostics see the same state with or without the options.
"""

from __future__ import annotations

import functools
from typing import Any
from typing import NamedTuple
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from adamfx._core import checks as _checks
from adamfx._core import driver as _update
from adamfx._core import numerics as _numerics

# The floor of the cautious mask's mean: a tensor whose direction disagrees
# with its gradient almost everywhere is scaled by at most 1000.
CAUTIOUS_FLOOR = 1e-3


class Options(NamedTuple):
  """The per-tensor options of a member's step (static, hashable)."""

  update_clipping: bool = False
  cautious: bool = False

  @property
  def active(self) -> bool:
    return self.update_clipping or self.cautious


NONE = Options()  # no option: the member's plain chain


def options(update_clipping: Any, cautious: Any) -> Options:
  """Checked :class:`Options` (flags must be Python bools: they shape the step)."""
  for name, value in (('update_clipping', update_clipping), ('cautious', cautious)):
    if not isinstance(value, bool):
      raise TypeError(
          f'`{name}` must be a Python bool (True or False), got {value!r} of type'
          f' {type(value).__name__}: it decides the step\'s structure, so it cannot'
          ' be an array or be traced.'
      )
  return Options(update_clipping, cautious)


def _is_schedule(x: Any) -> bool:
  return callable(x) and not _checks._is_numeric_like(x)


def decoupled_weight_decay(
    weight_decay: Any, learning_rate: Any, decouple_lr: Any, max_lr: Any
) -> Any:
  r"""The weight decay to add to ``u`` before the learning rate: :math:`\lambda'`.

  With ``decouple_lr=False``, ``weight_decay`` itself (AdamW: the decay is
  :math:`\alpha_t \lambda \theta`). With ``decouple_lr=True``,
  ``weight_decay / max_lr`` (a schedule of the count if ``weight_decay`` is
  one), so that :math:`\alpha_t \lambda' \theta = (\alpha_t / \alpha_{\max})
  \lambda \theta`: optimi's ``decouple_lr``. ``max_lr`` defaults to a number
  (or array) ``learning_rate``, as in optimi.

  Raises:
    TypeError: if ``decouple_lr`` is not a bool.
    ValueError: if ``max_lr`` is given without ``decouple_lr``, missing with
      a schedule as learning rate, or (concrete) not a finite number > 0.
  """
  if not isinstance(decouple_lr, bool):
    raise TypeError(f'`decouple_lr` must be a Python bool, got {decouple_lr!r}.')
  if not decouple_lr:
    if max_lr is not None:
      raise ValueError(
          f'`max_lr`={max_lr!r} is only used with decouple_lr=True (the decay is'
          ' then scaled by learning_rate / max_lr); pass decouple_lr=True or drop'
          ' max_lr.'
      )
    return weight_decay
  if max_lr is None:
    if _is_schedule(learning_rate):
      raise ValueError(
          'decouple_lr=True with a schedule as `learning_rate` needs `max_lr`, the'
          ' schedule\'s peak value: the decay is (learning_rate(t) / max_lr) *'
          ' weight_decay * params. Pass e.g. max_lr=peak_value.'
      )
    max_lr = learning_rate
  if _is_schedule(max_lr):
    raise TypeError('`max_lr` must be a number or a scalar array, got a callable.')
  value = _checks._concrete_number(max_lr)
  if value is not None and not (0 < value < float('inf')):
    raise ValueError(
        f'`max_lr` must be a finite number > 0, got {value!r} (with decouple_lr=True'
        ' the decay is divided by it; it defaults to the learning rate).'
    )
  if _is_schedule(weight_decay):
    return lambda count: _divide(weight_decay(count), max_lr)
  return _divide(weight_decay, max_lr)


def _divide(x: Any, y: Any) -> Any:
  if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y)):
    return x / y
  x, y = jnp.asarray(x), jnp.asarray(y)
  dtype = _numerics.compute_dtype(x.dtype, y.dtype)
  return x.astype(dtype) / y.astype(dtype)


def _is_leaf(x: Any) -> bool:
  return x is None or type(x).__name__ in ('RowSparse', 'QuantizedArray')


def _is_sparse(x: Any) -> bool:
  return type(x).__name__ == 'RowSparse'


def _real_dtype(*dtypes: Any) -> Any:
  return _numerics.real_dtype(_numerics.compute_dtype(*dtypes))


def _second_moments(state: Any, treedef: Any) -> tuple[Any, list[Any], bool, bool]:
  """``(count, leaves of v, bias corrected?, squared?)`` of a scaling's new state.

  ``v`` is what the member divides by: ``nu_max`` under AMSGrad (already
  bias-corrected; that of a :class:`adamfx.FrameworkAdamState`, torch's and
  Keras's, is the max of the raw ``nu``, corrected here), AdaMax's infinity
  norm (to be squared, no correction), else ``nu``; 8-bit moments are
  dequantized.
  """
  nu_max = getattr(state, 'nu_max', None)
  v = state.nu if nu_max is None else nu_max
  leaves = treedef.flatten_up_to(v)
  leaves = [x.dequantize() if _is_quantized(x) else x for x in leaves]
  adamax = isinstance(state, _update.AdaMaxState)
  # By name: adamfx._porting.conventions imports this module.
  raw_max = type(state).__name__ == 'FrameworkAdamState'
  return state.count, leaves, (nu_max is not None and not raw_max) or adamax, adamax


# The per-leaf functions are jitted: called eagerly, a step compiles each once
# per leaf shape instead of each of their operations; under a trace they inline.
@functools.partial(jax.jit, static_argnames=('corrected', 'squared', 'size'))
def _rms_ratio(g: jax.Array, v: jax.Array, count: Any, b2: Any, eps: Any, *,
               corrected: bool, squared: bool, size: Optional[int] = None) -> jax.Array:
  r""":math:`\sqrt{\mathrm{sum}(|g|^2 / \max(\hat v, \varepsilon^2)) / n}`, real, >= float32.

  ``n`` is ``size`` (a sparse leaf's whole element count) or ``g.size``.
  """
  rdt = _real_dtype(g.dtype, v.dtype)
  g = g.astype(_numerics.compute_dtype(g.dtype))
  g2 = jnp.real(g * jnp.conj(g)).astype(rdt)
  v = jnp.real(v).astype(rdt)
  if squared:
    v = v * v
  if not corrected:
    v = v / _update._one_minus_power(b2, count, rdt)
  e = _update._hp(eps, rdt)
  n = g.size if size is None else size
  return jnp.sqrt(jnp.sum(g2 / jnp.maximum(v, e * e)) / max(n, 1))


def clip_factor(rms: jax.Array) -> jax.Array:
  r""":math:`1 / \max(1, \mathrm{RMS})`: the factor update clipping puts on the rate."""
  return 1 / jnp.maximum(jnp.ones([], rms.dtype), rms)


def agreement(u: jax.Array, g: jax.Array) -> jax.Array:
  r"""The cautious mask :math:`1[u \cdot g > 0]` (complex: :math:`\mathrm{Re}(u \bar g) > 0`)."""
  cdt = _numerics.compute_dtype(u.dtype, g.dtype)
  return jnp.real(u.astype(cdt) * jnp.conj(g.astype(cdt))) > 0


def _cautious_scale(agree: jax.Array, count_valid: Any, rdt: Any) -> jax.Array:
  frac = jnp.sum(agree, dtype=rdt) / jnp.maximum(jnp.asarray(count_valid, rdt), 1)
  return 1 / jnp.maximum(frac, jnp.asarray(CAUTIOUS_FLOOR, rdt))


@jax.jit
def _mask_dense(u: jax.Array, g: jax.Array) -> jax.Array:
  agree = agreement(u, g)
  rdt = _real_dtype(u.dtype)
  scale = _cautious_scale(agree, agree.size, rdt)
  cdt = _numerics.compute_dtype(u.dtype)
  # A multiply, not a select: a NaN direction (an invalid traced
  # hyperparameter) stays NaN.
  return (u.astype(cdt) * (agree.astype(cdt) * scale.astype(cdt))).astype(u.dtype)


def _coalesced(g: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  # A method of RowSparse, so that this module (which adamfx._builders.adam imports)
  # does not import adamfx._sparse.lazy (which imports adamfx._builders.adam).
  return g.coalesce()


def _row_mask(valid: jax.Array, ndim: int) -> jax.Array:
  return valid.reshape((-1,) + (1,) * (ndim - 1))


def _mask_sparse(u: Any, g: Any) -> Any:
  """Cautious mask of a lazy step's rows: the mean is over the touched rows."""
  _, g_rows, valid = _coalesced(g)
  agree = agreement(u.values, g_rows) & _row_mask(valid, u.values.ndim)
  rdt = _real_dtype(u.values.dtype)
  row = max(int(u.values.size // max(u.values.shape[0], 1)), 1)
  scale = _cautious_scale(agree, jnp.sum(valid) * row, rdt)
  cdt = _numerics.compute_dtype(u.values.dtype)
  values = (u.values.astype(cdt) * (agree.astype(cdt) * scale.astype(cdt))).astype(u.values.dtype)
  return type(u)(u.indices, values, u.num_rows)


def _clip_leaf(u: Any, rms: jax.Array) -> Any:
  """``u / max(1, rms)`` (a RowSparse leaf: its rows)."""
  if u is None:
    return None
  if _is_sparse(u):
    return type(u)(u.indices, _clip_dense(u.values, rms), u.num_rows)
  return _clip_dense(u, rms)


@jax.jit
def _clip_dense(u: jax.Array, rms: jax.Array) -> jax.Array:
  cdt = _numerics.compute_dtype(u.dtype)
  return (u.astype(cdt) * clip_factor(rms).astype(cdt)).astype(u.dtype)


def cautious_mask(updates: Any, grads: Any) -> Any:
  """The cautious direction of every leaf: ``u * phi / max(mean(phi), 1e-3)``."""
  u_leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_leaf)
  g_leaves = treedef.flatten_up_to(grads)
  out = []
  for u, g in zip(u_leaves, g_leaves):
    if u is None or g is None:
      out.append(u)
    elif _is_sparse(u):
      out.append(_mask_sparse(u, g))
    else:
      out.append(_mask_dense(u, jnp.asarray(g)))
  return jax.tree.unflatten(treedef, out)


def rms_ratios(grads: Any, scaling_state: Any, b2: Any, eps: Any) -> Any:
  r"""Per leaf, :math:`\mathrm{RMS}_t` of update clipping (``None`` leaves stay ``None``).

  ``scaling_state`` is the Adam scaling's *new* state (``count`` already
  incremented); a :class:`~adamfx.RowSparse` gradient counts its untouched
  rows as zeros, as dense Adam on the same gradient would.
  """
  g_leaves, treedef = jax.tree.flatten(grads, is_leaf=_is_leaf)
  count, v_leaves, corrected, squared = _second_moments(scaling_state, treedef)
  out = []
  for g, v in zip(g_leaves, v_leaves):
    if g is None or v is None:
      out.append(None)
      continue
    if _is_sparse(g):
      ids, g_rows, valid = _coalesced(g)
      v_rows = jnp.asarray(v).at[ids].get(mode='fill', fill_value=1)
      g_rows = jnp.where(_row_mask(valid, g_rows.ndim), g_rows, 0)
      out.append(_rms_ratio(g_rows, v_rows, count, b2, eps, corrected=corrected,
                            squared=squared, size=int(v.size)))
    else:
      out.append(_rms_ratio(jnp.asarray(g), v, count, b2, eps, corrected=corrected,
                            squared=squared))
  return jax.tree.unflatten(treedef, out)


def chain(
    scaling: optax.GradientTransformation,
    rest: list[optax.GradientTransformation],
    opts: Options,
    *,
    b2: Any,
    eps: Any,
    decayed: bool,
) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(scaling, *rest)`` with the cautious mask and update clipping.

  ``rest`` is ``[decay, learning rate]`` if ``decayed``, else ``[learning
  rate]`` or ``[]``. The mask acts on the scaling's output (the Adam
  direction); the clip factor multiplies the sum of the direction and the
  decay, before the learning rate. The state is the chain's (``scaling``'s
  own state when ``rest`` is empty).
  """
  links = [scaling, *rest]
  inner = optax.chain(*links) if rest else scaling

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    states = list(state) if rest else [state]
    grads = updates
    u, s0 = scaling.update(grads, states[0], params)
    new_states = [s0]
    if opts.cautious:
      u = cautious_mask(u, grads)
    tail = list(zip(rest, states[1:]))
    if decayed:
      (decay, s1), tail = tail[0], tail[1:]
      u, s1 = decay.update(u, s1, params)
      new_states.append(s1)
    if opts.update_clipping:
      rms = rms_ratios(grads, s0, b2, eps)
      u = jax.tree.map(lambda x, r: x if r is None else _clip_leaf(x, r), u, rms,
                       is_leaf=_is_leaf)
    for link, s in tail:
      u, s = link.update(u, s, params)
      new_states.append(s)
    return u, (tuple(new_states) if rest else new_states[0])

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def diagnostics(grads: Any, state: Any, b2: Any, eps: Any) -> dict[str, jax.Array]:
  """``clip_factor_min``, ``stable_rms_max`` and ``cautious_fraction`` for
  :func:`adamfx.adam_diagnostics`, from a step's gradient and new state.

  ``state`` holds the Adam-like state (count, mu, nu) of the same step; the
  cautious fraction is that of ``m_t g_t > 0`` over all coordinates (the sign
  of Adam's direction is that of ``m_t``).
  """
  rms = [r for r in jax.tree.leaves(rms_ratios(grads, state, b2, eps)) if r is not None]
  g_leaves, treedef = jax.tree.flatten(grads, is_leaf=_is_leaf)
  m_leaves = treedef.flatten_up_to(dequantized(state.mu))
  dtype = _real_dtype(*[jnp.result_type(x) for x in rms]) if rms else jnp.float32
  agree, total = [], 0
  for g, m in zip(g_leaves, m_leaves):
    if g is None or m is None:
      continue
    if _is_sparse(g):
      g = g.todense()
    agree.append(jnp.sum(agreement(jnp.asarray(m), jnp.asarray(g)), dtype=dtype))
    total += int(jnp.size(m))
  top = jnp.max(jnp.stack([r.astype(dtype) for r in rms])) if rms else jnp.zeros([], dtype)
  frac = sum(agree) / max(total, 1) if agree else jnp.zeros([], dtype)
  return {
      'stable_rms_max': top,
      'clip_factor_min': clip_factor(top),
      'cautious_fraction': jnp.asarray(frac, dtype),
  }


def _is_quantized(x: Any) -> bool:
  """A stored low-bit moment (8-bit ``QuantizedArray``, ``Quantized4bit``)."""
  return hasattr(x, 'codes') and callable(getattr(x, 'dequantize', None))


def dequantized(tree: Any) -> Any:
  """``tree`` with every stored low-bit moment as its float32 value."""
  return jax.tree.map(lambda x: x.dequantize() if _is_quantized(x) else x, tree,
                      is_leaf=_is_quantized)

