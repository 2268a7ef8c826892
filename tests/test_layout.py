"""The package's layout: no module imports another that imports it back; no tool in the library."""

import ast
import os
import pathlib
import subprocess
import sys

import adamfx

PACKAGE = pathlib.Path(adamfx.__file__).parent


def _name(path: pathlib.Path) -> str:
  """``adamfx/_core/driver.py`` -> ``_core.driver``."""
  return '.'.join(path.relative_to(PACKAGE).with_suffix('').parts)


def _library() -> dict[str, pathlib.Path]:
  """The library's modules by dotted name (not the tools, the package inits or ``__main__``)."""
  return {_name(p): p for p in PACKAGE.rglob('*.py')
          if 'cli' not in p.relative_to(PACKAGE).parts
          and p.name not in ('__init__.py', '__main__.py')}


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The library modules ``path`` imports, at module level or inside functions."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('adamfx'):
      base = node.module.removeprefix('adamfx').removeprefix('.')
      for alias in node.names:
        child = f'{base}.{alias.name}'.strip('.')
        found.add(child if child in modules else base)
    elif isinstance(node, ast.Import):
      found |= {a.name.removeprefix('adamfx.') for a in node.names if a.name.startswith('adamfx.')}
  return found & modules - {_name(path)}


def _graph() -> dict[str, set[str]]:
  modules = _library()
  return {m: _imports(p, set(modules)) for m, p in modules.items()}


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
  assert not graph['_core.driver'] & {
      '_builders.adam', '_core.eager', '_wrappers.inject', '_formats.quant', '_sparse.lazy'}
  assert '_core.driver' in graph['_core.eager'] and '_core.eager' in graph['_builders.adam']


# Each subpackage imports only from the ones listed (docs/guides/architecture.md's layers).
_LAYERS = {
    '_core': {'_core'},
    '_formats': {'_core', '_formats'},
    '_builders': {'_core', '_formats', '_builders'},
    '_sparse': {'_core', '_formats', '_builders', '_sparse'},
}


def test_the_subpackages_import_down_the_layers():
  graph = _graph()
  assert {m.split('.')[0] for m in graph} >= set(_LAYERS) | {'_porting', '_wrappers'}
  wrong = {m: sorted(d for d in deps if d.split('.')[0] not in _LAYERS[m.split('.')[0]])
           for m, deps in graph.items() if m.split('.')[0] in _LAYERS}
  assert not {m: d for m, d in wrong.items() if d}


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
