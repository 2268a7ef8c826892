"""``python -m adamfx demo`` / ``python -m adamfx bench``."""

import sys

from adamfx._cli import main

sys.exit(main())
