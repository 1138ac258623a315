"""Inference engines: each computes what the plain model computes (fp32 within 1e-4) on every kind of
architecture, reduced precision reports its cost, built engines are reused from the cache and a
damaged cache entry is rebuilt, never trusted."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cvt
from cvt import engines
from cvt.cli import main
from cvt.engines import EngineError, build_engine, exported, fused, onnxruntime_engine, openvino_engine
from cvt.engines.base import cpu_has_bf16
from cvt.native import signal_stack

from conftest import TINY_LABELS, randomise_, save_tiny_classifier, tiny_config

# every projection method, cls token placements (last stage, middle stage, none), both
# activations, odd and non-square sizes, the classifier and the backbone
ARCHITECTURES = {
    "dw_bn-cls_last-61x77": (dict(), (61, 77), cvt.CvtForImageClassification),
    "avg-cls_middle-quick_gelu-64x48": (
        dict(qkv_projection_method=("avg", "avg", "avg"), cls_token=(False, True, False),
             hidden_act="quick_gelu"), (64, 48), cvt.CvtForImageClassification),
    "linear-no_cls-backbone-57x57": (
        dict(qkv_projection_method=("linear", "dw_bn", "linear"), cls_token=(False, False, False)),
        (57, 57), cvt.CvtModel),
}


def make(architecture: str, seed: int = 0):
    fields, size, cls = ARCHITECTURES[architecture]
    return randomise_(cls(tiny_config(**fields)), seed).eval(), size


def plain(model, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values, return_dict=True)
    return out.logits if isinstance(model, cvt.CvtForImageClassification) else out.last_hidden_state


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
@pytest.mark.parametrize("name", ["torch", "onnxruntime", "openvino"])
def test_engine_equals_plain_model(name, architecture):
    model, size = make(architecture)
    if name == "openvino" and architecture.startswith("avg"):
        with pytest.raises(EngineError, match="ceil-mode average pooling"):
            build_engine(model, name, image_size=size)
        assert engines.auto_engine(torch.device("cpu"), model) != "openvino"
        return
    engine = build_engine(model, name, image_size=size)
    assert engine.name == name and engine.precision == "fp32" and engine.report is None
    for batch in (1, 5):
        pixel_values = torch.randn(batch, 3, *size)
        got, want = engine(pixel_values), plain(model, pixel_values)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert (got - want).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match=f"built for {size[0]}x{size[1]}"):
        engine(torch.randn(1, 3, size[0] + 8, size[1]))


def test_openvino_engines_leave_the_threads_signal_stack_as_it_was():
    """OpenVINO's CPU plugin swaps the thread's signal stack and restores it only in reverse
    order of destruction: engines dropped first-built-first leave a freed stack behind, and the
    next Python signal handler (a DataLoader worker's SIGCHLD under faulthandler) crashes."""
    before = signal_stack()
    model, size = make("dw_bn-cls_last-61x77")
    first = build_engine(model, "openvino", image_size=size)
    second = build_engine(model, "openvino", image_size=size)
    assert signal_stack() == before
    del first
    gc.collect()
    del second
    gc.collect()
    assert signal_stack() == before


def test_torch_engine_groups_on_worker_threads_equal_plain(monkeypatch):
    """A CPU batch split into groups run on single-threaded workers gives the plain logits, and
    leaves the caller's thread setting and the model itself untouched."""
    monkeypatch.setattr(fused, "GROUP_TOKENS", 1)  # one image per group
    monkeypatch.setattr(fused, "MLP_CHUNK_ELEMENTS", 257)  # a few rows per MLP chunk
    model, size = make("dw_bn-cls_last-61x77")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = build_engine(model, "torch", image_size=size)
        pixel_values = torch.randn(7, 3, *size)
        assert fused.inference_plan(model.config, pixel_values)[0] == 7
        assert (engine(pixel_values) - plain(model, pixel_values)).abs().max().item() <= 1e-4
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad is False for p in model.parameters())  # the copy is frozen, not the model


def test_failed_check_is_an_error_and_caches_nothing(monkeypatch, engine_cache, tmp_path):
    model, size = make("dw_bn-cls_last-61x77", seed=5)
    original = onnxruntime_engine.OnnxRuntimeEngine._run
    monkeypatch.setattr(onnxruntime_engine.OnnxRuntimeEngine, "_run",
                        lambda self, x: original(self, x) + 1e-3)
    with pytest.raises(EngineError, match="differs from the plain model by up to"):
        build_engine(model, "onnxruntime", image_size=size, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_cache_is_reused_and_a_damaged_entry_rebuilt(monkeypatch, tmp_path, caplog):
    model, size = make("dw_bn-cls_last-61x77", seed=7)
    cache = tmp_path / "cache"
    first = build_engine(model, "openvino", image_size=size, cache_dir=cache)
    assert not first.from_cache
    (entry,) = cache.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "model.bin", "model.xml"]

    def no_build(*args, **kwargs):
        raise AssertionError("built again")

    with monkeypatch.context() as patch:
        patch.setattr(exported, "onnx_bytes", no_build)
        second = build_engine(model, "openvino", image_size=size, cache_dir=cache)
    assert second.from_cache
    # another weight is another entry
    bias = model.classifier.bias.detach().clone()
    with torch.no_grad():
        model.classifier.bias[0] += 1
    third = build_engine(model, "openvino", image_size=size, cache_dir=cache)
    assert not third.from_cache and len(list(cache.iterdir())) == 2

    weights_file = entry / "model.bin"
    weights_file.write_bytes(weights_file.read_bytes()[:100])  # truncated
    with torch.no_grad():
        model.classifier.bias.copy_(bias)
    with caplog.at_level(logging.WARNING, logger="cvt"):
        rebuilt = build_engine(model, "openvino", image_size=size, cache_dir=cache)
    assert not rebuilt.from_cache
    assert "unusable" in caplog.text and "model.bin" in caplog.text
    pixel_values = torch.randn(2, 3, *size)
    assert (rebuilt(pixel_values) - plain(model, pixel_values)).abs().max().item() <= 1e-4


