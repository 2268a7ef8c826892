"""from_torch_state / to_torch_state: a run carried between torch and adamfx.

A torch run of N + M steps must equal N torch steps, ``from_torch_state``,
then M adamfx steps (and the other way round through ``to_torch_state`` and
``optimizer.load_state_dict``), in float64, on the drifting noisy quadratic of
the other reference tests. Skipped without torch, except the NumPy import.
"""

from __future__ import annotations

import copy

import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamfx

N, M = 30, 40


def _problem(seed):
  rng = np.random.default_rng(seed)
  params = harness.random_tree(rng, np.float64, n_leaves=4)
  a, t, n = harness.streams(rng, params, N + M)
  return params, jax.tree.leaves(a), *[[np.asarray(x) for x in jax.tree.leaves(s)] for s in (t, n)]


def _grads(a_l, t_l, n_l, k, ps):
  return [a_ * (p - t[k]) + n[k] for p, a_, t, n in zip(ps, a_l, t_l, n_l)]


def torch_steps(opt, ps, a_l, t_l, n_l, start, stop):
  torch = pytest.importorskip('torch')
  for k in range(start, stop):
    opt.zero_grad()
    for p, g in zip(ps, _grads(a_l, t_l, n_l, k, [p.detach().numpy() for p in ps])):
      p.grad = torch.from_numpy(np.asarray(g, np.float64))
    opt.step()


def adamfx_steps(tx, params, state, a_l, t_l, n_l, start, stop):
  """Eager steps (few, so no compile): returns (params, state)."""
  treedef = jax.tree.structure(params)
  for k in range(start, stop):
    ps = jax.tree.leaves(params)
    g = jax.tree.unflatten(treedef, _grads(a_l, t_l, n_l, k, [np.asarray(p) for p in ps]))
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state


CASES = {
    'adam': (lambda torch: torch.optim.Adam, lambda: adamfx.torch_adam, dict(lr=1e-2)),
    'adam_l2_amsgrad': (lambda torch: torch.optim.Adam, lambda: adamfx.torch_adam,
                        dict(lr=1e-2, weight_decay=0.1, amsgrad=True, betas=(0.8, 0.99))),
    'adamw_amsgrad_maximize': (lambda torch: torch.optim.AdamW, lambda: adamfx.torch_adamw,
                               dict(lr=5e-3, weight_decay=0.05, amsgrad=True, maximize=True)),
}


@pytest.mark.parametrize('name', list(CASES))
def test_continue_torch_run_in_adamfx(name, x64):
  torch = pytest.importorskip('torch')
  make_torch, make_fx, kw = CASES[name]
  params, a_l, t_l, n_l = _problem(len(name))
  leaves = jax.tree.leaves(params)
  full = [torch.tensor(p, requires_grad=True) for p in leaves]
  torch_steps(make_torch(torch)(full, **kw), full, a_l, t_l, n_l, 0, N + M)

  half = [torch.tensor(p, requires_grad=True) for p in leaves]
  opt = make_torch(torch)(half, **kw)
  torch_steps(opt, half, a_l, t_l, n_l, 0, N)
  params_n = jax.tree.unflatten(jax.tree.structure(params), [jnp.asarray(p.detach().numpy()) for p in half])
  state = adamfx.from_torch_state(opt.state_dict(), params_n)
  assert int(state.count) == N
  assert (state.nu_max is not None) == kw.get('amsgrad', False)
  got, _ = adamfx_steps(make_fx()(**kw), params_n, state, a_l, t_l, n_l, N, N + M)
  # float64, the same operations in the same order (see test_conventions):
  # measured ~1e-15 relative; a moment or count carried wrongly is O(1e-3).
  for g, w in zip(jax.tree.leaves(got), full):
    np.testing.assert_allclose(np.asarray(g), w.detach().numpy(), rtol=1e-9, atol=1e-12)


