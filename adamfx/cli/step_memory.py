"""What a whole training step holds, per parameter: ``adamfx bench --memory``.

People pick a low-memory Adam to fit a bigger model; what they pay is the
training step's peak, not the optimizer state. For named models, each row
lowers one donated, jitted training step (gradient, optimizer update,
``optax.apply_updates``) from shapes alone (``jax.eval_shape``, nothing is
allocated) and reads XLA's ``memory_analysis()``:

* params, state: the bytes of the (donated) params and optimizer state;
* temporaries: ``temp_size_in_bytes``, what the step allocates besides its
  arguments and outputs (activations, gradients, update-sized buffers);
* peak: ``argument + output - alias + temp``;

all divided by the parameter count, beside the same model's SGD step (same
params dtype): the *SGD floor*. What the optimizer adds beyond its state is
``excess = peak - floor - state``; issue 20's target is ``excess <= 0.5``
bytes per parameter for every member, storage format and rounding mode.

A second table (``--quality``) trains the same rows on a teacher-student
MLP (64-256-256-16, tanh) and the character transformer LM over 3 seeds,
and compares the final loss with float32-params Adam's against the parity
threshold ``max(1% of float32's mean, its seed spread)``. ``--overhead``
times the jitted, donated step of each rounding mode against round-to-
nearest, the optimizer step alone and the training step (median ratio of
interleaved trials, wall and process CPU time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

MODELS = ('mlp', 'charlm')
QUALITY_TASKS = ('teacher-student', 'charlm')


# ------------------------------------------------------------------ models


@dataclasses.dataclass
class Model:
  name: str
  params: Callable[[Any], Any]  # params dtype -> ShapeDtypeStruct tree
  loss: Callable[[Any, Any], Any]  # params, batch -> scalar
  batch: Any  # ShapeDtypeStruct tree


def mlp_model(width: int = 1024, layers: int = 8, batch: int = 64) -> Model:
  """An ``layers``-deep, ``width``-wide tanh MLP computing in bfloat16 (issue 20's)."""
  import jax
  import jax.numpy as jnp

  def params(dtype):
    s = jax.ShapeDtypeStruct
    return {
        f'layer{i}': {'w': s((width, width), dtype), 'b': s((width,), dtype)}
        for i in range(layers)
    }

  def loss(params, batch):
    x, y = batch
    h = x.astype(jnp.bfloat16)
    for i in range(layers):
      p = params[f'layer{i}']
      h = h @ p['w'].astype(jnp.bfloat16) + p['b'].astype(jnp.bfloat16)
      if i < layers - 1:
        h = jnp.tanh(h)
    d = h.astype(jnp.float32) - y
    return jnp.mean(d * d)

  b = (jax.ShapeDtypeStruct((batch, width), jnp.float32),
       jax.ShapeDtypeStruct((batch, width), jnp.float32))
  return Model(f'MLP {layers}x{width} (bf16 compute, batch {batch})', params, loss, b)


def _lm_module():
  from adamfx.cli import memory  # the character LM task lives with the memory bench

  return memory


def charlm_model(d: int = 256, layers: int = 4, batch: int = 32, context: int = 64) -> Model:
  """The character transformer of the existing bench, sized up (bf16 compute)."""
  import jax
  import jax.numpy as jnp

  task = _lm_module().lm_task(d=d, layers=layers, heads=4, context=context, batch_size=batch)
  shapes = jax.eval_shape(task.init, jax.random.PRNGKey(0))

  def params(dtype):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), shapes)

  def loss(params, batch):
    return task.loss(jax.tree.map(lambda p: p.astype(jnp.bfloat16), params), batch)

  b = jax.ShapeDtypeStruct((batch, context + 1), jnp.int32)
  return Model(f'char transformer d={d} L={layers} (bf16 compute, batch {batch})', params,
               loss, b)


def model(name: str) -> Model:
  return {'mlp': mlp_model, 'charlm': charlm_model}[name]()


# -------------------------------------------------------------------- rows


