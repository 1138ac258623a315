"""The root of cvt's error classes: an error whose message tells the user what to fix. The `cvt`
command prints these as one line (exit status 2); any other exception is a bug in cvt and shows
its traceback (exit status 3)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .constants import DISTRIBUTION, NAME_SHOWN


class CvtError(Exception):
    """Something the user (or their files, settings or network) must fix; the message says what."""


class InvalidValueError(CvtError, ValueError):
    """An argument, setting or file content cvt cannot use (a ValueError, as Python code expects)."""


class ClusterError(CvtError):
    """A Ray cluster that cannot be reached."""


class ClusterLostError(ClusterError):
    """A Ray cluster that stopped answering mid-run (its head node died): the work finished
    before it is kept, and the `cvt` command ends with its own exit status (4)."""


class CheckpointError(InvalidValueError):
    """A checkpoint that cannot be used: unreadable, of another model, or not matching the config."""


class CheckpointMismatchError(CheckpointError, RuntimeError):
    """Weights that do not fit the model: missing, unexpected or of another shape (a RuntimeError
    too, as transformers raises one for weights of another size)."""


# cvt's optional packages, by the top-level module cvt imports, and the extra that installs each
EXTRAS = {
    "sklearn": "train", "matplotlib": "train", "torchvision": "train", "datasets": "hf",
    "tensorflow": "tf", "keras": "tf", "ai_edge_litert": "tf",
    "onnx": "export", "onnxscript": "export", "onnxruntime": "onnxruntime", "openvino": "openvino",
    "nncf": "openvino", "pyarrow": "parquet", "ray": "ray", "fastapi": "serve", "multipart": "serve",
    "psutil": "ray", "peft": "peft",
}


class MissingExtraError(CvtError, ImportError):
    """One of cvt's optional packages is not installed; the message names the extra to install."""


def missing_extra(err: ImportError) -> MissingExtraError | None:
    """`err` as the extra to install, when it (or an ImportError it was raised from) already
    names one (cvt's own messages) or is one of EXTRAS not being found; None for any other
    import error (a bug, shown as one)."""
    while isinstance(err, ImportError):
        if f'"{DISTRIBUTION}[' in str(err):  # install_hint's words
            return MissingExtraError(str(err))
        module = (err.name or "").partition(".")[0]
        if module in EXTRAS:
            return MissingExtraError(f"this needs the optional package {module!r}, which is not installed "
                                     f"({err}): {install_hint(EXTRAS[module])}")
        err = err.__cause__
    return None


def install_hint(extra: str | None = None) -> str:
    """The pip command that installs cvt with an optional extra, for messages about a missing one
    (PyPI's `cvt` is another project, which also imports as `cvt`: ours is DISTRIBUTION)."""
    return f'pip install "{DISTRIBUTION}[{extra}]"' if extra else f"pip install {DISTRIBUTION}"


def short(name: object) -> str:
    """`name` as a message shows it: its first and last NAME_SHOWN characters when it is longer
    (a 10,000-character name would otherwise make a 10,000-character error line)."""
    text = str(name)
    if len(text) <= 2 * NAME_SHOWN + 3:
        return text
    return f"{text[:NAME_SHOWN]}...{text[-NAME_SHOWN:]}"


def check_size(what: str, value: object, limits: tuple[int, int]) -> int:
    """`value` as an int when it is a whole number within `limits`, else an `InvalidValueError`
    naming the range (0 and negatives are errors, never "not given")."""
    low, high = limits
    if value not in Range(True, low, high):
        raise InvalidValueError(f"{what} must be a positive whole number of pixels, from {low} to {high}; "
                                f"got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Range:
    """The numbers a setting accepts: whole ones (`whole`) or any finite ones, from `low` (above
    it with `low_open`) up to `high` (below it with `high_open`). NaN and infinities never are."""

    whole: bool
    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.whole else numbers.Real):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        if self.high == math.inf:
            return f"{kind} {'above' if self.low_open else 'from'} {self.low:g}" + ("" if self.low_open else " up")
        if not (self.low_open or self.high_open):
            return f"{kind} from {self.low:g} to {self.high:g}"
        low = f"above {self.low:g}" if self.low_open else f"from {self.low:g}"
        high = f"below {self.high:g}" if self.high_open else f"up to {self.high:g}"
        return f"{kind} {low}, {high}"

    def check(self, what: str, value: object) -> object:
        """`value` when it is in the range, else an `InvalidValueError` naming `what` and the range."""
        if value not in self:
            raise InvalidValueError(f"{what} must be {self}; got {value!r}")
        return value
