"""Evidence for adamfx's low-memory Adam state: bytes, training parity, step time.

Run ``adamfx memory`` (a few minutes on 2 CPU cores; add ``--quick`` for a
smoke run). It prints Markdown tables:

* state bytes per parameter, measured from the state pytree (``nbytes`` of
  every leaf of ``tx.init(params)``, via ``jax.eval_shape``: nothing is
  allocated), for float32 Adam, bfloat16 moments and 8-bit moments;
* the second moment in bfloat16 under a shrinking gradient: naive
  round-to-nearest storage stalls, adamfx's stochastic rounding does not;
* training parity on two tasks -- an MLP on scikit-learn's digits and a small
  character-level transformer language model on generated text -- over 3
  seeds each: the final loss of each storage format against float32 Adam's,
  with the acceptance threshold max(1 % of float32's mean, float32's
  seed-to-seed spread);
* step time relative to float32 adamfx, measured in one run (interleaved
  trials, median), for the optimizer update alone and for a whole training
  step of the language model.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

# Heavy imports (jax, optax, adamfx, sklearn) happen inside the functions, so
# that ``adamfx --help`` style listings stay fast.


# ------------------------------------------------------------------ variants


def _naive_bf16_nu(learning_rate: float):
  """Adam with ``nu`` stored in bfloat16 by round-to-nearest (the naive rule).

  adamfx's float32-``nu`` Adam, with the state's ``nu`` read from bfloat16
  before each step and rounded to nearest bfloat16 after it: the same
  arithmetic as adamfx's bfloat16 ``nu``, only the storage rule differs.
  """
  import jax
  import jax.numpy as jnp
  import optax

  import adamfx

  inner = adamfx.scale_by_adam(mu_dtype=jnp.bfloat16)

  def init_fn(params):
    state = inner.init(params)
    return state._replace(nu=jax.tree.map(lambda v: v.astype(jnp.bfloat16), state.nu))

  def update_fn(updates, state, params=None):
    state = state._replace(nu=jax.tree.map(lambda v: v.astype(jnp.float32), state.nu))
    updates, state = inner.update(updates, state, params)
    return updates, state._replace(nu=jax.tree.map(lambda v: v.astype(jnp.bfloat16), state.nu))

  return optax.chain(
      optax.GradientTransformation(init_fn, update_fn), optax.scale(-learning_rate)
  )


def variants() -> dict[str, Callable[[float], Any]]:
  """Name -> ``factory(learning_rate)`` of the optimizers compared."""
  import jax.numpy as jnp

  import adamfx

  return {
      'float32 (adamfx.adam)': lambda lr: adamfx.adam(lr),
      'bf16 mu + nu (stochastic nu)': lambda lr: adamfx.adam(
          lr, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16
      ),
      'bf16 mu + nu (naive nu)': _naive_bf16_nu,
      '8-bit (adamfx.adam8bit)': lambda lr: adamfx.adam8bit(lr),
      '8-bit, every leaf (min_8bit_size=0)': lambda lr: adamfx.adam8bit(lr, min_8bit_size=0),
  }


# --------------------------------------------------------------------- bytes


def state_bytes(state: Any) -> int:
  """Total ``nbytes`` of every array leaf of a state (or of its shapes)."""
  import jax

  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(state)))


def param_count(params: Any) -> int:
  import jax

  return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)))


def bytes_table(models: dict[str, Any]) -> list[dict[str, Any]]:
  """Bytes of optimizer state per parameter, from ``jax.eval_shape(tx.init)``."""
  import jax

  rows = []
  for model, params in models.items():
    row = {'model': model, 'params': param_count(params)}
    for name, factory in variants().items():
      if 'naive' in name:
        continue
      shapes = jax.eval_shape(factory(1e-3).init, params)
      row[name] = state_bytes(shapes) / row['params']
    rows.append(row)
  return rows


def gpt_block_shapes(d: int = 512, layers: int = 2) -> dict[str, Any]:
  """Parameter shapes of a small GPT-style stack (for bytes and timing)."""
  import jax
  import jax.numpy as jnp

  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  return {
      f'layer{i}': {
          'wqkv': s(d, 3 * d), 'wo': s(d, d), 'w1': s(d, 4 * d), 'w2': s(4 * d, d),
          'b1': s(4 * d), 'b2': s(d), 'ln1': s(d), 'ln2': s(d),
      }
      for i in range(layers)
  }


# ---------------------------------------------------------------------- tasks


@dataclasses.dataclass
class Task:
  name: str
  init: Callable[[Any], Any]  # key -> params
  loss: Callable[[Any, Any], Any]  # params, batch -> scalar
  batch: Callable[[Any], Any]  # key -> batch
  final_loss: Callable[[Any], Any]  # params -> scalar (fixed evaluation set)
  learning_rate: float


def digits_task() -> Task:
  """A 64-256-256-10 MLP on scikit-learn's 8x8 digits, minibatches of 128."""
  import jax
  import jax.numpy as jnp
  from sklearn.datasets import load_digits

  data = load_digits()
  x = jnp.asarray(data.data / 16.0, jnp.float32)
  y = jnp.asarray(data.target, jnp.int32)
  sizes = (64, 256, 256, 10)

  def init(key):
    params = {}
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
      key, sub = jax.random.split(key)
      params[f'w{i}'] = jax.random.normal(sub, (m, n), jnp.float32) * np.float32(np.sqrt(2.0 / m))
      params[f'b{i}'] = jnp.zeros((n,), jnp.float32)
    return params

  def logits(params, xb):
    h = xb
    for i in range(len(sizes) - 1):
      h = h @ params[f'w{i}'] + params[f'b{i}']
      if i < len(sizes) - 2:
        h = jax.nn.relu(h)
    return h

  def loss(params, batch):
    xb, yb = batch
    logp = jax.nn.log_softmax(logits(params, xb))
    return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], axis=1))

  def batch(key):
    idx = jax.random.randint(key, (128,), 0, x.shape[0])
    return x[idx], y[idx]

  return Task('digits MLP', init, loss, batch, lambda p: loss(p, (x, y)), 3e-3)


