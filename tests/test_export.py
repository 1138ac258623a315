"""ONNX export (`cvt.engines.export`, `cvt export`): onnxruntime's outputs equal PyTorch's, with a
dynamic batch axis; clear errors; nothing written when an export fails."""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime  # the export extra (onnx, onnxscript, onnxruntime), which the dev extra includes
import pytest
import torch

import cvt
from cvt.engines import export
from cvt.cli import main
from cvt.config import min_input_size
from conftest import assert_close_to_scale, randomise_, tiny_config



def shallow_config(**overrides) -> cvt.CvtConfig:
    """tiny_config with one layer per stage: each export takes seconds, more with more layers."""
    return tiny_config(**{"depth": (1, 1, 1), **overrides})


def save_classifier(folder, image_size: int, **overrides):
    model = randomise_(cvt.CvtForImageClassification(shallow_config(**overrides)), seed=6)
    model.save_pretrained(folder)
    cvt.CvtImageProcessor(size=image_size).save_pretrained(folder)
    return folder


def run_onnx(path, pixel_values: torch.Tensor) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": pixel_values.numpy()})


def assert_close(got: np.ndarray, want: torch.Tensor) -> None:
    """Within 1e-4 of the values' scale: graph runtimes fuse and reorder float32 sums."""
    assert_close_to_scale(got, want, rel=1e-4)


def test_classifier_with_cls_token_non_square_any_batch(tmp_path) -> None:
    config = shallow_config(cls_token=(False, False, True))
    model = randomise_(cvt.CvtForImageClassification(config), seed=3).train()  # exported in eval mode
    result = export.export_onnx(model, tmp_path / "model.onnx", image_size=(64, 48))
    assert model.training  # its mode is restored
    model.eval()
    assert result.path == tmp_path / "model.onnx" and result.bytes == result.path.stat().st_size
    # the exporter's own check (export.TOLERANCE): what it reports is what it compared
    assert result.max_abs_diff is not None and result.max_abs_diff <= export.TOLERANCE
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for batch in (1, 4):  # neither is the batch of 2 it was traced with
        pixel_values = torch.randn(batch, 3, 64, 48)
        with torch.no_grad():
            want = model(pixel_values).logits
        (got,) = run_onnx(result.path, pixel_values)
        assert_close(got, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary files


@pytest.mark.slow
def test_backbone_exports_feature_map_and_cls_token(tmp_path) -> None:
    model = randomise_(cvt.CvtModel(shallow_config()), seed=4).eval()  # cls token in the last stage
    path = export.export_onnx(model, tmp_path / "backbone.onnx", image_size=56).path
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "cls_token_value"]
    for batch in (2, 3):
        pixel_values = torch.randn(batch, 3, 56, 56)
        with torch.no_grad():
            want = model(pixel_values)
        hidden, cls = run_onnx(path, pixel_values)
        assert_close(hidden, want.last_hidden_state)
        assert_close(cls, want.cls_token_value)


