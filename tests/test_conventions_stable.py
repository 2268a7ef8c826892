"""update_clipping= and cautious= on torch_adam/torch_adamw/keras_adam/keras_adamw (issue 23).

The numbers are held to ``reference.FrameworkStable``, a float64 NumPy
transcription of torch's and Keras's Adam/AdamW with StableAdamW's update
clipping (Wortsman et al. 2023, Algorithm 1) and the cautious mask of Liang
et al.'s reference code (``c_adamw.py``) on each framework's step; torch_adamw
with update clipping is also held to torch-optimi's ``StableAdamW`` in
tests/test_stable.py (``torch_adamw_clip``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference

import adamfx

STEPS = 40
SHAPES = [(6, 5), (7,)]


def _params0():
  rng = np.random.default_rng(0)
  return [rng.normal(size=s) for s in SHAPES]


def _grads(k, params):
  """A noisy quadratic, with a 30x burst at steps 12-13 (the clip fires) and
  noise of the gradient's own scale (the cautious mask keeps part)."""
  rng = np.random.default_rng(100 + k)
  scale = 30.0 if k in (12, 13) else 1.0
  return [scale * (0.5 * p + rng.normal(size=p.shape)) for p in params]


# (name, builder, its kwargs, FrameworkStable's convention and kwargs)
_CASES = {
    'torch_adam_l2': (adamfx.torch_adam, dict(lr=1e-2, weight_decay=0.1), 'torch', dict(l2=0.1)),
    'torch_adam_amsgrad_maximize': (
        adamfx.torch_adam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-3, amsgrad=True,
                                maximize=True),
        'torch', dict(b1=0.8, b2=0.99, eps=1e-3, amsgrad=True, maximize=True)),
    'torch_adamw': (adamfx.torch_adamw, dict(lr=1e-2, weight_decay=0.1), 'torch',
                    dict(weight_decay=0.1)),
    'torch_adamw_amsgrad': (adamfx.torch_adamw, dict(lr=1e-2, weight_decay=0.1, amsgrad=True),
                            'torch', dict(weight_decay=0.1, amsgrad=True)),
    # epsilon=1e-2: Keras's epsilon on the raw sqrt(v) is felt, in the step and in the RMS.
    'keras_adam': (adamfx.keras_adam, dict(learning_rate=1e-2, epsilon=1e-2), 'keras',
                   dict(eps=1e-2)),
    'keras_adamw_amsgrad': (adamfx.keras_adamw, dict(learning_rate=1e-2, weight_decay=0.1,
                                                     amsgrad=True),
                            'keras', dict(weight_decay=0.1, amsgrad=True)),
}
_OPTIONS = {'clip': (True, False), 'cautious': (False, True), 'both': (True, True)}


def _run_adamfx(tx, steps=STEPS, dtype=jnp.float64, grads=_grads):
  params = [jnp.asarray(p, dtype) for p in _params0()]
  state = tx.init(params)
  step = jax.jit(tx.update)
  for k in range(steps):
    g = [jnp.asarray(x, dtype) for x in grads(k, [np.asarray(p, np.float64) for p in params])]
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
  return [np.asarray(p) for p in params], state


def _run_reference(opt, steps=STEPS):
  """FrameworkStable's run, recording the largest RMS and the smallest kept
  fraction seen, to show that the options acted."""
  params = [np.asarray(p, np.float64) for p in _params0()]
  opt.init(params)
  top_rms, least_kept = 0.0, 1.0
  for k in range(steps):
    g = _grads(k, params)
    if opt.cautious:
      # The fraction the mask keeps: m_t g_t > 0 of this step's m_t.
      m_next = [opt.b1 * m + (1 - opt.b1) * _seen(opt, x, p) for m, x, p in zip(opt.m, g, params)]
      least_kept = min(least_kept, min(float(np.mean(m * _seen(opt, x, p) > 0))
                                       for m, x, p in zip(m_next, g, params)))
    u = opt.step(g, params)
    top_rms = max([top_rms, *opt.last_rms])
    params = [p + x for p, x in zip(params, u)]
  return params, top_rms, least_kept


def _seen(opt, g, p):
  """The gradient the moments see (maximize, torch Adam's L2)."""
  return (-g if opt.maximize else g) + opt.l2 * p


