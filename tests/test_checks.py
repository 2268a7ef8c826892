"""Bad input gets a clear error; traced hyperparameters are left alone.

Every error names the argument (or the leaf's path), the value received and
the valid range. Concrete Python/NumPy numbers are validated eagerly, at
construction; traced values (under ``jit``, ``inject_hyperparams``,
schedules) pass through unvalidated and keep working.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import optax_promotion

import adamfx

# Every factory that takes b1, b2, eps, with its positional learning rate.
FACTORIES = {
    'scale_by_adam': lambda **kw: adamfx.scale_by_adam(**kw),
    'adam': lambda **kw: adamfx.adam(1e-3, **kw),
    'adamw': lambda **kw: adamfx.adamw(1e-3, **kw),
    'nadam': lambda **kw: adamfx.nadam(1e-3, **kw),
    'nadamw': lambda **kw: adamfx.nadamw(1e-3, **kw),
    'amsgrad': lambda **kw: adamfx.amsgrad(1e-3, **kw),
    'scale_by_adamax': lambda **kw: adamfx.scale_by_adamax(**kw),
    'adamax': lambda **kw: adamfx.adamax(1e-3, **kw),
}
WITH_EPS_ROOT = ['scale_by_adam', 'adam', 'adamw', 'nadam', 'nadamw', 'amsgrad']


@pytest.mark.parametrize('factory', list(FACTORIES))
@pytest.mark.parametrize(
    'name,value,match',
    [
        ('b1', 1.0, r'`b1` must be in \[0, 1\), got 1\.0: with b1 == 1 the bias correction 1 - b1\*\*t is 0'),
        ('b2', 1.0, r'`b2` must be in \[0, 1\), got 1\.0: with b2 == 1 the bias correction'),
        ('b2', 1.5, r'`b2` must be in \[0, 1\), got 1\.5'),
        ('b1', -0.1, r'`b1` must be in \[0, 1\), got -0\.1: a negative decay'),
        ('b1', np.float32(1.0), r'`b1` must be in \[0, 1\), got'),
        ('b2', np.array(2.0), r'`b2` must be in \[0, 1\), got'),
        ('b1', math.nan, r'`b1` must be a finite number in \[0, 1\), got nan'),
        ('b2', math.inf, r'`b2` must be a finite number in \[0, 1\), got inf'),
        ('eps', -1e-8, r'`eps` must be >= 0, got -1e-08'),
        ('eps', math.inf, r'`eps` must be a finite number >= 0, got inf'),
        ('eps', math.nan, r'`eps` must be a finite number >= 0, got nan'),
    ],
)
def test_bad_decays_and_eps_are_value_errors(factory, name, value, match):
  with pytest.raises(ValueError, match=match):
    FACTORIES[factory](**{name: value})


@pytest.mark.parametrize('factory', WITH_EPS_ROOT)
def test_negative_or_nan_eps_root(factory):
  with pytest.raises(ValueError, match=r'`eps_root` must be >= 0, got -1\.0'):
    FACTORIES[factory](eps_root=-1.0)
  with pytest.raises(ValueError, match=r'`eps_root` must be a finite number >= 0, got nan'):
    FACTORIES[factory](eps_root=math.nan)


@pytest.mark.parametrize('factory', list(FACTORIES))
@pytest.mark.parametrize(
    'name,value,match',
    [
        ('b1', '0.9', r"`b1` must be a real number, got '0\.9' of type str"),
        ('b2', None, r'`b2` must be a real number, got None of type NoneType'),
        ('b1', True, r'`b1` must be a real number, got True of type bool'),
        ('eps', 1e-8j, r'`eps` must be a real number, got 1e-08j'),
        ('b2', np.complex64(0.5), r'`b2` must be a real number, got an array of dtype complex64'),
    ],
)
def test_non_numeric_hyperparameters_are_type_errors(factory, name, value, match):
  with pytest.raises(TypeError, match=match):
    FACTORIES[factory](**{name: value})


@pytest.mark.parametrize('make', [adamfx.adam, adamfx.adamw, adamfx.adamax, adamfx.nadam, adamfx.amsgrad])
@pytest.mark.parametrize(
    'lr,error,match',
    [
        ('fast', TypeError, r"`learning_rate` must be a real number or an optax schedule, got 'fast' of type str"),
        (None, TypeError, r'`learning_rate` must be a real number or an optax schedule, got None'),
        ([1e-3], TypeError, r'`learning_rate` must be a real number or an optax schedule, got \[0\.001\] of type list'),
        (-1e-3, ValueError, r'`learning_rate` must be >= 0, got -0\.001: Adam already steps against the gradient'),
        (math.nan, ValueError, r'`learning_rate` must be a finite number >= 0, got nan'),
        (math.inf, ValueError, r'`learning_rate` must be a finite number >= 0, got inf'),
    ],
)
def test_bad_learning_rate(make, lr, error, match):
  with pytest.raises(error, match=match):
    make(lr)


@pytest.mark.parametrize('wd', [-0.1, math.nan, math.inf, 'a lot'])
def test_bad_weight_decay(wd):
  error = TypeError if isinstance(wd, str) else ValueError
  match = r'`weight_decay` must be (>= 0|a finite number >= 0|a real number), got'
  for make in (adamfx.adamw, adamfx.nadamw):
    with pytest.raises(error, match=match):
      make(1e-3, weight_decay=wd)


@pytest.mark.parametrize('arg', ['mu_dtype', 'nu_dtype'])
@pytest.mark.parametrize(
    'dtype,match',
    [
        (jnp.int32, r'must be a floating dtype \(float16, bfloat16, float32, float64\) or None, got int32: an integer moment would round every update to 0'),
        ('int8', r'got int8'),
        (bool, r'got bool'),
        ('not-a-dtype', r"must be a floating dtype or None, got 'not-a-dtype'"),
    ],
)
def test_non_floating_moment_dtypes(arg, dtype, match):
  for make in (adamfx.scale_by_adam, lambda **kw: adamfx.adam(1e-3, **kw), lambda **kw: adamfx.adamw(1e-3, **kw)):
    with pytest.raises(TypeError, match=f'`{arg}` {match}' if match.startswith('must') else match):
      make(**{arg: dtype})


def test_integer_params_name_the_leaf():
  params = {'w': jnp.ones(2), 'embed': {'ids': jnp.arange(3)}}
  for tx in (adamfx.adam(1e-3), adamfx.adamax(1e-3), adamfx.adamw(1e-3, amsgrad=True)):
    with pytest.raises(
        TypeError,
        match=r"params leaf `\['embed'\]\['ids'\]` has dtype int32; Adam needs floating-point .*optax\.masked",
    ):
      tx.init(params)
  with pytest.raises(TypeError, match=r'params leaf `\[1\]` has dtype bool'):
    adamfx.adam(1e-3).init([jnp.ones(2), jnp.ones(2, bool)])
  with pytest.raises(TypeError, match=r'params leaf `<root>` has dtype int32'):
    adamfx.adam(1e-3).init(jax.ShapeDtypeStruct((3,), jnp.int32))


class TestGradientTreeMismatch:
  params = {'w': jnp.ones((3, 4)), 'b': jnp.ones(4), 'layers': [jnp.ones(2), jnp.ones(())]}

  def _update(self, tx, grads):
    state = tx.init(self.params)
    return tx.update(grads, state, self.params)

  @pytest.mark.parametrize('make', [adamfx.adam, adamfx.adamax, lambda lr: adamfx.adam(lr, amsgrad=True)])
  def test_shape_names_leaf_and_both_shapes(self, make):
    grads = {**self.params, 'w': jnp.ones((4, 3))}
    with pytest.raises(
        ValueError,
        match=r"Leaf `\['w'\]` of the updates has shape \(4, 3\), but state\.mu holds shape \(3, 4\)",
    ):
      self._update(make(1e-3), grads)
    grads = {**self.params, 'layers': [jnp.ones(2), jnp.ones(1)]}
    with pytest.raises(ValueError, match=r"Leaf `\['layers'\]\[1\]` of the updates has shape \(1,\), but state\.mu holds shape \(\)"):
      self._update(make(1e-3), grads)

  def test_missing_and_extra_leaves_are_named(self):
    grads = {k: v for k, v in self.params.items() if k != 'b'}
    with pytest.raises(ValueError, match=r"does not match the optimiser state \(state\.mu\).*missing from the updates: `\['b'\]`"):
      self._update(adamfx.adam(1e-3), grads)
    grads = {**self.params, 'extra': jnp.ones(1)}
    with pytest.raises(ValueError, match=r"not in the state: `\['extra'\]`"):
      self._update(adamfx.adam(1e-3), grads)
    grads = {**self.params, 'layers': [jnp.ones(2)]}
    with pytest.raises(ValueError, match=r"missing from the updates: `\['layers'\]\[1\]`"):
      self._update(adamfx.adam(1e-3), grads)

  def test_container_type_mismatch_shows_both_structures(self):
    grads = {**self.params, 'layers': tuple(self.params['layers'])}
    with pytest.raises(ValueError, match=r'does not match the optimiser state.*updates PyTreeDef.* vs state PyTreeDef'):
      self._update(adamfx.adam(1e-3), grads)

  def test_none_in_one_but_not_the_other(self):
    grads = {**self.params, 'b': None}
    with pytest.raises(ValueError, match=r"Leaf `\['b'\]` is None in one of the updates and the state"):
      self._update(adamfx.adam(1e-3), grads)

  def test_mismatch_is_caught_under_jit_at_trace_time(self):
    tx = adamfx.adam(1e-3)
    state = tx.init(self.params)
    grads = {**self.params, 'b': jnp.ones(5)}
    with pytest.raises(ValueError, match=r"Leaf `\['b'\]` of the updates has shape \(5,\), but state\.mu holds shape \(4,\)"):
      jax.jit(tx.update)(grads, state, self.params)


def test_decay_that_rounds_to_one_in_the_arithmetic_dtype():
  """b2 = 0.99999999 is < 1 but is 1.0 in float32: 1 - b2**t == 0 would give
  a NaN/inf step (optax: silent). Caught at trace time, when the params' dtype
  is known; float64 params (x64) are fine with it."""
  params = jnp.zeros(3)
  for kw in ({'b2': 0.99999999}, {'b1': 0.999999999}):
    tx = adamfx.adam(1e-3, **kw)
    name = next(iter(kw))
    with pytest.raises(ValueError, match=rf'`{name}` = 0\.9999+ rounds to 1\.0 in float32.*bias correction 1 - {name}\*\*t would be 0.*<= 0\.99999994'):
      tx.update(jnp.ones(3), tx.init(params))
  with optax_promotion():  # the naive implementation: no error, a NaN/inf step
    tx = optax.adam(1e-3, b1=0.999999999)
    u, _ = tx.update(jnp.ones(3), tx.init(params))
  assert not bool(jnp.all(jnp.isfinite(u)))
  with jax.enable_x64(True):
    tx = adamfx.adam(1e-3, b2=0.99999999)
    p = jnp.zeros(3, jnp.float64)
    u, _ = tx.update(jnp.ones(3, jnp.float64), tx.init(p))
    assert bool(jnp.all(jnp.isfinite(u)))


def test_valid_boundaries_are_accepted():
  params = jnp.zeros(2)
  for tx in (
      adamfx.adam(0.0, b1=0.0, b2=0.0, eps=0.0, eps_root=0.0),
      adamfx.adamw(0, b1=0, b2=0.5, weight_decay=0),
      adamfx.adam(np.float32(1e-3), b1=np.float64(0.9), b2=np.array(0.99)),
      adamfx.adamax(1, b1=0.0, b2=0.0, eps=0),
  ):
    u, _ = tx.update(jnp.array([1.0, 0.0]), tx.init(params), params)
    assert bool(jnp.all(jnp.isfinite(u)))


# ----------------------------------------------------------------------------
# Traced hyperparameters are not validated and keep working
# ----------------------------------------------------------------------------


def test_factory_called_under_jit_with_traced_hyperparameters():
  params = jnp.array([1.0, -2.0, 3.0])
  grads = jnp.array([0.3, -0.1, 2.0])

  def step(make, lr, b1, b2, eps, wd):
    kw = {'weight_decay': wd} if make in (adamfx.adamw, optax.adamw) else {}
    tx = make(lr, b1, b2, eps, **kw)
    state = tx.init(params)
    for _ in range(3):
      u, state = tx.update(grads, state, params)
    return u

  args = (jnp.float32(3e-3), jnp.float32(0.8), jnp.float32(0.99), jnp.float32(1e-6), jnp.float32(0.1))
  for make, omake in ((adamfx.adam, optax.adam), (adamfx.adamw, optax.adamw), (adamfx.nadam, optax.nadam)):
    got = jax.jit(lambda *a, m=make: step(m, *a))(*args)
    with optax_promotion():
      want = jax.jit(lambda *a, m=omake: step(m, *a))(*args)
    np.testing.assert_allclose(got, want, rtol=1e-6)
  # Traced values are not checked at construction, even outside the range.
  jax.jit(lambda b1: adamfx.adam(1e-3, b1=b1).init(params))(jnp.float32(1.5))


@pytest.mark.parametrize('wrapper', ['adamfx', 'optax'])
def test_inject_hyperparams_changing_lr_b1_b2_eps(wrapper):
  """Injected hyperparameters changed between steps, vs optax's own adam."""
  inject = adamfx.inject_hyperparams if wrapper == 'adamfx' else optax.inject_hyperparams
  params = jnp.array([1.0, -2.0, 3.0])
  tx = inject(adamfx.adam)(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-8)
  otx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-8)
  state = tx.init(params)
  with optax_promotion():
    ostate = otx.init(params)
  step, ostep = jax.jit(tx.update), jax.jit(otx.update)
  for k in range(6):
    g = jnp.array([0.5, -1.0, 2.0]) * (k + 1)
    if k == 3:
      for s in (state, ostate):
        s.hyperparams.update(learning_rate=jnp.float32(3e-3), b1=jnp.float32(0.5),
                             b2=jnp.float32(0.9), eps=jnp.float32(1e-3))
    u, state = step(g, state, params)
    with optax_promotion():
      ou, ostate = ostep(g, ostate, params)
    np.testing.assert_allclose(u, ou, rtol=1e-6)