def test_failed_check_writes_nothing(tmp_path, capsys, monkeypatch) -> None:
    """The file is written only after the check passes: a failed check leaves the older file at
    the path as it was, and no temporary file; `cvt export` says so in one line, exit status 1."""
    folder = save_classifier(tmp_path / "model", image_size=32)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"an older export")
    monkeypatch.setattr(export, "TOLERANCE", -1.0)
    assert main(["export", str(folder), str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cvt: error: onnxruntime's logits output differs") and "nothing was written" in err[-1]
    assert path.read_bytes() == b"an older export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.onnx"]


def test_too_small_image_is_the_models_own_error(tmp_path) -> None:
    model = cvt.CvtForImageClassification(tiny_config()).eval()
    smallest = min_input_size(model.config)
    with pytest.raises(ValueError, match=f"too small.*smallest square input is {smallest} pixels"):
        export.export_onnx(model, tmp_path / "m.onnx", image_size=smallest - 1)
    with pytest.raises(ValueError, match="batch_size"):
        export.export_onnx(model, tmp_path / "m.onnx", image_size=64, batch_size=0)
    with pytest.raises(ValueError, match="float32"):
        export.export_onnx(model.to(torch.bfloat16), tmp_path / "m.onnx", image_size=64)
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_names_the_extra(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails
    model = cvt.CvtForImageClassification(tiny_config()).eval()
    with pytest.raises(ImportError, match=r'pip install "cvt-vision\[export\]"'):
        export.export_onnx(model, tmp_path / "m.onnx", image_size=64)
    folder = save_classifier(tmp_path / "model", image_size=64)
    assert main(["export", str(folder), str(tmp_path / "m.onnx")]) == 2
    assert not (tmp_path / "m.onnx").exists()


def test_missing_onnxruntime_refuses_a_checked_export(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    model = cvt.CvtForImageClassification(tiny_config()).eval()
    with pytest.raises(ImportError, match=r"onnxruntime.*pip install"):
        export.export_onnx(model, tmp_path / "m.onnx", image_size=64)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_exports_a_backbone_folder_as_a_backbone(tmp_path, capsys) -> None:
    """A saved CvtModel has no classifier: its features are exported, never a random head."""
    backbone = randomise_(cvt.CvtModel(shallow_config()), seed=8).eval()
    backbone.save_pretrained(tmp_path / "backbone")
    out = tmp_path / "backbone.onnx"
    assert main(["export", str(tmp_path / "backbone"), str(out), "--image-size", "40"]) == 0
    assert "(CvtModel)" in capsys.readouterr().err
    pixel_values = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        want = backbone(pixel_values)
    got = run_onnx(out, pixel_values)
    assert_close(got[0], want.last_hidden_state)
    assert_close(got[1], want.cls_token_value)


def test_cli_end_to_end(tmp_path, capsys) -> None:
    """A saved folder without cls tokens (mean pooling), a fixed batch and an opset."""
    folder = save_classifier(tmp_path / "model", image_size=48, cls_token=(False, False, False))
    out = tmp_path / "onnx" / "tiny.onnx"
    assert main(["export", str(folder), str(out), "--batch-size", "3", "--opset", "20"]) == 0
    captured = capsys.readouterr()
    assert "exporting" in captured.err and "48x48" in captured.err  # preprocessor_config.json's size
    last = captured.out.strip().splitlines()[-1]
    assert last.startswith(f"wrote {out} (") and "MB, opset 20, batch 3" in last
    assert "max abs difference from PyTorch" in last
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [3, 3, 48, 48]
    model = cvt.CvtForImageClassification.from_pretrained(str(folder))
    pixel_values = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        want = model(pixel_values).logits
    assert_close(run_onnx(out, pixel_values)[0], want)

    # too small: one clear line, exit status 2, no file
    assert main(["export", str(folder), str(tmp_path / "small.onnx"), "--image-size", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cvt: error:") and "too small" in err[-1] and "Traceback" not in "".join(err)
    assert not (tmp_path / "small.onnx").exists()


# ---------------------------------------------------------------------------------------- dynamic size
SIZES = ((96, 96), (61, 77), (128, 128))  # none of them the size traced


@pytest.mark.slow
def test_dynamic_size_backbone_serves_several_sizes(tmp_path) -> None:
    """Pooled ('avg', ceil mode) and unprojected keys, cls tokens in the first and last stage:
    every token-grid size in the graph follows the input's."""
    config = shallow_config(qkv_projection_method=("avg", "linear", "dw_bn"), cls_token=(True, False, True))
    model = randomise_(cvt.CvtModel(config), seed=9).eval()
    result = export.export_onnx(model, tmp_path / "backbone.onnx", image_size=(64, 56), dynamic_size=True)
    assert result.max_abs_diff <= export.TOLERANCE  # the exporter's own check
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    for batch in (1, 3):
        for height, width in SIZES:
            pixel_values = torch.randn(batch, 3, height, width)
            with torch.no_grad():
                want = model(pixel_values)
            hidden, cls = run_onnx(result.path, pixel_values)
            assert_close(hidden, want.last_hidden_state)
            assert_close(cls, want.cls_token_value)


@pytest.mark.slow
def test_cli_dynamic_size_classifier(tmp_path, capsys) -> None:
    folder = save_classifier(tmp_path / "model", image_size=64, cls_token=(False, False, False))
    out = tmp_path / "dynamic.onnx"
    assert main(["export", str(folder), str(out), "--dynamic-size"]) == 0
    captured = capsys.readouterr()
    smallest = export.min_dynamic_size(shallow_config())
    assert f"any height and width from {smallest} pixels, traced at 64x64 pixels" in captured.err
    assert "batch dynamic, dynamic height and width); max abs difference" in captured.out
    model = cvt.CvtForImageClassification.from_pretrained(str(folder))
    for batch in (1, 3):
        for height, width in SIZES + ((smallest, smallest),):
            pixel_values = torch.randn(batch, 3, height, width)
            with torch.no_grad():
                want = model(pixel_values).logits
            assert_close(run_onnx(out, pixel_values)[0], want)


def test_dynamic_size_refusals(tmp_path, capsys) -> None:
    model = cvt.CvtForImageClassification(shallow_config()).eval()
    smallest = export.min_dynamic_size(model.config)
    assert min_input_size(model.config) < smallest  # grids of 1 work, but not symbolically
    with pytest.raises(ValueError, match=f"symbolic only from {smallest} pixels"):
        export.export_onnx(model, tmp_path / "m.onnx", image_size=smallest - 1, dynamic_size=True)
    folder = save_classifier(tmp_path / "model", image_size=64)
    assert main(["export", str(folder), str(tmp_path / "m.xml"), "--format", "openvino", "--dynamic-size"]) == 2
    assert "--dynamic-size apply to --format onnx only" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ---------------------------------------------------------------------------------------- TFLite
@pytest.mark.slow
def test_tflite_cli_export_runs_in_litert_as_tf_and_pytorch(tmp_path, capsys) -> None:
    """`cvt export --format tflite`: weights frozen into the file, a dynamic batch, logits equal
    to the TensorFlow twin's and PyTorch's to 1e-4 in LiteRT's interpreter."""
    from cvt.tf import TFCvtForImageClassification

    folder = save_classifier(tmp_path / "model", image_size=32)
    out = tmp_path / "tiny.tflite"
    assert main(["export", str(folder), str(out), "--format", "tflite"]) == 0
    captured = capsys.readouterr()
    assert "32x32" in captured.err and "checking it with LiteRT" in captured.err
    assert "max abs difference from TensorFlow" in captured.out.strip().splitlines()[-1]
    runner = export.tflite_interpreter(out.read_bytes()).get_signature_runner()
    pixel_values = torch.randn(5, 3, 32, 32)
    got = runner(pixel_values=pixel_values.numpy())["logits"]
    with torch.no_grad():
        assert_close(got, cvt.CvtForImageClassification.from_pretrained(folder)(pixel_values).logits)
    tf_logits = TFCvtForImageClassification.from_pretrained(folder)(pixel_values.numpy()).logits.numpy()
    assert_close_to_scale(got, tf_logits, rel=1e-4)
    assert main(["export", str(folder), str(out), "--format", "tflite", "--opset", "17"]) == 2


@pytest.mark.slow
def test_tflite_check_refuses_nan_and_writes_nothing(tmp_path) -> None:
    from cvt.tf import TFCvtModel

    model = TFCvtModel(shallow_config(), data_format="channels_last")
    kernel = model.encoder.stages[0].projection.kernel
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    path = tmp_path / "nan.tflite"
    with pytest.raises(export.ExportCheckError, match="differs from TensorFlow's by up to nan"):
        export.export_tflite(model, path, image_size=(32, 40))
    assert not path.exists()