def generated_text(n_chars: int = 120_000, seed: int = 0) -> str:
  """Sentences from a small random grammar: a learnable, shippable corpus."""
  rng = np.random.default_rng(seed)
  subjects = ['the cat', 'a dog', 'my friend', 'the old man', 'a small bird',
              'the teacher', 'our neighbour', 'every child']
  verbs = ['sees', 'likes', 'finds', 'follows', 'watches', 'helps', 'calls', 'paints']
  objects = ['the ball', 'a red apple', 'the river', 'an open door', 'the green hill',
             'a quiet house', 'the moon', 'two boats']
  tails = ['today', 'slowly', 'again', 'at night', 'every morning', 'with care', '', '']
  out, size = [], 0
  while size < n_chars:
    s = f'{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}'
    if rng.random() < 0.3:
      s += f' and {rng.choice(verbs)} {rng.choice(objects)}'
    tail = rng.choice(tails)
    s = (s + (' ' + tail if tail else '') + '. ')
    out.append(s)
    size += len(s)
  return ''.join(out)


def lm_task(
    d: int = 64, layers: int = 2, heads: int = 4, context: int = 64, batch_size: int = 32
) -> Task:
  """A 2-layer pre-LN character transformer on :func:`generated_text`."""
  import jax
  import jax.numpy as jnp

  text = generated_text()
  chars = sorted(set(text))
  tokens = jnp.asarray(np.array([chars.index(c) for c in text], np.int32))
  vocab = len(chars)
  eval_starts = jnp.asarray(np.linspace(0, tokens.shape[0] - context - 2, 32).astype(np.int32))

  def init(key):
    keys = iter(jax.random.split(key, 4 * layers + 2))
    normal = lambda shape, scale: jax.random.normal(next(keys), shape, jnp.float32) * np.float32(scale)
    params = {
        'embed': normal((vocab, d), 0.02),
        'pos': normal((context, d), 0.02),
        'ln_f': jnp.ones((d,), jnp.float32),
    }
    for i in range(layers):
      params[f'layer{i}'] = {
          'ln1': jnp.ones((d,), jnp.float32), 'ln2': jnp.ones((d,), jnp.float32),
          'wqkv': normal((d, 3 * d), d**-0.5), 'wo': normal((d, d), (2 * layers * d) ** -0.5),
          'w1': normal((d, 4 * d), d**-0.5), 'b1': jnp.zeros((4 * d,), jnp.float32),
          'w2': normal((4 * d, d), (2 * layers * 4 * d) ** -0.5),
      }
    return params

  def norm(x, g):
    x = x - x.mean(-1, keepdims=True)
    return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + np.float32(1e-5)) * g

  def forward(params, tok):
    t = tok.shape[-1]
    x = params['embed'][tok] + params['pos'][:t]
    mask = jnp.tril(jnp.ones((t, t), bool))
    for i in range(layers):
      p = params[f'layer{i}']
      q, k, v = jnp.split(norm(x, p['ln1']) @ p['wqkv'], 3, axis=-1)
      split = lambda a: a.reshape(a.shape[:-1] + (heads, d // heads)).swapaxes(-2, -3)
      q, k, v = split(q), split(k), split(v)
      att = (q @ k.swapaxes(-1, -2)) * np.float32((d // heads) ** -0.5)
      att = jax.nn.softmax(jnp.where(mask, att, np.float32(-1e9)), axis=-1)
      y = (att @ v).swapaxes(-2, -3).reshape(x.shape)
      x = x + y @ p['wo']
      x = x + jax.nn.gelu(norm(x, p['ln2']) @ p['w1'] + p['b1']) @ p['w2']
    return norm(x, params['ln_f']) @ params['embed'].T

  def loss(params, batch):
    logp = jax.nn.log_softmax(forward(params, batch[:, :-1]))
    return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1))

  def windows(starts):
    return tokens[starts[:, None] + jnp.arange(context + 1)[None, :]]

  def batch(key):
    return windows(jax.random.randint(key, (batch_size,), 0, tokens.shape[0] - context - 1))

  return Task('char transformer LM', init, loss, batch,
              lambda p: loss(p, windows(eval_starts)), 3e-3)


# ------------------------------------------------------------------- training


def train(task: Task, factory: Callable[[float], Any], seeds: list[int], steps: int) -> np.ndarray:
  """Final evaluation loss per seed, all seeds in one vmapped, scanned run."""
  import jax
  import optax

  tx = factory(task.learning_rate)

  def one(seed):
    key = jax.random.PRNGKey(seed)
    params = task.init(jax.random.fold_in(key, 0))
    state = tx.init(params)

    def step(carry, i):
      params, state = carry
      batch = task.batch(jax.random.fold_in(jax.random.fold_in(key, 1), i))
      grads = jax.grad(task.loss)(params, batch)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, state), jax.numpy.arange(steps))
    return task.final_loss(params)

  return np.asarray(jax.jit(jax.vmap(one))(jax.numpy.asarray(seeds)))


