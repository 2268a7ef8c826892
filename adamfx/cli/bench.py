"""``adamfx bench``: time an Adam step, adamfx against optax, in one process.

An Adam step is memory traffic: per parameter it reads the gradient, both
moments and the parameter and writes three of them back, 7 words. The bench
times adamfx and optax (and ``torch.optim.Adam``, foreach and fused, when
torch is installed) on the same trees, interleaved repeat by repeat so that a
busy machine slows both alike, and reports the median (min, max) ms per step,
the ratio adamfx / optax, the effective bandwidth against the machine's own
(a multi-threaded axpy measured in the same run), compile time and the new
memory a compiled step allocates.

Shapes: one large leaf; a transformer-like tree (121 leaves at the full
preset); thousands of tiny leaves (with the per-leaf floor: a jitted
``p - 1e-3 * g`` over the same tree, one loop per leaf); mixed float32 /
bfloat16. Modes: jitted with donated params and state, jitted without
donation, and eager ``update`` calls. ``flat`` rows run adamfx on the params
packed by :func:`adamfx.ravel_params` (one buffer per dtype) against optax on
the tree; ``packed`` rows run :func:`adamfx.pack_state` (tree-shaped params
and updates, moments packed per dtype).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

from adamfx.cli.measure import describe as _describe_machine
from adamfx.cli.measure import machine as _machine
from adamfx.cli.measure import new_bytes as _new_bytes
from adamfx.cli.measure import stats as _stats

PRESETS = {
    # name: large leaf size, transformer (layers, width, vocab), tiny leaves
    # (count, size), axpy size, repeats, steps per repeat.
    'tiny': dict(large=1 << 12, layers=1, width=8, vocab=16, tiny=(12, 16),
                 axpy=1 << 18, repeats=2, steps=2),
    # Smaller than the sizes, so that it runs in minutes: compiling
    # a step over many leaves dominates (seconds per hundred leaves).
    'default': dict(large=1 << 22, layers=2, width=256, vocab=1024, tiny=(100, 64),
                    axpy=1 << 24, repeats=5, steps=3),
    'full': dict(large=1 << 24, layers=10, width=640, vocab=8192, tiny=(2000, 64),
                 axpy=1 << 25, repeats=7, steps=5),
}
MODES = ('jit+donate', 'jit', 'eager')
TREE_CASES = ('large', 'transformer', 'tiny', 'mixed')


@dataclasses.dataclass(frozen=True)
class Case:
  """A bench row: one adamfx optimiser against a baseline, on one tree.

  Registered with :func:`register_case` (one line, from any module imported
  by this one), a case becomes a ``--cases`` choice and a row of the table,
  timed jitted and donated, interleaved with its baseline.

  Attributes:
    name: the ``--cases`` name and the table's row label.
    tree: ``(trees, preset) -> params``, with ``trees`` the bench's own trees
      (:func:`_trees`) and ``preset`` the sizes.
    baseline: ``() -> (label, transformation)``: the reference column.
    adamfx: ``() -> transformation``: the adamfx column.
    description: what the row shows, for ``--help`` and the performance guide.
  """

  name: str
  tree: Callable[[dict[str, Any], dict[str, Any]], Any]
  baseline: Callable[[], tuple[str, Any]]
  adamfx: Callable[[], Any]
  description: str = ''


CASE_REGISTRY: dict[str, Case] = {}


def register_case(case: Case) -> Case:
  """Adds ``case`` to the bench's rows (``adamfx bench --cases NAME``)."""
  CASE_REGISTRY[case.name] = case
  return case


def _bf16_tree(trees, preset):
  import jax
  import jax.numpy as jnp

  return jax.tree.map(lambda x: x.astype(jnp.bfloat16), trees['transformer'])


def _optax_adam():
  import optax

  return 'optax.adam', optax.adam(1e-3)


def _adamfx_adam_f32():
  import adamfx

  return 'adamfx.adam (f32 state)', adamfx.adam(1e-3)


def _adamfx_adam():
  import adamfx

  return adamfx.adam(1e-3)


def _adamfx_bf16_state():
  import jax.numpy as jnp

  import adamfx

  return adamfx.adam(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)


