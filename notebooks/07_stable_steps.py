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
# # Stable steps: update clipping, cautious updates and fully decoupled decay
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/adamfx/adamfx/blob/main/notebooks/07_stable_steps.ipynb)
#
# Three options every adamfx Adam member takes (keyword-only, `False` by default):
#
# - `update_clipping=True`: StableAdamW's per-tensor clipping (Wortsman et al. 2023). Each
#   tensor's learning rate is divided by `max(1, RMS)`, with
#   `RMS = sqrt(mean(g**2 / max(v_hat, eps**2)))` on the new second moment.
#   `adamfx.stable_adamw` is `adamw` with it and optimi's defaults (`b2=0.99`, `eps=1e-6`).
# - `cautious=True` (Liang et al. 2024): the Adam direction is zeroed where its sign
#   disagrees with the gradient's, the rest rescaled by `1 / max(mean(mask), 1e-3)`.
# - `decouple_lr=True, max_lr=...` (AdamW-style members): the decay is
#   `(lr_t / max_lr) * weight_decay * params`, so it does not change with the peak rate.
#
# This notebook provokes the loss spike that update clipping is for, watches it coming with
# `adam_diagnostics`, and trains a small MLP with and without each option.

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

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import adamfx

# %% [markdown]
# ## A spike after a calm phase
#
# Wortsman et al. trace loss spikes to the second moment *underestimating* `g**2`: after a
# long calm phase `v_hat` has settled on small gradients, and when the gradient's scale jumps
# the first moment reacts within a few steps (`1 - b1 = 0.1` of the new gradient) while
# `v_hat` takes `1 / (1 - b2)` steps. At `b2 = 0.999` the first spiky step is
# `m_hat / sqrt(v_hat) ~ 0.1 / sqrt(0.001) ~ 3.2`: three times the learning rate.
#
# Below: 3000 calm steps (gradient `1e-3`, 10% noise), then 30 steps 1000x larger, on one
# (16, 64) tensor; we record the RMS of `update / lr` of every step (`update_rms` of
# `adam_diagnostics`) and the largest element.

# %%
LR = 1e-3
CALM, SPIKE = 3000, 30
rng = np.random.default_rng(0)
scales = np.concatenate([np.full(CALM, 1e-3), np.full(SPIKE, 1.0)])
noise = rng.normal(size=(CALM + SPIKE, 16, 64))
grads = jnp.asarray(scales[:, None, None] * (1.0 + 0.1 * noise), jnp.float32)


def step_sizes(tx):
  """RMS and max of |update| / lr at every step, and the diagnostics' stable RMS."""
  params = jnp.zeros((16, 64))

  def body(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    d = adamfx.adam_diagnostics(s, u, LR, b2=0.999, grads=g, quantiles=())
    out = (d['update_rms'], jnp.max(jnp.abs(u)) / LR, d['stable_rms_max'])
    return (optax.apply_updates(p, u), s), out

  _, out = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), grads))(params)
  return tuple(np.asarray(x) for x in out)


members = {
    'AdamW (b2=0.999)': adamfx.adamw(LR, b2=0.999, weight_decay=0.0),
    'StableAdamW (b2=0.999)': adamfx.stable_adamw(LR, b2=0.999, eps=1e-8, weight_decay=0.0),
    'AdamW + cautious': adamfx.adamw(LR, b2=0.999, weight_decay=0.0, cautious=True),
}
spikes = {name: step_sizes(tx) for name, tx in members.items()}
for name, (steps, top, rms) in spikes.items():
  print(f'{name:24s} calm: update RMS / lr {steps[CALM - 1]:.2f}; after the jump: largest'
        f' update RMS / lr {steps[CALM:].max():.2f}, largest element {top[CALM:].max():.2f};'
        f' stable RMS at the jump {rms[CALM]:.1f}')