def parity_table(
    task: Task, seeds: list[int], steps: int, names: list[str] | None = None
) -> list[dict[str, Any]]:
  """Final losses of each variant (default: all) against float32 Adam's."""
  names = list(variants()) if names is None else ['float32 (adamfx.adam)'] + names
  results = {name: train(task, variants()[name], seeds, steps) for name in names}
  base = results['float32 (adamfx.adam)']
  threshold = max(0.01 * base.mean(), base.max() - base.min())
  rows = []
  for name, losses in results.items():
    delta = losses.mean() - base.mean()
    rows.append({
        'task': task.name, 'optimizer': name, 'losses': losses,
        'mean': losses.mean(), 'delta': delta, 'threshold': threshold,
        'within': bool(abs(delta) <= threshold),
    })
  return rows


# ---------------------------------------------------------------------- stall


def stall_trajectories(steps: int = 1500) -> dict[str, np.ndarray]:
  """Mean stored ``nu`` per step after |g| drops 100x, for each storage rule.

  200 steps of |g| = 1, then ``steps`` of |g| ~ 0.01 (1024 elements): the
  float64 truth, naive round-to-nearest bfloat16 and adamfx's bfloat16.
  """
  import jax
  import jax.numpy as jnp

  import adamfx

  rng = np.random.default_rng(1)
  n = 1024
  gs = np.concatenate([
      rng.choice([-1.0, 1.0], size=(200, n)),
      0.01 * rng.standard_normal((steps, n)),
  ]).astype(np.float32)
  truth, out = np.zeros(n), []
  for g in gs.astype(np.float64):
    truth = 0.999 * truth + 0.001 * g * g
    out.append(truth)
  result = {'true (float64)': np.stack(out)}

  def nus(tx):
    def body(state, g):
      state = tx.update(g, state, None)[1]
      return state, state[0].nu.astype(jnp.float32)

    return np.asarray(jax.jit(lambda gs: jax.lax.scan(body, tx.init(gs[0]), gs)[1])(jnp.asarray(gs)))

  result['naive bf16 (round to nearest)'] = nus(_naive_bf16_nu(1.0))
  result['adamfx bf16 (stochastic rounding)'] = nus(adamfx.adam(1.0, nu_dtype=jnp.bfloat16))
  return result


