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
# # Adam state in about 2 (or 1) bytes per parameter
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/adamfx/adamfx/blob/main/notebooks/04_memory.ipynb)
#
# Adam keeps two moments per parameter: 8 bytes per parameter in float32. This notebook
# measures adamfx's two ways to shrink that, from the state pytree itself:
#
# * **bfloat16 moments** (`adamfx.adam(lr, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)`,
#   4 bytes/param). The arithmetic stays in float32; a 16-bit `nu` is stored with stochastic
#   rounding, because with round-to-nearest `0.999 * nu` rounds back to `nu` and the second
#   moment stalls.
# * **8-bit blockwise moments** (`adamfx.adam8bit(lr)`, about 2.03 bytes/param; Dettmers et
#   al. 2022): uint8 codes of a dynamic (nonlinear) map, one float32 scale per block of 256.
#
# By default it runs a small version in seconds (as CI does); set `FULL = True` (or the
# environment variable `ADAMFX_MEMORY_FULL=1`) for the memory guide's numbers, or run
# `adamfx memory` in a shell.

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
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown
from IPython.display import display

import adamfx
from adamfx.cli import memory as mb  # the tables of `adamfx memory`

FULL = os.environ.get('ADAMFX_MEMORY_FULL') == '1'  # True: the memory guide's numbers (slow: 10-25 min on 2 cores)
key = jax.random.PRNGKey(0)
digits, lm = mb.digits_task(), mb.lm_task()
print(jax.__version__, jax.devices()[0].platform, 'FULL =', FULL)

# %% [markdown]
# ## 1. Bytes of optimizer state per parameter
#
# Counted as the `nbytes` of every leaf of `tx.init(params)` (through `jax.eval_shape`, so
# nothing is allocated). Leaves under `min_8bit_size=4096` elements (biases, norms, small
# embeddings) keep float32 moments, as in bitsandbytes: in the two small models they are a
# visible share; `min_8bit_size=0` quantizes them too.

# %%
models = {
    'digits MLP': jax.eval_shape(digits.init, key),
    'char transformer LM': jax.eval_shape(lm.init, key),
    'GPT-style, d=512, 2 layers': mb.gpt_block_shapes(),
}
rows = mb.bytes_table(models)
display(Markdown(mb.format_bytes(rows)))
for row in rows:
  # + 4 bytes of step count per state, i.e. < 1e-4 per parameter here
  assert abs(row['float32 (adamfx.adam)'] - 8) < 1e-3
  assert abs(row['bf16 mu + nu (stochastic nu)'] - 4) < 1e-3
  assert row['8-bit, every leaf (min_8bit_size=0)'] <= 2.1
assert rows[-1]['8-bit (adamfx.adam8bit)'] <= 2.1

# %% [markdown]
# ## 2. The bfloat16 second moment: naive rounding stalls
#
# Feed 1024 elements 200 gradients of size 1, then gradients 100x smaller. The true `nu`
# decays by `0.999` per step. Stored in bfloat16 with round-to-nearest, `0.999 * nu` rounds
# back to `nu` (bfloat16 has 8 significant bits; the step is 0.1 %, under half an ulp), so
# `nu` freezes and Adam's steps stay ~100x too small. adamfx rounds stochastically, with
# random bits hashed from (step, leaf, element), so the stored `nu` is right on average.

# %%
traj = mb.stall_trajectories(1500)
for name, t in traj.items():
  plt.semilogy(t.mean(axis=1), label=name)
plt.xlabel('step'); plt.ylabel('mean nu'); plt.legend(); plt.show()
summary = mb.stall_summary(traj)
print({k: round(v, 3) for k, v in summary.items()})
assert summary['naive bf16 (round to nearest)'] > 3.5  # frozen at its step-200 value
assert abs(summary['adamfx bf16 (stochastic rounding)'] - 1) < 0.05

# %% [markdown]
# ## 3. Training parity
#
# Final loss (digits: the whole data set; LM: 32 fixed windows) after the same steps, seeds
# and batches, against float32 Adam. Accepted when the mean differs from float32's by at most
# max(1 % of float32's mean, float32's seed-to-seed spread). The small version trains the
# digits MLP only, for 60 steps.

# %%
seeds, steps = ([0, 1, 2], 300) if FULL else ([0, 1, 2], 60)
names = None if FULL else ['bf16 mu + nu (stochastic nu)', '8-bit (adamfx.adam8bit)']
parity = []
for task in ([digits, lm] if FULL else [digits]):
  parity += mb.parity_table(task, seeds, steps, names)
