"""Stable steps (adamfx/_core/stable.py): update clipping, cautious updates, decouple_lr.

References, none of them adamfx's own code:
- torch-optimi (optional: skipped without torch/optimi): ``StableAdamW`` and
  ``AdamW(decouple_lr=True)``, in float64 against adamfx under x64 (1e-9
  relative over 300 steps) and in float32 step by step (params synced after
  each step: a step differs by at most 2 ulps of the leaf's largest param).
- ``reference.Stable``: a float64 NumPy transcription of StableAdamW's
  Algorithm 1 and of the cautious reference code (Liang et al. 2024),
  1e-10 relative under x64.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from conftest import optax_promotion

import adamfx

STEPS = 300
SHAPES = [(8, 16), (5,)]


def _spiky_grads(k, shapes=SHAPES, seed=1000):
  """Gradients of a calm phase (scale 1e-3), a burst at 150-157 (scale 1), a
  moderate phase (1e-2) and a single 30x spike at step 220."""
  rng = np.random.default_rng(seed + k)
  scale = 1e-3 if k < 150 else (1.0 if k < 158 else 1e-2)
  if k == 220:
    scale = 30.0
  return [scale * rng.normal(size=s) for s in shapes]


def _params0(shapes=SHAPES):
  rng = np.random.default_rng(0)
  return [rng.normal(size=s) for s in shapes]


def _schedule(steps, lr, xp, dtype):
  """Warmup then cosine, written for NumPy (torch) and jnp (adamfx) alike."""
  def fn(count):
    c = xp.asarray(count, dtype)
    return lr * xp.minimum(1.0, (c + 1) / 50) * (0.5 + 0.5 * xp.cos(math.pi / steps * c))
  return fn


# ---------------------------------------------------------------- optimi


def _optimi():
  torch = pytest.importorskip('torch')
  optimi = pytest.importorskip('optimi')
  return torch, optimi


def _builders():
  """(name, optimi class name, adamfx factory(lr, wd, decouple, max_lr))."""
  return [
      ('stable_adamw', 'StableAdamW',
       lambda lr, wd, dec, mx: adamfx.stable_adamw(lr, weight_decay=wd, decouple_lr=dec,
                                                   max_lr=mx)),
      ('adamw', 'AdamW',
       lambda lr, wd, dec, mx: adamfx.adamw(lr, b2=0.99, eps=1e-6, weight_decay=wd,
                                            decouple_lr=dec, max_lr=mx)),
      # lazy_adamw on dense gradients, with the clipping: StableAdamW's numbers.
      ('lazy_adamw_clip', 'StableAdamW',
       lambda lr, wd, dec, mx: adamfx.lazy_adamw(lr, b2=0.99, eps=1e-6, weight_decay=wd,
                                                 update_clipping=True, decouple_lr=dec,
                                                 max_lr=mx)),
      ('lazy_adamw', 'AdamW',
       lambda lr, wd, dec, mx: adamfx.lazy_adamw(lr, b2=0.99, eps=1e-6, weight_decay=wd,
                                                 decouple_lr=dec, max_lr=mx)),
      # torch_adamw's update clipping is StableAdamW in torch's order of
      # operations (decay first, then the step); it has no decouple_lr.
      ('torch_adamw_clip', 'StableAdamW',
       lambda lr, wd, dec, mx: adamfx.torch_adamw(lr, betas=(0.9, 0.99), eps=1e-6,
                                                  weight_decay=wd, update_clipping=True)),
  ]


_BUILDERS = {name: (cls, make) for name, cls, make in _builders()}


def _run_against_optimi(name, x64, decouple, schedule, *, sync, steps=STEPS, lr=3e-3):
  """Runs optimi and adamfx side by side; returns per-leaf (max |diff|, max |p|).

  With ``sync``, adamfx's params are reset to optimi's after every step
  (the moments run independently), and the largest one-step difference in
  ulps of the leaf's largest param is returned instead.
  """
  torch, optimi = _optimi()
  cls, make = _BUILDERS[name]
  tdt, jdt = (torch.float64, jnp.float64) if x64 else (torch.float32, jnp.float32)
  ndt = np.float64 if x64 else np.float32
  wd = 1e-3 if decouple else 0.1
  p0 = _params0()
  tp = [torch.tensor(p, dtype=tdt, requires_grad=True) for p in p0]
  max_lr = lr if (decouple and schedule) else None
  opt = getattr(optimi, cls)(tp, lr=lr, weight_decay=wd, decouple_lr=decouple, max_lr=max_lr,
                             foreach=False, triton=False,
                             **({'betas': (0.9, 0.99), 'eps': 1e-6} if cls == 'AdamW' else {}))
  torch_lr = _schedule(steps, lr, np, ndt) if schedule else (lambda c: lr)
  worst = 0.0
  with jax.enable_x64(x64):
    learning_rate = _schedule(steps, lr, jnp, jdt) if schedule else lr
    tx = make(learning_rate, wd, decouple, max_lr)
    params = [jnp.asarray(p, jdt) for p in p0]
    state = tx.init(params)
    step = jax.jit(tx.update)
    for k in range(steps):
      g = _spiky_grads(k)
      for t, gk in zip(tp, g):
        t.grad = torch.tensor(gk, dtype=tdt)
      for group in opt.param_groups:
        group['lr'] = float(torch_lr(k))
      opt.step()
      u, state = step([jnp.asarray(gk, jdt) for gk in g], state, params)
      params = optax.apply_updates(params, u)
      if sync:
        for t, p in zip(tp, params):
          want = t.detach().numpy()
          ulp = np.spacing(np.max(np.abs(want)))
          worst = max(worst, float(np.max(np.abs(want - np.asarray(p))) / ulp))
        params = [jnp.asarray(t.detach().numpy()) for t in tp]
    if sync:
      return worst
    return [(float(np.max(np.abs(t.detach().numpy() - np.asarray(p)))),
             float(np.max(np.abs(t.detach().numpy())))) for t, p in zip(tp, params)]


def _optimi_cases(default):
  """Every (builder, decay mode, schedule); those not in ``default`` run in
  the slow suite (.ci/run), to keep the default run short."""
  cases = []
  for n in _BUILDERS:
    for d in ((False,) if n.startswith('torch_') else (False, True)):
      for s in (False, True):
        name = f'{n}-{"decouple_lr" if d else "decoupled"}-{"schedule" if s else "const"}'
        marks = () if name in default else (pytest.mark.slow,)
        cases.append(pytest.param(n, d, s, id=name, marks=marks))
  return cases


_F64_DEFAULT = {'stable_adamw-decoupled-const', 'stable_adamw-decouple_lr-schedule',
                'adamw-decouple_lr-schedule', 'torch_adamw_clip-decoupled-schedule'}
_F32_DEFAULT = {'stable_adamw-decouple_lr-schedule', 'torch_adamw_clip-decoupled-schedule'}


@pytest.mark.parametrize('name,decouple,schedule', _optimi_cases(_F64_DEFAULT))
def test_optimi_float64(name, decouple, schedule):
  """300 steps with a burst and a spike: 1e-9 relative to optimi in float64.

  adamfx keeps biased moments and divides by 1 - b**t, optimi keeps debiased
  ones (its beta_hat recursion): equal in exact arithmetic, so the float64
  runs agree to rounding (measured <= 2e-13 relative to the leaf's largest
  param); 1e-9 leaves room for other BLAS/libm, not for a wrong operation
  (a clip factor on the step only, or the decay unscaled, is >= 1e-4 off).
  """
  for diff, top in _run_against_optimi(name, True, decouple, schedule, sync=False):
    assert diff <= 1e-9 * top, (diff, top)


@pytest.mark.parametrize('name,decouple,schedule', _optimi_cases(_F32_DEFAULT))
def test_optimi_float32_step_by_step(name, decouple, schedule):
  """float32: from the same params, a step is optimi's to 2 ulps of the leaf.

  optimi decays first (``p *= 1 - lr*wd``) and then adds the Adam step, adamfx
  adds ``-lr * (u + wd * p)`` once: one rounding of ``p`` apart (measured: 1
  ulp). Over 300 unsynced steps these roundings random-walk (~70 ulps), so
  the float32 check is per step.
  """
  assert _run_against_optimi(name, False, decouple, schedule, sync=True) <= 2.0


# ----------------------------------------------------- float64 reference


def _ref_run(opt, params, grads_fn, steps):
  return reference.run(opt, params, grads_fn, steps)


def _adamfx_run(tx, params, grads_fn, steps, *, jit=True, dtype=jnp.float64):
  params = [jnp.asarray(p, dtype) for p in params]
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  history = [[] for _ in params]
  for k in range(steps):
    g = [jnp.asarray(x, dtype) for x in grads_fn(k, [np.asarray(p) for p in params])]
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    for h, x in zip(history, u):
      h.append(np.asarray(x))
  return [np.asarray(p) for p in params], [np.stack(h) for h in history], state


def _noisy_quadratic(k, params):
  """A quadratic's gradient plus noise of its own scale: signs flip often, so
  the cautious mask keeps part of each tensor (30-80%)."""
  rng = np.random.default_rng(77 + k)
  scale = 10.0 if k in (25, 26) else 1.0  # a spike, for the clipping
  return [scale * (0.5 * p - 0.2 + 0.5 * rng.normal(size=p.shape)) for p in params]


def _linear_x64(count):
  # optax.linear_schedule rounds through float32; this one stays in float64.
  return 1e-2 + (1e-3 - 1e-2) * jnp.minimum(count, 40).astype(jnp.float64) / 40


_REF_CASES = {
    'adam_cautious': (lambda: adamfx.adam(1e-2, cautious=True),
                      dict(cautious=True)),
    'adamw_cautious': (lambda: adamfx.adamw(1e-2, weight_decay=0.1, cautious=True),
                       dict(cautious=True, weight_decay=0.1)),
    'nadam_cautious': (lambda: adamfx.nadam(1e-2, cautious=True),
                       dict(cautious=True, nesterov=True)),
    'amsgrad_cautious_clip': (lambda: adamfx.amsgrad(1e-2, cautious=True, update_clipping=True),
                              dict(cautious=True, clip=True, amsgrad=True)),
    'adam_clip': (lambda: adamfx.adam(1e-2, update_clipping=True), dict(clip=True)),
    'nadamw_clip_decouple': (
        lambda: adamfx.nadamw(1e-2, weight_decay=1e-3, update_clipping=True, decouple_lr=True),
        dict(clip=True, nesterov=True, weight_decay=1e-3, decouple_lr=True)),
    'stable_adamw_cautious': (
        lambda: adamfx.stable_adamw(1e-2, cautious=True),
        dict(b2=0.99, eps=1e-6, weight_decay=1e-2, clip=True, cautious=True)),
    'stable_adamw_decouple_schedule': (
        lambda: adamfx.stable_adamw(_linear_x64, decouple_lr=True, max_lr=1e-2,
                                    weight_decay=1e-4),
        dict(b2=0.99, eps=1e-6, weight_decay=1e-4, clip=True, decouple_lr=True, max_lr=1e-2)),
}


_REF_DEFAULT = ('adamw_cautious', 'amsgrad_cautious_clip', 'nadamw_clip_decouple',
                'stable_adamw_cautious')


@pytest.mark.parametrize('case', [
    pytest.param(c, marks=() if c in _REF_DEFAULT else (pytest.mark.slow,))
    for c in sorted(_REF_CASES)])
def test_against_float64_reference(case):
  """Every option, alone and combined, on several members: 1e-10 relative (x64)."""
  make, kwargs = _REF_CASES[case]
  kwargs = dict(kwargs)
  lr = 1e-2
  if case == 'stable_adamw_decouple_schedule':
    lr = lambda c: 1e-2 + (1e-3 - 1e-2) * min(c, 40) / 40
  b2, eps = kwargs.pop('b2', 0.999), kwargs.pop('eps', 1e-8)
  opt = reference.Stable(lr, 0.9, b2, eps, **kwargs)
  p0 = _params0()
  want, want_u = _ref_run(opt, p0, _noisy_quadratic, 40)
  with jax.enable_x64(True), optax_promotion():
    got, got_u, _ = _adamfx_run(make(), p0, _noisy_quadratic, 40)
  for g, w in zip(got_u, want_u):
    np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14 * np.max(np.abs(w)))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-10)


def test_cautious_mask_keeps_part_and_clip_fires():
  """The reference cases exercise what they claim: the mask drops part of
  each tensor (down to 30-80% kept), and the clip factor is below 1 at the spike."""
  opt = reference.Stable(1e-2, 0.9, 0.999, 1e-8, cautious=True, clip=True)
  fractions, rms = [], []
  params = [reference._f64(p) for p in _params0()]
  opt.init(params)
  for k in range(40):
    u = opt.step(_noisy_quadratic(k, params), params)
    params = [p + x for p, x in zip(params, u)]
    fractions += opt.last_fraction
    rms += opt.last_rms
  # per-tensor fractions (the 5-element bias is sometimes all agreeing)
  assert 0.2 < min(fractions[4:]) < 0.7 and np.mean(fractions[4:]) < 0.9
  assert max(rms) > 2.0  # the spike at step 25


def test_cautious_float32_and_decay_not_masked():
  """float32 matches the float64 reference to float32 rounding; a zero
  gradient masks the whole direction, and the decay still acts."""
  p0 = _params0()
  opt = reference.Stable(1e-2, 0.9, 0.999, 1e-8, cautious=True, weight_decay=0.1)
  want, _ = _ref_run(opt, p0, _noisy_quadratic, 10)
  got, _, _ = _adamfx_run(adamfx.adamw(1e-2, weight_decay=0.1, cautious=True), p0,
                          _noisy_quadratic, 10, dtype=jnp.float32)
  for g, w in zip(got, want):
    # float32: ~10 steps of O(lr) updates on O(1) params, a few ulps each.
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  tx = adamfx.adamw(1e-2, weight_decay=0.1, cautious=True)
  params = jnp.ones(4)
  state = tx.init(params)
  u, state = tx.update(jnp.ones(4), state, params)
  u, _ = tx.update(jnp.zeros(4), state, params)  # g = 0: no coordinate agrees
  np.testing.assert_allclose(u, -1e-2 * 0.1 * np.ones(4), rtol=1e-6)


def test_cautious_floor_on_rescale():
  """mean(mask) is floored at 1e-3: one agreeing coordinate of 10000 is
  scaled by 1000, not 10000 (the paper's code would divide by the mean)."""
  tx = adamfx.scale_by_adam(b1=0.0, cautious=True)
  n = 10000
  state = tx.init(jnp.zeros(n))
  g = jnp.zeros(n).at[0].set(1.0)
  u, _ = tx.update(g, state)
  assert float(u[0]) == pytest.approx(1000.0, rel=1e-5)
  assert float(jnp.sum(jnp.abs(u[1:]))) == 0.0


def test_eight_bit_small_leaves_and_lazy_dense_match_the_reference():
  """adam8bit's leaves below min_8bit_size keep float32 moments: its options
  are the reference's to float32 rounding; lazy_adam on dense gradients too."""
  p0 = _params0()
  opt = reference.Stable(1e-2, 0.9, 0.999, 1e-8, cautious=True, clip=True)
  want, _ = _ref_run(opt, p0, _noisy_quadratic, 30)
  for tx in (adamfx.adam8bit(1e-2, cautious=True, update_clipping=True),
             adamfx.lazy_adam(1e-2, cautious=True, update_clipping=True)):
    got, _, _ = _adamfx_run(tx, p0, _noisy_quadratic, 30, dtype=jnp.float32)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_lazy_row_sparse():
  """RowSparse gradients on a fixed set of rows. Clipping: untouched rows
  count as zeros in the mean, so the step equals dense update clipping on
  the densified gradient (those rows' moments stay 0). Cautious: the mean is
  over the touched rows, so the touched rows step as the reference on them alone."""
  rows = np.array([1, 4, 5])
  table = _params0([(8, 3)])[0]

  def dense_grads(k, params):
    g = np.zeros((8, 3))
    g[rows] = _noisy_quadratic(k, [params[0][rows]])[0]
    return [g]

  def sparse(k, params):
    g = dense_grads(k, params)[0]
    # rows given twice, halves summed by the lazy step: coalesced first
    ids = jnp.asarray(np.concatenate([rows, rows]))
    vals = jnp.asarray(np.concatenate([g[rows] / 2, g[rows] / 2]))
    return adamfx.RowSparse(ids, vals, num_rows=8)

  def run_sparse(tx, steps):
    with jax.enable_x64(True):
      params = jnp.asarray(table)
      state = tx.init(params)
      update = jax.jit(tx.update)
      for k in range(steps):
        u, state = update(sparse(k, [np.asarray(params)]), state, params)
        params = optax.apply_updates(params, u)
      return np.asarray(params)

  want, _ = _ref_run(reference.Stable(1e-2, clip=True), [table], dense_grads, 30)
  got = run_sparse(adamfx.lazy_adam(1e-2, update_clipping=True), 30)
  np.testing.assert_allclose(got, want[0], rtol=1e-10)

  sub = lambda k, params: [_noisy_quadratic(k, [params[0]])[0]]
  want_rows, _ = _ref_run(reference.Stable(1e-2, cautious=True, weight_decay=0.1),
                          [table[rows]], sub, 30)
  got = run_sparse(adamfx.lazy_adamw(1e-2, cautious=True, weight_decay=0.1), 30)
  np.testing.assert_allclose(got[rows], want_rows[0], rtol=1e-10)
  untouched = np.setdiff1d(np.arange(8), rows)
  np.testing.assert_array_equal(got[untouched], table[untouched])


# --------------------------------------------------------------- spikes


def _spike_steps(tx, calm=2000, spike=3, lr=1e-3):
  """Max |update| / lr over ``spike`` steps of g = 1 after ``calm`` steps of g = 1e-3."""
  params = jnp.zeros((4, 64))
  gs = jnp.concatenate([jnp.full((calm,), 1e-3), jnp.full((spike,), 1.0)])

  def body(carry, g):
    p, s = carry
    u, s = tx.update(jnp.full_like(p, g), s, p)
    return (optax.apply_updates(p, u), s), jnp.max(jnp.abs(u)) / lr

  _, steps = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), gs))(params)
  return np.asarray(steps[calm:])