def _adamfx_8bit():
  import adamfx

  return adamfx.adam8bit(1e-3)


def _adamfx_8bit_baseline():
  import adamfx

  return 'adamfx.adam8bit', adamfx.adam8bit(1e-3)


def _adamfx_4bit():
  import adamfx

  return adamfx.adam4bit(1e-3)


register_case(Case(
    'bf16', _bf16_tree, _optax_adam, _adamfx_adam,
    'transformer-like tree of bfloat16 params: adamfx.adam vs optax.adam'))
register_case(Case(
    'bf16_state', lambda trees, preset: trees['transformer'], _adamfx_adam_f32,
    _adamfx_bf16_state,
    'float32 params, mu_dtype=nu_dtype=bfloat16 vs adamfx.adam\'s float32 state'))
register_case(Case(
    '8bit', lambda trees, preset: trees['large'], _adamfx_adam_f32, _adamfx_8bit,
    'one large float32 leaf: adamfx.adam8bit vs adamfx.adam'))
register_case(Case(
    '4bit', lambda trees, preset: trees['large'], _adamfx_8bit_baseline, _adamfx_4bit,
    'the same large leaf: adamfx.adam4bit vs adamfx.adam8bit'))


def _rounding(member: str, mode: str):
  """``() -> adamfx.<member>(1e-3, param_rounding=mode)``."""

  def make():
    import adamfx

    return getattr(adamfx, member)(1e-3, param_rounding=mode)

  return make


def _rounding_baseline(member: str):
  """The same member with round-to-nearest params: the rounding cases' reference."""

  def make():
    return f'adamfx.{member} nearest', _rounding(member, 'nearest')()

  return make


# Issue 20's overhead target: Kahan or stochastic param rounding adds at most
# 15 % to the jitted, donated step of the same member on bfloat16 params.
for _member, _prefix in (('adam', 'bf16'), ('adam8bit', '8bit_bf16')):
  for _mode in ('kahan', 'stochastic'):
    register_case(Case(
        f'{_prefix}_{_mode}', _bf16_tree, _rounding_baseline(_member), _rounding(_member, _mode),
        f'bfloat16 transformer-like tree: adamfx.{_member}(param_rounding={_mode!r}) vs'
        f" 'nearest'"))
del _member, _prefix, _mode


SPARSE_CASE = 'sparse'  # the embedding-table case, its own columns: adamfx.cli.bench_sparse


def _all_cases() -> tuple[str, ...]:
  return TREE_CASES + tuple(CASE_REGISTRY) + (SPARSE_CASE,)


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'must be an int >= 1, got {text!r}') from None
  if value < 1:
    raise argparse.ArgumentTypeError(f'must be an int >= 1, got {value}')
  return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--preset', choices=tuple(PRESETS), default='default',
                      help='problem sizes: tiny (a smoke run, under a minute), default (minutes on 2 busy cores), full (the'
                           ' issue\'s sizes: 16M leaf, 121-leaf 54M model, 2000 tiny'
                           ' leaves; many minutes on 2 cores)')
  parser.add_argument('--cases', nargs='+', choices=_all_cases(), default=list(_all_cases()),
                      help='rows: the tree cases (adamfx.adam vs optax.adam), then the registered'
                           ' ones: ' + '; '.join(f'{c.name}: {c.description}'
                                                for c in CASE_REGISTRY.values()))
  parser.add_argument('--in-step', action='store_true',
                      help='time jitted training steps of a small transformer LM instead: the'
                           ' optimiser\'s marginal cost over plain SGD (see adamfx.cli.step_bench)')
  parser.add_argument('--modes', nargs='+', choices=MODES, default=None,
                      help='how each step is run: jit+donate (jitted, state and params'
                           ' donated), jit (jitted, nothing donated), eager (update called'
                           ' outside jit). Default: all three for the tree cases and'
                           ' jit+donate for the registered ones; given, every case runs in'
                           ' exactly these')
  parser.add_argument('--repeats', type=_positive_int, default=None,
                      help='interleaved repeats, >= 1 (default: the preset\'s)')
  parser.add_argument('--no-flat', action='store_true',
                      help='skip the flat-mode and packed-state rows')
  parser.add_argument('--no-torch', action='store_true', help='skip torch.optim.Adam')
  parser.add_argument('--json', action='store_true', help='print JSON instead of a table')
  parser.add_argument('--memory', action='store_true',
                      help='the whole training step\'s bytes per param instead (params, state,'
                           ' temporaries, peak; SGD floor): see adamfx.cli.step_memory')
  from adamfx.cli import step_memory  # noqa: PLC0415 (its options, no heavy imports)

  step_memory.add_arguments(parser.add_argument_group('--memory options'), json_flag=False)


