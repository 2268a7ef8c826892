"""adamfx.MultiSteps: optax.MultiSteps's numbers, its memory, its accumulators.

References: optax.MultiSteps (float32 numbers), torch-optimi's
``optimizer_accumulation`` in float64 (optimizer accumulation), the float64
mean of the micro-gradients (bfloat16 accumulator), and
``compile().memory_analysis()`` of a donated jitted step (memory, exact).
"""

import subprocess
import sys
import textwrap

import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import optax_promotion

import adamfx

_TREE = {'w': (3, 4), 'b': (4,), 'nested': [()]}


def _params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), dtype), _TREE,
                      is_leaf=lambda x: isinstance(x, tuple))


def _grads(params, step, nan=False):
  rng = np.random.default_rng(100 + step)
  g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * (1 + step % 3), p.dtype),
                   params)
  if nan:
    g['b'] = g['b'].at[0].set(jnp.nan)
  return g


def _run(tx, params, grads, jit):
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  out = []
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    out.append((params, state))
  return out


def _same(got, want, rtol=2e-6, atol=1e-7):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol), got, want)


_CASES = {
    'k3': dict(every_k_schedule=3),
    'k1': dict(every_k_schedule=1),
    'sum': dict(every_k_schedule=2, use_grad_mean=False),
    'schedule': dict(every_k_schedule=lambda s: jnp.where(s < 2, 2, 3)),
    'skip_nan': dict(every_k_schedule=3, should_skip_update_fn=optax.skip_not_finite),
}


@pytest.mark.parametrize('case,jit', [(c, True) for c in _CASES] + [
    ('k3', False), pytest.param('skip_nan', False, marks=pytest.mark.slow)])
def test_matches_optax_multisteps(case, jit):
  """Params, counts, has_updated and the inner state equal optax's, step by step.

  float32 both; adamfx follows optax's Welford mean in the same order, so
  the params agree to a few ulps (2e-6 relative; 1e-7 absolute for elements
  near zero).
  """
  kw = _CASES[case]
  params = _params()
  grads = [_grads(params, i, nan=case == 'skip_nan' and i in (2, 5)) for i in range(7)]
  ours = adamfx.MultiSteps(adamfx.adam(0.1), **kw)
  with optax_promotion():
    theirs = optax.MultiSteps(optax.adam(0.1), **kw)
    want = _run(theirs, params, grads, jit)
  got = _run(ours, params, grads, jit)
  for (p, s), (wp, ws) in zip(got, want):
    _same(p, wp)
    assert int(s.mini_step) == int(ws.mini_step)
    assert int(s.gradient_step) == int(ws.gradient_step)
    assert bool(ours.has_updated(s)) == bool(theirs.has_updated(ws))
    _same(jax.tree.leaves(s.inner_opt_state), jax.tree.leaves(ws.inner_opt_state))
    assert type(s) is type(ws)  # optax.MultiStepsState: code and checkpoints carry over
  if case == 'skip_nan':
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(got[-1][0]))
    assert set(got[-1][1].skip_state) == set(want[-1][1].skip_state)


def test_gradient_transformation_and_optax_chain():
  params = _params()
  grads = [_grads(params, i) for i in range(4)]
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   adamfx.MultiSteps(adamfx.adamw(0.1, weight_decay=0.1), 2)
                   .gradient_transformation())
  with optax_promotion():
    ref = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.MultiSteps(optax.adamw(0.1, weight_decay=0.1), 2)
                      .gradient_transformation())
    want = _run(ref, params, grads, True)
  got = _run(tx, params, grads, True)
  _same(got[-1][0], want[-1][0])


