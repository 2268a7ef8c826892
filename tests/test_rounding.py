"""Tests of adamfx._core.rounding: the 16-bit storage rule of the second moment.

References are independent of adamfx: ml_dtypes' NumPy bfloat16/float16 for
the neighbours and for the naive round-to-nearest recursion, float64 NumPy
for the true second moment.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import adamfx
from adamfx._core import rounding as _rounding

NARROW = [jnp.bfloat16, jnp.float16]


def _np_dtype(dtype):
  return {jnp.bfloat16: ml_dtypes.bfloat16, jnp.float16: np.float16}[dtype]


@pytest.mark.parametrize('dtype', NARROW)
def test_rounds_to_a_neighbour_and_is_unbiased(dtype):
  rng = np.random.default_rng(0)
  # One value per "cell", repeated: 64 values x 2048 copies.
  values = rng.uniform(0.5, 4.0, size=64).astype(np.float32)
  x = np.repeat(values[:, None], 2048, axis=1)
  y = np.asarray(
      _rounding.stochastic_round(
          jnp.asarray(x), dtype, _rounding.random_bits(x.shape, 7, 3)
      ).astype(jnp.float32)
  )
  npd = _np_dtype(dtype)
  down = values.astype(npd)  # round-to-nearest, then fix to the floor
  down = np.where(down.astype(np.float32) > values, np.nextafter(down, npd(-np.inf)), down)
  up = np.nextafter(down, npd(np.inf))
  down32, up32 = down.astype(np.float32), up.astype(np.float32)
  exact = down32 == values
  assert np.all((y == down32[:, None]) | (y == up32[:, None]))
  assert np.all(y[exact] == values[exact, None])
  # Unbiased: the mean of 2048 Bernoulli draws is within 5 standard errors.
  p = (values - down32) / (up32 - down32)
  mean_p = (y.mean(axis=1) - down32) / (up32 - down32)
  se = np.sqrt(p * (1 - p) / x.shape[1]) + 1e-12
  assert np.all(np.abs(mean_p - p) <= 5 * se + 1e-6)


def test_saturates_and_keeps_nan():
  x = jnp.array([3e38, -3e38, jnp.nan, 70000.0, -1e5])
  bits = _rounding.random_bits(x.shape, 1, 0)
  y16 = _rounding.stochastic_round(x, jnp.float16, bits)
  np.testing.assert_array_equal(
      np.asarray(y16, np.float32), [65504, -65504, np.nan, 65504, -65504]
  )
  xb = jnp.array([jnp.finfo(jnp.float32).max, -jnp.inf, jnp.nan, 0.0, -0.0])
  yb = _rounding.stochastic_round(xb, jnp.bfloat16, _rounding.random_bits(xb.shape, 1, 0))
  big = float(jnp.finfo(jnp.bfloat16).max)
  np.testing.assert_array_equal(np.asarray(yb, np.float32), [big, -big, np.nan, 0, 0])


def test_bits_are_deterministic_and_vary_with_count_and_leaf():
  a = np.asarray(_rounding.random_bits((4, 256), jnp.int32(5), 2))
  np.testing.assert_array_equal(a, np.asarray(jax.jit(
      _rounding.random_bits, static_argnums=(0, 2))((4, 256), jnp.int32(5), 2)))
  for other in (
      _rounding.random_bits((4, 256), jnp.int32(6), 2),
      _rounding.random_bits((4, 256), jnp.int32(5), 3),
  ):
    # Independent streams: about half the bits differ.
    frac = np.unpackbits((a ^ np.asarray(other)).view(np.uint8)).mean()
    assert 0.45 < frac < 0.55
  # Roughly uniform: each of 16 top-nibble buckets holds ~1/16 of 1024 values.
  hist = np.bincount(a.ravel() >> 28, minlength=16)
  assert hist.min() > 30 and hist.max() < 100


def test_wide_storage_is_the_plain_cast():
  x = jnp.array([1.0 + 2.0**-20, 3e38])
  y = _rounding.store_second_moment(x, jnp.float32, jnp.int32(1), 0)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def _nu_trajectory(tx, g_schedule):
  """nu after each step of ``tx`` fed the gradients ``g_schedule`` (T, n)."""
  params = jnp.zeros(g_schedule.shape[1], jnp.float32)

  @jax.jit
  def run(gs):
    def body(state, g):
      _, state = tx.update(g, state)
      return state, state.nu.astype(jnp.float32)

    return jax.lax.scan(body, tx.init(params), gs)[1]

  return np.asarray(run(jnp.asarray(g_schedule)))


def _reference_nu(gs, b2):
  """Adam's nu recursion in float64."""
  nu = np.zeros(gs.shape[1])
  out = []
  for g in gs.astype(np.float64):
    nu = b2 * nu + (1 - b2) * g * g
    out.append(nu)
  return np.stack(out)


