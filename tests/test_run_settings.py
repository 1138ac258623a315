"""cvt.RunSettings: how a model runs, one frozen object checked once when made, which the command
line builds from its options and hands to predict and eval, and from which every run of a model
resolves its preprocessing in one place."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from PIL import Image
from skimage import data as skimage_data

import cvt
import cvt.predict
import cvt.training.scoring
from cvt.cli import main
from cvt.errors import InvalidValueError
from conftest import save_tiny_classifier

SRC = Path(cvt.__file__).parent


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("tiny-classifier"))


def test_settings_are_frozen_and_replace_gives_a_checked_copy() -> None:
    settings = cvt.RunSettings(top_k=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.top_k = 0
    assert settings.replace(engine="torch") == cvt.RunSettings(top_k=3, engine="torch")
    assert settings.top_k == 3  # unchanged
    with pytest.raises(InvalidValueError, match="batch_size must be a positive integer, got 0"):
        settings.replace(batch_size=0)


@pytest.mark.parametrize("bad, field", [
    ({"engine": "tensorrt"}, "engine"), ({"precision": "int4"}, "precision"),
    ({"batch_size": 0}, "batch_size"), ({"batch_size": "8"}, "batch_size"), ({"top_k": True}, "top_k"),
    ({"top_k": -1}, "top_k"), ({"image_size": 0}, "image_size"), ({"image_size": 5000}, "image_size"),
])
def test_a_bad_setting_is_refused_when_made_naming_it(bad, field) -> None:
    with pytest.raises(InvalidValueError, match=field):
        cvt.RunSettings(**bad)


def test_split_keeps_the_options_that_are_not_settings() -> None:
    settings, rest = cvt.RunSettings.split(cvt.RunSettings(engine="torch"), {"top_k": 2, "revision": "main"})
    assert settings == cvt.RunSettings(engine="torch", top_k=2)
    assert rest == {"revision": "main"}


def test_the_pipeline_runs_as_its_settings_say(folder) -> None:
    default = cvt.pipeline("image-classification", folder, device="cpu", engine="torch")
    assert default.settings == cvt.RunSettings(device="cpu", engine="torch")
    given = cvt.RunSettings(engine="torch", top_k=2, device="cpu", image_size=48)
    pipe = cvt.pipeline("image-classification", folder, settings=given, batch_size=3)
    assert pipe.settings == given.replace(batch_size=3)
    assert (pipe.top_k, pipe.batch_size, pipe.image_processor.size, pipe.engine.name) == (2, 3, 48, "torch")
    assert len(pipe(Image.fromarray(skimage_data.chelsea()))) == 2


def test_an_image_size_unlike_the_given_processor_is_refused(folder) -> None:
    processor = cvt.CvtImageProcessor.from_pretrained(folder)
    with pytest.raises(InvalidValueError, match="image_size 32 differs from the image processor's size"):
        cvt.pipeline("image-classification", folder, image_processor=processor, image_size=32)


def test_cvt_predict_hands_predict_one_settings_object(monkeypatch, folder, tmp_path) -> None:
    received = []

    def run(model, inputs, settings, **rest):
        received.append(settings)
        return 0

    monkeypatch.setattr(cvt.predict, "run", run)
    argv = ["predict", str(folder), str(tmp_path), "--top-k", "3", "--batch-size", "2", "--engine", "torch",
            "--precision", "bf16", "--device", "cpu", "--image-size", "48"]
    assert main(argv) == 0
    assert received == [cvt.RunSettings(top_k=3, batch_size=2, engine="torch", precision="bf16", device="cpu",
                                        image_size=48)]
    assert main(["predict", str(folder), str(tmp_path)]) == 0
    assert received[1] == cvt.RunSettings()  # the command line's defaults are the settings'


def test_cvt_eval_hands_scoring_one_settings_object(monkeypatch, folder, tmp_path, capsys) -> None:
    received = []

    def evaluate_model(model, data, settings, workers):
        received.append(settings)
        raise InvalidValueError("recorded")

    monkeypatch.setattr(cvt.training.scoring, "evaluate_model", evaluate_model)
    assert main(["eval", "--model", str(folder), "--data", str(tmp_path), "--engine", "torch"]) == 2
    assert received == [cvt.RunSettings(engine="torch", batch_size=64)]
    assert "recorded" in capsys.readouterr().err


def _calls_for_model(path: Path) -> bool:
    return any(isinstance(node, ast.Attribute) and node.attr == "for_model"
               for node in ast.walk(ast.parse(path.read_text())))


def test_one_module_resolves_the_preprocessing_a_model_runs_with() -> None:
    """`CvtImageProcessor.for_model` is called for a run of a model in cvt.inference alone (its
    `processor_for`); the other callers prepare training, draw attention or save a processor."""
    callers = {path.relative_to(SRC).as_posix() for path in SRC.rglob("*.py") if _calls_for_model(path)}
    assert callers == {"inference/__init__.py", "training/trainer.py", "cli/attention.py", "cli/models.py"}
