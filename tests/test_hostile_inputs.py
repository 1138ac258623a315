"""Hostile inputs (issue 12): images built to exhaust memory or block, odd pixel types, NaN
scores, Ctrl-C, and the CLI's error policy. Each is refused with a clear error or handled safely,
and nothing else is lost: the other files are classified and written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cvt
from cvt import CvtImageProcessor, ImageError, load_image
from cvt.cli import main
from cvt.images import MAX_PIXELS, check_image_file
from conftest import TINY_LABELS, randomise_, save_tiny_classifier, start_with_a_slow_file, tiny_config

SRC = str(Path(cvt.__file__).resolve().parents[1])


def png_header(width: int, height: int, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """A PNG that claims `width` x `height` pixels but holds almost no data (a few hundred bytes)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def jpeg_claiming(path: Path, width: int, height: int) -> Path:
    """A small real JPEG whose frame header (SOF0) is patched to claim width x height."""
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path, quality=90)
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def photo(path: Path, size: tuple[int, int] = (96, 80)) -> Path:
    rng = np.random.default_rng(len(str(path)))
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = save_tiny_classifier(tmp_path_factory.mktemp("model"))
    cvt.pipeline("image-classification", str(folder), engine="torch")
    return folder


def predict_json(capsys, model_dir: Path, *inputs, extra=()) -> tuple[int, dict, str]:
    status = main(["predict", str(model_dir), *map(str, inputs), "--format", "json", "--engine", "torch",
                   *extra])
    out, err = capsys.readouterr()
    return status, {r["path"]: r for r in json.loads(out)}, err


# ----------------------------------------------------------------------------- the pixel budget
@pytest.mark.parametrize("size", [(1, 2_000_000), (1, 200_000), (200_000, 1)])
def test_extreme_aspect_ratios_are_refused_before_the_resize(tmp_path, model_dir, capsys, size) -> None:
    """A 6 KB 1x2,000,000 PNG once asked for gigabytes in the resize; now the resize target is
    checked first, and the other file is still classified."""
    Image.new("L", size, 90).save(tmp_path / "thin.png")
    assert (tmp_path / "thin.png").stat().st_size < 10_000
    good = photo(tmp_path / "good.png")
    with pytest.raises(ImageError, match=r"resizing this .* over cvt's budget"):
        CvtImageProcessor(size=224)(tmp_path / "thin.png")
    status, records, err = predict_json(capsys, model_dir, tmp_path)
    assert status == 1 and "predictions" in records[str(good)]
    assert "over cvt's budget" in records[str(tmp_path / "thin.png")]["error"]
    assert f"{tmp_path / 'thin.png'}: resizing" in err


def test_images_over_the_budget_are_refused_before_decoding(tmp_path) -> None:
    """A 13000x13000 16-bit PNG (a few hundred bytes here) would take 340 MB decoded and more in
    copies; Pillow only warns below 179 Mpx. Refused from its header, with our message."""
    cases = {"big16.png": png_header(13000, 13000, 16), "big8.png": png_header(10000, 10000),
             "bomb.png": png_header(100_000, 100_000), "rgba.png": png_header(6000, 6000, 8, 6)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageError, match=rf"{name}: .*over cvt's budget of {MAX_PIXELS / 1e6:g} Mpx"):
            load_image(tmp_path / name)
        with pytest.raises(ImageError, match="over cvt's budget"):
            check_image_file(tmp_path / name)  # training's header check refuses it too


def test_a_large_jpeg_is_decoded_reduced_and_an_absurd_one_refused(tmp_path, monkeypatch) -> None:
    """A JPEG over the budget is decoded at 1/2 .. 1/8 of its size (Pillow's draft), the same
    picture; one still over at 1/8 is refused."""
    rng = np.random.default_rng(0)
    pixels = np.kron(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), np.ones((40, 40, 1), np.uint8))
    Image.fromarray(pixels).save(tmp_path / "large.jpg", quality=95)  # 1600x1200
    full = np.asarray(load_image(tmp_path / "large.jpg"), dtype=float)
    monkeypatch.setattr("cvt.images.MAX_PIXELS", 600_000)  # 1.92 Mpx: 1/2 is 480 k pixels
    reduced = load_image(tmp_path / "large.jpg")
    assert reduced.size == (800, 600)
    assert np.abs(np.asarray(reduced, dtype=float) - full[::2, ::2]).mean() < 8  # the same picture
    with pytest.raises(ImageError, match="over cvt's budget"):
        load_image(jpeg_claiming(tmp_path / "absurd.jpg", 60000, 60000))