def test_export_round_trip(x64):
  torch = pytest.importorskip('torch')
  kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
  params, a_l, t_l, n_l = _problem(3)
  tx = adamfx.torch_adamw(**kw)
  p_n, state = adamfx_steps(tx, params, tx.init(params), a_l, t_l, n_l, 0, N)
  p_full, _ = adamfx_steps(tx, p_n, state, a_l, t_l, n_l, N, N + M)

  ps = [torch.tensor(np.asarray(p), requires_grad=True) for p in jax.tree.leaves(p_n)]
  opt = torch.optim.AdamW(ps, lr=0.5)  # hyperparameters come from the dict
  sd = adamfx.to_torch_state(state, p_n, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)
  opt.load_state_dict(copy.deepcopy(sd))
  assert opt.param_groups[0]['lr'] == 1e-2
  torch_steps(opt, ps, a_l, t_l, n_l, N, N + M)
  for g, w in zip(jax.tree.leaves(p_full), ps):
    np.testing.assert_allclose(np.asarray(g), w.detach().numpy(), rtol=1e-9, atol=1e-12)

  # And back: the state read from the dict is the state written.
  back = adamfx.from_torch_state(sd, p_n)
  chex_equal = lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  jax.tree.map(chex_equal, back, state)

  # With the optimizer's own param_groups (two groups here).
  ps2 = [torch.tensor(np.asarray(p), requires_grad=True) for p in jax.tree.leaves(p_n)]
  opt2 = torch.optim.AdamW([{'params': ps2[:1]}, {'params': ps2[1:], 'lr': 1e-2}], **kw)
  opt2.load_state_dict(adamfx.to_torch_state(state, p_n, param_groups=opt2.state_dict()['param_groups']))
  assert torch.equal(opt2.state_dict()['state'][3]['exp_avg'], torch.tensor(np.asarray(jax.tree.leaves(state.mu)[3])))


def test_numpy_state_dict_and_into():
  """No torch needed to import: NumPy arrays; ``into`` places the state in a
  chain (and ema_params) with its dtypes."""
  params = {'b': jnp.zeros(3), 'w': jnp.ones((2, 3))}
  sd = {
      'state': {
          0: {'step': np.array(5.0), 'exp_avg': np.full(3, 0.1, np.float32),
              'exp_avg_sq': np.full(3, 0.2, np.float32)},
          1: {'step': np.array(5.0), 'exp_avg': np.full((2, 3), 0.3, np.float32),
              'exp_avg_sq': np.full((2, 3), 0.4, np.float32)},
      },
      'param_groups': [{'params': [0, 1], 'amsgrad': False}],
  }
  state = adamfx.from_torch_state(sd, params)
  assert isinstance(state, adamfx.FrameworkAdamState)
  assert int(state.count) == 5 and state.nu_max is None
  np.testing.assert_array_equal(state.mu['w'], np.full((2, 3), 0.3, np.float32))
  tx = adamfx.ema_params(optax.chain(optax.clip(1.0), adamfx.torch_adam()))
  into = adamfx.from_torch_state(sd, params, into=tx.init(params))
  assert jax.tree.structure(into) == jax.tree.structure(tx.init(params))
  np.testing.assert_array_equal(into.inner[1].nu['b'], np.full(3, 0.2, np.float32))
  tx.update(params, into, params)  # it runs


def _sd(overrides=None):
  sd = {
      'state': {
          0: {'step': np.array(2.0), 'exp_avg': np.zeros(3, np.float32),
              'exp_avg_sq': np.zeros(3, np.float32)},
          1: {'step': np.array(2.0), 'exp_avg': np.zeros((2, 2), np.float32),
              'exp_avg_sq': np.zeros((2, 2), np.float32)},
      },
      'param_groups': [{'params': [0, 1]}],
  }
  for (i, key), value in (overrides or {}).items():
    sd['state'][i][key] = value
  return sd


@pytest.mark.parametrize('sd,params,match', [
    (_sd(), {'a': jnp.zeros(3)},
     r'has 2 params \(in its param_groups\), but `params` has 1 leaves'),
    (_sd(), {'a': jnp.zeros(3), 'b': jnp.zeros((2, 3))},
     r"torch param 1 exp_avg has shape \(2, 2\), but JAX leaf `\['b'\]` has shape \(2, 3\)"),
    (_sd(), {'a': jnp.zeros(3, jnp.bfloat16), 'b': jnp.zeros((2, 2))},
     r"torch param 0 exp_avg has dtype float32, but JAX leaf `\['a'\]` has dtype bfloat16"),
    (_sd({(1, 'step'): np.array(3.0)}), {'a': jnp.zeros(3), 'b': jnp.zeros((2, 2))},
     r'different numbers of steps \(param 0: 2, param 1: 3\)'),
    (_sd({(0, 'step'): np.array(2.5)}), {'a': jnp.zeros(3), 'b': jnp.zeros((2, 2))},
     r"torch param 0 \(JAX leaf `\['a'\]`\) has step 2.5"),
    ({'param_groups': []}, {'a': jnp.zeros(3)}, 'must be a torch optimizer.state_dict'),
])
def test_import_errors(sd, params, match):
  with pytest.raises((ValueError, TypeError), match=match):
    adamfx.from_torch_state(sd, params)


