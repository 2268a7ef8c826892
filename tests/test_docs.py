"""The documentation sources in docs/ cover the public API and link what exists.

The build itself (``sphinx-build -W -b html docs docs/_build/html``, warnings as errors, every
cross-reference resolved) runs in CI after the tests; these checks are the fast part that needs
no Sphinx: a new public name must be added to the API reference, a guide or notebook must not
be orphaned.
"""

import pathlib
import re

import adamfx

DOCS = pathlib.Path(__file__).resolve().parent.parent / 'docs'


def _autosummary_entries(text):
  """The names listed under every ``.. autosummary::`` directive, plus ``py:class`` stubs."""
  names = set()
  for block in re.findall(r'\.\. autosummary::\n(?:   :.*\n)*\n((?:   \S.*\n)+)', text):
    names.update(line.strip() for line in block.splitlines())
  names.update(re.findall(r'^\.\. py:(?:class|function|data):: (\w+)', text, re.M))
  return names


def test_every_public_name_is_in_the_api_reference():
  documented = _autosummary_entries((DOCS / 'api.md').read_text())
  missing = sorted(set(adamfx.__all__) - documented)
  assert missing == [], (
      f'public names missing from docs/api.md: {missing}; add each to an autosummary list '
      '(or a `.. py:class::` entry for an alias)'
  )
  unknown = sorted(documented - set(adamfx.__all__))
  assert unknown == [], f'docs/api.md documents names that are not in adamfx.__all__: {unknown}'


def test_landing_page_reaches_every_page():
  index = (DOCS / 'index.md').read_text()
  # The guides and notebooks are globbed into the toctree too, so a new file is listed by itself.
  for entry in ('getting_started', 'guides/*', 'notebooks/*', 'api', 'references'):
    assert re.search(rf'^{re.escape(entry)}$', index, re.M), f'{entry} missing from index.md'
  notebooks = DOCS / 'notebooks'
  assert notebooks.resolve() == (DOCS.parent / 'notebooks').resolve(), (
      'docs/notebooks must link to ../notebooks so the docs render the committed notebooks'
  )
  guides = sorted(p.stem for p in (DOCS / 'guides').glob('*.md'))
  for name in ('differences', 'performance', 'memory', 'scaling', 'diagnostics'):
    assert name in guides
