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
# # adamfx quickstart
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/adamfx/adamfx/blob/main/notebooks/01_quickstart.ipynb)
#
# Adam for JAX, as a drop-in for `optax.adam`.

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
# `adamfx.adam` is a drop-in for `optax.adam`: same arguments, same state fields, same numbers.
# This notebook shows the everyday uses: the `init` / `update` / `apply_updates` loop, a jitted
# train step with buffer donation, composition with `optax.chain` (clipping, a warmup-cosine
# schedule), `inject_hyperparams`, saving and restoring the optimizer state, and training an
# Equinox model. Each section ends with an `assert` on its result, so the test suite catches a
# regression when it executes this notebook.

# %%
import functools
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamfx

print('adamfx', adamfx.__version__, '| jax', jax.__version__, '| optax', optax.__version__)

# %% [markdown]
# ## 1. `init`, `update`, `apply_updates`
#
# A linear regression on synthetic data. The optimizer is an `optax.GradientTransformation`:
# `init` builds the state (`AdamState(count, mu, nu, nu_max)`, the fields of
# `optax.ScaleByAdamState`), `update` turns gradients into updates, `optax.apply_updates` adds them.

# %%
kx, kn = jax.random.split(jax.random.PRNGKey(0))
x = jax.random.normal(kx, (256, 3))
w_true, b_true = jnp.array([1.5, -2.0, 0.5]), 0.3
y = x @ w_true + b_true + 0.01 * jax.random.normal(kn, (256,))


def loss(params, x, y):
  return jnp.mean((x @ params['w'] + params['b'] - y) ** 2)


def fit(tx, steps=200):
  params = {'w': jnp.zeros(3), 'b': jnp.zeros(())}
  state = tx.init(params)
  # jit the pieces: run eagerly, each small op is dispatched on its own.
  grad_fn, update_fn = jax.jit(jax.grad(loss)), jax.jit(tx.update)
  for _ in range(steps):
    updates, state = update_fn(grad_fn(params, x, y), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


params, state = fit(adamfx.adam(learning_rate=0.05))
print(state[0]._fields, 'count =', state[0].count)
print('w =', params['w'], 'b =', params['b'], 'loss =', loss(params, x, y))
assert loss(params, x, y) < 1e-3

# %% [markdown]
# The same loop with `optax.adam` gives the same parameters, to float32 rounding: switching is a
# change of import.

# %%
params_optax, _ = fit(optax.adam(learning_rate=0.05))
gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_optax)))
print(f'largest |adamfx - optax| after 200 steps: {gap:.1e}')
assert gap < 1e-5


# %% [markdown]
# ## 2. A jit-compiled train step with buffer donation
#
# `donate_argnums` lets XLA write the new params and optimizer state into the buffers of the old
# ones, so a step needs no second copy of them. Donated inputs are deleted: always rebind them to
# the step's outputs. The optimizer
# is a static argument (a `GradientTransformation` is a hashable tuple of functions), so one step
# function serves every optimizer below.

# %%
traces = []  # a Python side effect runs only when jax traces (compiles) the step


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
def train_step(tx, params, state, x, y):
  traces.append(tx)
  loss_value, grads = jax.value_and_grad(loss)(params, x, y)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, loss_value


tx = adamfx.adam(learning_rate=0.05)
params = {'w': jnp.zeros(3), 'b': jnp.zeros(())}
state = tx.init(params)
old_mu = state[0].mu['w']
for step in range(200):
  params, state, loss_value = train_step(tx, params, state, x, y)
assert old_mu.is_deleted()  # its buffer was donated to the first step
print('loss after 200 jitted steps:', float(loss(params, x, y)), '| compiled', len(traces), 'time(s)')
assert float(loss(params, x, y)) < 1e-3
assert len(traces) == 1  # no recompilation after the first step

# %% [markdown]
# ## 3. Inside `optax.chain`: gradient clipping and a warmup-cosine schedule
#
# `adamfx.adam` accepts an optax schedule as `learning_rate`, and composes with any optax
# transformation.

# %%
schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=0.05, warmup_steps=50, decay_steps=400, end_value=1e-3
)
tx = optax.chain(optax.clip_by_global_norm(1.0), adamfx.adam(learning_rate=schedule))
params = {'w': jnp.zeros(3), 'b': jnp.zeros(())}
state = tx.init(params)
for step in range(400):
  params, state, loss_value = train_step(tx, params, state, x, y)