def test_schedules_for_learning_rate_and_weight_decay():
  sched = optax.linear_schedule(1e-2, 0.0, 10)
  wd = optax.exponential_decay(0.1, 1, 0.5)
  params = jnp.ones(2)
  for make, omake in ((adamfx.adamw, optax.adamw), (adamfx.nadamw, optax.nadamw)):
    tx, otx = make(sched, weight_decay=wd), omake(sched, weight_decay=wd)
    s = tx.init(params)
    with optax_promotion():
      os_ = otx.init(params)
    for _ in range(4):
      u, s = jax.jit(tx.update)(jnp.array([1.0, -1.0]), s, params)
      with optax_promotion():
        ou, os_ = jax.jit(otx.update)(jnp.array([1.0, -1.0]), os_, params)
      np.testing.assert_allclose(u, ou, rtol=1e-6)


def test_eager_updates_with_array_hyperparameters():
  """Eager (unjitted) updates with an array learning rate, and eager
  inject_hyperparams (whose hyperparameters are arrays), match optax. (The
  eager fast path once branched on a traced flag here and raised
  TracerBoolConversionError.)"""
  params = jnp.array([1.0, -2.0, 3.0])
  g = jnp.array([0.5, -1.0, 2.0])
  cases = [
      (adamfx.adam(jnp.float32(1e-2)), optax.adam(jnp.float32(1e-2))),
      (adamfx.inject_hyperparams(adamfx.adam)(1e-2), optax.inject_hyperparams(optax.adam)(1e-2)),
      (
          optax.inject_hyperparams(adamfx.adamw)(1e-2, weight_decay=0.1),
          optax.inject_hyperparams(optax.adamw)(1e-2, weight_decay=0.1),
      ),
      (adamfx.adamax(np.float32(1e-2)), optax.adamax(np.float32(1e-2))),
  ]
  for tx, otx in cases:
    s = tx.init(params)
    with optax_promotion():
      os_ = otx.init(params)
    for _ in range(2):
      u, s = tx.update(g, s, params)
      with optax_promotion():
        ou, os_ = otx.update(g, os_, params)
      np.testing.assert_allclose(u, ou, rtol=1e-6)