display(Markdown(mb.format_parity(parity, seeds, steps)))
for row in parity:
  if 'naive' not in row['optimizer']:
    assert row['within'], row

# %% [markdown]
# ## 4. Step time
#
# Median of interleaved trials, relative to float32 `adamfx.adam`, for the optimizer update
# alone (a 6.3M-parameter GPT-style stack) and for a whole training step of the LM. On a
# shared machine these vary by tens of percent from run to run; the memory guide states the load.

# %%
if FULL:
  display(Markdown(mb.format_times(mb.step_times())))
else:
  print('skipped (FULL = False)')

# %% [markdown]
# ## 5. 4-bit moments: about 1 byte per parameter
#
# `adamfx.adam4bit(lr)` is `adamfx.adam(lr, moments=adamfx.Blockwise4bit())` (Li et al. 2023;
# torchao's `AdamW4bit`): 4-bit codes, two a byte, and a float32 scale per block of 128, so
# 1.0625 bytes/param for both moments on quantized leaves. `mu` uses the signed dynamic
# map, `nu` the zero-free linear map `linspace(0, 1, 17)[1:]` (a positive `nu` never
# decodes to 0), and the codes are rounded stochastically: with round-to-nearest
# (`rounding='nearest'`, torchao's rule) the small elements' `nu` in issue 24's stall test
# stays on its code and their steps shrink.

# %%
for name, p in models.items():
  n = mb.param_count(p)
  b4 = mb.state_bytes(jax.eval_shape(adamfx.adam4bit(1e-3).init, p)) / n
  b4_all = mb.state_bytes(jax.eval_shape(
      adamfx.adam(1e-3, moments=adamfx.Blockwise4bit(min_size=0)).init, p)) / n
  print(f'{name}: adam4bit {b4:.3f} bytes/param, min_size=0 {b4_all:.3f}')
  assert b4_all <= 1.1

# %%
def stall(fmt, steps=600):
  """One element per 128-block keeps |g| = 1; the others drop 100x at step 200."""
  rng = np.random.default_rng(0)
  n = 128 * 8
  small = np.arange(n) % 128 != 0
  g = rng.choice([-1.0, 1.0], size=(steps, n)).astype(np.float32)
  g[200:, small] *= 0.01
  tx = adamfx.scale_by_adam(moments=fmt)
  body = lambda s, g: (tx.update(g, s)[1], None)
  state, _ = jax.jit(lambda gs: jax.lax.scan(body, tx.init(gs[0]), gs))(jnp.asarray(g))
  truth = np.zeros(n)
  for gi in g.astype(np.float64):
    truth = 0.999 * truth + 0.001 * gi * gi
  return float(np.median(np.asarray(fmt.decode(state.nu, False))[small] / truth[small]))


near = stall(adamfx.Blockwise4bit(min_size=0, rounding='nearest'))
sr = stall(adamfx.Blockwise4bit(min_size=0))
print(f'stored / true nu of the small elements, 400 steps after the drop: nearest {near:.2f},'
      f' stochastic {sr:.2f}')
assert near > 1.8 and 0.8 < sr < 1.25

# %%
losses = {name: mb.train(digits, make, seeds, steps) for name, make in {
    'float32': lambda lr: adamfx.adam(lr),
    '4-bit (adam4bit)': lambda lr: adamfx.adam4bit(lr),
}.items()}
base = losses['float32']
threshold = max(0.01 * base.mean(), base.max() - base.min())
for name, x in losses.items():
  print(f'{name}: digits final loss {x.mean():.4f} (delta {x.mean() - base.mean():+.4f},'
        f' threshold {threshold:.4f})')
assert abs(losses['4-bit (adam4bit)'].mean() - base.mean()) <= threshold

# %% [markdown]
# ## 6. bfloat16 params: the stall, and Kahan or stochastic rounding fixing it
#
# With bfloat16 *params* (not just moments), `optax.apply_updates` rounds each new param to
# nearest: an update under half an ulp (`2**-9` of the param) is lost. Under `jit`, adding
# `1e-3` a thousand times to a bfloat16 `1.0` leaves `1.0`. Every adamfx builder takes
# `param_rounding=`: `'kahan'` keeps a compensation buffer in the params' dtype (2 bytes per
# param) that carries what each rounding lost into the next step; `'stochastic'` rounds up or
# down at random, right on average, with no buffer (bits hashed from step, leaf and element).
# Both roundings are forced (`lax.reduce_precision`, integer bit operations), since XLA may
# otherwise compute a bfloat16 error term in float32 and fold it to 0 (jax issue 23007).
#
# On a constant gradient Adam's step is the learning rate (`m_hat / sqrt(v_hat) = 1`), so a
# thousand steps of `adamfx.adam(1e-3, param_rounding=...)` add `1e-3` a thousand times. The
# moments are kept in float32 here (`mu_dtype`, `nu_dtype`; by default they follow the
# params' dtype), so that each step is `1e-3` to float32 precision and only the params'
# rounding differs.

