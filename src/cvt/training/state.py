"""The resumable training state: one file, written atomically, read without unpickling code.

It holds the model, optimiser, grad-scaler and EMA state dicts, the optimiser step, the best
validation accuracy, every rank's random-number-generator states, and the settings a resumed
run must share with it (batch size, data size, epochs, seed, EMA, precision). Writing goes through `cvt.files.write_atomic` (temporary file, fsync, rename), so
an interrupted save leaves the previous state in place.
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


def save_state(path: Path, state: dict[str, Any]) -> None:
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"cannot resume: no training state at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle: all mean the file cannot be trusted
        raise CheckpointError(
            f"cannot resume from {path}: the file is truncated or corrupt ({type(err).__name__}: "
            f"{err}); restore it from a backup or start without --resume") from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a cvt training state (no 'step' or 'model')")
    return state


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
