# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Adam from first principles
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/adamfx/adamfx/blob/main/notebooks/02_adam_from_first_principles.ipynb)
#
# Adam's reasoning, numerically verified.

# %%
# In Colab, install adamfx from its repository; anywhere else this cell does
# nothing (locally: `pip install -e ".[notebooks]"` from the checkout).
import sys

if 'google.colab' in sys.modules:
  import subprocess

  subprocess.run(
      [sys.executable, '-m', 'pip', 'install', '-q',
       'adamfx[notebooks] @ git+https://github.com/adamfx/adamfx'],
      check=True,
  )

# %% [markdown]
# Kingma & Ba (2015) justify each piece of Adam with a short argument. This notebook checks each
# argument numerically, with adamfx doing the optimisation and NumPy doing the algebra, and
# asserts the numbers so that the test suite catches a regression. Notation: gradient $g_t$,
# moments $m_t, v_t$, decays $\beta_1, \beta_2$ (`b1`, `b2`), learning rate $\alpha$ (`lr`).
#
# $$m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
# \hat m_t = \frac{m_t}{1-\beta_1^t},\quad \hat v_t = \frac{v_t}{1-\beta_2^t},\quad
# \Delta_t = -\alpha\,\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}.$$

# %%
import math

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import adamfx

b1, b2, eps = 0.9, 0.999, 1e-8


def run_adam(tx, grads, params=None):
  """Feeds a (T, ...) array of gradients to `tx`; returns the updates and states, per step."""
  params = jnp.zeros(grads.shape[1:]) if params is None else params

  def body(state, g):
    updates, state = tx.update(g, state, params)
    return state, (updates, state)

  _, (updates, states) = jax.lax.scan(body, tx.init(params), grads)
  return updates, states


# %% [markdown]
# ## 1. The moments are exponential moving averages
#
# Unrolling the recursion from $m_0 = v_0 = 0$:
#
# $$m_t = (1-\beta_1)\sum_{i=1}^{t} \beta_1^{\,t-i} g_i, \qquad
# v_t = (1-\beta_2)\sum_{i=1}^{t} \beta_2^{\,t-i} g_i^2 .$$
#
# The newest gradient ($i = t$) has weight $1-\beta$, and older ones decay geometrically. Check it
# against the state adamfx keeps:

# %%
rng = np.random.default_rng(0)
T = 300
g = rng.normal(0.5, 1.0, size=T)
_, states = run_adam(adamfx.scale_by_adam(b1, b2), jnp.asarray(g, jnp.float32))

t = np.arange(1, T + 1)
m_sum = np.array([(1 - b1) * np.sum(b1 ** (k - np.arange(1, k + 1)) * g[:k]) for k in t])
v_sum = np.array([(1 - b2) * np.sum(b2 ** (k - np.arange(1, k + 1)) * g[:k] ** 2) for k in t])
np.testing.assert_allclose(states.mu, m_sum, rtol=1e-4, atol=1e-6)
np.testing.assert_allclose(states.nu, v_sum, rtol=1e-4)

fig, ax = plt.subplots(figsize=(8, 3))
ax.plot(t, g, '.', ms=3, alpha=0.4, label='$g_t$ ~ N(0.5, 1)')
ax.plot(t, states.mu, label='$m_t$ (adamfx state)')
ax.plot(t, m_sum, '--', label=r'$(1-\beta_1)\sum \beta_1^{t-i} g_i$')
ax.plot(t, states.nu, label='$v_t$ (adamfx state)')
ax.axhline(1.25, color='gray', lw=0.5)
ax.set_xlabel('t'); ax.legend(fontsize=8); plt.show()

# %% [markdown]
# ## 2. ... and they are biased towards zero at the start
#
# Both averages start at 0, so early on they underestimate. With a constant gradient $g$,
# $v_t = (1-\beta_2^t)\,g^2$: after 10 steps at $\beta_2 = 0.999$, $v_t$ is 1% of $g^2$. Left
# uncorrected, the ratio $m_t/\sqrt{v_t} = (1-\beta_1^t)/\sqrt{1-\beta_2^t}$ starts at 3.16 and
# peaks far above 1: the first steps would be several times too large.