def rows() -> list[tuple[str, str, Callable[[], Any]]]:
  """``(label, params dtype name, make_tx)`` of the optimizers compared."""
  import jax.numpy as jnp
  import optax

  import adamfx

  lr = 1e-3
  bf = jnp.bfloat16
  out = [
      ('optax.adam', 'float32', lambda: optax.adam(lr)),
      ('adamfx.adam', 'float32', lambda: adamfx.adam(lr)),
      ('adamfx.adam bf16 moments', 'float32',
       lambda: adamfx.adam(lr, mu_dtype=bf, nu_dtype=bf)),
      ('adamfx.adam8bit', 'float32', lambda: adamfx.adam8bit(lr)),
      ('adamfx.adam4bit', 'float32', lambda: adamfx.adam4bit(lr)),
  ]
  for mode in ('nearest', 'kahan', 'stochastic'):
    out += [
        (f'adamfx.{name} {mode}', 'bfloat16', lambda m=mode, b=builder: b(lr, param_rounding=m))
        for name, builder in (('adam', adamfx.adam), ('adam8bit', adamfx.adam8bit),
                              ('adam4bit', adamfx.adam4bit))
    ]
  # Gradient accumulation over k=4 micro-batches.
  out.append(('optax.MultiSteps(adamfx.adam, 4)', 'float32',
              lambda: optax.MultiSteps(adamfx.adam(lr), 4)))
  for acc in ('float32', 'bfloat16'):
    out.append((f'adamfx.MultiSteps(adam, 4, acc_dtype={acc})', 'float32',
                lambda a=acc: adamfx.MultiSteps(adamfx.adam(lr), 4, acc_dtype=jnp.dtype(a))))
  out.append(("adamfx.MultiSteps(adam, 4, accumulate='optimizer')", 'float32',
              lambda: adamfx.MultiSteps(adamfx.adam(lr), 4, accumulate='optimizer')))
  out.append(("adamfx.MultiSteps(adam8bit kahan, 4, acc bf16)", 'bfloat16',
              lambda: adamfx.MultiSteps(adamfx.adam8bit(lr, param_rounding='kahan'), 4,
                                        acc_dtype=jnp.bfloat16)))
  return out


# ---------------------------------------------------------------- measuring


def lowered_step(m: Model, tx: Any, params_dtype: Any) -> Any:
  """One donated training step of ``m`` with ``tx``, compiled from shapes."""
  import jax
  import optax

  params = m.params(params_dtype)
  state = jax.eval_shape(tx.init, params)

  def step(params, state, batch):
    grads = jax.grad(m.loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, m.batch).compile(), params, state


def _nbytes(tree: Any) -> int:
  import jax

  return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def measure(m: Model, tx: Any, params_dtype: Any) -> dict[str, float]:
  """Bytes per parameter of ``tx``'s step on ``m``: params, state, temporaries, peak."""
  import jax

  compiled, params, state = lowered_step(m, tx, params_dtype)
  a = compiled.memory_analysis()
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  peak = a.argument_size_in_bytes + a.output_size_in_bytes - a.alias_size_in_bytes
  peak += a.temp_size_in_bytes
  return {
      'n': n, 'params': _nbytes(params) / n, 'state': _nbytes(state) / n,
      'temporaries': a.temp_size_in_bytes / n, 'peak': peak / n,
  }


def sgd_floor(m: Model, params_dtype: Any) -> dict[str, float]:
  import optax

  return measure(m, optax.sgd(1e-3), params_dtype)


def memory_table(models: list[Any], only: list[str] | None = None) -> list[dict[str, Any]]:
  """One row per (model, optimizer): bytes per param and the SGD floor beside it.

  ``models``: names in :data:`MODELS` or :class:`Model` objects; ``only``:
  keep the rows whose label contains one of these strings.
  """
  import jax.numpy as jnp

  out = []
  for name in models:
    m = name if isinstance(name, Model) else model(name)
    floors = {}
    for label, dtype, make in rows():
      if only and not any(o in label for o in only):
        continue
      if dtype not in floors:
        floors[dtype] = sgd_floor(m, jnp.dtype(dtype))['peak']
      r = measure(m, make(), jnp.dtype(dtype))
      r.update(model=m.name, optimizer=label, params_dtype=dtype, sgd_floor=floors[dtype])
      r['excess'] = r['peak'] - r['sgd_floor'] - r['state']
      out.append(r)
  return out


