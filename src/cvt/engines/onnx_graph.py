"""The ONNX graph of a cvt model, the service behind the engines and `cvt export`:
`onnx_bytes` traces the model with torch's dynamo-based exporter (`torch.export`, then
`torch.onnx.export(..., dynamo=True)`: onnxscript's translation and graph optimiser), which gives
a clean graph (LayerNormalization, Gelu and Conv nodes, weights as initializers) with a symbolic
batch axis, and with `dynamic_size` symbolic height and width too: every token-grid size in the
graph is then computed from the input's shape, so one graph serves any input from
`min_dynamic_size(config)` pixels a side up. `compile_openvino` compiles such a graph (or IR)
for OpenVINO's CPU plugin at exact fp32. Writing and checking files is `cvt.engines.export`'s job.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..config import CvtConfig, kv_grid, stage_grids
from ..modeling import CvtForImageClassification, CvtModel
from .openvino_signals import signal_stack_kept

# OpenVINO's CPU plugin defaults to bf16 (where the CPU has it) and on-the-fly int8 for
# fully-connected layers: exact fp32 has to be asked for
OPENVINO_FP32 = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
INPUT_NAME = "pixel_values"


class TensorOutputs(nn.Module):
    """The model as a function of `pixel_values` alone, returning the tensors the ONNX file
    outputs, in `output_names`' order."""

    def __init__(self, model: CvtModel | CvtForImageClassification) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        out = self.model(pixel_values, return_dict=True)
        return tuple(getattr(out, name) for name in output_names(self.model))


def output_names(model: CvtModel | CvtForImageClassification) -> list[str]:
    """The ONNX file's output names, in order."""
    if isinstance(model, CvtForImageClassification):
        return ["logits"]
    return ["last_hidden_state"] + (["cls_token_value"] if model.config.cls_token[-1] else [])


def min_dynamic_size(config: CvtConfig) -> int:
    """The smallest height and width a `dynamic_size` export serves: every stage's token and key
    grids at least 2 a side (torch.export treats a size of 1 as a special case, so a symbolic
    size must not reach it)."""
    size = 1
    while any(min(*grid, *kv_grid(config, s, *grid)) < 2
              for s, grid in enumerate(stage_grids(config, size, size))):
        size += 1
    return size


def onnx_bytes(model: CvtModel | CvtForImageClassification, image_size: tuple[int, int], *,
               batch_size: int | None = None, opset: int | None = None, dynamic_size: bool = False) -> bytes:
    """The serialised ONNX graph of `model` (in eval mode) traced at `image_size`, unchecked;
    the batch axis is symbolic unless `batch_size` fixes it, height and width with
    `dynamic_size`. Used by `export_onnx` and the engines."""
    height, width = image_size
    device = next(model.parameters()).device
    # the example batch: 2 for a dynamic axis, since torch.export specialises sizes 0 and 1
    example = torch.randn(batch_size or 2, model.config.num_channels, height, width, device=device)
    axes = {} if batch_size is not None else {0: torch.export.Dim("batch", min=1)}
    if dynamic_size:
        smallest = min_dynamic_size(model.config)
        axes.update({2: torch.export.Dim("height", min=smallest), 3: torch.export.Dim("width", min=smallest)})
    dynamic_shapes = {INPUT_NAME: axes} if axes else None
    with eval_mode(model), torch.no_grad(), quiet():
        # facts about sizes that sympy cannot prove for every size (ceil-mode pooling's "does the
        # last window start inside the input") become runtime checks, not a size-specialised graph
        program = torch.export.export(TensorOutputs(model), (example,), dynamic_shapes=dynamic_shapes,
                                      prefer_deferred_runtime_asserts_over_guards=True)
        onnx_program = torch.onnx.export(
            program, (example,), None, input_names=[INPUT_NAME], output_names=output_names(model),
            opset_version=opset, dynamo=True, external_data=False, dynamic_shapes=dynamic_shapes,
            optimize=True, verbose=False)
    return onnx_program.model_proto.SerializeToString()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The exporter reports its steps on stdout and through warnings; `cvt export` prints its own."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.INFO)  # onnxscript's optimiser logs each rewrite at INFO
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def compile_openvino(source: str | os.PathLike, properties: dict[str, str] = OPENVINO_FP32):
    """OpenVINO's CPU plugin compiling `source` (.onnx or .xml), fp32 unless `properties` say
    otherwise, with the signal-stack swap of its plugin undone (see `cvt.engines.openvino_signals`)."""
    import openvino as ov

    with signal_stack_kept():
        return ov.Core().compile_model(str(source), "CPU", properties)