# %%
T = 2000
_, states = run_adam(adamfx.scale_by_adam(b1, b2), jnp.ones((T, 1)))
t = np.arange(1, T + 1)
nu = np.asarray(states.nu[:, 0])
np.testing.assert_allclose(nu, 1 - b2 ** t, rtol=2e-4)  # float32 accumulation over 2000 steps

raw_ratio = np.asarray(states.mu[:, 0]) / np.sqrt(nu)
corrected = raw_ratio * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
print(f'uncorrected m/sqrt(v): {raw_ratio[0]:.2f} at t=1, max {raw_ratio.max():.2f} at t={raw_ratio.argmax() + 1}')
assert abs(raw_ratio[0] - (1 - b1) / math.sqrt(1 - b2)) < 1e-3 and raw_ratio.max() > 5
np.testing.assert_allclose(corrected, 1.0, rtol=1e-3)

fig, ax = plt.subplots(figsize=(8, 3))
ax.semilogx(t, raw_ratio, label=r'uncorrected $m_t/\sqrt{v_t}$')
ax.semilogx(t, corrected, label=r'corrected $\hat m_t/\sqrt{\hat v_t}$')
ax.set_xlabel('t (constant gradient)'); ax.legend(); plt.show()

# %% [markdown]
# ## 3. The bias correction, from the geometric series
#
# Take expectations of the unrolled $v_t$ with a stationary $E[g_i^2] = E[g^2]$:
#
# $$E[v_t] = E\Big[(1-\beta_2)\sum_{i=1}^t \beta_2^{\,t-i} g_i^2\Big]
# = E[g^2]\,(1-\beta_2)\sum_{i=1}^t \beta_2^{\,t-i}
# = E[g^2]\,(1-\beta_2)\,\frac{1-\beta_2^{\,t}}{1-\beta_2} = E[g^2]\,(1-\beta_2^{\,t}).$$
#
# The weights are $\beta_2^{\,t-i}$ (the newest gradient has weight $\beta_2^0$) and they sum to
# $(1-\beta_2^t)/(1-\beta_2)$; dividing by $1-\beta_2^t$ removes the bias. (With a
# non-stationary $E[g_i^2]$ an extra term $\zeta$ appears, small when $\beta_2$ gives old
# gradients little weight.) Check the identity, then the expectation by Monte Carlo: Adam acts
# coordinate-wise, so 20,000 coordinates are 20,000 independent runs.

# %%
for t_ in (1, 10, 100, 5000):
  weights = b2 ** (t_ - np.arange(1, t_ + 1))
  assert abs((1 - b2) * weights.sum() - (1 - b2 ** t_)) < 1e-12

n_runs, T = 20_000, 50
g = jax.random.normal(jax.random.PRNGKey(1), (T, n_runs)) + 0.5  # E[g^2] = 1.25
_, states = run_adam(adamfx.scale_by_adam(b1, b2), g)
v_raw = np.asarray(states.nu[-1], np.float64)
v_hat = v_raw / (1 - b2 ** T)
sem = v_hat.std() / math.sqrt(n_runs)
print(f'E[g^2] = 1.25 | mean v_t = {v_raw.mean():.4f} (biased) | mean v_hat = {v_hat.mean():.4f} +- {sem:.4f}')
assert abs(v_hat.mean() - 1.25) < 4 * sem
assert v_raw.mean() < 0.1

# %% [markdown]
# ## 4. Invariance to the gradient's scale
#
# Multiplying every gradient by $c$ multiplies $\hat m_t$ by $c$ and $\sqrt{\hat v_t}$ by $|c|$:
# the update does not change, exactly so with $\epsilon = 0$ and to within
# $\epsilon/\sqrt{\hat v_t}$ otherwise. When the gradient is so small that $\epsilon$ dominates,
# the invariance breaks and the steps shrink; the diagnostics report how often that happens.

