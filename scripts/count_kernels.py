"""Counts the kernels (fusions and other top-level ops) of compiled Adam steps.

Usage: ``python scripts/count_kernels.py [--layers N]``. For each optimiser
(optax.adam, adamfx.adam, adamfx.adam with bfloat16 state, adamfx.adam8bit)
and each layout (the transformer-like tree of the bench, and adamfx's flat
mode, ``ravel_params``), compiles a jitted, donated step on the default
backend and prints the number of fusions in the entry computation, split by
kind (loop, input = reductions, output), and the other top-level ops that are
kernels or copies. On a GPU each fusion is one kernel launch (a few
microseconds each); on a CPU each is one pass over its operands.
"""

from __future__ import annotations

import argparse
import collections
import re

import jax
import jax.numpy as jnp
import optax

import adamfx
from adamfx.cli import bench as _bench


def entry_ops(compiled) -> collections.Counter:
  """Top-level ops of the entry computation, fusions by kind."""
  text = compiled.as_text()
  entry = text[text.index('\nENTRY'):]
  entry = entry[:entry.index('\n}')]
  ops = collections.Counter()
  for line in entry.splitlines()[1:]:
    m = re.search(r'=\s*\S+\s+(\w[\w-]*)\(', line)
    if not m:
      continue
    op = m.group(1)
    if op in ('parameter', 'tuple', 'get-tuple-element', 'constant', 'bitcast'):
      continue
    if op == 'fusion':
      kind = re.search(r'kind=k(\w+)', line)
      op = f'fusion:{kind.group(1).lower() if kind else "?"}'
    ops[op] += 1
  return ops


def count(tx, params, flat=False) -> collections.Counter:
  if flat:
    params, _ = adamfx.ravel_params(params)
  grads = jax.tree.map(lambda x: x * 0.5, params)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  with jax.numpy_dtype_promotion('standard'):
    state = tx.init(params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
  return entry_ops(compiled)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--layers', type=int, default=10)
  parser.add_argument('--width', type=int, default=64)
  args = parser.parse_args()
  preset = dict(_bench.PRESETS['tiny'], layers=args.layers, width=args.width, vocab=256)
  tree = _bench._trees(preset)['transformer']
  n = len(jax.tree.leaves(tree))
  print(f'backend {jax.default_backend()}, transformer-like tree of {n} leaves')
  contenders = {
      'optax.adam': optax.adam(1e-3),
      'adamfx.adam': adamfx.adam(1e-3),
      'adamfx.adam bf16 state': adamfx.adam(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
      'adamfx.adam8bit': adamfx.adam8bit(1e-3, min_8bit_size=256),
  }
  print('| optimiser | layout | fusions (by kind) | other kernels | total |')
  print('|---|---|---|---|---|')
  for name, tx in contenders.items():
    for flat in (False, True):
      if flat and name.startswith('optax'):
        continue
      ops = count(tx, tree, flat)
      fus = {k.split(':')[1]: v for k, v in ops.items() if k.startswith('fusion:')}
      other = {k: v for k, v in ops.items() if not k.startswith('fusion:')}
      total = sum(ops.values())
      kinds = ', '.join(f'{k} {v}' for k, v in sorted(fus.items()))
      print(f'| {name} | {"flat" if flat else "tree"} | {sum(fus.values())} ({kinds}) |'
            f' {", ".join(f"{k} {v}" for k, v in sorted(other.items())) or "-"} | {total} |')


if __name__ == '__main__':
  main()