def test_invalid_arguments_are_refused():
  with pytest.raises(ValueError, match='every_k_schedule.*>= 1.*got 0'):
    adamfx.MultiSteps(adamfx.adam(1e-3), 0)
  with pytest.raises(ValueError, match="accumulate.*got 'moments'"):
    adamfx.MultiSteps(adamfx.adam(1e-3), 2, accumulate='moments')
  with pytest.raises(ValueError, match='acc_dtype.*real float.*int8'):
    adamfx.MultiSteps(adamfx.adam(1e-3), 2, acc_dtype=jnp.int8)
  with pytest.raises(ValueError, match='acc_dtype.*2 bytes or more.*float8_e4m3fn'):
    adamfx.MultiSteps(adamfx.adam(1e-3), 2, acc_dtype=jnp.float8_e4m3fn)
  with pytest.raises(ValueError, match="acc_dtype.*None with accumulate='optimizer'"):
    adamfx.MultiSteps(adamfx.adam(1e-3), 2, acc_dtype=jnp.bfloat16, accumulate='optimizer')
  ms = adamfx.MultiSteps(adamfx.adam(1e-3), 2)
  params = _params()
  state = ms.init(params)
  bad = dict(params, w=jnp.ones((4, 3)))
  with pytest.raises(ValueError, match=r"\['w'\].*shape \(4, 3\).*\(3, 4\)"):
    ms.update(bad, state, params)
  with pytest.raises(ValueError, match='tree'):
    ms.update({'w': params['w']}, state, params)


def test_optax_accumulator_dtype_name_is_accepted():
  ms = adamfx.MultiSteps(adamfx.adam(1e-3), 2, accumulator_dtype=jnp.bfloat16)
  assert ms.init(_params())[3]['w'].dtype == jnp.bfloat16


# ------------------------------------------------------------------ bfloat16


def test_bfloat16_accumulator_is_unbiased():
  """32 micro-gradients of 1.0 or 1.004: the mean is unbiased within noise.

  Past 1.0 the bfloat16 gap is 2**-7 = 0.0078: adding 1.004 to a bfloat16
  sum past 2.0 adds 1.0 (round-to-nearest: a bias of -0.002 on a random mix,
  the NumPy transcription below), and optax's bfloat16 running mean stalls at
  1.0 when the 1.004s come after a 1.0 (each (1.004 - mean) / n is under
  half a gap). Stochastic rounding is unbiased: each element's mean carries
  a noise of a fraction of a gap, so over N = 2**16 elements the mean error's
  standard error is that noise / sqrt(N). We assert |bias| < 5 standard
  errors (estimated from the errors themselves) on both sequences.
  """
  import ml_dtypes

  n, k = 1 << 16, 32
  rng = np.random.default_rng(0)
  mixed = np.where(rng.random((k, n)) < 0.5, 1.0, 1.004).astype(np.float32)
  late = np.full((k, n), 1.004, np.float32)
  late[0] = 1.0
  params = jnp.zeros((n,), jnp.float32)

  def final(ms, micro):
    state = ms.init(params)
    update = jax.jit(ms.update)
    for g in micro:
      u, state = update(jnp.asarray(g), state, params)
    assert bool(ms.has_updated(state))
    return np.asarray(u, np.float64) - micro.astype(np.float64).mean(0)

  ident = optax.identity()
  for micro in (mixed, late):
    for dtype in (jnp.bfloat16, jnp.float16):
      err = final(adamfx.MultiSteps(ident, k, acc_dtype=dtype), micro)
      stderr = err.std() / np.sqrt(n)
      assert abs(err.mean()) < 5 * stderr, (dtype, err.mean(), stderr)
      assert err.std() < 2.0**-8  # a fraction of a bfloat16 gap (2**-7) per element
    f32 = final(adamfx.MultiSteps(ident, k), micro)
    assert abs(f32).max() < 1e-6
  # The biases stochastic rounding removes (witnesses that the test bites).
  bsum = np.zeros(n, ml_dtypes.bfloat16)
  for g in mixed:
    bsum = (bsum.astype(np.float32) + g).astype(ml_dtypes.bfloat16)
  rne_sum = bsum.astype(np.float64) / k - mixed.astype(np.float64).mean(0)
  assert rne_sum.mean() < -0.0015, rne_sum.mean()
  with optax_promotion():
    stall = final(optax.MultiSteps(ident, k, accumulator_dtype=jnp.bfloat16), late)
  assert stall.mean() < -0.003, stall.mean()


