"""ema_params / averaged_params: the Adam paper's averaging of the parameters.

The average is checked against its closed form (a weighted sum of the
parameter trajectory, computed in float64 NumPy, not the recursion the code
runs), for both conventions; then bfloat16 params, composition with chains
and optax's combinators, jit, traced decay, checkpoints and sharding.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import no_recompile

import adamfx

T = 25


def _trajectory(tx, params, steps=T, jit=False):
  """Runs ``tx`` on a fixed gradient stream; returns (params per step, state)."""
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(steps,) + np.shape(params)).astype(np.asarray(params).dtype)
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  ps = [np.asarray(params, np.float64)]
  for g in grads:
    u, state = update(jnp.asarray(g, params.dtype), state, params)
    params = optax.apply_updates(params, u)
    ps.append(np.asarray(params).astype(np.float64))
  return np.stack(ps), state


def closed_form(ps, decay, debias):
  """The average after ``len(ps) - 1`` updates, as a weighted sum of the params."""
  t = len(ps) - 1
  weights = (1 - decay) * decay ** (t - np.arange(1, t + 1))
  avg = np.tensordot(weights, ps[1:], axes=1)
  if debias:
    return avg / (1 - decay**t)
  return avg + decay**t * ps[0]


@pytest.mark.parametrize('debias', [True, False])
@pytest.mark.parametrize('decay', [0.9, 0.999])
def test_matches_closed_form(decay, debias, x64):
  params = jnp.asarray(np.linspace(-1, 1, 6))
  tx = adamfx.ema_params(adamfx.adam(0.1), decay, debias=debias)
  ps, state = _trajectory(tx, params)
  # float64 both sides; the recursion and the sum round differently (~1e-15).
  np.testing.assert_allclose(adamfx.averaged_params(state), closed_form(ps, decay, debias),
                             rtol=1e-12, atol=1e-15)
  assert int(state.count) == T


def test_updates_unchanged_and_float32():
  params = {'w': jnp.linspace(-1, 1, 6), 'b': jnp.zeros(2)}
  g = jax.tree.map(jnp.ones_like, params)
  inner = adamfx.adam(0.1)
  tx = adamfx.ema_params(inner)
  u_ref, _ = inner.update(g, inner.init(params), params)
  u, state = tx.update(g, tx.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, u, u_ref)
  # After one update the debiased average is the params themselves.
  np.testing.assert_allclose(
      adamfx.averaged_params(state)['w'], optax.apply_updates(params, u)['w'], rtol=1e-6)


def test_bfloat16_params_do_not_stall():
  """In bfloat16, 0.999 * avg + 0.001 * p rounds back to avg; the average is
  kept in float32 and follows the (bfloat16) params."""
  params = jnp.ones(4, jnp.bfloat16)
  tx = adamfx.ema_params(optax.sgd(1.0 / 64), decay=0.999, debias=False)  # steps of ~2 ulps
  ps, state = _trajectory(tx, params, steps=200)
  avg = adamfx.averaged_params(state)
  assert avg.dtype == jnp.float32
  want = closed_form(ps, 0.999, debias=False)
  # float32 recursion over 200 steps: a few float32 ulps of O(1) values.
  np.testing.assert_allclose(avg, want, rtol=1e-5)
  assert np.all(np.asarray(avg) != 1.0)  # it moved
  # What a bfloat16 average would have done: stall at the initial params.
  stalled = jnp.ones(4, jnp.bfloat16)
  for p in ps[1:]:
    stalled = (0.999 * stalled.astype(jnp.float32) + 0.001 * jnp.asarray(p, jnp.float32)).astype(jnp.bfloat16)
  assert np.all(np.asarray(stalled, np.float32) == 1.0)


def test_composition_jit_and_traced_decay():
  params = {'w': jnp.linspace(-1, 1, 6), 'skip': jnp.ones(2)}
  g = jax.tree.map(jnp.ones_like, params)
  inner = optax.chain(optax.clip_by_global_norm(1.0), adamfx.torch_adamw(1e-2))
  # ema_params inside a chain, under a mask, and averaged_params finding it.
  tx = optax.chain(
      optax.masked(adamfx.ema_params(inner, 0.9), {'w': True, 'skip': False}),
      optax.scale(1.0),
  )
  state = tx.init(params)
  step = jax.jit(tx.update)
  # The same inner optimizer on the masked leaf alone: the updates ema_params passes on.
  alone = {'w': params['w']}
  alone_state = inner.init(alone)
  trajectory = [np.asarray(params['w'], np.float64)]
  with no_recompile(step):
    for _ in range(3):
      u, state = step(g, state, params)
      want, alone_state = inner.update({'w': g['w']}, alone_state, alone)
      # torch_adamw's update is new_p - p of rounded params: jitted here, eager there,
      # they may differ by a param ulp (|w| <= 1.01: 2**-23).
      np.testing.assert_allclose(u['w'], want['w'], rtol=0, atol=2.0**-23)
      np.testing.assert_array_equal(u['skip'], g['skip'])  # masked out: passed through
      params = optax.apply_updates(params, u)
      alone = optax.apply_updates(alone, want)
      trajectory.append(np.asarray(params['w'], np.float64))
  avg = adamfx.averaged_params(state)
  assert set(avg) == {'w', 'skip'}
  assert isinstance(avg['skip'], optax.MaskedNode)
  # float32 params and average: a few float32 ulps of |w| ~ 1.
  np.testing.assert_allclose(avg['w'], closed_form(np.stack(trajectory), 0.9, True),
                             rtol=0, atol=1e-6)
  assert jax.tree.leaves(state[0].inner_state)[0].dtype == jnp.int32  # count first
  # Traced decay: the same numbers as the Python number.
  def run(decay):
    t = adamfx.ema_params(adamfx.adam(0.1), decay)
    p = jnp.arange(3.0)
    s = t.init(p)
    for _ in range(3):
      u, s = t.update(jnp.ones(3), s, p)
      p = p + u
    return adamfx.averaged_params(s)

  np.testing.assert_allclose(jax.jit(run)(0.9), run(0.9), rtol=1e-6)


def test_checkpoint_round_trip(tmp_path):
  params = {'w': jnp.linspace(-1, 1, 6).astype(jnp.bfloat16)}
  tx = adamfx.ema_params(adamfx.keras_adamw(1e-2, amsgrad=True))
  state = tx.init(params)
  for _ in range(2):
    u, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    params = optax.apply_updates(params, u)
  adamfx.save_npz(tmp_path / 's.npz', state)
  back = adamfx.restore_npz(tmp_path / 's.npz', tx.init(params))
  jax.tree.map(np.testing.assert_array_equal, back, state)
  np.testing.assert_array_equal(adamfx.averaged_params(back)['w'], adamfx.averaged_params(state)['w'])


def test_errors():
  tx = adamfx.ema_params(optax.sgd(0.1))
  p = jnp.ones(2)
  with pytest.raises(ValueError, match='update needs them'):
    tx.update(p, tx.init(p))
  with pytest.raises(ValueError, match=r'`decay` must be in \[0, 1\), got 1.0'):
    adamfx.ema_params(optax.sgd(0.1), 1.0)
  with pytest.raises(TypeError, match='`debias` must be True or False'):
    adamfx.ema_params(optax.sgd(0.1), debias=1)
  with pytest.raises(TypeError, match='`tx` must be an optax GradientTransformation'):
    adamfx.ema_params(0.1)
  with pytest.raises(ValueError, match='exactly one EmaParamsState'):
    adamfx.averaged_params(optax.sgd(0.1).init(p))
  # Before any update, the debiased average is zeros (there is nothing to average).
  np.testing.assert_array_equal(adamfx.averaged_params(tx.init(p)), np.zeros(2))


_SHARDED = textwrap.dedent('''
  import jax, jax.numpy as jnp, numpy as np, optax, adamfx
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ('x', 'y'))
  sh = NamedSharding(mesh, P('x', 'y'))
  params = {'w': jax.device_put(jnp.ones((8, 4)), sh)}
  for debias in (True, False):
    tx = adamfx.ema_params(adamfx.torch_adamw(1e-2, amsgrad=True), debias=debias)
    state = jax.jit(tx.init)(params)
    u, state = jax.jit(tx.update)(params, state, params)
    for leaf in (state.ema['w'], state.inner.mu['w'], state.inner.nu_max['w'],
                 adamfx.averaged_params(state)['w']):
      assert leaf.sharding.is_equivalent_to(sh, 2), leaf.sharding
  print('OK')
''')


@pytest.mark.xdist_group('devices8')  # one worker runs the 8-device subprocesses
def test_sharded_like_params():
  out = subprocess.run([sys.executable, '-c', _SHARDED], env=harness.devices_env(8), capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0 and 'OK' in out.stdout, out.stderr[-2000:]


def test_debias_false_is_flax_nnx_ema():
  """``debias=False`` against ``flax.nnx.EMA`` fed the same params (skipped
  without flax)."""
  nnx = pytest.importorskip('flax.nnx')
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  ema = nnx.EMA(model, decay=0.9)
  params = {'bias': model.bias[...], 'kernel': model.kernel[...]}
  tx = adamfx.ema_params(adamfx.torch_adam(0.1), 0.9, debias=False)
  state = tx.init(params)
  for k in range(8):
    g = jax.tree.map(lambda x: jnp.sin(x + k), params)
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
    model.kernel[...] = params['kernel']
    model.bias[...] = params['bias']
    ema.update(model)
  want = ema.apply_to(model)
  got = adamfx.averaged_params(state)
  # float32, another rounding order: measured 9e-8 on O(1) values (one ulp).
  np.testing.assert_allclose(got['kernel'], want.kernel[...], rtol=0, atol=5e-7)
  np.testing.assert_allclose(got['bias'], want.bias[...], rtol=0, atol=5e-7)


# ------------------------------------------------------------------ issue 18


def _numpy_average(params0, grads, lr, decay):
  """float64 NumPy: SGD params after each step, and their debiased EMA."""
  p = {k: np.asarray(v, np.float64) for k, v in params0.items()}
  ema = {k: np.zeros_like(v) for k, v in p.items()}
  for g in grads:
    p = {k: p[k] - lr * np.asarray(g[k], np.float64) for k in p}
    ema = {k: decay * ema[k] + (1 - decay) * p[k] for k in p}
  return {k: ema[k] / (1 - decay**len(grads)) for k in p}


def _issue18_setup():
  rng = np.random.default_rng(18)
  params = {'w': jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
            'b': jnp.asarray(rng.normal(size=(3,)), jnp.float32),
            'h': jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16)}
  grads = [{k: jnp.asarray(rng.normal(size=v.shape), v.dtype) for k, v in params.items()}
           for _ in range(3)]
  return params, grads


def test_averaged_params_of_a_flax_nnx_optimizer_state():
  """Defect 8: NNX boxes the state's fields (OptArray, OptVariable); the
  average reads through them and equals NumPy's."""
  from flax import nnx

  params, grads = _issue18_setup()
  params = {k: v.astype(jnp.float32) for k, v in params.items()}

  class Model(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(params['w'])
      self.b = nnx.Param(params['b'])

  model = Model()
  opt = nnx.Optimizer(model, adamfx.ema_params(optax.sgd(0.1), 0.5), wrt=nnx.Param)
  for g in grads:
    loss = lambda m, g=g: jnp.sum(m.w[...] * g['w']) + jnp.sum(m.b[...] * g['b'])
    opt.update(model, nnx.grad(loss)(model))
  got = adamfx.averaged_params(opt.opt_state)
  want = _numpy_average({k: params[k] for k in ('w', 'b')}, grads, 0.1, 0.5)
  for k in ('w', 'b'):
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-6)


