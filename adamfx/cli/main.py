"""The ``adamfx`` command: ``adamfx demo``, ``adamfx bench`` and ``adamfx memory``."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each subcommand lives in its own module of adamfx.cli, with an
# ``add_arguments(parser)`` and a ``run(args) -> int``; the modules import jax and
# friends inside ``run``, so building the parser stays fast.
_COMMANDS = {
    'demo': ('adamfx.cli.demo', 'train on scikit-learn digits: adamfx vs optax and friends'),
    'bench': ('adamfx.cli.bench', 'time an Adam step: adamfx vs optax, in one run'),
    'memory': ('adamfx.cli.memory', 'state bytes, training parity and step time of 16-bit and 8-bit moments'),
}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='adamfx', description='The adamfx command: adamfx demo, adamfx bench and adamfx memory.'
  )
  from adamfx import __version__  # noqa: PLC0415

  parser.add_argument('--version', action='version', version=f'adamfx {__version__}')
  sub = parser.add_subparsers(dest='command', required=True)
  for name, (module, help_text) in _COMMANDS.items():
    p = sub.add_parser(name, help=help_text)
    p.set_defaults(_module=module)
    try:
      importlib.import_module(module).add_arguments(p)
    except ModuleNotFoundError as e:
      if e.name != module:
        raise
  args = parser.parse_args(argv)
  return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == '__main__':
  sys.exit(main())
