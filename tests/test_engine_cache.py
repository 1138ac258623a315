"""The engine cache trusts nothing its entries say: another model's int8 entry with a rewritten
manifest is rebuilt, a manifest naming files outside its entry (or devices, FIFOs, links, files
over the bound) is refused before anything is read, a choice naming no candidate is replaced,
the choice key follows the thread count, and `~` in the cache variables is the home folder."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

import cvt
from cvt import engines
from cvt.engines import EngineError, auto, build_engine, cache, exported, onnxruntime_engine

from conftest import TINY_ARCHITECTURES, randomise_, save_tiny_classifier, write_images

CPU = torch.device("cpu")


def cvt_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cvt" and r.levelno == logging.WARNING]


def make(seed: int = 0) -> cvt.CvtForImageClassification:
    return randomise_(cvt.CvtForImageClassification(TINY_ARCHITECTURES["dw_bn-cls_last"].config()), seed).eval()


# ------------------------------------------------------------------------------ entries bound to a model
@pytest.mark.slow  # the fp32 case of test_hostile_runs' rebuild stays in the fast tier
def test_another_models_int8_entry_with_a_rewritten_manifest_is_rebuilt(tmp_path, monkeypatch, caplog) -> None:
    """Copied under this model's key with its fingerprint rewritten and its recorded check
    loosened a billionfold, another model's int8 engine is still refused: a loaded entry must
    stay within the code's own bound, which its manifest can tighten, never loosen."""
    images = write_images(tmp_path / "images", count=8)
    root = tmp_path / "cache"
    ours = cvt.CvtForImageClassification.from_pretrained(str(save_tiny_classifier(tmp_path / "a", seed=1)))
    theirs = cvt.CvtForImageClassification.from_pretrained(str(save_tiny_classifier(tmp_path / "b", seed=2)))
    options = dict(precision="int8", image_size=64, calibration=images, cache_dir=root)
    foreign = build_engine(theirs, "onnxruntime", **options)
    (entry,) = root.iterdir()
    load = cache.EngineCache.load

    def load_after_planting_it(self, key):
        if not (self.root / key).exists():
            shutil.copytree(entry, self.root / key)
            manifest = json.loads((self.root / key / "manifest.json").read_text())
            manifest["meta"].update(fingerprint=key, check_difference=1e9)
            (self.root / key / "manifest.json").write_text(json.dumps(manifest))
        return load(self, key)

    monkeypatch.setattr(cache.EngineCache, "load", load_after_planting_it)
    with caplog.at_level(logging.WARNING, logger="cvt"):
        engine = build_engine(ours, "onnxruntime", **options)
    assert not engine.from_cache
    assert any("failed" in m and "differs from the plain model" in m for m in cvt_warnings(caplog))
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    want = ours(x).logits
    assert (engine(x) - want).abs().max() < (foreign(x) - want).abs().max() / 4


def test_a_reduced_precision_engine_far_from_the_model_is_refused_when_built(tmp_path, monkeypatch) -> None:
    model = make(seed=4)
    original = onnxruntime_engine.OnnxRuntimeEngine._run
    monkeypatch.setattr(onnxruntime_engine.OnnxRuntimeEngine, "_run", lambda self, x: original(self, x) * 2)
    with pytest.raises(EngineError, match=r"at int8 differs from the plain model by up to .*\(allowed"):
        build_engine(model, "onnxruntime", precision="int8", image_size=(32, 32),
                     calibration=write_images(tmp_path / "images", count=4), cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("[!.]*"))  # nothing stored