def test_float_copies_of_unresized_images_are_within_the_budget(monkeypatch) -> None:
    monkeypatch.setattr("cvt.images.MAX_PIXELS", 10_000)
    processor = CvtImageProcessor(size=64, do_resize=False)
    assert processor(np.zeros((40, 40, 3), np.uint8))["pixel_values"].shape == (1, 3, 40, 40)
    with pytest.raises(ImageError, match="float64 copy"):
        processor(np.zeros((100, 100, 3), np.uint8))  # 10 k pixels of 24 bytes: over 40 kB


# ----------------------------------------------------------------------------- files that block
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_fifo_or_a_device_is_skipped_not_read(tmp_path, model_dir, capsys) -> None:
    """A FIFO named x.png once blocked `cvt predict` forever; /dev/zero would never end."""
    os.mkfifo(tmp_path / "x.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    good = photo(tmp_path / "good.png")
    with pytest.raises(ImageError, match="x.png: is a FIFO"):
        load_image(tmp_path / "x.png")
    status, records, err = predict_json(capsys, model_dir, tmp_path)
    assert status == 1 and "predictions" in records[str(good)]
    assert "FIFO (named pipe), not a regular file" in records[str(tmp_path / "x.png")]["error"]
    assert "a device, not a regular file" in records[str(tmp_path / "zero.png")]["error"]


def test_hostile_files_in_training_data_are_reported_and_skipped(tmp_path, model_dir, capsys) -> None:
    """Training and eval read images through the same bounded loader: a FIFO is skipped by the
    header check, an extreme aspect ratio when it is prepared; the run goes on."""
    data = tmp_path / "data"
    for label in TINY_LABELS[:2]:
        (data / label).mkdir(parents=True)
        photo(data / label / "a.png"), photo(data / label / "b.png")
    Image.new("L", (1, 200_000), 90).save(data / TINY_LABELS[0] / "thin.png")
    os.mkfifo(data / TINY_LABELS[1] / "x.png")
    listed = tmp_path / "data.csv"  # a list names the FIFO (a folder walk passes it over)
    listed.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted(data.rglob("*.png"))))
    for source in (data, listed):
        assert main(["eval", "--model", str(model_dir), "--data", str(source), "--workers", "0",
                     "--engine", "torch", "--format", "json"]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["count"] == 4  # the 2 x 2 good images
    assert "x.png skipped (is a FIFO (named pipe), not a regular file" in err
    assert "thin.png skipped (resizing this 1x200000 image would need" in err


# ----------------------------------------------------------------------------- pixel types
def test_a_32_bit_integer_tiff_is_scaled_by_its_real_range(tmp_path) -> None:
    """Values up to 10^6 were clipped at 65535 (94 % of pixels white); now the range maps to 0-255."""
    values = np.linspace(0, 1_000_000, 64 * 64).reshape(64, 64).astype(np.int32)
    Image.fromarray(values, mode="I").save(tmp_path / "wide.tif")
    grey = np.asarray(load_image(tmp_path / "wide.tif"))[..., 0]
    np.testing.assert_array_equal(grey, np.round(values / 1_000_000 * 255).astype(np.uint8))
    assert (grey == 255).mean() < 0.01
    sixteen = np.arange(0, 65536, 16, dtype=np.int32).reshape(64, 64)  # in 16-bit range: as 16-bit
    Image.fromarray(sixteen, mode="I").save(tmp_path / "sixteen.tif")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "sixteen.tif"))[..., 0],
                                  np.round(sixteen / 257).astype(np.uint8))


@pytest.mark.parametrize("empty", [np.zeros((0, 0, 3), np.uint8), np.zeros((0, 5), np.float32),
                                   torch.zeros(3, 0, 4), Image.new("RGB", (0, 0))],
                         ids=["array-0x0x3", "array-0x5", "tensor-3x0x4", "pil-0x0"])
def test_an_empty_image_is_an_image_error(empty) -> None:
    with pytest.raises(ImageError, match="empty"):
        CvtImageProcessor(size=64)(empty)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_pixel_values_of_another_float_dtype_are_cast_to_the_models(dtype) -> None:
    model = randomise_(cvt.CvtForImageClassification(tiny_config()), 0).eval()
    pixel_values = torch.randn(2, 3, 64, 64).to(dtype)
    with torch.no_grad():
        want = model(pixel_values.float()).logits
        got = model(pixel_values).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- predict's output
