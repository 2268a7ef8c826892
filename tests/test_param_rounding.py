"""param_rounding='kahan' | 'stochastic' (adamfx/_core/param_rounding.py), and the
whole training step's memory (no update-sized temporaries, issue 20).

References are independent of the code under test: float64 NumPy sums of
the updates, an ml_dtypes (NumPy bfloat16) transcription of one Kahan step,
the binomial statistics of unbiased rounding, XLA's memory_analysis of an
SGD step, and torch-optimi's AdamW(kahan_sum=True) where installed.
"""

import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamfx
from adamfx._core import param_rounding as _param_rounding

BF16 = jnp.bfloat16

BUILDERS = {
    'adam': lambda m: adamfx.adam(1e-3, param_rounding=m),
    'adamw': lambda m: adamfx.adamw(1e-3, weight_decay=0.1, param_rounding=m),
    'nadam': lambda m: adamfx.nadam(1e-3, param_rounding=m),
    'nadamw': lambda m: adamfx.nadamw(1e-3, param_rounding=m),
    'amsgrad': lambda m: adamfx.amsgrad(1e-3, param_rounding=m),
    'adamax': lambda m: adamfx.adamax(1e-3, param_rounding=m),
    'adam8bit': lambda m: adamfx.adam8bit(1e-3, min_8bit_size=256, param_rounding=m),
    'adamw8bit': lambda m: adamfx.adamw8bit(1e-3, min_8bit_size=256, param_rounding=m),
    'lazy_adam': lambda m: adamfx.lazy_adam(1e-3, param_rounding=m),
    'lazy_adamw': lambda m: adamfx.lazy_adamw(1e-3, param_rounding=m),
    'torch_adam': lambda m: adamfx.torch_adam(1e-3, param_rounding=m),
    'torch_adamw': lambda m: adamfx.torch_adamw(1e-3, param_rounding=m),
    'keras_adam': lambda m: adamfx.keras_adam(1e-3, param_rounding=m),
    'keras_adamw': lambda m: adamfx.keras_adamw(1e-3, param_rounding=m),
}


