"""Tests of adamfx._formats.codec8, the nearest-code search of 8-bit moments.

References: a float64 brute-force quantiser (tests/reference.py
``quantize8``) and a brute-force argmin over the map. The table search
rounds at float32 midpoints; the float64 reference at exact ones, so the two
may differ only for elements within float32 rounding of a midpoint: the
tests count those and require them to be that close.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import adamfx
from adamfx._formats import codec8 as _codec8
from adamfx._formats import quant as _quant


def _midpoints64(values):
  v = np.asarray(values, np.float64)
  return (v[:-1] + v[1:]) / 2


def _near_a_tie(a, values, ulps=2):
  """Whether float32 ``a`` is within ``ulps`` float32 ulps of a midpoint."""
  a = np.asarray(a, np.float64)
  mids = _midpoints64(values)
  j = np.clip(np.searchsorted(mids, a), 1, len(mids) - 1)
  d = np.minimum(np.abs(a - mids[j - 1]), np.abs(a - mids[j]))
  return d <= ulps * np.spacing(np.float32(np.maximum(a, 1e-38))).astype(np.float64)


@pytest.mark.parametrize('signed', [True, False])
def test_nearest_index_is_the_nearest_value(signed):
  values = _quant._magnitudes(signed)
  mids = _midpoints64(values).astype(np.float32)
  rng = np.random.default_rng(0)
  # Every bfloat16 interval's bottom and top, every midpoint +-1 ulp, and
  # random magnitudes on a log scale down to 1e-9, plus 0 and 1.
  edges = (np.arange(0x3F81, dtype=np.uint32) << 16).view(np.float32)
  a = np.concatenate([
      edges, np.nextafter(edges, np.float32(0)), mids, np.nextafter(mids, np.float32(0)),
      np.nextafter(mids, np.float32(1)),
      (10.0 ** rng.uniform(-9, 0, 200_000)).astype(np.float32), [0, 1],
  ]).astype(np.float32)
  a = a[(a >= 0) & (a <= 1)]
  got = np.asarray(_codec8.nearest_index(jnp.asarray(a), values))
  want = np.argmin(np.abs(a.astype(np.float64)[:, None] - values.astype(np.float64)), axis=1)
  differ = got != want
  assert np.all(np.abs(got - want) <= 1)
  assert np.all(_near_a_tie(a[differ], values)), a[differ][:5]
  # Where they differ, both are (to float32 rounding) equally near.
  d_got = np.abs(a[differ] - values[got[differ]].astype(np.float64))
  d_want = np.abs(a[differ] - values[want[differ]].astype(np.float64))
  ulp = np.spacing(a[differ]).astype(np.float64)
  assert np.all(np.abs(d_got - d_want) <= 2 * ulp)


@pytest.mark.parametrize('signed', [True, False])
def test_quantize_matches_the_float64_reference(signed):
  rng = np.random.default_rng(1)
  blocks = []
  for scale in (1e-30, 1e-6, 1.0, 1e6, 3e37, 1e38):  # past 2**120: the scaled reciprocal
    b = np.clip(rng.standard_normal((8, 256)), -1.4, 1.4) * scale
    b[:, 0] = scale * 1.5  # an exact absmax
    blocks.append(b if signed else np.abs(b))
  heavy = rng.standard_cauchy((16, 256))  # a wide spread inside each block
  blocks.append(heavy if signed else np.abs(heavy))
  x = np.concatenate(blocks).astype(np.float32)
  q = _quant.quantize(jnp.asarray(x.reshape(-1)), signed=signed, block_size=256)
  code_map = _quant.dynamic_map(signed)
  want, scale, xn = reference.quantize8(x, code_map, 256, signed)
  np.testing.assert_array_equal(np.asarray(q.scale), scale.astype(np.float32))
  got = np.asarray(q.codes).astype(np.int64)
  differ = got != want
  assert differ.mean() < 1e-3
  mags = _quant._magnitudes(signed)
  assert np.all(_near_a_tie(np.abs(xn[differ]).astype(np.float32), mags)), xn[differ][:5]


def test_adam8bit_step_matches_float64_adam_then_reference_quantiser():
  rng = np.random.default_rng(2)
  n = 8192
  params = jnp.zeros(n)
  tx = adamfx.scale_by_adam8bit(min_8bit_size=1024)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(3):
    g = jnp.asarray(rng.standard_normal(n).astype(np.float32) * np.float32(0.1))
    prev = state
    u, state = step(g, state)
  t = 3
  m_old = np.asarray(_quant.dequantize(prev.mu, signed=True), np.float64)
  v_old = np.asarray(_quant.dequantize(prev.nu, signed=False), np.float64)
  g64 = np.asarray(g, np.float64)
  m = 0.9 * m_old + 0.1 * g64
  v = 0.999 * v_old + 0.001 * g64**2
  want_u = (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
  # Updates are O(1); atol covers float32's cancellation in 0.9 m + 0.1 g
  # where the two nearly cancel (about 5e-8 seen).
  np.testing.assert_allclose(np.asarray(u, np.float64), want_u, rtol=2e-5, atol=1e-6)
  # nu's codes are rounded stochastically (issue 24): the reference rounds
  # in float64 with the library's uniform draws (see reference.Adam8bit).
  draws = reference.Adam8bit(1.0, block_size=256)
  draws.t = t
  uniform = draws._uniform(n, 0)
  for signed, x, q in ((True, m, state.mu), (False, v, state.nu)):
    want, scale, xn = reference.quantize8(
        x, _quant.dynamic_map(signed), 256, signed, None if signed else uniform)
    np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6)
    got = np.asarray(q.codes).astype(np.int64)
    differ = got != want
    # float32 arithmetic moves x / scale by a few ulps: codes differ only
    # next to a midpoint (nearest) or next to the draw (stochastic: where
    # (x / scale - lo) / (hi - lo) is within 8 ulps of x / scale of u).
    assert differ.mean() < 1e-3
    if signed:
      assert np.all(_near_a_tie(np.abs(xn[differ]).astype(np.float32),
                                _quant._magnitudes(signed), ulps=8))
    else:
      values = _quant.dynamic_map(False).astype(np.float64)
      a = xn[differ]
      lo = np.clip(np.searchsorted(values, a, side='right') - 1, 0, 254)
      gap = values[lo + 1] - values[lo]
      slack = 8 * np.spacing(np.float32(np.maximum(a, 1e-38))).astype(np.float64) / gap
      assert np.all(np.abs((a - values[lo]) / gap - uniform[differ]) <= slack)


@pytest.mark.parametrize('signed', [True, False])
def test_map_value_is_the_code_map_bit_for_bit(signed):
  codes = jnp.arange(256, dtype=jnp.uint8)
  got = np.asarray(jax.jit(_codec8.map_value, static_argnums=1)(codes, signed))
  want = _quant.dynamic_map(signed)
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
  # Under a block scale, as dequantize reads it.
  q = _quant.QuantizedArray(codes=codes, scale=jnp.array([3.0], jnp.float32))
  np.testing.assert_array_equal(
      np.asarray(_quant.dequantize(q, signed=signed)), want * np.float32(3))


@pytest.mark.parametrize('nesterov', [False, True])
def test_adam8bit_step_is_float32_adam_on_the_decoded_moments(nesterov):
  """The 8-bit step's update and new moments are adamfx.adam's float32 step
  from the dequantized moments, then quantize()'s codes and scales -- to
  float32 rounding: XLA compiles the two programs' arithmetic differently
  (a last-bit difference, visible where 0.9 m + 0.1 g nearly cancels), as
  it did before the 8-bit step read its update off the new moments."""
  rng = np.random.default_rng(3)
  n = 4096
  tx = adamfx.scale_by_adam8bit(min_8bit_size=1024, nesterov=nesterov)
  ref = adamfx.scale_by_adam(nesterov=nesterov)
  state = tx.init(jnp.zeros(n))
  step = jax.jit(tx.update)
  for i in range(3):
    g = rng.standard_normal(n).astype(np.float32) * np.float32(0.1)
    if i == 2:
      g[[5, 700]] = [np.nan, np.inf]
    g = jnp.asarray(g)
    prev = state
    u, state = step(g, state)
  m_old = _quant.dequantize(prev.mu, signed=True)
  v_old = _quant.dequantize(prev.nu, signed=False)
  u_ref, s_ref = jax.jit(ref.update)(g, adamfx.AdamState(prev.count, m_old, v_old))
  np.testing.assert_allclose(np.asarray(u), np.asarray(u_ref), rtol=1e-6, atol=1e-7)
  assert np.isnan(np.asarray(u)[[5, 700]]).all()
  bad = ~np.isfinite(np.asarray(g))
  for signed, old, new, q in (
      (True, m_old, s_ref.mu, state.mu), (False, v_old, s_ref.nu, state.nu)):
    new = jnp.where(bad, old, new)  # a non-finite element keeps its history
    # nu's codes are stochastically rounded, with the bits of (count, leaf 0).
    bits = None if signed else _quant.nu_bits((n,), 256, state.count, 0)
    want = _quant.quantize(new, signed=signed, bits=bits)
    np.testing.assert_allclose(np.asarray(q.scale), np.asarray(want.scale), rtol=1e-6)
    got, want = np.asarray(q.codes, np.int64), np.asarray(want.codes, np.int64)
    assert np.all(np.abs(got - want) <= 1) and np.mean(got != want) < 1e-3


@pytest.mark.parametrize('shape', [(8192,), (16, 1024), (100, 83)])
def test_chunked_8bit_step_is_the_one_piece_step(shape, monkeypatch):
  """Large leaves run the 8-bit step chunk by chunk (whole blocks each);
  blocks are independent, so the result is the one-piece step's, to the
  last bit of float32: XLA's CPU loops compute in vector lanes and in a
  scalar tail, a last bit apart at times (fused multiply-adds), and the
  two programs put different elements in the tails. A code may then move
  to its neighbour where the moment sits on a midpoint."""
  rng = np.random.default_rng(4)
  g = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
  g = g.at[(0,) * len(shape)].set(jnp.nan)

  def run(chunk):
    monkeypatch.setattr(_quant, '_CHUNK', chunk)
    tx = adamfx.scale_by_adam8bit(min_8bit_size=1024, block_size=64)
    assert (_quant._chunks(shape, 64) is not None) == (chunk < 4096)
    state = tx.init(jnp.zeros(shape))
    step = jax.jit(tx.update)
    out = []
    for _ in range(3):
      u, state = step(g, state)
      out.append((u, state))
    return out

  for (u1, s1), (u2, s2) in zip(run(1 << 30), run(256)):
    np.testing.assert_allclose(np.asarray(u1), np.asarray(u2), rtol=2.5e-7, atol=0)
    assert int(s1.count) == int(s2.count)
    for q1, q2 in ((s1.mu, s2.mu), (s1.nu, s2.nu)):
      np.testing.assert_allclose(np.asarray(q1.scale), np.asarray(q2.scale), rtol=2.5e-7)
      c1, c2 = np.asarray(q1.codes, np.int64), np.asarray(q2.codes, np.int64)
      assert np.all(np.abs(c1 - c2) <= 1) and np.mean(c1 != c2) < 2e-3


@pytest.mark.parametrize('block_size', [64, 256])
def test_large_chunks_are_the_small_chunks_step_to_the_bit(block_size, monkeypatch):
  """Chunks of up to ``_CHUNK_MAX`` elements (blocks a multiple of the
  vector width) give the codes, scales and updates of ``_CHUNK``-element
  chunks bit for bit: no loop has a scalar tail in either."""
  rng = np.random.default_rng(7)
  shape = (64, 1024)
  monkeypatch.setattr(_quant, '_CHUNK', 4 * block_size)

  def run(most):
    monkeypatch.setattr(_quant, '_CHUNK_MAX', most)
    chunks = _quant._chunks(shape, block_size)
    tx = adamfx.adam8bit(1e-3, block_size=block_size, min_8bit_size=1024)
    params = jnp.zeros(shape)
    state = tx.init(params)
    step = jax.jit(tx.update)
    out = []
    for i in range(3):
      g = rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 0, shape[-1])
      g = jnp.asarray(g.astype(np.float32))
      if i == 1:
        g = g.at[3, 5].set(jnp.nan)
      u, state = step(g, state, params)
      out.append(jax.tree.map(np.asarray, (u, state)))
    return chunks, out

  small, a = run(4 * block_size)
  rng = np.random.default_rng(7)
  large, b = run(64 * block_size)
  assert (small, large) == (4, 64)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8))
