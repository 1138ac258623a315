"""A training run's --output-dir is the run's alone.

A run holds a lock on the folder while it runs (`filelock` on LOCK_NAME: the operating system's
file lock on Linux, macOS and Windows alike); a second run into the same folder is refused at once, naming the holder
that RECORD_NAME records (its process and host, and whether a cvt run started there and saved a
state). The lock file is never followed when it is a symbolic link: nothing outside the folder
is created or truncated. Before the first step every path the run will write is checked (best/
and last/ must be folders, its files must be files). cvt deletes only what it can prove it
wrote: the metrics of a run that started there and never saved a state, and its own temporary
files by their exact names (`.training_state.pt.<hex>.tmp`, ...). Anything else is left, and
named.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

import filelock

from ..errors import InvalidValueError, short
from ..files import require_folder, temporary_of, write_json
from ..checkpoints.hub import CONFIG_NAME
from ..checkpoints.read import PROCESSOR_CONFIG_NAME, SAFE_WEIGHTS_NAME
from .report import CURVES_NAME, METRICS_NAME
from .state import STATE_NAME, ResumeError

logger = logging.getLogger("cvt")

LOCK_NAME = ".cvt-train.lock"
RECORD_NAME = ".cvt-train.json"  # who holds the lock; whether a cvt run started here and saved a state
MAX_RECORD_BYTES = 4096  # a record is one short JSON object; anything larger is not ours
RUN_FILES = (STATE_NAME, METRICS_NAME, CURVES_NAME)  # what a run writes in its folder
MODEL_FOLDERS = ("best", "last")
MODEL_FILES = (CONFIG_NAME, SAFE_WEIGHTS_NAME, PROCESSOR_CONFIG_NAME)  # what each model folder holds


@dataclasses.dataclass
class RunFolder:
    """A locked --output-dir. `started`: a cvt run has started there (this one or an earlier
    one), so the run files in it are cvt's; `saved`: one of them saved a training state."""

    path: Path
    lock: filelock.BaseFileLock
    started: bool
    saved: bool

    def claim(self, saved: bool = False) -> None:
        """Record that a cvt run started here (after the checks passed), and with `saved` that
        the folder holds its saved state (a resume)."""
        self.started, self.saved = True, self.saved or saved
        self._record()

    def state_saved(self) -> None:
        """Record that a run here saved a state: its metrics are never discarded afterwards."""
        if not self.saved:
            self.saved = True
            self._record()

    def release(self) -> None:
        self.lock.release()

    def _record(self) -> None:
        write_json(self.path / RECORD_NAME, {**_holder(), "started": self.started, "saved": self.saved})


def lock_run_folder(out: Path) -> RunFolder:
    """Create `out` and lock it for this run; another run holding it is an error naming it."""
    require_folder(out, "--output-dir")
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ResumeError(f"{short(path)} is a symbolic link or not a regular file; cvt does not follow it "
                          f"(it would create or truncate a file elsewhere): remove it and run again")
    lock = filelock.FileLock(path)
    try:
        lock.acquire(blocking=False)
    except filelock.Timeout:
        holder = _read_record(out)
        raise ResumeError(f"{short(out)} is in use by another training run (process {holder.get('pid', '?')} "
                          f"on {holder.get('host', '?')}); wait for it to end or choose another "
                          f"--output-dir") from None
    record = _read_record(out)
    folder = RunFolder(out, lock, started=record.get("started") is True, saved=record.get("saved") is True)
    try:
        folder._record()
    except BaseException:
        lock.release()
        raise
    return folder


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def _read_record(out: Path) -> dict[str, Any]:
    """The folder's record; {} when it is missing, not a small regular file (a planted link to
    /dev/zero would never end) or not a JSON object."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(out / RECORD_NAME, flags)
    except OSError:  # missing, or a link (O_NOFOLLOW)
        return {}
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_RECORD_BYTES:
            return {}
        data = json.loads(os.read(fd, MAX_RECORD_BYTES + 1).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)
    return data if isinstance(data, dict) else {}


def check_paths(folder: RunFolder, fresh: bool) -> None:
    """Every path the run will write, before its first step: best/ and last/ folders (or
    absent), its files files. A new run refuses run files it cannot prove cvt wrote, and those
    of a run that saved a state (its metrics and models are not a killed run's leftovers)."""
    out = folder.path
    for name in MODEL_FOLDERS:
        require_folder(out / name, "the run's model folder")
    for path in [out / n for n in RUN_FILES] + [out / d / n for d in MODEL_FOLDERS for n in MODEL_FILES]:
        if path.is_dir():
            raise InvalidValueError(f"{short(path)} is a folder; the run writes a file there")
    found = [n for n in (*RUN_FILES, *MODEL_FOLDERS) if (out / n).exists()] if fresh else []
    if found and not folder.started:
        raise ResumeError(f"{short(out)} holds {', '.join(found)}, which no cvt run started there "
                          f"wrote; move them away or choose another --output-dir")
    if found and folder.saved:  # a new run starts only where no state is: this one's is gone
        raise ResumeError(f"{short(out)} holds {', '.join(found)} of a run that saved a training state, "
                          f"but its {STATE_NAME} is missing; cvt does not delete or overwrite them: "
                          f"restore {STATE_NAME} and pass --resume, or move them away, or choose another "
                          f"--output-dir")


def remove_leftovers(out: Path) -> None:
    """Delete the temporary files that writes killed half-way left, known by their exact names;
    other files that look temporary are left, and named."""
    removed, left = [], []
    for folder, names in ((out, (*RUN_FILES, RECORD_NAME)), *((out / d, MODEL_FILES) for d in MODEL_FOLDERS)):
        if folder.is_dir() and not folder.is_symlink():
            for path in sorted(folder.glob(".*.tmp")):
                ours = temporary_of(path.name) in names and path.is_file() and not path.is_symlink()
                (removed if ours else left).append(path)
    for path in removed:
        path.unlink(missing_ok=True)
        logger.info("removed %s, left by a write that was interrupted", short(path))
    if left:
        logger.info("left %s: not files cvt wrote", ", ".join(short(p) for p in left))
