"""Row-sparse (lazy) Adam, RowSparse, the gradient helpers and sparse clipping.

References, all independent of adamfx's code: a float64 NumPy transcription
of lazy Adam (Algorithm 1 applied to the touched rows only, with the global
step's bias correction), ``torch.optim.SparseAdam`` (skipped without
torch), ``adamfx.adam`` on the dense gradient where every row is touched (the
claim is that the sparse path gives its numbers), ``jax.grad`` of the
ordinary (table-indexing) model for the gradient helpers, and
``optax.tree.norm`` for the sparse global norm.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import harness
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamfx
from adamfx import RowSparse

V, D = 50, 3  # a small table: 50 rows of 3


def _ids_stream(steps, k, seed=0, num_rows=V):
  """Ids a step, with duplicates (k ids drawn from a quarter of the rows)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, num_rows // 4 + 1, size=(steps, k)) * 3 % num_rows
  vals = rng.normal(size=(steps, k, D))
  return ids.astype(np.int32), vals


def numpy_lazy_adam(table, ids, vals, lr, b1=0.9, b2=0.999, eps=1e-8, catch_up=False,
                    nesterov=False, amsgrad=False):
  """float64 transcription: coalesce, then Algorithm 1 on the touched rows.

  ``lr``: a number, or a schedule called with the 0-based step (as optax's).
  ``nesterov``: NAdam in optax's form, ``b1 m / (1 - b1**(t+1)) + (1 - b1) g
  / (1 - b1**t)``; ``amsgrad``: the touched rows' running maximum of the
  bias-corrected ``v`` (optax's form) replaces ``v_hat`` (with ``catch_up``,
  ``v`` decays over a row's missed steps, its maximum does not).
  Returns ``(params, m, v)``, and the maximum as well with ``amsgrad``.
  """
  p = np.array(table, np.float64)
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  v_max = np.zeros_like(p)
  last = np.zeros(p.shape[0], np.int64)
  for t, (i, g) in enumerate(zip(ids, vals), start=1):
    dense = np.zeros_like(p)
    np.add.at(dense, i, g)
    rows = np.unique(i)
    if catch_up:
      gap = t - 1 - last[rows]
      m[rows] *= (b1 ** gap)[:, None]
      v[rows] *= (b2 ** gap)[:, None]
      last[rows] = t
    m[rows] = b1 * m[rows] + (1 - b1) * dense[rows]
    v[rows] = b2 * v[rows] + (1 - b2) * dense[rows] ** 2
    if nesterov:
      m_hat = b1 * m[rows] / (1 - b1**(t + 1)) + (1 - b1) * dense[rows] / (1 - b1**t)
    else:
      m_hat = m[rows] / (1 - b1**t)
    v_hat = v[rows] / (1 - b2**t)
    if amsgrad:
      v_hat = v_max[rows] = np.maximum(v_max[rows], v_hat)
    rate = float(lr(t - 1)) if callable(lr) else lr
    p[rows] -= rate * m_hat / (np.sqrt(v_hat) + eps)
  return (p, m, v, v_max) if amsgrad else (p, m, v)


def run_lazy(tx, table, ids, vals, jit=True):
  state = tx.init(table)

  def step(table, state, i, g):
    u, state = tx.update(RowSparse(i, g, table.shape[0]), state, table)
    return optax.apply_updates(table, u), state

  if jit:
    step = jax.jit(step, donate_argnums=(0, 1))
  table = jnp.array(table)  # a copy: the steps donate it
  for i, g in zip(ids, vals):
    table, state = step(table, state, jnp.asarray(i), jnp.asarray(g, table.dtype))
  return table, state


# ------------------------------------------------------------ references


