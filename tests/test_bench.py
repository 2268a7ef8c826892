"""Smoke tests of ``adamfx bench``: it runs, reports every column, and its JSON is valid.

Timings are never asserted (the machine is shared and noisy); only that each
figure is there and is a positive, finite number.
"""

import json
import math

import pytest

from adamfx.cli import bench as _bench
from adamfx.cli import main as _cli


def _positive(x):
  return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope='module')
def result():
  return _bench.bench(
      'tiny', cases=('large', 'tiny', 'mixed'), modes=('jit+donate', 'eager'), repeats=1,
  )


@pytest.mark.slow  # a bench run: .ci/run
def test_bench_rows_have_every_figure(result):
  rows = result['rows']
  # large, mixed: 2 modes each; tiny: 2 modes, each with a flat row, and a
  # packed-state row when jitted.
  assert [(r['case'], r['mode'], r['variant']) for r in rows] == [
      ('large', 'jit+donate', 'tree'), ('large', 'eager', 'tree'),
      ('tiny', 'jit+donate', 'tree'), ('tiny', 'jit+donate', 'flat'),
      ('tiny', 'jit+donate', 'packed'),
      ('tiny', 'eager', 'tree'), ('tiny', 'eager', 'flat'),
      ('mixed', 'jit+donate', 'tree'), ('mixed', 'eager', 'tree'),
  ]
  assert [r['flat'] for r in rows] == [r['variant'] == 'flat' for r in rows]
  for r in rows:
    for name in ('optax', 'adamfx'):
      ms = r[name]['ms']
      assert _positive(ms['median']) and ms['min'] <= ms['median'] <= ms['max']
      assert _positive(r[name]['compile_s'])
    assert _positive(r['ratio']) and _positive(r['adamfx_gbs'])
    if r['mode'] == 'jit+donate':
      assert r['adamfx']['new_bytes'] is None or r['adamfx']['new_bytes'] >= 0
  floor = [r for r in rows if 'floor' in r]
  assert [(r['case'], r['variant']) for r in floor] == [('tiny', 'tree')]
  assert _positive(result['bandwidth']['limit_gbs'])
  assert result['machine']['cpus'] >= 1


@pytest.mark.slow  # a bench run: .ci/run
def test_bench_torch_columns_when_torch_is_installed(result):
  pytest.importorskip('torch')
  donated = [r for r in result['rows'] if r['mode'] == 'jit+donate' and r['variant'] == 'tree']
  for r in donated:
    assert _positive(r['torch_foreach']['ms']['median'])
    assert _positive(r['torch_fused']['ms']['median'])


@pytest.mark.slow  # a bench run: .ci/run
def test_bench_table_and_json(result):
  table = _bench.format_table(result)
  assert '| case | mode |' in table and 'tiny (adamfx flat)' in table
  assert 'tiny (adamfx packed)' in table
  assert 'bandwidth limit (axpy)' in table
  assert json.loads(json.dumps(result))['preset'] == 'tiny'


@pytest.mark.slow  # a bench run: .ci/run
def test_cli_bench_json(capsys):
  code = _cli.main(['bench', '--preset', 'tiny', '--cases', 'large', '--modes', 'eager',
                    '--repeats', '1', '--no-torch', '--json'])
  assert code == 0
  out = json.loads(capsys.readouterr().out)
  assert [r['case'] for r in out['rows']] == ['large']


@pytest.mark.slow  # a bench run: .ci/run
def test_registered_cases_rows_and_registry_is_open():
  import jax.numpy as jnp
  import optax

  import adamfx

  assert {'bf16', 'bf16_state', '8bit', '4bit'} <= set(_bench.CASE_REGISTRY)
  extra = _bench.register_case(_bench.Case(
      'test_case', lambda trees, preset: {'w': jnp.ones(64)},
      lambda: ('optax.sgd', optax.sgd(1e-3)), lambda: adamfx.adam(1e-3), 'a test row'))
  try:
    result = _bench.bench('tiny', cases=('bf16', '8bit', 'test_case'), repeats=1, torch_cols=False)
  finally:
    del _bench.CASE_REGISTRY[extra.name]
  rows = result['rows']
  assert [(r['case'], r['mode'], r['baseline']) for r in rows] == [
      ('bf16', 'jit+donate', 'optax.adam'),
      ('8bit', 'jit+donate', 'adamfx.adam (f32 state)'),
      ('test_case', 'jit+donate', 'optax.sgd'),
  ]
  for r in rows:
    assert _positive(r['ratio']) and r['ratio_min'] <= r['ratio'] <= r['ratio_max']
    assert r['adamfx']['new_bytes'] is None or r['adamfx']['new_bytes'] >= 0
  assert rows[0]['leaves'] > 1 and rows[0]['param_bytes'] == 2 * rows[0]['params']  # bfloat16
  table = _bench.format_table(result)
  assert '8bit (optax column: adamfx.adam (f32 state))' in table


@pytest.mark.slow  # a bench run: .ci/run
def test_in_step_bench_reports_marginal_costs():
  from adamfx.cli import step_bench as _step_bench

  result = _step_bench.bench('tiny', dtypes=('float32',), repeats=1, torch_cols=False,
                             names=('optax.adam', 'adamfx.adam8bit'))
  (row,) = result['rows']
  assert set(row['optimisers']) == {'optax.adam', 'adamfx.adam8bit'}
  assert _positive(row['sgd_step_ms']['median'])
  for o in row['optimisers'].values():
    assert _positive(o['step_ms']['median'])
    assert math.isfinite(o['marginal_ms']['median'])  # a difference: may be < 0 when noisy
    assert math.isfinite(o['final_loss'])
  assert 'marginal' in _step_bench.format_table(result)

@pytest.mark.parametrize('value', ['0', '-1', 'two'])
def test_cli_bench_refuses_bad_repeats_before_work(value, capsys, monkeypatch):
  monkeypatch.setattr(_bench, 'bench', lambda *a, **k: pytest.fail('ran before checking'))
  with pytest.raises(SystemExit):
    _cli.main(['bench', '--preset', 'tiny', '--repeats', value])
  assert '--repeats: must be an int >= 1' in capsys.readouterr().err


def test_bench_function_refuses_bad_repeats():
  with pytest.raises(ValueError, match='`repeats` must be an int >= 1'):
    _bench.bench('tiny', repeats=0)


def test_modes_are_honoured_for_registered_cases_and_documented(capsys):
  """`--cases 8bit --modes eager` ran jit+donate silently; --modes had no help."""

  result = _bench.bench('tiny', cases=('8bit',), modes=('eager',), repeats=1, torch_cols=False)
  assert [(r['case'], r['mode']) for r in result['rows']] == [('8bit', 'eager')]
  with pytest.raises(SystemExit):
    _cli.main(['bench', '--help'])
  assert 'eager (update called' in ' '.join(capsys.readouterr().out.split())


def test_version_flag(capsys):
  import adamfx

  with pytest.raises(SystemExit) as exit_info:
    _cli.main(['--version'])
  assert exit_info.value.code == 0
  assert capsys.readouterr().out.strip() == f'adamfx {adamfx.__version__}'
