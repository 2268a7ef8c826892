"""4-bit codec (adamfx._formats.codec4, adamfx.Blockwise4bit) against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adamfx._core import rounding as _rounding
from adamfx._formats import codec4 as _codec4
from adamfx._formats.blockwise4bit import Blockwise4bit

F64 = np.float64


# --- the reference, written from the docs ----------------------------------------


def ref_map(name):
  if name == 'dynamic':
    mags = [0.55e-2, 0.325e-1, 0.775e-1, 0.2125, 0.4375, 0.6625, 0.8875]
    return np.sort(np.array([0.0, 1.0] + mags + [-m for m in mags], F64))
  if name == 'linear':
    return np.arange(1, 17, dtype=F64) / 16
  return 2.0 ** np.arange(-15, 1, dtype=F64)


def ref_quantize(x, name, block_size):
  """(codes per element in the param's layout, scale per block), nearest, ties down."""
  x = np.asarray(x, F64)
  shape = x.shape
  if x.ndim and shape[-1] % block_size == 0:
    xb = x.reshape(shape[:-1] + (shape[-1] // block_size, block_size))
  else:
    n = x.size
    nb = max(1, -(-n // block_size))
    xb = np.pad(x.reshape(-1), (0, nb * block_size - n)).reshape(nb, block_size)
  values = ref_map(name)
  if values[0] < 0:
    hi, lo = xb.max(-1), xb.min(-1)
    scale = np.where(hi >= -lo, hi, lo)
  else:
    scale = xb.max(-1)
  safe = np.where(scale != 0, scale, 1)
  a = np.where(scale[..., None] != 0, xb / safe[..., None], 0)
  dist = np.abs(a[..., None] - values)
  codes = np.argmin(dist, axis=-1)  # first of equal distances: ties down
  return codes, scale, a


def ref_dequantize(codes, scale, name):
  return ref_map(name)[codes] * scale[..., None]


def _unpacked(stored_codes, shape, block_size):
  return np.asarray(_codec4.unpack(_codec4.packed_blocks(stored_codes, shape, block_size)))


# --- maps --------------------------------------------------------------------------


@pytest.mark.parametrize('name', _codec4.MAPS)
def test_maps_match_reference_and_decode_exactly(name):
  values = _codec4.code_map(name)
  np.testing.assert_array_equal(values, ref_map(name).astype(np.float32))
  got = np.asarray(_codec4.decode(jnp.arange(16, dtype=jnp.uint8), name))
  np.testing.assert_array_equal(got, values)  # bit for bit


def test_maps_are_torchaos():
  torch = pytest.importorskip('torch')
  try:
    from torchao.optim import subclass_4bit
  except Exception as e:  # noqa: BLE001 (an optional peer that may fail to import)
    pytest.skip(f'torchao unavailable: {e}')
  del torch
  # torchao computes the midpoints in float32 (torch.linspace); ours are the
  # float64 values rounded once, which 4 of its 16 values miss by one ulp.
  np.testing.assert_array_max_ulp(
      np.asarray(subclass_4bit.get_qmap_signed(), np.float32), _codec4.code_map('dynamic'), 1)
  np.testing.assert_array_equal(
      np.asarray(subclass_4bit.get_qmap_unsigned(), np.float32), _codec4.code_map('linear'))


def test_pack_layout_and_roundtrip():
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 16, (3, 5, 128)).astype(np.uint8)
  packed = np.asarray(_codec4.pack(jnp.asarray(codes)))
  assert packed.shape == (3, 5, 64) and packed.dtype == np.uint8
  np.testing.assert_array_equal(packed & 15, codes[..., :64])
  np.testing.assert_array_equal(packed >> 4, codes[..., 64:])
  np.testing.assert_array_equal(np.asarray(_codec4.unpack(jnp.asarray(packed))), codes)


# --- blockwise quantization ------------------------------------------------------------


def _near_midpoint(a, name):
  values = ref_map(name)
  mids = (values[:-1] + values[1:]) / 2
  return np.min(np.abs(a[..., None] - mids), axis=-1) < 1e-6


@pytest.mark.parametrize('name', _codec4.MAPS)
@pytest.mark.parametrize('shape,block_size', [((4, 6, 64), 64), ((1000, 10), 128), ((37,), 2)])
def test_nearest_codes_and_scales_match_reference(name, shape, block_size):
  rng = np.random.default_rng(1)
  x = rng.standard_normal(shape).astype(np.float32) * np.exp(rng.normal(0, 3, shape))
  x = x.astype(np.float32)
  if not _codec4.signed_map(name):
    x = np.abs(x) ** 2
  codes, scale = _codec4.quantize(jnp.asarray(x), name, block_size)
  assert codes.shape == _codec4.codes_shape(shape, block_size) and codes.dtype == jnp.uint8
  want_codes, want_scale, a = ref_quantize(x, name, block_size)
  np.testing.assert_array_equal(np.asarray(scale), want_scale.astype(np.float32))
  got = _unpacked(codes, shape, block_size)
  ok = (got == want_codes) | _near_midpoint(a, name)
  assert ok.all(), np.argwhere(~ok)[:5]
  deq = np.asarray(_codec4.dequantize(codes, scale, shape, name, block_size))
  want = ref_dequantize(want_codes, want_scale, name)
  if want.ndim == 2 and want.shape[0] * want.shape[1] != np.prod(shape):
    want = want.reshape(-1)[: np.prod(shape)]
  want = want.reshape(shape)
  agree = ok & (got == want_codes)
  agree = agree.reshape(-1)[: np.prod(shape)].reshape(shape)
  np.testing.assert_allclose(deq[agree], want[agree], rtol=2e-7, atol=0)


def test_signed_scale_holds_the_largest_element_exactly():
  x = jnp.asarray(np.array([0.3, -2.0, 0.1, 1.9] * 32, np.float32))
  codes, scale = _codec4.quantize(x, 'dynamic', 128)
  assert float(scale[0]) == -2.0
  deq = np.asarray(_codec4.dequantize(codes, scale, x.shape, 'dynamic', 128))
  assert deq[1] == -2.0


@pytest.mark.parametrize('name', ['linear', 'power2'])
def test_second_moment_never_decodes_to_zero(name):
  # One large and many tiny (down to 0 exclusive) values in a block.
  x = np.full(128, 1e-30, np.float32)
  x[5] = 1e4
  x[6:20] = np.geomspace(1e-20, 1e3, 14)
  for bits in (None, _rounding.random_bits((1, 128), jnp.int32(3), 0)):
    codes, scale = _codec4.quantize(jnp.asarray(x), name, 128, bits)
    deq = np.asarray(_codec4.dequantize(codes, scale, x.shape, name, 128))
    assert (deq > 0).all()
    floor = ref_map(name)[0] * 1e4
    # Never below the true value where the map cannot reach it.
    assert (deq[x < floor] == np.float32(floor)).all()


@pytest.mark.parametrize('name', _codec4.MAPS)
def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased(name):
  rng = np.random.default_rng(2)
  values = ref_map(name)
  lo_end = values[0] if values[0] > 0 else -1.0
  a = rng.uniform(max(lo_end, values[0]), 1.0, 128 * 8)
  a[0::128] = 1.0  # the scale of every block is 1
  x = jnp.asarray(a.astype(np.float32))
  a32 = np.asarray(x, F64)

  def draw(step):
    bits = _rounding.random_bits((8, 128), step, 7)
    codes, scale = _codec4.quantize(x, name, 128, bits)
    return _codec4.dequantize(codes, scale, x.shape, name, 128)

  draws = np.asarray(jax.jit(jax.vmap(draw))(jnp.arange(400, dtype=jnp.int32)), F64)
  values = values.astype(np.float32).astype(F64)  # what float32 decoding gives
  k = np.clip(np.searchsorted(values, a32, side='right') - 1, 0, 15)
  lo, hi = values[k], values[np.minimum(k + 1, 15)]
  assert np.all((draws == lo) | (draws == hi))
  gap = np.where(hi > lo, hi - lo, 1)
  # mean of 400 Bernoulli draws: within 5 standard errors of the value.
  err = np.abs(draws.mean(0) - a32) / gap
  p = np.clip((a32 - lo) / gap, 0, 1)
  assert np.all(err <= 5 * np.sqrt(p * (1 - p) / 400) + 1e-6)


def test_rank1_matches_reference():
  rng = np.random.default_rng(3)
  x = (rng.standard_normal((16, 256)) ** 2).astype(np.float32)
  x[3, 7] = 1e4  # an outlier: only row 3 and column 7 see it
  codes, row, col = _codec4.quantize_rank1(jnp.asarray(x), 'linear', 128)
  x64 = x.astype(F64)
  s = np.minimum(x64.max(1)[:, None], x64.max(0)[None, :])
  np.testing.assert_array_equal(np.asarray(row), x.max(1))
  np.testing.assert_array_equal(np.asarray(col), x.max(0))
  a = x64 / s
  want = np.argmin(np.abs(a[..., None] - ref_map('linear')), axis=-1)
  got = _unpacked(codes, x.shape, 128).reshape(x.shape)
  assert ((got == want) | _near_midpoint(a, 'linear')).all()
  deq = np.asarray(_codec4.dequantize_rank1(codes, row, col, x.shape, 'linear', 128))
  np.testing.assert_allclose(deq, ref_map('linear')[got] * s, rtol=1e-6)
  # Row 3's other elements keep their columns' scale; blockwise, the
  # outlier's block floors them all at a sixteenth of it.
  blk_codes, blk_scale = _codec4.quantize(jnp.asarray(x), 'linear', 128)
  blk = np.asarray(_codec4.dequantize(blk_codes, blk_scale, x.shape, 'linear', 128))
  others = np.arange(128) != 7
  rel = lambda d: np.median(np.abs(d[3, :128] - x[3, :128])[others] / x[3, :128][others])
  assert rel(deq) < 0.5 and rel(blk) > 100


# --- the format ----------------------------------------------------------------------------


def test_format_bytes_per_param():
  fmt = Blockwise4bit()
  p = jax.ShapeDtypeStruct((1024, 512), jnp.float32)
  assert 2 * fmt.nbytes(p) / (1024 * 512) == 1.0625  # <= 1.1 B/param for both moments
  assert not fmt.applies(jnp.zeros(100)) and fmt.nbytes(jnp.zeros(100)) == 400
  assert not fmt.applies(jnp.zeros(5000, jnp.int32))
  mu = fmt.init(p, True)
  got = mu.codes.nbytes + mu.scale.nbytes
  assert got == fmt.nbytes(p)


@pytest.mark.parametrize('rank1', [False, True])
@pytest.mark.parametrize('shape', [(64, 256), (4096 + 3,), (70, 70)])
def test_format_roundtrip_and_init(shape, rank1):
  fmt = Blockwise4bit(rank1=rank1, rounding='nearest')
  rng = np.random.default_rng(4)
  x = rng.standard_normal(shape).astype(np.float32)
  for signed, xx in ((True, x), (False, x * x)):
    z = fmt.init(jnp.asarray(xx), signed)
    np.testing.assert_array_equal(np.asarray(fmt.decode(z, signed)), np.zeros(shape, np.float32))
    s = fmt.encode(jnp.asarray(xx), signed, count=jnp.int32(1), leaf_index=0)
    assert jax.tree.structure(s) == jax.tree.structure(z)
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(z)):
      assert a.shape == b.shape and a.dtype == b.dtype
    deq = np.asarray(fmt.decode(s, signed))
    assert deq.shape == shape
    if not signed and rank1 and len(shape) == 2 and shape[-1] % 128 == 0:
      continue  # checked against its reference above
    codes, scale, _ = ref_quantize(xx, fmt.mu_map if signed else fmt.nu_map, 128)
    want = ref_dequantize(codes, scale, fmt.mu_map if signed else fmt.nu_map)
    want = want.reshape(-1)[: np.prod(shape)].reshape(shape)
    close = np.isclose(deq, want, rtol=1e-6, atol=0)
    assert close.mean() > 0.999  # all but ties at a midpoint


def test_format_non_finite_elements_stay_out_of_the_scale():
  fmt = Blockwise4bit(rounding='nearest')
  x = np.ones((32, 128), np.float32)
  x[0, 3] = np.nan
  x[1, 5] = np.inf
  s = fmt.encode(jnp.asarray(x), False, count=jnp.int32(1), leaf_index=0)
  np.testing.assert_array_equal(np.asarray(s.scale), np.ones((32, 1), np.float32))


def test_format_validates_arguments():
  with pytest.raises(ValueError, match='block_size'):
    Blockwise4bit(block_size=127)
  with pytest.raises(ValueError, match='block_size'):
    Blockwise4bit(block_size=True)
  with pytest.raises(ValueError, match='min_size'):
    Blockwise4bit(min_size=-1)
  with pytest.raises(ValueError, match='nu_map'):
    Blockwise4bit(nu_map='dynamic')
  with pytest.raises(ValueError, match='mu_map'):
    Blockwise4bit(mu_map='linear')
  with pytest.raises(ValueError, match='rounding'):
    Blockwise4bit(rounding='up')
  assert hash(Blockwise4bit()) == hash(Blockwise4bit())  # static under jit


def test_codec_is_jittable():
  fmt = Blockwise4bit()
  x = jnp.asarray(np.random.default_rng(5).standard_normal((8, 256)).astype(np.float32))
  enc = jax.jit(lambda x, c: fmt.encode(x, True, count=c, leaf_index=0))
  s = enc(x, jnp.int32(2))
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda s: fmt.decode(s, True))(s)),
                                np.asarray(fmt.decode(s, True)))
