"""`python -m cvt ...` (also how torchrun starts the CLI)."""

import sys

from .cli import main

sys.exit(main())