def stall_summary(traj: dict[str, np.ndarray]) -> dict[str, float]:
  """Median over elements of stored / true ``nu`` at the last step."""
  truth = traj['true (float64)'][-1]
  return {name: float(np.median(t[-1] / truth)) for name, t in traj.items()}


# ----------------------------------------------------------------------- time


def _median_times(fns: dict[str, Callable[[], Any]], trials: int) -> dict[str, tuple[float, float]]:
  """Median (wall, process CPU) seconds of each function, trials interleaved.

  On a shared machine the wall time mostly measures the other processes;
  the process CPU time (all of XLA's threads) is the work done, and is the
  steadier of the two under load.
  """
  import jax

  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(trials):  # interleaved, so load changes hit every variant
    for name, fn in fns.items():
      w0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn())
      times[name].append((time.perf_counter() - w0, time.process_time() - c0))
  return {name: tuple(np.median(np.asarray(ts), axis=0).tolist()) for name, ts in times.items()}


def step_times(trials: int = 15, lm_steps: int = 10) -> list[dict[str, Any]]:
  """Median seconds per optimizer update and per LM training step."""
  import jax
  import jax.numpy as jnp
  import optax

  shapes = gpt_block_shapes()
  key = jax.random.PRNGKey(0)
  params = jax.tree.map(lambda s: jax.random.normal(key, s.shape, s.dtype), shapes)
  grads = jax.tree.map(lambda p: p * np.float32(0.01), params)
  fns = {}
  for name, factory in variants().items():
    tx = factory(1e-3)
    state = tx.init(params)
    upd = jax.jit(tx.update)
    _, state = upd(grads, state, params)
    fns[name] = (lambda upd=upd, state=state: upd(grads, state, params))
  update = _median_times(fns, trials)

  task = lm_task()
  lm_params = task.init(jax.random.PRNGKey(0))
  batch = task.batch(jax.random.PRNGKey(1))
  fns = {}
  for name, factory in variants().items():
    tx = factory(task.learning_rate)

    def many(params, state, tx=tx):
      def body(carry, _):
        p, s = carry
        g = jax.grad(task.loss)(p, batch)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

      return jax.lax.scan(body, (params, state), None, length=lm_steps)[0]

    run = jax.jit(many)
    state = tx.init(lm_params)
    fns[name] = (lambda run=run, state=state: run(lm_params, state))
  train_step = _median_times(fns, trials)
  base_u = update['float32 (adamfx.adam)']
  base_t = train_step['float32 (adamfx.adam)']
  n = param_count(params)
  del jnp
  return [
      {
          'optimizer': name,
          'update_ms': 1e3 * update[name][0], 'update_cpu_ms': 1e3 * update[name][1],
          'update_ratio': update[name][0] / base_u[0], 'update_cpu_ratio': update[name][1] / base_u[1],
          'train_ms': 1e3 * train_step[name][0] / lm_steps,
          'train_cpu_ms': 1e3 * train_step[name][1] / lm_steps,
          'train_ratio': train_step[name][0] / base_t[0],
          'train_cpu_ratio': train_step[name][1] / base_t[1],
          'update_params': n, 'lm_params': param_count(lm_params),
      }
      for name in update
  ]


