"""torch_adam / torch_adamw / keras_adam / keras_adamw against the frameworks themselves.

Golden trajectories: the same drifting noisy quadratic as the other reference
tests (``harness``), whose gradients feed back on each implementation's own
params, run by ``torch.optim`` in float64 (adamfx under ``jax.enable_x64``)
and by Keras 3 on its JAX backend in float32. torch and Keras are optional:
their tests skip when the package is missing.
"""

from __future__ import annotations

import os
import zlib

import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamfx

STEPS = 200


def _problem(seed, dtype=np.float64, steps=STEPS):
  rng = np.random.default_rng(seed)
  params = harness.random_tree(rng, dtype)
  a, t, n = harness.streams(rng, params, steps)
  return params, a, t, n


def _seed(*key):
  return zlib.crc32(repr(key).encode())


def _grads(a_l, t_l, n_l, k, ps):
  return [a_ * (p - t[k]) + n[k] for p, a_, t, n in zip(ps, a_l, t_l, n_l)]


def _leaves(*trees):
  return [[np.asarray(x) for x in jax.tree.leaves(tree)] for tree in trees]


def run_adamfx(tx, params, a, t, n):
  with jax.enable_x64(True):
    params = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    p, s, _ = harness.run_jax(tx, params, a, t, n)
    return [np.asarray(x) for x in jax.tree.leaves(p)], s


# ------------------------------------------------------------------- torch


def run_torch(make_opt, params, a, t, n, steps=STEPS, lr_factor=None):
  torch = pytest.importorskip('torch')
  ps = [torch.tensor(np.asarray(p, np.float64), requires_grad=True) for p in jax.tree.leaves(params)]
  opt = make_opt(ps)
  sched = None if lr_factor is None else torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
  a_l, t_l, n_l = _leaves(a, t, n)
  a_l = jax.tree.leaves(a)
  for k in range(steps):
    opt.zero_grad()
    gs = _grads(a_l, t_l, n_l, k, [p.detach().numpy() for p in ps])
    for p, g in zip(ps, gs):
      p.grad = torch.from_numpy(np.asarray(g, np.float64))
    opt.step()
    if sched is not None:
      sched.step()
  return [p.detach().numpy().copy() for p in ps], opt


# The option grid: every combination of the class (Adam, AdamW),
# weight_decay (0 or not), amsgrad and maximize; each of the four
# (betas/eps, schedule) variants appears once for every (class, weight_decay).
_VARIANTS = [
    dict(lr=1e-2),
    dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6),
    dict(lr=1e-2, schedule=True),
    dict(lr=5e-3, betas=(0.85, 0.98), eps=1e-3, schedule=True),
]
_GRID = [
    (cls, wd, amsgrad, maximize, (2 * amsgrad + maximize + 2 * (wd > 0)) % 4)
    for cls in ('Adam', 'AdamW')
    for wd in (0.0, 0.1)
    for amsgrad in (False, True)
    for maximize in (False, True)
]


def _lr_of(variant):
  """The learning rate: a number, or an optax schedule and torch's LambdaLR factor."""
  lr = variant['lr']
  if not variant.get('schedule'):
    return lr, None
  # Warm-up then cosine decay: every step has another rate.
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, 20, STEPS, lr / 10)
  with jax.enable_x64(True):
    table = np.asarray([float(sched(k)) for k in range(STEPS + 1)], np.float64)

  def schedule(count):
    return jnp.asarray(table)[count]

  return schedule, lambda k: table[k] / lr