# %%
g = jax.random.normal(jax.random.PRNGKey(2), (100, 1000))
tx = adamfx.adam(1e-3, eps=0.0)  # eps = 0: the invariance is exact
ref, _ = run_adam(tx, g)
for c in (2.0**-20, 2.0**20):  # powers of two: every operation is exact, so bit for bit
  scaled, _ = run_adam(tx, c * g)
  assert bool(jnp.all(scaled == ref))
  print(f'c = 2**{int(math.log2(c))}: identical updates, bit for bit')
for c in (1e-3, 1e3, -10.0):  # otherwise, to float32 rounding
  scaled, _ = run_adam(tx, c * g)
  # atol 1e-6 * lr: where m_t nearly cancels, rounding is relative to lr, not to the update.
  np.testing.assert_allclose(scaled * np.sign(c), ref, rtol=1e-5, atol=1e-9)
  print(f'c = {c:g}: the same updates to float32 rounding')

tx = adamfx.adam(1e-3)  # the default eps = 1e-8
ref, _ = run_adam(tx, g)
tiny, states = run_adam(tx, 1e-10 * g)
d = adamfx.adam_diagnostics(jax.tree.map(lambda s: s[-1], states), quantiles=())
ratio = float(jnp.mean(jnp.abs(tiny[-1])) / jnp.mean(jnp.abs(ref[-1])))
print(f'c = 1e-10: steps are {ratio:.3f} of the unscaled ones; eps dominates on '
      f'{float(d["eps_dominated_fraction"]):.0%} of coordinates')
assert ratio < 0.05 and float(d['eps_dominated_fraction']) == 1.0

# %% [markdown]
# ## 5. How large can a step be?
#
# The paper (section 2.1) bounds the effective step $|\Delta_t|/\alpha = |\hat m_t|/\sqrt{\hat v_t}$
# approximately: $\le 1$ in common cases, and $\le (1-\beta_1)/\sqrt{1-\beta_2} \approx 3.16$ in the
# worst case, "a sparse gradient": zero for a long time, then one spike.
#
# **Common case.** For stationary gradients $|E[g]|/\sqrt{E[g^2]} \le 1$, so steps are at most
# about $\alpha$ *on average*. Single steps can exceed $\alpha$, when the short average $\hat m_t$
# (about 10 gradients) fluctuates up against the long one $\hat v_t$ (about 1000): rarely, and far
# below 3.16. Gradients with mean between -1 and 1 and unit noise:

# %%
g = jax.random.normal(jax.random.PRNGKey(3), (1000, 1000)) + jnp.linspace(-1, 1, 1000)
updates, _ = run_adam(adamfx.adam(1.0), g)
steps = np.abs(np.asarray(updates[100:]))  # after the first 100 steps
per_coord = steps.mean(0)
print(f'|step|/lr over 900 steps x 1000 coordinates: time-average per coordinate at most '
      f'{per_coord.max():.3f}; single steps above 1: {np.mean(steps > 1):.2%}, max {steps.max():.3f}')
assert per_coord.max() < 1.0 and np.mean(steps > 1) < 0.01 and steps.max() < (1 - b1) / math.sqrt(1 - b2)

# %% [markdown]
# **Sparse spike.** After $t-1$ zero gradients, one gradient $g$: $m_t = (1-\beta_1) g$,
# $v_t = (1-\beta_2) g^2$, so $|\hat m_t|/\sqrt{\hat v_t} = \frac{1-\beta_1}{\sqrt{1-\beta_2}}
# \cdot\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \to 3.16$ for large $t$.

# %%
t_spike = 10_000
g = jnp.zeros((t_spike, 1)).at[-1].set(5.0)
updates, _ = run_adam(adamfx.adam(1.0), g)
expected = (1 - b1) / math.sqrt(1 - b2) * math.sqrt(1 - b2 ** t_spike) / (1 - b1 ** t_spike)
print(f'spike at t={t_spike}: |step|/lr = {abs(float(updates[-1, 0])):.4f}, formula {expected:.4f}')
np.testing.assert_allclose(abs(float(updates[-1, 0])), expected, rtol=1e-5)

