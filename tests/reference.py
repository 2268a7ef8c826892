"""Float64 NumPy transcriptions of the Adam family, independent of JAX and optax.

These are the references that adamfx is compared against under
``jax.enable_x64(True)`` at ``rtol ~1e-12``. Each is written from the paper
(or, where the variants disagree, from the form optax documents), one NumPy
array per leaf, in float64 (complex128 for complex leaves), and shares no code
with adamfx.

- :class:`Adam`: Kingma & Ba (2015), Algorithm 1, with ``eps`` outside the
  square root and optax's ``eps_root`` inside it;
  ``nesterov=True`` is NAdam in optax's form (Dozat 2016 without the extra
  ``b2`` factor of its Algorithm 2); ``amsgrad=True`` takes the running
  maximum of the *bias-corrected* second moment (as ``optax.amsgrad``; Reddi
  et al. 2018 take it over the raw moment); ``weight_decay`` is AdamW's
  decoupled decay (Loshchilov & Hutter 2019), ``-lr * wd * param`` added to
  the update, the param taken before the step.
- ``mu_dtype``: the first moment is *stored* rounded to this dtype (e.g.
  ``ml_dtypes.bfloat16``), the step that computed it having used it unrounded.
- :class:`AdaMax`: Kingma & Ba (2015) section 7.1, with optax's ``eps`` added
  to ``|g|`` inside the max (the paper has no eps).

Learning rates may be numbers or callables of the 0-based step count (as optax
schedules are called with the count *before* the step).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import numpy as np


def _f64(x: Any) -> np.ndarray:
  x = np.asarray(x)
  if np.iscomplexobj(x):
    return x.astype(np.complex128)
  return x.astype(np.float64)


def _abs_sq(g: np.ndarray) -> np.ndarray:
  return (g.real * g.real + g.imag * g.imag) if np.iscomplexobj(g) else g * g


class Adam:
  """Adam / NAdam / AMSGrad / AdamW on a list of float64 arrays."""

  def __init__(
      self,
      learning_rate: float | Callable[[int], float],
      b1: float = 0.9,
      b2: float = 0.999,
      eps: float = 1e-8,
      eps_root: float = 0.0,
      *,
      nesterov: bool = False,
      amsgrad: bool = False,
      weight_decay: float | Callable[[int], float] = 0.0,
      decay_mask: Sequence[bool] | None = None,
      mu_dtype: Any = None,
  ):
    self.learning_rate = learning_rate
    self.mu_dtype = mu_dtype
    self.b1, self.b2, self.eps, self.eps_root = b1, b2, eps, eps_root
    self.nesterov, self.amsgrad = nesterov, amsgrad
    self.weight_decay, self.decay_mask = weight_decay, decay_mask

  def init(self, params: Sequence[Any]) -> None:
    params = [_f64(p) for p in params]
    self.t = 0  # Algorithm 1: t <- 0
    self.m = [np.zeros_like(p) for p in params]  # m_0 <- 0
    self.v = [np.zeros(p.shape, np.float64) for p in params]  # v_0 <- 0
    self.v_max = [np.zeros(p.shape, np.float64) for p in params]

  def scaled(self, grads: Sequence[Any]) -> list[np.ndarray]:
    """One step of ``scale_by_adam``: m_hat / (sqrt(v_hat + eps_root) + eps)."""
    b1, b2 = self.b1, self.b2
    self.t += 1  # t <- t + 1
    t = self.t
    out = []
    for i, g in enumerate(grads):
      g = _f64(g)
      self.m[i] = b1 * self.m[i] + (1 - b1) * g  # m_t
      self.v[i] = b2 * self.v[i] + (1 - b2) * _abs_sq(g)  # v_t
      if self.nesterov:  # Dozat 2016, as optax.nadam.
        m_hat = b1 * self.m[i] / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
      else:
        m_hat = self.m[i] / (1 - b1**t)  # \hat m_t
      v_hat = self.v[i] / (1 - b2**t)  # \hat v_t
      if self.amsgrad:
        self.v_max[i] = np.maximum(self.v_max[i], v_hat)
        v_hat = self.v_max[i]
      out.append(m_hat / (np.sqrt(v_hat + self.eps_root) + self.eps))
      if self.mu_dtype is not None:  # stored rounded; this step used m_t as is
        self.m[i] = self.m[i].astype(self.mu_dtype).astype(self.m[i].dtype)
    return out

  def step(self, grads: Sequence[Any], params: Sequence[Any]) -> list[np.ndarray]:
    """The full update ``-lr * (scaled + wd * param)`` (to add to params)."""
    count = self.t  # schedules see the count before the step
    scaled = self.scaled(grads)
    lr = _value(self.learning_rate, count)
    wd = _value(self.weight_decay, count)
    out = []
    for i, (u, p) in enumerate(zip(scaled, params)):
      if wd and (self.decay_mask is None or self.decay_mask[i]):
        u = u + wd * _f64(p)
      out.append(-lr * u)
    return out


class AdaMax:
  """AdaMax, Kingma & Ba (2015) section 7.1, eps inside the max as optax."""

  def __init__(
      self,
      learning_rate: float | Callable[[int], float],
      b1: float = 0.9,
      b2: float = 0.999,
      eps: float = 1e-8,
  ):
    self.learning_rate, self.b1, self.b2, self.eps = learning_rate, b1, b2, eps

  def init(self, params: Sequence[Any]) -> None:
    params = [_f64(p) for p in params]
    self.t = 0
    self.m = [np.zeros_like(p) for p in params]
    self.u = [np.zeros(p.shape, np.float64) for p in params]

  def scaled(self, grads: Sequence[Any]) -> list[np.ndarray]:
    self.t += 1
    out = []
    for i, g in enumerate(grads):
      g = _f64(g)
      self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
      self.u[i] = np.maximum(self.b2 * self.u[i], np.abs(g) + self.eps)
      out.append(self.m[i] / ((1 - self.b1**self.t) * self.u[i]))
    return out

  def step(self, grads: Sequence[Any], params: Sequence[Any]) -> list[np.ndarray]:
    del params
    lr = _value(self.learning_rate, self.t)
    return [-lr * u for u in self.scaled(grads)]


def _value(x: float | Callable[[int], float], count: int) -> float:
  return float(x(count)) if callable(x) else float(x)


def run(
    opt: Adam | AdaMax,
    params: Sequence[Any],
    grads: Sequence[Sequence[Any]] | Callable[[int, list[np.ndarray]], Sequence[Any]],
    steps: int,
) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
  """Runs ``steps`` steps; ``grads`` is a list per step or ``f(step, params)``.

  Returns the final params and the update of every step (a list per leaf of
  arrays with a leading step axis).
  """
  params = [_f64(p) for p in params]
  opt.init(params)
  history: list[list[np.ndarray]] = [[] for _ in params]
  for k in range(steps):
    g = grads(k, params) if callable(grads) else grads[k]
    updates = opt.step(g, params)
    params = [p + u for p, u in zip(params, updates)]
    for h, u in zip(history, updates):
      h.append(u)
  return params, [np.stack(h) for h in history]


def quantize8(
    x: Any, code_map: Any, block_size: int, signed: bool, uniform: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Blockwise 8-bit quantisation (Dettmers et al. 2022), in float64.

  ``x`` is flattened and padded with zeros to whole blocks. Per block, the
  scale is the largest finite ``|x|``; each finite element's code is the
  index of the map value nearest to ``x / scale`` (the first on a tie), and
  for the unsigned map (second moment) a positive element never takes the
  code of 0. Non-finite elements get code 0 here (callers replace them).

  With ``uniform`` (draws in [0, 1), one per element of the flattened
  ``x``), an element between map values ``lo <= x / scale < hi`` takes
  ``hi`` when its draw is below ``(x / scale - lo) / (hi - lo)``, else
  ``lo``: stochastic rounding, unbiased (adamfx's 8-bit ``nu``, issue 24).

  Returns:
    ``(codes, scales, normalised)``: int codes per element (flat, unpadded),
    the float64 scale per block, and ``x / scale`` per element (for callers
    that need the distance to the nearest tie).
  """
  x = np.asarray(x, np.float64).reshape(-1)
  n = x.size
  blocks = max(1, -(-n // block_size))
  xb = np.zeros(blocks * block_size)
  xb[:n] = x
  xb = xb.reshape(blocks, block_size)
  finite = np.isfinite(xb)
  scale = np.max(np.where(finite, np.abs(xb), 0), axis=1)
  safe = np.where(scale > 0, scale, 1)[:, None]
  xn = np.where(finite, xb / safe, 0)
  values = np.asarray(code_map, np.float64)
  codes = np.argmin(np.abs(xn[..., None] - values), axis=-1)
  if uniform is not None:
    u = np.zeros(blocks * block_size)
    u[:n] = np.asarray(uniform, np.float64).reshape(-1)
    u = u.reshape(blocks, block_size)
    lo = np.clip(np.searchsorted(values, xn, side='right') - 1, 0, values.size - 1)
    hi = np.minimum(lo + 1, values.size - 1)
    gap = values[hi] - values[lo]
    p = np.where(gap > 0, (xn - values[lo]) / np.where(gap > 0, gap, 1), 0)
    codes = lo + (u < p)
  if not signed:
    codes = np.where((xn > 0) & (codes == 0), 1, codes)
  return codes.reshape(-1)[:n], scale, xn.reshape(-1)[:n]


class Stable(Adam):
  """:class:`Adam` with StableAdamW's update clipping and cautious updates.

  - Update clipping, Wortsman et al. (2023) Algorithm 1 (optimi's
    ``StableAdamW``): per tensor, ``rms = sqrt(mean(g**2 / max(v_hat,
    eps**2)))`` on the new bias-corrected second moment (AMSGrad: its running
    maximum), and the learning rate of the step *and* of the decay is
    ``lr / max(1, rms)``.
  - Cautious updates, the reference code of Liang et al. (2024) (C-AdamW,
    ``c_adamw.py``): ``mask = (exp_avg * grad > 0)``, normalised per tensor
    (here by ``1 / max(mean(mask), 1e-3)``, the floor the issue and timm use),
    multiplied into the Adam direction; the decay is not masked. Two
    transcription choices follow adamfx's (optax's) conventions rather than
    that code's: ``eps`` is added to ``sqrt(v_hat)`` (Algorithm 1; the code
    adds it to ``sqrt(v)``), and the decay uses the param before the step
    (the code decays the already-stepped param). For NAdam the mask is taken
    on the direction applied (the Nesterov one), the paper's ``u_t``.
  - ``decouple_lr``: the decay is ``(lr / max_lr) * wd * param`` (optimi).
  """

  def __init__(self, *args, clip=False, cautious=False, decouple_lr=False, max_lr=None,
               **kwargs):
    super().__init__(*args, **kwargs)
    self.clip, self.cautious = clip, cautious
    self.decouple_lr, self.max_lr = decouple_lr, max_lr
    self.last_rms = []
    self.last_fraction = []

  def _direction(self, i: int, u: np.ndarray) -> np.ndarray:
    return u if self.nesterov else self.m[i]

  def step(self, grads: Sequence[Any], params: Sequence[Any]) -> list[np.ndarray]:
    count = self.t
    scaled = self.scaled(grads)
    t = self.t
    lr = _value(self.learning_rate, count)
    wd = _value(self.weight_decay, count)
    if self.decouple_lr:
      max_lr = self.max_lr if self.max_lr is not None else lr
      wd = wd / max_lr
    out = []
    self.last_rms, self.last_fraction = [], []
    for i, (u, p, g) in enumerate(zip(scaled, params, grads)):
      g = _f64(g)
      if self.cautious:
        direction = self._direction(i, u)
        mask = (np.real(direction * np.conj(g)) > 0).astype(np.float64)
        self.last_fraction.append(mask.mean() if mask.size else 0.0)
        mask = mask / max(mask.mean() if mask.size else 0.0, 1e-3)
        u = u * mask
      step_lr = lr
      if self.clip:
        v_hat = self.v_max[i] if self.amsgrad else self.v[i] / (1 - self.b2**t)
        rms = np.sqrt(np.mean(_abs_sq(g) / np.maximum(v_hat, self.eps**2))) if g.size else 0.0
        self.last_rms.append(rms)
        step_lr = lr / max(1.0, rms)
      if wd and (self.decay_mask is None or self.decay_mask[i]):
        u = u + wd * _f64(p)
      out.append(-step_lr * u)
    return out


def dynamic_map8(signed: bool) -> np.ndarray:
  """The 256 values of the 8-bit dynamic map, float64, sorted (Dettmers et al. 2022).

  bitsandbytes' ``create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``:
  for each exponent ``e = 0 .. 6``, the centres of ``2**e`` (signed; each with
  both signs) or ``2**(e + 1)`` (unsigned) equal parts of [0.1, 1], times
  ``10**(e - 6)``; plus 0 and 1.
  """
  values = [0.0, 1.0]
  for e in range(7):
    parts = 2**e if signed else 2 ** (e + 1)
    for j in range(parts):
      centre = (0.1 + 0.9 * (j + 0.5) / parts) * 10.0 ** (e - 6)
      values += [centre, -centre] if signed else [centre]
  out = np.sort(np.asarray(values, np.float64))
  assert out.shape == (256,)
  return out


class Adam8bit(Adam):
  """:class:`Adam` whose moments are stored blockwise in 8 bits between steps.

  The documented algorithm of ``adamfx.scale_by_adam8bit``: each step takes
  Adam's float step from the stored (dequantized) moments, computes the update
  from the new moments as they are, then stores each moment quantized
  (:func:`quantize8`, signed map for ``m``, unsigned for ``v``) and dequantized
  again: ``map[code] * block scale``. A group of at least ``min_size`` elements
  is quantized, smaller ones keep float64 moments. A group is one leaf, or
  (``groups``, as ``adamfx.pack_state``) several leaves' moments concatenated in
  leaf order into one buffer. Blocks of ``block_size`` consecutive elements of
  the flattened (row-major) buffer, the last one padded with zeros: for a leaf
  whose last axis is a multiple of ``block_size``, that is blocks along the
  last axis.

  ``v``'s codes are rounded stochastically (issue 24), ``m``'s to the
  nearest. A float64 model cannot draw its own random numbers and match
  the library, and a tolerance would have to allow a whole code step (up
  to 10% of an element's ``v``) on any element, which would hide real
  bugs. So the model takes the library's *random draws* -- the uint32 bits
  of ``adamfx._formats.codec4.block_bits`` for ``(count, 3 * group + 1, element)``,
  the element's flat position in its group's buffer, turned into a uniform
  in [0, 1) as the library does (top 24 bits) -- and makes the rounding
  decision itself, in float64, from its own moments. The library's
  stochastic rounding (which neighbours, which probability, which element
  gets which draw, chunked or not) is then checked at the same tolerance as
  before; only the hash is shared, and it is tested on its own
  (tests/test_rounding.py).
  """

  def __init__(self, *args: Any, block_size: int = 256, min_size: int = 4096,
               groups: Sequence[Sequence[int]] | None = None,
               positions: Sequence[int] | None = None, **kwargs: Any):
    super().__init__(*args, **kwargs)
    assert not self.amsgrad and self.mu_dtype is None
    self.block_size, self.min_size, self.groups = block_size, min_size, groups
    self.positions = positions

  def _stored(self, moments: list[np.ndarray], signed: bool, salt: int = 1) -> list[np.ndarray]:
    """``moments`` stored and decoded; ``salt`` 1 for ``v``, 2 for AMSGrad's ``v_max``."""
    groups = self.groups if self.groups is not None else [[i] for i in range(len(moments))]
    out = list(moments)
    for index, group in enumerate(groups):
      flat = np.concatenate([moments[i].reshape(-1) for i in group])
      if flat.size < self.min_size:
        continue
      code_map = dynamic_map8(signed)
      # The hash's leaf index: the group's place (a leaf's in the tree), or
      # ``positions[index]`` (pack_state: its buffer's place in the packed state).
      where = index if self.positions is None else self.positions[index]
      uniform = None if signed else self._uniform(flat.size, where, salt)
      codes, scale, _ = quantize8(flat, code_map, self.block_size, signed, uniform)
      per_element = np.repeat(scale, self.block_size)[:flat.size]
      flat = code_map[codes] * per_element
      start = 0
      for i in group:
        out[i] = flat[start:start + moments[i].size].reshape(moments[i].shape)
        start += moments[i].size
    return out

  def _uniform(self, n: int, leaf_index: int, salt: int = 1) -> np.ndarray:
    """The library's uniform draws for the codes of a leaf of ``n`` elements.

    ``salt`` 1 for ``v``, 2 for AMSGrad's ``v_max`` (independent draws).
    """
    from adamfx._formats import codec4 as _codec4  # noqa: PLC0415

    blocks = max(1, -(-n // self.block_size))
    bits = np.asarray(_codec4.block_bits(blocks, self.block_size, np.int32(self.t),
                                         3 * leaf_index + salt))
    return ((bits >> 8).astype(np.float64) * 2.0**-24).reshape(-1)[:n]

  def scaled(self, grads: Sequence[Any]) -> list[np.ndarray]:
    out = super().scaled(grads)
    self.m = self._stored(self.m, signed=True)
    self.v = self._stored(self.v, signed=False)
    return out


class KerasAdam:
  """Keras 3's ``Adam.update_step`` (and ``AdamW``'s decay first), in float64.

  Transcribed from keras/src/optimizers/adam.py: ``alpha = lr * sqrt(1 - b2**t)
  / (1 - b1**t)``; ``m += (g - m) * (1 - b1)``; ``v += (g**2 - v) * (1 - b2)``;
  ``p -= alpha * m / (sqrt(v) + epsilon)``. ``AdamW`` first applies
  ``p -= p * weight_decay * lr`` (keras/src/optimizers/base_optimizer.py,
  ``_apply_weight_decay``), so the step is the sum of both.
  """

  def __init__(self, learning_rate: float, beta_1: float = 0.9, beta_2: float = 0.999,
               epsilon: float = 1e-7, weight_decay: float = 0.0):
    self.lr, self.b1, self.b2, self.eps, self.wd = learning_rate, beta_1, beta_2, epsilon, weight_decay

  def init(self, params: Sequence[Any]) -> None:
    self.t = 0
    self.m = [np.zeros(np.shape(p), np.float64) for p in params]
    self.v = [np.zeros(np.shape(p), np.float64) for p in params]

  def step(self, grads: Sequence[Any], params: Sequence[Any]) -> list[np.ndarray]:
    self.t += 1
    alpha = self.lr * np.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
    out = []
    for i, (g, p) in enumerate(zip(grads, params)):
      g, p = _f64(g), _f64(p)
      decayed = p - p * self.wd * self.lr
      self.m[i] = self.m[i] + (g - self.m[i]) * (1 - self.b1)
      self.v[i] = self.v[i] + (g * g - self.v[i]) * (1 - self.b2)
      out.append(decayed - alpha * self.m[i] / (np.sqrt(self.v[i]) + self.eps) - p)
    return out


class FrameworkStable:
  """torch.optim.Adam/AdamW and Keras 3's Adam/AdamW in float64, with update
  clipping and cautious updates as adamfx defines them on those builders.

  The frameworks' steps, as one formula each (float64 needs no order of
  operations): with ``m``, ``v`` the raw moments of the gradient ``g`` (torch
  ``Adam``: ``g + l2 * p``; ``maximize``: ``-g``), ``v_use`` their AMSGrad
  maximum (over the *raw* ``v``, as both frameworks) or ``v``, ``bc1 = 1 -
  b1**t``, ``bc2 = 1 - b2**t``:

  - torch: ``u = (m / bc1) / (sqrt(v_use / bc2) + eps)``;
  - Keras: ``u = (m / bc1) * sqrt(bc2) / (sqrt(v_use) + epsilon)``, i.e.
    ``eps_hat = epsilon / sqrt(bc2)`` added to ``sqrt(v_use / bc2)``;

  and the update ``-lr_t * (u + wd * p)`` (AdamW's decoupled decay, torch's
  ``p *= 1 - lr * wd`` and Keras' ``p -= p * wd * lr``, the param taken
  before the step).

  - Update clipping, Wortsman et al. (2023) Algorithm 1 / optimi's
    ``StableAdamW``: ``lr_t = lr / max(1, rms)``, ``rms = sqrt(mean(g**2 /
    max(v_use / bc2, e**2)))`` with ``e`` the epsilon on ``sqrt(v_hat)`` of
    the framework's step (torch: ``eps``; Keras: ``eps_hat``).
  - Cautious, the reference code of Liang et al. (2024) (``c_adamw.py``):
    ``mask = (exp_avg * grad > 0)``, ``mask = mask / max(mask.mean(),
    1e-3)``, ``exp_avg * mask`` in place of ``exp_avg`` in the step; the
    decay is not masked (torch ``Adam``'s L2 term is part of the gradient,
    so it is).
  """

  def __init__(self, convention: str, learning_rate: float | Callable[[int], float],
               b1: float = 0.9, b2: float = 0.999, eps: float | None = None, *,
               l2: float = 0.0, weight_decay: float = 0.0, amsgrad: bool = False,
               maximize: bool = False, clip: bool = False, cautious: bool = False):
    assert convention in ('torch', 'keras')
    self.convention, self.lr = convention, learning_rate
    self.b1, self.b2 = b1, b2
    self.eps = eps if eps is not None else (1e-8 if convention == 'torch' else 1e-7)
    self.l2, self.wd, self.amsgrad, self.maximize = l2, weight_decay, amsgrad, maximize
    self.clip, self.cautious = clip, cautious
    self.last_rms: list[float] = []

  def init(self, params: Sequence[Any]) -> None:
    self.t = 0
    self.m = [np.zeros(np.shape(p), np.float64) for p in params]
    self.v = [np.zeros(np.shape(p), np.float64) for p in params]
    self.v_max = [np.zeros(np.shape(p), np.float64) for p in params]

  def step(self, grads: Sequence[Any], params: Sequence[Any]) -> list[np.ndarray]:
    count = self.t
    self.t += 1
    t, b1, b2 = self.t, self.b1, self.b2
    lr = _value(self.lr, count)
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    eps_hat = self.eps if self.convention == 'torch' else self.eps / np.sqrt(bc2)
    out = []
    self.last_rms = []
    for i, (g, p) in enumerate(zip(grads, params)):
      g, p = _f64(g), _f64(p)
      if self.maximize:
        g = -g
      g = g + self.l2 * p
      self.m[i] = b1 * self.m[i] + (1 - b1) * g
      self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
      self.v_max[i] = np.maximum(self.v_max[i], self.v[i])
      v_hat = (self.v_max[i] if self.amsgrad else self.v[i]) / bc2
      exp_avg = self.m[i]
      if self.cautious:  # c_adamw.py
        mask = (exp_avg * g > 0).astype(np.float64)
        mask = mask / max(mask.mean() if mask.size else 0.0, 1e-3)
        exp_avg = exp_avg * mask
      u = (exp_avg / bc1) / (np.sqrt(v_hat) + eps_hat)
      step_lr = lr
      if self.clip:
        rms = np.sqrt(np.mean(g * g / np.maximum(v_hat, eps_hat**2))) if g.size else 0.0
        self.last_rms.append(rms)
        step_lr = lr / max(1.0, rms)
      out.append(-step_lr * (u + self.wd * p))
    return out


class AMSGrad8bit(Adam8bit):
  """:class:`Adam8bit` with AMSGrad: the running maximum of the bias-corrected
  second moment (as :class:`Adam`) is stored in 8 bits too, with the unsigned
  map of ``v`` (as ``adamfx.Blockwise8bit`` documents for ``nu_max``), its
  codes stochastically rounded like ``v``'s with independent draws (salt 2).
  """

  def __init__(self, *args: Any, **kwargs: Any):
    super().__init__(*args, **kwargs)
    self.amsgrad = True

  def scaled(self, grads: Sequence[Any]) -> list[np.ndarray]:
    out = super().scaled(grads)
    self.v_max = self._stored(self.v_max, signed=False, salt=2)
    return out


class Stable8bit(Stable, Adam8bit):
  """:class:`Stable`'s options on :class:`Adam8bit`'s storage.

  The cautious mask is taken on the direction the step computed (from the
  new first moment before it is stored, the sign of the update), the clipping
  ratio on the second moment as stored (dequantized), the state the step
  returns (``adamfx._core.stable`` reads ``nu`` from it).
  """

  def _direction(self, i: int, u: np.ndarray) -> np.ndarray:
    return u


def map4(name: str) -> np.ndarray:
  """The 16 sorted values of a 4-bit map, float64 of their float32 values.

  ``'dynamic'``: bitsandbytes' ``create_dynamic_map(signed=True,
  max_exponent_bits=3, total_bits=4)``: for ``e = 0, 1, 2`` the centres of
  ``2**e`` equal parts of [0.1, 1] times ``10**(e - 2)``, with both signs,
  plus 0 and 1 (torchao's ``AdamW4bit`` first moment). ``'linear'``:
  ``1/16 .. 1`` (torchao's zero-free second-moment map). ``'power2'``:
  ``2**-15 .. 1``. adamfx stores the maps in float32.
  """
  if name == 'dynamic':
    values = [0.0, 1.0]
    for e in range(3):
      for j in range(2**e):
        centre = (0.1 + 0.9 * (j + 0.5) / 2**e) * 10.0 ** (e - 2)
        values += [centre, -centre]
  elif name == 'linear':
    values = np.arange(1, 17) / 16
  else:
    values = 2.0 ** np.arange(-15, 1)
  out = np.sort(np.asarray(values, np.float64)).astype(np.float32).astype(np.float64)
  assert out.shape == (16,)
  return out


def stored4(x: Any, name: str, block_size: int,
            uniform: Callable[[int], np.ndarray] | None) -> np.ndarray:
  """``x`` stored blockwise in 4 bits and decoded again, in float64.

  Blocks of ``block_size`` along the last axis where its length is a
  multiple of it, else along the flattened array padded with zeros. A
  block's scale is its largest element (signed map: the element of largest
  magnitude with its sign, the positive one on a tie); each ``a = x /
  scale`` between map neighbours ``lo <= a < hi`` is stored as ``hi`` with
  probability ``(a - lo) / (hi - lo)``, i.e. where ``u < (a - lo) / (hi -
  lo)``, ``u = uniform(n_blocks)`` numbers in [0, 1), one per element of the
  blocks (None: the nearest value, ties down); values outside the map clamp
  to its ends.
  """
  x = np.asarray(x, np.float64)
  shape = x.shape
  if x.ndim and shape[-1] and shape[-1] % block_size == 0:
    xb = x.reshape(-1, block_size)
  else:
    n = x.size
    blocks = max(1, -(-n // block_size))
    xb = np.pad(x.reshape(-1), (0, blocks * block_size - n)).reshape(blocks, block_size)
  values = map4(name)
  hi = xb.max(-1)
  scale = np.where(hi >= -xb.min(-1), hi, xb.min(-1)) if values[0] < 0 else hi
  a = xb / np.where(scale != 0, scale, 1)[:, None]
  lo = np.searchsorted(values, a, side='right') - 1  # values[lo] <= a < values[lo + 1]
  inside = (lo >= 0) & (lo < 15)
  j = np.clip(lo, 0, 14)
  if uniform is None:
    up = a - values[j] > values[j + 1] - a
  else:
    u = np.asarray(uniform(a.shape[0]), np.float64).reshape(a.shape)
    up = u < (a - values[j]) / (values[j + 1] - values[j])
  codes = np.where(inside, j + up, np.where(lo < 0, 0, 15))
  out = values[codes] * scale[:, None]
  return out.reshape(-1)[:x.size].reshape(shape)


class Adam4bit(Adam):
  """:class:`Adam` whose moments are stored blockwise in 4 bits between steps.

  The documented algorithm of ``adamfx.Blockwise4bit`` (Li et al. 2023): each
  step takes Adam's float step from the stored moments and computes the
  update from the new moments as they are; then a leaf of at least
  ``min_size`` elements stores each moment with :func:`stored4`: ``m`` in the
  signed ``'dynamic'`` map, ``v`` (and AMSGrad's running maximum) in
  ``nu_map``. Smaller leaves keep float64 moments.

  Stochastic rounding takes its uniform numbers from ``bits(count, leaf, salt,
  n_blocks)`` (the random number generator, not the algorithm: pass adamfx's to
  make the same draws), ``count`` the 1-based step, ``leaf`` the leaf's index
  and ``salt`` 0 for ``m``, 1 for ``v`` and 2 for the running maximum
  (independent draws); ``bits`` None rounds to nearest.
  """

  def __init__(self, *args: Any, block_size: int = 128, min_size: int = 4096,
               nu_map: str = 'linear', bits: Callable[..., np.ndarray] | None = None,
               **kwargs: Any):
    super().__init__(*args, **kwargs)
    assert self.mu_dtype is None
    self.block_size, self.min_size, self.nu_map, self.bits = block_size, min_size, nu_map, bits

  def _stored(self, moments: list[np.ndarray], name: str, salt: int) -> list[np.ndarray]:
    out = []
    for i, x in enumerate(moments):
      if x.size < max(self.min_size, 1):
        out.append(x)
        continue
      uniform = None if self.bits is None else (
          lambda rows, i=i, salt=salt: self.bits(self.t, i, salt, rows))
      out.append(stored4(x, name, self.block_size, uniform))
    return out

  def scaled(self, grads: Sequence[Any]) -> list[np.ndarray]:
    out = super().scaled(grads)
    self.m = self._stored(self.m, 'dynamic', 0)
    self.v = self._stored(self.v, self.nu_map, 1)
    if self.amsgrad:
      self.v_max = self._stored(self.v_max, self.nu_map, 2)
    return out
