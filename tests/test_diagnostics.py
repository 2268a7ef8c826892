"""Tests of adamfx.adam_diagnostics and adamfx.adam_step_bound.

References are hand-computed values (with b1 = 0.5, b2 = 0.75, whose powers are
exact in float32) and a float64 NumPy transcription of the paper's
Algorithm 1, never adamfx itself.
"""

import math

import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import optax_promotion

import adamfx


def _hand_state():
  # t = 2, b1 = 0.5, b2 = 0.75: 1 - b1**2 = 0.75, 1 - b2**2 = 0.4375 (exact).
  # m_hat = [2, -0.5 | 0, 3e-9], v_hat = [1, 1 | 0, 1e-18],
  # sqrt(v_hat) = [1, 1 | 0, 1e-9], SNR = [2, 0.5 | 0, 3].
  mu = {'a': jnp.array([0.75 * 2, 0.75 * -0.5]), 'b': jnp.array([0.0, 0.75 * 3e-9])}
  nu = {'a': jnp.array([0.4375, 0.4375]), 'b': jnp.array([0.0, 0.4375 * 1e-18])}
  return adamfx.AdamState(count=jnp.asarray(2, jnp.int32), mu=mu, nu=nu)


def test_hand_computed_values():
  updates = {'a': jnp.array([-0.2, 0.1]), 'b': jnp.array([0.0, -0.35])}
  d = adamfx.adam_diagnostics(
      _hand_state(), updates, 0.1, b1=0.5, b2=0.75, eps=1e-8, quantiles=(0.5, 0.9)
  )
  expected = {
      'count': 2,
      'bias_correction_mu': 0.75,
      'bias_correction_nu': 0.4375,
      'snr_mean': (2 + 0.5 + 0 + 3) / 4,
      'snr_max': 3.0,
      # sorted SNR [0, 0.5, 2, 3]; linear interpolation at 0.5*3 and 0.9*3.
      'snr_q50': 0.5 + 0.5 * (2 - 0.5),
      'snr_q90': 2 + 0.7 * (3 - 2),
      # sqrt(v_hat) <= 1e-8 at the 0 and at the 1e-9: 2 of 4.
      'eps_dominated_fraction': 0.5,
      # (1 - b1) / sqrt(1 - b2) = 1, so the approximate bound is 1.
      'step_bound_approx': 1.0,
      # t = 2: r = b1**2/b2 = 1/3; 1 * sqrt(0.4375 * (1 + 1/3)) / 0.75.
      'step_bound_exact': math.sqrt(0.4375 * 4 / 3) / 0.75,
      # |update| / lr = [2, 1, 0, 3.5].
      'step_max': 3.5,
      'step_mean': 6.5 / 4,
      'step_over_approx_bound_fraction': 0.5,
      'update_rms': math.sqrt((4 + 1 + 0 + 3.5**2) / 4),
  }
  assert set(d) == set(expected)
  for key, value in expected.items():
    assert d[key].shape == (), key
    # float32 arithmetic on exact inputs: a few ulps.
    np.testing.assert_allclose(float(d[key]), value, rtol=1e-6, err_msg=key)


def test_hand_computed_stable_values():
  # grads: a = [2, -1] vs v_hat_a = [1, 1]: RMS_a = sqrt((4 + 1) / 2); b = [0, 1e-9] vs
  # v_hat_b = [0, 1e-18] floored at eps**2 = 1e-16: RMS_b = sqrt(0.01 / 2). m * g > 0 at
  # a (both) and b[1]: 3 of 4.
  grads = {'a': jnp.array([2.0, -1.0]), 'b': jnp.array([0.0, 1e-9])}
  d = adamfx.adam_diagnostics(_hand_state(), b1=0.5, b2=0.75, eps=1e-8, quantiles=(),
                              grads=grads)
  np.testing.assert_allclose(float(d['stable_rms_max']), math.sqrt(2.5), rtol=1e-6)
  np.testing.assert_allclose(float(d['clip_factor_min']), 1 / math.sqrt(2.5), rtol=1e-6)
  np.testing.assert_allclose(float(d['cautious_fraction']), 0.75, rtol=1e-6)


