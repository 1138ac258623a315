"""The resumable training state: one file, written atomically, read without unpickling code.

It holds the model, optimiser, grad-scaler and EMA state dicts, the optimiser step, the best
validation accuracy, every rank's random-number-generator states, and the settings a resumed
run must share with it (`cvt.training.trainer.RESUME_COMPARED`). Writing goes through
`cvt.files.write_atomic` (temporary file, fsync, rename), so an interrupted save leaves the
previous state in place (`cvt.training.folder` removes the temporary files a killed process
leaves behind). A state records its format (STATE_FORMAT) and the cvt that wrote it: a newer
format is refused naming both versions, as is a file that is not a cvt state, or one whose
values no run has (a negative step, a NaN score).
"""

from __future__ import annotations

import importlib.metadata
import math
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..constants import DISTRIBUTION
from ..errors import CvtError, short
from ..files import write_atomic
from ..errors import CheckpointError

STATE_NAME = "training_state.pt"
# the parts of a saved state, and what each must be (scaler and ema: None when the run has none)
STATE_PARTS: dict[str, tuple[type, ...]] = {
    "step": (int,), "best_top1": (float, int), "run": (dict,), "rng": (list,), "extra_epochs": (int,),
    "model": (dict,), "optimizer": (dict,), "scaler": (dict, type(None)), "ema": (dict, type(None))}
RNG_PARTS = ("torch", "cuda", "python", "numpy")
# the layout of a saved state; a state without "format" was written by a cvt before formats (1)
STATE_FORMAT = 1


def cvt_version() -> str:
    return importlib.metadata.version(DISTRIBUTION)


class ResumeError(CheckpointError):
    """A training run that cannot be resumed (or started) as asked: no usable saved state, or
    a command that differs from the saved run."""


class StateWriteError(CvtError):
    """The training state could not be written (a full disk); the previous one is left as it was."""


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write `state` atomically. A failed write (a full disk, a lost mount) is a `StateWriteError`
    saying what is left: the previous state, intact, or none."""
    state = {**state, "format": STATE_FORMAT, "cvt_version": cvt_version()}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # through Python: a failed write is an OSError, not torch's RuntimeError
            torch.save(state, f)

    try:
        write_atomic(path, write)
    except OSError as err:
        kept = (f"the previous state in {short(path)} is intact: free some space, then continue with --resume"
                if path.is_file() else "no earlier state was saved there")
        raise StateWriteError(f"could not save the training state at step {state.get('step', '?')} "
                              f"({err.strerror or err}); {kept}") from err


def load_state(path: Path) -> dict[str, Any]:
    """The saved state at `path`, each of its parts present, of the right kind and in range."""
    shown = short(path)
    if not path.is_file():
        raise ResumeError(f"cannot resume: no training state at {shown}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights-only loading met something no cvt state holds
        raise ResumeError(f"cannot resume: {shown} is not a cvt training state (it holds Python "
                          f"objects a training state never has)") from None
    except Exception as err:  # truncated zip, bad pickle: all mean the file cannot be trusted
        reason = str(err).splitlines()[0] if str(err) else ""
        raise ResumeError(
            f"cannot resume from {shown}: the file is truncated or corrupt ({type(err).__name__}: "
            f"{reason}); restore it from a backup or start without --resume") from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise ResumeError(f"{shown} is not a cvt training state (no 'step' or 'model')")
    _check_format(state, shown)
    for part, kinds in STATE_PARTS.items():
        if part not in state:
            raise ResumeError(f"cannot resume from {shown}: its {part!r} part is missing")
        if not isinstance(state[part], kinds) or isinstance(state[part], bool):
            raise ResumeError(f"cannot resume from {shown}: its {part!r} part is a "
                              f"{type(state[part]).__name__}, not a {' or '.join(k.__name__ for k in kinds)}")
    if not state["rng"] or not all(isinstance(r, dict) and set(RNG_PARTS) <= r.keys() for r in state["rng"]):
        raise ResumeError(f"cannot resume from {shown}: its 'rng' part does not hold a random state "
                          f"({', '.join(RNG_PARTS)}) for every process")
    _check_values(state, shown)
    return state


def written_by(state: dict[str, Any]) -> str:
    """Which cvt wrote a state, for messages that name both versions."""
    return f"cvt {state.get('cvt_version', '(unrecorded)')}, state format {state.get('format', 1)}"


def _check_format(state: dict[str, Any], shown: str) -> None:
    version = state.get("format", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ResumeError(f"cannot resume from {shown}: its state format {version!r} is not one any cvt "
                          f"writes (formats are whole numbers from 1; this cvt reads 1 to {STATE_FORMAT})")
    if version > STATE_FORMAT:
        raise ResumeError(f"cannot resume from {shown}: it was written by {written_by(state)}; this is "
                          f"cvt {cvt_version()}, which reads state formats up to {STATE_FORMAT}; "
                          f"resume with a newer cvt")


def _check_values(state: dict[str, Any], shown: str) -> None:
    """Values no run saves: refused by name (they would divide by zero or never save best/)."""
    problems = [f"{name} is {state[name]} (negative)" for name in ("step", "extra_epochs") if state[name] < 0]
    if not math.isfinite(state["best_top1"]) or not -1 <= state["best_top1"] <= 1:
        problems.append(f"best_top1 is {state['best_top1']} (a run's is -1 before any validation, else 0 to 1)")
    if problems:
        raise ResumeError(f"cannot resume from {shown}: its {'; '.join(problems)}")


def rng_state() -> dict[str, Any]:
    """This process's generators: torch (CPU and every GPU), Python's and NumPy's."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