# %% [markdown]
# **The exact bound is larger.** The spike is not the worst case. By Cauchy-Schwarz on the two sums
# of section 1,
#
# $$|m_t| = \Big|\sum_i (1-\beta_1)\beta_1^{t-i} g_i\Big|
# \le \sqrt{\sum_i \frac{(1-\beta_1)^2\beta_1^{2(t-i)}}{(1-\beta_2)\beta_2^{t-i}}}\;
# \sqrt{\sum_i (1-\beta_2)\beta_2^{t-i} g_i^2},$$
#
# so $\dfrac{|\hat m_t|}{\sqrt{\hat v_t}} \le \dfrac{1-\beta_1}{\sqrt{1-\beta_2}}
# \dfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\sqrt{\sum_{k=0}^{t-1}(\beta_1^2/\beta_2)^k}$
# (`adamfx.adam_step_bound`), with equality when $g_i \propto \beta_1^{t-i}/\beta_2^{t-i}$: a
# gradient that **grows geometrically**, by $\beta_2/\beta_1 \approx 1.11$ per step. At the defaults
# the bound tends to $(1-\beta_1)/\sqrt{(1-\beta_2)(1-\beta_1^2/\beta_2)} \approx 7.27$; at
# $t = 3000$ it is about 7.1, more than twice the approximate 3.16.
#
# Construct that history: zero gradients, then 300 steps of growth (the earlier ones would weigh
# $(\beta_1^2/\beta_2)^{300} \approx 10^{-27}$ and would overflow float32 anyway).

# %%
t_end, n_grow = 3000, 300
growth = (b2 / b1) ** np.arange(1, n_grow + 1)
g = np.zeros((t_end, 1))
g[-n_grow:, 0] = growth
results = {}
for name, tx in [('adamfx.adam', adamfx.adam(1.0)), ('optax.adam', optax.adam(1.0))]:
  updates, _ = run_adam(tx, jnp.asarray(g, jnp.float32))
  results[name] = abs(float(updates[-1, 0]))
bound = adamfx.adam_step_bound(t_end)
print(f'geometric growth, t={t_end}: |step|/lr = {results}; exact bound {bound:.4f}; '
      f'approximate bound {(1 - b1) / math.sqrt(1 - b2):.4f}')
for value in results.values():
  np.testing.assert_allclose(value, bound, rtol=1e-4)
assert 7.0 < bound < 7.2

ts = np.unique(np.geomspace(1, 1e5, 200).astype(int))
fig, ax = plt.subplots(figsize=(8, 3))
ax.semilogx(ts, [adamfx.adam_step_bound(int(k)) for k in ts], label='exact bound (geometric growth)')
ax.semilogx(ts, [(1 - b1) / math.sqrt(1 - b2) * math.sqrt(1 - b2 ** k) / (1 - b1 ** k) for k in ts],
            label='sparse spike at step t')
ax.axhline((1 - b1) / math.sqrt(1 - b2), ls='--', color='gray', label='paper: 3.16')
ax.axhline(1, ls=':', color='gray', label='common case: 1')
ax.plot([t_end], [results['adamfx.adam']], 'k*', ms=10, label='adamfx, measured')
ax.set_xlabel('t'); ax.set_ylabel(r'max $|\Delta_t|/\alpha$'); ax.legend(fontsize=8); plt.show()

# %% [markdown]
# Random histories, however wild, stay under the exact bound:

# %%
rng = np.random.default_rng(4)
worst = 0.0
for t_ in (2, 20, 200):
  g = rng.standard_cauchy((t_, 5000)) * np.exp(rng.normal(0, 3, (t_, 5000)))
  updates, _ = run_adam(adamfx.adam(1.0), jnp.asarray(g, jnp.float32))
  ratio = float(jnp.max(jnp.abs(updates[-1]))) / adamfx.adam_step_bound(t_)
  worst = max(worst, ratio)
print(f'largest |step| / exact bound over 15,000 random heavy-tailed histories: {worst:.4f}')
assert worst <= 1 + 1e-5

