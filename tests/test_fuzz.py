"""Property-based fuzzing of every public transformation (hypothesis).

Random trees (shapes, dtypes), hyperparameters drawn from valid and invalid
values, for each public transformation. The rule: valid hyperparameters give
optax's numbers (the independent reference), for every member; a draw with an
invalid one gives a clear ``ValueError``/``TypeError`` raised by adamfx itself,
naming an invalid argument -- never a finite wrong result, never an error from
deep inside jax. Valid and invalid draws are separate tests, so that every
member reaches the optax comparison on every example of the first.
"""

import functools
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import optax_promotion
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import adamfx

NAN, INF = float('nan'), float('inf')
DECAYS = [0.0, 0.5, 0.9, 0.999, 1.0, -0.1, 1.5, NAN, INF]
EPSES = [0.0, 1e-8, 1e-3, -1.0, NAN, INF]
LRS = [1e-3, 0.1, 0.0, -1e-3, NAN, INF]
SHAPES = [(), (3,), (2, 5), (300,)]
C8 = 256  # min_8bit_size: the (300,) leaf is quantized


def _valid_decay(b):
  return 0 <= b < 1


def _valid_eps(e):
  return 0 <= e < INF


# name: (adamfx factory, optax factory, hyperparameter names, steps compared)
# 8-bit members are compared on their first step, which starts from exact
# zero moments and is float32 Adam's (later steps carry quantization error).
MEMBERS = {
    'adam': (adamfx.adam, optax.adam, ('learning_rate', 'b1', 'b2', 'eps', 'eps_root'), 2),
    'nadam': (adamfx.nadam, optax.nadam, ('learning_rate', 'b1', 'b2', 'eps', 'eps_root'), 2),
    'amsgrad': (adamfx.amsgrad, optax.amsgrad, ('learning_rate', 'b1', 'b2', 'eps', 'eps_root'), 2),
    'adamw': (adamfx.adamw, optax.adamw, ('learning_rate', 'b1', 'b2', 'eps', 'eps_root'), 2),
    'nadamw': (adamfx.nadamw, optax.nadamw, ('learning_rate', 'b1', 'b2', 'eps', 'eps_root'), 2),
    'adamax': (adamfx.adamax, optax.adamax, ('learning_rate', 'b1', 'b2', 'eps'), 2),
    'scale_by_adam': (adamfx.scale_by_adam, optax.scale_by_adam, ('b1', 'b2', 'eps', 'eps_root'), 2),
    'scale_by_adamax': (adamfx.scale_by_adamax, optax.scale_by_adamax, ('b1', 'b2', 'eps'), 2),
    'adam8bit': (lambda **h: adamfx.adam8bit(**h, min_8bit_size=C8), optax.adam,
                 ('learning_rate', 'b1', 'b2', 'eps', 'eps_root'), 1),
    'adamw8bit': (lambda **h: adamfx.adamw8bit(**h, min_8bit_size=C8), optax.adamw,
                  ('learning_rate', 'b1', 'b2', 'eps', 'eps_root'), 1),
    'scale_by_adam8bit': (lambda **h: adamfx.scale_by_adam8bit(**h, min_8bit_size=C8),
                          optax.scale_by_adam, ('b1', 'b2', 'eps', 'eps_root'), 1),
    'pack_adam': (lambda **h: adamfx.pack_state(adamfx.adam(**h)), optax.adam,
                  ('learning_rate', 'b1', 'b2', 'eps', 'eps_root'), 2),
    'inject_adam': (adamfx.inject_hyperparams(adamfx.adam), optax.adam,
                    ('learning_rate', 'b1', 'b2', 'eps', 'eps_root'), 2),
}


def _raised_by_adamfx(err: BaseException) -> bool:
  """Whether the innermost frame that raised is adamfx's own code."""
  frames = traceback.extract_tb(err.__traceback__)
  return bool(frames) and '/adamfx/' in frames[-1].filename.replace('\\', '/')


@st.composite
def trees(draw):
  n = draw(st.integers(1, 3))
  tree = {}
  for i in range(n):
    shape = draw(st.sampled_from(SHAPES))
    dtype = draw(st.sampled_from([jnp.float32, jnp.float32, jnp.bfloat16]))
    seed = draw(st.integers(0, 2**16))
    tree[f'leaf{i}'] = jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)
  return tree


@st.composite
def hyperparams(draw, names, valid):
  """Values of ``names``: all valid, or (``valid=False``) at least one invalid."""
  pools = {'learning_rate': LRS, 'b1': DECAYS, 'b2': DECAYS, 'eps': EPSES, 'eps_root': EPSES}
  bad = set()
  if not valid:
    bad = {draw(st.sampled_from(names))} | {n for n in names if draw(st.integers(0, 3)) == 0}
  out = {}
  for name in names:
    ok = _valid_decay if name in ('b1', 'b2') else _valid_eps
    value = draw(st.sampled_from([x for x in pools[name] if ok(x) != (name in bad)]))
    out[name] = draw(st.sampled_from([value, np.float32(value), jnp.asarray(value)]))
  return out


def _all_valid(hps):
  for name, v in hps.items():
    x = float(v)
    if name in ('b1', 'b2'):
      if not _valid_decay(x):
        return False
    elif not _valid_eps(x):
      return False
  return True


