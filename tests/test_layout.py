"""The package's layout: no module imports another that imports it back; no tool in the library."""

import ast
import os
import pathlib
import subprocess
import sys

import adamfx

PACKAGE = pathlib.Path(adamfx.__file__).parent


def _imports(path: pathlib.Path) -> set[str]:
  """The adamfx modules ``path`` imports, at module level or inside functions."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module == 'adamfx':
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('adamfx.'):
      found.add(node.module.split('.')[1])
    elif isinstance(node, ast.Import):
      found |= {a.name.split('.')[1] for a in node.names if a.name.startswith('adamfx.')}
  return found - {path.stem}


def _graph() -> dict[str, set[str]]:
  modules = {p.stem: p for p in PACKAGE.glob('*.py')}
  # __init__ imports everything and is imported by nothing inside the package.
  return {m: _imports(p) & set(modules) - {'__init__'} for m, p in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle, as a path ``[a, b, ..., a]``, or None."""
  state = {}

  def visit(m, path):
    state[m] = 'open'
    for d in sorted(graph[m]):
      if state.get(d) == 'open':
        return path[path.index(d):] + [d]
      if d not in state and (found := visit(d, path + [d])):
        return found
    state[m] = 'done'
    return None

  for m in sorted(graph):
    if m not in state and (found := visit(m, [m])):
      return found
  return None


def test_no_import_cycles():
  assert _cycle(_graph()) is None, ' -> '.join(_cycle(_graph()))


def test_the_cycle_finder_finds_cycles():
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b'}, 'b': set()}) is None


def test_the_update_math_imports_no_constructor():
  graph = _graph()
  assert not graph['_update'] & {'_adam', '_fast', '_inject', '_quant', '_sparse'}
  assert '_update' in graph['_fast'] and '_fast' in graph['_adam']


def _imported_names(source: str, package: str) -> set[str]:
  """Every module ``source`` (a module of ``package``) imports, dotted, relative ones resolved."""
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      parts = package.split('.')
      base = parts[:len(parts) - node.level + 1] if node.level else []
      module = '.'.join(base + ([node.module] if node.module else []))
      found.add(module)
      found |= {f'{module}.{a.name}' for a in node.names}
  return found


def _tools(path: pathlib.Path) -> list[str]:
  package = '.'.join(('adamfx',) + path.relative_to(PACKAGE).parent.parts)
  names = _imported_names(path.read_text(), package)
  return sorted(n for n in names if n == 'adamfx.cli' or n.startswith('adamfx.cli.'))


def test_the_library_imports_no_tool():
  """adamfx/cli/ holds the tools; nothing outside it (but ``python -m adamfx``) imports them."""
  library = [p for p in PACKAGE.rglob('*.py')
             if 'cli' not in p.relative_to(PACKAGE).parts and p.name != '__main__.py']
  assert len(library) > 10
  offenders = {str(p.relative_to(PACKAGE)): _tools(p) for p in library}
  assert not {k: v for k, v in offenders.items() if v}


def test_import_adamfx_loads_no_tool():
  code = 'import sys, adamfx; print(sorted(m for m in sys.modules if m.startswith("adamfx.cli")))'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.stdout.strip() == '[]', out.stdout


def test_the_import_check_sees_tool_imports():
  source = 'from adamfx.cli import bench\nfrom .cli.measure import stats\nfrom . import cli\n'
  names = _imported_names(source, 'adamfx')
  assert {'adamfx.cli.bench', 'adamfx.cli.measure.stats', 'adamfx.cli'} <= names
  assert 'adamfx.cli' in _imported_names('from .. import cli\n', 'adamfx._core')