def test_without_updates_has_no_step_keys_and_quantiles_optional():
  d = adamfx.adam_diagnostics(_hand_state(), b1=0.5, b2=0.75, quantiles=())
  assert not any(k.startswith('step_') and 'bound' not in k for k in d)
  assert not any(k.startswith('snr_q') for k in d)


def test_fresh_state_is_all_zero_not_nan():
  state = adamfx.adam(1e-3).init({'w': jnp.ones(3)})
  d = adamfx.adam_diagnostics(state)
  for key, value in d.items():
    assert np.isfinite(float(value)), key
  assert float(d['snr_max']) == 0.0
  assert float(d['bias_correction_nu']) == 0.0
  assert float(d['eps_dominated_fraction']) == 1.0


def _numpy_adam(grads, b1=0.9, b2=0.999, eps=1e-8, lr=1e-3):
  """The paper's Algorithm 1 in float64; returns (m_hat, v_hat, update) at the end."""
  m = np.zeros_like(grads[0])
  v = np.zeros_like(grads[0])
  for t, g in enumerate(grads, start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    update = -lr * m_hat / (np.sqrt(v_hat) + eps)
  return m_hat, v_hat, update


@pytest.mark.parametrize('source', ['adamfx', 'optax'])
def test_matches_float64_algorithm_1(source):
  rng = np.random.default_rng(0)
  grads = [rng.normal(0.3, 1.0, size=(5, 7)) for _ in range(25)]
  lr = 1e-2
  tx = adamfx.adam(lr) if source == 'adamfx' else optax.adam(lr)
  params = jnp.zeros((5, 7))
  with optax_promotion():
    state = tx.init(params)
    for g in grads:
      updates, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
  d = adamfx.adam_diagnostics(state, updates, lr, quantiles=(0.5, 0.9))
  m_hat, v_hat, update = _numpy_adam(grads, lr=lr)
  snr = np.abs(m_hat) / np.sqrt(v_hat)
  step = np.abs(update) / lr
  # float32 moments after 25 steps: ~1e-6 relative error, 1e-5 leaves room.
  tol = dict(rtol=1e-5)
  np.testing.assert_allclose(float(d['snr_mean']), snr.mean(), **tol)
  np.testing.assert_allclose(float(d['snr_max']), snr.max(), **tol)
  np.testing.assert_allclose(float(d['snr_q50']), np.quantile(snr, 0.5), **tol)
  np.testing.assert_allclose(float(d['snr_q90']), np.quantile(snr, 0.9), **tol)
  np.testing.assert_allclose(float(d['step_max']), step.max(), **tol)
  np.testing.assert_allclose(float(d['step_mean']), step.mean(), **tol)
  # 1 - b2**t cancels: float32's 0.999 is 0.999 + 1.3e-8, which alone moves
  # 1 - 0.999**25 by 1.3e-5 relative. Compare with the float32 b2, powered in float64.
  np.testing.assert_allclose(
      float(d['bias_correction_nu']), 1 - float(np.float32(0.999)) ** 25, rtol=1e-6
  )
  assert int(d['count']) == 25
  assert float(d['eps_dominated_fraction']) == 0.0


def test_finds_adam_state_inside_chains_and_under_jit():
  tx = optax.chain(optax.clip_by_global_norm(1.0), adamfx.inject_hyperparams(adamfx.adam)(0.1))
  params = {'w': jnp.array([1.0, -2.0, 0.0]), 'b': jnp.zeros(())}
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.tree.map(lambda p: p + 0.5, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, adamfx.adam_diagnostics(state)

  with optax_promotion():
    for _ in range(3):
      params, state, d = step(params, state)
  eager = adamfx.adam_diagnostics(state)
  assert int(d['count']) == 3
  for key in d:
    np.testing.assert_allclose(float(d[key]), float(eager[key]), rtol=1e-6, err_msg=key)


def test_amsgrad_uses_nu_max():
  # nu_max is already bias-corrected: v_hat = nu_max = [4, 0.25] -> SNR [1, 4].
  state = adamfx.AdamState(
      count=jnp.asarray(1, jnp.int32),
      mu=jnp.array([0.5 * 2, 0.5 * 2]),
      nu=jnp.array([123.0, 456.0]),
      nu_max=jnp.array([4.0, 0.25]),
  )
  d = adamfx.adam_diagnostics(state, b1=0.5, b2=0.75, quantiles=())
  np.testing.assert_allclose(float(d['snr_max']), 4.0, rtol=1e-6)
  np.testing.assert_allclose(float(d['snr_mean']), 2.5, rtol=1e-6)


def test_errors():
  with pytest.raises(ValueError, match='needs a state holding an adamfx.AdamState'):
    adamfx.adam_diagnostics(optax.sgd(0.1).init(jnp.zeros(2)))
  with pytest.raises(ValueError, match='`learning_rate` is needed'):
    adamfx.adam_diagnostics(_hand_state(), updates=jnp.zeros(4))


def test_step_bound_is_attained_by_geometric_growth_and_exceeds_the_paper_approximation():
  b1, b2, lr = 0.9, 0.999, 1e-3
  for t in (1, 10, 100, 3000):
    grads = [np.array([(b2 / b1) ** i]) for i in range(1, t + 1)]
    _, _, update = _numpy_adam(grads, b1, b2, eps=0.0, lr=lr)
    # float64 sums of t terms: 1e-10 relative.
    np.testing.assert_allclose(abs(update[0]) / lr, adamfx.adam_step_bound(t, b1, b2), rtol=1e-10)
  limit = (1 - b1) / math.sqrt((1 - b2) * (1 - b1 * b1 / b2))
  np.testing.assert_allclose(adamfx.adam_step_bound(10**7), limit, rtol=1e-12)
  assert 7.0 < adamfx.adam_step_bound(3000) < 7.2 < limit < 7.3
  assert adamfx.adam_step_bound(3000) > 2 * (1 - b1) / math.sqrt(1 - b2)
  # The array path (float32, for use under jit) agrees with the float64 one.
  ts = jnp.array([1, 10, 100, 3000], jnp.int32)
  np.testing.assert_allclose(
      adamfx.adam_step_bound(ts), [adamfx.adam_step_bound(int(t)) for t in ts], rtol=1e-5
  )


def test_step_bound_holds_for_random_histories():
  rng = np.random.default_rng(1)
  for t in (1, 5, 50, 400):
    bound = adamfx.adam_step_bound(t)
    grads = [rng.standard_cauchy(size=200) * rng.uniform(0, 10, size=200) for _ in range(t)]
    _, _, update = _numpy_adam(grads, eps=0.0, lr=1.0)
    assert np.abs(update).max() <= bound * (1 + 1e-12)


def _mp_bound(t, b1, b2):
  """adam_step_bound in 60-digit arithmetic (mpmath), from the formula."""
  import mpmath

  with mpmath.workdps(60):
    b1, b2 = mpmath.mpf(b1), mpmath.mpf(b2)
    r = b1 * b1 / b2
    series = t if r == 1 else (1 - r**t) / (1 - r)
    return float((1 - b1) / mpmath.sqrt(1 - b2) * mpmath.sqrt((1 - b2**t) * series)
                 / (1 - b1**t))


@pytest.mark.parametrize(
    ('t', 'b1', 'b2'),
    [(1, 0.9, 0.999), (2, 0.9, 0.999), (3000, 0.9, 0.999), (10**6, 0.9, 0.99999999),
     (10**4, 0.99, 0.9), (10**9, 0.9, 0.999), (7, 0.0, 0.5), (50, 0.5, 0.25)],
)
def test_step_bound_matches_mpmath_on_both_paths(t, b1, b2):
  want = _mp_bound(t, b1, b2)
  np.testing.assert_allclose(adamfx.adam_step_bound(t, b1, b2), want, rtol=1e-12)
  got = adamfx.adam_step_bound(jnp.asarray(t), b1, b2)
  if want > float(jnp.finfo(got.dtype).max):
    assert np.isinf(got)  # past float32's range: inf, not a wrong finite number
  else:
    np.testing.assert_allclose(float(got), want, rtol=2e-6)


def test_step_bound_is_exactly_one_at_t_1():
  for b1, b2 in [(0.9, 0.999), (0.5, 0.9), (0.99, 0.9999)]:
    assert adamfx.adam_step_bound(1, b1, b2) == 1.0
    assert float(adamfx.adam_step_bound(jnp.asarray(1), b1, b2)) == 1.0


def test_step_bound_int_path_does_not_overflow():
  # b1**2 > b2: the bound grows like (b1**2 / b2)**(t / 2); 1e184 fits a float.
  np.testing.assert_allclose(adamfx.adam_step_bound(10**4, 0.99, 0.9), _mp_bound(10**4, 0.99, 0.9),
                             rtol=1e-11)


@pytest.mark.parametrize(
    ('args', 'match'),
    [((0,), '`t` must be >= 1'), ((-3,), '`t` must be >= 1'),
     ((5, 1.0, 0.999), r'`b1` must be in \[0, 1\)'), ((5, 0.9, 1.0), r'`b2` must be in \[0, 1\)'),
     ((5, -0.1, 0.999), '`b1`'), ((5, 0.9, 0.0), '`b2` = 0'),
     ((jnp.asarray([3, 0]),), '`t` must be >= 1')],
)
def test_step_bound_refuses_undefined_arguments(args, match):
  with pytest.raises(ValueError, match=match):
    adamfx.adam_step_bound(*args)


def test_diagnostics_dequantize_8bit_state():
  """8-bit state: the numbers of its dequantized moments (no uint8 error)."""
  params = jnp.linspace(-1.0, 1.0, 512)
  tx8 = adamfx.adam8bit(0.1, min_8bit_size=256)
  state = tx8.init(params)
  updates, state = tx8.update(params * 2, state, params)
  d = adamfx.adam_diagnostics(state, updates, 0.1)
  # Exactly the numbers of the same moments held in float32 (tested
  # dequantization, see test_quant.py) ...
  from adamfx._formats import quant as _quant

  s = state[0]
  deq = lambda q: _quant.dequantize(q, signed=q.signed, block_size=q.block_size)
  f32 = adamfx.AdamState(s.count, deq(s.mu), deq(s.nu))
  want = adamfx.adam_diagnostics((f32,), updates, 0.1)
  for key in want:
    np.testing.assert_allclose(float(d[key]), float(want[key]), rtol=1e-6, err_msg=key)
  # ... and close to float32 Adam's. The mean keeps the codes' 2-3 digits (10%). The
  # maxima are those of the elements far below their block's maximum (here the gradients
  # near 0 of the linspace, nu ~1e-5 of the block's), whose codes are a decade apart at
  # the map's small end: nu's stochastic codes (issue 24) put such an element's nu on
  # either neighbour, so its SNR is within sqrt(10) of float32's, not within 10%.
  ref = adamfx.adam(0.1)
  r_updates, r_state = ref.update(params * 2, ref.init(params), params)
  exact = adamfx.adam_diagnostics(r_state, r_updates, 0.1)
  np.testing.assert_allclose(float(d['snr_mean']), float(exact['snr_mean']), rtol=0.1)
  for key in ('snr_max', 'step_max'):
    ratio = float(d[key]) / float(exact[key])
    assert 10**-0.5 <= ratio <= 10**0.5, (key, ratio)


def test_diagnostics_refuse_adamax():
  tx = adamfx.adamax(0.1)
  state = tx.init(jnp.ones(3))
  _, state = tx.update(jnp.ones(3), state)
  with pytest.raises(ValueError, match='AdaMax'):
    adamfx.adam_diagnostics(state)
  assert isinstance(state[0], adamfx.AdamState)  # still a drop-in state


@pytest.mark.parametrize('member', ['torch_adam', 'keras_adam', 'adam'])
def test_amsgrad_snr_is_that_of_the_step_taken(member):
  """torch/Keras keep nu_max as the max of the *raw* nu; optax/adamfx bias-correct it.

  Reference: float64 NumPy AMSGrad of each convention. With eps = 0 the step
  |update| / lr is the SNR coordinate by coordinate, so the two must agree.
  """
  b1, b2, lr = 0.9, 0.999, 1e-2
  grads = [np.array([1.0, -2.0, 0.5]), np.array([0.1, -0.1, 3.0]), np.array([0.2, 0.3, -0.4])]
  eps = {'epsilon': 0.0} if member == 'keras_adam' else {'eps': 0.0}
  tx = getattr(adamfx, member)(lr, amsgrad=True, **eps)
  state = tx.init(jnp.zeros(3))
  m = v = vmax = np.zeros(3)
  for t, g in enumerate(grads, 1):
    updates, state = tx.update(jnp.asarray(g, jnp.float32), state, jnp.zeros(3))
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    if member == 'adam':  # max of the bias-corrected nu
      vmax = np.maximum(vmax, v / (1 - b2**t))
      v_hat = vmax
    else:  # max of the raw nu, corrected at use
      vmax = np.maximum(vmax, v)
      v_hat = vmax / (1 - b2**t)
  snr = np.abs(m / (1 - b1**t)) / np.sqrt(v_hat)
  d = adamfx.adam_diagnostics(state, updates, lr, b1=b1, b2=b2, eps=0.0)
  # float32 1 - 0.999**3 (= 0.003) carries ~2e-5 relative error (an ulp of
  # 0.997 over 0.003); its square root half that.
  np.testing.assert_allclose(float(d['snr_max']), snr.max(), rtol=3e-5)
  np.testing.assert_allclose(float(d['snr_max']), float(d['step_max']), rtol=1e-5)


@pytest.mark.parametrize('kwargs, match', [
    (dict(quantiles=(0.5, -0.1)), r'each of `quantiles` must be a number in \[0, 1\], got -0.1'),
    (dict(quantiles=(1.5,)), r'`quantiles` .* got 1.5'),
    (dict(b2=1.0), r'`b2` must be in \[0, 1\), got 1.0'),
    (dict(b1=-0.5), r'`b1` must be in \[0, 1\), got -0.5'),
    (dict(eps=-1.0), r'`eps` must be a number >= 0, got -1.0'),
    (dict(learning_rate=0.0), r'`learning_rate` must be > 0 and finite, got 0.0'),
    (dict(learning_rate=-1e-3), r'`learning_rate` must be > 0 and finite, got -0.001'),
])
def test_diagnostics_validate_their_arguments(kwargs, match):
  """Quantiles outside [0, 1] made a key `snr_q-10`, lr = 0 a step_max of inf,
  b2 = 1 a raw ZeroDivisionError."""
  tx = adamfx.adam(1e-3)
  params = jnp.ones(3)
  updates, state = tx.update(params, tx.init(params))
  lr = kwargs.pop('learning_rate', 1e-3)
  with pytest.raises(ValueError, match=match):
    adamfx.adam_diagnostics(state, updates, lr, **kwargs)


def test_eager_call_is_one_compiled_call_with_the_jitted_numbers():
  # Logged eagerly from a notebook, the diagnostics are one compiled call (not
  # dozens of array operations), the program jit compiles: the same bits.
  params = {'w': jnp.linspace(-1.0, 1.0, 7 * 13).reshape(7, 13), 'b': jnp.arange(13.0)}
  tx = adamfx.adamw(1e-2, weight_decay=0.1)
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(params, state, params)
  kw = dict(b1=0.9, b2=0.999, eps=1e-8, quantiles=(0.5, 0.75))
  with harness.compiled_programs() as compiled:
    got = adamfx.adam_diagnostics(state, updates, 1e-2, grads=params, **kw)
  assert len(compiled) == 1, compiled
  want = jax.jit(lambda s, u, g: adamfx.adam_diagnostics(s, u, 1e-2, grads=g, **kw))(
      state, updates, params)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
  # An array learning rate and eps are arguments of the compiled call.
  arrays = adamfx.adam_diagnostics(state, updates, jnp.asarray(1e-2), grads=params,
                                   **{**kw, 'eps': jnp.asarray(1e-8)})
  for k in want:
    np.testing.assert_allclose(np.asarray(arrays[k]), np.asarray(want[k]), rtol=1e-6, err_msg=k)