@pytest.mark.parametrize('option', sorted(_OPTIONS))
@pytest.mark.parametrize('name', sorted(_CASES))
def test_against_float64_reference(name, option):
  """40 steps with a 30x burst, float64: 1e-10 of each leaf's displacement.

  The options act (the RMS reaches > 3, the mask drops > 20% of a tensor)
  and change the trajectory by far more than the tolerance, so a wrong
  placement (the clip on the step only, the decay masked, eps not the
  framework's) cannot pass.
  """
  make, kwargs, convention, ref_kwargs = _CASES[name]
  clip, cautious = _OPTIONS[option]
  lr = kwargs.get('lr', kwargs.get('learning_rate'))
  want, top_rms, least_kept = _run_reference(
      reference.FrameworkStable(convention, lr, clip=clip, cautious=cautious, **ref_kwargs))
  plain, _, _ = _run_reference(reference.FrameworkStable(convention, lr, **ref_kwargs))
  with jax.enable_x64(True):
    got, _ = _run_adamfx(make(**kwargs, update_clipping=clip, cautious=cautious))
  if clip:
    assert top_rms > 3.0
  if cautious:
    assert least_kept < 0.8
  for g, w, p0, q in zip(got, want, _params0(), plain):
    scale = np.max(np.abs(w - p0))
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-10 * scale)
    assert np.max(np.abs(q - w)) > 1e-3 * scale  # the options changed the run


@pytest.mark.parametrize('name', sorted(_CASES))
def test_float32_follows_the_float64_reference(name):
  """float32, both options: within 1e-4 of each leaf's displacement after 40
  steps (float32 rounding through the gradient feedback; measured <= 6e-6)."""
  make, kwargs, convention, ref_kwargs = _CASES[name]
  lr = kwargs.get('lr', kwargs.get('learning_rate'))
  want, _, _ = _run_reference(
      reference.FrameworkStable(convention, lr, clip=True, cautious=True, **ref_kwargs))
  got, _ = _run_adamfx(make(**kwargs, update_clipping=True, cautious=True), dtype=jnp.float32)
  for g, w, p0 in zip(got, want, _params0()):
    assert g.dtype == np.float32
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-4 * np.max(np.abs(w - p0)))


@pytest.mark.parametrize('make,l2', [
    (lambda: adamfx.torch_adamw(0.1, weight_decay=0.5, cautious=True), False),
    (lambda: adamfx.keras_adamw(0.1, weight_decay=0.5, cautious=True), False),
    (lambda: adamfx.torch_adam(0.1, weight_decay=0.5, cautious=True), True),
])
def test_cautious_decay_not_masked(make, l2):
  """A second gradient of the opposite sign, too small to turn m: every
  element disagrees, the mask is empty, and the step is the decoupled decay
  alone; torch_adam's L2 term is part of the gradient, masked with it: no
  step at all."""
  tx = make()
  p = jnp.array([2.0, -1.0, 0.5])
  g = jnp.array([1.0, -2.0, 3.0])
  state = tx.init(p)
  _, state = tx.update(g, state, p)
  if l2:  # the gradient the moments see, g2 + 0.5 p, is -0.01 (g + 0.5 p)
    u, _ = tx.update(-0.5 * p - 0.01 * (g + 0.5 * p), state, p)
    np.testing.assert_array_equal(u, 0.0)
  else:
    u, _ = tx.update(-0.01 * g, state, p)
    # p * (1 - lr * wd) - p in float32: a rounding of p against 5% of it.
    np.testing.assert_allclose(u, -0.1 * 0.5 * p, rtol=1e-5)


def test_update_clipping_bounds_the_step_after_a_jump():
  """A 1000x gradient after 300 calm steps (b2 = 0.999): torch_adamw's step
  jumps to 1.6 lr ((1 - b1) / sqrt(1 - b2) * sqrt(1 - b2**301)); with
  update_clipping every element stays within lr (StableAdamW's point)."""
  def last_step(**opts):
    tx = adamfx.torch_adamw(1e-3, betas=(0.9, 0.999), weight_decay=0.0, **opts)
    p = jnp.zeros(64)
    rng = np.random.default_rng(3)
    state = tx.init(p)
    step = jax.jit(tx.update)
    for k in range(301):
      g = jnp.asarray(rng.normal(size=64) * (1e-3 if k < 300 else 1.0), jnp.float32)
      u, state = step(g, state, p)
    return float(jnp.max(jnp.abs(u))) / 1e-3

  assert last_step() > 1.5
  assert last_step(update_clipping=True) <= 1.0


@pytest.mark.parametrize('make', [adamfx.torch_adam, adamfx.torch_adamw, adamfx.keras_adam,
                                  adamfx.keras_adamw])