def test_nan_scores_are_null_in_valid_json_and_counted_as_failed(tmp_path, model_dir, capsys,
                                                                 monkeypatch) -> None:
    """A model whose logits overflow on some inputs (here: bright images) gives NaN scores; they
    are written as null, the file counts as failed, and the other file is classified."""
    build_engine = cvt.inference.build_engine

    def overflowing(*args, **kwargs):
        engine = build_engine(*args, **kwargs)
        def run(pixel_values):
            logits = engine(pixel_values).clone()
            logits[pixel_values.mean(dim=(1, 2, 3)) > 1] = float("nan")
            return logits
        return run

    monkeypatch.setattr("cvt.inference.build_engine", overflowing)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (80, 80), (250, 250, 250)).save(images / "bright.png")
    Image.new("RGB", (80, 80), (10, 20, 30)).save(images / "dark.png")
    output = tmp_path / "out.json"
    status = main(["predict", str(model_dir), str(images), "--format", "json", "--engine", "torch",
                   "--output", str(output)])
    text = output.read_text()
    records = json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert status == 1 and len(records) == 2  # valid JSON: parse_constant saw no NaN
    bright, dark = records
    assert [p["score"] for p in bright["predictions"]] == [None] * 5 and "NaN or infinite" in bright["error"]
    assert "error" not in dark and all(0 < p["score"] < 1 for p in dark["predictions"])
    assert "1 of 2 files could not be classified" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Ctrl-C
# Ctrl-C must not wait for the file being read, which takes a minute (conftest's slow file):
# stopping in a sixth of that is prompt on any machine, however busy
PROMPT_STOP_S = 10


def interrupt(process: subprocess.Popen) -> tuple[float, str]:
    """Ctrl-C; (seconds until the process ended, its stderr)."""
    start = time.monotonic()
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=10)
    finally:
        process.kill()
    return time.monotonic() - start, err


def test_ctrl_c_stops_predict_without_waiting_for_the_file_and_writes_what_it_finished(tmp_path, model_dir) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png", "c.png", "slow.png"):
        photo(images / name)
    output = tmp_path / "out.json"
    process, _ = start_with_a_slow_file(tmp_path, [
        "predict", str(model_dir), str(images), "--format", "json", "--output", str(output),
        "--engine", "torch", "--batch-size", "1"])
    elapsed, err = interrupt(process)
    assert process.returncode == 130 and elapsed < PROMPT_STOP_S, (process.returncode, elapsed, err)
    records = json.loads(output.read_text())
    finished = int(err.split("interrupted after ")[1].split()[0])
    assert 1 <= finished < 4 and len(records) == finished, err
    assert [r["path"] for r in records] == [str(images / n) for n in ("a.png", "b.png", "c.png")][:finished]
    assert all(len(r["predictions"]) == 5 for r in records) and "Traceback" not in err


@pytest.mark.parametrize("command", ["eval", "train"])
def test_ctrl_c_stops_eval_and_train_without_waiting_for_the_file(tmp_path, model_dir, command) -> None:
    data = tmp_path / "data"
    for label in TINY_LABELS[:2]:
        (data / label).mkdir(parents=True)
        for name in ("a.png", "b.png", "slow.png"):
            photo(data / label / name)
    args = ["--model", str(model_dir), "--data", str(data), "--workers", "0", "--batch-size", "2"]
    if command == "train":
        args += ["--output-dir", str(tmp_path / "run"), "--epochs", "1", "--val-split", "0"]
    else:
        args += ["--engine", "torch"]
    process, _ = start_with_a_slow_file(tmp_path, [command, *args])
    elapsed, err = interrupt(process)
    assert process.returncode == 130 and elapsed < PROMPT_STOP_S, (process.returncode, elapsed, err)
    assert "Traceback" not in err and "cvt: interrupted" in err