def format_memory(table: list[dict[str, Any]]) -> str:
  lines = []
  model_name = None
  for r in table:
    if r['model'] != model_name:
      model_name = r['model']
      lines += ['', f'### {model_name}: {r["n"] / 1e6:.2f}M params, bytes per param', '',
                '| optimizer | params dtype | params | state | temporaries | peak |'
                ' SGD floor | excess (peak - floor - state) |',
                '|---|---|---|---|---|---|---|---|']
    lines.append(
        f'| {r["optimizer"]} | {r["params_dtype"]} | {r["params"]:.2f} | {r["state"]:.2f} |'
        f' {r["temporaries"]:.2f} | {r["peak"]:.2f} | {r["sgd_floor"]:.2f} |'
        f' {r["excess"]:+.2f} |'
    )
  return '\n'.join(lines)


# ----------------------------------------------------------------- quality


def teacher_student(batch: int = 256):
  """A 64-256-256-16 tanh student fitting a fixed random teacher of the same shape."""
  import jax
  import jax.numpy as jnp

  sizes = (64, 256, 256, 16)

  def init(key):
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
      key, sub = jax.random.split(key)
      params[f'w{i}'] = jax.random.normal(sub, (a, b), jnp.float32) * np.float32(a**-0.5)
      params[f'b{i}'] = jnp.zeros((b,), jnp.float32)
    return params

  teacher = init(jax.random.PRNGKey(12345))

  def forward(params, x):
    h = x
    for i in range(len(sizes) - 1):
      h = h @ params[f'w{i}'].astype(jnp.float32) + params[f'b{i}'].astype(jnp.float32)
      if i < len(sizes) - 2:
        h = jnp.tanh(h)
    return h

  def loss(params, x):
    d = forward(params, x) - forward(teacher, x)
    return jnp.mean(d * d)

  x_eval = jax.random.normal(jax.random.PRNGKey(777), (2048, 64), jnp.float32)

  def sample(key):
    return jax.random.normal(key, (batch, 64), jnp.float32)

  return init, loss, sample, lambda p: loss(p, x_eval)


def train(init, loss, sample, final, make_tx, params_dtype, seeds, steps):
  """Final losses per seed: all seeds vmapped, the steps scanned, one jit."""
  import jax
  import jax.numpy as jnp
  import optax

  tx = make_tx()

  def one(seed):
    key = jax.random.PRNGKey(seed)
    params = jax.tree.map(lambda p: p.astype(params_dtype), init(jax.random.fold_in(key, 0)))
    state = tx.init(params)

    def body(carry, i):
      params, state = carry
      batch = sample(jax.random.fold_in(jax.random.fold_in(key, 1), i))
      grads = jax.grad(loss)(params, batch)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(body, (params, state), jnp.arange(steps))
    return final(jax.tree.map(lambda p: p.astype(jnp.float32), params))

  return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(seeds)), np.float64)


def quality_rows(lr: float):
  import jax.numpy as jnp

  import adamfx

  bf = jnp.bfloat16
  out = [
      ('adamfx.adam, float32 params (reference)', jnp.float32, lambda: adamfx.adam(lr)),
      ('adamfx.adam bf16 moments, float32 params', jnp.float32,
       lambda: adamfx.adam(lr, mu_dtype=bf, nu_dtype=bf)),
      ('adamfx.adam8bit, float32 params', jnp.float32, lambda: adamfx.adam8bit(lr)),
  ]
  for mode in ('nearest', 'kahan', 'stochastic'):
    out += [
        (f'adamfx.adam, bf16 params, {mode}', bf, lambda m=mode: adamfx.adam(lr, param_rounding=m)),
        (f'adamfx.adam8bit, bf16 params, {mode}', bf,
         lambda m=mode: adamfx.adam8bit(lr, param_rounding=m)),
    ]
  return out


def quality_table(tasks: list[str], seeds: int = 3, steps: dict[str, int] | None = None,
                  only: list[str] | None = None, progress: bool = False) -> list[dict[str, Any]]:
  """Final loss over ``seeds`` seeds per row and task, against float32 params' Adam."""
  import jax

  steps = {'teacher-student': 3000, 'charlm': 600, **(steps or {})}
  out = []
  for task in tasks:
    if task == 'teacher-student':
      init, loss, sample, final = teacher_student()
      lr = 1e-3
    else:
      t = _lm_module().lm_task()
      init, loss, sample, final = t.init, t.loss, t.batch, t.final_loss
      lr = t.learning_rate
    ref = None
    for label, dtype, make in quality_rows(lr):
      if only and ref is not None and not any(o in label for o in only):
        continue
      losses = train(init, loss, sample, final, make, dtype, list(range(seeds)), steps[task])
      row = {'task': task, 'steps': steps[task], 'optimizer': label,
             'mean': float(losses.mean()), 'spread': float(losses.max() - losses.min())}
      if ref is None:
        ref = row
        row['threshold'] = max(0.01 * row['mean'], row['spread'])
      row['gap'] = row['mean'] - ref['mean']
      row['within'] = bool(abs(row['gap']) <= ref['threshold'])  # as adamfx memory's parity
      out.append(row)
      if progress:
        print(f'  {task}: {label}: {row["mean"]:.5f}', file=sys.stderr, flush=True)
    jax.clear_caches()
  return out