_SPIKE_MEMBERS = {
    'stable_adamw': lambda: adamfx.stable_adamw(1e-3, b2=0.999, weight_decay=0.0),
    'adam': lambda: adamfx.adam(1e-3, update_clipping=True),
    'nadam': lambda: adamfx.nadam(1e-3, update_clipping=True),
    'amsgrad': lambda: adamfx.amsgrad(1e-3, update_clipping=True),
    'adam8bit': lambda: adamfx.adam8bit(1e-3, update_clipping=True, min_8bit_size=256),
    'lazy_adam': lambda: adamfx.lazy_adam(1e-3, update_clipping=True),
    'adamw_cautious': lambda: adamfx.adamw(1e-3, update_clipping=True, cautious=True,
                                           weight_decay=0.0),
}


def test_spike_adamw_jumps_to_3x_lr():
  """After a long calm phase at b2 = 0.999, a 1000x gradient makes AdamW's
  step m_hat / sqrt(v_hat) ~ 0.1 / sqrt(1e-3) ~ 3.2 lr (the paper's spike)."""
  steps = _spike_steps(adamfx.adamw(1e-3, b2=0.999, weight_decay=0.0))
  assert 2.8 < steps[0] < 3.5, steps


@pytest.mark.parametrize('name', [
    pytest.param(n, marks=() if n in ('stable_adamw', 'adam8bit', 'lazy_adam')
                 else (pytest.mark.slow,)) for n in sorted(_SPIKE_MEMBERS)])
