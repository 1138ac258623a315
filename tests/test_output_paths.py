"""Where commands write: every output is checked before anything is written, and never lands on
what the command reads (an input image, the model's weights or its folder) or in a folder cvt
did not make for it (the demo's data/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvt import cli

from conftest import one_line_error, save_tiny_classifier, write_images


def contents(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["data", "best", "curves.png"])
def test_the_demo_checks_its_outputs_before_writing_anything(tmp_path, capsys, monkeypatch, name) -> None:
    """An existing data/ got the 1,797 digit images mixed into it, then was trained on."""
    monkeypatch.setattr("cvt.training.demo.train", lambda *a, **k: pytest.fail("the demo trained"))
    out = tmp_path / "demo"
    theirs = out / name / "notes.txt" if name in ("data", "best") else out / name
    theirs.parent.mkdir(parents=True)
    theirs.write_text("the user's")
    line = one_line_error(capsys, ["demo", "--output-dir", str(out)])
    assert f"already holds {name}, which the demo writes" in line
    assert sorted(out.rglob("*")) == sorted([theirs, *theirs.parents[:len(theirs.relative_to(out).parts) - 1]])
    assert theirs.read_text() == "the user's"


@pytest.fixture()
def model_and_images(tmp_path) -> tuple[Path, Path]:
    return save_tiny_classifier(tmp_path / "model"), write_images(tmp_path / "images", count=3)


@pytest.mark.parametrize("target", ["model.safetensors", "config.json", "results.json"])
def test_predict_never_writes_into_the_model_folder_it_reads(model_and_images, capsys, target) -> None:
    model, images = model_and_images
    before = contents(model)
    line = one_line_error(capsys, ["predict", str(model), str(images), "--format", "json",
                                   "--output", str(model / target)])
    assert f"is in the model folder {model}, which this run reads" in line
    assert contents(model) == before


def test_predict_never_writes_over_the_weights_file_it_reads(model_and_images, capsys) -> None:
    model, images = model_and_images
    weights = model / "model.safetensors"
    before = weights.read_bytes()
    line = one_line_error(capsys, ["predict", str(weights), str(images), "--image-size", "64", "--format",
                                   "jsonl", "--output", str(weights)])
    assert "is the model's weights file, which this run reads" in line
    assert weights.read_bytes() == before


def test_predict_and_attention_never_write_over_an_input_image(model_and_images, capsys, tmp_path) -> None:
    model, images = model_and_images
    image = next(images.rglob("*.png"))
    before = image.read_bytes()
    for argv in (["predict", str(model), str(images), "--format", "csv", "--output", str(image)],
                 ["attention", str(model), str(image), "--output", str(image)]):
        assert "is one of the input images and would be overwritten" in one_line_error(capsys, argv)
    assert image.read_bytes() == before
    assert cli.main(["predict", str(model), str(images), "--format", "json", "--output",
                     str(tmp_path / "results.json")]) == 0  # anywhere else is fine
