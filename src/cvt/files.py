"""Writing files safely: every file cvt writes goes through `write_atomic` (a temporary file
beside the target, fsync, rename), so readers see the old file or the new one, never half.
A replaced file keeps its permission bits, and folders made for a write that fails are removed.
Text goes out with one policy for characters the output cannot encode (`TEXT_ERRORS`)."""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import InvalidValueError, short

# the temporary file `write_atomic` writes beside its target NAME: `.NAME.<hex>.tmp`, where NAME
# is cut to its first bytes when the whole would pass NAME_MAX
TEMPORARY_NAME = re.compile(r"\.(?P<target>.+)\.[0-9a-f]+\.tmp")
NAME_MAX = 255  # bytes in one file name on common file systems (ext4, XFS, APFS; NTFS counts fewer)
_RANDOM_BYTES = 8
_NAME_ROOM = NAME_MAX - len("..") - 2 * _RANDOM_BYTES - len(".tmp")  # for NAME in the temporary name

# The error handler for text cvt writes (files and stdout): a file name's undecodable bytes
# (Python's surrogateescape, U+DC80-U+DCFF) go out as those bytes, so the name reads back
# exactly; any other character the encoding lacks (a lone surrogate in a label, an emoji on a
# Latin-1 terminal) as a backslash escape (\ud83d), never an error.
TEXT_ERRORS = "cvt.bytes-else-escape"


def _bytes_else_escape(error: UnicodeError) -> tuple[bytes, int]:
    if not isinstance(error, UnicodeEncodeError):
        raise error
    text = error.object[error.start:error.end]
    return b"".join(bytes([ord(c) - 0xDC00]) if 0xDC80 <= ord(c) <= 0xDCFF
                    else c.encode("ascii", "backslashreplace") for c in text), error.end


codecs.register_error(TEXT_ERRORS, _bytes_else_escape)


def utf8_text(text: str) -> str:
    """`text` as valid UTF-8 can hold it (parquet strings must be): undecodable file-name bytes
    written as `\\xNN`, lone surrogates as `\\udNNN`."""
    return text.encode("utf-8", TEXT_ERRORS).decode("utf-8", "backslashreplace")


def temporary_of(name: str) -> str | None:
    """The target a file named `name` is `write_atomic`'s temporary file for (for a target name
    too long to fit, its first bytes), or None."""
    match = TEMPORARY_NAME.fullmatch(name)
    return match["target"] if match else None


def temporary_name(name: str) -> str:
    """A fresh `write_atomic` temporary name for the target `name`, within NAME_MAX bytes."""
    stem = name[:_NAME_ROOM]
    while len(os.fsencode(stem)) > _NAME_ROOM:  # multi-byte characters: cut whole ones
        stem = stem[:-1]
    return f".{stem}.{secrets.token_hex(_RANDOM_BYTES)}.tmp"  # TEMPORARY_NAME


def kept_mode(path: str | os.PathLike, default: int) -> int:
    """The permission bits for a file replacing `path`: those of the file there now (a 0600
    file stays 0600), else `default`."""
    try:
        status = os.stat(path)
    except OSError:
        return default
    return status.st_mode & 0o777 if stat.S_ISREG(status.st_mode) else default


def new_file_mode(folder: str | os.PathLike) -> int:
    """The permission bits a new file gets in `folder` (0666 less the umask)."""
    probe = Path(folder) / temporary_name("mode")
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        return stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        probe.unlink()


def put_in_place(written: str | os.PathLike, target: str | os.PathLike, new_mode: int) -> None:
    """Rename a finished file over `target`, durably: with `target`'s permission bits (a 0600
    file stays 0600; else `new_mode`, since some writers make owner-only files, as safetensors
    does), fsynced first."""
    os.chmod(written, kept_mode(target, new_mode))
    with open(written, "rb") as f:
        os.fsync(f.fileno())
    os.replace(written, target)


@contextlib.contextmanager
def folders_made_for(path: str | os.PathLike) -> Iterator[None]:
    """Make `path`'s missing parent folders; if the body fails, remove the ones made here
    (those still empty): a failed write leaves no trace."""
    missing = []
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made = []
    try:
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:  # made by someone else meanwhile: not ours to remove
                continue
            made.append(folder)
        yield
    except BaseException:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, fsync it, then rename over `path`: readers see old or new, never half."""
    path = Path(path)
    with folders_made_for(path):
        tmp = str(path.parent / temporary_name(path.name))
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        try:
            mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0666 less the umask, as open() gives
            write(tmp)
            put_in_place(tmp, path, mode)
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
