"""``python -m adamfx demo|bench|memory``: the ``adamfx`` command."""

import sys

from adamfx.cli.main import main

sys.exit(main())
