"""The build both runtime engines (onnxruntime, OpenVINO) share: the model traced to ONNX, turned
into the runtime's files, stored in the engine cache and checked against the plain model. Each
engine supplies only what differs: its runtime's checks and how it writes its files."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .onnx_graph import onnx_bytes
from .base import Engine, EngineError, Model
from .cache import EngineCache, build_cached
from .calibration import CalibrationSet

logger = logging.getLogger("cvt")


def build_exported(engine_class: type[Engine], model: Model, *, file: str, version: str,
                   device: torch.device, precision: str, image_size: tuple[int, int],
                   calibration: CalibrationSet | None, cache: EngineCache,
                   write: Callable[[bytes, Path], None], **key_facts: Any) -> Engine:
    """The `engine_class` engine (constructed as `engine_class(model, folder / file, device=,
    precision=, image_size=)`) from the cache, or built: `write(onnx_graph, folder)` writes its
    files. `version` is the runtime's, `key_facts` any other facts the build depends on."""
    if precision == "int8" and calibration is None:
        raise EngineError("int8 needs calibration images: calibration='folder' (--calibration DIR)")
    key = cache.key(model, runtime=engine_class.name, version=version, precision=precision,
                    image_size=image_size, calibration=calibration.digest if calibration else None,
                    **key_facts)

    def make(folder: Path) -> None:
        logger.info("cvt: building the %s engine (%s): exporting to ONNX ...", engine_class.name, precision)
        write(cache.graph(model, image_size, lambda: onnx_bytes(model, image_size)), folder)

    def load(folder: Path) -> Engine:
        return engine_class(model, folder / file, device=device, precision=precision, image_size=image_size)

    return build_cached(cache, key, model, load=load, make=make,
                        batches=calibration.batches if calibration else None)