# %%
adamw_first = spikes['AdamW (b2=0.999)'][0][CALM]
adamw_peak = spikes['AdamW (b2=0.999)'][0][CALM:].max()
stable_peak = spikes['StableAdamW (b2=0.999)'][1][CALM:].max()  # the largest element
print(f'AdamW: {adamw_first:.2f} lr at the jump, {adamw_peak:.2f} lr at its peak; '
      f'StableAdamW: every element within {stable_peak:.2f} lr')
assert 2.8 < adamw_first < 3.6, adamw_first  # the paper's ~3x
assert adamw_peak > 5.0, adamw_peak
assert stable_peak <= 1.0, stable_peak  # within the learning rate

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
window = slice(CALM - 20, CALM + SPIKE)
x = np.arange(CALM + SPIKE)[window] - CALM
for name, (steps, _, rms) in spikes.items():
  axes[0].plot(x, steps[window], label=name)
  axes[1].semilogy(x, rms[window], label=name)
axes[0].axhline(1.0, color='k', lw=0.8, ls='--')
axes[0].set(xlabel='steps after the jump', ylabel='RMS of update / lr',
            title='Step size through a 1000x gradient jump')
axes[1].axhline(1.0, color='k', lw=0.8, ls='--')
axes[1].set(xlabel='steps after the jump', ylabel='stable_rms_max (diagnostics)',
            title='RMS of g / sqrt(v_hat): the warning')
axes[0].legend()
fig.tight_layout()

# %% [markdown]
# AdamW's step jumps to about 3.2 lr at the jump and keeps growing, to about 6.5 lr ten steps
# later: the first moment reaches the new scale (`1 - 0.9**k`) faster than `v_hat` does
# (`k * 0.001`). StableAdamW divides that tensor's rate by the RMS (about 30 at the jump), so
# its step *shrinks* instead and recovers to lr as `v_hat` catches up. Cautious updates do not
# change the step's size (here every coordinate agrees with its gradient). `adam_diagnostics(..., grads=g)`
# reports `stable_rms_max` (and `clip_factor_min`, `cautious_fraction`): it sits at about 1
# in the calm phase and jumps the very step the gradient does, before the step has moved the
# params.
#
# ## A small training run with and without each option
#
# A 64-64-64-10 MLP on scikit-learn's 8x8 digits, AdamW at `b2=0.999` with warmup and
# cosine decay. From step 400 on the loss is multiplied by 1000 (a sudden change of gradient
# scale, as a change of loss scaling or of data would make; the plotted loss is the unscaled
# one). Adam is invariant to the gradient's scale, but only once `v_hat` has caught up. Each
# option is switched on alone, then StableAdamW.

# %%
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

digits = load_digits()
x_train, x_test, y_train, y_test = train_test_split(
    digits.data / 16.0, digits.target, test_size=0.25, random_state=0)
x_train, x_test = jnp.asarray(x_train, jnp.float32), jnp.asarray(x_test, jnp.float32)
y_train, y_test = jnp.asarray(y_train), jnp.asarray(y_test)


def init_mlp(key, sizes=(64, 64, 64, 10)):
  params = []
  for k, (a, b) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
    params.append({'w': jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a), 'b': jnp.zeros(b)})
  return params


def logits_of(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer['w'] + layer['b'])
  return x @ params[-1]['w'] + params[-1]['b']


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits_of(params, x), y).mean()


STEPS, BATCH, PEAK = 800, 64, 3e-3
SHIFT = 400
schedule = optax.warmup_cosine_decay_schedule(0.0, PEAK, 50, STEPS)
batches = np.random.default_rng(1).integers(0, x_train.shape[0], size=(STEPS, BATCH))
loss_scale = jnp.asarray([1000.0 if k >= SHIFT else 1.0 for k in range(STEPS)], jnp.float32)


