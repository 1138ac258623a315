"""Inference engines: the fastest way to run a cvt model, chosen explicitly.

`build_engine(model, "openvino")` returns a callable that maps a `pixel_values` batch to logits
(or, for a `CvtModel`, the last feature map). Each engine checks itself against the plain model
when built: fp32 within 1e-4, else `EngineError` and nothing is cached; reduced precision (bf16,
int8) reports what it costs (`engine.report`: logit error and top-1 agreement with fp32, and
accuracy when the calibration folder is labelled), and one that differs from the plain model by
more than three quarters of its outputs' scale is an `EngineError`. `model(x)` always runs the plain
model.

| engine | what runs | precisions |
|---|---|---|
| `torch` | a frozen, fused copy of the model in PyTorch (CPU or CUDA) | fp32, bf16, fp16 (CUDA) |
| `onnxruntime` | the exported ONNX graph in ONNX Runtime | fp32, int8 |
| `openvino` | the ONNX graph compiled by OpenVINO (CPU) | fp32, bf16, int8 |

`auto` picks the fastest installed fp32 engine by measuring them on this machine once per
architecture, input size and batch-size bucket (`cvt.engines.auto`; `CVT_AUTO_ENGINE=order`
takes a fixed order instead).
"""

from __future__ import annotations

import os

import torch

from ..images.processing import CvtImageProcessor
from . import auto, fused, onnxruntime_engine, openvino_engine
from ..constants import ENGINE_PRECISIONS, ENGINES, IMAGE_SIZE_RANGE
from .base import Engine, EngineError, Model, PrecisionReport, verify
from .cache import EngineCache
from .calibration import CalibrationSet, load_calibration
from ..errors import InvalidValueError, check_size

__all__ = ["ENGINES", "ENGINE_PRECISIONS", "CalibrationSet", "Engine", "EngineError", "PrecisionReport",
           "auto_engine", "build_engine"]


def auto_engine(device: torch.device, model: Model | None = None) -> str:
    """The engine `auto` takes without measuring: the first installed one of the fixed order
    (`CVT_AUTO_ENGINE=order`, reduced precision) that can run `model` exactly."""
    return auto.candidates(device, model)[0]


def build_engine(model: Model, engine: str = "auto", *, device: str | torch.device = "cpu",
                 precision: str = "fp32", image_size: int | tuple[int, int] = 224,
                 calibration: str | os.PathLike | CalibrationSet | None = None,
                 processor: CvtImageProcessor | None = None,
                 cache_dir: str | os.PathLike | None = None, compile: bool = False,
                 batch_size: int = 1) -> Engine:
    """An engine running `model` on `device` for `image_size` inputs at `precision`.

    `calibration`: a folder of the user's images (class subfolders named after the model's labels
    make it labelled), preprocessed by `processor` (default: CvT's standard preprocessing at
    `image_size`), or a `CalibrationSet` of batches; needed for int8, and used to measure any
    reduced precision (random inputs without it). `cache_dir`
    overrides where built engines are stored. `compile` runs the torch engine through
    `torch.compile`. `batch_size`: the batches it will mostly run, which `auto` measures at.
    """
    if engine not in ENGINES:
        raise InvalidValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if precision not in ENGINE_PRECISIONS:
        raise InvalidValueError(f"unknown precision {precision!r}; choose one of {', '.join(ENGINE_PRECISIONS)}")
    device = torch.device(device)
    pair = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    # bounded before the build check runs the plain model on a batch of this size
    size = tuple(check_size("image_size", side, IMAGE_SIZE_RANGE) for side in pair)
    was_training = model.training
    model.eval()
    cache = EngineCache(cache_dir)  # one for the call: the weights' digest is computed once

    def build(name: str) -> Engine:
        return _build(model, name, device, precision, size, calibration, processor, cache, compile)

    try:
        if engine != "auto":
            return build(engine)
        if precision != "fp32":
            return build(auto_engine(device, model))
        return auto.choose(model, device, size, batch_size, cache, build, compile=bool(compile))
    finally:
        model.train(was_training)


def _build(model: Model, name: str, device: torch.device, precision: str, size: tuple[int, int],
           calibration: str | os.PathLike | CalibrationSet | None, processor: CvtImageProcessor | None,
           cache: EngineCache, compile: bool) -> Engine:
    if calibration is not None and not isinstance(calibration, CalibrationSet):
        labels = [model.config.id2label.get(i, "") for i in range(model.config.num_labels)]
        calibration = load_calibration(calibration, processor or CvtImageProcessor(size=size[0]), labels)
    batches = calibration.batches if calibration is not None else None
    if name == "torch":  # nothing to build or store: folding the weights takes milliseconds
        engine = fused.FusedTorchEngine(model, device=device, precision=precision, image_size=size,
                                        compile=bool(compile))
        verify(engine, model, batches)
        return engine
    module = openvino_engine if name == "openvino" else onnxruntime_engine
    return module.build(model, device=device, precision=precision, image_size=size,
                        calibration=calibration, cache=cache)