def _tree(dtype, seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {'w': jax.random.normal(k1, (4, 128)).astype(dtype),
          'b': jax.random.normal(k2, (8,)).astype(dtype)}


def _run(tx, params, grads_fn, steps, jit):
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  apply = jax.jit(optax.apply_updates) if jit else optax.apply_updates
  for t in range(steps):
    updates, state = update(grads_fn(t, params), state, params)
    params = apply(params, updates)
  return params, state


@pytest.mark.parametrize('name', sorted(BUILDERS))
@pytest.mark.parametrize('mode', ['kahan', 'stochastic'])
def test_float32_params_are_bit_identical_to_nearest(name, mode):
  params = _tree(jnp.float32)
  grads = lambda t, p: jax.tree.map(lambda x: jnp.sin(3.0 * x + t), p)
  want, _ = _run(BUILDERS[name]('nearest'), params, grads, 3, jit=True)
  got, state = _run(BUILDERS[name](mode), params, grads, 3, jit=True)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # No compensation for float32 leaves: only the int32 step is added.
  assert all(c is None for c in jax.tree.leaves(state[1].compensation, is_leaf=lambda x: x is None))


def test_nearest_is_the_builder_itself():
  tx = adamfx.adam(1e-3)
  assert not isinstance(tx.init(_tree(BF16))[-1], _param_rounding.ParamRoundingState)


@pytest.mark.parametrize('jit', [False, True])
def test_kahan_reaches_the_exact_sum_of_sub_ulp_steps(jit):
  # Constant gradients: Adam's steps do not depend on the params, so the
  # float64 sum of the float32-params run's updates is the exact target.
  p0 = jnp.full((64,), 1.0, BF16)
  g = jnp.linspace(-1.0, 1.0, 64).astype(BF16)
  steps = 300
  ref_tx = adamfx.adam(1e-3)
  ref_state = ref_tx.init(p0.astype(jnp.float32))
  total = np.zeros(64, np.float64)
  for _ in range(steps):
    u, ref_state = ref_tx.update(g.astype(jnp.float32), ref_state)
    total += np.asarray(u, np.float64)
  exact = 1.0 + total
  ulp = 2.0**-7  # bfloat16 ulp in [1, 2); 2**-8 in [0.5, 1)
  # float32 moments, as the reference's: only the params' storage differs.
  kahan = adamfx.adam(1e-3, mu_dtype=jnp.float32, nu_dtype=jnp.float32, param_rounding='kahan')
  got, _ = _run(kahan, p0, lambda t, p: g, steps, jit)
  err = np.abs(np.asarray(got, np.float64) - exact)
  assert err.max() <= ulp, err.max()
  # Round-to-nearest stalls: each 1e-3 step is below half an ulp of 1.0.
  nearest = adamfx.adam(1e-3, mu_dtype=jnp.float32, nu_dtype=jnp.float32)
  stalled, _ = _run(nearest, p0, lambda t, p: g, steps, jit)
  assert np.abs(np.asarray(stalled, np.float64) - exact).max() > 0.2


@pytest.mark.parametrize('jit', [False, True])
def test_stochastic_rounding_is_unbiased(jit):
  # Each step adds 2**-10 = an eighth of 1.0's bfloat16 ulp: the mean of n
  # params after k steps is 1 + k * 2**-10 within a few binomial sigmas
  # (per element and step the rounding's sd is <= ulp / 2).
  n, k = 1 << 15, 20
  step = 2.0**-10
  tx = _param_rounding.with_param_rounding(optax.sgd(1.0), 'stochastic')
  got, _ = _run(tx, jnp.ones((n,), BF16), lambda t, p: jnp.full((n,), -step, BF16), k, jit)
  mean = float(np.asarray(got, np.float64).mean())
  sigma = 2.0**-7 / 2 * np.sqrt(k / n)
  assert abs(mean - (1 + k * step)) < 5 * sigma, (mean, 1 + k * step, sigma)
  nearest, _ = _run(optax.sgd(1.0), jnp.ones((n,), BF16),
                    lambda t, p: jnp.full((n,), -step, BF16), k, jit)
  assert float(np.asarray(nearest, np.float64).mean()) == 1.0  # the stall it fixes


@pytest.mark.parametrize('jit', [False, True], ids=['eager', 'jit'])
@pytest.mark.parametrize('mode', ['kahan', 'stochastic'])
def test_4bit_moments_with_param_rounding_reach_the_exact_sum(mode, jit):
  """adam4bit(param_rounding=...) on bfloat16 params (issue 21).

  Constant gradients of one sign: the steps (about -lr each) do not depend on
  the params, and the 4-bit moments' random bits depend on (step, leaf,
  element) only, so the float64 sum of the updates of the same 4-bit Adam on
  float32 params is the exact target. Kahan ends within one bfloat16 ulp of
  it on every element; stochastic rounding is unbiased: the mean over the
  512 elements is within 5 sigma of the target's (each step's rounding error
  has sd <= ulp / 2, so after k steps an element's is <= ulp / 2 sqrt(k)).
  Round-to-nearest stalls at 1.0 (each step is under half an ulp).
  """
  steps, lr = 200, 1e-3
  p0 = jnp.ones((4, 128), BF16)
  g = (0.1 + jnp.abs(jnp.linspace(-1.0, 1.0, 512))).reshape(4, 128).astype(BF16)
  make = lambda m: adamfx.adam4bit(lr, min_4bit_size=256, param_rounding=m)
  ref_tx = adamfx.adam4bit(lr, min_4bit_size=256)
  ref_state = ref_tx.init(p0.astype(jnp.float32))
  total = np.zeros((4, 128), np.float64)
  ref_update = jax.jit(ref_tx.update)
  for _ in range(steps):
    u, ref_state = ref_update(g.astype(jnp.float32), ref_state)
    total += np.asarray(u, np.float64)
  exact = 1.0 + total
  # About -lr a step (-0.12 to -0.27 with 4-bit moments): >= 15 ulps to keep.
  assert np.all(total < -0.1)
  ulp = 2.0**-7  # bfloat16 ulp in [1, 2) (2**-8 below 1)
  got, state = _run(make(mode), p0, lambda t, p: g, steps, jit)
  assert got.dtype == BF16
  assert isinstance(state[0][0].mu, adamfx.Quantized4bit)  # the moments are 4-bit
  err = np.asarray(got, np.float64) - exact
  if mode == 'kahan':
    assert np.abs(err).max() <= ulp, np.abs(err).max()
  else:
    sigma = ulp / 2 * np.sqrt(steps / err.size)
    assert abs(err.mean()) < 5 * sigma, (err.mean(), sigma)
  stalled, _ = _run(make('nearest'), p0, lambda t, p: g, steps, jit)
  np.testing.assert_array_equal(np.asarray(stalled, np.float32), 1.0)


def test_stochastic_bits_are_reproducible_and_change_with_the_step():
  tx = adamfx.adam(1e-3, param_rounding='stochastic')
  p = jnp.full((4096,), 1.0, BF16)
  g = jnp.full((4096,), 0.3, BF16)
  s = tx.init(p)
  u1, s1 = jax.jit(tx.update)(g, s, p)
  u2, _ = tx.update(g, s, p)
  np.testing.assert_array_equal(np.asarray(u1, np.float32), np.asarray(u2, np.float32))
  u3, _ = jax.jit(tx.update)(g, s1, p)
  assert not np.array_equal(np.asarray(u1, np.float32), np.asarray(u3, np.float32))


def _kahan_step_reference(p, c, u):
  """One Kahan step in NumPy bfloat16 (ml_dtypes): no XLA to fold anything."""
  bf = type(np.asarray(jnp.zeros((), BF16)).dtype.type(0))
  f32 = np.float32
  c1 = (c.astype(f32) + u.astype(f32)).astype(bf)
  new = (p.astype(f32) + c1.astype(f32)).astype(bf)
  update = (new.astype(f32) - p.astype(f32)).astype(bf)
  c2 = (c1.astype(f32) - update.astype(f32)).astype(bf)
  return new, update, c2


@pytest.mark.parametrize('jit', [False, True])
def test_apply_updates_lands_exactly_on_the_compensated_param(jit):
  rng = np.random.default_rng(0)
  p = jnp.asarray(rng.normal(size=4096), jnp.float32).astype(BF16)
  u32 = jnp.asarray(rng.normal(size=4096) * np.exp(rng.uniform(-12, -2, 4096)), jnp.float32)
  c = jnp.asarray(rng.normal(size=4096) * 1e-3, jnp.float32).astype(BF16)
  # A transformation whose (float32) update is u32 whatever the gradient.
  inner = optax.GradientTransformation(
      lambda params: optax.EmptyState(), lambda g, s, params=None: (u32, s))
  tx = _param_rounding.with_param_rounding(inner, 'kahan')
  state = (optax.EmptyState(), _param_rounding.ParamRoundingState(jnp.zeros([], jnp.int32), c))

  def step(p, state):
    updates, state = tx.update(jnp.zeros_like(p), state, p)
    return optax.apply_updates(p, updates), updates, state

  new_p, updates, state = (jax.jit(step) if jit else step)(p, state)
  want_p, want_u, want_c = _kahan_step_reference(np.asarray(p), np.asarray(c), np.asarray(u32))
  np.testing.assert_array_equal(np.asarray(updates), want_u)
  np.testing.assert_array_equal(np.asarray(new_p), want_p)
  np.testing.assert_array_equal(np.asarray(state[1].compensation), want_c)
  assert np.count_nonzero(want_c) > 1000  # the compensation is not folded to 0 (jax#23007)


@pytest.mark.parametrize('name', sorted(BUILDERS))
def test_every_builder_trains_bf16_params_with_each_mode(name):
  params = _tree(BF16)
  grads = lambda t, p: jax.tree.map(lambda x: (jnp.sin(3.0 * x.astype(jnp.float32) + t)).astype(BF16), p)
  for mode in ('kahan', 'stochastic'):
    tx = BUILDERS[name](mode)
    eager, se = _run(tx, params, grads, 2, jit=False)
    jitted, sj = _run(tx, params, grads, 2, jit=True)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
      assert a.dtype == BF16
      # torch_adamw computes (p * (1 - lr * wd) + step) - p, where jit may fuse
      # a multiply-add: an ulp of the float32 update, so equal to a bf16 ulp.
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                 rtol=2**-7 if name == 'torch_adamw' else 0)
      assert not np.array_equal(np.asarray(a, np.float32), np.asarray(params['w' if a.ndim == 2 else 'b'], np.float32))