def test_bfloat16_update_is_rounded_without_bias():
  """The k-th update, stochastically rounded into the bfloat16 accumulator, is unbiased.

  A float32 update has no spent float32 buffer to live in beside a bfloat16
  accumulator, so it is rounded to bfloat16 (stochastically) into the
  accumulator's. Four micro-gradients of 1.002 with ``optax.scale(0.3)``
  inside: the float64 update is 0.3006, between the bfloat16 neighbours
  153 and 154 times 2**-9; round-to-nearest gives 154 / 512 (a bias of
  +1.8e-4, the witness below), stochastic rounding is right within its
  noise over 65536 elements (|bias| < 5 standard errors, each error below
  a gap of the mean's 2**-7 times 0.3 plus the update's 2**-9). A float16
  accumulator holds the update as bfloat16 bits (float16's range would lose
  small updates): the same numbers. Either holds zeros afterwards, as optax's.
  """
  import ml_dtypes

  n, k = 1 << 16, 4
  params = jnp.zeros((n,), jnp.float32)
  g = jnp.full((n,), 1.002, jnp.float32)
  want = 0.3 * np.float64(np.float32(1.002))
  for dtype in (jnp.bfloat16, jnp.float16):
    ms = adamfx.MultiSteps(optax.scale(0.3), k, acc_dtype=dtype)
    state = ms.init(params)
    update = jax.jit(ms.update)
    for _ in range(k):
      u, state = update(g, state, params)
    assert u.dtype == jnp.float32 and state.acc_grads.dtype == dtype
    err = np.asarray(u, np.float64) - want
    stderr = err.std() / np.sqrt(n)
    assert abs(err.mean()) < 5 * stderr, (dtype, err.mean(), stderr)
    assert np.abs(err).max() < 0.3 * 2.0**-7 + 2.0**-9, (dtype, np.abs(err).max())
    np.testing.assert_array_equal(np.asarray(state.acc_grads, np.float32), 0)  # as optax
  rne = float(np.float32(want).astype(ml_dtypes.bfloat16)) - want
  assert rne > 1.5e-4, rne


def test_bfloat16_accumulator_under_vmap_equals_unbatched():
  """The k-th update's loop (0 or 1 trip) under vmap: each member as if alone."""
  params = {'w': jnp.zeros((64,), jnp.float32), 'b': jnp.zeros((3,), jnp.float32)}
  ms = adamfx.MultiSteps(adamfx.adam(0.1), 3, acc_dtype=jnp.bfloat16)
  rng = np.random.default_rng(1)
  grads = [[jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
            for _ in range(5)] for _ in range(2)]
  alone = [_run(ms, params, gs, True) for gs in grads]
  stack = lambda *xs: jnp.stack(xs)
  state = jax.tree.map(lambda x: stack(x, x), ms.init(params))
  batched = jax.tree.map(lambda x: stack(x, x), params)
  update = jax.jit(jax.vmap(ms.update))
  for i in range(5):
    g = jax.tree.map(stack, grads[0][i], grads[1][i])
    u, state = update(g, state, batched)
    batched = optax.apply_updates(batched, u)
    for j in range(2):
      jax.tree.map(np.testing.assert_array_equal,
                   jax.tree.map(lambda x, j=j: x[j], (batched, state)), alone[j][i])


