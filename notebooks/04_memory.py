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
# # Adam state in about 2 bytes per parameter
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