@pytest.mark.parametrize('mode, extra', [('kahan', 2 * (4 * 128 + 8) + 4), ('stochastic', 4)])
def test_state_extra_bytes(mode, extra):
  params = _tree(BF16)
  nbytes = lambda s: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s))
  base = nbytes(adamfx.adam(1e-3).init(params))
  assert nbytes(adamfx.adam(1e-3, param_rounding=mode).init(params)) - base == extra


def test_bad_mode_and_missing_params_are_refused():
  with pytest.raises(ValueError, match=r"`param_rounding` must be one of 'nearest', 'kahan', 'stochastic', got 'sr'"):
    adamfx.adamw(1e-3, param_rounding='sr')
  with pytest.raises(ValueError, match='param_rounding'):
    adamfx.torch_adam(param_rounding=None)
  tx = adamfx.adam(1e-3, param_rounding='kahan')
  p = _tree(BF16)
  with pytest.raises(ValueError, match="param_rounding='kahan' needs the params"):
    tx.update(p, tx.init(p))


def test_checkpoint_round_trip_and_resume(tmp_path):
  params = _tree(BF16)
  grads = lambda t, p: jax.tree.map(lambda x: (jnp.cos(2.0 * x.astype(jnp.float32) + t)).astype(BF16), p)
  tx = adamfx.adam8bit(1e-3, min_8bit_size=256, param_rounding='kahan')
  step = jax.jit(lambda p, s, t: tx.update(grads(t, p), s, p))
  state = tx.init(params)
  for t in range(3):
    u, state = step(params, state, t)
    params = optax.apply_updates(params, u)
  adamfx.save_npz(tmp_path / 'ckpt.npz', {'params': params, 'state': state})
  restored = adamfx.restore_npz(tmp_path / 'ckpt.npz', {'params': params, 'state': state})
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves({'params': params, 'state': state})):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  p1, s1, p2, s2 = params, state, restored['params'], restored['state']
  for t in range(3, 6):
    u, s1 = step(p1, s1, t)
    p1 = optax.apply_updates(p1, u)
    u, s2 = step(p2, s2, t)
    p2 = optax.apply_updates(p2, u)
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kahan_init_keeps_the_float32_params_low_bits():
  rng = np.random.default_rng(1)
  p32 = {'w': jnp.asarray(rng.normal(size=(16, 64)), jnp.float32)}
  tx = adamfx.adamw(1e-3, weight_decay=0.0, param_rounding='kahan')
  params, state = adamfx.kahan_init(tx, p32)
  assert params['w'].dtype == BF16
  p_plus_c = np.asarray(params['w'], np.float64) + np.asarray(state[1].compensation['w'], np.float64)
  err = np.abs(p_plus_c - np.asarray(p32['w'], np.float64))
  plain = np.abs(np.asarray(params['w'], np.float64) - np.asarray(p32['w'], np.float64))
  # p + c holds p32 to bfloat16 precision of the residual (2**-9 of it).
  assert (err <= plain * 2.0**-8).all() and plain.max() > 0
  with pytest.raises(ValueError, match='no Kahan compensation'):
    adamfx.kahan_init(adamfx.adam(1e-3), p32)
  with pytest.raises(ValueError, match='narrower than float32'):
    adamfx.kahan_init(tx, p32, jnp.float32)


