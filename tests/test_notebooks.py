"""The notebooks in notebooks/: jupytext pairs, in sync, stripped, executed top to bottom.

Each notebook is a percent-format ``.py`` source (the one to edit) paired with its ``.ipynb``
(committed with outputs stripped: Colab opens it, the docs render it); see
``notebooks/jupytext.toml``. A notebook is found by its ``.py`` source, so a new pair is tested
without editing this file.

Each notebook asserts its own key numbers, so a regression fails ``test_notebook_executes``
(marked ``notebooks``: out of the default run; CI executes each notebook once, in the docs
build, whose ``nb_execution_raise_on_error`` fails on a failed assertion too; run them here
with ``pytest -m notebooks -n 0 tests/test_notebooks.py``).
The kernel is ipykernel's ``python3``, which jupyter_client launches with this process's
interpreter (``sys.executable``): the notebooks see the same venv as the tests; the first
executed cell checks that.
"""

import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
jupytext = pytest.importorskip('jupytext')
pytest.importorskip('ipykernel')

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / 'notebooks'
# Every percent-format source in notebooks/ (a jupytext header names its format).
SOURCES = sorted(
    p for p in NOTEBOOKS.glob('*.py') if 'format_name: percent' in p.read_text()[:1000]
)
NAMES = [p.stem for p in SOURCES]


def test_every_notebook_is_a_pair():
  assert len(NAMES) >= 4, f'no jupytext sources found in {NOTEBOOKS}'
  assert sorted(p.stem for p in NOTEBOOKS.glob('*.ipynb')) == NAMES, (
      'each notebooks/NAME.ipynb needs its notebooks/NAME.py source and vice versa: '
      'create the missing side with `jupytext --sync notebooks/*.py`'
  )
  stray = sorted(p.name for p in NOTEBOOKS.glob('*.py') if p.stem not in NAMES)
  assert stray == [], f'Python files in notebooks/ that are not notebook sources: {stray}'
  config = (NOTEBOOKS / 'jupytext.toml').read_text()
  assert 'formats = "ipynb,py:percent"' in config


def _cells(nb):
  return [(cell.cell_type, cell.source) for cell in nb.cells]


@pytest.mark.default_cases(None)  # cheap: every notebook, every run
@pytest.mark.parametrize('name', NAMES)
def test_pair_is_in_sync(name):
  source = jupytext.read(NOTEBOOKS / f'{name}.py')
  notebook = jupytext.read(NOTEBOOKS / f'{name}.ipynb')
  py_cells, nb_cells = _cells(source), _cells(notebook)
  for i, (a, b) in enumerate(zip(py_cells, nb_cells)):
    assert a == b, (
        f'{name}: cell {i} differs between {name}.py and {name}.ipynb; '
        f'run `jupytext --sync notebooks/{name}.py`\n.py:    {a!r}\n.ipynb: {b!r}'
    )
  assert len(py_cells) == len(nb_cells), (
      f'{name}: {len(py_cells)} cells in {name}.py, {len(nb_cells)} in {name}.ipynb; '
      f'run `jupytext --sync notebooks/{name}.py`'
  )
  assert source.metadata['kernelspec']['name'] == 'python3'


@pytest.mark.default_cases(None)  # cheap: every notebook, every run
@pytest.mark.parametrize('name', NAMES)
def test_notebook_is_stripped_and_colab_ready(name):
  nb = nbformat.read(NOTEBOOKS / f'{name}.ipynb', as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, 'outputs not stripped'
  badge = f'https://colab.research.google.com/github/adamfx/adamfx/blob/main/notebooks/{name}.ipynb'
  assert badge in nb.cells[0].source
  install = nb.cells[1]
  assert install.cell_type == 'code'
  assert "if 'google.colab' in sys.modules:" in install.source
  assert nb.metadata.kernelspec.name == 'python3'


@pytest.mark.notebooks
@pytest.mark.parametrize('name', NAMES)
def test_notebook_executes(name, tmp_path):
  nb = nbformat.read(NOTEBOOKS / f'{name}.ipynb', as_version=4)
  check = nbformat.v4.new_code_cell(
      'import os, sys\n'
      f'assert os.path.realpath(sys.executable) == {os.path.realpath(sys.executable)!r}, sys.executable'
  )
  nb.cells.insert(0, check)
  env = dict(os.environ, MPLBACKEND='Agg', PYTHONWARNINGS='ignore')
  client = nbclient.NotebookClient(
      nb,
      kernel_name='python3',
      timeout=600,
      startup_timeout=180,  # a loaded 2-core CI box can be slow to import ipykernel
      resources={'metadata': {'path': str(tmp_path)}},
  )
  try:
    client.execute(env=env)
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f'{name} failed:\n{e}', pytrace=False)
