"""Figures of the memory guide's gradient-accumulation section.

Memory: bytes per parameter of one donated, jitted training step (forward,
backward, update, apply_updates) from ``compile().memory_analysis()``, k = 4,
for optax.MultiSteps and adamfx.MultiSteps (float32 and bfloat16
accumulators, optimizer accumulation), next to the same step without
accumulation. Quality: final loss of the character LM (micro-batches of 8,
k = 4) over 3 seeds, true accumulation against optimizer accumulation.

    PYTHONPATH=. python scripts/multisteps_measure.py [--memory-only | --quality-only]
        [--steps 300] [--only bfloat16]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamfx
from adamfx.cli import measure as _measure
from adamfx.cli import memory as _memory_bench


def _rows(make):
  ms = adamfx.MultiSteps
  return {
      'no accumulation': make,
      'optax.MultiSteps': lambda: optax.MultiSteps(make(), 4).gradient_transformation(),
      'adamfx.MultiSteps float32': lambda: ms(make(), 4).gradient_transformation(),
      'adamfx.MultiSteps bfloat16': lambda: ms(make(), 4, acc_dtype=jnp.bfloat16)
      .gradient_transformation(),
      'adamfx.MultiSteps float16': lambda: ms(make(), 4, acc_dtype=jnp.float16)
      .gradient_transformation(),
      "adamfx.MultiSteps accumulate='optimizer'": lambda: ms(make(), 4, accumulate='optimizer')
      .gradient_transformation(),
  }


def _acc_bytes(state):
  acc = getattr(state, 'acc_grads', ())
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(acc))


def memory_table(name, loss, params, batch, make):
  n = sum(x.size for x in jax.tree.leaves(params))
  pbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  out = []
  for row, factory in _rows(make).items():
    tx = factory()
    with jax.numpy_dtype_promotion('standard'):
      state = jax.eval_shape(tx.init, params)

      def step(p, s, b, tx=tx):
        u, s = tx.update(jax.grad(loss)(p, b), s, p)
        return optax.apply_updates(p, u), s

      m = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, batch).compile()
    m = m.memory_analysis()
    sbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    acc = _acc_bytes(state)
    new = m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    out.append({'model': name, 'row': row, 'params': pbytes / n, 'state': (sbytes - acc) / n,
                'acc': acc / n, 'temp': new / n,
                'peak': (m.argument_size_in_bytes + new) / n, 'n': n})
  base = out[0]
  for r in out:
    r['over'] = r['peak'] - base['peak'] - r['acc']
  return out


def _mlp():
  sizes = (256, 1024, 1024, 1024, 256)
  params = {}
  for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f'w{i}'] = jax.ShapeDtypeStruct((m, n), jnp.float32)
    params[f'b{i}'] = jax.ShapeDtypeStruct((n,), jnp.float32)

  def loss(p, x):
    h = x
    for i in range(len(sizes) - 1):
      h = h @ p[f'w{i}'] + p[f'b{i}']
      if i < len(sizes) - 2:
        h = jax.nn.relu(h)
    return jnp.mean(h * h)

  return loss, params, jax.ShapeDtypeStruct((8, sizes[0]), jnp.float32)


def _gpt():
  task = _memory_bench.lm_task(d=256, layers=5, heads=4, context=64, batch_size=2)
  params = jax.eval_shape(task.init, jax.random.PRNGKey(0))
  batch = jax.eval_shape(task.batch, jax.random.PRNGKey(0))
  return task.loss, params, batch


def quality(steps, seeds=(0, 1, 2), only=None):
  task = _memory_bench.lm_task(batch_size=8)
  ms = adamfx.MultiSteps
  variants = {
      'gradient accumulation, float32': lambda lr: ms(adamfx.adam(lr), 4)
      .gradient_transformation(),
      'gradient accumulation, bfloat16': lambda lr: ms(adamfx.adam(lr), 4,
                                                       acc_dtype=jnp.bfloat16)
      .gradient_transformation(),
      'optimizer accumulation': lambda lr: ms(adamfx.adam(lr), 4, accumulate='optimizer')
      .gradient_transformation(),
  }
  return {name: _memory_bench.train(task, f, list(seeds), 4 * steps)
          for name, f in variants.items() if only is None or only in name}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--memory-only', action='store_true')
  parser.add_argument('--steps', type=int, default=300, help='updates (k = 4 mini-steps each)')
  parser.add_argument('--only', default=None,
                      help='train only the quality rows whose name contains this string')
  parser.add_argument('--quality-only', action='store_true', help='skip the memory tables')
  args = parser.parse_args()
  print(_measure.describe(_measure.machine()))
  for name, (loss, params, batch) in {'MLP 256-1024-1024-1024-256, batch 8': _mlp(),
                                      'GPT-like LM d=256 x5, batch 2 x 64': _gpt()}.items():
    if args.quality_only:
      break
    for inner, make in {'adam': lambda: adamfx.adam(1e-3),
                        'adam8bit': lambda: adamfx.adam8bit(1e-3)}.items():
      rows = memory_table(name, loss, params, batch, make)
      print(f'\n{name}, {rows[0]["n"] / 1e6:.2f}M params, inner adamfx.{inner}, k=4 (B/param)')
      print('| step | params | state | accumulator | temporaries | peak | over no-acc + acc |')
      print('|---|---:|---:|---:|---:|---:|---:|')
      for r in rows:
        print(f'| {r["row"]} | {r["params"]:.2f} | {r["state"]:.2f} | {r["acc"]:.2f} |'
              f' {r["temp"]:.2f} | {r["peak"]:.2f} | {r["over"]:+.2f} |')
  if args.memory_only:
    return
  print(f'\nchar LM, micro-batch 8, k = 4, {args.steps} updates, seeds 0 1 2: final loss')
  for name, losses in quality(args.steps, only=args.only).items():
    print(f'| {name} | {np.mean(losses):.4f} | {" ".join(f"{x:.4f}" for x in losses)} |')


if __name__ == '__main__':
  main()