def test_inject_hyperparams_keeps_param_rounding_static():
  tx = adamfx.inject_hyperparams(adamfx.adam)(1e-3, param_rounding='kahan')
  p = _tree(BF16)
  u, s = jax.jit(tx.update)(p, tx.init(p), p)
  assert jax.tree.leaves(u)[0].dtype == BF16


# ------------------------------------------------------------------- memory


def _excess_bytes(make, params_dtype, layers):
  """Peak of the donated step - SGD's peak - the state (bytes), and the params."""
  from adamfx.cli import step_memory

  m = step_memory.mlp_model(width=1024, layers=layers, batch=32)
  got = step_memory.measure(m, make(), params_dtype)
  floor = step_memory.sgd_floor(m, params_dtype)
  return (got['peak'] - floor['peak'] - got['state']) * got['n'], got['n']


_SLOW = pytest.mark.slow


@pytest.mark.parametrize('label, make, dtype', [
    ('adam8bit f32', lambda: adamfx.adam8bit(1e-3), jnp.float32),
    ('adam kahan', lambda: adamfx.adam(1e-3, param_rounding='kahan'), BF16),
    ('adam8bit kahan', lambda: adamfx.adam8bit(1e-3, param_rounding='kahan'), BF16),
    pytest.param('adam f32', lambda: adamfx.adam(1e-3), jnp.float32, marks=_SLOW),
    pytest.param('adam8bit bf16', lambda: adamfx.adam8bit(1e-3), BF16, marks=_SLOW),
    pytest.param('adam stochastic', lambda: adamfx.adam(1e-3, param_rounding='stochastic'), BF16,
                 marks=_SLOW),
    pytest.param('adamw8bit stochastic',
                 lambda: adamfx.adamw8bit(1e-3, param_rounding='stochastic'), BF16, marks=_SLOW),
    pytest.param('torch_adamw kahan', lambda: adamfx.torch_adamw(1e-3, param_rounding='kahan'),
                 BF16, marks=_SLOW),
])
def test_step_holds_no_update_sized_temporaries(label, make, dtype):
  # Issue 20: the donated training step's peak <= SGD's peak + the state +
  # 0.5 B/param. What the optimizer adds beyond its state must not grow with
  # the model: from one 1024x1024 layer to two, the excess grows by at most
  # 0.5 B per added param (an update-sized buffer would add 2-4). Before the
  # 8-bit step wrote its update into the gradient's buffer, it added 4.3.
  # A fixed part stays: the 8-bit step's chunk temporaries (two float32
  # chunks of up to 256K elements, 2 MiB) and XLA's scheduling slack.
  e1, n1 = _excess_bytes(make, dtype, 1)
  e2, n2 = _excess_bytes(make, dtype, 2)
  assert (e2 - e1) / (n2 - n1) <= 0.5, (label, e1, e2)
  assert e2 <= 0.5 * n2 + 4 * 2**20, (label, e2 / n2)