def test_bfloat16_accumulator_is_reproducible_and_eager_equals_jit():
  params = {'w': jnp.zeros((256,), jnp.float32)}
  grads = [{'w': jnp.full((256,), 1.0 + 0.004 * (i % 2), jnp.float32)} for i in range(5)]
  ms = adamfx.MultiSteps(optax.identity(), 8, acc_dtype=jnp.bfloat16)
  a = _run(ms, params, grads, True)[-1][1].acc_grads
  b = _run(ms, params, grads, False)[-1][1].acc_grads
  c = _run(ms, params, grads, True)[-1][1].acc_grads
  jax.tree.map(np.testing.assert_array_equal, a, b)
  jax.tree.map(np.testing.assert_array_equal, a, c)
  assert a['w'].dtype == jnp.bfloat16


# ------------------------------------------------------------------ memory


_SIZES = (256, 1024, 1024, 1024, 256)  # 2.6M params: per-param bytes are meaningful


def _mlp():
  params = {}
  for i, (m, n) in enumerate(zip(_SIZES[:-1], _SIZES[1:])):
    params[f'w{i}'] = jax.ShapeDtypeStruct((m, n), jnp.float32)
    params[f'b{i}'] = jax.ShapeDtypeStruct((n,), jnp.float32)
  return params


def _loss(p, x):
  h = x
  for i in range(len(_SIZES) - 1):
    h = h @ p[f'w{i}'] + p[f'b{i}']
    if i < len(_SIZES) - 2:
      h = jax.nn.relu(h)
  return jnp.mean(h * h)


def _step_bytes(tx, batch):
  """(argument bytes, bytes beyond the donated arguments) of one training step."""
  params = _mlp()
  state = jax.eval_shape(tx.init, params)

  def step(p, s, x):
    u, s = tx.update(jax.grad(_loss)(p, x), s, p)
    return optax.apply_updates(p, u), s

  x = jax.ShapeDtypeStruct((batch, _SIZES[0]), jnp.float32)
  m = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, x).compile().memory_analysis()
  return m.argument_size_in_bytes, (
      m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


@pytest.mark.parametrize('inner,batch', [
    ('adam', 8), pytest.param('adam', 512, marks=pytest.mark.slow),
    pytest.param('adam8bit', 8, marks=pytest.mark.slow),
    pytest.param('adam8bit', 512, marks=pytest.mark.slow)])
def test_memory_no_step_temporaries_beyond_the_accumulator(inner, batch):
  """The donated step's peak: at most 0.5 B/param above the same step without
  accumulation plus the accumulator's bytes (float32, and optimizer
  accumulation, which has none); optax.MultiSteps misses that bound.

  A bfloat16 or float16 accumulator meets it with its own 2 B/param: the
  mean and then the update are rounded into its buffer (a float32 update
  would need 4 B/param that no spent buffer has at the k-th mini-step).
  """
  make = {'adam': lambda: adamfx.adam(1e-3), 'adam8bit': lambda: adamfx.adam8bit(1e-3)}[inner]
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(_mlp()))
  slack = 0.5 * n
  args0, new0 = _step_bytes(make(), batch)
  peak0 = args0 + new0
  rows = {
      'f32': adamfx.MultiSteps(make(), 4),
      'bf16': adamfx.MultiSteps(make(), 4, acc_dtype=jnp.bfloat16),
      'f16': adamfx.MultiSteps(make(), 4, acc_dtype=jnp.float16),
      'optimizer': adamfx.MultiSteps(make(), 4, accumulate='optimizer'),
  }
  for name, ms in rows.items():
    args, new = _step_bytes(ms.gradient_transformation(), batch)
    acc = {'f32': 4 * n, 'bf16': 2 * n, 'f16': 2 * n, 'optimizer': 0}[name]
    assert args - args0 == acc + 8, (name, args - args0)  # + mini_step, gradient_step
    bound = peak0 + acc + slack
    assert args + new <= bound, (name, batch, (args + new - peak0 - acc) / n)
  if inner == 'adam':
    with optax_promotion():
      args, new = _step_bytes(optax.MultiSteps(make(), 4).gradient_transformation(), batch)
    assert args + new > peak0 + 4 * n + slack  # the bound bites


