"""Tests of ``adamfx demo`` (adamfx/cli/demo.py): short runs of the real command."""

import os
import subprocess
import sys

import pytest

import adamfx
from adamfx.cli import demo as _demo
from adamfx.cli import main as _cli

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow  # a demo run: .ci/run
def test_demo_short_run_prints_table_checks_parity_and_writes_png(tmp_path, capsys):
  out = tmp_path / 'out'
  rc = _cli.main(['demo', '--steps', '30', '--seed', '1', '--out', str(out)])
  text = capsys.readouterr().out
  assert rc == 0, text
  for label in _demo.OPTIMIZERS.values():
    assert label in text
  assert 'ms/step' in text and 'test acc' in text
  assert text.count('adamfx.adam matches optax.adam') == 2, text
  assert 'over the first 30 steps' in text.replace('\n', ' ') and 'first 100' not in text
  png = out / 'digits_loss_curves.png'
  assert png.read_bytes()[:8] == PNG_MAGIC
  assert f'loss curves: {png}' in text.replace('\n', '')


@pytest.mark.slow  # a demo run: .ci/run
def test_demo_learns(tmp_path):
  # Independent of the printing: a few hundred steps of the logistic
  # regression on digits reach well above chance (10%) on the test set.
  data = _demo.load_digits(0)
  r = _demo.train('logreg', 'optax', data, steps=100, seed=0)
  assert r.losses[-1] < 0.5 * r.losses[0]
  assert r.test_accuracy > 0.85
  assert r.ms_per_step > 0


@pytest.mark.slow  # a demo run: .ci/run
def test_parity_check_fails_loudly(tmp_path, capsys, monkeypatch):
  # Make "adamfx" secretly a different Adam (b2 = 0.99): the check must fail.
  real = _demo._make_optimizer

  def fake(name, lr):
    return adamfx.adam(lr, b2=0.99) if name == 'adamfx' else real(name, lr)

  monkeypatch.setattr(_demo, '_make_optimizer', fake)
  rc = _cli.main(
      ['demo', '--steps', '20', '--optimizers', 'adamfx,optax', '--out', str(tmp_path)]
  )
  text = capsys.readouterr().out
  assert rc == 1
  assert 'does NOT match optax.adam' in text


@pytest.mark.slow  # a demo run with its figures: .ci/run
def test_optimizer_subset_skips_the_check(tmp_path, capsys):
  rc = _cli.main(['demo', '--steps', '5', '--optimizers', 'adagrad', '--out', str(tmp_path)])
  text = capsys.readouterr().out
  assert rc == 0
  assert 'check skipped' in text and 'AdaGrad' in text and 'RMSProp' not in text


@pytest.mark.parametrize('argv, message', [
    (['--optimizers', 'adam,sgd'], '--optimizers must be a comma-separated subset'),
    (['--steps', '0'], '--steps must be >= 1'),
])
def test_bad_arguments(argv, message, tmp_path):
  with pytest.raises(SystemExit, match=message):
    _cli.main(['demo', '--out', str(tmp_path)] + argv)


@pytest.mark.slow  # a demo run: .ci/run
def test_python_dash_m_adamfx_demo(tmp_path):
  env = dict(os.environ, COLUMNS='120')
  proc = subprocess.run(
      [sys.executable, '-m', 'adamfx', 'demo', '--steps', '3', '--optimizers', 'adamfx,optax',
       '--out', str(tmp_path)],
      capture_output=True, text=True, timeout=300, env=env,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'adamfx.adam matches optax.adam' in proc.stdout
  assert (tmp_path / 'digits_loss_curves.png').exists()


def test_out_that_is_a_file_fails_before_training(tmp_path, monkeypatch):
  path = tmp_path / 'a_file'
  path.write_text('x')
  monkeypatch.setattr(_demo, 'train', lambda *a, **k: pytest.fail('trained before checking --out'))
  with pytest.raises(SystemExit, match='--out .* is not a directory'):
    _cli.main(['demo', '--steps', '5', '--out', str(path)])


def test_top_level_help_is_plain_text(capsys):
  with pytest.raises(SystemExit):
    _cli.main(['--help'])
  text = capsys.readouterr().out
  assert '``' not in text and 'adamfx demo' in text


@pytest.mark.parametrize('command', ['demo', 'bench', 'memory'])
def test_every_tool_is_a_subcommand(command, capsys):
  with pytest.raises(SystemExit) as e:
    _cli.main([command, '--help'])
  assert e.value.code == 0
  assert capsys.readouterr().out.startswith(f'usage: adamfx {command}')
