"""The resumable training state: one file, written atomically, read without unpickling code.

It holds the model, optimiser, grad-scaler and EMA state dicts, the optimiser step, the best
validation accuracy, every rank's random-number-generator states, and the settings a resumed
run must share with it (`cvt.training.trainer.RESUME_COMPARED`). Writing goes through
`cvt.files.write_atomic` (temporary file, fsync, rename), so an interrupted save leaves the
previous state in place; the temporary files a killed process leaves behind are removed when the
run starts or resumes.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import write_atomic
from ..weights import CheckpointError

STATE_NAME = "training_state.pt"
# the parts of a saved state, and what each must be (scaler and ema: None when the run has none)
STATE_PARTS: dict[str, tuple[type, ...]] = {
    "step": (int,), "best_top1": (float, int), "run": (dict,), "rng": (list,), "extra_epochs": (int,),
    "model": (dict,), "optimizer": (dict,), "scaler": (dict, type(None)), "ema": (dict, type(None))}
RNG_PARTS = ("torch", "cuda", "python", "numpy")


class ResumeError(CheckpointError):
    """A training run that cannot be resumed (or started) as asked: no usable saved state, or
    a command that differs from the saved run."""


def save_state(path: Path, state: dict[str, Any]) -> None:
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict[str, Any]:
    """The saved state at `path`, each of its parts present and of the right kind."""
    if not path.is_file():
        raise ResumeError(f"cannot resume: no training state at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle: all mean the file cannot be trusted
        raise ResumeError(
            f"cannot resume from {path}: the file is truncated or corrupt ({type(err).__name__}: "
            f"{err}); restore it from a backup or start without --resume") from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise ResumeError(f"{path} is not a cvt training state (no 'step' or 'model')")
    for part, kinds in STATE_PARTS.items():
        if part not in state:
            raise ResumeError(f"cannot resume from {path}: its {part!r} part is missing")
        if not isinstance(state[part], kinds) or isinstance(state[part], bool):
            raise ResumeError(f"cannot resume from {path}: its {part!r} part is a "
                              f"{type(state[part]).__name__}, not a {' or '.join(k.__name__ for k in kinds)}")
    if not state["rng"] or not all(isinstance(r, dict) and set(RNG_PARTS) <= r.keys() for r in state["rng"]):
        raise ResumeError(f"cannot resume from {path}: its 'rng' part does not hold a random state "
                          f"({', '.join(RNG_PARTS)}) for every process")
    return state


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temporary files (`.NAME.<hex>.tmp`) that writes killed half-way left in a run's
    folder and its best/ and last/ models; returns them."""
    leftovers = [p for sub in (folder, folder / "best", folder / "last") if sub.is_dir()
                 for p in sub.glob(".*.tmp") if p.is_file()]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


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