def format_quality(table: list[dict[str, Any]]) -> str:
  lines = []
  task = None
  for r in table:
    if r['task'] != task:
      task = r['task']
      lines += ['', f'### {task}: final loss over seeds ({r["steps"]} steps);'
                f' parity threshold {r["threshold"]:.2e}', '',
                '| optimizer | mean | seed spread | gap vs float32 params | within |',
                '|---|---|---|---|---|']
    lines.append(f'| {r["optimizer"]} | {r["mean"]:.5f} | {r["spread"]:.5f} |'
                 f' {r["gap"]:+.5f} ({100 * r["gap"] / (r["mean"] - r["gap"]):+.1f}%) |'
                 f' {"yes" if r["within"] else "NO"} |')
  return '\n'.join(lines)


# ---------------------------------------------------------------- overhead


def overhead(trials: int = 9, inner: int = 5) -> list[dict[str, Any]]:
  """Time of Kahan/stochastic param rounding over round-to-nearest, same member.

  On bfloat16 params of a 4x512 MLP (bfloat16 compute, batch 64), per member
  (adam, adam8bit) and mode, two jitted steps with params and state donated:
  the optimizer step alone (``tx.update`` + ``optax.apply_updates`` on fixed
  gradients) and the whole training step (gradient, update,
  ``apply_updates``). Trials are interleaved (each trial runs every mode of
  a member ``inner`` times in turn), and each trial's time is divided by the
  same trial's ``'nearest'`` time: the ratio's median, min and max, of the
  wall time and of the process CPU time (all of XLA's threads; on a shared
  machine the wall time mostly measures the other processes, the CPU time
  the work done).
  """
  import jax
  import jax.numpy as jnp
  import optax

  import adamfx

  m = mlp_model(width=512, layers=4)
  members = {'adam': lambda mode: adamfx.adam(1e-3, param_rounding=mode),
             'adam8bit': lambda mode: adamfx.adam8bit(1e-3, param_rounding=mode)}
  modes = ('nearest', 'kahan', 'stochastic')
  key = jax.random.PRNGKey(0)
  out = []
  for member, make in members.items():
    runs = {}
    for mode in modes:
      tx = make(mode)
      train_step, pshape, _ = lowered_step(m, tx, jnp.bfloat16)

      def opt_step(params, state, grads, tx=tx):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

      params = jax.tree.map(
          lambda s: (jax.random.normal(key, s.shape, jnp.float32) * 0.03).astype(s.dtype), pshape)
      grads = jax.tree.map(lambda p: p * jnp.asarray(0.01, p.dtype), params)
      opt_compiled = jax.jit(opt_step, donate_argnums=(0, 1)).lower(
          params, jax.eval_shape(tx.init, params), grads).compile()
      batch = tuple(jax.random.normal(key, b.shape, b.dtype) for b in m.batch)
      for kind, compiled, data in (('optimizer step', opt_compiled, grads),
                                   ('training step', train_step, batch)):
        p = jax.tree.map(lambda x: x.copy(), params)
        runs[kind, mode] = [compiled, p, tx.init(p), data]
    for r in runs.values():  # warm up
      r[1], r[2] = r[0](r[1], r[2], r[3])
      jax.block_until_ready(r[1])
    times = {k: [] for k in runs}
    for _ in range(trials):
      for k, r in runs.items():
        compiled, params, state, data = r
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(inner):
          params, state = compiled(params, state, data)
        jax.block_until_ready(params)
        times[k].append(((time.perf_counter() - w0) / inner, (time.process_time() - c0) / inner))
        r[1], r[2] = params, state
    for kind in ('optimizer step', 'training step'):
      base = np.asarray(times[kind, 'nearest'])
      for mode in modes[1:]:
        t = np.asarray(times[kind, mode])
        ratios = t / base  # trial by trial; columns: wall, CPU
        out.append({
            'member': member, 'kind': kind, 'mode': mode, 'trials': trials,
            'nearest_ms': float(np.median(base[:, 0]) * 1e3),
            'nearest_cpu_ms': float(np.median(base[:, 1]) * 1e3),
            'ms': float(np.median(t[:, 0]) * 1e3), 'cpu_ms': float(np.median(t[:, 1]) * 1e3),
            'ratio_median': float(np.median(ratios[:, 0])), 'ratio_min': float(ratios[:, 0].min()),
            'ratio_max': float(ratios[:, 0].max()),
            'cpu_ratio_median': float(np.median(ratios[:, 1])),
            'cpu_ratio_min': float(ratios[:, 1].min()), 'cpu_ratio_max': float(ratios[:, 1].max()),
        })
  return out


