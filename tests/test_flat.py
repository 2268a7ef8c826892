"""ravel_params and pack_state: layouts, gradient-tree checks, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamfx

PARAMS = {'a': jnp.ones(8), 'b': jnp.ones(4)}


@pytest.fixture(params=[True, False], ids=['with_params', 'init_layout'])
def packed(request):
  tx = adamfx.pack_state(adamfx.adam(1e-2))
  state = tx.init(PARAMS)
  return lambda g: tx.update(g, state, PARAMS if request.param else None)


@pytest.mark.parametrize(
    ('grads', 'match'),
    [
        # (8,) param, (2, 4) gradient: the update used to come back (2, 4).
        ({'a': jnp.ones((2, 4)), 'b': jnp.ones(4)}, r"leaf `\['a'\]`.*shape \(2, 4\).*\(8,\)"),
        # Swapped sizes: the same total, each leaf wrong.
        ({'a': jnp.ones(4), 'b': jnp.ones(8)}, r"leaf `\['a'\]`.*shape \(4,\)"),
        # A leaf missing, the same total size.
        ({'a': jnp.ones(12)}, r"missing from the updates: `\['b'\]`|1 leaves, .* had 2"),
        ({'a': jnp.ones(8), 'b': jnp.ones(4, jnp.bfloat16)}, r"leaf `\['b'\]`.*bfloat16"),
    ],
    ids=['reshaped', 'swapped', 'missing', 'dtype'],
)
def test_pack_state_refuses_gradients_unlike_the_params(packed, grads, match):
  with pytest.raises(ValueError, match=match):
    packed(grads)


def test_pack_state_errors_name_the_users_leaves_not_the_buffers(packed):
  with pytest.raises(ValueError) as info:
    packed({'a': jnp.ones((2, 4)), 'b': jnp.ones(4)})
  assert "['float32']" not in str(info.value)


@pytest.mark.parametrize(
    'inner',
    [
        lambda: adamfx.adamw(1e-2, mask={'a': True, 'b': False}),
        # A mask function would see the packed buffers and decay nothing (or all).
        lambda: adamfx.adamw(1e-2, mask=lambda p: jax.tree.map(lambda x: x.ndim > 0, p)),
        lambda: optax.masked(adamfx.adam(1e-2), {'a': True, 'b': False}),
        lambda: optax.multi_transform({'x': adamfx.adam(1e-2), 'y': optax.sgd(1e-2)},
                                      {'a': 'x', 'b': 'y'}),
    ],
    ids=['adamw_mask_tree', 'adamw_mask_fn', 'masked', 'multi_transform'],
)
def test_pack_state_with_a_mask_inside_says_what_to_write(inner):
  with pytest.raises(ValueError, match=r'optax\.masked\(adamfx\.pack_state\(inner\), mask\)'):
    adamfx.pack_state(inner()).init(PARAMS)


def test_masked_outside_pack_state_works_and_equals_optax():
  mask = {'a': True, 'b': False}
  grads = {'a': jnp.linspace(-1, 1, 8), 'b': jnp.ones(4)}
  tx = optax.masked(adamfx.pack_state(adamfx.adam(1e-2)), mask)
  ref = optax.masked(optax.adam(1e-2), mask)
  with jax.numpy_dtype_promotion('standard'):
    want, _ = ref.update(grads, ref.init(PARAMS), PARAMS)
  got, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-6), got, want)


def test_ravel_params_labels_the_buffers_dtype_under_x32():
  with jax.enable_x64(False):
    flat, unravel = adamfx.ravel_params({'a': np.ones(3), 'b': jnp.ones(2)})
  assert set(flat) == {'float32'} and flat['float32'].dtype == jnp.float32
  assert unravel(flat)['a'].shape == (3,)


def test_ravel_params_keeps_float64_under_x64():
  with jax.enable_x64(True):
    flat, _ = adamfx.ravel_params({'a': np.ones(3), 'b': jnp.ones(2, jnp.float32)})
    assert flat['float64'].dtype == jnp.float64 and flat['float32'].shape == (2,)


@pytest.mark.parametrize('size', [6, 4])
def test_unravel_refuses_a_buffer_of_another_size(size):
  flat, unravel = adamfx.ravel_params({'a': jnp.ones(3), 'b': jnp.ones(2)})
  with pytest.raises(ValueError, match=r"buffer 'float32' has shape .* give \(5,\)"):
    unravel({'float32': jnp.ones(size)})
  with pytest.raises(ValueError, match='unravel expects buffers'):
    unravel({'float64': flat['float32']})


@pytest.mark.parametrize('fmt', ['npz', 'orbax'])
def test_packed_checkpoint_refuses_another_layout(tmp_path, fmt):
  """Same buffer sizes (12 float32), other params: the layout names the difference."""
  tx = adamfx.pack_state(adamfx.adam(1e-2))
  state = tx.init(PARAMS)
  save, restore = {'npz': (adamfx.save_npz, adamfx.restore_npz),
                   'orbax': (adamfx.save_orbax, adamfx.restore_orbax)}[fmt]
  path = tmp_path / ('s.npz' if fmt == 'npz' else 'ckpt')
  save(path, state)
  other = tx.init({'a': jnp.ones(4), 'b': jnp.ones(8)})
  with pytest.raises(adamfx.CheckpointError, match=r"packed layout differs.*\(8,\).*\(4,\)"):
    restore(path, other)
  back = restore(path, tx.init(PARAMS))
  jax.tree.map(np.testing.assert_array_equal, back, state)


def test_pack_state_refuses_a_state_it_did_not_make():
  tx = adamfx.pack_state(adamfx.adam(1e-2))
  with pytest.raises(TypeError, match='PackedState'):
    tx.update(PARAMS, adamfx.adam(1e-2).init(PARAMS), PARAMS)


def test_pack_state_names_the_users_leaf_not_the_buffer():
  """An int32 param leaf was reported as buffer `['int32']`."""
  params = {'w': jnp.ones((4, 4)), 'step': jnp.zeros(3, jnp.int32)}
  with pytest.raises(TypeError, match=r"params leaf `\['step'\]` has dtype int32"):
    adamfx.pack_state(adamfx.adam(1e-3)).init(params)


@pytest.mark.parametrize('member', ['adam8bit', 'adamw8bit'])
def test_pack_state_keeps_8bit_tree_numbers(member):
  """min_8bit_size was applied to the packed buffer: 100-element biases were
  quantized in blocks shared with a large weight (updates up to 112 % off).
  Now each leaf keeps the tree's storage (8-bit in its own blocks, or float32)
  and the updates are the tree's to float32 rounding."""
  rng = np.random.default_rng(0)
  shapes = {'w': (64, 100), 'b': (100,), 'c': (50,), 'v': (4100,)}
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  make = lambda: getattr(adamfx, member)(1e-3)
  tree, packed = make(), adamfx.pack_state(make())
  tree_state, packed_state = tree.init(params), packed.init(params)
  quantized = lambda x: isinstance(x, adamfx.QuantizedArray)
  kinds = lambda tree: sorted(type(x).__name__ for x in jax.tree.leaves(tree, is_leaf=quantized))
  assert kinds(packed_state[0].mu) == kinds(tree_state[0].mu)  # 2 x 8-bit, 2 x float32
  for _ in range(3):
    grads = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    want, tree_state = jax.jit(tree.update)(grads, tree_state, params)
    got, packed_state = jax.jit(packed.update)(grads, packed_state, params)
    for k in shapes:  # float32 rounding: 2 ulps of the leaf's largest update
      top = float(jnp.max(jnp.abs(want[k])))
      np.testing.assert_allclose(got[k], want[k], rtol=0, atol=2 * 2.0**-23 * top, err_msg=k)
