"""Built engines on disk, so that a second run builds nothing.

An entry is a folder named by a hash of everything the build depends on: the weights, the
config, the input size, the precision, the runtime and its version, cvt's version, the CPU's
instruction set and (for int8) the calibration images. Its files are written into a temporary
folder that is renamed into place whole, with a manifest of their sizes and SHA-256 written
last; an entry that is incomplete, corrupt or unreadable is removed and rebuilt with a warning,
never trusted.

The cache lives in `$CVT_CACHE_DIR`, else `$XDG_CACHE_HOME/cvt/engines`, else
`~/.cache/cvt/engines`; `cache_dir=` overrides all three.
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

from ..constants import DISTRIBUTION
from .base import Engine, Model, PrecisionReport, check_fp32, cpu_description, report_dict, verify

logger = logging.getLogger("cvt")

MANIFEST = "manifest.json"


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


def entry_key(model: nn.Module, **facts: Any) -> str:
    """The cache key of a build of `model` that depends on `facts` (runtime, precision, ...)."""
    description = json.dumps({
        "weights": weights_digest(model), "config": model.config.to_dict(),
        "class": type(model).__name__, "cvt": importlib.metadata.version(DISTRIBUTION), "cpu": cpu_description(), **facts,
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
        self.root = cache_root(root)

    def load(self, key: str) -> tuple[Path, dict[str, Any]] | None:
        """(the entry's folder, the metadata stored with it), or None when there is no sound
        entry: a damaged one is removed, with a warning."""
        folder = self.root / key
        if not folder.exists():
            return None
        problem = self._problem(folder)
        if problem is None:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            return folder, manifest["meta"]
        logger.warning("cvt: the cached engine in %s is unusable (%s); rebuilding it", folder, problem)
        self.remove(key)
        return None

    def _problem(self, folder: Path) -> str | None:
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            files = manifest["files"]
            for name, (size, sha) in files.items():
                path = folder / name
                if path.stat().st_size != size:
                    return f"{name} has {path.stat().st_size} bytes, expected {size}"
                if _sha256(path) != sha:
                    return f"{name} does not match its checksum"
            return None
        except FileNotFoundError as err:
            return f"missing {Path(err.filename).name}"
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"unreadable manifest: {err}"

    def store(self, key: str, write: Callable[[Path], None], meta: dict[str, Any]) -> Path:
        """Call `write(folder)` to fill a temporary folder, record its files in the manifest, and
        move it into place as the entry `key`."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir()
        try:
            write(tmp)
            files = {p.name: (p.stat().st_size, _sha256(p)) for p in sorted(tmp.iterdir())}
            (tmp / MANIFEST).write_text(json.dumps({"files": files, "meta": meta}, indent=2),
                                        encoding="utf-8")
            try:
                os.replace(tmp, self.root / key)
            except OSError:  # another process stored the same build first: keep theirs
                if not (self.root / key / MANIFEST).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.root / key

    def remove(self, key: str) -> None:
        shutil.rmtree(self.root / key, ignore_errors=True)


def build_cached(cache: EngineCache, key: str, model: Model, *, load: Callable[[Path], Engine],
                 make: Callable[[Path], None], batches: list[tuple[Tensor, Tensor | None]] | None) -> Engine:
    """The engine stored under `key`, or a new one: `make(folder)` writes its files, `load(folder)`
    runs them. A new engine is checked before anything is stored: at fp32 against the plain
    model (`EngineError` above 1e-4); at reduced precision its cost is measured on `batches`
    (calibration images, else random ones) and stored with it."""
    found = cache.load(key)
    if found is not None:
        folder, meta = found
        try:
            engine = load(folder)
            engine.from_cache = True
            if engine.precision == "fp32":
                check_fp32(engine, model)
            elif meta.get("report"):
                engine.report = PrecisionReport(**meta["report"])
            logger.debug("cvt: %s engine loaded from %s", engine.name, folder)
            return engine
        except Exception as err:  # runtimes raise their own types; whatever it was, rebuild
            logger.warning("cvt: the cached engine in %s failed (%s); rebuilding it", folder, err)
            cache.remove(key)
    with tempfile.TemporaryDirectory(prefix="cvt-engine-") as tmp:
        make(Path(tmp))
        engine = load(Path(tmp))
        verify(engine, model, batches)
        meta = {"engine": engine.name, "precision": engine.precision, "report": report_dict(engine.report)}
        folder = cache.store(key, lambda target: _copy_files(Path(tmp), target), meta)
    logger.info("cvt: %s engine built and stored in %s", engine.name, folder)
    return engine


def _copy_files(source: Path, target: Path) -> None:
    for path in source.iterdir():
        shutil.copy2(path, target / path.name)
