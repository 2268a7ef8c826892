"""adamfx against torch.optim.Adam / AdamW trajectories (skipped without torch).

Both in float64 (adamfx under ``jax.enable_x64``), on the same noisy,
drifting quadratic as the other reference tests, whose gradients feed back on
each implementation's own params. torch writes the step as
``p -= lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)``, the same
numbers as Algorithm 1 in another order of operations; torch's AdamW decays
by ``lr * wd * p`` (before the Adam step), which is optax's and adamfx's
``-lr * (adam + wd * p)``.
"""

from __future__ import annotations

import harness
import jax
import numpy as np
import optax
import pytest

import adamfx

torch = pytest.importorskip('torch')

STEPS = 200


def run_torch(make_opt, params, a, targets, noise, steps=STEPS):
  ps = [torch.tensor(np.asarray(p, np.float64), requires_grad=True) for p in jax.tree.leaves(params)]
  opt = make_opt(ps)
  a_l = jax.tree.leaves(a)
  t_l = [np.asarray(x) for x in jax.tree.leaves(targets)]
  n_l = [np.asarray(x) for x in jax.tree.leaves(noise)]
  for k in range(steps):
    opt.zero_grad()
    for p, a_, t, n in zip(ps, a_l, t_l, n_l):
      p.grad = torch.from_numpy(np.asarray(a_ * (p.detach().numpy() - t[k]) + n[k], np.float64))
    opt.step()
  return [p.detach().numpy() for p in ps]


def run_adamfx(tx, params, a, targets, noise):
  with jax.enable_x64(True):
    params = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    p, _, _ = harness.run_jax(tx, params, a, targets, noise)
  return [np.asarray(x) for x in jax.tree.leaves(p)]


def _problem(seed):
  rng = np.random.default_rng(seed)
  params = harness.random_tree(rng, np.float64)
  a, t, n = harness.streams(rng, params, STEPS)
  return params, a, t, n


CASES = {
    'adam': (
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        lambda: adamfx.adam(1e-2),
    ),
    'adam_betas_eps': (
        lambda ps: torch.optim.Adam(ps, lr=3e-3, betas=(0.8, 0.99), eps=1e-6),
        lambda: adamfx.adam(3e-3, 0.8, 0.99, 1e-6),
    ),
    'adamw': (
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda: adamfx.adamw(1e-2, weight_decay=0.1),
    ),
    'adamw_betas': (
        lambda ps: torch.optim.AdamW(ps, lr=5e-3, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.03),
        lambda: adamfx.adamw(5e-3, 0.85, 0.98, 1e-7, weight_decay=0.03),
    ),
    # torch's Adam(weight_decay=) is L2 regularisation (added to the gradient,
    # then rescaled): optax.add_decayed_weights before adamfx.adam.
    'adam_l2': (
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),
        lambda: optax.chain(optax.add_decayed_weights(0.1), adamfx.adam(1e-2)),
    ),
}


@pytest.mark.parametrize('name', list(CASES))
def test_matches_torch_trajectory(name):
  make_torch, make_fx = CASES[name]
  params, a, t, n = _problem(sum(map(ord, name)))
  want = run_torch(make_torch, params, a, t, n)
  got = run_adamfx(make_fx(), params, a, t, n)
  # float64 both sides; only the order of operations differs (torch divides
  # sqrt(v) by sqrt(1 - b2**t) and folds 1 / (1 - b1**t) into the step
  # size). Measured: <= 2e-14 relative. rtol 1e-10 leaves four orders of margin;
  # a real difference (eps inside the root, coupled vs decoupled decay) is
  # 1e-4 or more.
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_torch_amsgrad_differs_as_documented():
  """torch's amsgrad takes the max of the raw second moment and corrects it
  afterwards; adamfx (like optax) the max of the bias-corrected one. They
  agree while nu grows, and part as soon as it shrinks."""
  params = {'w': np.zeros(4)}
  a = {'w': 0.0}
  g = np.concatenate([np.full((20, 4), 10.0), np.full((STEPS - 20, 4), 0.1)])
  t, n = {'w': np.zeros((STEPS, 4))}, {'w': g}
  want = run_torch(lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True), params, a, t, n)
  got = run_adamfx(adamfx.adam(1e-2, amsgrad=True), params, a, t, n)
  assert np.max(np.abs(got[0] - want[0])) > 1e-3
  plain = run_torch(lambda ps: torch.optim.Adam(ps, lr=1e-2), params, a, t, n)
  plain_fx = run_adamfx(adamfx.adam(1e-2), params, a, t, n)
  np.testing.assert_allclose(plain_fx[0], plain[0], rtol=1e-10)
