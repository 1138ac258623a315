"""Hostile conditions around a run: the engine cache (foreign, linked, unwritable entries), engine
inputs, training folders (locks, files cvt did not write, paths checked before the first step),
sizes bounded before memory is spent, training states that are not ours or out of range, empty
and long names, label maps, configs far deeper than their weights, and what holds under signals,
threads, symlink loops and odd file names."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import cvt
from cvt import CvtConfig, cli
from cvt.engines import build_engine, cache
from cvt.errors import CheckpointError, InvalidValueError
from cvt.training.folder import lock_run_folder
from cvt.training.state import (STATE_FORMAT, STATE_NAME, ResumeError, cvt_version, load_state, rng_state,
                               save_state)
from cvt.checkpoints import read

from conftest import (as_args, make_folder, make_model_folder, one_line_error, randomise_, read_weights,
                      save_tiny_classifier, start_with_a_slow_file, tiny_config, tiny_training_args, write_images)


def cvt_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cvt" and r.levelno == logging.WARNING]


# ------------------------------------------------------------------------------ the engine cache
@pytest.mark.parametrize("precision", ["fp32", pytest.param("int8", marks=pytest.mark.slow)])
def test_another_models_entry_under_this_models_key_is_rebuilt(tmp_path, monkeypatch, caplog, precision) -> None:
    """An entry copied in from another model (its files and manifest whole) is refused by its
    fingerprint, rebuilt with a warning, and the engine computes this model's outputs."""
    images = write_images(tmp_path / "images", count=8) if precision == "int8" else None
    root = tmp_path / "cache"
    ours = cvt.CvtForImageClassification.from_pretrained(str(save_tiny_classifier(tmp_path / "a", seed=1)))
    theirs = cvt.CvtForImageClassification.from_pretrained(str(save_tiny_classifier(tmp_path / "b", seed=2)))
    options = dict(precision=precision, image_size=64, calibration=images, cache_dir=root)
    foreign = build_engine(theirs, "onnxruntime", **options)
    (entry,) = root.iterdir()
    load = cache.EngineCache.load

    def load_after_copying_it_in(self, key):
        if not (self.root / key).exists():
            shutil.copytree(entry, self.root / key)
        return load(self, key)

    monkeypatch.setattr(cache.EngineCache, "load", load_after_copying_it_in)
    with caplog.at_level(logging.WARNING, logger="cvt"):
        engine = build_engine(ours, "onnxruntime", **options)
    assert not engine.from_cache
    assert any("built for other weights or settings" in m for m in cvt_warnings(caplog))
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    want = ours(x).logits
    assert (engine(x) - want).abs().max() < (foreign(x) - want).abs().max() / 4


def test_a_full_or_read_only_cache_warns_once_and_serves_the_engine(tmp_path, monkeypatch, caplog) -> None:
    model = randomise_(cvt.CvtForImageClassification(tiny_config()), 3).eval()
    root = tmp_path / "cache"
    codes = [errno.ENOSPC, errno.EROFS]

    def failing_copy(source, target):
        (target / "model.onnx").write_bytes(b"half an engine")
        code = codes.pop(0)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(cache, "_copy_files", failing_copy)
    x = torch.randn(2, 3, 64, 64)
    with caplog.at_level(logging.WARNING, logger="cvt"):
        for _ in range(2):
            engine = build_engine(model, "onnxruntime", image_size=64, cache_dir=root)
            assert (engine(x) - model(x).logits).abs().max() <= 1e-4
    assert codes == [] and len([m for m in cvt_warnings(caplog) if "cannot store engines" in m]) == 1
    assert list(root.iterdir()) == []  # no partial entry, temporary folder or lock file


def test_a_cache_path_that_is_a_file_is_a_one_line_error(tmp_path, monkeypatch, capsys) -> None:
    folder = save_tiny_classifier(tmp_path / "model")
    (tmp_path / "cache").write_text("not a folder")
    model = cvt.CvtForImageClassification.from_pretrained(str(folder))
    with pytest.raises(InvalidValueError, match="is a file, not a folder"):
        build_engine(model, "onnxruntime", image_size=64, cache_dir=tmp_path / "cache")
    monkeypatch.setenv("CVT_CACHE_DIR", str(tmp_path / "cache"))
    photos = write_images(tmp_path / "photos", count=1)
    line = one_line_error(capsys, ["predict", str(folder), str(photos), "--engine", "onnxruntime"])
    assert "engine cache" in line and "is a file, not a folder" in line