def test_spike_update_clipping_stays_within_lr(name):
  """The same spike with update clipping: within the learning rate."""
  steps = _spike_steps(_SPIKE_MEMBERS[name]())
  assert np.all(steps <= 1.0), steps


# --------------------------------------------------------------- errors


def test_decouple_lr_with_a_schedule_needs_max_lr():
  sched = optax.cosine_decay_schedule(1e-3, 100)
  for make in (adamfx.adamw, adamfx.nadamw, adamfx.adamw8bit, adamfx.lazy_adamw,
               adamfx.stable_adamw):
    with pytest.raises(ValueError, match='decouple_lr=True with a schedule.*needs `max_lr`'):
      make(sched, decouple_lr=True)
    make(sched, decouple_lr=True, max_lr=1e-3)  # fine with it
  with pytest.raises(ValueError, match='needs `max_lr`'):
    adamfx.inject_hyperparams(adamfx.adamw)(sched, decouple_lr=True)


def test_bad_options_are_refused():
  with pytest.raises(ValueError, match=r'`max_lr`=0.1 is only used with decouple_lr=True'):
    adamfx.adamw(1e-3, max_lr=0.1)
  with pytest.raises(ValueError, match=r'`max_lr` must be a finite number > 0, got 0.0'):
    adamfx.adamw(1e-3, decouple_lr=True, max_lr=0.0)
  with pytest.raises(ValueError, match=r'`max_lr` must be a finite number > 0, got 0.0'):
    adamfx.adamw(0.0, decouple_lr=True)  # max_lr defaults to the learning rate
  with pytest.raises(TypeError, match='`cautious` must be a Python bool'):
    adamfx.adam(1e-3, cautious=1)
  with pytest.raises(TypeError, match='`update_clipping` must be a Python bool'):
    adamfx.adam8bit(1e-3, update_clipping=jnp.asarray(True))
  with pytest.raises(ValueError, match='`weight_decay` must be'):
    adamfx.stable_adamw(1e-3, weight_decay=-1.0)