def train(tx):
  params = init_mlp(jax.random.PRNGKey(0))

  def body(carry, inputs):
    p, s = carry
    idx, scale = inputs
    x, y = x_train[idx], y_train[idx]
    loss, g = jax.value_and_grad(lambda q: scale * loss_fn(q, x, y))(p)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), loss_fn(p, x_train, y_train)  # the whole set

  (params, _), losses = jax.jit(lambda p: jax.lax.scan(
      body, (p, tx.init(p)), (jnp.asarray(batches), loss_scale)))(params)
  acc = float(jnp.mean(jnp.argmax(logits_of(params, x_test), -1) == y_test))
  return np.asarray(losses), float(loss_fn(params, x_train, y_train)), acc


WD = 1e-2
runs = {
    'AdamW': adamfx.adamw(schedule, b2=0.999, weight_decay=WD),
    'AdamW + update_clipping': adamfx.adamw(schedule, b2=0.999, weight_decay=WD,
                                            update_clipping=True),
    'AdamW + cautious': adamfx.adamw(schedule, b2=0.999, weight_decay=WD, cautious=True),
    # fully decoupled: (lr_t / max_lr) * 1e-4 * params per step, whatever the peak rate
    'AdamW + decouple_lr': adamfx.adamw(schedule, b2=0.999, weight_decay=1e-4,
                                        decouple_lr=True, max_lr=PEAK),
    'StableAdamW': adamfx.stable_adamw(schedule, b2=0.999, weight_decay=WD),
}
results = {name: train(tx) for name, tx in runs.items()}
print(f'{"optimizer":26s} {"loss before":>11s} {"max loss 400-450":>16s} '
      f'{"final train loss":>16s} {"test acc":>8s}')
for name, (losses, final, acc) in results.items():
  print(f'{name:26s} {losses[390:400].mean():11.4f} {losses[400:450].max():16.4f} '
        f'{final:16.4f} {acc:8.1%}')

# %%
for name, (_, final, acc) in results.items():
  assert np.isfinite(final) and acc > 0.85, (name, final, acc)
spike_adamw = results['AdamW'][0][400:450].max()
spike_stable = results['StableAdamW'][0][400:450].max()
spike_clip = results['AdamW + update_clipping'][0][400:450].max()
print(f'largest loss in the 50 steps after the shift: AdamW {spike_adamw:.3f}, '
      f'AdamW + update_clipping {spike_clip:.3f}, StableAdamW {spike_stable:.3f}')
assert spike_clip < spike_adamw and spike_stable < spike_adamw

fig, axes = plt.subplots(1, 2, figsize=(12, 4))
smooth = lambda v: np.convolve(v, np.ones(5) / 5, mode='valid')
zoom = np.arange(SHIFT - 20, SHIFT + 60)
for name, (losses, _, _) in results.items():
  axes[0].semilogy(smooth(losses), label=name, lw=1)
  axes[1].semilogy(zoom, losses[zoom], label=name, lw=1)
for ax in axes:
  ax.axvline(SHIFT, color='red', lw=0.8, ls='--', label='loss x1000 from here')
axes[0].set(xlabel='step', ylabel='training-set loss (5-step mean)',
            title='Digits MLP: the loss scaled by 1000 from step 400 on')
axes[1].set(xlabel='step', ylabel='training-set loss', title='Around the shift')
axes[0].legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# After the shift the gradient is 1000x the one `v_hat` has seen; at `b2 = 0.999` it takes
# `v_hat` tens of steps to catch up, and meanwhile AdamW's steps grow to several times the
# rate (as in the first experiment) and the loss spikes. Update clipping (alone or as
# StableAdamW) divides each tensor's rate by its RMS while `g**2` exceeds `v_hat`, and the
# spike is a fraction of AdamW's. Cautious updates do not bound the step's size but drop
# the coordinates whose momentum disagrees with the gradient. `decouple_lr` changes the
# decay only: `(lr_t / max_lr) * weight_decay`, so its strength stays put when the peak
# rate is tuned (with `weight_decay = wd * max_lr` it is exactly AdamW's `wd`).
#
# The numbers of every option are tested against torch-optimi's `StableAdamW` and
# `AdamW(decouple_lr=True)` and a float64 transcription of the cautious reference code in
# `tests/test_stable.py`; the guide {doc}`../guides/stable` summarises them.
