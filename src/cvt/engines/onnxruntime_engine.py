"""The ONNX Runtime engine: the model exported to ONNX (torch's dynamo exporter, a symbolic batch
axis), run by an onnxruntime session with every graph optimisation on.

fp32 runs the exported graph. int8 is dynamic quantization of every MatMul and Gemm: weights in
int8 per output channel, activations quantized per call from their own range; the attention
softmax, LayerNorm and the convolutions stay fp32. On a Zen 5 with VNNI it was the fastest of
the variants tried (static QDQ and QOperator, per-channel or per-tensor, with and without the
convolutions) and as accurate as any (benchmarks/README.md). The user's images (`calibration`)
measure what it costs. CPU, or CUDA where onnxruntime-gpu is installed. Needs the `onnxruntime`
extra: `pip install "cvt-vision[onnxruntime]"`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from .onnx_graph import INPUT_NAME, output_names
from .base import Engine, EngineError, Model, import_runtime
from .cache import EngineCache
from .calibration import CalibrationSet
from .exported import build_exported

logger = logging.getLogger("cvt")

FILE = "model.onnx"
INT8_OPS = ("MatMul", "Gemm")


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
            _quantize(graph, folder / FILE)

    return build_exported(OnnxRuntimeEngine, model, file=FILE, version=ort.__version__, device=device,
                          precision=precision, image_size=image_size, calibration=calibration,
                          cache=cache, write=write, device_type=device.type, int8="dynamic " + " ".join(INT8_OPS))


def _quantize(data: bytes, target: Path) -> None:
    """Dynamic int8 quantization of an fp32 ONNX graph's MatMul and Gemm nodes."""
    from onnxruntime import quantization as q

    source = target.with_name("fp32.onnx")
    source.write_bytes(data)
    with _quantizer_chatter_dropped():
        q.quantize_dynamic(str(source), str(target), per_channel=True, op_types_to_quantize=list(INT8_OPS),
                           weight_type=q.QuantType.QInt8)
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
