"""The fast paths give the plain path's numbers: eager compiled updates, flat mode.

References: optax 0.2.8 (float32, rtol 1e-6: float32 rounding of the same
operations in a different fusion order) and, for "identical numbers", the
traced adamfx path under ``jax.jit``, compared bit for bit -- the eager fast
path compiles the very same ``_family_update``, so any difference is a bug in
the dispatch (a wrong hyperparameter, leaf order, leaf position or dtype).
"""

import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import optax_promotion

import adamfx
from adamfx._core import eager as _fast

RTOL = 1e-6  # float32 rounding, as in the optax parity suite
STEPS = 4


def _tree(dtypes=(jnp.float32,)):
  rng = np.random.default_rng(0)
  out = {}
  for k, dtype in enumerate(dtypes):
    out[f'w{k}'] = jnp.asarray(rng.standard_normal((3, 5)), dtype)
    out[f'b{k}'] = jnp.asarray(rng.standard_normal(5), dtype)
  out['s'] = jnp.asarray(rng.standard_normal(()), jnp.float32)
  return out


def _grads(params, step):
  rng = np.random.default_rng(step + 1)
  return jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape) * 3.0, p.dtype), params
  )


def _run(tx, params, jit, steps=STEPS):
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  out = []
  for t in range(steps):
    updates, state = update(_grads(params, t), state, params)
    params = optax.apply_updates(params, updates)
    out.append((updates, state))
  return params, out


def _bitwise(a, b, scalar_ulp=0):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    if x.ndim == 0 and scalar_ulp:
      np.testing.assert_array_max_ulp(np.asarray(x), np.asarray(y), maxulp=scalar_ulp)
    else:
      np.testing.assert_array_equal(np.asarray(x, np.float64), np.asarray(y, np.float64))


FAMILY = {
    'adam': lambda: adamfx.adam(1e-2),
    'nadam': lambda: adamfx.nadam(1e-2),
    'amsgrad': lambda: adamfx.amsgrad(1e-2),
    'adamw': lambda: adamfx.adamw(1e-2, weight_decay=0.1),
    'adamax': lambda: adamfx.adamax(1e-2),
    'schedule': lambda: adamfx.adam(optax.linear_schedule(1e-2, 1e-3, 3)),
    'nu_bf16': lambda: adamfx.adam(1e-2, nu_dtype=jnp.bfloat16),
    'mu_bf16': lambda: adamfx.adam(1e-2, mu_dtype=jnp.bfloat16),
}


@pytest.mark.parametrize('name', [n for n in FAMILY if n not in ('adamw', 'schedule')] + [
    'scale_by_adam', 'scale_by_adam_nesterov', 'scale_by_adam_amsgrad', 'scale_by_adamax'])
def test_eager_is_bitwise_the_traced_path(name):
  # Mixed dtypes: bfloat16 leaves store a 16-bit nu (stochastic rounding keyed
  # by the leaf's position), float32 leaves take the per-leaf compiled call.
  # (adamw is not here: under one jit XLA may contract its weight-decay add
  # with the learning-rate multiply across transformations, which separate
  # eager calls cannot; likewise a schedule's value, computed eagerly as
  # optax does. Both are checked against optax instead.)
  tx = {
      'scale_by_adam': adamfx.scale_by_adam,
      'scale_by_adam_nesterov': lambda: adamfx.scale_by_adam(nesterov=True),
      'scale_by_adam_amsgrad': lambda: adamfx.scale_by_adam(amsgrad=True),
      'scale_by_adamax': adamfx.scale_by_adamax,
  }.get(name, FAMILY.get(name))
  params = _tree((jnp.float32, jnp.bfloat16))
  _, eager = _run(tx(), params, jit=False)
  _, traced = _run(tx(), params, jit=True)
  _bitwise(eager, traced)


@pytest.mark.parametrize('name', ['adam', 'nadam', 'amsgrad', 'adamw', 'adamax', 'schedule'])
def test_eager_matches_optax(name):
  optax_tx = {
      'adam': lambda: optax.adam(1e-2),
      'nadam': lambda: optax.nadam(1e-2),
      'amsgrad': lambda: optax.amsgrad(1e-2),
      'adamw': lambda: optax.adamw(1e-2, weight_decay=0.1),
      'adamax': lambda: optax.adamax(1e-2),
      'schedule': lambda: optax.adam(optax.linear_schedule(1e-2, 1e-3, 3)),
  }[name]
  params = _tree()
  got, _ = _run(FAMILY[name](), params, jit=False)
  with optax_promotion():
    want, _ = _run(optax_tx(), params, jit=False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-7), got, want)


