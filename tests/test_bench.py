"""Smoke tests of ``adamfx bench``: it runs, reports every column, and its JSON is valid.

Timings are never asserted (the machine is shared and noisy); only that each
figure is there and is a positive, finite number.
"""

import json
import math

import pytest

from adamfx import _bench
from adamfx import _cli


def _positive(x):
  return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope='module')
def result():
  return _bench.bench(
      'tiny', cases=('large', 'tiny', 'mixed'), modes=('jit+donate', 'eager'), repeats=1,
  )


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


def test_bench_torch_columns_when_torch_is_installed(result):
  pytest.importorskip('torch')
  donated = [r for r in result['rows'] if r['mode'] == 'jit+donate' and r['variant'] == 'tree']
  for r in donated:
    assert _positive(r['torch_foreach']['ms']['median'])
    assert _positive(r['torch_fused']['ms']['median'])


def test_bench_table_and_json(result):
  table = _bench.format_table(result)
  assert '| case | mode |' in table and 'tiny (adamfx flat)' in table
  assert 'tiny (adamfx packed)' in table
  assert 'bandwidth limit (axpy)' in table
  assert json.loads(json.dumps(result))['preset'] == 'tiny'


def test_cli_bench_json(capsys):
  code = _cli.main(['bench', '--preset', 'tiny', '--cases', 'large', '--modes', 'eager',
                    '--repeats', '1', '--no-torch', '--json'])
  assert code == 0
  out = json.loads(capsys.readouterr().out)
  assert [r['case'] for r in out['rows']] == ['large']


@pytest.mark.parametrize('value', ['0', '-1', 'two'])
def test_cli_bench_refuses_bad_repeats_before_work(value, capsys, monkeypatch):
  monkeypatch.setattr(_bench, 'bench', lambda *a, **k: pytest.fail('ran before checking'))
  with pytest.raises(SystemExit):
    _cli.main(['bench', '--preset', 'tiny', '--repeats', value])
  assert '--repeats: must be an int >= 1' in capsys.readouterr().err


def test_bench_function_refuses_bad_repeats():
  with pytest.raises(ValueError, match='`repeats` must be an int >= 1'):
    _bench.bench('tiny', repeats=0)
