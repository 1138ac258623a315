"""Built engines on disk, so that a second run builds nothing.

An entry is a folder named by a hash of everything the build depends on: the weights (a digest
of their bytes, computed once per model and build), the config, the input size, the precision,
the runtime and its version, cvt's version, the CPU's instruction set and (for int8) the
calibration images. Its files are written into a temporary folder that is renamed into place
whole, with a manifest of their sizes and SHA-256 written last, with the key it was built for.
Nothing in an entry is trusted: an entry that is incomplete, corrupt, unreadable, a symbolic
link, built for another key (stale, or copied from another model), or whose manifest names a
file that is not a plain regular file in the entry itself (a path with `..`, an absolute path, a
link, a device, a FIFO) or is over MAX_FILE_BYTES, is removed and rebuilt with a warning before
any of its files is read. A loaded entry is checked against the plain model too: at fp32 within
1e-4, at reduced precision within twice the difference measured when it was built, and never
more than the code's own bound (`base.check_reduced`), whatever the manifest says. The cache
is an optimisation: when it cannot be written (read-only, full) the engine is served anyway,
with one warning, and nothing is left.

The cache lives in `$CVT_CACHE_DIR`, else `$XDG_CACHE_HOME/cvt/engines`, else
`~/.cache/cvt/engines` (`~` expanded in both variables; a relative `$XDG_CACHE_HOME` is
ignored, as the XDG specification says); `cache_dir=` overrides all three. `auto`'s measured
choices are entries too (`auto-*`: no files, the choice in the manifest; `cvt.engines.auto`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..constants import DISTRIBUTION, TOLERANCE
from ..errors import short
from ..files import require_folder
from .base import (Engine, EngineError, Model, PrecisionReport, check_fp32, check_reduced, cpu_description,
                   report_dict, verify)

logger = logging.getLogger("cvt")

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20  # a manifest lists a few files: a larger one is not ours
MAX_FILE_BYTES = 8 << 30  # an engine file: CvT-W24's fp32 ONNX graph is 1.1 GB
_unwritable: set[Path] = set()  # cache roots this process has warned about


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("CVT_CACHE_DIR"):
        return Path(os.environ["CVT_CACHE_DIR"]).expanduser()  # quoted '~/x' reaches us unexpanded
    base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    if not base.is_absolute():  # the XDG specification: a relative path is invalid, ignored
        base = Path.home() / ".cache"
    return base / "cvt" / "engines"


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def installed_version(distribution: str) -> str:
    """A distribution's installed version ("unknown" when it is not installed): part of every
    key, so that an upgrade rebuilds or re-measures."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _sha256(path: Path, size: int) -> str:
    """The SHA-256 of the first `size` bytes of the regular file `path` (opened without
    following a link, so nothing but the file checked before is read)."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"{path.name} is not a regular file")
        while size > 0 and (block := f.read(min(size, 1 << 20))):
            digest.update(block)
            size -= len(block)
    return digest.hexdigest()


def _file_problem(folder: Path, name: str, record: object) -> str | None:
    """Why the manifest's `name: [size, sha256]` is not a sound file of the entry, or None:
    a plain name (no folder, no `..`), a regular file in the entry, of the recorded size, at
    most MAX_FILE_BYTES, with the recorded checksum."""
    if name in ("", ".", "..", MANIFEST) or Path(name).name != name or "\\" in name:
        return f"its manifest names {short(repr(name))}, not a file of the entry"
    if not (isinstance(record, list) and len(record) == 2 and type(record[0]) is int and isinstance(record[1], str)):
        return f"its manifest's record of {name} is not [size, sha256]"
    size, sha = record
    status = os.lstat(folder / name)
    if not stat.S_ISREG(status.st_mode):
        return f"{name} is not a regular file (a link, a folder or a device)"
    if status.st_size != size or not 0 <= size <= MAX_FILE_BYTES:
        return f"{name} has {status.st_size} bytes, expected {size} (at most {MAX_FILE_BYTES})"
    if _sha256(folder / name, size) != sha:
        return f"{name} does not match its checksum"
    return None


class EngineCache:
    """The entries under one root folder. The weights' digest is computed, and a model traced to
    ONNX, once per model for the life of the object (one `build_engine` call, all of auto's
    candidates): the weights may be changed in place between calls in ways no counter shows
    (`p.data.copy_`)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = cache_root(root)
        self._digests: dict[int, tuple[nn.Module, str]] = {}
        self._graphs: dict[tuple[int, tuple[int, int]], tuple[nn.Module, bytes]] = {}

    def graph(self, model: nn.Module, image_size: tuple[int, int], trace: Callable[[], bytes]) -> bytes:
        """`trace()`, the ONNX graph of `model` at `image_size`, traced once: auto builds the
        onnxruntime and OpenVINO engines from the same graph, and tracing takes seconds."""
        if (id(model), image_size) not in self._graphs:
            self._graphs[id(model), image_size] = (model, trace())  # the model kept: its id stays its own
        return self._graphs[id(model), image_size][1]

    def key(self, model: nn.Module, **facts: Any) -> str:
        """The key of a build of `model` that depends on `facts` (runtime, precision, ...)."""
        if id(model) not in self._digests:
            self._digests[id(model)] = (model, weights_digest(model))  # the model kept: its id stays its own
        description = json.dumps({
            "weights": self._digests[id(model)][1], "config": model.config.architecture(),
            "labels": model.config.id2label,
            "class": type(model).__name__, "cvt": installed_version(DISTRIBUTION), "cpu": cpu_description(),
            **facts,
        }, sort_keys=True, default=str)
        return hashlib.sha256(description.encode()).hexdigest()[:40]

    def load(self, key: str) -> tuple[Path, dict[str, Any]] | None:
        """(the entry's folder, the metadata stored with it), or None when there is no sound
        entry: a damaged, foreign or linked one is removed, with a warning."""
        require_folder(self.root, "the engine cache")
        folder = self.root / key
        if not folder.is_symlink() and not folder.exists():
            return None
        problem, meta = self._read(folder, key)
        if problem is None:
            return folder, meta
        self.discard(key, problem)
        return None

    def discard(self, key: str, problem: str) -> None:
        """Remove the unusable entry `key`, with a warning saying why."""
        logger.warning("cvt: the cached engine in %s is unusable (%s); rebuilding it", short(self.root / key), problem)
        self.remove(key)

    def _read(self, folder: Path, key: str) -> tuple[str | None, dict[str, Any]]:
        """(why the entry is unusable or None, its metadata): every file it holds must be one its
        manifest records, checked before anything else reads it."""
        if folder.is_symlink():
            return "it is a symbolic link, not followed", {}
        try:
            status = os.lstat(folder / MANIFEST)
            if not stat.S_ISREG(status.st_mode) or status.st_size > MAX_MANIFEST_BYTES:
                return f"its {MANIFEST} is not a regular file of at most {MAX_MANIFEST_BYTES} bytes", {}
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            if manifest["meta"].get("fingerprint") != key:
                return "it was built for other weights or settings", {}
            files = manifest["files"]
            extra = sorted(set(os.listdir(folder)) - set(files) - {MANIFEST})
            if extra:
                return f"it holds {short(', '.join(extra))}, which its manifest does not record", {}
            for name, record in files.items():
                problem = _file_problem(folder, name, record)
                if problem:
                    return problem, {}
            return None, manifest["meta"]
        except FileNotFoundError as err:
            return f"missing {Path(err.filename).name}", {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
            return f"unreadable manifest: {short(str(err))}", {}

    def store(self, key: str, write: Callable[[Path], None], meta: dict[str, Any]) -> Path | None:
        """Call `write(folder)` to fill a temporary folder, record its files in the manifest, and
        move it into place as the entry `key`; None (one warning per cache, nothing left behind)
        when the cache cannot be written."""
        require_folder(self.root, "the engine cache")
        tmp = self.root / f".{key}.{uuid.uuid4().hex}.tmp"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            write(tmp)
            files = {p.name: (p.stat().st_size, _sha256(p, p.stat().st_size)) for p in sorted(tmp.iterdir())}
            (tmp / MANIFEST).write_text(json.dumps({"files": files, "meta": {**meta, "fingerprint": key}},
                                                   indent=2), encoding="utf-8")
            try:
                os.replace(tmp, self.root / key)
            except OSError:  # another process stored the same build first: keep theirs
                if not (self.root / key / MANIFEST).is_file():
                    raise
            return self.root / key
        except OSError as err:
            if self.root not in _unwritable:
                _unwritable.add(self.root)
                logger.warning("cvt: cannot store engines in the cache %s (%s); using them without "
                               "storing them", short(self.root), err.strerror or err)
            return None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def remove(self, key: str) -> None:
        """Delete the entry `key`; a symbolic link is removed itself, never what it points to."""
        folder = self.root / key
        try:
            if folder.is_symlink() or folder.is_file():
                folder.unlink()
            else:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError as err:
            logger.warning("cvt: could not remove the cache entry %s (%s)", short(folder), err)


def build_cached(cache: EngineCache, key: str, model: Model, *, load: Callable[[Path], Engine],
                 make: Callable[[Path], None], batches: list[tuple[Tensor, Tensor | None]] | None) -> Engine:
    """The engine stored under `key`, or a new one: `make(folder)` writes its files, `load(folder)`
    runs them. A new engine is checked before anything is stored: at fp32 against the plain
    model (`EngineError` above 1e-4); at reduced precision its cost is measured on `batches`
    (calibration images, else random ones) and stored with it, with its difference from the
    plain model on the check batch, which a loaded entry must reproduce."""
    found = cache.load(key)
    if found is not None:
        folder, meta = found
        try:
            engine = load(folder)
            _check_loaded(engine, model, meta)
            engine.from_cache = True
            logger.debug("cvt: %s engine loaded from %s", engine.name, folder)
            return engine
        except Exception as err:  # runtimes raise their own types; whatever it was, rebuild
            logger.warning("cvt: the cached engine in %s failed (%s); rebuilding it", short(folder), err)
            cache.remove(key)
    with tempfile.TemporaryDirectory(prefix="cvt-engine-") as tmp:
        make(Path(tmp))
        engine = load(Path(tmp))
        difference = verify(engine, model, batches)
        meta = {"engine": engine.name, "precision": engine.precision, "report": report_dict(engine.report)}
        if engine.precision != "fp32":
            meta["check_difference"] = difference
        folder = cache.store(key, lambda target: _copy_files(Path(tmp), target), meta)
    if folder is not None:
        logger.info("cvt: %s engine built and stored in %s", engine.name, short(folder))
    return engine


def _check_loaded(engine: Engine, model: Model, meta: dict[str, Any]) -> None:
    """A stored engine computes what it computed when built: fp32 within 1e-4 of the plain
    model; reduced precision within twice the difference measured then, and within the code's
    own bound whatever the manifest claims (another model's engine differs by the outputs'
    whole scale)."""
    if engine.precision == "fp32":
        check_fp32(engine, model)
        return
    built = meta["check_difference"]
    if isinstance(built, bool) or not isinstance(built, (int, float)) or not 0 <= built < math.inf:
        raise EngineError(f"its recorded check difference {short(repr(built))} is not a measurement")
    check_reduced(engine, model, within=2 * built + TOLERANCE)
    engine.report = PrecisionReport(**meta["report"])


def _copy_files(source: Path, target: Path) -> None:
    for path in source.iterdir():
        shutil.copy2(path, target / path.name)