def test_eager_none_leaves_and_empty_tree():
  params = {'a': jnp.ones(3), 'b': None}
  tx = adamfx.adam(1e-2)
  state = tx.init(params)
  updates, state = tx.update({'a': jnp.ones(3), 'b': None}, state, params)
  assert updates['b'] is None and state[0].mu['b'] is None
  with optax_promotion():
    ref = optax.adam(1e-2)
    want, _ = ref.update(jnp.ones(3), ref.init(jnp.ones(3)))
  np.testing.assert_allclose(updates['a'], want, rtol=RTOL)
  empty_state = tx.init({})
  updates, empty_state = tx.update({}, empty_state, {})
  assert updates == {} and int(empty_state[0].count) == 1


def test_inject_hyperparams_eager_does_not_recompile():
  # inject_hyperparams re-creates the transformation every step with new
  # hyperparameter arrays: they must be arguments of the compiled code, not
  # constants of it.
  params = _tree()
  tx = adamfx.inject_hyperparams(adamfx.adam)(learning_rate=1e-2, b1=0.8)
  ref = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2, b1=0.8)
  state = tx.init(params)
  with optax_promotion():
    ref_state = ref.init(params)
  sizes = []
  for t in range(STEPS):
    g = _grads(params, t)
    state.hyperparams['learning_rate'] = jnp.asarray(1e-2 / (t + 1), jnp.float32)
    ref_state.hyperparams['learning_rate'] = jnp.asarray(1e-2 / (t + 1), jnp.float32)
    updates, state = tx.update(g, state, params)
    with optax_promotion():
      want, ref_state = ref.update(g, ref_state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-9),
                 updates, want)
    sizes.append((_fast._leaf_update._cache_size(), _fast._scale_leaf._cache_size()))
  assert sizes[-1] == sizes[1], f'recompiled: {sizes}'


@pytest.mark.parametrize('lr', ['number', 'array', 'schedule'])
@pytest.mark.parametrize('make', [adamfx.adam, adamfx.nadam, adamfx.adamax])
def test_eager_step_scales_by_the_learning_rate_in_the_same_call(monkeypatch, make, lr):
  # Eagerly, adam's learning rate is applied inside the family's compiled
  # calls (one dispatch and one pass less per chunk): the separate scaling
  # is never called, and the numbers and state are the chain's under jit.
  learning_rate = {
      'number': 1e-2,
      'array': jnp.asarray(1e-2, jnp.float32),
      'schedule': optax.linear_schedule(1e-2, 1e-3, 3),
  }[lr]

  def refuse(*args, **kwargs):
    raise AssertionError('separate learning-rate call')

  params = _tree()
  _, traced = _run(make(learning_rate), params, jit=True)
  monkeypatch.setattr(_fast, '_scale_leaf', refuse)
  _, eager = _run(make(learning_rate), params, jit=False)
  if lr == 'schedule':  # the schedule's value is computed eagerly, as optax does
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL), eager, traced)
    assert int(eager[-1][1][1].count) == STEPS
  else:
    # The 0-d leaf is scalar code, compiled apart from the other leaves
    # eagerly: one ulp (seen with NAdam), as in flat mode below.
    _bitwise(eager, traced, scalar_ulp=1)


@pytest.mark.parametrize('wd', ['number', 'array', 'zero'])
@pytest.mark.parametrize('mask', [None, 'callable', 'tree'])
def test_eager_adamw_decays_in_the_same_call(monkeypatch, wd, mask):
  # AdamW's decay (a number or an array; masked or not) and learning rate
  # are applied inside the family's compiled calls: no separate scaling
  # call, and the numbers of optax.adamw and of the jitted chain.
  weight_decay = {'number': 0.1, 'array': jnp.asarray(0.1, jnp.float32), 'zero': 0.0}[wd]
  mask = {
      None: None,
      'callable': lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
      'tree': {'w0': True, 'b0': False, 's': True},
  }[mask]
  params = _tree()
  make = lambda: adamfx.adamw(1e-2, weight_decay=weight_decay, mask=mask)
  with optax_promotion():
    want, _ = _run(optax.adamw(1e-2, weight_decay=weight_decay, mask=mask), params, jit=False)
  _, traced = _run(make(), params, jit=True)

  def refuse(*args, **kwargs):
    raise AssertionError('separate learning-rate call')

  monkeypatch.setattr(_fast, '_scale_leaf', refuse)
  got, eager = _run(make(), params, jit=False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-7), got, want)
  # Under one jit XLA may contract the decay's add with the learning rate's
  # multiply: float32 rounding (see test_eager_is_bitwise_the_traced_path).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL), eager, traced)


def test_eager_under_disable_jit():
  params = _tree()
  with jax.disable_jit():
    got, _ = _run(adamfx.adam(1e-2), params, jit=False, steps=2)
  want, _ = _run(adamfx.adam(1e-2), params, jit=True, steps=2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL), got, want)


# ------------------------------------------------------------------- flat mode


