"""Sphinx configuration for the adamfx documentation.

Build (from the repository root): ``pip install -e ".[docs]" && sphinx-build -W -b html docs
docs/_build/html``. Warnings are errors and ``nitpicky`` is on, so every internal link and
cross-reference must resolve. The notebooks (``docs/notebooks`` links to ``../notebooks``) are
executed by myst-nb and rendered with their figures; results are cached in
``docs/_build/.jupyter_cache``, so a rebuild only re-runs a notebook whose code changed.
"""

import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DOCS))

import adamfx  # noqa: E402

project = 'adamfx'
author = 'adamfx developers'
copyright = '2026, adamfx developers'
release = version = adamfx.__version__

extensions = [
    'myst_nb',
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'sphinx.ext.viewcode',
]

source_suffix = {'.rst': 'restructuredtext', '.md': 'myst-nb', '.ipynb': 'myst-nb'}
exclude_patterns = [
    '_build', 'jupyter_execute', '**.ipynb_checkpoints', 'notebooks/*.py', 'notebooks/*.toml',
]
templates_path = ['_templates']

# -- API reference: autosummary pages from the docstrings (Google style, via napoleon).
autosummary_generate = True
# The docstrings' Args say each type and range; optax's type aliases expanded in full are
# unreadable (ScalarOrSchedule becomes a line of unions).
autodoc_typehints = 'none'
autodoc_member_order = 'bysource'
autodoc_default_options = {'members': False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- Strict cross-references. Names from other libraries (no intersphinx: the build runs
# offline) are accepted as plain text; every adamfx name and every page link must resolve.
nitpicky = True
nitpick_ignore_regex = [
    (r'py:.*', r'(jax|jaxlib|optax|numpy|chex|orbax)(\..*)?'),
]

# -- MyST and notebooks.
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence', 'deflist']
myst_heading_anchors = 3
nb_execution_mode = 'cache'
nb_execution_cache_path = os.path.join(DOCS, '_build', '.jupyter_cache')  # not cwd-relative
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

# -- HTML.
html_theme = 'furo'
html_title = f'adamfx {version}'
html_static_path = ['_static']
html_css_files = ['custom.css']