@pytest.mark.slow  # a rebuild: test_another_models_entry_under_this_models_key_is_rebuilt[fp32] is the fast tier's
def test_a_cache_entry_that_is_a_symlink_is_not_followed_but_rebuilt(tmp_path, caplog) -> None:
    model = randomise_(cvt.CvtForImageClassification(tiny_config()), 4).eval()
    root = tmp_path / "cache"
    build_engine(model, "onnxruntime", image_size=64, cache_dir=root)
    (entry,) = root.iterdir()
    elsewhere = tmp_path / "elsewhere"
    entry.rename(elsewhere)
    entry.symlink_to(elsewhere, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="cvt"):
        engine = build_engine(model, "onnxruntime", image_size=64, cache_dir=root)
    assert not engine.from_cache and any("symbolic link" in m for m in cvt_warnings(caplog))
    assert entry.is_dir() and not entry.is_symlink() and (elsewhere / "manifest.json").is_file()


def test_a_numpy_array_given_to_an_engine_is_refused_naming_what_to_pass() -> None:
    model = randomise_(cvt.CvtForImageClassification(tiny_config()), 5).eval()
    engine = build_engine(model, "torch", image_size=64)
    array = np.zeros((1, 3, 64, 64), np.float32)
    with pytest.raises(TypeError, match=r"numpy\.ndarray.*torch\.from_numpy"):
        engine(array)


# ------------------------------------------------------------------------------ sizes
def test_attention_size_is_bounded_before_anything_is_drawn(capsys) -> None:
    for size in ("100000", "0", "-5"):
        line = one_line_error(capsys, ["attention", "m", "i.png", "--output", "o.png", "--size", size])
        assert "--size must be a positive whole number of pixels, from 1 to 2048" in line


@pytest.mark.parametrize("command", [["predict", "m", "photos"], ["info", "cvt-13"], ["eval", "--model", "m", "--data", "d"],
                                     ["export", "m", "o.onnx"], ["train", "--model", "m", "--data", "d", "--output-dir", "o"],
                                     ["attention", "m", "i.png", "--output", "o.png"]])
def test_image_size_zero_negative_or_huge_is_an_error_on_every_command(capsys, command) -> None:
    for size in ("100000", "0", "-5"):
        line = one_line_error(capsys, [*command, "--image-size", size])
        assert "--image-size must be a positive whole number of pixels, from 1 to 1024" in line


def test_engines_bound_their_build_check_before_allocating() -> None:
    model = cvt.CvtForImageClassification(tiny_config()).eval()
    for size in (100000, 0, -5, (64, 5000)):
        with pytest.raises(InvalidValueError, match="from 1 to 1024"):
            build_engine(model, "torch", image_size=size)