def test_bfloat16_and_export_errors():
  torch = pytest.importorskip('torch')
  w = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
  opt = torch.optim.Adam([w], lr=1e-2)
  w.grad = torch.full((3,), 0.5, dtype=torch.bfloat16)
  opt.step()
  params = [jnp.ones(3, jnp.bfloat16)]
  state = adamfx.from_torch_state(opt.state_dict(), params)
  assert state.mu[0].dtype == jnp.float32  # moments of 16-bit params in float32
  np.testing.assert_array_equal(
      state.mu[0], opt.state[w]['exp_avg'].float().numpy())
  sd = adamfx.to_torch_state(state, params)
  assert sd['state'][0]['exp_avg'].dtype == torch.bfloat16
  with pytest.raises(ValueError, match=r'`param_groups` count 2 params but `params` has 1'):
    adamfx.to_torch_state(state, params, param_groups=[{'params': [0, 1]}])
  with pytest.raises(ValueError, match='exactly one FrameworkAdamState'):
    adamfx.to_torch_state(optax.adam(1e-3).init(params), params)


# ------------------------------------------------------------------ issue 18


@pytest.mark.parametrize('amsgrad', [False, True])
def test_into_pack_state(amsgrad):
  """Defect 12: ``into=pack_state(torch_adam(...)).init(params)`` (once an
  IndexError) fills the packed buffers; two more steps equal the tree-shaped
  import's steps (mixed dtypes: float32 leaves and a bfloat16 one)."""
  import ml_dtypes

  rng = np.random.default_rng(12)
  params = {'b': jnp.zeros(3), 'h': jnp.ones(4, jnp.bfloat16), 'w': jnp.ones((2, 3))}
  entry = lambda shape, dtype: {
      'step': np.array(4.0), 'exp_avg': rng.normal(size=shape).astype(dtype),
      'exp_avg_sq': rng.random(size=shape).astype(dtype),
      **({'max_exp_avg_sq': (1 + rng.random(size=shape)).astype(dtype)} if amsgrad else {})}
  sd = {'state': {0: entry((3,), np.float32), 1: entry((4,), ml_dtypes.bfloat16),
                  2: entry((2, 3), np.float32)},
        'param_groups': [{'params': [0, 1, 2], 'amsgrad': amsgrad}]}
  packed_tx = adamfx.pack_state(adamfx.torch_adam(1e-2, amsgrad=amsgrad))
  tree_tx = adamfx.torch_adam(1e-2, amsgrad=amsgrad)
  packed = adamfx.from_torch_state(sd, params, into=packed_tx.init(params))
  assert jax.tree.structure(packed) == jax.tree.structure(packed_tx.init(params))
  tree = adamfx.from_torch_state(sd, params)
  pp, tp = params, params
  for _ in range(2):
    g = {key: jnp.asarray(rng.normal(size=v.shape), v.dtype) for key, v in params.items()}
    u, packed = packed_tx.update(g, packed, pp)
    pp = optax.apply_updates(pp, u)
    u, tree = tree_tx.update(g, tree, tp)
    tp = optax.apply_updates(tp, u)
  for key in params:
    np.testing.assert_array_equal(np.asarray(pp[key], np.float32), np.asarray(tp[key], np.float32))


def test_unstepped_params_as_the_docstring_says():
  """Defect 15: a state dict with no steps at all gives zeros and count 0;
  a mix of stepped and never-stepped params is refused (one count)."""
  params = {'a': jnp.zeros(3), 'b': jnp.zeros((2, 2))}
  fresh = {'state': {}, 'param_groups': [{'params': [0, 1]}]}
  state = adamfx.from_torch_state(fresh, params)
  assert int(state.count) == 0
  assert not np.asarray(state.mu['b']).any() and not np.asarray(state.nu['a']).any()
  mixed = _sd()
  del mixed['state'][1]
  with pytest.raises(ValueError, match=r'different numbers of steps \(param 0: 2, param 1: 0\)'):
    adamfx.from_torch_state(mixed, params)
  doc = adamfx.from_torch_state.__doc__
  assert 'a mix of stepped params and params torch never stepped' in ' '.join(doc.split())
