"""Numerics where optax 0.2.8 breaks and adamfx must not.

Each test fails on a naive implementation (optax's arithmetic in the params'
dtype); where it is cheap, the test shows optax failing on the same input.
References are the float64 NumPy transcription (``reference.py``), where
nothing overflows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from conftest import optax_promotion
from hypothesis import given
from hypothesis import strategies as st

import adamfx

F16, BF16, F32 = jnp.float16, jnp.bfloat16, jnp.float32


def run(tx, params, grads, *, promotion=None, state=None):
  """Steps ``tx`` through ``grads`` (jitted once); returns (updates, states, params)."""
  ctx = promotion or (lambda: jax.numpy_dtype_promotion('strict'))
  with ctx():
    state = tx.init(params) if state is None else state
    step = jax.jit(tx.update)
    updates, states = [], []
    for g in grads:
      u, state = step(g, state, params)
      params = optax.apply_updates(params, u)
      updates.append(u)
      states.append(state)
  return updates, states, params


def finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def f64(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


# ----------------------------------------------------------------------------
# 1. Overflow of the second moment: float16 > 256, float32 > ~1.8e19
# ----------------------------------------------------------------------------

FAMILY = {
    'adam': lambda lr: adamfx.adam(lr),
    'nadam': lambda lr: adamfx.nadam(lr),
    'amsgrad': lambda lr: adamfx.amsgrad(lr),
    'adamw': lambda lr: adamfx.adamw(lr, weight_decay=0.0),
    'adamax': lambda lr: adamfx.adamax(lr),
}


@pytest.mark.parametrize('name', list(FAMILY))
@pytest.mark.parametrize(
    'dtype,big',
    [(F16, [300.0, -1000.0, 65504.0, -65504.0]), (F32, [1e20, -3e38, 2e19, -3.4e38])],
    ids=['float16', 'float32'],
)
def test_huge_gradient_keeps_stepping_by_about_lr(name, dtype, big):
  lr = 1e-2
  params = jnp.zeros(4, dtype)
  small = jnp.array([1.0, -1.0, 1.0, -1.0], dtype)
  grads = [jnp.array(big, dtype)] + [small] * 30 + [jnp.array(big, dtype)] + [small] * 5
  updates, states, final = run(FAMILY[name](lr), params, grads)
  for u, s in zip(updates, states):
    assert u.dtype == dtype
    assert finite(u) and finite(s), (u, s)
  # Step 1 is about -lr * sign(g) (NAdam's first step is 1.47 lr: its
  # bias-corrected momentum adds (1 - b1) g / (1 - b1) to b1 m / (1 - b1**2)).
  first = f64(updates[0]) / lr
  expected = 1.4737 if name == 'nadam' else 1.0
  np.testing.assert_allclose(first, -expected * np.sign(big), rtol=2e-3)
  # It keeps moving, against the small gradients, every step after.
  moves = np.stack([f64(u) for u in updates[1:]])
  assert np.all(moves != 0)
  assert np.all(np.abs(moves) <= 1.5 * lr)
  assert finite(final)


@pytest.mark.parametrize('dtype', [F16, F32], ids=['float16', 'float32'])
def test_optax_freezes_on_the_same_input(dtype):
  """The naive implementation: nu becomes inf and the param never moves again."""
  big = 300.0 if dtype == F16 else 1e20
  grads = [jnp.full(2, big, dtype)] + [jnp.ones(2, dtype)] * 5
  updates, states, _ = run(optax.adam(1e-2), jnp.zeros(2, dtype), grads, promotion=optax_promotion)
  assert bool(jnp.all(jnp.isinf(states[0][0].nu)))
  assert all(bool(jnp.all(u == 0)) for u in updates)
  fx_updates, _, _ = run(adamfx.adam(1e-2), jnp.zeros(2, dtype), grads)
  assert all(bool(jnp.all(u != 0)) for u in fx_updates)


@pytest.mark.parametrize('amsgrad', [False, True], ids=['adam', 'amsgrad'])
def test_float32_huge_gradients_match_float64_reference(amsgrad):
  """Gradients of 1.3e18 up to 2**63 (9.2e18): their squares are near
  float32's maximum, and (1 - b2**t) v / (1 - b2) near it at t = 1, yet
  every moment fits float32, so the numbers must be Algorithm 1's."""
  rng = np.random.default_rng(0)
  n, steps = 16, 40
  mags = 10.0 ** rng.uniform(18.1, np.log10(0.999 * 2.0**63), size=(steps, n))
  grads = np.sign(rng.normal(size=(steps, n))) * mags
  grads[1:4] = rng.normal(size=(3, n))  # huge, then ordinary
  grads[10:20] *= 1e-19 * (rng.random((10, n)) < 0.5)
  grads = grads.astype(np.float32)
  updates, states, _ = run(
      adamfx.adam(1e-2, amsgrad=amsgrad), jnp.zeros(n), [jnp.asarray(g) for g in grads]
  )
  assert all(finite(s) for s in states)
  _, ref = reference.run(
      reference.Adam(1e-2, amsgrad=amsgrad), [np.zeros(n)], [[g] for g in grads], steps
  )
  # float32 arithmetic on the same operations. b2 = 0.999 held in float32 is
  # 0.99900001, which moves 1 - b2**t by up to 1.3e-5 relative (at t = 1)
  # and so the step by up to 6.5e-6: rtol 2e-5.
  np.testing.assert_allclose(np.stack(updates), ref[0], rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize(
    'nesterov,amsgrad', [(False, False), (True, False), (False, True)],
    ids=['adam', 'nadam', 'amsgrad'],
)
def test_float32_gradients_past_2_63_are_clipped_there(nesterov, amsgrad):
  """Past |g| = 2**63 (where g**2 could overflow float32), adamfx takes the
  gradient as ±2**63: its steps are Algorithm 1's on the clipped gradients,
  from 1e17 up to float32's maximum, mixed with ordinary ones."""
  rng = np.random.default_rng(3)
  steps, n = 30, 16
  grads = np.sign(rng.normal(size=(steps, n))) * 10.0 ** rng.uniform(17.0, 38.5, size=(steps, n))
  grads[5:9] = rng.normal(size=(4, n))
  grads = np.clip(grads, -3.4e38, 3.4e38).astype(np.float32)
  updates, states, _ = run(
      adamfx.adam(1e-2, nesterov=nesterov, amsgrad=amsgrad), jnp.zeros(n),
      [jnp.asarray(g) for g in grads],
  )
  assert all(finite(s) for s in states)
  clipped = np.clip(f64(grads), -(2.0**63), 2.0**63)
  _, ref = reference.run(
      reference.Adam(1e-2, nesterov=nesterov, amsgrad=amsgrad), [np.zeros(n)],
      [[g] for g in clipped], steps,
  )
  # b2 in float32 moves 1 - b2**t by up to 1.3e-5 relative (see above).
  np.testing.assert_allclose(np.stack(updates), ref[0], rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize('bad', [np.inf, -np.inf, np.nan])
def test_non_finite_gradient_gives_nan_not_a_clipped_step(bad):
  """The clip above is for finite gradients: an inf or NaN one gives a NaN
  update, as in optax, for optax.apply_if_finite (or the user) to see."""
  g = jnp.array([bad, 1.0])
  tx = adamfx.adam(1e-2)
  u, _ = tx.update(g, tx.init(jnp.zeros(2)))
  assert np.isnan(f64(u)[0]) and np.isfinite(f64(u)[1])


def test_optax_state_near_the_maximum_gives_finite_steps():
  """Moments made elsewhere (here: optax's, after gradients of 1.8e19) and
  a count reset to 0, then gradients of 9e18 (below 2**63, so not
  rescaled): v / (1 - b2**t) overflows float32 at the first step. Those
  elements do not move then (m_hat / inf), nothing is NaN or inf, and from
  the next step on they move again, with the gradient's sign."""
  state = optax.scale_by_adam().init(jnp.zeros(3))
  with optax_promotion():
    _, state = optax.scale_by_adam().update(jnp.array([1.8e19, -1.8e19, 1.0]), state)
  assert finite(state.nu)
  g = jnp.array([9e18, -9e18, 1.0])
  tx = adamfx.scale_by_adam()
  fx_state = adamfx.AdamState(count=jnp.zeros([], jnp.int32), mu=state.mu, nu=state.nu)
  for t in range(1, 4):
    u, fx_state = tx.update(g, fx_state)
    assert finite(u) and finite(fx_state)
    expected = [0.0, 0.0, 1.0] if t == 1 else [1.0, -1.0, 1.0]
    np.testing.assert_array_equal(np.sign(f64(u)), expected)


def test_float16_large_gradients_match_float64_reference():
  """float16 gradients in (256, 1250]: optax's nu overflows, adamfx's (computed
  in float32, stored in float16) does not. Tolerance: mu and nu are stored in
  float16 (11 significant bits, nu with unbiased stochastic rounding), about
  1e-3 relative per step."""
  rng = np.random.default_rng(1)
  n, steps = 32, 30
  # Up to 1250: (1 - b2) * sum g**2 over 30 steps stays below float16's max,
  # so nothing saturates (saturation departs from Algorithm 1 by design).
  grads = np.sign(rng.normal(size=(steps, n))) * 10.0 ** rng.uniform(2.4, 3.1, size=(steps, n))
  grads = grads.astype(np.float16)
  updates, _, _ = run(adamfx.adam(1e-2), jnp.zeros(n, F16), [jnp.asarray(g) for g in grads])
  _, ref = reference.run(reference.Adam(1e-2), [np.zeros(n)], [[g] for g in grads], steps)
  np.testing.assert_allclose(np.stack([f64(u) for u in updates]), ref[0], rtol=1e-2, atol=2e-5)


@pytest.mark.parametrize('amsgrad', [False, True], ids=['adam', 'amsgrad'])
def test_saturated_second_moment_keeps_mu_over_sqrt_nu(amsgrad):
  """(1 - b2) g**2 exceeds the storage dtype: nu is stored finite, with mu
  scaled by the same power of two, so the stored mu / sqrt(nu) is the exact
  ratio of the moments of that step (computed here in float64 from the
  previous stored state). Later gradients then weigh more than in Algorithm
  1 (the saved history reads as that of a smaller gradient), by design.
  This is the general formulation (float16 storage); float32 moments clip
  such gradients instead (test above)."""
  dtype, g = F16, 60000.0
  tx = adamfx.scale_by_adam(amsgrad=amsgrad)
  gk = np.array([g, -g / 2])
  grads = [jnp.asarray(gk, dtype)] * 3
  updates, states, _ = run(tx, jnp.zeros(2, dtype), grads)
  m_prev, v_prev = np.zeros(2), np.zeros(2)
  for u, s in zip(updates, states):
    m = 0.9 * m_prev + 0.1 * f64(gk.astype(dtype))
    v = 0.999 * v_prev + 0.001 * f64(gk.astype(dtype)) ** 2
    assert finite(s) and finite(u)
    assert np.all(f64(s.nu) <= float(jnp.finfo(dtype).max))
    if amsgrad:
      assert np.all(f64(s.nu_max) <= float(jnp.finfo(dtype).max))
    # float16's rounding of mu and nu: 2**-11 each.
    np.testing.assert_allclose(f64(s.mu) / np.sqrt(f64(s.nu)), m / np.sqrt(v), rtol=2e-3)
    m_prev, v_prev = f64(s.mu), f64(s.nu)
  np.testing.assert_allclose(f64(updates[0]), [1.0, -1.0], rtol=1e-3)


# ----------------------------------------------------------------------------
# 2. bfloat16: decay in float32; inject_hyperparams
# ----------------------------------------------------------------------------


def test_bfloat16_second_moment_decays():
  """0.999 * nu in bfloat16 is nu again: optax's nu never decays; adamfx's
  does (float32 arithmetic, unbiased storage), on average to 0.999**t."""
  n, zeros = 2048, 100
  params = jnp.ones(n, BF16)
  grads = [jnp.ones(n, BF16)] + [jnp.zeros(n, BF16)] * zeros
  _, states, _ = run(adamfx.adam(1e-3), params, grads)
  nu = f64(states[-1][0].nu)
  np.testing.assert_allclose(nu.mean(), 1e-3 * 0.999**zeros, rtol=1e-2)
  _, o_states, _ = run(optax.adam(1e-3), params, grads, promotion=optax_promotion)
  stuck = f64(o_states[-1][0].nu)
  assert np.all(stuck == f64(o_states[0][0].nu))  # optax: no decay at all


def test_inject_hyperparams_bfloat16():
  params = jnp.ones(4, BF16)
  grads = [jnp.array([1.0, -1.0, 0.5, 0.0], BF16)] * 3
  updates, states, _ = run(adamfx.inject_hyperparams(adamfx.adam)(1e-3), params, grads)
  assert all(finite(u) and u.dtype == BF16 for u in updates)
  assert states[0].hyperparams['b2'].dtype == jnp.float32
  np.testing.assert_allclose(f64(updates[0]), [-1e-3, 1e-3, -1e-3, 0.0], rtol=1e-2)
  # optax: b2 cast to bfloat16 is 1.0, 1 - b2**t == 0, NaN at step 1.
  o_updates, _, _ = run(
      optax.inject_hyperparams(optax.adam)(1e-3), params, grads[:1], promotion=optax_promotion
  )
  assert bool(jnp.any(jnp.isnan(o_updates[0])))
  # adamfx under optax's wrapper: a clear error instead of that NaN.
  with pytest.raises(TypeError, match=r'`b1` reached adamfx as bfloat16.*adamfx\.inject_hyperparams'):
    run(optax.inject_hyperparams(adamfx.adam)(1e-3), params, grads[:1], promotion=optax_promotion)


# ----------------------------------------------------------------------------
# 3. Zero gradients: eps underflow in float16, eps = eps_root = 0
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('name', list(FAMILY))
def test_float16_zero_gradient_is_zero_not_nan(name):
  params = jnp.ones(3, F16)
  updates, states, _ = run(FAMILY[name](1e-3), params, [jnp.zeros(3, F16)] * 3)
  for u, s in zip(updates, states):
    assert u.dtype == F16 and bool(jnp.all(u == 0)) and finite(s)


def test_optax_float16_zero_gradient_is_nan():
  updates, _, _ = run(optax.adam(1e-3), jnp.ones(3, F16), [jnp.zeros(3, F16)], promotion=optax_promotion)
  assert bool(jnp.all(jnp.isnan(updates[0])))


ZERO_EPS = {
    'scale_by_adam': lambda: adamfx.scale_by_adam(eps=0.0, eps_root=0.0),
    'nadam': lambda: adamfx.adam(1e-2, eps=0.0, eps_root=0.0, nesterov=True),
    'amsgrad': lambda: adamfx.adam(1e-2, eps=0.0, eps_root=0.0, amsgrad=True),
    'adamw': lambda: adamfx.adamw(1e-2, eps=0.0, eps_root=0.0),
    'adamax': lambda: adamfx.adamax(1e-2, eps=0.0),
}


@pytest.mark.parametrize('name', list(ZERO_EPS))
def test_zero_eps_and_zero_gradient_is_zero(name):
  # Some leaves always zero; one zero after a nonzero step (then m != 0).
  params = {'a': jnp.zeros(3), 'b': jnp.ones(())}
  grads = [{'a': jnp.zeros(3), 'b': jnp.ones(())}] + [{'a': jnp.zeros(3), 'b': jnp.zeros(())}] * 3
  updates, states, _ = run(ZERO_EPS[name](), params, grads)
  assert all(finite(u) and finite(s) for u, s in zip(updates, states))
  assert all(bool(jnp.all(u['a'] == 0)) for u in updates)


def test_optax_zero_eps_zero_gradient_is_nan():
  updates, _, _ = run(
      optax.scale_by_adam(eps=0.0), jnp.zeros(3), [jnp.zeros(3)], promotion=optax_promotion
  )
  assert bool(jnp.all(jnp.isnan(updates[0])))


def test_float16_second_moment_underflow_gives_finite_step():
  """(1 - b2) g**2 below float16's smallest subnormal is stored as 0 by
  round-to-nearest; with m != 0 and a zero gradient next, the step would be
  m_hat / eps ~ 1e5, inf in float16. adamfx stores such a positive nu as the
  smallest subnormal instead: the step stays finite and within a factor 2 of
  Algorithm 1's."""
  g = np.array([5e-3, -4e-3, 1e-3, 6e-3], np.float16)
  grads = [jnp.asarray(g)] + [jnp.zeros(4, F16)] * 3
  for tx in (adamfx.scale_by_adam(), adamfx.scale_by_adam(amsgrad=True)):
    updates, states, _ = run(tx, jnp.zeros(4, F16), grads)
    _, ref = reference.run(reference.Adam(1.0), [np.zeros(4)], [[x] for x in map(np.asarray, grads)], 4)
    got = np.stack([f64(u) for u in updates])
    assert np.all(np.isfinite(got))
    want = -ref[0]  # reference.run returns -lr * scaled; lr = 1
    assert np.all(np.sign(got) == np.sign(want))
    assert np.all(np.abs(got) <= 2 * np.abs(want) + 1e-3)


# ----------------------------------------------------------------------------
# 4. nu_dtype, mu_dtype, complex
# ----------------------------------------------------------------------------


def test_nu_dtype_storage_with_float32_arithmetic():
  """nu stored in bfloat16, the update computed from it in float32."""
  tx = adamfx.scale_by_adam(nu_dtype=BF16)
  params = jnp.zeros(5)
  state = tx.init(params)
  assert state.nu.dtype == BF16 and state.mu.dtype == F32
  nu = jnp.array([1e-3, 2.5e-2, 7.0, 1e-8, 0.3], BF16)
  mu = jnp.array([0.01, -0.1, 2.0, 1e-4, -0.5], F32)
  state = state._replace(count=jnp.int32(9), mu=mu, nu=nu)
  g = jnp.array([0.1, 0.2, -3.0, 0.0, 1.0], F32)
  u, new = jax.jit(tx.update)(g, state)
  assert new.nu.dtype == BF16 and u.dtype == F32
  m = 0.9 * f64(mu) + 0.1 * f64(g)
  v = 0.999 * f64(nu) + 0.001 * f64(g) ** 2
  # nu is stored as one of v's two bfloat16 neighbours (stochastic rounding),
  # and the update is read off the stored nu (the in-place formulation of
  # bfloat16 storage, as float32 storage reads it off the stored moments).
  stored = f64(new.nu)
  down = np.asarray(jnp.asarray(v, F32).astype(BF16).astype(F32), np.float64)
  down = np.where(down > v, f64(jnp.nextafter(jnp.asarray(down, BF16), BF16(0))), down)
  up = f64(jnp.nextafter(jnp.asarray(down, BF16), BF16(np.inf)))
  assert np.all((stored == down) | (stored == up))
  want = (m / (1 - 0.9**10)) / (np.sqrt(stored / (1 - 0.999**10)) + 1e-8)
  # float32 arithmetic: b2 = 0.999 held in float32 (0.99900001) moves
  # 1 - b2**10 by 1.3e-5 relative and the update by half that: rtol 2e-5.
  # (bfloat16 arithmetic, where 0.999 == 1.0, is off by 1e-2 and more.)
  np.testing.assert_allclose(f64(u), want, rtol=2e-5)


def test_nu_dtype_float32_for_float16_params():
  """A float32 nu holds (1 - b2) g**2 that float16 would flush to 0."""
  tx = adamfx.adam(1e-2, nu_dtype=F32)
  params = jnp.zeros(3, F16)
  grads = [jnp.full(3, 1e-3, F16)] * 5
  updates, states, _ = run(tx, params, grads)
  assert states[-1][0].nu.dtype == F32 and states[-1][0].mu.dtype == F16
  assert bool(jnp.all(states[-1][0].nu > 0))
  _, ref = reference.run(reference.Adam(1e-2), [np.zeros(3)], [[f64(g)] for g in grads], 5)
  np.testing.assert_allclose(np.stack([f64(u) for u in updates]), ref[0], rtol=2e-3)


def test_complex_params_with_real_mu_dtype_keep_the_imaginary_part():
  """mu_dtype names the precision; for complex params mu stays complex
  (storing it real would silently drop the imaginary part of the momentum)."""
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    params = jnp.asarray(rng.normal(size=4) + 1j * rng.normal(size=4))
    grads = [jnp.asarray(rng.normal(size=4) + 1j * rng.normal(size=4)) for _ in range(20)]
    tx = adamfx.adam(1e-2, mu_dtype=jnp.float32)
    updates, states, _ = run(tx, params, grads)
    assert states[-1][0].mu.dtype == jnp.complex64
    _, ref = reference.run(
        reference.Adam(1e-2, mu_dtype=np.complex64), [np.asarray(params)],
        [[np.asarray(g)] for g in grads], 20,
    )
  np.testing.assert_allclose(np.stack(updates), ref[0], rtol=1e-12, atol=1e-16)


def test_python_number_leaves():
  params = {'a': 1.0, 'b': jnp.ones(2)}
  grads = [{'a': 0.5, 'b': jnp.array([1.0, -2.0])}] * 2
  updates, _, _ = run(adamfx.adam(1e-2), params, grads)
  o_updates, _, _ = run(optax.adam(1e-2), params, grads, promotion=optax_promotion)
  for u, o in zip(updates, o_updates):
    assert set(u) == set(o) == {'a', 'b'}
    for k in ('a', 'b'):
      np.testing.assert_allclose(f64(u[k]), f64(o[k]), rtol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------
# 5. count saturation
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['adam', 'nadam', 'adamax'])
def test_count_saturates_at_int32_max(name):
  tx = {'adam': adamfx.scale_by_adam, 'nadam': functools.partial(adamfx.scale_by_adam, nesterov=True),
        'adamax': adamfx.scale_by_adamax}[name]()
  top = np.iinfo(np.int32).max
  state = tx.init(jnp.zeros(2))._replace(count=jnp.int32(top - 2))
  g = jnp.array([0.5, -2.0])
  updates, states, _ = run(tx, jnp.zeros(2), [g] * 4, state=state)
  assert [int(s.count) for s in states] == [top - 1, top, top, top]
  # Bias corrections are 1 there: plain EMAs from zero, computed by hand.
  m, v = np.zeros(2), np.zeros(2)
  for u in updates:
    m = 0.9 * m + 0.1 * f64(g)
    if name == 'adamax':
      v = np.maximum(0.999 * v, np.abs(f64(g)) + 1e-8)
      want = m / v
    else:
      v = 0.999 * v + 0.001 * f64(g) ** 2
      m_hat = 0.9 * m + 0.1 * f64(g) if name == 'nadam' else m
      want = m_hat / (np.sqrt(v) + 1e-8)
    np.testing.assert_allclose(f64(u), want, rtol=1e-5)


# ----------------------------------------------------------------------------
# 6. dtypes of outputs; never NaN for finite inputs
# ----------------------------------------------------------------------------

TXS = {
    'adam': lambda: adamfx.adam(1e-3),
    'nadam': lambda: adamfx.nadam(1e-3),
    'amsgrad': lambda: adamfx.amsgrad(1e-3),
    'adamw': lambda: adamfx.adamw(1e-3, weight_decay=1e-2),
    'adamax': lambda: adamfx.adamax(1e-3),
    'mu_nu_dtype': lambda: adamfx.adam(1e-3, mu_dtype=BF16, nu_dtype=F32),
    'nu_float16': lambda: adamfx.adam(1e-3, nu_dtype=F16, amsgrad=True),
}


@pytest.mark.parametrize('name', list(TXS))
def test_updates_and_state_in_the_params_dtypes(name):
  params = {
      'h': jnp.ones(3, F16), 'b': jnp.ones(2, BF16), 'f': jnp.ones((), F32),
      'c': jnp.ones(2, jnp.complex64), 'n': None,
  }
  grads = jax.tree.map(lambda p: p * 0.5, params)
  updates, states, new = run(TXS[name](), params, [grads] * 2)
  for k, p in params.items():
    if p is None:
      assert updates[-1][k] is None
      continue
    assert updates[-1][k].dtype == p.dtype and new[k].dtype == p.dtype, k
    inner = states[-1][0]
    want_mu = {'mu_nu_dtype': jnp.complex64 if k == 'c' else BF16}.get(name, p.dtype)
    assert inner.mu[k].dtype == want_mu, k
    assert inner.count.dtype == jnp.int32
    assert finite(updates[-1][k])


def test_float64_params_stay_float64():
  with jax.enable_x64(True):
    for make in (TXS['adamw'], TXS['amsgrad'], TXS['adamax']):
      updates, states, new = run(make(), jnp.ones(3, jnp.float64), [jnp.ones(3, jnp.float64)])
      assert updates[0].dtype == jnp.float64 and new.dtype == jnp.float64


_EXTREME = {F16: 65504.0, BF16: 3.3e38, F32: 3.4e38}
_STEPS, _N = 5, 8


@functools.cache
def _compiled(name, dtype):
  tx = TXS[name]()

  @jax.jit
  def go(params, grads):
    def body(carry, g):
      p, s = carry
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), (u, s)

    (_, _), (us, ss) = jax.lax.scan(body, (params, tx.init(params)), grads)
    return us, ss

  return go


def _magnitudes(extreme):
  top = float(np.log10(extreme))
  # Exponents on a grid of quarter decades, drawn evenly (hypothesis' own
  # float strategy favours the interval's ends).
  exponent = st.integers(-120, int(4 * top)).map(lambda k: k / 4)
  value = st.one_of(
      st.just(0.0),
      st.builds(lambda e, s: s * 10.0**e, exponent, st.sampled_from([-1.0, 1.0])),
      st.sampled_from([extreme, -extreme]),
  )
  return st.lists(value, min_size=_STEPS * _N, max_size=_STEPS * _N)


_HYPOTHESIS_CASES = [
    (name, dtype) for dtype in (F16, BF16, F32) for name in ('adam', 'nadam', 'amsgrad', 'adamax')
] + [('adam', jnp.float64), ('amsgrad', jnp.float64), ('adam', jnp.complex64), ('nu_float16', F32)]


@pytest.mark.parametrize(
    'name,dtype', _HYPOTHESIS_CASES, ids=[f'{n}-{jnp.dtype(d).name}' for n, d in _HYPOTHESIS_CASES]
)
def test_never_nan_or_inf_for_finite_inputs(name, dtype):
  """Gradients anywhere in 1e-30..max finite (3.4e38 for float64 and
  complex64 too) and 0, any sign, any order: every update and every stored
  moment is finite, in the params' dtype."""
  x64 = jnp.dtype(dtype) == jnp.float64
  extreme = _EXTREME.get(dtype, 3.4e38)

  @given(_magnitudes(extreme), st.floats(-1e4, 1e4))
  def check(values, p0):
    grads = np.clip(np.asarray(values), -extreme, extreme).reshape(_STEPS, _N)
    if jnp.issubdtype(dtype, jnp.complexfloating):
      grads = grads * (0.6 + 0.8j)  # |g| unchanged
    with jax.enable_x64(x64):
      grads = jnp.asarray(grads).astype(dtype)
      assert finite(grads)
      us, ss = _compiled(name, dtype)(jnp.full(_N, p0, dtype), grads)
      assert us.dtype == dtype
      assert finite(us), (np.asarray(grads), np.asarray(us))
      assert finite(ss)

  check()


def test_naive_float16_fails_the_finiteness_property():
  """The property above can fail: optax on one of its inputs."""
  grads = jnp.array([[1e-30, 300.0, 0.0], [1.0, 1.0, 0.0]], F16)
  updates, _, _ = run(optax.adam(1e-3), jnp.zeros(3, F16), list(grads), promotion=optax_promotion)
  assert not finite(updates)

