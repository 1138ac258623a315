"""The ONNX Runtime engine: the model exported to ONNX (torch's dynamo exporter, a symbolic batch
axis), run by an onnxruntime session with every graph optimisation on.

fp32 runs the exported graph; int8 is static post-training quantization (QDQ, per-channel
weights, activations calibrated on the user's images). CPU, or CUDA where onnxruntime-gpu is
installed. Needs the `onnxruntime` extra: `pip install "cvt-vision[onnxruntime]"`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from ..onnx_graph import INPUT_NAME, output_names
from .base import Engine, EngineError, Model, import_runtime
from .cache import EngineCache
from .calibration import CalibrationSet
from .exported import build_exported

logger = logging.getLogger("cvt")

FILE = "model.onnx"
CALIBRATION_PIXELS = 16 * 224 * 224  # int8 calibration images x pixels: 16 at 224, 5 at 384 (~3 GB)


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    def __init__(self, model: Model, path: Path, *, device: torch.device, precision: str,
                 image_size: tuple[int, int]) -> None:
        super().__init__(model, device=device, precision=precision, image_size=image_size)
        ort = import_runtime("onnxruntime", "onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(path), options, providers=_providers(ort, device))
        self.output = output_names(model)[0]

    def _run(self, pixel_values: Tensor) -> Tensor:
        array = pixel_values.detach().float().cpu().numpy()
        (out,) = self.session.run([self.output], {INPUT_NAME: array})
        return torch.from_numpy(out)


def _providers(ort, device: torch.device) -> list[str]:
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider"]
    raise EngineError(f"onnxruntime cannot run on {device} here (providers: "
                      f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu for CUDA")


def build(model: Model, *, device: torch.device, precision: str, image_size: tuple[int, int],
          calibration: CalibrationSet | None, cache: EngineCache) -> OnnxRuntimeEngine:
    ort = import_runtime("onnxruntime", "onnxruntime")
    if precision not in ("fp32", "int8"):
        raise EngineError(f"the onnxruntime engine runs fp32 or int8, not {precision}; for bf16 "
                          f"use engine='openvino' or 'torch'")

    def write(graph: bytes, folder: Path) -> None:
        if precision == "fp32":
            (folder / FILE).write_bytes(graph)
        else:
            _quantize(graph, folder / FILE, calibration)

    return build_exported(OnnxRuntimeEngine, model, file=FILE, version=ort.__version__, device=device,
                          precision=precision, image_size=image_size, calibration=calibration,
                          cache=cache, write=write, device_type=device.type)


def _quantize(data: bytes, target: Path, calibration: CalibrationSet) -> None:
    """Static int8 quantization of an fp32 ONNX graph, calibrated on the images."""
    from onnxruntime import quantization as q

    height, width = calibration.batches[0][0].shape[-2:]
    budget = max(4, round(CALIBRATION_PIXELS / (height * width)))

    class Reader(q.CalibrationDataReader):
        """Two images at a time, at most `budget` of them: onnxruntime's calibrator keeps every
        intermediate tensor of everything it is fed until the end (its option to bound that,
        CalibMaxIntermediateOutputs, discards the data in onnxruntime 1.32), so the number of
        images bounds its memory."""

        def __init__(self) -> None:
            images = torch.cat([x for x, _ in calibration.batches])[:budget]
            self.feeds = iter(images.split(2))

        def get_next(self):
            part = next(self.feeds, None)
            return None if part is None else {INPUT_NAME: part.numpy()}

    source = target.with_name("fp32.onnx")
    source.write_bytes(data)
    with _quantizer_chatter_dropped():
        q.quantize_static(str(source), str(target), Reader(), quant_format=q.QuantFormat.QDQ,
                          per_channel=True, activation_type=q.QuantType.QInt8,
                          weight_type=q.QuantType.QInt8, calibrate_method=q.CalibrationMethod.MinMax)
    source.unlink()


@contextlib.contextmanager
def _quantizer_chatter_dropped() -> Iterator[None]:
    """onnxruntime's quantizer warns on the root logger, once per BatchNorm vector it does not
    quantize per channel and to suggest its pre-processing: dozens of lines a user cannot act
    on. Its warnings are dropped while it runs; its errors still show."""

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