@pytest.mark.parametrize('value', [jnp.asarray(-1.0), np.float32(-1.0), np.asarray(-1.0)],
                         ids=['jax', 'numpy_scalar', 'numpy_0d'])
def test_concrete_array_hyperparameters_are_checked(value):
  """adam(1e-2, eps=jnp.asarray(-1.)) used to train silently wrong."""
  with pytest.raises(ValueError, match='`eps` must be >= 0'):
    adamfx.adam(1e-2, eps=value)
  with pytest.raises(ValueError, match='`b2` must be in'):
    adamfx.adam(1e-2, b2=jnp.asarray(1.0))
  with pytest.raises(ValueError, match='`learning_rate` must be >= 0'):
    adamfx.adam(jnp.asarray(-1e-2))


@pytest.mark.parametrize('kwargs', [dict(b2=1.0), dict(eps=-1.0), dict(eps=float('nan')),
                                    dict(b1=jnp.asarray(1.5))])
def test_inject_hyperparams_checks_concrete_values_when_called(kwargs):
  """inject_hyperparams(adam)(b2=1.0) used to run as SGD with momentum."""
  with pytest.raises(ValueError, match=f'`{next(iter(kwargs))}`'):
    adamfx.inject_hyperparams(adamfx.adam)(learning_rate=1e-2, **kwargs)