def test_recorded_check_differences_that_are_not_measurements_are_refused() -> None:
    engine = type("Stub", (), {"precision": "int8"})()
    for recorded in ("0.1", None, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(EngineError, match="is not a measurement"):
            cache._check_loaded(engine, make(), {"check_difference": recorded, "report": {}})


def test_the_weights_digest_is_computed_once_per_model_and_build(monkeypatch) -> None:
    calls = []
    digest = cache.weights_digest
    monkeypatch.setattr(cache, "weights_digest", lambda model: calls.append(model) or digest(model))
    store = cache.EngineCache("unused")
    model, other = make(1), make(2)
    keys = {store.key(model, runtime=name) for name in ("onnxruntime", "openvino")}
    assert len(keys) == 2 and calls == [model]
    assert store.key(other, runtime="onnxruntime") not in keys and calls == [model, other]


@pytest.mark.slow
def test_auto_builds_both_graph_engines_from_one_trace(tmp_path, monkeypatch, caplog) -> None:
    """Measuring, auto builds onnxruntime and OpenVINO from one ONNX trace of the model (tracing
    takes seconds); each is still checked against the plain model, and a later build traces anew."""
    monkeypatch.setenv("CVT_AUTO_ENGINE", "measure")
    monkeypatch.setattr(auto, "PAUSE_S", 0.0)
    traced, trace = [], exported.onnx_bytes
    monkeypatch.setattr(exported, "onnx_bytes", lambda model, size: traced.append(size) or trace(model, size))
    model = make(3)
    with caplog.at_level(logging.INFO, logger="cvt"):
        build_engine(model, image_size=32, cache_dir=tmp_path)
    assert traced == [(32, 32)]
    chose = next(r.getMessage() for r in caplog.records if "auto chose" in r.getMessage())
    assert "onnxruntime" in chose and "openvino" in chose, chose
    build_engine(model, "onnxruntime", image_size=40, cache_dir=tmp_path)
    assert traced == [(32, 32), (40, 40)]


# ------------------------------------------------------------------------------ files an entry names
def entry_with(root: Path, files: dict[str, bytes]) -> tuple[cache.EngineCache, str, Path]:
    store = cache.EngineCache(root)
    key = "k" * 40

    def write(folder: Path) -> None:
        for name, data in files.items():
            (folder / name).write_bytes(data)

    folder = store.store(key, write, {"engine": "onnxruntime"})
    assert store.load(key) is not None  # sound as written
    return store, key, folder


def load_within(store: cache.EngineCache, key: str, seconds: float = 30.0):
    """`store.load(key)`, which must return within `seconds` (reading /dev/zero never ends)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(store.load(key)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "load() did not return: it is reading something endless"
    return result[0]


EMPTY_SHA = hashlib.sha256(b"").hexdigest()


def outside_the_entry(folder: Path, manifest: dict) -> str:
    manifest["files"]["../" * 12 + "dev/zero"] = [0, EMPTY_SHA]
    return "not a file of the entry"


def absolute(folder: Path, manifest: dict) -> str:
    manifest["files"]["/dev/zero"] = [0, EMPTY_SHA]
    return "not a file of the entry"


def fifo(folder: Path, manifest: dict) -> str:
    os.mkfifo(folder / "pipe")
    manifest["files"]["pipe"] = [0, EMPTY_SHA]
    return "pipe is not a regular file"


def link_out(folder: Path, manifest: dict) -> str:
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").symlink_to("/dev/zero")
    manifest["files"]["model.onnx"] = [0, EMPTY_SHA]
    return "model.onnx is not a regular file"


def unrecorded(folder: Path, manifest: dict) -> str:
    (folder / "model.bin").write_bytes(b"not in the manifest")
    return "model.bin, which its manifest does not record"


def manifest_a_fifo(folder: Path, manifest: dict) -> str:
    (folder / "manifest.json").unlink()
    os.mkfifo(folder / "manifest.json")
    return "manifest.json is not a regular file"


@pytest.mark.parametrize("tamper", [outside_the_entry, absolute, fifo, link_out, unrecorded, manifest_a_fifo])
def test_an_entry_naming_files_it_does_not_hold_is_refused_before_reading(tmp_path, caplog, tamper) -> None:
    store, key, folder = entry_with(tmp_path / "cache", {"model.onnx": b"graph"})
    manifest = json.loads((folder / "manifest.json").read_text())
    reason = tamper(folder, manifest)
    if (folder / "manifest.json").is_file():
        (folder / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="cvt"):
        assert load_within(store, key) is None
    assert any("unusable" in m and reason in m for m in cvt_warnings(caplog)), cvt_warnings(caplog)
    assert not folder.exists()  # removed, to be rebuilt


def test_entry_files_over_the_bound_are_refused_unread(tmp_path, monkeypatch, caplog) -> None:
    store, key, folder = entry_with(tmp_path / "cache", {"model.onnx": b"x" * 100})
    monkeypatch.setattr(cache, "MAX_FILE_BYTES", 99)
    monkeypatch.setattr(cache, "_sha256", lambda *args: pytest.fail("read a file over the bound"))
    with caplog.at_level(logging.WARNING, logger="cvt"):
        assert store.load(key) is None
    assert any("(at most 99)" in m for m in cvt_warnings(caplog))


# ------------------------------------------------------------------------------ auto's choices
@pytest.fixture
def measuring(monkeypatch) -> list[int]:
    """`auto` measuring torch engines under the runtimes' names; the batch of each measurement."""
    monkeypatch.setenv("CVT_AUTO_ENGINE", "measure")
    monkeypatch.setattr(auto, "PAUSE_S", 0.0)
    original, time_rounds, timed = engines._build, auto.time_rounds, []

    def build(model, name, *args):
        engine = original(model, "torch", *args)
        engine.name = name
        return engine

    monkeypatch.setattr(engines, "_build", build)
    monkeypatch.setattr(auto, "time_rounds", lambda found, x: timed.append(len(x)) or time_rounds(found, x))
    return timed


def test_a_choice_naming_no_candidate_is_replaced_once(tmp_path, measuring, caplog) -> None:
    model, size, root = make(), (32, 32), tmp_path / "cache"
    names = auto.candidates(CPU, model)
    key = auto.choice_key(model, CPU, size, 1, names)
    cache.EngineCache(root).store(key, lambda folder: None, {"engine": "tensorrt"})
    with caplog.at_level(logging.WARNING, logger="cvt"):
        engine = build_engine(model, image_size=size, cache_dir=root)
    assert measuring == [1] and any("'tensorrt', not one of" in m for m in cvt_warnings(caplog))
    stored = json.loads((root / key / "manifest.json").read_text())["meta"]["engine"]
    assert stored == engine.name and stored in names
    again = build_engine(model, image_size=size, cache_dir=root)
    assert measuring == [1] and again.name == stored  # read, not measured again


def test_the_choice_key_follows_the_thread_count_and_compile() -> None:
    model, names = make(), ["onnxruntime", "openvino", "torch"]
    threads = torch.get_num_threads()
    try:
        keys = set()
        for count in (1, 2):
            torch.set_num_threads(count)
            keys |= {auto.choice_key(model, CPU, (32, 32), 1, names, compile=c) for c in (False, True)}
    finally:
        torch.set_num_threads(threads)
    assert len(keys) == 4


# ------------------------------------------------------------------------------ where the cache is
def test_the_home_folder_in_the_cache_variables_is_expanded(tmp_path, monkeypatch) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    monkeypatch.setenv("CVT_CACHE_DIR", "~/engines")
    assert cache.cache_root() == home / "engines"
    monkeypatch.delenv("CVT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert cache.cache_root() == home / "xdg" / "cvt" / "engines"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # invalid by the XDG specification: ignored
    assert cache.cache_root() == home / ".cache" / "cvt" / "engines"
    monkeypatch.setenv("CVT_CACHE_DIR", "~/engines")
    cache.EngineCache().store("k" * 40, lambda folder: None, {"engine": "torch"})
    assert (home / "engines" / ("k" * 40)).is_dir() and list(work.iterdir()) == []
