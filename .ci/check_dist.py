"""Checks the built wheel and sdist: the package, and nothing stray.

Usage: ``python .ci/check_dist.py DIST_DIR`` (run from the repository root, after
``python -m build --outdir DIST_DIR``). The wheel must hold exactly the package's
tracked files (``git ls-files adamfx``) plus its ``.dist-info``; the sdist exactly
the tracked files of ``adamfx/``, ``tests/``, ``README.md``, ``pyproject.toml`` and ``.gitignore``,
plus ``PKG-INFO``. Either way: no caches, no compiled or backup files, no tests in
the wheel. Exits 1 with the differences otherwise.
"""

import pathlib
import subprocess
import sys
import tarfile
import zipfile

STRAY = ('__pycache__', '.pyc', '.pyo', '.orig', '.rej', '.ipynb_checkpoints', '.hypothesis')


def _tracked(*paths: str) -> set[str]:
  out = subprocess.run(['git', 'ls-files', '--', *paths], capture_output=True, text=True,
                       check=True).stdout
  return {line for line in out.splitlines() if line}


def main(dist: str) -> int:
  dist = pathlib.Path(dist)
  (wheel,), (sdist,) = sorted(dist.glob('*.whl')), sorted(dist.glob('*.tar.gz'))
  errors = []
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
  info = {n for n in names if n.split('/')[0].endswith('.dist-info')}
  package = names - info
  want = _tracked('adamfx')
  if package != want:
    errors.append(f'{wheel.name}: extra {sorted(package - want)}, missing {sorted(want - package)}')
  with tarfile.open(sdist) as t:
    members = {m.name.split('/', 1)[1] for m in t.getmembers() if m.isfile()}
  want = _tracked('adamfx', 'tests', 'README.md', 'pyproject.toml', '.gitignore') | {'PKG-INFO'}
  if members != want:
    errors.append(f'{sdist.name}: extra {sorted(members - want)}, missing {sorted(want - members)}')
  for name, files in ((wheel.name, names), (sdist.name, members)):
    stray = sorted(f for f in files if any(s in f for s in STRAY))
    if stray:
      errors.append(f'{name}: stray files {stray}')
  if any(n.startswith('tests/') for n in names):
    errors.append(f'{wheel.name}: holds tests/')
  print('\n'.join(errors) or f'{wheel.name}: {len(package)} package files; '
        f'{sdist.name}: {len(members)} files; nothing stray')
  return 1 if errors else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1]))