# %% [markdown]
# ## 6. The signal-to-noise ratio shrinks near an optimum
#
# The paper calls $\hat m_t/\sqrt{\hat v_t}$ the signal-to-noise ratio: far from an optimum the
# gradient's mean dominates its noise and the SNR is near 1; close to it the mean vanishes, the SNR
# shrinks, and so does the step, "a form of automatic annealing". `adamfx.adam_diagnostics`
# computes it inside the jitted loop. A noisy quadratic in 200 dimensions:

# %%
dim, T, lr, noise = 200, 3000, 1e-2, 0.3
curv = jnp.linspace(0.5, 2.0, dim)
w_star = jnp.linspace(2.0, 4.0, dim) * jnp.where(jnp.arange(dim) % 2 == 0, 1.0, -1.0)
tx = adamfx.adam(lr)


@jax.jit
def train(key):
  w = jnp.zeros(dim)

  def body(carry, key):
    w, state = carry
    grad = curv * (w - w_star) + noise * jax.random.normal(key, (dim,))
    updates, state = tx.update(grad, state, w)
    d = adamfx.adam_diagnostics(state, updates, lr, quantiles=(0.5, 0.9))
    return (optax.apply_updates(w, updates), state), (d, jnp.mean(jnp.abs(w - w_star)))

  _, (diag, dist) = jax.lax.scan(body, (w, tx.init(w)), jax.random.split(key, T))
  return diag, dist


diag, dist = train(jax.random.PRNGKey(5))
early, late = float(jnp.mean(diag['snr_mean'][50:150])), float(jnp.mean(diag['snr_mean'][-500:]))
print(f'mean SNR: {early:.2f} while far away (steps 50-150), {late:.2f} near the optimum (last 500)')
print(f'mean |step|/lr: {float(jnp.mean(diag["step_mean"][50:150])):.2f} -> {float(jnp.mean(diag["step_mean"][-500:])):.2f}; '
      f'mean distance to optimum {float(dist[-1]):.3f}')
assert early > 0.6 and late < early / 3 and float(dist[-1]) < 0.1

fig, ax = plt.subplots(figsize=(8, 3))
for key in ('snr_q90', 'snr_mean', 'snr_q50'):
  ax.plot(diag[key], label=key)
ax.plot(dist / dist[0], 'k:', label='distance to optimum (relative)')
ax.set_xlabel('step'); ax.legend(fontsize=8); plt.show()

# %% [markdown]
# ## 7. A non-stationary objective
#
# The moving averages forget: after the optimum jumps, Adam follows it. The second moment
# remembers the larger gradients of the jump for $\sim 1/(1-\beta_2) = 1000$ steps, so the steps
# right after it are smaller than before, which is the cautious behaviour the paper argues for.

# %%
T, jump = 3000, 1500
target = jnp.where(jnp.arange(T) < jump, 1.0, -1.0)
tx = adamfx.adam(1e-2)


@jax.jit
def track(key):
  def body(carry, inp):
    w, state = carry
    tgt, key = inp
    grad = (w - tgt) + 0.1 * jax.random.normal(key, ())
    updates, state = tx.update(grad, state, w)
    return (optax.apply_updates(w, updates), state), w

  w = jnp.zeros(())
  _, ws = jax.lax.scan(body, (w, tx.init(w)), (target, jax.random.split(key, T)))
  return ws


ws = track(jax.random.PRNGKey(6))
err_before = float(jnp.max(jnp.abs(ws[jump - 200:jump] - 1.0)))
err_after = float(jnp.max(jnp.abs(ws[-200:] + 1.0)))
print(f'max tracking error: {err_before:.3f} before the jump, {err_after:.3f} at the end')
assert err_before < 0.1 and err_after < 0.1

fig, ax = plt.subplots(figsize=(8, 3))
ax.plot(target, 'k--', label='optimum'); ax.plot(ws, label='w (adamfx.adam, lr 1e-2)')
ax.set_xlabel('step'); ax.legend(); plt.show()