@functools.lru_cache
def _stall_schedule():
  # 200 steps of |g| ~ 1, then 1500 steps of |g| ~ 0.01: the true nu decays
  # by 0.999**1500 ~ 0.22 towards 1e-4.
  rng = np.random.default_rng(1)
  n = 1024
  big = rng.choice([-1.0, 1.0], size=(200, n)) * rng.uniform(0.8, 1.2, size=(200, n))
  small = 0.01 * rng.standard_normal((1500, n))
  return np.concatenate([big, small]).astype(np.float32)


def test_naive_bf16_nu_stalls_and_stochastic_rounding_does_not():
  gs = _stall_schedule()
  b2 = 0.999
  truth = _reference_nu(gs, b2)
  # Naive storage (what optax would do with a bf16 nu): round-to-nearest.
  naive = np.zeros(gs.shape[1], np.float64)
  naive_traj = []
  for g in gs.astype(np.float64):
    naive = (b2 * naive + (1 - b2) * g * g).astype(ml_dtypes.bfloat16).astype(np.float64)
    naive_traj.append(naive)
  naive_traj = np.stack(naive_traj)
  ours = _nu_trajectory(adamfx.scale_by_adam(b2=b2, nu_dtype=jnp.bfloat16), gs)

  # The naive version is frozen through the whole decaying phase ...
  np.testing.assert_array_equal(naive_traj[-1], naive_traj[200])
  assert np.median(naive_traj[-1] / truth[-1]) > 3.5
  # ... while stochastic rounding tracks the float64 truth. Each step adds an
  # independent zero-mean rounding error of relative std at most
  # 2**-7 / sqrt(6) (gap of bf16 just above a power of two, uniform position),
  # and the decay scales old errors with the signal, so per element the
  # relative error is a random walk: std <= 2**-7 * sqrt(t / 6). The mean over
  # 1024 independent elements is unbiased: within 5 standard errors of 1.
  for t in (199, 700, 1699):
    ratio = ours[t] / truth[t]
    assert ratio.std() <= 2.0**-7 * np.sqrt((t + 1) / 6), (t, ratio.std())
    assert abs(ratio.mean() - 1) < 5 * ratio.std() / np.sqrt(ratio.size), (t, ratio.mean())


def test_adam_steps_recover_after_gradients_shrink():
  """With a stalled nu the step stays ~100x too small; with SR it is ~lr."""
  gs = jnp.asarray(_stall_schedule())

  def mean_steps(tx):
    def body(state, g):
      u, state = tx.update(g, state)
      return state, jnp.mean(jnp.abs(u))

    run = jax.jit(lambda gs: jax.lax.scan(body, tx.init(gs[0]), gs)[1])
    return np.asarray(run(gs))

  ours = mean_steps(adamfx.scale_by_adam(nu_dtype=jnp.bfloat16))
  f32 = mean_steps(adamfx.scale_by_adam())
  # Same step sizes as float32 storage, within 3 % at the end (the mean of
  # 1024 |m / sqrt(nu)| with ~5 % SR noise per element).
  assert abs(ours[-1] / f32[-1] - 1) < 0.03