@pytest.mark.parametrize('which', ['b1', 'b2', 'eps', 'eps_root'])
def test_traced_invalid_hyperparameters_give_nan(which):
  bad = {'b1': 1.0, 'b2': 1.0, 'eps': -1.0, 'eps_root': float('nan')}[which]
  g = jnp.asarray([0.5, -2.0, 1.0])

  def step(value):
    tx = adamfx.adam(1e-2, **{which: value})
    return tx.update(g, tx.init(g), g)[0]

  assert bool(jnp.all(jnp.isnan(jax.jit(step)(jnp.float32(bad)))))
  ok = {'b1': 0.9, 'b2': 0.999, 'eps': 1e-8, 'eps_root': 0.0}[which]
  assert bool(jnp.all(jnp.isfinite(jax.jit(step)(jnp.float32(ok)))))


@pytest.mark.parametrize('state', [None, optax.sgd(0.1, momentum=0.9).init(jnp.ones(3)),
                                   optax.EmptyState()], ids=['None', 'sgd', 'empty'])
@pytest.mark.parametrize('make', [lambda: adamfx.scale_by_adam(),
                                  lambda: adamfx.scale_by_adam8bit(min_8bit_size=1),
                                  lambda: adamfx.scale_by_adamax()],
                         ids=['adam', 'adam8bit', 'adamax'])