def write_images(folder: Path, count: int = 24, labels=TINY_LABELS) -> Path:
    """Photos-like random images in class folders named after the model's labels."""
    rng = np.random.default_rng(0)
    for i in range(count):
        label = labels[i % len(labels)]
        (folder / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(folder / label / f"{i}.png")
    return folder


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_int8_reports_its_cost(name, tmp_path):
    folder = save_tiny_classifier(tmp_path / "model")
    images = write_images(tmp_path / "images")
    classifier = cvt.pipeline("image-classification", str(folder), engine=name, precision="int8",
                              calibration=images)
    report = classifier.engine.report
    assert classifier.engine.precision == "int8" and report.images == 24
    assert 0 < report.max_abs_logit_error < 1 and 0 <= report.top1_agreement <= 1
    assert report.accuracy is not None and report.fp32_accuracy is not None  # labelled folders
    assert "top-1 agrees with fp32" in str(report)
    assert len(classifier(str(next(images.rglob("*.png"))))) == 5


def test_reduced_precision_errors_are_clear(tmp_path):
    model, size = make("dw_bn-cls_last-61x77")
    with pytest.raises(EngineError, match="int8 needs calibration images"):
        build_engine(model, "openvino", precision="int8", image_size=size)
    with pytest.raises(EngineError, match="runs fp32, bf16 or fp16"):
        build_engine(model, "torch", precision="int8", image_size=size)
    with pytest.raises(EngineError, match="fp16 needs a CUDA GPU"):
        build_engine(model, "torch", precision="fp16", image_size=size)
    with pytest.raises(ValueError, match="unknown engine 'tensorrt'"):
        build_engine(model, "tensorrt", image_size=size)
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        build_engine(model, "torch", precision="int4", image_size=size)
    if cpu_has_bf16():
        engine = build_engine(model, "openvino", precision="bf16", image_size=size)
        assert engine.report is not None and engine.report.max_abs_logit_error < 0.5
    else:
        for name in ("torch", "openvino"):
            with pytest.raises(EngineError, match="no bf16 units"):
                build_engine(model, name, precision="bf16", image_size=size)


def test_auto_is_the_fastest_installed_engine(tmp_path):
    assert engines.auto_engine(torch.device("cpu")) == engines.AUTO_ORDER["cpu"][0]
    assert engines.auto_engine(torch.device("cuda")) == "torch"
    classifier = cvt.pipeline("image-classification", str(save_tiny_classifier(tmp_path / "m")))
    assert classifier.engine.name == engines.AUTO_ORDER["cpu"][0]


def test_second_predict_builds_nothing_and_a_truncated_cache_file_is_rebuilt(
        tmp_path, monkeypatch, capsys, engine_cache):
    folder = save_tiny_classifier(tmp_path / "model", seed=3)
    photos = write_images(tmp_path / "photos", count=3)
    command = ["predict", str(folder), str(photos), "--engine", "openvino", "--format", "json"]
    assert main(command) == 0
    first = capsys.readouterr().out
    with monkeypatch.context() as patch:
        patch.setattr(exported, "onnx_bytes", lambda *a, **k: pytest.fail("built again"))
        assert main(command) == 0
        assert capsys.readouterr().out == first
    entries = [e for e in engine_cache.iterdir() if (e / "model.xml").is_file()]
    for entry in entries:
        (entry / "model.xml").write_text((entry / "model.xml").read_text()[:200])
    assert main(command) == 0
    captured = capsys.readouterr()
    assert captured.out == first and "rebuilding" in captured.err


def test_export_openvino_writes_a_checked_ir_pair(tmp_path, capsys):
    import openvino as ov

    folder = save_tiny_classifier(tmp_path / "model")
    assert main(["export", str(folder), str(tmp_path / "out" / "tiny.xml"), "--format", "openvino"]) == 0
    assert "max abs difference from PyTorch" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiny.bin", "tiny.xml"]
    model = cvt.CvtForImageClassification.from_pretrained(str(folder)).eval()
    pixel_values = torch.randn(3, 3, 64, 64)
    compiled = ov.Core().compile_model(str(tmp_path / "out" / "tiny.xml"), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    got = torch.from_numpy(compiled({0: pixel_values.numpy()})[0])
    assert (got - plain(model, pixel_values)).abs().max().item() <= 1e-4

