"""A training run's --output-dir is the run's alone.

A run holds a lock on the folder while it runs (`fcntl.flock` on LOCK_NAME, which names its
process and host): a second run into the same folder is refused at once, naming the holder.
Before the first step every path the run will write is checked (best/ and last/ must be
folders, its files must be files). cvt deletes only what it can prove it wrote: the metrics of
a run that never saved a state when the lock file says a cvt run started there, and its own
temporary files by their exact names (`.training_state.pt.<hex>.tmp`, ...). Anything else is
left, and named.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import IO, Any

from ..errors import InvalidValueError, short
from ..files import require_folder, temporary_of
from ..hub import CONFIG_NAME
from ..weights import PROCESSOR_CONFIG_NAME, SAFE_WEIGHTS_NAME
from .report import CURVES_NAME, METRICS_NAME
from .state import STATE_NAME, ResumeError

logger = logging.getLogger("cvt")

LOCK_NAME = ".cvt-train.lock"
RUN_FILES = (STATE_NAME, METRICS_NAME, CURVES_NAME)  # what a run writes in its folder
MODEL_FOLDERS = ("best", "last")
MODEL_FILES = (CONFIG_NAME, SAFE_WEIGHTS_NAME, PROCESSOR_CONFIG_NAME)  # what each model folder holds


@dataclasses.dataclass
class RunFolder:
    """A locked --output-dir. `started`: a cvt run had started there before this one (its lock
    file says so), so the run files in it are cvt's."""

    path: Path
    handle: IO[str]
    started: bool

    def claim(self) -> None:
        """Record in the lock file that a cvt run started here (after the checks passed)."""
        _write(self.handle, {**_holder(), "started": True})

    def release(self) -> None:
        self.handle.close()  # closing the file releases the lock


def lock_run_folder(out: Path) -> RunFolder:
    """Create `out` and lock it for this run; another run holding it is an error naming it."""
    require_folder(out, "--output-dir")
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_NAME, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(handle)
        handle.close()
        raise ResumeError(f"{short(out)} is in use by another training run (process {holder.get('pid', '?')} "
                          f"on {holder.get('host', '?')}); wait for it to end or choose another "
                          f"--output-dir") from None
    started = bool(_read(handle).get("started"))
    _write(handle, {**_holder(), "started": started})
    return RunFolder(out, handle, started)


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def _read(handle: IO[str]) -> dict[str, Any]:
    handle.seek(0)
    try:
        data = json.loads(handle.read() or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _write(handle: IO[str], data: dict[str, Any]) -> None:
    """Rewrite the lock file in place (replacing it would give another file the lock)."""
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(data))
    handle.flush()


def check_paths(folder: RunFolder, fresh: bool) -> None:
    """Every path the run will write, before its first step: best/ and last/ folders (or
    absent), its files files. A new run refuses run files it cannot prove cvt wrote."""
    out = folder.path
    for name in MODEL_FOLDERS:
        require_folder(out / name, "the run's model folder")
    for path in [out / n for n in RUN_FILES] + [out / d / n for d in MODEL_FOLDERS for n in MODEL_FILES]:
        if path.is_dir():
            raise InvalidValueError(f"{short(path)} is a folder; the run writes a file there")
    if fresh and not folder.started:
        found = [n for n in (*RUN_FILES, *MODEL_FOLDERS) if (out / n).exists()]
        if found:
            raise ResumeError(f"{short(out)} holds {', '.join(found)}, which no cvt run started there "
                              f"wrote; move them away or choose another --output-dir")


def remove_leftovers(out: Path) -> None:
    """Delete the temporary files that writes killed half-way left, known by their exact names;
    other files that look temporary are left, and named."""
    removed, left = [], []
    for folder, names in ((out, RUN_FILES), *((out / d, MODEL_FILES) for d in MODEL_FOLDERS)):
        if folder.is_dir() and not folder.is_symlink():
            for path in sorted(folder.glob(".*.tmp")):
                ours = temporary_of(path.name) in names and path.is_file() and not path.is_symlink()
                (removed if ours else left).append(path)
    for path in removed:
        path.unlink(missing_ok=True)
        logger.info("removed %s, left by a write that was interrupted", short(path))
    if left:
        logger.info("left %s: not files cvt wrote", ", ".join(short(p) for p in left))