def format_overhead(table: list[dict[str, Any]]) -> str:
  lines = ['', f'### Param rounding / nearest: bf16 params, MLP 4x512, jitted donated steps,'
           f' {table[0]["trials"]} interleaved trials', '',
           '| member | step | mode | nearest CPU ms (wall) | mode CPU ms (wall) |'
           ' CPU ratio median (min-max) | wall ratio median (min-max) |',
           '|---|---|---|---|---|---|---|']
  for r in table:
    lines.append(
        f'| {r["member"]} | {r["kind"]} | {r["mode"]} | {r["nearest_cpu_ms"]:.2f}'
        f' ({r["nearest_ms"]:.2f}) | {r["cpu_ms"]:.2f} ({r["ms"]:.2f}) |'
        f' {r["cpu_ratio_median"]:.2f} ({r["cpu_ratio_min"]:.2f}-{r["cpu_ratio_max"]:.2f}) |'
        f' {r["ratio_median"]:.2f} ({r["ratio_min"]:.2f}-{r["ratio_max"]:.2f}) |')
  return '\n'.join(lines)


# --------------------------------------------------------------------- CLI


def add_arguments(parser: Any, json_flag: bool = True) -> None:
  parser.add_argument('--models', nargs='+', choices=MODELS, default=['mlp'],
                      help='mlp: 8x1024 MLP (default, a few minutes on 2 cores); charlm: the'
                           ' character transformer (d=256, 4 layers)')
  parser.add_argument('--only', nargs='+', default=None,
                      help='keep the rows whose label contains one of these strings')
  parser.add_argument('--quality', action='store_true',
                      help='also train the rows (teacher-student MLP, char LM; 3 seeds)')
  parser.add_argument('--quality-steps', type=int, default=None,
                      help='steps per quality run (default 3000 MLP, 600 LM)')
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--quality-tasks', nargs='+', choices=QUALITY_TASKS,
                      default=list(QUALITY_TASKS), help='the --quality tasks (default: both)')
  parser.add_argument('--overhead', action='store_true',
                      help='time Kahan/stochastic against nearest (jitted donated optimizer'
                           ' step and training step)')
  parser.add_argument('--no-table', action='store_true',
                      help='skip the memory table (run only --quality / --overhead)')
  if json_flag:
    parser.add_argument('--json', action='store_true', help='print JSON instead of tables')


def run(args: argparse.Namespace) -> int:
  from adamfx.cli import measure as _measure

  result = {'machine': _measure.machine()}
  if not getattr(args, 'no_table', False):
    result['memory'] = memory_table(list(args.models), args.only)
  if getattr(args, 'quality', False):
    steps = None
    if args.quality_steps:
      steps = {'teacher-student': args.quality_steps, 'charlm': args.quality_steps}
    tasks = getattr(args, 'quality_tasks', None) or list(QUALITY_TASKS)
    result['quality'] = quality_table(tasks, args.seeds, steps, args.only, progress=True)
  if getattr(args, 'overhead', False):
    result['overhead'] = overhead()
  if args.json:
    print(json.dumps(result, indent=1))
    return 0
  print(f'## Whole-step memory ({_measure.describe(result["machine"])})')
  if 'memory' in result:
    print(format_memory(result['memory']))
  if 'quality' in result:
    print(format_quality(result['quality']))
  if 'overhead' in result:
    print(format_overhead(result['overhead']))
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='adamfx bench --memory', description=__doc__)
  add_arguments(parser)
  return run(parser.parse_args(argv))


if __name__ == '__main__':
  raise SystemExit(main())