# ----------------------------------------------------------------------- main


def format_bytes(rows):
  """The bytes table of :func:`bytes_table`'s rows, as Markdown."""
  names = [k for k in rows[0] if k not in ('model', 'params')]
  out = ['| model | params | ' + ' | '.join(names) + ' |', '|---|---:|' + '---:|' * len(names)]
  for r in rows:
    out.append(f"| {r['model']} | {r['params']:,} | " + ' | '.join(f'{r[n]:.3f}' for n in names) + ' |')
  return '\n'.join(out)


def format_parity(rows, seeds, steps):
  """The parity table of :func:`parity_table`'s rows, as Markdown."""
  out = [f'| task ({steps} steps, seeds {seeds}) | optimizer | final loss per seed | mean | vs float32 | threshold | within |',
         '|---|---|---|---:|---:|---:|:-:|']
  for r in rows:
    per = ', '.join(f'{v:.4f}' for v in r['losses'])
    out.append(f"| {r['task']} | {r['optimizer']} | {per} | {r['mean']:.4f} | "
               f"{r['delta']:+.4f} | {r['threshold']:.4f} | {'yes' if r['within'] else 'NO'} |")
  return '\n'.join(out)


def format_times(rows):
  """The step-time table of :func:`step_times`'s rows, as Markdown."""
  r0 = rows[0]
  out = [f"| optimizer | update, {r0['update_params'] / 1e6:.1f}M params: CPU ms (wall ms) | vs float32, CPU (wall) | "
         f"LM train step, {r0['lm_params'] / 1e3:.0f}k params: CPU ms (wall ms) | vs float32, CPU (wall) |",
         '|---|---:|---:|---:|---:|']
  for r in rows:
    out.append(f"| {r['optimizer']} | {r['update_cpu_ms']:.0f} ({r['update_ms']:.0f}) | "
               f"{r['update_cpu_ratio']:.2f}x ({r['update_ratio']:.2f}x) | "
               f"{r['train_cpu_ms']:.1f} ({r['train_ms']:.1f}) | "
               f"{r['train_cpu_ratio']:.2f}x ({r['train_ratio']:.2f}x) |")
  return '\n'.join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--quick', action='store_true', help='smoke run: few steps, one seed')
  parser.add_argument('--steps', type=int, default=300, help='training steps per task')
  parser.add_argument('--skip-time', action='store_true', help='skip the step-time table')
  parser.add_argument('--only-time', action='store_true', help='only the step-time table')


def run(args: argparse.Namespace) -> int:
  import jax

  seeds = [0] if args.quick else [0, 1, 2]
  steps = 20 if args.quick else args.steps
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, '
        f'load average {os.getloadavg()[0]:.1f}')
  if args.only_time:
    print('\n### Step time (median of interleaved trials)\n')
    print(format_times(step_times(trials=3 if args.quick else 15, lm_steps=2 if args.quick else 10)))
    print(f'\nload average at the end {os.getloadavg()[0]:.1f}')
    return 0
  digits, lm = digits_task(), lm_task()
  key = jax.random.PRNGKey(0)
  models = {
      'digits MLP': jax.eval_shape(digits.init, key),
      'char transformer LM': jax.eval_shape(lm.init, key),
      'GPT-style, d=512, 2 layers': gpt_block_shapes(),
  }
  print('\n### State bytes per parameter\n')
  print(format_bytes(bytes_table(models)))
  print('\n### bf16 second moment after |g| drops 100x (1500 steps)\n')
  for k, v in stall_summary(stall_trajectories(200 if args.quick else 1500)).items():
    print(f'- {k}: {v:.4g} x the true nu')
  print('\n### Training parity\n')
  rows = []
  for task in (digits, lm):
    rows += parity_table(task, seeds, steps)
  print(format_parity(rows, seeds, steps))
  if not args.skip_time:
    print('\n### Step time (median of interleaved trials)\n')
    print(format_times(step_times(trials=3 if args.quick else 15, lm_steps=2 if args.quick else 10)))
  print(f'\nload average at the end {os.getloadavg()[0]:.1f}')
  return 0