@pytest.mark.parametrize('name', ['adam', 'nadam', 'amsgrad', 'adamw', 'adamax'])
@pytest.mark.parametrize('jit', [False, True])
def test_flat_mode_matches_optax_on_the_tree(name, jit):
  optax_tx = {
      'adam': optax.adam(1e-2), 'nadam': optax.nadam(1e-2), 'amsgrad': optax.amsgrad(1e-2),
      'adamw': optax.adamw(1e-2, weight_decay=0.1), 'adamax': optax.adamax(1e-2),
  }[name]
  params = _tree()
  flat, unravel = adamfx.ravel_params(params)
  tx = FAMILY[name]()
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(flat)
  with optax_promotion():
    ref_state = optax_tx.init(params)
  ref_params = params
  for t in range(STEPS):
    g = _grads(params, t)
    g_flat, _ = adamfx.ravel_params(g)
    updates, state = update(g_flat, state, flat)
    flat = optax.apply_updates(flat, updates)
    with optax_promotion():
      ref_updates, ref_state = optax_tx.update(g, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, ref_updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-9),
                 unravel(updates), ref_updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL),
               unravel(flat), ref_params)


def test_flat_mode_is_bitwise_the_tree_path_with_mixed_dtypes():
  # With nu stored in float32 the update is element-wise and deterministic, so
  # packing leaves into per-dtype buffers must not change a single bit of an
  # array leaf. A scalar (0-d) leaf is compiled by XLA as scalar code, whose
  # rounding can differ from the vectorised loop's by one ulp (seen: 1 ulp on
  # the first step): allow exactly that for 0-d leaves.
  params = _tree((jnp.float32, jnp.bfloat16))
  tx = adamfx.adam(1e-2, nu_dtype=jnp.float32)
  flat, unravel = adamfx.ravel_params(params)
  assert set(flat) == {'float32', 'bfloat16'}
  state, flat_state = tx.init(params), tx.init(flat)
  step = jax.jit(tx.update)
  for t in range(STEPS):
    g = _grads(params, t)
    updates, state = step(g, state, params)
    flat_updates, flat_state = step(adamfx.ravel_params(g)[0], flat_state, flat)
    _bitwise(unravel(flat_updates), updates, scalar_ulp=1)
    _bitwise(unravel(flat_state[0].mu), state[0].mu, scalar_ulp=1)
    _bitwise(unravel(flat_state[0].nu), state[0].nu, scalar_ulp=1)


@pytest.mark.parametrize('name', ['adam', 'nadam', 'adamw'])
def test_pack_state_is_bitwise_the_tree_path(name):
  # Tree-shaped params and updates, packed moments: Adam is element-wise, so
  # packing must not change a bit (nu stored in float32: no per-buffer
  # stochastic rounding), jitted or eager, with mixed dtypes.
  make = {
      'adam': lambda: adamfx.adam(1e-2, nu_dtype=jnp.float32),
      'nadam': lambda: adamfx.nadam(1e-2, nu_dtype=jnp.float32),
      'adamw': lambda: adamfx.adamw(1e-2, weight_decay=0.1, nu_dtype=jnp.float32),
  }[name]
  params = _tree((jnp.float32, jnp.bfloat16))
  _, tree = _run(make(), params, jit=True)
  _, packed = _run(adamfx.pack_state(make()), params, jit=True)
  _, packed_eager = _run(adamfx.pack_state(make()), params, jit=False)

  def same(a, b, float32_rtol=None):
    # bfloat16 leaves (mu in bfloat16) read the update off the stored,
    # rounded mu: a float32 ulp of contraction (fma or not) in one program
    # and not the other can flip mu's or the update's bfloat16 rounding,
    # one bfloat16 ulp (up to 2**-7 relative). float32 leaves stay bitwise,
    # except AdamW's updates: XLA may contract the decay's add with the
    # learning rate's multiply (one rounding, not two) in one program and not
    # in another, as in test_eager_is_bitwise_the_traced_path; the params
    # then carry that ulp into later steps: float32 rounding, as against optax.
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      if x.dtype == jnp.bfloat16:
        np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=2.0**-7, atol=0)
      elif float32_rtol:
        np.testing.assert_allclose(x, y, rtol=float32_rtol)
      else:
        _bitwise(x, y)

  def same_updates(a, b):
    same(a, b, RTOL if name == 'adamw' else None)

  for (u, s), (pu, ps), (eu, es) in zip(tree, packed, packed_eager):
    same_updates(pu, u)
    same_updates(eu, u)
    flat_mu = ps[0].mu
    assert set(flat_mu) == {'float32', 'bfloat16'}
    _, unravel = adamfx.ravel_params(params)
    same(unravel(flat_mu), s[0].mu)
    same(unravel(ps[0].nu), s[0].nu)
    same(es, ps)


