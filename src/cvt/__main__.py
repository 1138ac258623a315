"""`python -m cvt ...` (also how torchrun starts the CLI)."""

from .cli import entry

entry()