# ----------------------------------------------------------------------------- the CLI's policy
def test_cli_exit_statuses_expected_errors_bugs_and_debug(tmp_path, model_dir, capsys, monkeypatch) -> None:
    """Expected errors: one line, exit 2 (--debug adds the traceback); a bug: its traceback, exit 3."""
    assert main(["predict", str(model_dir), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file or folder" in err
    assert main(["--debug", "predict", str(model_dir), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("cvt: error: ")

    def broken(*args, **kwargs):
        return np.zeros(3).reshape(2, 2)  # a ValueError from inside numpy: a bug, not a message

    photo(tmp_path / "a.png")
    monkeypatch.setattr("cvt.predict.find_images", broken)
    assert main(["predict", str(model_dir), str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "cannot reshape" in err and "a bug in cvt" in err
    monkeypatch.setattr("cvt.predict.find_images", lambda inputs: {}["missing key"])
    assert main(["predict", str(model_dir), str(tmp_path)]) == 3
    assert "KeyError" in capsys.readouterr().err


# ----------------------------------------------------------------------------- twenty at once
def hostile_folder(root: Path) -> tuple[list[str], dict[str, str]]:
    """20 hostile files, a 108 MP JPEG and 2 plain photos: (the files that must be classified,
    {file: what its error says})."""
    root.mkdir()
    refused = {}
    for name, size, why in [("thin-2M.png", (1, 2_000_000), "resizing"), ("thin-200k.png", (1, 200_000), "resizing"),
                            ("wide-200k.png", (200_000, 1), "resizing"), ("wide-20k.png", (20_000, 2), "resizing")]:
        Image.new("L", size, 128).save(root / name)
        refused[name] = why
    for name, data in [("big16-13000.png", png_header(13000, 13000, 16)), ("bomb.png", png_header(100_000, 100_000)),
                       ("rgba-6000.png", png_header(6000, 6000, 8, 6)), ("rgb16-8000.png", png_header(8000, 8000, 16, 2))]:
        (root / name).write_bytes(data)
        refused[name] = "budget"
    jpeg_claiming(root / "sof-65000.jpg", 65000, 65000)
    refused["sof-65000.jpg"] = "bomb"
    os.mkfifo(root / "fifo.png")
    refused["fifo.png"] = "FIFO"
    (root / "zero.png").symlink_to("/dev/zero")
    refused["zero.png"] = "a device"
    (root / "empty.png").write_bytes(b"")
    refused["empty.png"] = "not an image"
    (root / "text.jpg").write_text("not a JPEG\n")
    refused["text.jpg"] = "not an image"
    photo(root / "whole.jpg", (300, 200))
    (root / "truncated.jpg").write_bytes((root / "whole.jpg").read_bytes()[:400])
    (root / "whole.jpg").unlink()
    refused["truncated.jpg"] = "truncated"
    Image.fromarray(np.full((8, 8), np.nan, np.float32), mode="F").save(root / "nan.tif")
    refused["nan.tif"] = "NaN"
    Image.fromarray(np.full((8, 8), 300.0, np.float32), mode="F").save(root / "float300.tif")
    refused["float300.tif"] = "[0, 1]"
    (root / "bad-png.png").write_bytes(png_header(64, 64)[:40] + b"garbage" * 10)
    refused["bad-png.png"] = ""
    classified = ["wide32.tif", "deep16-4000.png", "photo.jpg", "photo.png", "huge-108mp.jpg"]
    values = np.linspace(0, 4_000_000, 128 * 96).reshape(96, 128).astype(np.int32)
    Image.fromarray(values, mode="I").save(root / "wide32.tif")
    Image.fromarray(np.tile(np.arange(4000, dtype=np.uint16) * 16, (4000, 1))).save(root / "deep16-4000.png")
    photo(root / "photo.jpg"), photo(root / "photo.png")
    script = "from PIL import Image; Image.new('RGB', (12000, 9000), (40, 90, 160)).save({!r}, quality=85)"
    subprocess.run([sys.executable, "-c", script.format(str(root / "huge-108mp.jpg"))], check=True, timeout=120)
    return classified, refused


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="FIFOs, /dev/zero and ru_maxrss in kB")
def test_twenty_hostile_files_in_one_run_stay_within_half_a_gb_and_each_is_reported(tmp_path, model_dir) -> None:
    """The hostile files (a 108-megapixel JPEG, 16-bit 4000x4000, FIFOs, /dev/zero, ...) may
    add at most 512 MB to the peak of the same command on one plain photo (which is mostly
    torch's, transformers' and the engine's libraries)."""
    classified, refused = hostile_folder(tmp_path / "in")
    assert len(refused) + len(classified) - 2 == 20  # 20 hostile files and 2 plain photos
    (tmp_path / "plain").mkdir()
    shutil.copy(tmp_path / "in" / "photo.jpg", tmp_path / "plain" / "photo.jpg")
    output = tmp_path / "out.json"

    def peak_of_predict(folder: Path, out: Path) -> tuple[int, int, str]:
        command = [sys.executable, "-m", "cvt", "predict", str(model_dir), str(folder), "--format", "json",
                   "--output", str(out), "--engine", "torch"]
        runner = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, "
                  "text=True); print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
                  "print(done.stderr, file=sys.stderr)")
        done = subprocess.run([sys.executable, "-c", runner, *command], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": SRC})
        status, peak_kb = map(int, done.stdout.split())
        return status, peak_kb, done.stderr

    _, baseline_kb, _ = peak_of_predict(tmp_path / "plain", tmp_path / "plain.json")
    status, peak_kb, stderr = peak_of_predict(tmp_path / "in", output)
    assert status == 1 and "Traceback" not in stderr, stderr
    print(f"peak resident memory of cvt predict: {peak_kb / 1024:.0f} MB, on one photo {baseline_kb / 1024:.0f} MB")
    assert peak_kb - baseline_kb < 512 * 1024, f"{peak_kb / 1024:.0f} MB against {baseline_kb / 1024:.0f} MB"
    records = {Path(r["path"]).name: r for r in json.loads(output.read_text())}
    assert set(records) == set(classified) | set(refused)
    for name in classified:
        assert len(records[name].get("predictions", [])) == 5 and "error" not in records[name], records[name]
    for name, why in refused.items():
        assert why in records[name]["error"], (name, records[name])
        assert f"{name}: " in stderr
    assert f"{len(refused)} of {len(refused) + len(classified)} files could not be classified" in stderr