# ------------------------------------------------------------------------------ training folders
def test_training_deletes_only_files_it_wrote_and_names_the_rest(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    (out / "best").mkdir(parents=True)
    theirs = [out / ".draft.tmp", out / "best" / ".notes.tmp", out / "notes.txt"]
    for path in theirs:
        path.write_text("the user's")
    (out / "metrics.jsonl").write_text('{"mine": 1}\n')
    line = one_line_error(capsys, tiny_training_args(tmp_path, out))
    assert "holds metrics.jsonl, best" in line and "no cvt run started there" in line
    assert (out / "metrics.jsonl").read_text() == '{"mine": 1}\n'

    (out / "metrics.jsonl").unlink()
    shutil.rmtree(out / "best")
    theirs.remove(out / "best" / ".notes.tmp")
    ours = out / f".{STATE_NAME}.{'ab' * 16}.tmp"  # what write_atomic leaves when killed
    ours.write_bytes(b"half")
    assert cli.main(tiny_training_args(tmp_path, out)) == 0
    err = capsys.readouterr().err
    assert not ours.exists() and all(p.read_text() == "the user's" for p in theirs)
    assert ".draft.tmp" in err and "not files cvt wrote" in err


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    holder = lock_run_folder(out)
    try:
        line = one_line_error(capsys, tiny_training_args(tmp_path, out))
    finally:
        holder.release()
    assert f"process {os.getpid()} on {socket.gethostname()}" in line and "in use" in line
    assert not (out / "metrics.jsonl").exists()
    assert cli.main(tiny_training_args(tmp_path, out)) == 0  # released: the folder is free


@pytest.mark.parametrize("name", ["best", "last"])
def test_a_file_where_a_model_folder_goes_is_refused_before_the_first_step(tmp_path, capsys, monkeypatch, name) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text("a file")
    monkeypatch.setattr("cvt.training.trainer._train_epoch", lambda *a: pytest.fail("trained"))
    line = one_line_error(capsys, tiny_training_args(tmp_path, out))
    assert f"{name} is a file, not a folder" in line


# ------------------------------------------------------------------------------ training states
def minimal_state(**changes) -> dict:
    return {"step": 1, "best_top1": 0.5, "run": {}, "rng": [rng_state()], "extra_epochs": 0, "model": {},
            "optimizer": {}, "scaler": None, "ema": None, **changes}


def test_a_file_that_is_not_a_cvt_state_says_so_in_one_line(tmp_path) -> None:
    path = tmp_path / STATE_NAME
    torch.save({"step": 1, "model": {}, "sneaky": Fraction(1, 3)}, path)
    with pytest.raises(ResumeError) as caught:
        load_state(path)
    assert "is not a cvt training state" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("changes, named", [({"step": -3}, "step is -3"), ({"best_top1": float("nan")}, "best_top1 is nan"),
                                            ({"extra_epochs": -1}, "extra_epochs is -1")])
def test_state_values_out_of_range_are_refused_by_name(tmp_path, changes, named) -> None:
    save_state(tmp_path / STATE_NAME, minimal_state(**changes))
    with pytest.raises(ResumeError, match=named):
        load_state(tmp_path / STATE_NAME)


def test_a_state_records_its_format_and_a_newer_one_is_refused_naming_both_versions(tmp_path) -> None:
    save_state(tmp_path / STATE_NAME, minimal_state())
    state = load_state(tmp_path / STATE_NAME)
    assert state["format"] == STATE_FORMAT and state["cvt_version"]
    torch.save({**state, "format": STATE_FORMAT + 1, "cvt_version": "99.0"}, tmp_path / STATE_NAME)
    with pytest.raises(ResumeError) as caught:
        load_state(tmp_path / STATE_NAME)
    message = str(caught.value)
    assert f"cvt 99.0, state format {STATE_FORMAT + 1}" in message and f"up to {STATE_FORMAT}" in message
    assert f"this is cvt {cvt_version()}" in message


def test_run_settings_this_cvt_does_not_know_are_refused_naming_both_versions(paused, capsys) -> None:  # noqa: F811
    options, _ = paused
    path = options["output_dir"] / STATE_NAME
    state = torch.load(path, weights_only=True)
    state["run"]["warp_drive"] = 9
    torch.save({**state, "cvt_version": "99.0"}, path)
    line = one_line_error(capsys, [*as_args(options), "--resume"])
    assert "settings this cvt does not know (warp_drive)" in line and "cvt 99.0" in line


# ------------------------------------------------------------------------------ names and configs
def test_an_empty_model_name_is_an_error_saying_it_is_empty(tmp_path, capsys) -> None:
    with pytest.raises(CheckpointError, match="the model name is empty"):
        cvt.load("")
    line = one_line_error(capsys, ["predict", "", str(write_images(tmp_path / "p", count=1))])
    assert "the model name is empty" in line


def test_a_long_model_name_is_shortened_in_messages(capsys) -> None:
    name = "x" * 10_000
    line = one_line_error(capsys, ["info", name])
    assert len(line) < 400 and "xxx...xxx" in line


def test_id2label_keys_must_be_distinct_integers() -> None:
    with pytest.raises(InvalidValueError, match="distinct integers.*'1' and '01'"):
        CvtConfig(id2label={"0": "a", "1": "b", "01": "c"})


def test_a_contradicting_label2id_is_rebuilt_from_id2label_with_a_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="cvt"):
        config = CvtConfig(id2label={0: "cat", 1: "dog"}, label2id={"cat": 1, "dog": 0})
    assert config.label2id == {"cat": 0, "dog": 1}
    assert any("label2id is not the inverse" in m for m in cvt_warnings(caplog))
    caplog.clear()
    repeated = CvtConfig(id2label={0: "crane", 1: "crane"}, label2id={"crane": 1})  # ImageNet repeats names
    assert repeated.label2id == {"crane": 1} and cvt_warnings(caplog) == []


PEAK = """
import sys, time
from cvt import CvtForImageClassification  # imports torch: not the call's time or memory
from cvt.errors import CheckpointError

def peak_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

def load_seconds(folder):
    start = time.perf_counter()
    try:
        CvtForImageClassification.from_pretrained(folder)
        print("LOADED", folder)
    except CheckpointError as err:
        print("REFUSED", err)
    return time.perf_counter() - start

load_seconds(sys.argv[2])  # the first load pays for lazy imports, not for the config
baseline = load_seconds(sys.argv[2])  # building the one-layer model the weights hold
before = peak_kb()
seconds = load_seconds(sys.argv[1])
print("SECONDS", seconds, "BEFORE_KB", before, "PEAK_KB", peak_kb(), "BASELINE", baseline)
"""


