"""What a model name means, read one way (`cvt.checkpoints.hub.locate`) by every command and by Python:
a folder or file first, then a variant name (its published weights, like the hub id
microsoft/cvt-13), then a hub id. Random weights are asked for (`--from-scratch`). A hub that
cannot be reached (HF_HUB_OFFLINE, or an endpoint that never answers) is reported quickly and
clearly, never retried for half a minute nor mistaken for a missing file."""

from __future__ import annotations

import socket
import time

import pytest
import torch
from huggingface_hub import constants

import cvt
from cvt.checkpoints import hub as names
from cvt.cli import main
from cvt.training import load_model

from conftest import TINY_LABELS, make_folder, original_layout, save_tiny_classifier, tiny_config

HUB_NAMES = ["cvt-13", "microsoft/cvt-13", "someone/cvt-custom"]


@pytest.fixture
def hub(monkeypatch, tmp_path, request):
    """An empty hub cache and a hub that is either switched off or never answers."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    if request.param == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        yield "HF_HUB_OFFLINE"
        return
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections complete in the kernel; nothing ever answers
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    yield "did not answer"
    silent.close()


@pytest.fixture
def images(tmp_path):
    return make_folder(tmp_path / "images", classes=TINY_LABELS[:3], per_class=2)


def commands(name: str, images, tmp_path) -> dict[str, list[str]]:
    return {
        "predict": ["predict", name, str(images)],
        "export": ["export", name, str(tmp_path / "model.onnx")],
        "eval": ["eval", "--model", name, "--data", str(images), "--workers", "0"],
        "train": ["train", "--model", name, "--data", str(images), "--output-dir",
                  str(tmp_path / "run"), "--epochs", "1", "--workers", "0", "--batch-size", "2"],
    }


@pytest.mark.parametrize("hub", ["offline", "silent endpoint"], indirect=True)
@pytest.mark.parametrize("name", HUB_NAMES)
def test_an_unreachable_hub_is_reported_quickly_by_every_command(hub, name, images, tmp_path, capsys):
    for command, argv in commands(name, images, tmp_path).items():
        start = time.perf_counter()
        assert main(argv) == 2, command
        elapsed = time.perf_counter() - start
        err = capsys.readouterr().err
        assert "hub cannot be reached" in err and hub in err and name.split("/")[-1] in err, (command, err)
        assert "Traceback" not in err and elapsed < 10, (command, elapsed)
    start = time.perf_counter()
    with pytest.raises(cvt.CheckpointError, match="hub cannot be reached"):
        cvt.pipeline("image-classification", name)
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "run" / "best").exists() and not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("hub", ["offline"], indirect=True)
def test_a_variant_name_means_the_published_model_everywhere(hub, tmp_path, capsys):
    """Its architecture and preprocessing are known without the hub; its weights are the
    published ones (so they need the hub), unless random weights are asked for explicitly."""
    for name in ("cvt-13-384", "microsoft/cvt-13-384"):
        assert names.locate(name) == names.Location("hub", "microsoft/cvt-13-384", cvt.get_variant("cvt-13-384"))
        assert cvt.CvtImageProcessor.from_pretrained(name).size == 384
        assert main(["info", name]) == 0 and "cvt-13-384" in capsys.readouterr().out
    model = load_model("cvt-13", ["a", "b"], from_scratch=True)
    assert model.config.depth == (1, 2, 10) and model.config.num_labels == 2
    assert cvt.create_model("cvt-13").config.depth == (1, 2, 10)  # timm's pretrained=False default


@pytest.mark.parametrize("hub", ["offline"], indirect=True)
def test_folder_and_weights_file_work_offline_in_every_command(hub, images, tmp_path, capsys):
    folder = save_tiny_classifier(tmp_path / "folder", image_size=64)
    files = sorted(images.rglob("*.png"))
    by_pipeline = cvt.pipeline("image-classification", folder, engine="torch")(files, top_k=1)
    assert main(["predict", str(folder), str(images), "--format", "csv", "--top-k", "1",
                 "--engine", "torch"]) == 0
    out = capsys.readouterr().out
    for (prediction,), path in zip(by_pipeline, files):
        assert f"{path},1,{prediction['label']}," in out
    assert main(["eval", "--model", str(folder), "--data", str(images), "--workers", "0",
                 "--engine", "torch"]) == 0
    original = tmp_path / "original.pth"  # microsoft/CvT's own layout: no preprocessing with it
    small = cvt.CvtForImageClassification(tiny_config(embed_dim=(64, 128, 192), depth=(1, 1, 1)))
    torch.save(original_layout(small.state_dict()), original)  # widths / 64 give the head counts
    assert main(["predict", str(original), str(images), "--engine", "torch"]) == 2
    assert "carries no preprocessing" in capsys.readouterr().err
    assert main(["predict", str(original), str(images), "--engine", "torch", "--image-size", "64"]) == 0
    assert main(["info", str(folder)]) == 0 and "64x64" in capsys.readouterr().out
    scratch = load_model(str(folder), list(TINY_LABELS), from_scratch=True)
    kept = load_model(str(folder), list(TINY_LABELS))
    architecture = lambda config: {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
    assert architecture(scratch.config) == architecture(kept.config)
    fresh = scratch.state_dict()
    assert all(not torch.equal(value, fresh[key]) for key, value in kept.state_dict().items()
               if key.endswith("projection.weight"))  # the architecture only, not the weights


def test_every_writer_saves_the_preprocessing_it_knows(tmp_path):
    """A variant built by create_model, and any model loaded from a folder (PyTorch or
    TensorFlow), saves its preprocessing with its weights, so predict runs the folder as is."""
    made = cvt.create_model("cvt-13-384", depth=(1, 1, 1), embed_dim=(16, 32, 48), num_heads=(1, 2, 3))
    made.save_pretrained(tmp_path / "made")
    assert cvt.CvtImageProcessor.from_pretrained(tmp_path / "made") == cvt.CvtImageProcessor.from_pretrained("cvt-13-384")
    folder = save_tiny_classifier(tmp_path / "folder", image_size=96)
    cvt.CvtForImageClassification.from_pretrained(folder).save_pretrained(tmp_path / "again")
    assert cvt.CvtImageProcessor.from_pretrained(tmp_path / "again").size == 96
    tf_model = cvt.TFCvtForImageClassification.from_pretrained(folder)
    tf_model.save_pretrained(tmp_path / "tf")
    assert cvt.CvtImageProcessor.from_pretrained(tmp_path / "tf").size == 96