def test_traced_invalid_max_lr_gives_nan():
  tx = adamfx.inject_hyperparams(adamfx.adamw)(1e-3, decouple_lr=True, max_lr=1e-3)
  params = jnp.ones(3)
  state = tx.init(params)
  state.hyperparams['max_lr'] = jnp.asarray(-1.0)
  u, _ = jax.jit(tx.update)(jnp.ones(3), state, params)
  assert np.all(np.isnan(np.asarray(u)))


def test_decouple_lr_matches_optax_with_rescaled_decay():
  """decouple_lr is AdamW with weight_decay / max_lr (optax as the reference),
  with the injected learning rate changing and max_lr held."""
  inj = adamfx.inject_hyperparams(adamfx.adamw)(1e-2, weight_decay=1e-3, decouple_lr=True,
                                                max_lr=1e-2)
  ref = optax.inject_hyperparams(optax.adamw)(1e-2, weight_decay=1e-3 / 1e-2)
  params = {'w': jnp.asarray(_params0()[0], jnp.float32)}
  s1, s2 = inj.init(params), ref.init(params)
  p1 = p2 = params
  for k in range(5):
    g = {'w': jnp.asarray(_noisy_quadratic(k, [np.asarray(p1['w'])])[0], jnp.float32)}
    s1.hyperparams['learning_rate'] = jnp.asarray(1e-2 / (k + 1), jnp.float32)
    s2.hyperparams['learning_rate'] = jnp.asarray(1e-2 / (k + 1), jnp.float32)
    u1, s1 = inj.update(g, s1, p1)
    with optax_promotion():
      u2, s2 = ref.update(g, s2, p2)
    np.testing.assert_allclose(u1['w'], u2['w'], rtol=2e-6, atol=1e-9)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)