# --------------------------------------------------------------------------- trees


def _trees(preset: dict[str, Any]) -> dict[str, Any]:
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)

  def arr(shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02, dtype)

  def transformer(dtype_of):
    d, v = preset['width'], preset['vocab']
    tree = {'embed': arr((v, d), dtype_of('embed'))}
    for i in range(preset['layers']):
      shapes = {
          'qkv_w': (d, 3 * d), 'qkv_b': (3 * d,), 'out_w': (d, d), 'out_b': (d,),
          'ln1_scale': (d,), 'ln1_bias': (d,), 'mlp_w1': (d, 4 * d), 'mlp_b1': (4 * d,),
          'mlp_w2': (4 * d, d), 'mlp_b2': (d,), 'ln2_scale': (d,), 'ln2_bias': (d,),
      }
      tree[f'layer{i:02d}'] = {k: arr(s, dtype_of(k)) for k, s in shapes.items()}
    return tree

  n, size = preset['tiny']
  return {
      'large': {'w': arr((preset['large'],))},
      'transformer': transformer(lambda k: jnp.float32),
      'tiny': {f'leaf{i:04d}': arr((size,)) for i in range(n)},
      # Matrices in bfloat16, vectors (biases, norms) and embedding in float32.
      'mixed': transformer(lambda k: jnp.bfloat16 if k.endswith('_w') or 'w1' in k
                           or 'w2' in k else jnp.float32),
  }


def _describe(tree: Any) -> tuple[int, int, int]:
  import jax

  leaves = jax.tree.leaves(tree)
  n = sum(x.size for x in leaves)
  nbytes = sum(x.size * x.dtype.itemsize for x in leaves)
  return len(leaves), n, nbytes


# --------------------------------------------------------------------------- timing


def _block(x: Any) -> Any:
  import jax

  return jax.block_until_ready(x)


