"""The root of cvt's error classes: an error whose message tells the user what to fix. The `cvt`
command prints these as one line (exit status 2); any other exception is a bug in cvt and shows
its traceback (exit status 3)."""

from __future__ import annotations

from .constants import DISTRIBUTION


class CvtError(Exception):
    """Something the user (or their files, settings or network) must fix; the message says what."""


class InvalidValueError(CvtError, ValueError):
    """An argument, setting or file content cvt cannot use (a ValueError, as Python code expects)."""


class CheckpointError(InvalidValueError):
    """A checkpoint that cannot be used: unreadable, of another model, or not matching the config."""


def install_hint(extra: str | None = None) -> str:
    """The pip command that installs cvt with an optional extra, for messages about a missing one
    (PyPI's `cvt` is another project, which also imports as `cvt`: ours is DISTRIBUTION)."""
    return f'pip install "{DISTRIBUTION}[{extra}]"' if extra else f"pip install {DISTRIBUTION}"
