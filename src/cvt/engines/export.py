"""`cvt export`'s files: ONNX (`export_onnx`), OpenVINO IR (`export_openvino`) and TFLite
(`export_tflite`), each checked before it is written: the file is run by its runtime
(onnxruntime, OpenVINO, LiteRT) on a random batch and must equal the model within
`cvt.constants.TOLERANCE`. Then it is written atomically, so a failed export leaves no file (and
an older file at the same path intact). The ONNX graph itself comes from `cvt.engines.onnx_graph`; an
ONNX file with `dynamic_size` serves any input from `min_dynamic_size(config)` pixels a side up.

Needs the `export` extra: `pip install "cvt-vision[export]"` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import dataclasses
import os
import stat
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..config import pixel_values_problem
from ..constants import EXPORT_BATCH_RANGE, TOLERANCE
from ..errors import CvtError, InvalidValueError, Range, install_hint
from ..files import folders_made_for, kept_mode, write_bytes
from ..modeling import CvtForImageClassification, CvtModel
from .onnx_graph import (INPUT_NAME, TensorOutputs, compile_openvino, eval_mode, min_dynamic_size,
                         onnx_bytes, output_names, quiet)

__all__ = ["ExportCheckError", "ExportResult", "export_onnx", "export_openvino", "export_tflite",
           "min_dynamic_size", "tflite_bytes", "tflite_interpreter"]

INSTALL_HINT = install_hint("export")


class ExportCheckError(CvtError, RuntimeError):
    """The exported file's outputs, run with onnxruntime, differ from PyTorch's."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What `export_onnx` wrote: the file, its size, its opset, and the max abs difference
    between onnxruntime's and PyTorch's outputs (None when not checked)."""

    path: Path
    bytes: int
    opset: int | None
    max_abs_diff: float | None


def export_onnx(model: CvtModel | CvtForImageClassification, path: str | os.PathLike, *,
                image_size: int | tuple[int, int] = (224, 224), batch_size: int | None = None,
                opset: int | None = None, check: bool = True, dynamic_size: bool = False) -> ExportResult:
    """Export `model` to an ONNX file at `path`; returns what was written (`.path`, `.bytes`,
    `.opset`) and the difference the check measured (`.max_abs_diff`).

    The file has one input, `pixel_values` (batch, channels, height, width) at `image_size`,
    and the outputs `logits` (CvtForImageClassification), or `last_hidden_state` and, when the
    last stage has a cls token, `cls_token_value` (CvtModel). The batch axis is symbolic
    (`batch`) unless `batch_size` fixes it. With `dynamic_size`, height and width are symbolic
    too (`height`, `width`): `image_size` is then only the size traced and checked, and the file
    serves any size from `min_dynamic_size(model.config)` up; a fixed `batch_size` is bounded by
    `cvt.constants.EXPORT_BATCH_RANGE`. `opset` defaults to torch's default opset; one torch
    cannot write the model at (it would silently write another) is an `InvalidValueError`. The
    model is exported in eval mode (its mode is restored afterwards).

    With `check` (needs onnxruntime), the file is run with onnxruntime on a random batch (3
    images when the batch axis is dynamic: not the 2 it was traced with) and compared with the
    PyTorch model, with `dynamic_size` also at the smallest size served, made non-square
    (min x min+1); a difference above 1e-4 (or NaN) raises `ExportCheckError` and nothing is
    written.
    """
    if not isinstance(model, (CvtModel, CvtForImageClassification)):
        raise TypeError(f"model must be a cvt.CvtModel or cvt.CvtForImageClassification, "
                        f"got {type(model).__name__}")
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise InvalidValueError(f"export a float32 model (model.float()); this one is {dtype}, which the "
                         f"onnxruntime check cannot compare to 1e-4")
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if batch_size is not None and batch_size not in Range(True, *EXPORT_BATCH_RANGE):
        raise InvalidValueError(f"batch_size must be {Range(True, *EXPORT_BATCH_RANGE)} (the check runs the model "
                                f"on a batch that size), or None for a dynamic batch axis, which serves any "
                                f"batch; got {batch_size!r}")
    problem = pixel_values_problem(model.config, (batch_size or 2, model.config.num_channels, height, width),
                                   training=False)
    if problem:
        raise InvalidValueError(problem)
    sizes = [(height, width)]
    if dynamic_size:
        smallest = min_dynamic_size(model.config)
        if min(height, width) < smallest:
            raise InvalidValueError(f"a dynamic-size export traces at {height}x{width}, but this model's "
                             f"height and width can be symbolic only from {smallest} pixels up")
        sizes.append((smallest, smallest + 1))
    _require_exporter(check)
    data = onnx_bytes(model, (height, width), batch_size=batch_size, opset=opset, dynamic_size=dynamic_size)
    if opset is not None and _opset_of(data) != opset:  # torch falls back to an opset it can write
        raise InvalidValueError(f"opset {opset}: torch's ONNX exporter cannot write this model at that opset "
                                f"(it wrote opset {_opset_of(data)}); ask for one it writes, such as "
                                f"{_opset_of(data)}; nothing was written")
    difference = None
    if check:
        difference = max(_check(model, data, output_names(model), batch_size or 3, *size) for size in sizes)
    path = Path(path)
    write_bytes(path, data)
    return ExportResult(path, len(data), _opset_of(data), difference)


def _opset_of(data: bytes) -> int | None:
    import onnx  # present: _require_exporter checked

    proto = onnx.load_model_from_string(data)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _require_exporter(check: bool) -> None:
    missing = []
    for module in ("onnx", "onnxscript") + (("onnxruntime",) if check else ()):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"ONNX export needs {' and '.join(missing)}: {INSTALL_HINT}")


def _check(model: CvtModel | CvtForImageClassification, data: bytes, names: list[str], batch: int,
           height: int, width: int) -> float:
    """Max abs difference between onnxruntime's and PyTorch's outputs on one random batch."""
    import onnxruntime  # present: _require_exporter checked

    pixel_values = _random_batch(model, batch, height, width)
    batch_text = f"{batch}x{model.config.num_channels}x{height}x{width} batch"
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    try:
        session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        got = session.run(names, {INPUT_NAME: pixel_values.numpy()})
    except Exception as err:  # onnxruntime raises its own exception types
        raise ExportCheckError(f"onnxruntime could not load or run the exported file on a {batch_text}: "
                               f"{err}; nothing was written") from err
    return _compare("onnxruntime", dict(zip(names, got)), "PyTorch", _plain(model, pixel_values),
                    f"a random {batch_text}")


def _random_batch(model: CvtModel | CvtForImageClassification, batch: int, height: int, width: int
                  ) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, model.config.num_channels, height, width, generator=generator)


def _plain(model: CvtModel | CvtForImageClassification, pixel_values: torch.Tensor) -> dict[str, np.ndarray]:
    """The plain model's outputs, by the exported file's output names, as float32 arrays."""
    with eval_mode(model), torch.no_grad():
        want = TensorOutputs(model)(pixel_values.to(next(model.parameters()).device))
    return {name: w.float().cpu().numpy() for name, w in zip(output_names(model), want)}


def _compare(runtime: str, got: dict[str, np.ndarray], reference: str, want: dict[str, np.ndarray],
             inputs: str) -> float:
    """The largest difference between a runtime's outputs and the reference's, by output name;
    a missing or mis-shaped output, or a difference above TOLERANCE (or NaN), raises
    `ExportCheckError`: nothing is written."""
    worst = 0.0
    for name, w in want.items():
        g = got.get(name)
        if g is None or tuple(g.shape) != tuple(w.shape):
            raise ExportCheckError(f"{runtime}'s {name} output has shape {None if g is None else tuple(g.shape)}, "
                                   f"but {reference}'s is {tuple(w.shape)}; nothing was written")
        difference = float(np.abs(g.astype(np.float64) - w).max())
        if not difference <= TOLERANCE:  # (NaN fails too)
            raise ExportCheckError(f"{runtime}'s {name} output differs from {reference}'s by up to "
                                   f"{difference:.3g} (allowed {TOLERANCE:g}) on {inputs}; nothing was written")
        worst = max(worst, difference)
    return worst


def export_openvino(model: CvtModel | CvtForImageClassification, path: str | os.PathLike, *,
                    image_size: int | tuple[int, int] = (224, 224), check: bool = True) -> ExportResult:
    """Export `model` as OpenVINO IR: `path` (.xml) and the weights beside it (.bin, fp32), with a
    dynamic batch axis. With `check`, OpenVINO's fp32 outputs on a random batch must equal
    PyTorch's within 1e-4 before anything is written (`ExportCheckError` otherwise). Files it
    replaces keep their permission bits. Needs the `openvino` extra."""
    try:
        import openvino as ov
    except ImportError:
        raise ImportError(f'OpenVINO export needs openvino: {install_hint("openvino")}') from None
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    problem = pixel_values_problem(model.config, (2, model.config.num_channels, height, width), training=False)
    if problem:
        raise InvalidValueError(problem)
    _require_exporter(check=False)
    xml = Path(path).with_suffix(".xml")
    # staged beside the target, so the renames stay on its file system (a temporary folder
    # elsewhere fails across devices); the folders made for it go again if anything fails
    with folders_made_for(xml), tempfile.TemporaryDirectory(prefix=".cvt-export-", dir=xml.parent) as tmp:
        onnx_file = Path(tmp) / "model.onnx"
        onnx_file.write_bytes(onnx_bytes(model, (height, width)))
        graph = ov.Core().read_model(str(onnx_file))
        staged = Path(tmp) / xml.name
        ov.save_model(graph, str(staged), compress_to_fp16=False)
        difference = _check_openvino(model, staged, height, width) if check else None
        for source, target in ((staged.with_suffix(".bin"), xml.with_suffix(".bin")), (staged, xml)):
            os.chmod(source, kept_mode(target, stat.S_IMODE(source.stat().st_mode)))
            os.replace(source, target)
    size = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
    return ExportResult(xml, size, None, difference)


def _check_openvino(model: CvtModel | CvtForImageClassification, xml: Path, height: int, width: int) -> float:
    pixel_values = _random_batch(model, 3, height, width)
    compiled = compile_openvino(xml)
    got = compiled({0: pixel_values.numpy()})
    names = output_names(model)
    return _compare("OpenVINO", {name: got[index] for index, name in enumerate(names)}, "PyTorch",
                    _plain(model, pixel_values), "a random batch")


# ---------------------------------------------------------------------------------------- TFLite
def export_tflite(model, path: str | os.PathLike, *, image_size: int | tuple[int, int] | None = None,
                  check: bool = True) -> ExportResult:
    """Export a TensorFlow model (`TFCvtModel`, `TFCvtForImageClassification`), or a PyTorch one
    (converted to its TF twin first), to a TFLite flatbuffer at `path`: input `pixel_values`
    (a dynamic batch at `image_size`, by default the model's preprocessing size; in the model's
    `data_format`), outputs as its `serving_function`'s (`logits` for a classifier). Variables
    are frozen into constants. With `check` (needs `ai-edge-litert`, or TensorFlow's own
    interpreter), the LiteRT interpreter runs the file on a random batch of 3 and its outputs
    must equal the TF model's within 1e-4 (NaN fails) before anything is written
    (`ExportCheckError` otherwise). Needs the `tf` extra."""
    from .. import tf as modeling_tf  # TensorFlow is an optional extra

    tf_model = model
    if isinstance(model, (CvtModel, CvtForImageClassification)):
        twin = modeling_tf.TFCvtForImageClassification if isinstance(model, CvtForImageClassification) \
            else modeling_tf.TFCvtModel
        tf_model = twin(model.config)
        tf_model.load_pytorch_state_dict(model.state_dict())
        tf_model.preprocessing = getattr(model, "preprocessing", None)
    if not isinstance(tf_model, modeling_tf.TFCvtPreTrainedModel):
        raise TypeError(f"model must be a cvt TF or PyTorch CvT model, got {type(model).__name__}")
    data = tflite_bytes(tf_model, image_size)
    difference = _check_tflite(tf_model.serving_function(image_size), data) if check else None
    path = Path(path)
    write_bytes(path, data)
    return ExportResult(path, len(data), None, difference)


def tflite_bytes(tf_model, image_size: int | tuple[int, int] | None = None) -> bytes:
    """The TFLite flatbuffer of a TF model's SavedModel (`model.export`), its variables frozen
    into constants. (Converting the concrete function directly keeps Keras 3's variables as
    uninitialised resource variables, which LiteRT reads as NaN.)"""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp, quiet():
        tf_model.export(tmp, image_size=image_size)
        return tf.lite.TFLiteConverter.from_saved_model(tmp).convert()


def tflite_interpreter(data: bytes):
    """LiteRT's interpreter (`ai-edge-litert`), else the one TensorFlow still bundles."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter(model_content=data)


def _check_tflite(serve, data: bytes) -> float:
    """Max abs difference between LiteRT's and TensorFlow's outputs on one random batch of 3."""
    spec = serve.input_signature[0]
    shape = (3,) + tuple(spec.shape[1:])
    pixel_values = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    want = {name: value.numpy() for name, value in serve(pixel_values).items()}
    try:
        interpreter = tflite_interpreter(data)
        runner = interpreter.get_signature_runner()
        got = runner(pixel_values=pixel_values)
    except Exception as err:  # LiteRT raises its own exception types
        raise ExportCheckError(f"LiteRT could not load or run the converted model on a batch of shape "
                               f"{shape}: {err}; nothing was written") from err
    return _compare("LiteRT", got, "TensorFlow", want, f"a random batch of shape {shape}")