# ------------------------------------------------------- optimizer accumulation


def test_optimizer_accumulation_matches_optimi():
  """accumulate='optimizer' == torch-optimi's optimizer_accumulation, float64.

  optimi's Adam folds the bias correction into debiased betas (the moments
  are the bias-corrected averages) and adds eps outside the root: Algorithm
  1 rearranged, so adamfx.adam in float64 matches it to rounding (1e-10).
  Its optimizer accumulation runs a moment update (and advances the step
  count) for every micro-batch with gradient release and applies only the
  last; adamfx does the same through the inner optimizer.
  """
  torch = pytest.importorskip('torch')
  optimi = pytest.importorskip('optimi')
  lr, b1, b2, eps, k, steps = 0.05, 0.9, 0.99, 1e-6, 3, 9
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(4, 3))
  grads = [rng.normal(size=(4, 3)) * (1 + i % 2) for i in range(steps)]

  model = torch.nn.Linear(3, 4, bias=False).double()
  with torch.no_grad():
    model.weight.copy_(torch.from_numpy(w0))
  opt = optimi.Adam(model.parameters(), lr=lr, betas=(b1, b2), eps=eps, gradient_release=True)
  optimi.prepare_for_gradient_release(model, opt)
  want = []
  for i, g in enumerate(grads):
    opt.optimizer_accumulation = (i % k) != k - 1
    # A loss whose gradient is g: the hook steps (or accumulates) on backward.
    (model.weight * torch.from_numpy(g)).sum().backward()
    want.append(model.weight.detach().numpy().copy())
  optimi.remove_gradient_release(model)

  with jax.enable_x64(True):
    ms = adamfx.MultiSteps(adamfx.adam(lr, b1, b2, eps), k, accumulate='optimizer')
    got = _run(ms, jnp.asarray(w0), [jnp.asarray(g) for g in grads], jit=True)
    for i, ((p, _), w) in enumerate(zip(got, want)):
      np.testing.assert_allclose(np.asarray(p), w, rtol=1e-10, atol=1e-12, err_msg=str(i))
    assert int(got[-1][1].inner_opt_state[0].count) == steps  # one moment update per micro-batch


def test_optimizer_accumulation_keeps_no_accumulator_and_skips():
  params = _params()
  grads = [_grads(params, i, nan=i == 1) for i in range(4)]
  ms = adamfx.MultiSteps(adamfx.adam(0.1), 2, should_skip_update_fn=optax.skip_not_finite,
                         accumulate='optimizer')
  got = _run(ms, params, grads, jit=True)
  assert got[0][1].acc_grads == ()
  # Step 1 (NaN) is skipped: steps 0 and 2 make the first update.
  ref = adamfx.adam(0.1)
  s = ref.init(params)
  _, s = ref.update(grads[0], s, params)
  u, s = ref.update(grads[2], s, params)
  _same(got[2][0], optax.apply_updates(params, u))
  _same(got[1][0], params, rtol=0, atol=0)


# ------------------------------------------------------------- composition


def test_row_sparse_gradients():
  """'gradients' refuses RowSparse (clear error); 'optimizer' feeds lazy_adam."""
  table = jnp.asarray(np.random.default_rng(0).normal(size=(10, 3)), jnp.float32)
  params = {'emb': table}
  grads = [{'emb': adamfx.RowSparse(jnp.array([i, 7]), jnp.full((2, 3), 1.0 + i),
                                    num_rows=10)} for i in range(4)]
  with pytest.raises(ValueError, match=r"\['emb'\].*RowSparse.*accumulate='optimizer'"):
    ms = adamfx.MultiSteps(adamfx.lazy_adam(0.1), 2)
    ms.update(grads[0], ms.init(params), params)
  ms = adamfx.MultiSteps(adamfx.lazy_adam(0.1), 2, accumulate='optimizer')
  got = _run(ms, params, grads, jit=True)
  lazy = adamfx.lazy_adam(0.1)
  s, p, want = lazy.init(params), params, []
  for i, g in enumerate(grads):
    u, s = lazy.update(g, s, p)
    if i % 2 == 1:
      p = optax.apply_updates(p, u)
    want.append(p)
  for (gp, _), wp in zip(got, want):
    _same(gp, wp)