@pytest.mark.parametrize(
    'cls,wd,amsgrad,maximize,variant', _GRID,
    ids=[f'{c}-wd{w}-ams{int(a)}-max{int(m)}-v{v}' for c, w, a, m, v in _GRID],
)
def test_torch_golden(cls, wd, amsgrad, maximize, variant):
  torch = pytest.importorskip('torch')
  v = _VARIANTS[variant]
  lr, factor = _lr_of(v)
  kw = {k: v[k] for k in ('betas', 'eps') if k in v}
  params, a, t, n = _problem(_seed(cls, wd, amsgrad, maximize))
  torch_cls = getattr(torch.optim, cls)
  want, _ = run_torch(
      lambda ps: torch_cls(ps, lr=v['lr'], weight_decay=wd, amsgrad=amsgrad,
                           maximize=maximize, **kw),
      params, a, t, n, lr_factor=factor,
  )
  make = adamfx.torch_adam if cls == 'Adam' else adamfx.torch_adamw
  got, _ = run_adamfx(
      make(lr, weight_decay=wd, amsgrad=amsgrad, maximize=maximize, **kw), params, a, t, n
  )
  # float64 both sides, the same operations in the same order; what is left
  # is XLA's fusion (e.g. a fused multiply-add) against torch's kernels.
  # Measured <= 2.5e-15 relative over 200 steps: rtol 1e-12 (as test_adam.py)
  # leaves 400x margin (float32 anywhere on the way would be ~1e-7). A
  # convention difference (eps placement, amsgrad's max, L2 vs decoupled
  # decay) is 1e-4 or more.
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    'cls,wd,amsgrad,maximize,variant', _GRID[::3],
    ids=[f'{c}-wd{w}-ams{int(a)}-max{int(m)}-v{v}' for c, w, a, m, v in _GRID[::3]],
)
def test_torch_float32(cls, wd, amsgrad, maximize, variant):
  """A float32 torch run, the usual one to port. torch computes the bias
  corrections and step size in Python doubles, adamfx in float32 (with
  ``1 - beta**t`` as ``-expm1(t * log(beta))``, see _bias_correction)."""
  torch = pytest.importorskip('torch')
  v = _VARIANTS[variant]
  kw = {k: v[k] for k in ('betas', 'eps') if k in v}
  steps = 100
  params, a, t, n = _problem(_seed(cls, wd, amsgrad, maximize), np.float32, steps)
  ps = [torch.tensor(p, requires_grad=True) for p in jax.tree.leaves(params)]
  opt = getattr(torch.optim, cls)(ps, lr=v['lr'], weight_decay=wd, amsgrad=amsgrad,
                                  maximize=maximize, **kw)
  a_l = jax.tree.leaves(a)
  _, t_l, n_l = _leaves(a, t, n)
  for k in range(steps):
    opt.zero_grad()
    for p, g in zip(ps, _grads(a_l, t_l, n_l, k, [p.detach().numpy() for p in ps])):
      p.grad = torch.from_numpy(np.asarray(g, np.float32))
    opt.step()
  make = adamfx.torch_adam if cls == 'Adam' else adamfx.torch_adamw
  got = run_adamfx32(
      make(v['lr'], weight_decay=wd, amsgrad=amsgrad, maximize=maximize, **kw), params, a, t, n)
  # Measured <= 7.2e-7 absolute on O(1) params after 100 steps (a few
  # float32 ulps, from the scalars rounded once more than torch's); 1 -
  # float32(beta)**t instead gave 3.8e-6, a convention difference 1e-4.
  for g, w in zip(got, ps):
    np.testing.assert_allclose(g, w.detach().numpy(), rtol=0, atol=2e-6)


def test_torch_differs_from_optax_where_documented():
  """torch's amsgrad (max of the raw v) and L2 weight decay are not optax's
  amsgrad / adamw: the golden tests above would catch a silent fallback."""
  torch = pytest.importorskip('torch')
  params = {'w': np.zeros(4)}
  a = {'w': 0.0}
  g = np.concatenate([np.full((20, 4), 10.0), np.full((STEPS - 20, 4), 0.1)])
  t, n = {'w': np.zeros((STEPS, 4))}, {'w': g}
  want, _ = run_torch(lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True), params, a, t, n)
  exact, _ = run_adamfx(adamfx.torch_adam(1e-2, amsgrad=True), params, a, t, n)
  optax_like, _ = run_adamfx(adamfx.adam(1e-2, amsgrad=True), params, a, t, n)
  np.testing.assert_allclose(exact[0], want[0], rtol=1e-12, atol=1e-14)
  assert np.max(np.abs(optax_like[0] - want[0])) > 1e-3


# ------------------------------------------------------------------- Keras


@pytest.fixture(scope='module')
def keras():
  # Keras 3 picks its backend once, on import; only this import sees the variable.
  before = os.environ.get('KERAS_BACKEND')
  os.environ['KERAS_BACKEND'] = 'jax'
  try:
    keras = pytest.importorskip('keras')
  finally:
    if before is None:
      del os.environ['KERAS_BACKEND']
    else:
      os.environ['KERAS_BACKEND'] = before
  if keras.backend.backend() != 'jax':
    pytest.skip('keras was imported with another backend')
  return keras


def run_keras(keras, opt, params, a, t, n, steps=STEPS):
  a_l = jax.tree.leaves(a)
  _, t_l, n_l = _leaves(a, t, n)
  with jax.numpy_dtype_promotion('standard'):
    vs = [keras.Variable(np.asarray(p, np.float32)) for p in jax.tree.leaves(params)]
    for k in range(steps):
      gs = _grads(a_l, t_l, n_l, k, [np.asarray(v.value) for v in vs])
      opt.apply_gradients([(jnp.asarray(g, jnp.float32), v) for g, v in zip(gs, vs)])
    return [np.asarray(v.value) for v in vs]


def run_adamfx32(tx, params, a, t, n):
  cast = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
  p, _, _ = harness.run_jax(tx, cast(params), a, cast(t), cast(n))
  return [np.asarray(x) for x in jax.tree.leaves(p)]