@pytest.mark.subprocess
def test_a_config_far_deeper_than_its_one_layer_is_refused_before_building_it(tmp_path) -> None:
    """Counted from the safetensors header's key names and shapes before anything else is read
    or built: the refusal takes less time than loading the one-layer model the weights hold
    (measured in the same fresh process; building 120 layers would take many times that) and
    adds under 500 MB to the process's peak (VmHWM; importing torch alone peaks at about 520 MB,
    mostly its libraries' pages, before the call)."""
    valid = make_model_folder(tmp_path / "valid", tiny_config(depth=(1, 1, 1)))
    folder = make_model_folder(tmp_path / "m", tiny_config(depth=(1, 1, 1)))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "depth": [1, 1, 120]}))
    run = subprocess.run([sys.executable, "-c", PEAK, str(folder), str(valid)], capture_output=True, text=True,
                         timeout=300, env={"PYTHONPATH": str(Path(cvt.__file__).parents[1]), "OMP_NUM_THREADS": "1",
                                           "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "REFUSED" in run.stdout and "stage 2 has depth 120 in the config, 1 in the weights" in run.stdout
    numbers = run.stdout.split("SECONDS")[1].split()
    seconds, before_kb, peak_kb, baseline = float(numbers[0]), int(numbers[2]), int(numbers[4]), float(numbers[6])
    print(f"refused in {seconds:.3f} s (a one-layer load: {baseline:.3f} s); "
          f"peak {peak_kb / 1024:.0f} MB, {before_kb / 1024:.0f} MB before the call")
    assert seconds < baseline and (peak_kb - before_kb) / 1024 < 500


@pytest.mark.parametrize("sharded", [False, True], ids=["one file", "shards"])
def test_a_deep_config_is_refused_from_the_safetensors_headers_before_the_weights_are_read(
        tmp_path, monkeypatch, sharded) -> None:
    """The layer counts come from the headers' key names and shapes: not one tensor is read."""
    folder = make_model_folder(tmp_path / "m", tiny_config(depth=(1, 1, 1)))
    if sharded:  # transformers' layout: two shards and the index naming each key's shard
        from safetensors.torch import save_file

        weights = read_weights(folder)
        keys = sorted(weights)
        halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for shard, names in halves.items():
            save_file({k: weights[k] for k in names}, folder / shard)
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {k: shard for shard, names in halves.items() for k in names}}))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "depth": [1, 1, 120]}))

    def never(path):
        raise AssertionError(f"weights read: {path}")

    monkeypatch.setattr(read, "read_state_dict", never)
    with pytest.raises(CheckpointError, match="stage 2 has depth 120 in the config, 1 in the weights"):
        cvt.CvtForImageClassification.from_pretrained(folder)


# ------------------------------------------------------------------------------ what held, kept
@pytest.mark.usefixtures("one_torch_thread")  # as the interrupted process (OMP_NUM_THREADS=1): one summation order
def test_sigterm_mid_epoch_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch) -> None:
    args = tiny_training_args(tmp_path, tmp_path / "run")
    (tmp_path / "data" / "cat" / "cat0.png").rename(tmp_path / "data" / "cat" / "slow.png")
    args = [*args, "--epochs", "2", "--save-every", "1"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    process, _ = start_with_a_slow_file(tmp_path, args)
    process.terminate()  # SIGTERM while a step waits for its images
    process.communicate(timeout=30)
    assert process.returncode == -15
    step = load_state(tmp_path / "run" / STATE_NAME)["step"]
    assert 0 < step < 6, step  # stopped mid-run, after some saved steps
    assert cli.main([*args, "--resume"]) == 0
    whole = [a if a != str(tmp_path / "run") else str(tmp_path / "whole") for a in args]
    assert cli.main(whole) == 0
    a, b = read_weights(tmp_path / "run" / "last"), read_weights(tmp_path / "whole" / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("engine", ["torch", "onnxruntime", "openvino"])
def test_four_threads_calling_one_pipeline_agree_exactly_with_serial_calls(tmp_path, engine) -> None:
    from concurrent.futures import ThreadPoolExecutor

    photos = sorted((write_images(tmp_path / "photos", count=4)).rglob("*.png"))
    classifier = cvt.pipeline("image-classification", str(save_tiny_classifier(tmp_path / "m")), engine=engine)
    calls = [photos[i % len(photos)] for i in range(80)]  # 4 threads x 20 calls
    serial = [classifier(str(p)) for p in calls]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda p: classifier(str(p)), calls))
    assert threaded == serial