def _grads(tree, step):
  return jax.tree.map(
      lambda p: jnp.asarray(
          np.random.default_rng(step).normal(size=p.shape) * (step + 1), p.dtype),
      tree)


def _run(tx, params, steps):
  state = tx.init(params)
  total = jax.tree.map(lambda p: np.zeros(p.shape), params)
  for i in range(steps):
    u, state = tx.update(_grads(params, i), state, params)
    total = jax.tree.map(lambda t, x: t + np.asarray(x.astype(jnp.float32), np.float64), total, u)
  return u, total


def _has_bfloat16(params):
  return any(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))


@pytest.mark.parametrize('name', sorted(MEMBERS))
@settings(max_examples=4)
@given(data=st.data())
def test_valid_hyperparameters_give_optax_numbers(name, data):
  make, reference, names, steps = MEMBERS[name]
  params = data.draw(trees(), 'params')
  hps = data.draw(hyperparams(names, valid=True), 'hyperparams')
  assert _all_valid(hps)
  try:
    tx = make(**hps)
    updates, total = _run(tx, params, steps)
  except ValueError as e:
    # The one refusal of valid values: a decay that rounds to 1.0 in a
    # bfloat16 leaf's moment, named. Draw another example.
    assert _raised_by_adamfx(e) and _has_bfloat16(params) and 'rounds to 1.0' in str(e), e
    assume(False)
  for p, u in zip(jax.tree.leaves(params), jax.tree.leaves(updates)):
    assert u.dtype == p.dtype
  # optax on float32 copies of the params: bfloat16 params round each
  # update to 8 significant bits (2**-8 relative, one step at a time).
  params32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
  with optax_promotion():
    _, want = _run(reference(**{k: float(v) for k, v in hps.items()}), params32, steps)
  for p, g, w in zip(jax.tree.leaves(params), jax.tree.leaves(total), jax.tree.leaves(want)):
    narrow = p.dtype == jnp.bfloat16
    top = float(np.max(np.abs(w))) if w.size else 0.0
    rtol = 2 * 2.0**-8 if narrow else 2e-6
    # Absolute: a few ulps of the largest step (steps of opposite sign cancel).
    atol = 2 * top * (2.0**-8 if narrow else 8 * 2.0**-23)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=max(atol, 1e-30), err_msg=f'{name} {hps}')


@settings(max_examples=40)
@given(data=st.data(), name=st.sampled_from(sorted(MEMBERS)))
def test_invalid_hyperparameters_are_refused_by_name(data, name):
  make, _, names, steps = MEMBERS[name]
  params = data.draw(trees(), 'params')
  hps = data.draw(hyperparams(names, valid=False), 'hyperparams')
  assert not _all_valid(hps)
  with pytest.raises((ValueError, TypeError)) as info:
    _run(make(**hps), params, steps)
  e = info.value
  assert _raised_by_adamfx(e), f'{type(e).__name__} from outside adamfx: {e}'
  invalid = [n for n in names if not _all_valid({n: hps[n]})]
  assert any(f'`{n}`' in str(e) for n in invalid), f'{hps}: {e}'


TRACED = ['adam', 'nadam', 'amsgrad', 'adamw', 'adamax', 'adam8bit', 'adamw8bit']


@settings(max_examples=25)
@given(
    name=st.sampled_from(TRACED),
    which=st.sampled_from(['b1', 'b2', 'eps', 'eps_root']),
    value=st.sampled_from([1.0, 1.5, -0.5, NAN, INF, -1.0]),
)
def test_invalid_traced_hyperparameters_give_nan_never_finite(name, which, value):
  """Injected (traced) values cannot be checked: they must give NaN updates."""
  make = getattr(adamfx, name)
  if name.endswith('8bit'):
    make = functools.partial(make, min_8bit_size=C8)
  if name == 'adamax' and which == 'eps_root':
    which = 'eps'
  if which in ('eps', 'eps_root') and 0 <= value < INF:
    return  # a valid eps
  params = {'w': jnp.ones((300,)), 'b': jnp.ones(3)}
  tx = adamfx.inject_hyperparams(make)(learning_rate=1e-2)
  state = tx.init(params)
  hps = dict(state.hyperparams)
  hps[which] = jnp.asarray(value, hps[which].dtype)
  state = state._replace(hyperparams=hps)
  updates, _ = jax.jit(tx.update)(_grads(params, 0), state, params)
  for u in jax.tree.leaves(updates):
    assert bool(jnp.all(jnp.isnan(u))), f'{name} {which}={value}: {u}'
  with pytest.raises(ValueError, match=f'`{which}`'):
    tx.update(_grads(params, 0), state, params)  # eager: checked, concrete


def test_raised_by_adamfx_sees_the_raising_frame():
  with pytest.raises(ValueError) as info:
    adamfx.adam(1e-3, b2=1.0)
  assert _raised_by_adamfx(info.value)
  with pytest.raises(TypeError) as info:
    jax.lax.add(jnp.ones(2, jnp.int32), jnp.ones(2, jnp.float32))
  assert not _raised_by_adamfx(info.value)