@pytest.mark.parametrize('dtype', NARROW)
def test_adamax_infinity_norm_decays_in_16_bit(dtype):
  tx = adamfx.scale_by_adamax()
  # AdaMax's nu is max(b2 * nu, |g|): with g = 0 it must decay as b2**t.
  state = tx.init(jnp.zeros(512, dtype))
  _, state = tx.update(jnp.ones(512, dtype), state)
  upd = jax.jit(tx.update)
  for _ in range(300):
    _, state = upd(jnp.zeros(512, dtype), state)
  mean = float(state.nu.astype(jnp.float32).mean())
  assert abs(mean / 0.999**300 - 1) < 0.01


def test_vmap_and_strict_promotion():
  tx = adamfx.scale_by_adam(nu_dtype=jnp.bfloat16)
  params = jnp.zeros((3, 16))
  states = jax.vmap(tx.init)(params)
  g = jnp.ones((3, 16))
  u, states = jax.jit(jax.vmap(tx.update))(g, states)
  assert states.nu.dtype == jnp.bfloat16
  # The update is read off the stored moments (the in-place formulation of
  # bfloat16 storage): float64 Adam on the stored nu, which is 0.001 rounded
  # up or down to a bfloat16 neighbour.
  nu = np.asarray(states.nu.astype(jnp.float32), np.float64)
  # 0.001's bfloat16 neighbours: 0x3A83 and 0x3A84 (2**-10 * (1 + 3/128), (1 + 4/128)).
  assert set(np.unique(nu).tolist()) <= {2.0**-10 * (1 + 3 / 128), 2.0**-10 * (1 + 4 / 128)}
  # float64 arithmetic on float32 hyperparameters (the bias corrections
  # 1 - b**t are float32 numbers in a float32 step).
  f = np.float32
  m_hat = np.float64(f(1) - f(0.9)) / np.float64(f(1) - f(0.9))
  ref_u = m_hat / (np.sqrt(nu / np.float64(f(1) - f(0.999))) + 1e-8)
  np.testing.assert_allclose(np.asarray(u), ref_u, rtol=1e-6)
  # vmapped, every row (and its random bits) is the unbatched step's.
  u0, s0 = jax.jit(tx.update)(g[0], tx.init(params[0]))
  np.testing.assert_array_equal(np.asarray(u), np.broadcast_to(u0, u.shape))
  np.testing.assert_array_equal(np.asarray(states.nu), np.broadcast_to(s0.nu, u.shape))


@pytest.mark.parametrize('jit', [False, True])
def test_multi_transform_partitions_get_their_own_rounding_bits(jit):
  """Every partition's first leaf was leaf 0: two partitions with the same
  gradients stored the same stochastically rounded nu (correlated errors).
  Counting optax.MaskedNode places, each leaf keeps its index in the full
  tree: the partitioned state is the unpartitioned one, bit for bit."""
  params = {'a': jnp.ones(4096), 'b': jnp.ones(4096)}
  grads = {'a': jnp.full(4096, 0.3), 'b': jnp.full(4096, 0.3)}
  inner = lambda: adamfx.adam(1e-3, nu_dtype=jnp.bfloat16)
  tx = optax.multi_transform({'x': inner(), 'y': inner()}, {'a': 'x', 'b': 'y'})
  plain = inner()
  state, plain_state = tx.init(params), plain.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  plain_update = jax.jit(plain.update) if jit else plain.update
  for _ in range(3):
    _, state = update(grads, state, params)
    _, plain_state = plain_update(grads, plain_state, params)
  nu_a = state.inner_states['x'].inner_state[0].nu['a']
  nu_b = state.inner_states['y'].inner_state[0].nu['b']
  assert float(jnp.mean(nu_a != nu_b)) > 0.3  # ~half the elements round apart
  np.testing.assert_array_equal(nu_a, plain_state[0].nu['a'])
  np.testing.assert_array_equal(nu_b, plain_state[0].nu['b'])