# --------------------------------------------------------------------- peer


@pytest.mark.parametrize('steps, batch', [(150, 128), pytest.param(1500, 256, marks=_SLOW)])
def test_no_worse_than_torch_optimi_kahan_adamw(steps, batch):
  # The teacher-student task (64-256-256-16, tanh), bfloat16 params,
  # the same init and batches for both; a short run by default.
  torch = pytest.importorskip('torch')
  optimi = pytest.importorskip('optimi')
  torch.set_num_threads(1)
  sizes = (64, 256, 256, 16)
  rng = np.random.default_rng(0)
  teacher = [(rng.normal(size=(a, b)) / np.sqrt(a), np.zeros(b)) for a, b in zip(sizes[:-1], sizes[1:])]
  init = [(rng.normal(size=(a, b)) / np.sqrt(a), np.zeros(b)) for a, b in zip(sizes[:-1], sizes[1:])]
  lr = 1e-3
  xs = rng.normal(size=(steps, batch, 64)).astype(np.float32)
  x_eval = rng.normal(size=(2048, 64)).astype(np.float32)

  def np_forward(layers, x):
    for i, (w, b) in enumerate(layers):
      x = x @ w + b
      x = np.tanh(x) if i < len(layers) - 1 else x
    return x

  ys = np.stack([np_forward(teacher, x) for x in xs]).astype(np.float32)
  y_eval = np_forward(teacher, x_eval)

  # torch-optimi: bfloat16 weights, AdamW with a Kahan compensation buffer.
  tp = [torch.tensor(a, dtype=torch.bfloat16, requires_grad=True) for wb in init for a in wb]
  # optimi's defaults differ (betas (0.9, 0.99), eps 1e-6): adamfx's set here.
  opt = optimi.AdamW(tp, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, kahan_sum=True,
                     foreach=False)

  def t_forward(x):
    h = x
    for i in range(3):
      h = h @ tp[2 * i].float() + tp[2 * i + 1].float()
      h = torch.tanh(h) if i < 2 else h
    return h

  for t in range(steps):
    opt.zero_grad()
    loss = ((t_forward(torch.from_numpy(xs[t])) - torch.from_numpy(ys[t])) ** 2).mean()
    loss.backward()
    opt.step()
  final = lambda layers: float(np.mean((np_forward(layers, x_eval) - y_eval) ** 2))
  optimi_loss = final([(tp[2 * i].detach().float().numpy(), tp[2 * i + 1].detach().float().numpy())
                       for i in range(3)])

  params = [(jnp.asarray(w, BF16), jnp.asarray(b, BF16)) for w, b in init]
  tx = adamfx.adamw(lr, weight_decay=0.0, param_rounding='kahan')

  def loss_fn(params, x, y):
    h = x
    for i, (w, b) in enumerate(params):
      h = h @ w.astype(jnp.float32) + b.astype(jnp.float32)
      h = jnp.tanh(h) if i < 2 else h
    return jnp.mean((h - y) ** 2)

  @jax.jit
  def train(params):
    def body(carry, batch):
      params, state = carry
      grads = jax.grad(loss_fn)(params, *batch)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None
    (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), (jnp.asarray(xs), jnp.asarray(ys)))
    return params

  ours = final([(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in train(params)])
  # "No worse": within the parity threshold (1%) of optimi's loss.
  print(f'teacher-student {steps} steps: adamfx {ours:.5f}, optimi {optimi_loss:.5f}')
  assert ours <= optimi_loss * 1.01, (ours, optimi_loss)


@pytest.mark.parametrize('mode', ['kahan', 'stochastic'])
def test_eager_rounding_is_one_compiled_call(mode):
  # Eagerly, every leaf's rounding runs in one compiled call: the op-by-op
  # code compiled 15 (Kahan) and 33 (stochastic) programs for this first
  # step (run alone), and took 4x (Kahan) to 8x (stochastic) as long a step. (Its
  # numbers: the eager cases of the tests above.)
  params = {'w': jnp.linspace(-1, 1, 13 * 11).reshape(13, 11).astype(jnp.bfloat16),
            'b': jnp.ones(11, jnp.bfloat16)}  # shapes no other test uses
  tx = adamfx.adam(1e-3, param_rounding=mode)
  state = tx.init(params)
  grads = jax.tree.map(lambda x: x * 0.5, params)
  with harness.compiled_programs() as compiled:
    tx.update(grads, state, params)
  # The upcast of the two gradients, adam's step, the step count's
  # increment (3 scalar operations), and the rounding.
  assert len(compiled) <= 7, compiled
