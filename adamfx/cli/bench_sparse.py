"""The ``sparse`` case of ``adamfx bench``: an embedding table, a batch's rows a step.

A ``[num_rows, dim]`` float32 table of which a step touches ``ids`` rows
(the issue's sizes: 2^20 x 64, 4096 ids). Three contenders, in one process,
interleaved repeat by repeat:

- ``dense``: :func:`adamfx.adam` on the scattered (table-sized) gradient, the
  scatter inside the jitted, donated step, as ``jax.grad`` of a lookup gives;
- ``lazy``: :func:`adamfx.lazy_adam` on the :class:`adamfx.RowSparse`
  gradient, jitted and donated;
- ``torch``: ``torch.optim.SparseAdam.step()`` on the same table and ids
  (its gradient set once, a ``torch.sparse_coo_tensor``), when torch is
  installed.

Reported: ms per step, median (min-max) over repeats; the ratios dense/lazy
and torch/lazy, median (min, max) of the per-repeat ratios; and the bytes a
compiled step allocates beyond its donated inputs (``new MiB``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

SIZES = {
    # preset: (num_rows, dim, ids a step)
    'tiny': (1 << 12, 16, 64),
    'default': (1 << 20, 64, 4096),
    'full': (1 << 20, 64, 4096),
}


def _jax_runner(name, tx, table, ids, values, sparse):
  import jax
  import jax.numpy as jnp
  import optax

  from adamfx import RowSparse
  from adamfx.cli.measure import new_bytes as _new_bytes

  num_rows = table.shape[0]

  def step(params, state, ids, values):
    if sparse:
      grad = RowSparse(ids, values, num_rows)
    else:  # what jax.grad of table[ids] gives: a table-sized scatter
      grad = jnp.zeros_like(params).at[ids].add(values)
    updates, state = tx.update(grad, state, params)
    return optax.apply_updates(params, updates), state

  class Runner:
    def __init__(self):
      self.name = name
      self.params = table.copy()
      self.state = tx.init(self.params)
      t = time.perf_counter()
      self.compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
          self.params, self.state, ids, values).compile()
      self.compile_s = time.perf_counter() - t
      self.new_bytes = _new_bytes(self.compiled)
      self.params, self.state = self.compiled(self.params, self.state, ids, values)
      jax.block_until_ready(self.params)

    def time(self, steps):
      t = time.perf_counter()
      for _ in range(steps):
        self.params, self.state = self.compiled(self.params, self.state, ids, values)
      jax.block_until_ready(self.params)
      return (time.perf_counter() - t) / steps

  return Runner()


def _torch_runner(table, ids, values):
  import numpy as np
  import torch

  p = torch.nn.Parameter(torch.from_numpy(np.array(table)))
  p.grad = torch.sparse_coo_tensor(
      torch.from_numpy(np.asarray(ids, np.int64))[None],
      torch.from_numpy(np.array(values)), tuple(p.shape), check_invariants=True,
  )
  opt = torch.optim.SparseAdam([p], lr=1e-3)
  opt.step()

  class Runner:
    name = 'torch'
    compile_s = None
    new_bytes = None

    def time(self, steps):
      t = time.perf_counter()
      for _ in range(steps):
        opt.step()
      return (time.perf_counter() - t) / steps

  return Runner()


def _ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
  r = [a / b for a, b in zip(num, den)]
  return {'median': statistics.median(r), 'min': min(r), 'max': max(r)}


def bench_sparse(preset_name: str, repeats: int, steps: int,
                 torch_cols: bool = True) -> dict[str, Any]:
  """Runs the sparse case; a JSON-ready dict."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import adamfx

  num_rows, dim, k = SIZES.get(preset_name, SIZES['default'])
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(num_rows, dim)).astype(np.float32))
  # A batch's ids: duplicates included, as a batch of tokens has.
  ids = jnp.asarray(rng.integers(0, num_rows, size=k), jnp.int32)
  values = jnp.asarray(rng.normal(size=(k, dim)).astype(np.float32))
  with jax.numpy_dtype_promotion('standard'):
    runners = [
        _jax_runner('dense', adamfx.adam(1e-3), table, ids, values, sparse=False),
        _jax_runner('lazy', adamfx.lazy_adam(1e-3), table, ids, values, sparse=True),
    ]
  if torch_cols:
    try:
      import torch  # noqa: F401

      runners.append(_torch_runner(table, ids, values))
    except ImportError:
      pass
  # Steps per repeat: at least the preset's, and enough for ~0.2 s, so that a
  # 2 ms step is not timed over three calls on a busy machine.
  n_steps = {r.name: max(steps, min(200, int(0.2 / max(r.time(1), 1e-6)))) for r in runners}
  times = {r.name: [] for r in runners}
  for _ in range(repeats):
    for r in runners:
      times[r.name].append(r.time(n_steps[r.name]))
  out = {'num_rows': num_rows, 'dim': dim, 'ids': k, 'repeats': repeats, 'steps': n_steps}
  for r in runners:
    xs = times[r.name]
    out[r.name] = {
        'ms': {'median': statistics.median(xs) * 1e3, 'min': min(xs) * 1e3,
               'max': max(xs) * 1e3},
        'compile_s': r.compile_s, 'new_bytes': r.new_bytes,
    }
  out['dense_over_lazy'] = _ratio_stats(times['dense'], times['lazy'])
  if 'torch' in times:
    out['torch_over_lazy'] = _ratio_stats(times['torch'], times['lazy'])
  return out


def format_sparse(r: dict[str, Any]) -> str:
  """Markdown lines for the sparse case."""

  def ms(name):
    s = r[name]['ms']
    return f'{s["median"]:.3g} ({s["min"]:.3g}-{s["max"]:.3g})'

  def ratio(key):
    s = r[key]
    return f'{s["median"]:.1f}x ({s["min"]:.1f}-{s["max"]:.1f})'

  def mib(name):
    b = r[name]['new_bytes']
    return '-' if b is None else f'{b / 2**20:.1f}'

  lines = [
      '',
      f'sparse: {r["num_rows"]:,} x {r["dim"]} float32 table, {r["ids"]} ids a step,'
      ' jitted and donated; ms per step, median (min-max)',
      '',
      '| dense adamfx.adam ms | lazy_adam ms | torch SparseAdam ms | dense / lazy |'
      ' torch / lazy | new MiB dense / lazy |',
      '|---|---|---|---|---|---|',
      f'| {ms("dense")} | {ms("lazy")} | {ms("torch") if "torch" in r else "-"} |'
      f' {ratio("dense_over_lazy")} |'
      f' {ratio("torch_over_lazy") if "torch_over_lazy" in r else "-"} |'
      f' {mib("dense")} / {mib("lazy")} |',
  ]
  return '\n'.join(lines)