@pytest.mark.slow  # the contract table's multisteps_adam row round-trips in the default run
def test_checkpoint_round_trip_mid_accumulation(tmp_path):
  params = _params()
  grads = [_grads(params, i) for i in range(5)]
  for kw in (dict(), dict(acc_dtype=jnp.bfloat16), dict(accumulate='optimizer')):
    ms = adamfx.MultiSteps(adamfx.adam8bit(0.1, min_8bit_size=4), 3, **kw)
    update = jax.jit(ms.update)
    state, p = ms.init(params), params
    for g in grads[:2]:
      u, state = update(g, state, p)
      p = optax.apply_updates(p, u)
    adamfx.save_npz(tmp_path / 'ms.npz', state)
    back = adamfx.restore_npz(tmp_path / 'ms.npz', ms.init(params))
    jax.tree.map(np.testing.assert_array_equal, back, state)
    for s in (state, back):
      q = p
      for g in grads[2:]:
        u, s = update(g, s, q)
        q = optax.apply_updates(q, u)
      jax.tree.map(np.testing.assert_array_equal, q, _run_from(ms, p, state, grads[2:]))


def _run_from(ms, p, state, grads):
  update = jax.jit(ms.update)
  for g in grads:
    u, state = update(g, state, p)
    p = optax.apply_updates(p, u)
  return p


@pytest.mark.slow  # test_composition's NNX check runs in the default run
def test_flax_nnx_optimizer():
  """nnx.Optimizer over adamfx.MultiSteps equals it over optax.MultiSteps."""
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, p):
      self.w = nnx.Param(p['w'])
      self.b = nnx.Param(p['b'])

  params = {'w': _params()['w'], 'b': _params()['b']}
  grads = [{'w': _grads(params, i)['w'], 'b': _grads(params, i)['b']} for i in range(6)]

  def train(tx):
    model = Model(params)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for g in grads:
      loss = lambda m, g=g: jnp.sum(m.w[...] * g['w']) + jnp.sum(m.b[...] * g['b'])
      opt.update(model, nnx.grad(loss)(model))
    return {'w': model.w[...], 'b': model.b[...]}

  got = train(adamfx.MultiSteps(adamfx.adam(0.1), 3).gradient_transformation())
  with optax_promotion():
    want = train(optax.MultiSteps(optax.adam(0.1), 3).gradient_transformation())
  _same(got, want)


_SHARDING = textwrap.dedent('''
    import jax, jax.numpy as jnp, optax, adamfx
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((4,), ('d',))
    params = {'w': jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P('d', None))),
              'b': jax.device_put(jnp.ones((16,)), NamedSharding(mesh, P()))}
    for kw in (dict(), dict(acc_dtype=jnp.bfloat16)):
      ms = adamfx.MultiSteps(adamfx.adam(0.1), 2, **kw)
      for state in (ms.init(params), jax.jit(ms.init)(params)):
        for k in params:
          assert state.acc_grads[k].sharding.is_equivalent_to(params[k].sharding, 2), k
      u, state = jax.jit(ms.update)(params, state, params)
      for k in params:
        assert state.acc_grads[k].sharding.is_equivalent_to(params[k].sharding, 2), k
    print('ok')
''')


@pytest.mark.slow  # a 4-device subprocess
def test_accumulator_is_sharded_like_its_param():
  out = subprocess.run([sys.executable, '-c', _SHARDING], env=harness.devices_env(4), capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0 and 'ok' in out.stdout, out.stderr[-3000:]
