"""The package's layout: no module imports another that imports it back."""

import ast
import pathlib

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
