"""Inference engines: reduced precision reports its cost, built engines are reused from the cache
and a damaged cache entry is rebuilt, never trusted, worker threads and signal stacks are left as
they were, and auto picks the fastest installed engine. (Each fp32 engine against the plain model
on every architecture: test_every_architecture.py.)"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging

import pytest
import torch

import cvt
from cvt import engines
from cvt.cli import main
from cvt.engines import EngineError, auto, build_engine, exported, fused, onnxruntime_engine
from cvt.engines.base import cpu_has_bf16
from cvt.engines.openvino_signals import signal_stack

from conftest import (TINY_ARCHITECTURES, assert_close_to_scale, randomise_, save_tiny_classifier, tiny_config,
                      write_images)

SIZE = (61, 77)  # odd token maps (the engines on every architecture: test_every_architecture.py)


def make(seed: int = 0) -> cvt.CvtForImageClassification:
    """The tiny dw_bn architecture with a cls token in the last stage, random weights."""
    return randomise_(cvt.CvtForImageClassification(TINY_ARCHITECTURES["dw_bn-cls_last"].config()), seed).eval()


def plain(model, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values).logits


@pytest.mark.slow
def test_openvino_engines_leave_the_threads_signal_stack_as_it_was():
    """OpenVINO's CPU plugin swaps the thread's signal stack and restores it only in reverse
    order of destruction: engines dropped first-built-first leave a freed stack behind, and the
    next Python signal handler (a DataLoader worker's SIGCHLD under faulthandler) crashes."""
    before = signal_stack()
    model, size = make(), SIZE
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
    model, size = make(), SIZE
    before = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = build_engine(model, "torch", image_size=size)
        pixel_values = torch.randn(7, 3, *size)
        assert fused.inference_plan(model.config, pixel_values)[0] == 7
        assert_close_to_scale(engine(pixel_values), plain(model, pixel_values), rel=1e-4)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad is False for p in model.parameters())  # the copy is frozen, not the model


@pytest.mark.slow
def test_failed_check_is_an_error_and_caches_nothing(monkeypatch, engine_cache, tmp_path):
    model, size = make(seed=5), SIZE
    original = onnxruntime_engine.OnnxRuntimeEngine._run
    monkeypatch.setattr(onnxruntime_engine.OnnxRuntimeEngine, "_run",
                        lambda self, x: original(self, x) + 1e-3)
    with pytest.raises(EngineError, match="differs from the plain model by up to"):
        build_engine(model, "onnxruntime", image_size=size, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.slow
def test_cache_is_reused_and_a_damaged_entry_rebuilt(monkeypatch, tmp_path, caplog):
    model, size = make(seed=7), SIZE
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
    assert_close_to_scale(rebuilt(pixel_values), plain(model, pixel_values), rel=1e-4)


@pytest.mark.slow
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


@pytest.mark.slow
def test_reduced_precision_errors_are_clear(tmp_path):
    model, size = make(), SIZE
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


def test_auto_in_order_mode_takes_the_first_installed_engine(tmp_path, monkeypatch):
    """CVT_AUTO_ENGINE=order (set for the suite): on the CPU ONNX Runtime, else OpenVINO when
    the model has no 'avg' projection (which OpenVINO pools differently), else torch; on CUDA,
    torch."""
    cpu, dw_bn = torch.device("cpu"), make()
    avg = cvt.CvtForImageClassification(tiny_config(qkv_projection_method=("avg", "dw_bn", "dw_bn")))
    assert engines.auto_engine(cpu) == engines.auto_engine(cpu, avg) == "onnxruntime"
    assert engines.auto_engine(torch.device("cuda")) == "torch"
    classifier = cvt.pipeline("image-classification", str(save_tiny_classifier(tmp_path / "m")))
    assert classifier.engine.name == "onnxruntime"
    find_spec = importlib.util.find_spec
    for missing, with_dw_bn, with_avg in [({"onnxruntime"}, "openvino", "torch"),
                                          ({"onnxruntime", "openvino"}, "torch", "torch")]:
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *args, missing=missing: None if name in missing else find_spec(name, *args))
        assert (engines.auto_engine(cpu, dw_bn), engines.auto_engine(cpu, avg)) == (with_dw_bn, with_avg), missing
        monkeypatch.undo()


def test_auto_measures_once_then_reads_its_choice(tmp_path, monkeypatch):
    """With measuring on, the first `auto` build builds every installed engine once, times them
    and keeps the fastest; a later build (a second process, a Ray actor) reads the stored choice
    and builds only that engine, for other weights of the architecture too; another batch-size
    bucket is measured anew. (Each candidate is a torch engine under the runtime's name here:
    exporting the runtimes' graphs costs ~10 s a build; the bench times the real ones.)"""
    monkeypatch.setenv("CVT_AUTO_ENGINE", "measure")
    monkeypatch.setattr(auto, "PAUSE_S", 0.0)
    built, timed = [], []
    original, time_rounds = engines._build, auto.time_rounds

    def build(model, name, *args):
        built.append(name)
        engine = original(model, "torch", *args)
        engine.name = name
        return engine

    monkeypatch.setattr(engines, "_build", build)
    monkeypatch.setattr(auto, "time_rounds", lambda found, x: timed.append((sorted(found), len(x)))
                        or time_rounds(found, x))
    model, size, cache = make(seed=11), (32, 32), tmp_path / "cache"
    first = build_engine(model, image_size=size, batch_size=3, cache_dir=cache)
    assert built == auto.candidates(torch.device("cpu"), model) == ["onnxruntime", "openvino", "torch"]
    assert timed == [(sorted(built), 8)]  # batch 3: the 2-8 bucket, timed at 8 images
    (entry,) = cache.glob("auto-*")
    seconds = json.loads((entry / "manifest.json").read_text())["meta"]["seconds"]
    assert first.name == min(seconds, key=seconds.get) and set(seconds) == set(built)
    built.clear()
    again = build_engine(make(seed=12), image_size=size, batch_size=8, cache_dir=cache)
    assert (again.name, built, len(timed)) == (first.name, [first.name], 1)
    pixel_values = torch.randn(2, 3, *size)
    assert_close_to_scale(first(pixel_values), plain(model, pixel_values), rel=1e-4)
    build_engine(model, image_size=size, batch_size=1, cache_dir=cache)
    assert [batch for _, batch in timed] == [8, 1]
    with pytest.raises(ValueError, match="CVT_AUTO_ENGINE must be one of measure, order"):
        monkeypatch.setenv("CVT_AUTO_ENGINE", "fastest")
        build_engine(model, image_size=size, cache_dir=cache)


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert_close_to_scale(got, plain(model, pixel_values), rel=1e-4)