lrs = [float(schedule(i)) for i in range(400)]
print(f'lr: {lrs[0]} at step 0, {lrs[50]:.3f} at step 50, {lrs[-1]:.4f} at step 399')
print('loss:', float(loss(params, x, y)))
assert lrs[0] == 0.0 and abs(lrs[50] - 0.05) < 1e-7
assert float(loss(params, x, y)) < 1e-3

# %% [markdown]
# ## 4. `inject_hyperparams`: change the learning rate without recompiling
#
# `adamfx.inject_hyperparams` is `optax.inject_hyperparams` that keeps the hyperparameters in at
# least float32 (optax casts them to the params' dtype, and in bfloat16 `b2=0.999` becomes 1.0).
# The hyperparameters live in the state, so they can be changed between steps.

# %%
tx = adamfx.inject_hyperparams(adamfx.adam)(learning_rate=0.05)
params = {'w': jnp.zeros(3), 'b': jnp.zeros(())}
state = tx.init(params)
print({k: (float(v), v.dtype.name) for k, v in state.hyperparams.items()})

state.hyperparams['learning_rate'] = jnp.asarray(0.01)  # e.g. a manual decay on a plateau
grads = jax.grad(loss)(params, x, y)
updates, state = tx.update(grads, state, params)
# Adam's first step is lr * sign(g) (up to eps), whatever the gradient's size.
print('first update:', updates['w'])
np.testing.assert_allclose(jnp.abs(updates['w']), 0.01, rtol=1e-5)

# %% [markdown]
# ## 5. Saving and restoring the optimizer state
#
# The state is a pytree of arrays. `adamfx.save_npz` writes its leaves (with their paths, shapes,
# dtypes and checksums) to one `.npz` file, no pickle; `adamfx.restore_npz` reads them back into
# the structure of a template state, e.g. a fresh `tx.init(params)`. (`adamfx.save_orbax` /
# `restore_orbax` do the same through Orbax, for sharded, multi-host states.) A restored state must
# continue training exactly where the saved one left off.

# %%
tx = adamfx.adam(learning_rate=0.05)
params, state = fit(tx, steps=50)
path = pathlib.Path(tempfile.mkdtemp()) / 'adam_state.npz'
adamfx.save_npz(path, state)
restored = adamfx.restore_npz(path, tx.init(params))

print('restored count:', restored[0].count)
for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
  assert a.dtype == b.dtype and bool(jnp.all(a == b))

grads = jax.grad(loss)(params, x, y)
next_a, _ = tx.update(grads, state, params)
next_b, _ = tx.update(grads, restored, params)
assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(next_a), jax.tree.leaves(next_b)))
print('the next update from the restored state is bit-identical')

# %% [markdown]
# ## 6. With Equinox
#
# An Equinox model is a pytree whose leaves are arrays *and* other things (activation functions,
# static sizes). Filter it to its floating-point arrays with `eqx.filter`; the gradients of the
# other leaves are `None`, which adamfx passes through. (With Flax NNX the same transformation goes
# into `nnx.Optimizer(model, adamfx.adam(1e-3), wrt=nnx.Param)`; Flax is not needed here.)

# %%
import equinox as eqx

model = eqx.nn.MLP(in_size=1, out_size=1, width_size=32, depth=2, key=jax.random.PRNGKey(1))
xs = jnp.linspace(-3, 3, 128)[:, None]
ys = jnp.sin(xs)
tx = adamfx.adam(learning_rate=1e-2)
opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))


def mse(model):
  return jnp.mean((jax.vmap(model)(xs) - ys) ** 2)


@eqx.filter_jit
def eqx_step(model, opt_state):
  loss_value, grads = eqx.filter_value_and_grad(mse)(model)
  updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
  return eqx.apply_updates(model, updates), opt_state, loss_value


first = float(mse(model))
for step in range(1000):
  model, opt_state, loss_value = eqx_step(model, opt_state)
print(f'MSE on sin(x): {first:.3f} -> {float(mse(model)):.5f}')
assert float(mse(model)) < 1e-2 < first
