"""Built engines on disk, so that a second run builds nothing.

An entry is a folder named by a hash of everything the build depends on: the weights, the
config, the input size, the precision, the runtime and its version, cvt's version, the CPU's
instruction set and (for int8) the calibration images. Its files are written into a temporary
folder that is renamed into place whole, with a manifest of their sizes and SHA-256 written
last, with the key it was built for (a fingerprint of the weights and settings). An entry that
is incomplete, corrupt, unreadable, a symbolic link, or built for another key (stale, or copied
from another model) is removed and rebuilt with a warning, never trusted; a loaded entry is
checked against the plain model too: at fp32 within 1e-4, at reduced precision within twice
the difference measured when it was built. The cache is an optimisation: when it cannot be
written (read-only, full) the engine is served anyway, with one warning, and nothing is left.

The cache lives in `$CVT_CACHE_DIR`, else `$XDG_CACHE_HOME/cvt/engines`, else
`~/.cache/cvt/engines`; `cache_dir=` overrides all three. `auto`'s measured choices are entries
too (`auto-*`: no files, the choice in the manifest; `cvt.engines.auto`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
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
from .base import (Engine, EngineError, Model, PrecisionReport, check_difference, check_fp32, cpu_description,
                   report_dict, verify)

logger = logging.getLogger("cvt")

MANIFEST = "manifest.json"
_unwritable: set[Path] = set()  # cache roots this process has warned about


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("CVT_CACHE_DIR"):
        return Path(os.environ["CVT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cvt" / "engines"


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


def entry_key(model: nn.Module, **facts: Any) -> str:
    """The cache key of a build of `model` that depends on `facts` (runtime, precision, ...)."""
    description = json.dumps({
        "weights": weights_digest(model), "config": model.config.to_dict(),
        "class": type(model).__name__, "cvt": installed_version(DISTRIBUTION), "cpu": cpu_description(), **facts,
    }, sort_keys=True, default=str)
    return hashlib.sha256(description.encode()).hexdigest()[:40]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class EngineCache:
    """The entries under one root folder."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = require_folder(cache_root(root), "the engine cache")

    def load(self, key: str) -> tuple[Path, dict[str, Any]] | None:
        """(the entry's folder, the metadata stored with it), or None when there is no sound
        entry: a damaged, foreign or linked one is removed, with a warning."""
        folder = self.root / key
        if not folder.is_symlink() and not folder.exists():
            return None
        problem = self._problem(folder, key)
        if problem is None:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            return folder, manifest["meta"]
        logger.warning("cvt: the cached engine in %s is unusable (%s); rebuilding it", short(folder), problem)
        self.remove(key)
        return None

    def _problem(self, folder: Path, key: str) -> str | None:
        if folder.is_symlink():
            return "it is a symbolic link, not followed"
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            if manifest["meta"].get("fingerprint") != key:
                return "it was built for other weights or settings"
            for name, (size, sha) in manifest["files"].items():
                path = folder / name
                if path.is_symlink():
                    return f"{name} is a symbolic link"
                if path.stat().st_size != size:
                    return f"{name} has {path.stat().st_size} bytes, expected {size}"
                if _sha256(path) != sha:
                    return f"{name} does not match its checksum"
            return None
        except FileNotFoundError as err:
            return f"missing {Path(err.filename).name}"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            return f"unreadable manifest: {err}"

    def store(self, key: str, write: Callable[[Path], None], meta: dict[str, Any]) -> Path | None:
        """Call `write(folder)` to fill a temporary folder, record its files in the manifest, and
        move it into place as the entry `key`; None (one warning per cache, nothing left behind)
        when the cache cannot be written."""
        tmp = self.root / f".{key}.{uuid.uuid4().hex}.tmp"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            write(tmp)
            files = {p.name: (p.stat().st_size, _sha256(p)) for p in sorted(tmp.iterdir())}
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
        verify(engine, model, batches)
        meta = {"engine": engine.name, "precision": engine.precision, "report": report_dict(engine.report)}
        if engine.precision != "fp32":
            meta["check_difference"] = check_difference(engine, model)
        folder = cache.store(key, lambda target: _copy_files(Path(tmp), target), meta)
    if folder is not None:
        logger.info("cvt: %s engine built and stored in %s", engine.name, short(folder))
    return engine


def _check_loaded(engine: Engine, model: Model, meta: dict[str, Any]) -> None:
    """A stored engine computes what it computed when built: fp32 within 1e-4 of the plain
    model; reduced precision within twice the difference measured then (another model's
    engine differs by the logits' whole scale)."""
    if engine.precision == "fp32":
        check_fp32(engine, model)
        return
    built = float(meta["check_difference"])
    now = check_difference(engine, model)
    if not now <= 2 * built + TOLERANCE:
        raise EngineError(f"it differs from the plain model by {now:.3g} on the check batch, "
                          f"{built:.3g} when it was built")
    engine.report = PrecisionReport(**meta["report"])


def _copy_files(source: Path, target: Path) -> None:
    for path in source.iterdir():
        shutil.copy2(path, target / path.name)