def test_nested_ema_params_are_refused_and_each_readable():
  """Defect 11: ema_params(ema_params(tx)) holds two averages: refused,
  naming the way to read each."""
  params, grads = _issue18_setup()
  tx = adamfx.ema_params(adamfx.ema_params(optax.sgd(0.1), 0.9), 0.5)
  state = tx.init(params)
  for g in grads:
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
  with pytest.raises(ValueError, match=r'found 2 \(ema_params nested in ema_params\)'):
    adamfx.averaged_params(state)
  with pytest.raises(ValueError, match='found 2'):
    adamfx.averaged_params((optax.EmptyState(), state))
  inner = adamfx.averaged_params(state.inner)
  assert jax.tree.structure(inner) == jax.tree.structure(params)


@pytest.mark.parametrize('inner', ['adam', 'sgd'])
def test_averaged_params_under_pack_state_is_shaped_like_the_params(inner):
  """Defect 11: pack_state(ema_params(...)) averages the packed buffers;
  averaged_params unpacks them into the params' tree (mixed dtypes), equal
  to the same run without pack_state."""
  params, grads = _issue18_setup()
  make = lambda: adamfx.ema_params(adamfx.adam(0.1) if inner == 'adam' else optax.sgd(0.1), 0.5)
  runs = []
  for tx in (adamfx.pack_state(make()), make()):
    p, s = params, tx.init(params)
    for g in grads:
      with jax.numpy_dtype_promotion('standard'):  # optax.sgd on a bfloat16 leaf
        u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
    runs.append(adamfx.averaged_params(s))
  packed, plain = runs
  assert jax.tree.structure(packed) == jax.tree.structure(params)
  for k in params:
    assert packed[k].shape == params[k].shape
    np.testing.assert_allclose(np.asarray(packed[k], np.float64),
                               np.asarray(plain[k], np.float64), rtol=1e-6)
