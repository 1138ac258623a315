"""The OpenVINO engine: the model's ONNX graph read by OpenVINO, stored as OpenVINO IR
(`model.xml` + `model.bin`, weights kept in fp32) and compiled for the CPU.

OpenVINO's CPU plugin defaults to bf16 where the CPU has bf16 units and to on-the-fly int8 for
fully-connected layers, so each precision is asked for explicitly: fp32 is
`INFERENCE_PRECISION_HINT=f32` with dynamic quantization off; bf16 is the bf16 hint (refused on a
CPU without bf16 units, where it would be emulated); int8 is NNCF's post-training quantization
calibrated on the user's images (the transformer preset keeps softmax and norms in float).
Needs the `openvino` extra: `pip install "cvt-vision[openvino]"` (NNCF for int8).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor

from .openvino_signals import signal_stack_kept
from .onnx_graph import OPENVINO_FP32, compile_openvino
from .base import Engine, EngineError, Model, cpu_has_bf16, import_runtime
from .cache import EngineCache
from .calibration import CalibrationSet
from .exported import build_exported

logger = logging.getLogger("cvt")

FILE = "model.xml"  # with model.bin beside it
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8 layers run int8; the rest stays f32


class OpenVinoEngine(Engine):
    name = "openvino"

    def __init__(self, model: Model, path: Path, *, device: torch.device, precision: str,
                 image_size: tuple[int, int]) -> None:
        super().__init__(model, device=device, precision=precision, image_size=image_size)
        import_runtime("openvino", "openvino")  # a clear error when the extra is missing
        self.compiled = compile_openvino(path, {
            **OPENVINO_FP32,
            "INFERENCE_PRECISION_HINT": HINTS[precision],
            "PERFORMANCE_HINT": "LATENCY",  # one request at a time uses every core
            "INFERENCE_NUM_THREADS": str(torch.get_num_threads()),
        })
        self.request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # an infer request serves one call at a time

    def _run(self, pixel_values: Tensor) -> Tensor:
        with self._lock:
            self.request.infer({0: pixel_values.detach().float().cpu().numpy()})
            return torch.from_numpy(self.request.get_output_tensor(0).data.copy())


def unsupported(model: Model) -> str | None:
    """Why OpenVINO cannot run `model` exactly, or None. Its average pooling with ceil mode
    divides the windows at the edge differently from PyTorch (logits off by ~5e-2 on random
    weights, the same through its ONNX and its PyTorch front ends), so 'avg' projections fail
    the fp32 check: refused before any work is done."""
    if "avg" in model.config.qkv_projection_method:
        return ("OpenVINO computes the 'avg' projection's ceil-mode average pooling differently "
                "from PyTorch; use engine='onnxruntime' or 'torch' for this model")
    return None


def build(model: Model, *, device: torch.device, precision: str, image_size: tuple[int, int],
          calibration: CalibrationSet | None, cache: EngineCache) -> OpenVinoEngine:
    ov = import_runtime("openvino", "openvino")
    if unsupported(model):
        raise EngineError(unsupported(model))
    if device.type != "cpu":
        raise EngineError(f"the openvino engine runs on the CPU, not {device}; use engine='torch' "
                          f"(or 'onnxruntime' with onnxruntime-gpu) for CUDA")
    if precision not in HINTS:
        raise EngineError(f"the openvino engine runs fp32, bf16 or int8, not {precision}")
    if precision == "bf16" and not cpu_has_bf16():
        raise EngineError("this CPU has no bf16 units (avx512_bf16 or amx_bf16); OpenVINO would "
                          "emulate bf16 slower than fp32: use precision='int8' or 'fp32'")

    def write(graph: bytes, folder: Path) -> None:
        source = folder / "model.onnx"
        source.write_bytes(graph)
        ir = ov.Core().read_model(str(source))
        source.unlink()
        if precision == "int8":
            ir = _quantize(ir, calibration)
        ov.save_model(ir, str(folder / FILE), compress_to_fp16=False)

    return build_exported(OpenVinoEngine, model, file=FILE, version=ov.__version__, device=device,
                          precision=precision, image_size=image_size, calibration=calibration,
                          cache=cache, write=write)


def _quantize(graph, calibration: CalibrationSet):
    nncf = import_runtime("nncf", "openvino")
    logger.info("cvt: quantizing to int8 on %d calibration images ...", calibration.images)
    dataset = nncf.Dataset([x.numpy() for x, _ in calibration.batches])
    # NNCF's progress bars never go into results on stdout; its CPU plugin swaps the signal stack
    with contextlib.redirect_stdout(sys.stderr), signal_stack_kept():
        return nncf.quantize(graph, dataset, model_type=nncf.ModelType.TRANSFORMER,
                             subset_size=len(calibration.batches))
