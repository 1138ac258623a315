"""`cvt predict`: a folder of good and bad files gives a result for every good image, one error line
for each bad one and a non-zero exit. The formats parse, and nothing the user passed is modified."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data
from sklearn.datasets import load_sample_image

import cvt
from cvt.cli import main
from conftest import TINY_LABELS, original_layout, save_tiny_classifier

GOOD = ("chelsea.jpg", "sub/coffee.png", "sub/deeper/china.JPEG", "rgba.png")
BAD = {"corrupt.jpg": "truncated image file", "text.png": "not an image file"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny checkpoint whose default engine is built (and cached) before the tests run, so
    that each `cvt predict` below prints only its results and errors."""
    folder = save_tiny_classifier(tmp_path_factory.mktemp("model"))
    cvt.pipeline("image-classification", str(folder))
    return folder


@pytest.fixture()
def photos(tmp_path) -> Path:
    """Good photographs (JPEG, PNG, RGBA PNG, in subfolders), a corrupt JPEG, a text file named
    .png, and files that are not picked up: notes.txt and a hidden macOS ._ file."""
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(skimage_data.chelsea()).save(root / "chelsea.jpg")
    Image.fromarray(skimage_data.coffee()).save(root / "sub" / "coffee.png")
    Image.fromarray(load_sample_image("china.jpg")).save(root / "sub" / "deeper" / "china.JPEG")
    rgba = np.dstack([skimage_data.astronaut(), np.tile(np.arange(512, dtype=np.uint8)[:, None] // 2, 512)])
    Image.fromarray(rgba).save(root / "rgba.png")
    jpeg = (root / "chelsea.jpg").read_bytes()
    (root / "corrupt.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "text.png").write_text("this is text, not a PNG\n")
    (root / "notes.txt").write_text("not an image, not picked up\n")
    (root / "._chelsea.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    return root


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def predict(capsys, *args) -> tuple[int, str, str]:
    status = main(["predict", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def test_every_good_image_gets_a_result_and_each_bad_file_one_error_line(model_dir, photos, capsys) -> None:
    before = snapshot(photos)
    status, out, err = predict(capsys, model_dir, photos, "--top-k", "2")
    assert status == 1
    table = out.splitlines()
    assert table[0].split() == ["image", "score", "label"]
    for name in GOOD:  # a path line with the top label, then one more label
        row = next(i for i, line in enumerate(table) if line.startswith(str(photos / name)))
        assert re.fullmatch(r"\s+0\.\d{4}  .+", table[row + 1])
        assert table[row].split("  ")[-1] in TINY_LABELS
    assert len(table) == 1 + 2 * len(GOOD)
    errors = [line for line in err.splitlines() if line.startswith("cvt: error: ")]
    assert len(errors) == len(BAD)
    for name, reason in BAD.items():
        assert any(line.startswith(f"cvt: error: {photos / name}: {reason}") for line in errors), err
    assert f"cvt: {len(BAD)} of {len(GOOD) + len(BAD)} files could not be classified" in err
    assert "notes.txt" not in out + err and "._chelsea" not in out + err
    assert snapshot(photos) == before  # nothing the user passed is modified


def test_json_holds_the_pipelines_top_k_for_each_image_and_the_errors(model_dir, photos, capsys) -> None:
    status, out, _ = predict(capsys, model_dir, photos, "--format", "json", "--top-k", "3")
    assert status == 1
    records = {record["path"]: record for record in json.loads(out)}
    assert set(records) == {str(photos / n) for n in (*GOOD, *BAD)}
    classifier = cvt.pipeline("image-classification", model=model_dir, top_k=3)
    for name in GOOD:
        predictions = records[str(photos / name)]["predictions"]
        scores = [p["score"] for p in predictions]
        assert len(predictions) == 3 and {p["label"] for p in predictions} <= set(TINY_LABELS)
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
        expected = classifier(photos / name)
        assert [p["label"] for p in predictions] == [p["label"] for p in expected]
        # softmax / sigmoid scores: 1 is their scale
        np.testing.assert_allclose(scores, [p["score"] for p in expected], atol=1e-6)
    for name, reason in BAD.items():
        assert records[str(photos / name)]["error"].startswith(reason)


def test_csv_to_an_output_file(model_dir, photos, tmp_path, capsys) -> None:
    output = tmp_path / "results.csv"
    output.write_text("an older result, replaced\n")
    status, out, err = predict(capsys, model_dir, photos / "chelsea.jpg", photos / "text.png",
                               "--format", "csv", "--top-k", "2", "--batch-size", "1", "--output", output)
    assert status == 1
    assert out == f"wrote csv results for 1 of 2 files to {output} (1 could not be classified)\n"
    rows = list(csv.DictReader(output.open(newline="")))
    assert [(r["path"], r["rank"]) for r in rows] == [
        (str(photos / "chelsea.jpg"), "1"), (str(photos / "chelsea.jpg"), "2"), (str(photos / "text.png"), "")]
    assert float(rows[0]["score"]) >= float(rows[1]["score"]) and rows[0]["label"] in TINY_LABELS
    assert rows[2]["error"].startswith("not an image file")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".results")] == []  # no temporary left


def test_all_good_exits_zero(model_dir, photos, capsys) -> None:
    status, out, err = predict(capsys, model_dir, photos / "chelsea.jpg", photos / "rgba.png", "--top-k", "1")
    assert status == 0 and err == ""
    assert len(out.splitlines()) == 3


@pytest.mark.parametrize("args, message", [
    (["{photos}/missing.jpg"], "missing.jpg: no such file or folder"),
    (["{photos}/sub/deeper", "{empty}"], None),  # fine: one folder has an image
    (["{empty}"], "no image files in"),
    (["{photos}", "--top-k", "0"], "top_k must be a positive integer"),
    (["{photos}", "--batch-size", "0"], "batch_size must be a positive integer"),
    (["{photos}", "--device", "tpu"], "unknown device 'tpu'"),
    (["{photos}", "--output", "{photos}/chelsea.jpg"], "is one of the input images"),
])
def test_mistakes_are_one_line_and_exit_2(model_dir, photos, tmp_path, capsys, args, message) -> None:
    (tmp_path / "empty").mkdir()
    before = snapshot(photos)
    status, out, err = predict(capsys, model_dir, *[a.format(photos=photos, empty=tmp_path / "empty")
                                                    for a in args])
    if message is None:
        assert status == 0 and "china.JPEG" in out
        return
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("cvt: error: ") and message in err
    assert snapshot(photos) == before


def test_a_model_folder_without_preprocessing_is_a_clear_error(photos, tmp_path, capsys) -> None:
    cvt.CvtForImageClassification(cvt.CvtConfig(embed_dim=(16, 32, 48), num_heads=(1, 2, 3),
                                                 depth=(1, 1, 1))).save_pretrained(tmp_path)
    status, _, err = predict(capsys, tmp_path, photos)
    assert status == 2 and "has no preprocessor_config.json" in err


@pytest.mark.subprocess
def test_the_installed_command_no_traceback_no_progress_bar_off_a_terminal(model_dir, photos) -> None:
    done = subprocess.run([sys.executable, "-m", "cvt", "predict", str(model_dir), str(photos),
                           "--format", "json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert len(json.loads(done.stdout)) == len(GOOD) + len(BAD)
    assert "Traceback" not in done.stderr and "\r" not in done.stderr and "it/s" not in done.stderr
    assert all(line.startswith("cvt: ") for line in done.stderr.splitlines()), done.stderr


@pytest.mark.slow  # a full-size CvT-13
def test_a_converted_variant_carries_its_preprocessing_into_predict(photos, tmp_path, capsys) -> None:
    """`cvt convert --model cvt-13-384` writes the variant's preprocessor_config.json, so
    `cvt predict` on the folder warps to 384 and names ImageNet classes."""
    model = cvt.create_model("cvt-13-384")
    torch.save(original_layout(model.state_dict()), tmp_path / "CvT-13-384x384-IN-1k.pth")
    out = tmp_path / "cvt-13-384"
    assert main(["convert", str(tmp_path / "CvT-13-384x384-IN-1k.pth"), str(out), "--model", "cvt-13-384"]) == 0
    assert cvt.CvtImageProcessor.from_pretrained(out) == cvt.CvtImageProcessor.from_pretrained("cvt-13-384")
    capsys.readouterr()
    status, table, _ = predict(capsys, out, photos / "chelsea.jpg", "--top-k", "1")
    assert status == 0 and table.splitlines()[1].split("  ")[-1] in cvt.imagenet_1k_labels()