def test_flags_must_be_bools(make):
  for name in ('update_clipping', 'cautious'):
    with pytest.raises(TypeError, match=f'`{name}` must be a Python bool'):
      make(**{name: 1})
    with pytest.raises(TypeError, match=f'`{name}` must be a Python bool'):
      make(**{name: jnp.asarray(True)})


def test_inject_hyperparams_keeps_the_flags_static():
  """inject_hyperparams leaves the flags out of the injected hyperparams and
  gives the builder's numbers; the learning rate stays injectable."""
  for make, lr_name in ((adamfx.torch_adamw, 'lr'), (adamfx.keras_adamw, 'learning_rate')):
    kwargs = {lr_name: 1e-2, 'update_clipping': True, 'cautious': True}
    tx = adamfx.inject_hyperparams(make)(**kwargs)
    want, _ = _run_adamfx(make(**kwargs), steps=15, dtype=jnp.float32)
    got, state = _run_adamfx(tx, steps=15, dtype=jnp.float32)
    assert lr_name in state.hyperparams
    assert 'update_clipping' not in state.hyperparams and 'cautious' not in state.hyperparams
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)


@pytest.mark.parametrize('convention,make,kwargs', [
    ('torch', adamfx.torch_adamw, dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.1,
                                       amsgrad=True)),
    ('keras', adamfx.keras_adam, dict(learning_rate=1e-2, beta_2=0.99, epsilon=1e-3)),
])
def test_diagnostics_on_framework_states(convention, make, kwargs):
  """adam_diagnostics(grads=...) on a FrameworkAdamState reads the RMS that
  update_clipping uses: the raw AMSGrad maximum corrected, and Keras's
  epsilon passed as ``epsilon / sqrt(1 - beta_2**t)``."""
  lr = kwargs.get('lr', kwargs.get('learning_rate'))
  ref_kwargs = dict(b2=0.99, eps=1e-3, weight_decay=kwargs.get('weight_decay', 0.0),
                    amsgrad=kwargs.get('amsgrad', False))
  opt = reference.FrameworkStable(convention, lr, clip=True, **ref_kwargs)
  params = [np.asarray(p, np.float64) for p in _params0()]
  opt.init(params)
  tx = make(**kwargs, update_clipping=True)
  with jax.enable_x64(True):
    jparams = [jnp.asarray(p) for p in params]
    state = tx.init(jparams)
    for k in range(14):
      g = _grads(k, params)
      u = opt.step(g, params)
      params = [p + x for p, x in zip(params, u)]
      ju, state = tx.update([jnp.asarray(x) for x in g], state, jparams)
      jparams = optax.apply_updates(jparams, ju)
    eps = 1e-3 if convention == 'torch' else 1e-3 / math.sqrt(1 - 0.99**14)
    d = adamfx.adam_diagnostics(state, b2=0.99, eps=eps, grads=[jnp.asarray(x) for x in g])
  top = max(opt.last_rms)
  assert top > 3.0  # step 13 is in the burst
  np.testing.assert_allclose(float(d['stable_rms_max']), top, rtol=1e-10)
  np.testing.assert_allclose(float(d['clip_factor_min']), 1 / top, rtol=1e-10)


@pytest.mark.parametrize('make', [
    lambda m: adamfx.torch_adamw(1e-3, update_clipping=True, cautious=True, param_rounding=m),
    lambda m: adamfx.keras_adam(1e-3, update_clipping=True, cautious=True, param_rounding=m),
])
def test_param_rounding_composes(make):
  """float32 params: every param_rounding mode is bit for bit 'nearest';
  bfloat16 params: the step runs in each mode, eager and jitted, and moves
  the params."""
  grads = lambda k, p: [np.sin(3.0 * x + k) for x in p]
  want, _ = _run_adamfx(make('nearest'), steps=5, dtype=jnp.float32, grads=grads)
  for mode in ('kahan', 'stochastic'):
    got, _ = _run_adamfx(make(mode), steps=5, dtype=jnp.float32, grads=grads)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w)
    tx = make(mode)
    p = [jnp.asarray(x, jnp.bfloat16) for x in _params0()]
    g16 = [jnp.asarray(np.sin(3.0 * x), jnp.bfloat16) for x in _params0()]
    outs = []
    for update in (tx.update, jax.jit(tx.update)):
      u, _ = update(g16, tx.init(p), p)
      outs.append(optax.apply_updates(p, u))
    for a, b, p0 in zip(*outs, p):
      assert a.dtype == jnp.bfloat16
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
      assert not np.array_equal(np.asarray(a, np.float32), np.asarray(p0, np.float32))