def test_pack_state_composes_with_optax():
  # Any optax transformation runs on the packed buffers; a global norm is
  # the same norm summed in another order (float32 rounding).
  params = _tree()
  make = lambda: optax.chain(optax.clip_by_global_norm(1.0), adamfx.adam(1e-2))
  with optax_promotion():
    got, _ = _run(adamfx.pack_state(make()), params, jit=True)
    want, _ = _run(make(), params, jit=True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)


def test_ravel_params_round_trip_and_grad():
  params = {'a': jnp.arange(6.0).reshape(2, 3), 'b': [jnp.ones(2, jnp.bfloat16), jnp.zeros(())]}
  flat, unravel = adamfx.ravel_params(params)
  assert flat['float32'].shape == (7,) and flat['bfloat16'].dtype == jnp.bfloat16
  _bitwise(unravel(flat), params)
  grads = jax.grad(lambda f: jnp.sum(unravel(f)['a'] ** 2))({'float32': flat['float32'],
                                                            'bfloat16': flat['bfloat16']})
  np.testing.assert_array_equal(grads['float32'][:6], 2 * np.arange(6.0))


def test_ravel_params_rejects_non_arrays():
  with pytest.raises(TypeError, match='leaf 0 is str'):
    adamfx.ravel_params({'a': 'x'})


@pytest.mark.parametrize('amsgrad', [False, True])
def test_eager_chunks_of_same_shape_leaves_are_bitwise_the_traced_path(amsgrad):
  # 13 small leaves of one shape run as compiled chunks of 8, 4 and 1
  # leaves; the others singly. Order and pairing of leaves must survive the chunking.
  rng = np.random.default_rng(3)
  params = {f'x{i:02d}': jnp.asarray(rng.standard_normal(4), jnp.float32) for i in range(13)}
  params.update(_tree((jnp.float32, jnp.bfloat16)))
  tx = lambda: adamfx.adam(1e-2, amsgrad=amsgrad)
  _, eager = _run(tx(), params, jit=False)
  _, traced = _run(tx(), params, jit=True)
  _bitwise(eager, traced)
  small, big = (lambda i: 4), (lambda i: _fast.SMALL)
  assert [len(c) for c in _fast._chunks(list(range(13)), lambda i: 0, small)] == [8, 4, 1]
  # Up to 64 small leaves a call, 8 big ones.
  assert [len(c) for c in _fast._chunks(list(range(100)), lambda i: 0, small)] == [64, 32, 4]
  assert [len(c) for c in _fast._chunks(list(range(13)), lambda i: 0, big)] == [8, 4, 1]
  assert [len(c) for c in _fast._chunks(list(range(20)), lambda i: 0, big)] == [8, 8, 4]


FRAMEWORK = {
    'torch_adam_l2_amsgrad': lambda: adamfx.torch_adam(1e-2, weight_decay=0.1, amsgrad=True),
    'torch_adamw_schedule': lambda: adamfx.torch_adamw(optax.linear_schedule(1e-2, 1e-3, 3)),
    'keras_adam': lambda: adamfx.keras_adam(1e-2),
    'keras_adamw_stable': lambda: adamfx.keras_adamw(1e-2, update_clipping=True, cautious=True),
}


@pytest.mark.parametrize('name', FRAMEWORK)
def test_framework_builders_step_eagerly_in_one_compiled_call(name):
  # Called eagerly, torch's and Keras's Adam run as one compiled call over
  # the tree (not dozens of separate array operations per leaf), the very
  # program jit compiles: bit for bit the jitted numbers, schedule included.
  params = _tree((jnp.float32, jnp.bfloat16))
  _, traced = _run(FRAMEWORK[name](), params, jit=True)
  _, eager = _run(FRAMEWORK[name](), params, jit=False)
  _bitwise(eager, traced)
  # Shapes no other test uses: the first eager step compiles one program.
  params = {'w': jnp.ones((13, 11)), 'b': jnp.ones(11)}
  tx = FRAMEWORK[name]()
  state = tx.init(params)
  grads = jax.tree.map(lambda p: p * 0.5, params)
  with harness.compiled_programs() as compiled:
    tx.update(grads, state, params)
  assert len(compiled) == 1, compiled


def test_framework_builders_with_array_hyperparameters_step_eagerly():
  # A configuration holding arrays (inject_hyperparams) is not hashed into
  # compiled code: it runs the traced code eagerly, with optax's numbers.
  params = _tree()
  tx = adamfx.inject_hyperparams(adamfx.torch_adam)(lr=jnp.asarray(1e-2), betas=(0.9, 0.999))
  got, _ = _run(tx, params, jit=False)
  want, _ = _run(adamfx.torch_adam(1e-2), params, jit=True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL), got, want)