def test_a_symlink_loop_in_a_folder_is_skipped_and_the_rest_predicted(tmp_path, capsys) -> None:
    photos = write_images(tmp_path / "photos", count=2)
    (photos / "loop").symlink_to(photos, target_is_directory=True)
    (photos / "self.png").symlink_to(photos / "self.png")
    capsys.readouterr()
    status = cli.main(["predict", str(save_tiny_classifier(tmp_path / "m")), str(photos), "--format", "json",
                       "--engine", "torch"])
    records = json.loads(capsys.readouterr().out)
    assert status in (0, 1) and sum("predictions" in r for r in records) >= 2


def test_emoji_class_names_train_and_come_back_as_labels(tmp_path) -> None:
    classes = ("🐱 cat", "☕", "🚀 rocket")
    data = make_folder(tmp_path / "data", classes=classes, per_class=4)
    make_model_folder(tmp_path / "start", tiny_config(num_labels=3))
    options = dict(model=tmp_path / "start", data=data, output_dir=tmp_path / "run", epochs=1, batch_size=4,
                   val_split=0, workers=0)
    assert cli.main(as_args(options)) == 0
    config = json.loads((tmp_path / "run" / "last" / "config.json").read_text(encoding="utf-8"))
    assert sorted(config["id2label"].values()) == sorted(classes)


@pytest.mark.parametrize("name", ["../../etc/passwd.safetensors", "../nowhere", "/etc/../nowhere",
                                  "a/../../b/c", "..\\..\\x"])
def test_path_traversal_model_names_are_refused_as_names_of_nothing(name) -> None:
    with pytest.raises(CheckpointError):
        cvt.load(name)


def read_back(path: Path, fmt: str) -> list[dict]:
    """Rows (path, labels, scores, error) read from a `cvt predict --output` file of `fmt`;
    CSV is read as its bytes' surrogateescape decoding, as cvt writes names that are not UTF-8;
    parquet holds such a name with `\\xNN` escapes."""
    if fmt == "json":
        return [{"path": r["path"], "labels": [p["label"] for p in r.get("predictions", [])],
                 "scores": [p["score"] for p in r.get("predictions", [])], "error": r.get("error")}
                for r in json.loads(path.read_text(encoding="utf-8"))]
    if fmt == "jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        table = list(csv.DictReader(f))
    rows: dict[str, dict] = {}
    for r in table:
        row = rows.setdefault(r["path"], {"path": r["path"], "labels": [], "scores": [], "error": r["error"] or None})
        row["labels"].append(r["label"])
        row["scores"].append(float(r["score"]))
        assert int(r["rank"]) == len(row["labels"])
    return list(rows.values())


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
def test_every_format_reads_back_odd_labels_and_non_utf8_file_names(fmt, tmp_path, capsys) -> None:
    labels = {0: 'say "hi"\nthen \\ leave', 1: "🐱\u200b, comma", 2: "", 3: "<b>&</b>", 4: "tab\tsep\r\n"}
    model = randomise_(cvt.CvtForImageClassification(tiny_config(id2label=labels)), 2)
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    cvt.CvtImageProcessor(size=64).save_pretrained(folder)
    photos = write_images(tmp_path / "photos", count=1)
    (image,) = photos.rglob("*.png")
    raw = os.fsencode(photos) + b"/caf\xe9 \xff\n.png"
    os.rename(image, raw)
    expected = cvt.pipeline("image-classification", str(folder), top_k=5, engine="torch")(os.fsdecode(raw))
    out = tmp_path / f"out.{fmt}"
    assert cli.main(["predict", str(folder), str(photos), "--format", fmt, "--top-k", "5",
                     "--engine", "torch", "--output", str(out)]) == 0
    (record,) = read_back(out, fmt)
    written = raw.decode("utf-8", "backslashreplace") if fmt == "parquet" else os.fsdecode(raw)
    assert record["path"] == written and record["error"] is None
    assert record["labels"] == [p["label"] for p in expected]
    np.testing.assert_allclose(record["scores"], [p["score"] for p in expected], rtol=1e-6)  # scores: scale 1