_KERAS_GRID = [
    (cls, amsgrad, custom, schedule)
    for cls in ('Adam', 'AdamW')
    for amsgrad in (False, True)
    for custom, schedule in ((False, False), (True, True))
]


@pytest.mark.parametrize(
    'cls,amsgrad,custom,schedule', _KERAS_GRID,
    ids=[f'{c}-ams{int(a)}-custom{int(u)}-sched{int(s)}' for c, a, u, s in _KERAS_GRID],
)
def test_keras_golden(keras, cls, amsgrad, custom, schedule):
  steps = 100
  params, a, t, n = _problem(_seed(cls, amsgrad, custom), np.float32, steps)
  kw = dict(beta_1=0.8, beta_2=0.99, epsilon=1e-4) if custom else {}
  if cls == 'AdamW':
    kw['weight_decay'] = 0.05
  lr = 1e-2
  if schedule:
    lr_fx = optax.exponential_decay(1e-2, transition_steps=10, decay_rate=0.8)

    class Sched(keras.optimizers.schedules.LearningRateSchedule):
      def __call__(self, step):
        return lr_fx(step)

    lr_keras = Sched()
  else:
    lr_fx = lr_keras = lr
  opt = getattr(keras.optimizers, cls)(learning_rate=lr_keras, amsgrad=amsgrad, **kw)
  want = run_keras(keras, opt, params, a, t, n, steps)
  make = adamfx.keras_adam if cls == 'Adam' else adamfx.keras_adamw
  with jax.numpy_dtype_promotion('standard'):  # the optax schedule
    got = run_adamfx32(make(lr_fx, amsgrad=amsgrad, **kw), params, a, t, n)
  # float32, the same operations in the same order; Keras runs them op by op,
  # adamfx in one compiled scan, where XLA may fuse a multiply-add (run op by
  # op, adamfx gives Keras's bits). Measured <= 1.2e-7 absolute on O(1)
  # params after 100 steps (one float32 ulp at 1.0), not growing with the
  # steps; 5e-7 is four. A convention difference (epsilon placement, 1 - beta
  # in float32 instead of double, the decay's order) is 1e-6 or more.
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=0, atol=5e-7)


def test_keras_epsilon_is_not_optax_eps(keras):
  """Keras's epsilon sits on sqrt(v), outside the bias correction: with the
  same number optax's adam takes other steps (optax issue 571)."""
  params, a, t, n = _problem(7, np.float32, 50)
  want = run_keras(keras, keras.optimizers.Adam(learning_rate=1e-2, epsilon=1e-3), params, a, t, n, 50)
  exact = run_adamfx32(adamfx.keras_adam(1e-2, epsilon=1e-3), params, a, t, n)
  with jax.numpy_dtype_promotion('standard'):
    other = run_adamfx32(optax.adam(1e-2, eps=1e-3), params, a, t, n)
  err = lambda got: max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
  assert err(exact) <= 1e-6
  assert err(other) > 1e-4


# --------------------------------------------------- contracts and errors


def test_defaults_are_the_frameworks():
  import inspect

  sig = lambda f: {k: v.default for k, v in inspect.signature(f).parameters.items()}
  assert sig(adamfx.torch_adam) == dict(
      lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
      param_rounding='nearest', update_clipping=False, cautious=False)
  assert sig(adamfx.torch_adamw)['weight_decay'] == 1e-2
  assert sig(adamfx.keras_adam) == dict(
      learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False,
      param_rounding='nearest', update_clipping=False, cautious=False)
  assert sig(adamfx.keras_adamw) == dict(
      learning_rate=1e-3, weight_decay=0.004, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
      amsgrad=False, param_rounding='nearest', update_clipping=False, cautious=False)


@pytest.mark.parametrize('make,match', [
    (lambda: adamfx.torch_adam(lr=-1.0), '`lr` must be >= 0, got -1.0'),
    (lambda: adamfx.torch_adam(betas=(0.9, 1.0)), r'`beta2` must be in \[0, 1\), got 1.0'),
    (lambda: adamfx.torch_adam(betas=0.9), r'`betas` must be a pair'),
    (lambda: adamfx.torch_adam(eps=-1e-8), '`eps` must be >= 0'),
    (lambda: adamfx.torch_adamw(weight_decay=float('nan')), '`weight_decay` must be a finite'),
    (lambda: adamfx.torch_adam(amsgrad=1), '`amsgrad` must be True or False'),
    (lambda: adamfx.keras_adam(beta_1=1.5), r'`beta_1` must be in \[0, 1\)'),
    (lambda: adamfx.keras_adam(epsilon='x'), '`epsilon` must be a real number'),
    (lambda: adamfx.keras_adamw(weight_decay=-0.1), '`weight_decay` must be >= 0'),
])
def test_bad_arguments(make, match):
  with pytest.raises((ValueError, TypeError), match=match):
    make()


