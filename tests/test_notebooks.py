"""Executes the notebooks in notebooks/ top to bottom (nbclient).

Each notebook asserts its own key numbers, so a regression fails here. The
kernel is ipykernel's ``python3``, which jupyter_client launches with this
process's interpreter (``sys.executable``): the notebooks see the same venv as
the tests; the first executed cell checks that.
"""

import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / 'notebooks'
NAMES = [
    '01_quickstart.ipynb', '02_adam_from_first_principles.ipynb', '03_paper_experiments.ipynb',
    '04_memory.ipynb',  # issue 6; written by notebooks/generate_04_memory.py
]


def test_all_notebooks_are_listed():
  assert sorted(p.name for p in NOTEBOOKS.glob('*.ipynb')) == NAMES


@pytest.mark.parametrize('name', NAMES)
def test_notebook_is_stripped_and_colab_ready(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, 'outputs not stripped'
  badge = f'https://colab.research.google.com/github/adamfx/adamfx/blob/main/notebooks/{name}'
  assert badge in nb.cells[0].source
  install = nb.cells[1]
  assert install.cell_type == 'code'
  assert "if 'google.colab' in sys.modules:" in install.source
  assert nb.metadata.kernelspec.name == 'python3'


@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES)
def test_notebook_executes(name, tmp_path):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
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