# ---------------------------------------------------------- diagnostics


def test_diagnostics_report_clip_factor_and_cautious_fraction():
  p0 = _params0()
  opt = reference.Stable(1e-2, 0.9, 0.99, 1e-6, cautious=True, clip=True)
  params = [reference._f64(p) for p in p0]
  opt.init(params)
  with jax.enable_x64(True):
    tx = adamfx.stable_adamw(1e-2, weight_decay=0.0, cautious=True)
    jp = [jnp.asarray(p) for p in p0]
    state = tx.init(jp)
    update = jax.jit(tx.update)
    for k in range(27):
      g = _noisy_quadratic(k, params)
      u = opt.step(g, params)
      params = [p + x for p, x in zip(params, u)]
      ju, state = update([jnp.asarray(x) for x in g], state, jp)
      jp = optax.apply_updates(jp, ju)
    d = adamfx.adam_diagnostics(state, ju, 1e-2, b1=0.9, b2=0.99, eps=1e-6,
                                grads=[jnp.asarray(x) for x in g], quantiles=())
  assert float(d['stable_rms_max']) == pytest.approx(max(opt.last_rms), rel=1e-10)
  assert float(d['clip_factor_min']) == pytest.approx(1 / max(1, max(opt.last_rms)), rel=1e-10)
  sizes = [p.size for p in p0]
  frac = sum(f * n for f, n in zip(opt.last_fraction, sizes)) / sum(sizes)
  assert float(d['cautious_fraction']) == pytest.approx(frac, rel=1e-6)
  rms = math.sqrt(sum(float(np.sum((x / 1e-2) ** 2)) for x in u) / sum(sizes))
  assert float(d['update_rms']) == pytest.approx(rms, rel=1e-10)
