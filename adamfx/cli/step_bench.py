"""``adamfx bench --in-step``: the optimiser's cost inside a real training step.

A bench of the update alone (``adamfx bench``) shows what an optimiser costs
where nothing else runs; users feel it inside a step that also runs the
forward and backward passes, which share the memory bandwidth and may hide
or expose the update's passes. This times a jitted, donated training step
(forward, backward, update, ``apply_updates``) of a small character
transformer language model (:func:`adamfx.cli.memory.lm_task`), with its
params in float32 and in bfloat16, for each optimiser and for plain SGD, all
interleaved repeat by repeat, and reports each optimiser's *marginal cost*:
its step's time minus the SGD step's (median, with the min and max of the
repeat-by-repeat differences).

``torch.optim.Adam(fused=True)`` (when torch is installed) is timed on
tensors of the model's parameter shapes and dtype: its update is a separate
call from the forward and backward passes, so its step time is its marginal
cost in a torch training step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from adamfx.cli import measure as _measure

PRESETS = {
    # width, layers, heads, context, batch (sequences), repeats, steps per repeat
    'tiny': dict(d=32, layers=1, heads=2, context=16, batch=2, repeats=2, steps=2),
    # Large embedding-free weights, small batch: the update is a visible part
    # of the step (about 1.6M params).
    'default': dict(d=256, layers=2, heads=4, context=32, batch=4, repeats=7, steps=5),
    'full': dict(d=512, layers=4, heads=8, context=64, batch=8, repeats=7, steps=5),
}


def contenders() -> dict[str, Any]:
  """name -> () -> optax transformation; 'sgd' is the baseline."""
  import jax.numpy as jnp
  import optax

  import adamfx

  return {
      'sgd': lambda: optax.sgd(1e-3),
      'optax.adam': lambda: optax.adam(1e-3),
      'adamfx.adam': lambda: adamfx.adam(1e-3),
      'adamfx bf16 state': lambda: adamfx.adam(
          1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
      'adamfx.adam8bit': lambda: adamfx.adam8bit(1e-3),
  }


class _Step:
  """One optimiser's jitted, donated training step, compiled once."""

  def __init__(self, task, tx, params, batch):
    import jax
    import optax

    self.batch = batch
    self.params = jax.tree.map(lambda x: x.copy(), params)
    with jax.numpy_dtype_promotion('standard'):
      self.state = tx.init(self.params)

    def step(params, state, batch):
      with jax.numpy_dtype_promotion('standard'):
        loss, grads = jax.value_and_grad(task.loss)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    t = time.perf_counter()
    with jax.numpy_dtype_promotion('standard'):
      self.compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
          self.params, self.state, batch).compile()
    self.compile_s = time.perf_counter() - t
    self.loss = None
    self.run()

  def run(self):
    self.params, self.state, self.loss = self.compiled(self.params, self.state, self.batch)
    return self.loss

  def time(self, steps: int) -> float:
    import jax

    t = time.perf_counter()
    for _ in range(steps):
      out = self.run()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / steps


class _TorchStep:
  """``torch.optim.Adam(fused=True)`` on tensors of the model's shapes."""

  def __init__(self, params):
    import jax
    import numpy as np
    import torch

    dtypes = {'float32': torch.float32, 'bfloat16': torch.bfloat16}
    cuda = jax.default_backend() == 'gpu' and torch.cuda.is_available()
    device = 'cuda' if cuda else 'cpu'
    self.sync = torch.cuda.synchronize if cuda else (lambda: None)
    ps = []
    for x in jax.tree.leaves(params):
      t = torch.from_numpy(np.asarray(x, np.float32).copy()).to(device, dtypes[x.dtype.name])
      p = torch.nn.Parameter(t)
      p.grad = torch.full_like(t, 1e-3)
      ps.append(p)
    self.opt = torch.optim.Adam(ps, lr=1e-3, fused=True)
    self.opt.step()
    self.compile_s = None

  def time(self, steps: int) -> float:
    import torch

    with torch.no_grad():
      self.sync()
      t = time.perf_counter()
      for _ in range(steps):
        self.opt.step()
      self.sync()
      return (time.perf_counter() - t) / steps


