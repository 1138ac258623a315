"""Writing files safely: every file cvt writes goes through `write_atomic` (a temporary file
beside the target, fsync, rename), so readers see the old file or the new one, never half."""

from __future__ import annotations

import json
import os
import re
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import InvalidValueError, short


# the temporary file `write_atomic` writes beside its target NAME: `.NAME.<hex>.tmp`
TEMPORARY_NAME = re.compile(r"\.(?P<target>.+)\.[0-9a-f]+\.tmp")


def temporary_of(name: str) -> str | None:
    """The target a file named `name` is `write_atomic`'s temporary file for, or None."""
    match = TEMPORARY_NAME.fullmatch(name)
    return match["target"] if match else None


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, fsync it, then rename over `path`: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")  # TEMPORARY_NAME
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0666 less the umask, as open() gives
        write(tmp)
        os.chmod(tmp, mode)  # some writers replace the file with an owner-only one (safetensors does)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")

    write_atomic(path, write)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (an ONNX file, say)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write_atomic(path, write)


def require_folder(path: str | os.PathLike, what: str) -> Path:
    """`path`, which must be a folder (or not exist yet): a file there is an error saying so."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InvalidValueError(f"{what} {short(path)} is a file, not a folder; move it or choose another folder")
    return path