def test_matches_numpy_float64_with_duplicates(x64):
  ids, vals = _ids_stream(30, 12)
  table0 = np.random.default_rng(1).normal(size=(V, D))
  for catch_up in (False, True):
    want, m, v = numpy_lazy_adam(table0, ids, vals, 0.05, catch_up=catch_up)
    got, state = run_lazy(adamfx.lazy_adam(0.05, catch_up=catch_up), jnp.asarray(table0), ids, vals)
    # float64 throughout; the orders of operations differ: 1e-12.
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(state[0].mu, m, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(state[0].nu, v, rtol=1e-12, atol=1e-18)


@pytest.mark.parametrize('flag', ['nesterov', 'amsgrad'])
def test_nadam_and_amsgrad_match_numpy_float64_on_touched_rows(x64, flag):
  """lazy_adam(nesterov=True) / (amsgrad=True): NAdam's and AMSGrad's step on
  the touched rows only (duplicates summed), with and without catch_up."""
  ids, vals = _ids_stream(30, 12, seed=12)
  table0 = np.random.default_rng(13).normal(size=(V, D))
  for catch_up in (False, True):
    want = numpy_lazy_adam(table0, ids, vals, 0.05, catch_up=catch_up, **{flag: True})
    got, state = run_lazy(adamfx.lazy_adam(0.05, catch_up=catch_up, **{flag: True}),
                          jnp.asarray(table0), ids, vals)
    # float64 throughout; the orders of operations differ: 1e-12.
    np.testing.assert_allclose(got, want[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(state[0].mu, want[1], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(state[0].nu, want[2], rtol=1e-12, atol=1e-18)
    if flag == 'amsgrad':
      np.testing.assert_allclose(state[0].nu_max, want[3], rtol=1e-12, atol=1e-18)
    else:
      assert state[0].nu_max is None
  plain, _, _ = numpy_lazy_adam(table0, ids, vals, 0.05)
  assert np.max(np.abs(plain - want[0])) > 1e-3  # the flag mattered


@pytest.mark.parametrize('name', ['nadam', 'amsgrad', 'nadamw'])
@pytest.mark.slow  # the float64 NumPy reference on touched rows is the default run's
def test_every_row_touched_is_optax_nadam_and_amsgrad(x64, name):
  """Each step touches every row once (a permutation, the rows given in a
  shuffled order): lazy Adam's NAdam/AMSGrad (and NAdamW) are optax's
  ``nadam``/``amsgrad``/``nadamw`` on the dense gradient, in float64."""
  lazy, ref = {
      'nadam': (adamfx.lazy_adam(0.03, nesterov=True), optax.nadam(0.03)),
      'amsgrad': (adamfx.lazy_adam(0.03, amsgrad=True), optax.amsgrad(0.03)),
      'nadamw': (adamfx.lazy_adamw(0.03, weight_decay=0.1, nesterov=True),
                 optax.nadamw(0.03, weight_decay=0.1)),
  }[name]
  rng = np.random.default_rng(14)
  table0 = jnp.asarray(rng.normal(size=(V, D)))
  lp, rp = {'t': table0, 'b': jnp.ones(4)}, {'t': table0, 'b': jnp.ones(4)}
  ls, rs = lazy.init(lp), ref.init(rp)
  for _ in range(8):
    perm = rng.permutation(V).astype(np.int32)
    rows = jnp.asarray(rng.normal(size=(V, D)))
    gb = jnp.asarray(rng.normal(size=4))
    u, ls = jax.jit(lazy.update)({'t': RowSparse(jnp.asarray(perm), rows, V), 'b': gb}, ls, lp)
    lp = optax.apply_updates(lp, u)
    with jax.numpy_dtype_promotion('standard'):  # optax's own code needs it
      u, rs = ref.update({'t': jnp.zeros((V, D), rows.dtype).at[perm].set(rows), 'b': gb}, rs, rp)
    rp = optax.apply_updates(rp, u)
  for k in ('t', 'b'):
    np.testing.assert_allclose(lp[k], rp[k], rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(ls[0].mu['t'], rs[0].mu['t'], rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(ls[0].nu['t'], rs[0].nu['t'], rtol=1e-12, atol=1e-18)
  if name == 'amsgrad':
    np.testing.assert_allclose(ls[0].nu_max['t'], rs[0].nu_max['t'], rtol=1e-12, atol=1e-18)


def test_schedule_matches_numpy_float64(x64):
  sched = optax.linear_schedule(0.1, 0.01, 20)
  ids, vals = _ids_stream(30, 12, seed=3)
  table0 = np.random.default_rng(2).normal(size=(V, D))
  # The schedule as the jitted step calls it: with the int32 count (linear_schedule then
  # returns float32 learning rates, also under x64), compiled (XLA may fuse its multiply-add).
  jitted = jax.jit(sched)
  want, _, _ = numpy_lazy_adam(table0, ids, vals, lambda k: jitted(jnp.int32(k)))
  got, _ = run_lazy(adamfx.lazy_adam(sched), jnp.asarray(table0), ids, vals)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
  constant, _, _ = numpy_lazy_adam(table0, ids, vals, 0.1)
  assert np.max(np.abs(constant - want)) > 1e-2  # the schedule mattered


def test_matches_torch_sparse_adam_with_duplicates(x64):
  torch = pytest.importorskip('torch')
  ids, vals = _ids_stream(40, 16, seed=2)
  table0 = np.random.default_rng(3).normal(size=(V, D))
  p = torch.tensor(table0, requires_grad=True)
  # torch adds eps to sqrt(v) before the sqrt(1 - b2**t) correction (its eps
  # is ours times sqrt(1 - b2**t)); with eps negligible (torch refuses 0) the
  # two are the same numbers in float64.
  opt = torch.optim.SparseAdam([p], lr=0.02, betas=(0.9, 0.999), eps=1e-300)
  for i, g in zip(ids, vals):
    opt.zero_grad()
    p.grad = torch.sparse_coo_tensor(
        torch.from_numpy(i.astype(np.int64))[None], torch.from_numpy(g), (V, D),
        check_invariants=True)
    opt.step()
  got, _ = run_lazy(adamfx.lazy_adam(0.02, eps=0.0), jnp.asarray(table0), ids, vals)
  np.testing.assert_allclose(got, p.detach().numpy(), rtol=1e-11, atol=1e-13)


def test_matches_torch_sparse_adam_float32_default_eps():
  torch = pytest.importorskip('torch')
  ids, vals = _ids_stream(25, 16, seed=4)
  table0 = np.random.default_rng(5).normal(size=(V, D)).astype(np.float32)
  p = torch.tensor(table0, requires_grad=True)
  opt = torch.optim.SparseAdam([p], lr=0.01)
  for i, g in zip(ids, vals):
    opt.zero_grad()
    p.grad = torch.sparse_coo_tensor(
        torch.from_numpy(i.astype(np.int64))[None], torch.from_numpy(g.astype(np.float32)),
        (V, D), check_invariants=True)
    opt.step()
  got, _ = run_lazy(adamfx.lazy_adam(0.01), jnp.asarray(table0), ids, vals.astype(np.float32))
  # float32, 25 steps of |update| ~ lr, each within a few ulps of the other
  # (and the eps placement, ~1e-8 / sqrt(v)): 2e-6 absolute on O(1) params.
  np.testing.assert_allclose(got, p.detach().numpy(), rtol=0, atol=2e-6)


def test_every_row_touched_is_dense_adam():
  """Each step touches every row once (a permutation): dense Adam's numbers.

  The same operations per element, but XLA on CPU contracts ``a*b + c*d``
  into fused multiply-adds as its fusion decides, and the gathered rows fuse
  otherwise than the whole table: a few ulps (float32: 1e-6 relative) per
  step, not bit for bit. The dense leaf in the same tree is bit for bit.
  """
  rng = np.random.default_rng(6)
  table0 = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
  dense_p = {'t': table0, 'b': jnp.ones(4)}
  sparse_p = {'t': table0, 'b': jnp.ones(4)}
  dense_tx, lazy_tx = adamfx.adam(0.03), adamfx.lazy_adam(0.03)
  ds, ls = dense_tx.init(dense_p), lazy_tx.init(sparse_p)

  @jax.jit
  def dense_step(p, s, g):
    u, s = dense_tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  @jax.jit
  def lazy_step(p, s, g):
    u, s = lazy_tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(8):
    perm = rng.permutation(V).astype(np.int32)
    rows = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
    gb = jnp.asarray(rng.normal(size=4), jnp.float32)
    dense_g = {'t': jnp.zeros((V, D)).at[perm].set(rows), 'b': gb}
    dense_p, ds = dense_step(dense_p, ds, dense_g)
    sparse_p, ls = lazy_step(sparse_p, ls, {'t': RowSparse(jnp.asarray(perm), rows, V), 'b': gb})
  np.testing.assert_allclose(sparse_p['t'], dense_p['t'], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ls[0].mu['t'], ds[0].mu['t'], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(ls[0].nu['t'], ds[0].nu['t'], rtol=1e-6)
  np.testing.assert_array_equal(sparse_p['b'], dense_p['b'])
  np.testing.assert_array_equal(ls[0].mu['b'], ds[0].mu['b'])


def test_dense_leaves_get_adams_numbers_eagerly_too():
  p = {'w': jnp.arange(6.0).reshape(2, 3), 't': jnp.zeros((V, D))}
  g = {'w': jnp.full((2, 3), 0.3), 't': RowSparse(jnp.array([1, 2]), jnp.ones((2, D)), V)}
  u, _ = adamfx.lazy_adam(0.1).update(g, adamfx.lazy_adam(0.1).init(p), p)
  ud, _ = adamfx.adam(0.1).update({'w': g['w']}, adamfx.adam(0.1).init({'w': p['w']}), {'w': p['w']})
  np.testing.assert_array_equal(u['w'], ud['w'])
  assert isinstance(u['t'], RowSparse)


def test_catch_up_moments_equal_dense_adams(x64):
  """Touched rows' mu and nu are dense Adam's on the scattered gradient."""
  ids, vals = _ids_stream(30, 6, seed=7)
  table0 = jnp.asarray(np.random.default_rng(8).normal(size=(V, D)))
  _, state = run_lazy(adamfx.lazy_adam(0.01, catch_up=True), table0, ids, vals)
  dense_tx = adamfx.scale_by_adam()
  ds = dense_tx.init(table0)
  for i, g in zip(ids, vals):
    _, ds = dense_tx.update(RowSparse(jnp.asarray(i), jnp.asarray(g), V).todense(), ds)
  touched = np.unique(ids[-1])
  last = np.asarray(state[0].last_step)
  assert (last[touched] == len(ids)).all()
  # One power b**k against k products: float64 rounding only.
  np.testing.assert_allclose(state[0].mu[touched], ds.mu[touched], rtol=1e-12)
  np.testing.assert_allclose(state[0].nu[touched], ds.nu[touched], rtol=1e-12)
  # Without catch_up they differ (the rows' moments did not decay).
  _, lazy_state = run_lazy(adamfx.lazy_adam(0.01), table0, ids, vals)
  assert not np.allclose(lazy_state[0].nu[touched], ds.nu[touched], rtol=1e-6)


def test_untouched_rows_are_bit_identical():
  rng = np.random.default_rng(9)
  table0 = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
  ids, vals = _ids_stream(10, 8, seed=10)
  got, state = run_lazy(adamfx.lazy_adam(0.1, catch_up=True), table0, ids, vals.astype(np.float32))
  untouched = np.setdiff1d(np.arange(V), np.unique(ids))
  assert untouched.size > 10
  np.testing.assert_array_equal(np.asarray(got)[untouched], np.asarray(table0)[untouched])
  assert not np.asarray(state[0].mu)[untouched].any()
  assert not np.asarray(state[0].last_step)[untouched].any()


def test_lazy_adamw_decays_touched_rows_and_dense_leaves_as_adamw():
  p = {'t': jnp.ones((V, D)), 'w': jnp.full((3,), 2.0)}
  g = {'t': RowSparse(jnp.array([4, 4]), jnp.full((2, D), 0.5), V), 'w': jnp.full((3,), 0.1)}
  tx = adamfx.lazy_adamw(0.1, weight_decay=0.5)
  u, _ = jax.jit(tx.update)(g, tx.init(p), p)
  uw, _ = jax.jit(adamfx.adamw(0.1, weight_decay=0.5).update)(
      {'w': g['w']}, adamfx.adamw(0.1, weight_decay=0.5).init({'w': p['w']}), {'w': p['w']})
  np.testing.assert_array_equal(u['w'], uw['w'])
  dense = np.asarray(u['t'].todense())
  # Row 4: first Adam step sign(g) = 1, plus wd * p = 0.5: -lr * 1.5.
  np.testing.assert_allclose(dense[4], -0.15, rtol=1e-5)
  assert not np.delete(dense, 4, axis=0).any()  # untouched rows: no decay
  with pytest.raises(TypeError, match='weight_decay'):
    adamfx.lazy_adamw(0.1, weight_decay=optax.constant_schedule(0.1))
  # A mask (tree or function of the params) keeps the table undecayed.
  for mask in ({'t': False, 'w': True}, lambda p: {'t': False, 'w': True}):
    tx = adamfx.lazy_adamw(0.1, weight_decay=0.5, mask=mask)
    u, _ = jax.jit(tx.update)(g, tx.init(p), p)
    np.testing.assert_allclose(u['t'].todense()[4], -0.1, rtol=1e-5)
    np.testing.assert_array_equal(u['w'], uw['w'])


# --------------------------------------------------------------- bad input


def test_out_of_range_ids_touch_no_row_under_jit():
  table0 = jnp.asarray(np.random.default_rng(11).normal(size=(V, D)), jnp.float32)
  tx = adamfx.lazy_adam(0.1)
  bad = jnp.array([-1, V, V + 7, -V], jnp.int32)
  u, state = jax.jit(tx.update)(RowSparse(bad, jnp.ones((4, D)), V), tx.init(table0), table0)
  new = optax.apply_updates(table0, u)
  np.testing.assert_array_equal(new, table0)  # no wrap-around to row V-1, no write past the end
  assert not np.asarray(state[0].mu).any() and not np.asarray(state[0].nu).any()
  # Mixed with good ids: only the good rows move.
  mixed = RowSparse(jnp.array([-1, 3, V]), jnp.ones((3, D)), V)
  u, _ = jax.jit(tx.update)(mixed, tx.init(table0), table0)
  moved = np.flatnonzero((np.asarray(optax.apply_updates(table0, u)) != np.asarray(table0)).any(1))
  assert moved.tolist() == [3]
  np.testing.assert_array_equal(mixed.todense()[V - 1], 0.0)


@pytest.mark.parametrize('name,value', [('b1', 1.5), ('eps', -1.0), ('learning_rate', -0.1),
                                        ('weight_decay', -1.0)])
def test_invalid_traced_hyperparameters_give_nan_rows(name, value):
  """A traced hyperparameter out of its range (inject_hyperparams under jit)
  makes the touched rows' update NaN, as the dense leaves' -- never a finite
  wrong step (before issue 19 the rows stepped on: a negative rate ascended)."""
  p = {'t': jnp.ones((8, 2)), 'w': jnp.ones(3)}
  g = {'t': RowSparse(jnp.array([1, 5]), jnp.ones((2, 2)), 8), 'w': jnp.ones(3)}
  tx = adamfx.inject_hyperparams(adamfx.lazy_adamw)(learning_rate=0.1, weight_decay=0.1)
  state = tx.init(p)
  state.hyperparams[name] = jnp.asarray(value, state.hyperparams[name].dtype)
  u, _ = jax.jit(tx.update)(g, state, p)
  assert np.isnan(np.asarray(u['t'].values)).all()
  assert np.isnan(np.asarray(u['w'])).all()
  assert not np.asarray(u['t'].todense())[[0, 2, 3, 4, 6, 7]].any()  # untouched rows: no step


def test_out_of_range_ids_eagerly_name_the_leaf_and_id():
  p = {'emb': jnp.zeros((V, D))}
  tx = adamfx.lazy_adam(0.1)
  with pytest.raises(ValueError, match=r"leaf `\['emb'\]` has id -1 outside \[0, 50\)"):
    tx.update({'emb': RowSparse(jnp.array([2, -1, 60]), jnp.ones((3, D)), V)}, tx.init(p), p)
  with pytest.raises(ValueError, match=r'has id 50 outside'):
    tx.update({'emb': RowSparse(jnp.array([50]), jnp.ones((1, D)), V)}, tx.init(p), p)


def test_values_of_the_wrong_row_shape_or_dtype_name_the_leaf():
  p = {'emb': jnp.zeros((V, D))}
  tx = adamfx.lazy_adam(0.1)
  with pytest.raises(ValueError, match=r"leaf `\['emb'\]` has dense shape \(50, 4\)"):
    tx.update({'emb': RowSparse(jnp.array([1]), jnp.ones((1, 4)), V)}, tx.init(p), p)
  with pytest.raises(ValueError, match=r"leaf `\['emb'\]` has dense shape \(60, 3\)"):
    jax.jit(tx.update)({'emb': RowSparse(jnp.array([1]), jnp.ones((1, D)), 60)}, tx.init(p), p)
  with pytest.raises(TypeError, match=r"leaf `\['emb'\]` has values of dtype bfloat16"):
    tx.update({'emb': RowSparse(jnp.array([1]), jnp.ones((1, D), jnp.bfloat16), V)},
              tx.init(p), p)
  with pytest.raises(ValueError, match=r"leaf `\['emb'\]`: RowSparse needs `indices` of shape"):
    tx.update({'emb': RowSparse(jnp.array([1, 2]), jnp.ones((3, D)), V)}, tx.init(p), p)
  with pytest.raises(ValueError, match='indices` of shape'):
    RowSparse(jnp.array([1, 2]), jnp.ones((3, D)), V).todense()


def test_optax_clip_by_global_norm_refuses_row_sparse_and_ours_clips():
  g = {'t': RowSparse(jnp.array([1, 1, 7]), jnp.full((3, D), 2.0), V), 'b': jnp.full(4, 1.0)}
  with jax.numpy_dtype_promotion('standard'):  # as users run optax
    # optax's norm counts the RowSparse's id codes, whose unit overflows it:
    # eagerly refused; under jit the norm is inf and every update 0 (the
    # unit too, as for a zero learning rate), never a finite update of a row.
    with pytest.raises(ValueError, match='ids were treated as numbers'):
      optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    u, _ = jax.jit(optax.clip_by_global_norm(1e9).update)(g, optax.EmptyState())
    moved = np.asarray(jnp.zeros((V, D)) + u['t'])
    assert not (np.isfinite(moved) & (moved != 0)).any()
    half = jax.tree.map(lambda x: x * 0.5, g)  # what optax.scale does: the values only
  np.testing.assert_array_equal(half['t'].indices, [1, 1, 7])
  np.testing.assert_array_equal(half['t'].todense(), 0.5 * g['t'].todense())
  dense = {'t': g['t'].todense(), 'b': g['b']}
  np.testing.assert_allclose(adamfx.sparse_global_norm(g), optax.tree.norm(dense), rtol=1e-6)
  clip = adamfx.sparse_clip_by_global_norm(1.0)
  clipped, _ = jax.jit(clip.update)(g, optax.EmptyState())
  with jax.numpy_dtype_promotion('standard'):
    want, _ = optax.clip_by_global_norm(1.0).update(dense, optax.EmptyState())
  np.testing.assert_allclose(clipped['t'].todense(), want['t'], rtol=1e-6)
  np.testing.assert_allclose(clipped['b'], want['b'], rtol=1e-6)


# ------------------------------------------------------------- composition


def _train(tx, params, steps=5, seed=12):
  rng = np.random.default_rng(seed)
  state = tx.init(params)

  @jax.jit
  def step(p, s, i, g, gd):
    u, s = tx.update({'t': RowSparse(i, g, V), 'w': gd}, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(steps):
    i = jnp.asarray(rng.integers(-1, V, size=8), jnp.int32)
    g = jnp.asarray(rng.normal(size=(8, D)), jnp.float32)
    gd = jnp.asarray(rng.normal(size=(2,)), jnp.float32)
    params, state = step(params, state, i, g, gd)
  return params, state


PARAMS = {'t': jnp.zeros((V, D)), 'w': jnp.ones(2)}


def test_schedule_inject_hyperparams_and_chain_agree():
  sched = optax.linear_schedule(0.1, 0.01, 5)
  p_sched, _ = _train(adamfx.lazy_adam(sched), PARAMS)
  p_plain, _ = _train(adamfx.lazy_adam(0.1), PARAMS)
  p_chain, _ = _train(optax.chain(adamfx.sparse_clip_by_global_norm(1e9), adamfx.lazy_adam(0.1)),
                      PARAMS)
  injected = adamfx.inject_hyperparams(adamfx.lazy_adam)(learning_rate=0.1)
  p_inj, s_inj = _train(injected, PARAMS)
  assert float(s_inj.hyperparams['learning_rate']) == pytest.approx(0.1)
  for k in ('t', 'w'):
    np.testing.assert_array_equal(p_chain[k], p_plain[k])
    # Injected b1, b2 are float32 arrays, whose 1 - b differs from Python's
    # 1 - b in the last bits: float32 rounding over 5 steps.
    np.testing.assert_allclose(p_inj[k], p_plain[k], rtol=2e-5, atol=1e-7)
  # Same first step (lr 0.1), later steps at the schedule's smaller rates (the rows'
  # numbers against float64: test_schedule_matches_numpy_float64).
  assert np.abs(p_sched['t']).max() < np.abs(p_plain['t']).max()
  # The schedule reaches the RowSparse rows: the dense leaf of the same run
  # moved like adamfx.adam with that schedule.
  ref, _ = _train(optax.multi_transform({'a': adamfx.adam(sched), 'l': adamfx.lazy_adam(sched)},
                                        {'t': 'l', 'w': 'a'}), PARAMS)
  np.testing.assert_array_equal(ref['w'], p_sched['w'])


def test_multi_transform_sparse_and_dense_members():
  tx = optax.multi_transform(
      {'table': adamfx.lazy_adam(0.1), 'dense': optax.sgd(0.1)},
      {'t': 'table', 'w': 'dense'},
  )
  with jax.numpy_dtype_promotion('standard'):  # optax.sgd's own arithmetic
    p, _ = _train(tx, PARAMS)
  p_lazy, _ = _train(adamfx.lazy_adam(0.1), PARAMS)
  np.testing.assert_array_equal(p['t'], p_lazy['t'])


def test_apply_if_finite_skips_a_nan_row_step():
  tx = optax.apply_if_finite(adamfx.lazy_adam(0.1), 3)
  p = {'t': jnp.zeros((V, D))}
  s = tx.init(p)
  bad = {'t': RowSparse(jnp.array([1]), jnp.full((1, D), jnp.nan), V)}
  u, s = jax.jit(tx.update)(bad, s, p)
  np.testing.assert_array_equal(optax.apply_updates(p, u)['t'], p['t'])
  assert int(s.notfinite_count) == 1
  assert not np.isnan(np.asarray(s.inner_state[0].mu['t'])).any()


def test_donated_step_updates_in_place():
  tx = adamfx.lazy_adam(0.1)
  table = jnp.zeros((V, D))
  state = tx.init(table)

  def step(p, s, i, g):
    u, s = tx.update(RowSparse(i, g, V), s, p)
    return optax.apply_updates(p, u), s

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      table, state, jnp.zeros(4, jnp.int32), jnp.ones((4, D))).compile()
  # The table and both moments alias their outputs: no table-sized copies.
  assert compiled.memory_analysis().output_size_in_bytes - (
      compiled.memory_analysis().alias_size_in_bytes) < 3 * V * D * 4


def test_checkpoint_round_trip(tmp_path):
  pytest.importorskip('orbax.checkpoint')
  _, state = _train(adamfx.lazy_adam(0.1, catch_up=True), PARAMS)
  target = adamfx.lazy_adam(0.1, catch_up=True).init(PARAMS)
  adamfx.save_npz(tmp_path / 's.npz', state)
  back = adamfx.restore_npz(tmp_path / 's.npz', target)
  adamfx.save_orbax(tmp_path / 'orb', state)
  back_o = adamfx.restore_orbax(tmp_path / 'orb', target)
  for restored in (back, back_o):
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
      np.testing.assert_array_equal(a, b)
      assert a.dtype == b.dtype


# ----------------------------------------------------------- grad helpers


def _has_table_sized(fn, *args, shape):
  jaxpr = jax.make_jaxpr(fn)(*args)

  def walk(j):
    for eqn in j.eqns:
      for v in eqn.outvars:
        if tuple(getattr(v.aval, 'shape', ())) == shape:
          return True
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        if walk(sub):
          return True
    return False

  return walk(jaxpr.jaxpr)


def test_plain_function_grad_is_row_sparse_and_never_table_sized():
  rng = np.random.default_rng(13)
  params = {'emb': jnp.asarray(rng.normal(size=(1000, 4)), jnp.float32), 'w': jnp.ones(4)}
  tokens = jnp.array([[3, 5, 3], [7, 999, 1]])

  def model(p, idx):
    return jnp.sum(jnp.tanh(p['emb'][idx].sum(1) @ p['w']))

  pos = jnp.arange(tokens.size).reshape(tokens.shape)
  vg = adamfx.value_and_row_sparse_grad(model, where=lambda p: p['emb'])
  value, grads = jax.jit(vg)(params, tokens.reshape(-1), pos)
  want_v, want = jax.value_and_grad(model)(params, tokens)
  np.testing.assert_allclose(value, want_v, rtol=1e-6)
  np.testing.assert_allclose(grads['emb'].todense(), want['emb'], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(grads['w'], want['w'], rtol=1e-6)
  assert not _has_table_sized(vg, params, tokens.reshape(-1), pos, shape=(1000, 4))
  assert _has_table_sized(jax.grad(model), params, tokens, shape=(1000, 4))  # the check bites
  g2 = adamfx.row_sparse_grad(model, where=lambda p: p['emb'])(params, tokens.reshape(-1), pos)
  np.testing.assert_array_equal(g2['emb'].values, grads['emb'].values)


@pytest.mark.slow  # the plain function's gradient is the default run's
def test_nnx_model_grad():
  nnx = pytest.importorskip('flax.nnx')

  class Bag(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(200, 8, rngs=rngs)
      self.head = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
      return self.head(self.embed(x).mean(1))[:, 0]

  model = Bag(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = jnp.array([[1, 2, 2, 199], [5, 6, 7, 1]])
  y = jnp.array([1.0, -1.0])

  def loss(params, x):
    return jnp.mean((nnx.merge(graphdef, params)(x) - y) ** 2)

  pos = jnp.arange(tokens.size).reshape(tokens.shape)
  vg = adamfx.value_and_row_sparse_grad(loss, where=lambda p: p['embed']['embedding'])
  value, grads = jax.jit(vg)(params, tokens.reshape(-1), pos)
  want_v, want = jax.value_and_grad(loss)(params, tokens)
  np.testing.assert_allclose(value, want_v, rtol=1e-6)
  val = lambda x: x.get_value() if isinstance(x, nnx.Variable) else x
  g_emb = val(grads['embed']['embedding'])
  assert isinstance(g_emb, RowSparse)
  np.testing.assert_allclose(g_emb.todense(), val(want['embed']['embedding']), rtol=1e-5,
                             atol=1e-7)
  # One lazy step on the NNX params.
  tx = adamfx.lazy_adam(1e-2)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  new_emb = np.asarray(val(new['embed']['embedding']))
  old_emb = np.asarray(val(params['embed']['embedding']))
  moved = np.flatnonzero((new_emb != old_emb).any(1))
  assert moved.tolist() == sorted(set(tokens.reshape(-1).tolist()))


@pytest.mark.slow  # the NNX model's gradient is the default run's
def test_equinox_model_grad():
  eqx = pytest.importorskip('equinox')

  class Bag(eqx.Module):
    embed: eqx.nn.Embedding
    head: eqx.nn.Linear

    def __init__(self, key):
      k1, k2 = jax.random.split(key)
      self.embed = eqx.nn.Embedding(300, 6, key=k1)
      self.head = eqx.nn.Linear(6, 'scalar', key=k2)

    def __call__(self, x):  # x: [L] ids (or positions)
      return self.head(jax.vmap(self.embed)(x).mean(0))

  model = Bag(jax.random.key(0))
  tokens = jnp.array([[3, 4, 4], [250, 0, 3]])
  y = jnp.array([0.5, 2.0])

  def loss(m, x):
    return jnp.mean((jax.vmap(m)(x) - y) ** 2)

  pos = jnp.arange(tokens.size).reshape(tokens.shape)
  vg = adamfx.value_and_row_sparse_grad(loss, where=lambda m: m.embed.weight)
  value, grads = jax.jit(vg)(model, tokens.reshape(-1), pos)
  want_v, want = eqx.filter_value_and_grad(loss)(model, tokens)
  np.testing.assert_allclose(value, want_v, rtol=1e-6)
  np.testing.assert_allclose(grads.embed.weight.todense(), want.embed.weight, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grads.head.weight, want.head.weight, rtol=1e-5)
  params = eqx.filter(model, eqx.is_inexact_array)
  tx = adamfx.lazy_adam(1e-2)
  updates, _ = tx.update(grads, tx.init(params), params)
  # eqx.apply_updates maps over the updates first and so cannot take a
  # RowSparse; optax.apply_updates maps over the params.
  new = eqx.combine(optax.apply_updates(params, updates), model)
  moved = np.flatnonzero((np.asarray(new.embed.weight) != np.asarray(model.embed.weight)).any(1))
  assert moved.tolist() == [0, 3, 4, 250]


# ----------------------------------------------------------------- sharded

_SHARDED = textwrap.dedent('''
  import json, jax, jax.numpy as jnp, numpy as np, optax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  import adamfx
  assert len(jax.devices()) == 8
  mesh = Mesh(np.array(jax.devices()), ('rows',))
  V, D = 64, 5
  table0 = np.random.default_rng(0).normal(size=(V, D)).astype(np.float32)
  rng = np.random.default_rng(1)
  ids = rng.integers(-2, V + 2, size=(6, 10)).astype(np.int32)
  vals = rng.normal(size=(6, 10, D)).astype(np.float32)
  tx = adamfx.lazy_adam(0.05, catch_up=True)

  def step(p, s, i, g):
    u, s = tx.update(adamfx.RowSparse(i, g, V), s, p)
    return optax.apply_updates(p, u), s

  def run(table, jit_step):
    state = tx.init(table)
    for i, g in zip(ids, vals):
      table, state = jit_step(table, state, jnp.asarray(i), jnp.asarray(g))
    return table, state

  one, one_s = run(jax.device_put(table0, jax.devices()[0]), jax.jit(step))
  sh = NamedSharding(mesh, P('rows', None))
  table = jax.device_put(table0, sh)
  many, many_s = run(table, jax.jit(step, donate_argnums=(0, 1)))
  out = {
      'equal': bool(np.array_equal(np.asarray(one), np.asarray(many))),
      'mu_equal': bool(np.array_equal(np.asarray(one_s[0].mu), np.asarray(many_s[0].mu))),
      'table': str(many.sharding.spec),
      'mu': str(many_s[0].mu.sharding.spec), 'nu': str(many_s[0].nu.sharding.spec),
      'last': str(many_s[0].last_step.sharding.spec),
      'init_mu': str(tx.init(table)[0].mu.sharding.spec),
      'n_shards': len(many_s[0].mu.addressable_shards),
  }
  # Explicit axes (issue 18): value_and_row_sparse_grad and lazy_adamw on a
  # row-sharded table, equal to one device.
  from jax.sharding import AxisType
  emesh = jax.make_mesh((8,), ('rows',), axis_types=(AxisType.Explicit,))
  ex = jax.device_put(table0, NamedSharding(emesh, P('rows', None)))
  txw = adamfx.lazy_adamw(0.05, weight_decay=0.1)
  vg = adamfx.value_and_row_sparse_grad(lambda p: jnp.sum(jnp.tanh(p['t']) ** 2),
                                        where=lambda p: p['t'])

  def estep(p, s, i):
    v, g = vg({'t': p}, i)
    u, s = txw.update(g['t'], s, p)
    return optax.apply_updates(p, u), s, v

  results = []
  for t in (jax.device_put(table0, jax.devices()[0]), ex):
    s = jax.jit(txw.init)(t)
    for i in ids[:2]:
      t, s, v = jax.jit(estep)(t, s, jnp.asarray(i))
    results.append((t, v))
  out['explicit_equal'] = bool(np.allclose(np.asarray(results[0][0]), np.asarray(results[1][0]),
                                           rtol=1e-6, atol=1e-7))
  out['explicit_spec'] = str(results[1][0].sharding.spec)
  print('RESULT ' + json.dumps(out))
''')


@pytest.mark.xdist_group('devices8')  # one worker runs the 8-device subprocesses
@pytest.mark.slow  # 8 devices; lazy_adam_8bit on an Explicit mesh is in test_sharding's default run
def test_row_sharded_table_on_8_devices():
  proc = subprocess.run([sys.executable, '-c', _SHARDED], env=harness.devices_env(8), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')][-1][7:])
  assert out['equal'] and out['mu_equal']
  spec = str(jax.sharding.PartitionSpec('rows', None))
  assert out['table'] == spec
  assert out['mu'] == spec and out['nu'] == spec and out['init_mu'] == spec
  assert out['last'] == str(jax.sharding.PartitionSpec('rows'))
  assert out['n_shards'] == 8
  assert out['explicit_equal'] and out['explicit_spec'] == spec  # Explicit axes (issue 18)


# ------------------------------------------------------- RowSparse itself


def test_optax_inject_hyperparams_too():
  p, _ = _train(optax.inject_hyperparams(adamfx.lazy_adam)(learning_rate=0.1), PARAMS)
  p_inj, _ = _train(adamfx.inject_hyperparams(adamfx.lazy_adam)(learning_rate=0.1), PARAMS)
  np.testing.assert_array_equal(p['t'], p_inj['t'])


def test_todense_coalesce_and_norm_against_numpy():
  hypothesis = pytest.importorskip('hypothesis')
  st = pytest.importorskip('hypothesis.strategies')

  dense = jax.jit(lambda g: g.todense())
  parts = jax.jit(adamfx._sparse.lazy.coalesce)
  norm = jax.jit(adamfx.sparse_global_norm)

  @hypothesis.given(st.lists(st.integers(-3, 12), min_size=20, max_size=20), st.integers(0, 2**31))
  def check(ids, seed):  # 20 ids (one compile), in and out of range, with duplicates
    n = 10
    vals = np.random.default_rng(seed).normal(size=(len(ids), 2)).astype(np.float32)
    want = np.zeros((n, 2), np.float64)
    for i, v in zip(ids, vals):
      if 0 <= i < n:
        want[i] += v
    g = RowSparse(jnp.asarray(ids, jnp.int32).reshape(-1), jnp.asarray(vals).reshape(-1, 2), n)
    np.testing.assert_allclose(dense(g), want, rtol=1e-6, atol=1e-6)
    ids_c, vals_c, valid = parts(g)
    kept = np.asarray(ids_c)[np.asarray(valid)]
    assert sorted(kept.tolist()) == sorted({i for i in ids if 0 <= i < n})
    np.testing.assert_allclose(np.asarray(vals_c)[np.asarray(valid)], want[kept], rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(norm(g), np.sqrt((want**2).sum()),
                               rtol=1e-5, atol=1e-6)

  check()


@pytest.mark.slow  # a bench run: .ci/run
def test_sparse_bench_case_runs():
  from adamfx.cli import bench_sparse as _bench_sparse

  r = _bench_sparse.bench_sparse('tiny', repeats=1, steps=1)
  for name in ('dense', 'lazy'):
    assert r[name]['ms']['median'] > 0
  assert r['dense_over_lazy']['median'] > 0
  assert 'sparse:' in _bench_sparse.format_sparse(r)


def test_ids_are_encoded_and_read_in_one_compiled_call_each():
  # Eagerly, a RowSparse's ids are encoded (built) and decoded (read) by one
  # compiled call each, not dozens of separate operations per call.
  # (The op-by-op code compiled 62 programs here.)
  ids = np.array([4, 990, -3, 4, 2**31 - 1, 17, 0], np.int32)  # shapes no other test uses
  values = jnp.ones((7, 3))
  with harness.compiled_programs() as compiled:
    r = RowSparse(ids, values, 991)
    read = r.indices
  assert len(compiled) <= 3, compiled  # encode, decode, and the unit's constant
  np.testing.assert_array_equal(np.asarray(read), ids)