def test_decay_that_rounds_to_one_in_float32():
  tx = adamfx.torch_adam(betas=(0.9, 1 - 1e-9))
  with pytest.raises(ValueError, match=r'`beta2` = 0.999999999 rounds to 1.0 in float32'):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)))


def test_needs_params_for_weight_decay_and_real_leaves():
  tx = adamfx.torch_adamw()
  g = {'w': jnp.ones(3)}
  with pytest.raises(ValueError, match='weight_decay needs the params'):
    tx.update(g, tx.init(g))
  with pytest.raises(TypeError, match=r"leaf `\['w'\]` is complex"):
    tx.init({'w': jnp.ones(3, jnp.complex64)})


@pytest.mark.parametrize('make', [
    lambda: adamfx.torch_adam(1e-2, amsgrad=True), lambda: adamfx.torch_adamw(1e-2),
    lambda: adamfx.keras_adam(1e-2), lambda: adamfx.keras_adamw(1e-2, amsgrad=True),
])
def test_contract(make):
  """jit once, bfloat16 params (float32 moments), None leaves, the no-freeze
  clip, vmap, empty trees and a float16 step."""
  tx = make()
  params = {'a': jnp.ones(4, jnp.bfloat16), 'b': None, 'c': jnp.zeros((2, 3))}
  state = tx.init(params)
  assert state.mu['a'].dtype == jnp.float32
  step = jax.jit(tx.update)
  g = {'a': jnp.full(4, 0.5, jnp.bfloat16), 'b': None, 'c': jnp.ones((2, 3))}
  for _ in range(3):
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
  assert step._cache_size() == 1
  assert u['a'].dtype == jnp.bfloat16 and u['b'] is None
  assert int(state.count) == 3
  # A gradient whose square overflows float32 does not freeze the param.
  huge = {'a': jnp.full(4, 0.5, jnp.bfloat16), 'b': None, 'c': jnp.full((2, 3), 1e30)}
  u, state = step(huge, state, params)
  u, state = step(g, state, params)
  assert bool(jnp.all(jnp.isfinite(state.nu['c'])))
  assert bool(jnp.all(u['c'] != 0))
  # vmap over a batch of params, and an empty tree.
  batch = jnp.ones((3, 4))
  u, _ = jax.vmap(tx.update)(batch, jax.vmap(tx.init)(batch), batch)
  assert u.shape == (3, 4) and bool(jnp.all(jnp.isfinite(u)))
  assert tx.update({}, tx.init({}), {})[0] == {}
  # float16 params: a gradient of 1e4 squares past float16's range, not float32's.
  p16 = jnp.ones(2, jnp.float16)
  u, s16 = tx.update(jnp.full(2, 1e4, jnp.float16), tx.init(p16), p16)
  assert u.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(u))) and bool(jnp.all(u < 0))


def _five_steps(tx, p):
  s = tx.init(p)
  for k in range(5):
    u, s = tx.update(jnp.sin(p + k), s, p)
    p = p + u
  return p


@pytest.mark.parametrize('make', [adamfx.torch_adamw, adamfx.keras_adamw])
def test_traced_hyperparameters(make):
  """Hyperparameters traced under jit give the numbers of the same values
  passed as Python numbers. The values are exact in float32, so ``1 - b``
  (computed in double from Python numbers, as the frameworks do, and in
  float32 from traced ones) is the same number both ways."""
  hp = (2.0**-6, 0.75, 0.5, 2.0**-20, 2.0**-3)
  p0 = jnp.arange(5.0)

  def run(lr, b1, b2, eps, wd):
    if make is adamfx.torch_adamw:
      return _five_steps(make(lr, betas=(b1, b2), eps=eps, weight_decay=wd), p0)
    return _five_steps(make(lr, wd, b1, b2, eps), p0)

  got = jax.jit(run)(*hp)
  want = run(*hp)
  # Compiled vs op-by-op float32: a fused multiply-add may round once less,
  # so the params (up to 4.0, ulp 4.8e-7) may differ by an ulp or two.
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_optax_agreement_where_conventions_agree():
  """torch's Adam is Algorithm 1 in another order of operations: optax's
  adam with the same (concrete) hyperparameters takes the same steps."""
  p0 = jnp.arange(5.0)
  got = _five_steps(adamfx.torch_adam(1e-2), p0)
  with jax.numpy_dtype_promotion('standard'):
    want = _five_steps(optax.adam(1e-2), p0)
  # Another order of operations in float32: the params (up to 4.0, ulp
  # 4.8e-7) may differ by an ulp or two; a convention difference is 1e-4.
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