# %%
import optax

from adamfx.cli import step_memory as sm


@jax.jit
def add_1e3_thousand_times(p):
  out = {}
  for mode in ('nearest', 'kahan', 'stochastic'):
    tx = adamfx.adam(1e-3, mu_dtype=jnp.float32, nu_dtype=jnp.float32, param_rounding=mode)

    def body(i, carry, tx=tx):
      p, s = carry
      u, s = tx.update(-jnp.ones_like(p), s, p)
      return optax.apply_updates(p, u), s

    out[mode] = jax.lax.fori_loop(0, 1000, body, (p, tx.init(p)))[0]
  return out


sums = add_1e3_thousand_times(jnp.ones(4096, jnp.bfloat16))
display(Markdown('| param_rounding | mean of the 4096 params (exact: 2.0) |\n|---|---:|\n' + '\n'.join(
    f'| {k} | {float(v.astype(jnp.float32).mean()):.4f} |' for k, v in sums.items())))
assert float(sums['nearest'][0]) == 1.0
assert float(sums['kahan'][0]) == 2.0
assert abs(float(sums['stochastic'].astype(jnp.float32).mean()) - 2.0) < 0.01

# %% [markdown]
# The same on a training run: the teacher-student MLP (64-256-256-16, tanh, batch
# 256), final loss on a fixed evaluation set, bfloat16 params against float32 params (the
# small version: 600 steps, one seed; `FULL`: 3000 steps, 3 seeds).

# %%
init, loss, sample, final = sm.teacher_student()
ts_steps, ts_seeds = (3000, [0, 1, 2]) if FULL else (600, [0])
curves = {}
for label, dtype, make in sm.quality_rows(1e-3):
  if '8bit' in label or 'bf16 moments' in label:
    continue
  curves[label] = sm.train(init, loss, sample, final, make, dtype, ts_seeds, ts_steps).mean()
ref = curves['adamfx.adam, float32 params (reference)']
display(Markdown('| optimizer | final loss | vs float32 params |\n|---|---:|---:|\n' + '\n'.join(
    f'| {label} | {value:.5f} | {100 * (value / ref - 1):+.1f}% |' for label, value in curves.items())))
assert curves['adamfx.adam, bf16 params, nearest'] > curves['adamfx.adam, bf16 params, kahan']

# %% [markdown]
# ## 7. The whole training step's memory
#
# What a low-memory optimizer buys is the training step's peak, not its state. One donated,
# jitted step (gradient, update, `apply_updates`) is lowered from shapes alone and XLA's
# `memory_analysis()` read: params, state, temporaries and peak per parameter, beside the same
# model's SGD step (the floor). The small version uses a 4-layer, 512-wide MLP and a few rows;
# `FULL` (or `adamfx bench --memory`) the 8-layer, 1024-wide one and every row. On
# this CPU, XLA computes bfloat16 matmuls in float32 and keeps float32 copies of the weights,
# which is part of the floor.

# %%
if FULL:
  table = sm.memory_table(['mlp'])
else:
  table = sm.memory_table(
      [sm.mlp_model(width=512, layers=4)],
      only=['optax.adam', 'adamfx.adam8bit', 'adamfx.adam nearest', 'adamfx.adam kahan',
            'adamfx.adam stochastic'])
display(Markdown(sm.format_memory(table)))
labels = [f"{r['optimizer']} ({r['params_dtype'][:4]})" for r in table]
y = np.arange(len(table))
floor = np.array([r['sgd_floor'] for r in table])
state = np.array([r['state'] for r in table])
excess = np.array([max(r['excess'], 0) for r in table])
plt.barh(y, floor, label='SGD step (floor)')
plt.barh(y, state, left=floor, label='optimizer state')
plt.barh(y, excess, left=floor + state, label='optimizer temporaries')
plt.yticks(y, labels); plt.xlabel('peak bytes per parameter'); plt.legend(); plt.show()
for r in table:
  assert r['excess'] <= 0.5 + 4 * 2**20 / r['n'], r  # + the 8-bit chunk temporaries