def test_update_with_a_foreign_or_missing_state_says_so(make, state):
  with pytest.raises(TypeError, match='state'):
    make().update(jnp.ones(3), state)


def test_float16_decay_message_names_float16():
  wrapped = optax.inject_hyperparams(adamfx.adam)(learning_rate=1e-3)
  params = jnp.ones(3, jnp.float16)
  with optax_promotion(), pytest.raises(TypeError) as info:
    wrapped.update(params, wrapped.init(params), params)
  assert 'float16' in str(info.value) and 'bfloat16' not in str(info.value)


@pytest.mark.parametrize('make', [adamfx.adamw, adamfx.adamw8bit])
def test_adamw_wrong_mask_names_mask(make):
  params = {'a': jnp.ones(3), 'b': jnp.ones(2)}
  with pytest.raises(ValueError, match='`mask`'):
    make(1e-2, mask={'a': True}).init(params)
  state = make(1e-2).init(params)
  with pytest.raises(ValueError, match='`mask`'):
    make(1e-2, mask={'a': True}).update(params, state, params)


def test_inject_hyperparams_of_optax_adam_keeps_bfloat16_updates():
  params = jnp.ones(3, jnp.bfloat16)
  tx = adamfx.inject_hyperparams(optax.adam)(learning_rate=1e-3)
  with optax_promotion():
    updates, _ = tx.update(params, tx.init(params), params)
  assert updates.dtype == jnp.bfloat16


@pytest.mark.parametrize('state', [None, optax.sgd(0.1, momentum=0.9).init(jnp.ones(3))],
                         ids=['None', 'sgd'])
@pytest.mark.parametrize('make', [adamfx.adam, adamfx.adamw, adamfx.adamax, adamfx.adam8bit])
def test_chain_update_with_a_foreign_or_missing_state_says_so(make, state):
  with pytest.raises(TypeError, match='state'):
    make(1e-2).update(jnp.ones(3), state, jnp.ones(3))


def test_adamw8bit_update_with_a_missing_state_says_so():
  with pytest.raises(TypeError, match='state'):
    adamfx.adamw8bit(1e-2).update(jnp.ones(3), None, jnp.ones(3))


@pytest.mark.parametrize('which', ['learning_rate', 'weight_decay'])
def test_traced_negative_learning_rate_or_decay_gives_nan(which):
  """A traced negative rate would ascend with finite steps: NaN instead."""
  g = jnp.asarray([0.5, -2.0, 1.0])

  def step(value):
    kwargs = {'learning_rate': 1e-2, 'weight_decay': 1e-4, which: value}
    tx = adamfx.adamw(**kwargs)
    return tx.update(g, tx.init(g), g)[0]

  for bad in (-1e-2, float('nan'), float('inf')):
    assert bool(jnp.all(jnp.isnan(jax.jit(step)(jnp.float32(bad))))), bad
  assert bool(jnp.all(jnp.isfinite(jax.jit(step)(jnp.float32(1e-3)))))