def _bandwidth(n: int, repeats: int = 5) -> dict[str, float]:
  """GB/s of ``a * x + y`` (12 bytes per float32 element): jitted and NumPy."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  x = jnp.ones(n, jnp.float32)
  y = jnp.ones(n, jnp.float32)
  axpy = jax.jit(lambda x, y: 1.0001 * x + y)
  _block(axpy(x, y))
  calls = 10  # per timing: one call's dispatch and sync would hide a GPU's bandwidth

  def axpys():
    for _ in range(calls):
      out = axpy(x, y)
    return out

  best_jax = min(_timed(axpys) for _ in range(repeats)) / calls
  xn, yn, out = np.ones(n, np.float32), np.ones(n, np.float32), np.empty(n, np.float32)

  def numpy_axpy():
    np.multiply(xn, np.float32(1.0001), out=out)
    np.add(out, yn, out=out)  # two passes: 20 bytes per element

  numpy_axpy()
  best_np = min(_timed(numpy_axpy) for _ in range(repeats))
  jax_gbs = 12 * n / best_jax / 1e9
  np_gbs = 20 * n / best_np / 1e9
  return {'jax_axpy_gbs': jax_gbs, 'numpy_axpy_gbs': np_gbs, 'limit_gbs': max(jax_gbs, np_gbs)}


def _timed(fn) -> float:
  t = time.perf_counter()
  _block(fn())
  return time.perf_counter() - t


class _Runner:
  """One contender on one tree in one mode: compiles once, then steps."""

  def __init__(self, name, tx, params, grads, mode, flat=None):
    import jax
    import optax

    self.name, self.mode = name, mode
    self.compile_s = None
    self.new_bytes = None
    if flat is not None:  # adamfx on params packed by ravel_params
      params, _ = flat(params)
      grads, _ = flat(grads)
    self.params = jax.tree.map(lambda x: x.copy(), params)
    self.grads = grads
    with jax.numpy_dtype_promotion('standard'):  # optax's code is not strict-clean
      self.state = tx.init(self.params)
    self.tx = tx

    if mode == 'eager':
      def run():
        with jax.numpy_dtype_promotion('standard'):
          _, self.state = tx.update(self.grads, self.state, self.params)
        return self.state
      t = time.perf_counter()
      _block(run())  # first call: compiles adamfx's per-leaf code
      self.compile_s = time.perf_counter() - t
      self._run = run
      return

    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    donate = (0, 1) if mode == 'jit+donate' else ()
    t = time.perf_counter()
    with jax.numpy_dtype_promotion('standard'):
      compiled = jax.jit(step, donate_argnums=donate).lower(
          self.params, self.state, self.grads).compile()
    self.compile_s = time.perf_counter() - t
    self.new_bytes = _new_bytes(compiled)

    def run():
      self.params, self.state = compiled(self.params, self.state, self.grads)
      return self.params

    _block(run())
    self._run = run

  def time(self, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
      out = self._run()
    _block(out)
    return (time.perf_counter() - t) / steps




def _floor_runner(params, grads):
  """The per-leaf floor: a jitted, donated ``p - 1e-3 * g``, one loop a leaf."""
  import jax

  class Floor:
    name = 'floor'

    def __init__(self):
      self.params = jax.tree.map(lambda x: x.copy(), params)
      f = jax.jit(lambda p, g: jax.tree.map(lambda a, b: a - 1e-3 * b, p, g),
                  donate_argnums=0)
      t = time.perf_counter()
      self.compiled = f.lower(self.params, grads).compile()
      self.compile_s = time.perf_counter() - t
      self.params = self.compiled(self.params, grads)

    def time(self, steps):
      t = time.perf_counter()
      for _ in range(steps):
        self.params = self.compiled(self.params, grads)
      _block(self.params)
      return (time.perf_counter() - t) / steps

  return Floor()


def _torch_runner(name, params, grads, fused):
  import jax
  import numpy as np
  import torch

  dtypes = {'float32': torch.float32, 'bfloat16': torch.bfloat16}
  # Where JAX runs on a GPU, torch does too (if it can), for a like-for-like column.
  cuda = jax.default_backend() == 'gpu' and torch.cuda.is_available()
  device = 'cuda' if cuda else 'cpu'
  sync = torch.cuda.synchronize if cuda else (lambda: None)

  def to_torch(x):
    t = torch.from_numpy(np.asarray(x, np.float32).copy())
    return t.to(device=device, dtype=dtypes[x.dtype.name])

  ps = [torch.nn.Parameter(to_torch(x)) for x in jax.tree.leaves(params)]
  for p, g in zip(ps, jax.tree.leaves(grads)):
    p.grad = to_torch(g)
  kw = {'fused': True} if fused else {'foreach': True}
  opt = torch.optim.Adam(ps, lr=1e-3, **kw)
  opt.step()

  class Torch:
    compile_s = None
    new_bytes = None

    def __init__(self):
      self.name = name

    def time(self, steps):
      with torch.no_grad():
        sync()
        t = time.perf_counter()
        for _ in range(steps):
          opt.step()
        sync()
        return (time.perf_counter() - t) / steps

  return Torch()


# --------------------------------------------------------------------------- main




def bench(preset_name: str = 'default', cases=None, modes=None, repeats=None,
          flat=True, torch_cols=True, progress=None) -> dict[str, Any]:
  """Runs the benchmark; returns a JSON-ready dict (``rows`` and ``machine``)."""
  import jax
  import optax

  import adamfx

  cases = _all_cases() if cases is None else cases
  preset = dict(PRESETS[preset_name])
  if repeats is not None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
      raise ValueError(f'`repeats` must be an int >= 1, got {repeats!r}.')
    preset['repeats'] = repeats
  try:
    import torch  # noqa: F401
  except ImportError:
    torch_cols = False
  if torch_cols:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)

  trees = _trees(preset)
  plan = []
  for case in [c for c in cases if c != SPARSE_CASE]:
    if case in CASE_REGISTRY:
      # Registered cases: jitted and donated unless modes are asked for
      # (`--modes eager` ran them jit+donate, silently).
      for mode in ('jit+donate',) if modes is None else modes:
        plan.append((case, mode, False))
      continue
    for mode in MODES if modes is None else modes:
      plan.append((case, mode, False))
      if flat and case in ('tiny', 'transformer'):
        plan.append((case, mode, 'flat'))
        if mode != 'eager':  # pack_state is for jitted steps (see its docstring)
          plan.append((case, mode, 'packed'))
  total = len(plan) + 1
  tick = progress or (lambda *a: None)

  tick(0, total, 'bandwidth (axpy)')
  bw = _bandwidth(preset['axpy'])
  rows = []
  for k, (case, mode, variant) in enumerate(plan, 1):
    is_flat = bool(variant)
    label = f'{case}{" " + variant if variant else ""} / {mode}'
    tick(k, total, label)
    registered = CASE_REGISTRY.get(case)
    params = registered.tree(trees, preset) if registered else trees[case]
    grads = jax.tree.map(lambda x: (x * 0.5 + 0.01).astype(x.dtype), params)
    n_leaves, n_params, nbytes = _describe(params)
    if registered:
      baseline, baseline_tx = registered.baseline()
      runners = [_Runner('optax', baseline_tx, params, grads, mode),
                 _Runner('adamfx', registered.adamfx(), params, grads, mode)]
    else:
      baseline = 'optax.adam'
      runners = [
          _Runner('optax', optax.adam(1e-3), params, grads, mode),
          _Runner('adamfx',
                  adamfx.pack_state(adamfx.adam(1e-3)) if variant == 'packed'
                  else adamfx.adam(1e-3),
                  params, grads, mode,
                  flat=adamfx.ravel_params if variant == 'flat' else None),
      ]
    if mode == 'jit+donate' and case == 'tiny' and not is_flat:
      runners.append(_floor_runner(params, grads))
    if torch_cols and mode == 'jit+donate' and not is_flat and not registered:
      runners.append(_torch_runner('torch_foreach', params, grads, fused=False))
      runners.append(_torch_runner('torch_fused', params, grads, fused=True))
    times = {r.name: [] for r in runners}
    for _ in range(preset['repeats']):  # interleaved: a busy machine slows all alike
      for r in runners:
        times[r.name].append(r.time(preset['steps']))
    row = {
        'case': case, 'baseline': baseline,
        'flat': variant == 'flat', 'variant': variant or 'tree', 'mode': mode,
        'leaves': n_leaves,
        'params': n_params, 'param_bytes': nbytes,
    }
    for r in runners:
      s = _stats(times[r.name])
      row[r.name] = dict(ms=s, compile_s=r.compile_s, new_bytes=getattr(r, 'new_bytes', None))
    o, a = row['optax']['ms']['median'], row['adamfx']['ms']['median']
    row['ratio'] = a / o  # adamfx / baseline (optax.adam unless registered): < 1 is faster
    ratios = [x / y for x, y in zip(times['adamfx'], times['optax'])]  # repeat by repeat
    row['ratio_min'], row['ratio_max'] = min(ratios), max(ratios)
    row['speedup'] = o / a
    # 7 array passes of the params' size: read g, m, v, p; write m, v, p.
    row['adamfx_gbs'] = 7 * nbytes / (a / 1e3) / 1e9
    row['optax_gbs'] = 7 * nbytes / (o / 1e3) / 1e9
    row['adamfx_frac_limit'] = row['adamfx_gbs'] / bw['limit_gbs']
    rows.append(row)
    del runners
  sparse = None
  if SPARSE_CASE in cases:  # the embedding-table case: its own columns
    from adamfx.cli import bench_sparse as _bench_sparse
    sparse = _bench_sparse.bench_sparse(preset_name, preset['repeats'], preset['steps'], torch_cols)
  tick(total, total, 'done')
  return {
      'preset': preset_name, 'sizes': preset, 'bandwidth': bw, 'rows': rows,
      'sparse': sparse, 'machine': _machine(),
      'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }




def _fmt_ms(s: dict[str, float]) -> str:
  return f'{s["median"]:.3g} ({s["min"]:.3g}-{s["max"]:.3g})'


def format_table(result: dict[str, Any]) -> str:
  """A plain-text (Markdown) table of a :func:`bench` result."""
  m, bw = result['machine'], result['bandwidth']
  lines = [
      f'adamfx bench --preset {result["preset"]}: {_describe_machine(m)}',
      f'bandwidth limit (axpy): {bw["limit_gbs"]:.1f} GB/s (jitted {bw["jax_axpy_gbs"]:.1f},'
      f' numpy {bw["numpy_axpy_gbs"]:.1f}); ms per step: median (min-max) of'
      f' {result["sizes"]["repeats"]} interleaved repeats',
      '',
      '| case | mode | leaves | params | optax ms | adamfx ms | adamfx/optax (min-max) | adamfx GB/s'
      ' (of limit) | compile s optax / adamfx | new MiB optax / adamfx | other |',
      '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in result['rows']:
    o, a = r['optax'], r['adamfx']
    comp = '-' if o['compile_s'] is None else f'{o["compile_s"]:.2f} / {a["compile_s"]:.2f}'
    if o['new_bytes'] is None:
      mem = '-'
    else:
      mem = f'{o["new_bytes"] / 2**20:.1f} / {a["new_bytes"] / 2**20:.1f}'
    other = []
    for name in ('floor', 'torch_foreach', 'torch_fused'):
      if name in r:
        other.append(f'{name} {r[name]["ms"]["median"]:.3g}')
    variant = r.get('variant', 'flat' if r['flat'] else 'tree')
    case = r['case'] + ('' if variant == 'tree' else f' (adamfx {variant})')
    if r.get('baseline', 'optax.adam') != 'optax.adam':
      case += f' (optax column: {r["baseline"]})'
    elif r['case'] in CASE_REGISTRY:
      case += ' (registered)'

    lines.append(
        f'| {case} | {r["mode"]} | {r["leaves"]} | {r["params"]:,} | {_fmt_ms(o["ms"])} |'
        f' {_fmt_ms(a["ms"])} | {r["ratio"]:.2f} ({r["speedup"]:.1f}x;'
        f' {r.get("ratio_min", r["ratio"]):.2f}-{r.get("ratio_max", r["ratio"]):.2f}) |'
        f' {r["adamfx_gbs"]:.1f} ({100 * r["adamfx_frac_limit"]:.0f}%) | {comp} | {mem} |'
        f' {", ".join(other)} |'
    )
  if result.get('sparse'):
    from adamfx.cli import bench_sparse as _bench_sparse
    lines.append(_bench_sparse.format_sparse(result['sparse']))
  lines.append('')
  lines.append(f'peak RSS {result["peak_rss_mib"]:.0f} MiB. "new MiB": bytes a compiled step'
               ' allocates beyond its donated inputs (outputs - aliased + temporaries).')
  return '\n'.join(lines)


def run(args: argparse.Namespace) -> int:
  if getattr(args, 'memory', False):
    from adamfx.cli import step_memory  # noqa: PLC0415 (only when asked)

    return step_memory.run(args)
  if getattr(args, 'in_step', False):
    from adamfx.cli import step_bench as _step_bench  # only when asked

    return _step_bench.run(args)
  progress_cm = None
  tick = None
  if not args.json or sys.stderr.isatty():
    try:
      from rich.progress import Progress

      progress_cm = Progress(transient=True, console=None if not args.json else _stderr_console())
    except ImportError:
      progress_cm = None
  if progress_cm is not None:
    with progress_cm as prog:
      task = prog.add_task('adamfx bench', total=1)

      def tick(k, total, label):
        prog.update(task, completed=k, total=total, description=label)

      result = bench(args.preset, args.cases, args.modes, args.repeats,
                     not args.no_flat, not args.no_torch, tick)
  else:
    def tick(k, total, label):
      print(f'[{k}/{total}] {label}', file=sys.stderr, flush=True)

    result = bench(args.preset, args.cases, args.modes, args.repeats,
                   not args.no_flat, not args.no_torch, tick)
  if args.json:
    print(json.dumps(result, indent=1))
  else:
    print(format_table(result))
  return 0


def _stderr_console():
  from rich.console import Console

  return Console(stderr=True)
