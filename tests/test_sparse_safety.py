"""Issue 18: RowSparse in compositions -- no silent wrong rows.

References independent of adamfx's sparse code: ``adamfx.lazy_adam`` with the
schedule in its own ``learning_rate`` (itself checked against
``torch.optim.SparseAdam`` and a float64 NumPy transcription in
test_sparse.py), NumPy scatter-adds of the ids, and "which rows moved" sets
computed with NumPy from the ids given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamfx
from adamfx import RowSparse

V, D = 40, 3


def _moved(before, after):
  """Rows where ``after`` differs from ``before`` (NaN counts as moved)."""
  a, b = np.asarray(after, np.float64), np.asarray(before, np.float64)
  return set(np.flatnonzero(((a != b) | np.isnan(a)).any(axis=tuple(range(1, a.ndim)))).tolist())


def _finite_moves_outside(before, after, touched):
  """Rows outside ``touched`` that got a finite, changed value."""
  a, b = np.asarray(after, np.float64), np.asarray(before, np.float64)
  bad = (np.isfinite(a) & (a != b)).any(axis=tuple(range(1, a.ndim)))
  return set(np.flatnonzero(bad).tolist()) - set(touched)


_SCHED = optax.linear_schedule(0.1, 0.02, 3)
_WARMUP = optax.warmup_cosine_decay_schedule(0.0, 0.1, 2, 10, 0.01)  # lr 0 at step 0


@pytest.mark.parametrize('tail, sched, jit', [
    ('scale_by_learning_rate', _WARMUP, True),
    ('scale_by_learning_rate', _SCHED, False),
    ('scale_by_schedule', _SCHED, True),
    ('scale', None, False),
], ids=['lr_warmup_from_0_jit', 'lr_linear_eager', 'scale_by_schedule_jit', 'scale_eager'])
def test_schedule_after_scale_by_lazy_adam_moves_the_right_rows(tail, sched, jit):
  """Defect 1: the ids survive optax's per-leaf scalings; the update equals
  lazy_adam(schedule)'s, and only the touched rows move (2-D and 3-D rows)."""
  if tail == 'scale':
    sched = lambda count: jnp.float32(0.05)
    make_tail = lambda: optax.scale(-0.05)
  elif tail == 'scale_by_schedule':
    make_tail = lambda: optax.scale_by_schedule(lambda c: -sched(c))
  else:
    make_tail = lambda: optax.scale_by_learning_rate(sched)
  rng = np.random.default_rng(3)
  params = {'t': jnp.asarray(rng.normal(size=(V, D, 2)), jnp.float32),
            'w': jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  tx = optax.chain(adamfx.scale_by_lazy_adam(), make_tail())
  ref = adamfx.lazy_adam(sched)
  update = jax.jit(tx.update) if jit else tx.update
  s, rs, p = tx.init(params), ref.init(params), params
  for ids in ([3, 5, 3], [V - 1, 0, 17, 5], [22]):
    g = {'t': RowSparse(jnp.asarray(ids, jnp.int32),
                        jnp.asarray(rng.normal(size=(len(ids), D, 2)), jnp.float32), V),
         'w': jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    with jax.numpy_dtype_promotion('standard'):  # optax's schedules mix int and float
      u, s = update(g, s, p)
      ru, rs = ref.update(g, rs, p)
    new = optax.apply_updates(p, u)
    want = optax.apply_updates(p, ru)
    np.testing.assert_allclose(new['t'], want['t'], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(new['w'], want['w'], rtol=1e-6, atol=1e-7)
    assert _moved(p['t'], new['t']) <= set(ids)
    np.testing.assert_array_equal(u['t'].indices.shape, (len(ids),))
    p = new
  first = {3, 5} if float(sched(0)) else set()  # a warmup from 0 moves nothing at step 0
  assert _moved(params['t'], p['t']) == first | {5, V - 1, 0, 17, 22}


def _pair(ids1, ids2, seed=0):
  rng = np.random.default_rng(seed)
  make = lambda ids: RowSparse(jnp.asarray(ids, jnp.int32),
                               jnp.asarray(rng.normal(size=(len(ids), D)), jnp.float32), V)
  return make(ids1), make(ids2)


_DIFFERENT = [([1, 2], [3, 4]), ([0, 0], [7, 9]), ([5, 6, 7], [5, 6, 8]), ([38, 2], [2, 38])]
_MAPS = {
    'add': lambda a, b: jax.tree.map(jnp.add, a, b),
    'mean': lambda a, b: jax.tree.map(lambda x, y: (x + y) / 2, a, b),
    'ema': lambda a, b: jax.tree.map(lambda x, y: 0.9 * x + 0.1 * y, a, b),
    'sub': lambda a, b: jax.tree.map(jnp.subtract, a, b),
    'mul': lambda a, b: jax.tree.map(jnp.multiply, a, b),
}


@pytest.mark.parametrize('ids1, ids2', _DIFFERENT, ids=[str(i) for i in range(len(_DIFFERENT))])
@pytest.mark.parametrize('op', sorted(_MAPS))
def test_tree_arithmetic_over_different_ids_never_moves_a_wrong_row(op, ids1, ids2):
  """Defect 2: tree maps that combine two RowSparse with different ids are
  refused eagerly; under jit, lazy_adam + apply_updates never give a finite
  change to a row that neither gradient touched."""
  g1, g2 = _pair(ids1, ids2)
  with pytest.raises(ValueError, match='ids were treated as numbers'):
    _MAPS[op](g1, g2)
  table = jnp.asarray(np.random.default_rng(1).normal(size=(V, D)), jnp.float32)
  tx = adamfx.lazy_adam(0.1)

  @jax.jit
  def step(table, state, g1, g2):
    u, state = tx.update(_MAPS[op](g1, g2), state, table)
    return optax.apply_updates(table, u)

  new = step(table, tx.init(table), g1, g2)
  assert not _finite_moves_outside(table, new, set(ids1) | set(ids2))
  assert not np.isfinite(np.asarray(new)).all() or _moved(table, new) == set()


@pytest.mark.parametrize('jit', [False, True], ids=['eager', 'jit'])
def test_tree_arithmetic_that_keeps_the_ids_is_exact(jit):
  """``2 * g``, ``-g``, a sum of gradients with the same ids (micro-batches
  over one batch of ids) and ``g1 + g2`` (concatenation) all give NumPy's
  dense sums."""
  g1, g2 = _pair([4, 9, 4, 0], [4, 9, 4, 0], seed=1)
  h1, h2 = _pair([1, 2], [3, 1], seed=2)
  f = jax.jit if jit else (lambda fn: fn)
  dense = lambda g: f(lambda g: g.todense())(g)
  np_dense = lambda g: _np_dense(np.asarray(g.indices), np.asarray(g.values))
  np.testing.assert_allclose(dense(f(lambda g: jax.tree.map(lambda x: 2 * x, g))(g1)),
                             2 * np_dense(g1), rtol=1e-6)
  np.testing.assert_allclose(dense(f(lambda g: jax.tree.map(jnp.negative, g))(g1)),
                             -np_dense(g1), rtol=1e-6)
  np.testing.assert_allclose(dense(f(lambda a, b: jax.tree.map(jnp.add, a, b))(g1, g2)),
                             np_dense(g1) + np_dense(g2), rtol=1e-6)
  np.testing.assert_allclose(dense(f(lambda a, b: a + b)(h1, h2)),
                             np_dense(h1) + np_dense(h2), rtol=1e-6)
  np.testing.assert_allclose(dense(f(lambda g: -0.5 * g)(h1)), -0.5 * np_dense(h1), rtol=1e-6)


def _np_dense(ids, vals, n=V):
  out = np.zeros((n,) + vals.shape[1:], np.float64)
  for i, v in zip(ids, vals):
    if 0 <= i < n:
      out[i] += v
  return out


@pytest.mark.parametrize('what', ['cast', 'clip', 'sign', 'add_noise'])
def test_per_element_maps_over_a_row_sparse_are_refused(what):
  """Other per-leaf maps that treat the ids as numbers: refused eagerly, and
  under jit no finite change to an untouched row."""
  g, _ = _pair([6, 11, 6], [0])
  maps = {
      'cast': lambda g: jax.tree.map(lambda x: x.astype(jnp.bfloat16), g),
      'clip': lambda g: jax.tree.map(lambda x: jnp.clip(x, -1.0, 1.0), g),
      'sign': lambda g: jax.tree.map(jnp.sign, g),
      'add_noise': lambda g: jax.tree.map(lambda x: x + 1e-3, g),
  }
  with pytest.raises(ValueError, match='ids were treated as numbers'):
    maps[what](g)
  table = jnp.zeros((V, D))
  new = jax.jit(lambda t, g: t + maps[what](g))(table, g)
  assert not _finite_moves_outside(table, new, {6, 11})


@pytest.mark.usefixtures('x64')
@pytest.mark.parametrize('dtype', ['uint64', 'int64', 'uint32'])
@pytest.mark.slow  # test_sparse's out-of-range ids under jit are the default run's
def test_x64_wide_ids_are_out_of_range_under_jit(dtype):
  """Defect 7: ids beyond int32 are out of range before any cast, under jit
  too: they touch no row in lazy_adam, todense, sparse_global_norm and the
  row gather of value_and_row_sparse_grad."""
  wide = {'uint64': [2**32 + 3, 2**33 + 1, 3], 'int64': [2**32 + 3, -2**40 + 5, 3],
          'uint32': [2**31 + 3, 2**32 - 1, 3]}[dtype]
  ids = jnp.asarray(np.array(wide, dtype=dtype))
  vals = jnp.ones((3, D), jnp.float32)
  g = RowSparse(ids, vals, V)
  table = jnp.zeros((V, D), jnp.float32)
  tx = adamfx.lazy_adam(0.1)
  u, _ = jax.jit(tx.update)(g, tx.init(table), table)
  assert _moved(table, optax.apply_updates(table, u)) == {3}
  want = _np_dense(np.array(wide, dtype=object), np.ones((3, D)))
  np.testing.assert_array_equal(jax.jit(lambda g: g.todense())(g), want)
  np.testing.assert_allclose(jax.jit(adamfx.sparse_global_norm)(g), np.sqrt(D), rtol=1e-6)
  with pytest.raises(ValueError, match='outside'):
    tx.update(g, tx.init(table), table)
  vg = adamfx.value_and_row_sparse_grad(lambda p: jnp.sum(p['t'] ** 2), where=lambda p: p['t'])
  value, _ = jax.jit(vg)({'t': jnp.ones((V, D), jnp.float32)}, ids)
  assert float(value) == pytest.approx(D)  # only row 3 gathered; the wide ids gather zeros


# ------------------------------------------------- model helpers (3, 4)


def _skipgram_dense(table, centre, context):
  """The ordinary model: one table looked up twice (centre and context words)."""
  score = jnp.sum(table[centre] * table[context], axis=-1)
  return -jnp.sum(jax.nn.log_sigmoid(score))


@pytest.mark.parametrize('picks', [2, 3])
@pytest.mark.parametrize('dtypes', [('int32', 'int32'), ('int32', 'uint8')], ids=['same', 'mixed'])
def test_one_table_picked_several_times_keeps_every_id_set(picks, dtypes):
  """Defect 3: ``where=lambda p: (p['emb'], p['emb'])`` keeps both id arrays;
  the RowSparse sums to jax.grad of the ordinary model (jit and eager)."""
  rng = np.random.default_rng(picks)
  table = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
  sets = [np.array([3, 7, 3, 39]), np.array([7, 0, 12, 3]), np.array([5, 5, 1, 3])][:picks]
  id_arrays = tuple(jnp.asarray(a, dtypes[min(n, 1)]) for n, a in enumerate(sets))
  k = len(sets[0])

  def loss(p):  # rows of id array n start at position n * k
    rows = p['emb']
    return sum(-jnp.sum(jax.nn.log_sigmoid(jnp.sum(rows[:k] * rows[n * k:(n + 1) * k], -1)))
               for n in range(1, picks))

  def dense(t):
    return sum(_skipgram_dense(t, sets[0], sets[n]) for n in range(1, picks))

  want_v, want_g = jax.value_and_grad(dense)(table)
  vg = adamfx.value_and_row_sparse_grad(loss, where=lambda p: (p['emb'],) * picks)
  for f in (vg, jax.jit(vg)):
    value, grads = f({'emb': table}, id_arrays)
    np.testing.assert_allclose(value, want_v, rtol=1e-6)
    np.testing.assert_allclose(grads['emb'].todense(), want_g, rtol=1e-5, atol=1e-6)
    assert grads['emb'].values.shape == (picks * k, D)


def _tied_losses():
  labels = jnp.array([1, 2, 39])

  def matmul(p, pos):
    h = p['emb'][pos]
    return -jnp.mean(jax.nn.log_softmax(h @ p['emb'].T)[jnp.arange(3), labels])

  def einsum(p, pos):
    h = jnp.tanh(p['emb'][pos] @ p['w'])
    return jnp.sum(jnp.einsum('bd,vd->bv', h, p['emb'].astype(jnp.float32)) ** 2)

  def dot(p, pos):
    return jnp.sum(jnp.dot(p['emb'][pos], p['emb'].reshape(-1, D).T))

  return {'matmul': matmul, 'einsum': einsum, 'dot': dot}


@pytest.mark.parametrize('form', sorted(_tied_losses()))
@pytest.mark.parametrize('jit', [False, True], ids=['eager', 'jit'])
def test_tied_table_is_refused_and_says_how_to_write_it(form, jit):
  """Defect 4: a table used by the lookup and as ``h @ table.T`` is refused
  (it would get k rows instead of the vocabulary); a product over the
  gathered rows indexed first is not."""
  params = {'emb': jnp.ones((V, D)), 'w': jnp.eye(D)}
  vg = adamfx.value_and_row_sparse_grad(_tied_losses()[form], where=lambda p: p['emb'])
  vg = jax.jit(vg) if jit else vg
  with pytest.raises(ValueError, match=r'tied to an output projection.*jax.value_and_grad'):
    vg(params, jnp.array([3, 7, 3]), jnp.arange(3))
  sampled = lambda p, pos: jnp.sum(p['emb'][pos] @ p['emb'][pos[:2]].T)
  ok = adamfx.value_and_row_sparse_grad(sampled, where=lambda p: p['emb'])
  value, grads = ok(params, jnp.array([3, 7, 3]), jnp.arange(3))
  assert float(value) == pytest.approx(6 * D)
  assert grads['emb'].values.shape == (3, D)


# ------------------------------------------------------ small defects


@pytest.mark.parametrize('rows', [[3], [0, 3, V - 1]])
def test_catch_up_keeps_decaying_once_the_count_saturates(rows):
  """Defect 16: at the saturated int32 count a touched row's moments decay
  by b1, b2 a step (NumPy float64 Adam moments), not grow by 1 / b."""
  b1, b2 = 0.9, 0.999
  tx = adamfx.scale_by_lazy_adam(b1, b2, catch_up=True)
  table = jnp.zeros((V, D))
  state = tx.init(table)
  top = np.iinfo(np.int32).max
  state = state._replace(count=jnp.asarray(top - 1, jnp.int32))
  rng = np.random.default_rng(0)
  m = np.zeros((len(rows), D))
  v = np.zeros((len(rows), D))
  for _ in range(3):  # the last two steps at the saturated count
    g = rng.normal(size=(len(rows), D))
    _, state = jax.jit(tx.update)(RowSparse(jnp.asarray(rows), jnp.asarray(g, jnp.float32), V),
                                  state, table)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
  assert int(state.count) == top
  np.testing.assert_allclose(np.asarray(state.mu)[rows], m, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(state.nu)[rows], v, rtol=1e-5, atol=1e-9)


def test_flags_are_bools_and_torch_names_lr():
  """Cosmetic: ``catch_up=1`` is a TypeError like ``amsgrad=1``; torch_adam's
  learning-rate errors say ``lr``."""
  with pytest.raises(TypeError, match='`catch_up` must be True or False, got 1'):
    adamfx.lazy_adam(0.1, catch_up=1)
  with pytest.raises(TypeError, match='`catch_up`'):
    adamfx.scale_by_lazy_adam(catch_up='yes')
  for build in (adamfx.torch_adam, adamfx.torch_adamw):
    with pytest.raises(ValueError, match=r'^`lr` must be >= 0, got -1'):
      build(lr=-1)
  with pytest.raises(ValueError, match=r'^`learning_rate` must be >= 0'):
    adamfx.keras_adam(learning_rate=-1)


def _dense_members():
  from test_composition import CONTRACTS

  # Lazy rows take RowSparse gradients whatever their flag says; MultiSteps refuses one
  # with its own message (tests/test_multisteps.py).
  return [c for c in CONTRACTS
          if not c.sparse and not c.name.startswith(('lazy_', 'multisteps_'))]


@pytest.mark.parametrize('c', _dense_members(), ids=lambda c: c.name)
def test_row_sparse_given_to_a_dense_member_says_use_lazy_adam(c):
  """Defect 13: every dense member (adam, adam8bit, torch_adam, pack_state,
  injected, wrapped ...) refuses a RowSparse gradient naming the leaf and
  lazy_adam, not 'missing from the updates'."""
  p = {'emb': jnp.zeros((10, 2)), 'b': jnp.zeros(2)}
  g = {'emb': RowSparse(jnp.array([1]), jnp.ones((1, 2)), 10), 'b': jnp.ones(2)}
  tx = c.make()
  with pytest.raises(TypeError, match=r"leaf `\['emb'\]` is an adamfx.RowSparse.*lazy_adam"):
    tx.update(g, tx.init(p), p)


def test_lazy_adam_then_add_decayed_weights_points_to_lazy_adamw():
  """Defect 13: optax.add_decayed_weights after scale_by_lazy_adam fails in
  JAX's tree code; the message now names lazy_adamw."""
  p = {'emb': jnp.zeros((10, 2))}
  g = {'emb': RowSparse(jnp.array([1]), jnp.ones((1, 2)), 10)}
  tx = optax.chain(adamfx.scale_by_lazy_adam(), optax.add_decayed_weights(0.1))
  with pytest.raises(ValueError, match='adamfx.lazy_adamw'):
    tx.update(g, tx.init(p), p)


@pytest.mark.parametrize('jit', [False, True], ids=['eager', 'jit'])
def test_adam_diagnostics_of_a_lazy_step(jit):
  """Defect 13: adam_diagnostics(state, lazy updates, lr) reads the RowSparse
  as its dense array: step_max / step_mean from NumPy over the dense update."""
  rng = np.random.default_rng(0)
  p = {'emb': jnp.asarray(rng.normal(size=(10, 2)), jnp.float32), 'b': jnp.zeros(2)}
  g = {'emb': RowSparse(jnp.array([1, 4, 1]), jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                        10), 'b': jnp.ones(2)}
  tx = adamfx.lazy_adam(0.1)
  u, state = tx.update(g, tx.init(p), p)
  diag = jax.jit(adamfx.adam_diagnostics) if jit else adamfx.adam_diagnostics
  d = diag(state, u, 0.1)
  dense = np.concatenate([np.abs(np.asarray(u['emb'].todense())).ravel(),
                          np.abs(np.asarray(u['b']))]) / 0.1
  np.testing.assert_allclose(d['step_max'], dense.max(), rtol=1e-6)
  np.testing.assert_allclose(d['step_mean'], dense.mean(), rtol=1e-6)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16', 'float32'])
@pytest.mark.parametrize('jit', [False, True], ids=['eager', 'jit'])
def test_every_row_touched_is_dense_adam_with_huge_and_16_bit_gradients(dtype, jit):
  """Defect 14: with every row touched each step (ids shuffled, one duplicate
  pair split in two), lazy Adam's table and moments are adamfx.adam's bit for
  bit on 16-bit tables too, with gradients up to 2**100 (beyond 2**63,
  where squares overflow float32) -- the 16-bit nu's stochastic rounding
  draws the dense leaf's bits."""
  rng = np.random.default_rng(5)
  n = 6
  table = jnp.asarray(rng.normal(size=(n, D)), dtype)
  dense, lazy = adamfx.adam(0.01), adamfx.lazy_adam(0.01)
  ds, ls, dp, lp = dense.init(table), lazy.init(table), table, table
  dstep = jax.jit(dense.update) if jit else dense.update
  lstep = jax.jit(lazy.update) if jit else lazy.update
  big = float(jnp.finfo(dtype).max) if dtype == 'float16' else 2.0**100
  for t in range(3):
    g = rng.normal(size=(n, D)) * np.where(rng.random((n, D)) < 0.3, big / (1 + t), 1.0)
    g = jnp.asarray(g, dtype)
    order = rng.permutation(n)
    ids = np.concatenate([order, [order[0]]])
    half = g[order[0]].astype(jnp.float32) / 2
    vals = jnp.concatenate([g[order].at[0].set(half.astype(dtype)), half.astype(dtype)[None]])
    if not np.array_equal(np.asarray((half.astype(dtype).astype(jnp.float32) * 2).astype(dtype),
                                     np.float32), np.asarray(g[order[0]], np.float32)):
      ids, vals = order, g[order]  # the halves do not sum back exactly: no split
    du, ds = dstep(g, ds, dp)
    lu, ls = lstep(RowSparse(jnp.asarray(ids), vals, n), ls, lp)
    dp, lp = optax.apply_updates(dp, du), optax.apply_updates(lp, lu)
    np.testing.assert_array_equal(np.asarray(lp, np.float32), np.asarray(dp, np.float32))
  # float32 moments: XLA may fuse b1 * m + (1 - b1) * g into a multiply-add for
  # the table and not for the gathered rows (the sparse guide): an ulp or two
  # a step, 8 ulps over the 3 steps.
  rtol = 0 if dtype != 'float32' else 8 * 2.0**-24
  for k in ('mu', 'nu'):
    np.testing.assert_allclose(np.asarray(getattr(ls[0], k), np.float32),
                               np.asarray(getattr(ds[0], k), np.float32), rtol=rtol, atol=0)


def test_lazy_adamw_weight_decay_schedule_message_names_the_call_that_works():
  """Defect 6: the message for a callable weight_decay recommends a call that
  works (it recommended the call that raised it)."""
  sched = optax.linear_schedule(0.1, 0.01, 3)
  with pytest.raises(TypeError, match=r'adamfx.inject_hyperparams\(adamfx.lazy_adamw\)'):
    adamfx.lazy_adamw(0.1, weight_decay=sched)
  tx = adamfx.inject_hyperparams(adamfx.lazy_adamw)(0.1, weight_decay=sched)
  p = {'t': jnp.ones((V, D))}
  g = {'t': RowSparse(jnp.array([2]), jnp.zeros((1, D)), V)}
  with jax.numpy_dtype_promotion('standard'):
    u, _ = tx.update(g, tx.init(p), p)
  np.testing.assert_allclose(u['t'].todense()[2], -0.1 * 0.1 * 1.0, rtol=1e-6)  # -lr * wd * p