def bench(preset_name: str = 'default', dtypes=('float32', 'bfloat16'), repeats=None,
          torch_cols: bool = True, progress=None, names=None) -> dict[str, Any]:
  """Runs the in-step bench; returns a JSON-ready dict with ``rows``.

  ``names`` picks optimisers of :func:`contenders` (default all; SGD, the
  baseline, always runs).
  """
  import jax
  import jax.numpy as jnp

  from adamfx.cli import memory as _memory_bench

  preset = dict(PRESETS[preset_name])
  if repeats:
    preset['repeats'] = repeats
  if torch_cols:
    try:
      import torch  # noqa: F401
    except ImportError:
      torch_cols = False
  task = _memory_bench.lm_task(preset['d'], preset['layers'], preset['heads'],
                               preset['context'], preset['batch'])
  params32 = task.init(jax.random.PRNGKey(0))
  batch = task.batch(jax.random.PRNGKey(1))
  tick = progress or (lambda *a: None)
  rows = []
  for k, dtype in enumerate(dtypes):
    tick(k, len(dtypes), f'in-step, {dtype} params')
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params32)
    steps = {name: _Step(task, make(), params, batch) for name, make in contenders().items()
             if names is None or name in names or name == 'sgd'}
    if torch_cols:
      steps['torch Adam(fused=True)'] = _TorchStep(params)
    times = {name: [] for name in steps}
    for _ in range(preset['repeats']):  # interleaved: a busy machine slows all alike
      for name, s in steps.items():
        times[name].append(s.time(preset['steps']))
    sgd = times['sgd']
    row = {'dtype': dtype, 'params': sum(x.size for x in jax.tree.leaves(params)),
           'leaves': len(jax.tree.leaves(params)),
           'sgd_step_ms': _measure.stats(sgd), 'optimisers': {}}
    for name, ts in times.items():
      if name == 'sgd':
        continue
      if name.startswith('torch'):
        marginal = ts  # a separate call: its step is its marginal cost
        step_ms = None
      else:
        marginal = [t - b for t, b in zip(ts, sgd)]  # repeat by repeat
        step_ms = _measure.stats(ts)
      row['optimisers'][name] = {
          'step_ms': step_ms, 'marginal_ms': _measure.stats(marginal),
          'compile_s': steps[name].compile_s,
          'final_loss': None if steps[name].compile_s is None else float(steps[name].loss),
      }
    rows.append(row)
  tick(len(dtypes), len(dtypes), 'done')
  return {'preset': preset_name, 'sizes': preset, 'rows': rows, 'machine': _measure.machine()}


def format_table(result: dict[str, Any]) -> str:
  m = result['machine']
  s = result['sizes']
  lines = [
      f'adamfx bench --in-step --preset {result["preset"]}: {_measure.describe(m)}',
      f'char transformer LM: width {s["d"]}, {s["layers"]} layers, context {s["context"]},'
      f' batch {s["batch"]}; ms: median (min-max) of {s["repeats"]} interleaved repeats of'
      f' {s["steps"]} steps. Marginal: step minus the SGD step, repeat by repeat.',
      '',
      '| params | optimiser | step ms | marginal ms (optimiser) | marginal / optax.adam |',
      '|---|---|---|---|---|',
  ]
  for r in result['rows']:
    ref = r['optimisers'].get('optax.adam', {'marginal_ms': {'median': float('nan')}})
    ref = ref['marginal_ms']['median']
    lines.append(f'| {r["dtype"]} ({r["params"]:,}, {r["leaves"]} leaves) | sgd |'
                 f' {_fmt(r["sgd_step_ms"])} | - | - |')
    for name, o in r['optimisers'].items():
      step = '-' if o['step_ms'] is None else _fmt(o['step_ms'])
      # optax's marginal cost at or below 0 is noise: no ratio to quote.
      rel = f'{o["marginal_ms"]["median"] / ref:.2f}' if ref > 0 else 'n/a (noise)'
      lines.append(f'| {r["dtype"]} | {name} | {step} | {_fmt(o["marginal_ms"])} | {rel} |')
  return '\n'.join(lines)


def _fmt(s: dict[str, float]) -> str:
  return f'{s["median"]:.3g} ({s["min"]:.3g} to {s["max"]:.3g})'


def run(args: argparse.Namespace) -> int:
  preset = args.preset if args.preset in PRESETS else 'default'

  def tick(k, total, label):
    print(f'[{k}/{total}] {label}', file=sys.stderr, flush=True)

  result = bench(preset, repeats=args.repeats, torch_cols=not args.no_torch, progress=tick)
  print(json.dumps(result, indent=1) if args.json else format_table(result))
  return 0
