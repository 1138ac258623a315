"""`cvt.load`: the model a checkpoint holds, exactly a classifier or a backbone, whoever saved it
(cvt, transformers, the original code), each file read once; the CLI and the pipeline use it."""

from __future__ import annotations

import pytest
import torch
import transformers

import cvt
from cvt import CvtForImageClassification, CvtModel
from cvt.checkpoints import read
from conftest import randomise_, tiny_config

HF_FIELDS = dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], num_labels=4)


def outputs(model, x):
    with torch.no_grad():
        out = model(x, return_dict=True)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture
def reads(monkeypatch):
    """How often each weights file and config.json is read while the test runs."""
    counts: dict[str, int] = {}

    def counted(function):
        def wrapper(path, *args, **kwargs):
            counts[str(path)] = counts.get(str(path), 0) + 1
            return function(path, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(read, "read_state_dict", counted(read.read_state_dict))
    monkeypatch.setattr(read, "read_config", counted(read.read_config))
    return counts


@pytest.mark.parametrize("saver", ["cvt", "transformers"])
@pytest.mark.parametrize("model_class", [CvtForImageClassification, CvtModel])
def test_load_returns_what_the_checkpoint_holds(saver, model_class, tmp_path, reads):
    if saver == "cvt":
        saved = randomise_(model_class(tiny_config()), 0).eval()
    else:
        hf_class = getattr(transformers, model_class.__name__)
        saved = randomise_(hf_class(transformers.CvtConfig(**HF_FIELDS)), 0).eval()
    saved.save_pretrained(tmp_path)
    model = cvt.load(tmp_path)
    assert type(model) is model_class and not model.training
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(outputs(model, x), outputs(saved, x), atol=1e-5, rtol=0)
    assert reads and set(reads.values()) == {1}, reads  # every file read once


def test_original_checkpoint_loads_as_the_classifier_it_is(testdata):
    path = testdata / "tiny_dwbn" / "original_state_dict.pth"
    model = cvt.load(path, num_heads=[1, 2, 3])  # (a width of 16 does not say its head count)
    assert type(model) is CvtForImageClassification
    x = torch.load(testdata / "tiny_dwbn" / "input.pt", weights_only=True)
    want = torch.load(testdata / "tiny_dwbn" / "logits.pt", weights_only=True)
    got = outputs(model, x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_backbone_is_never_given_a_random_head(tmp_path):
    randomise_(CvtModel(tiny_config()), 0).save_pretrained(tmp_path)
    with pytest.raises(cvt.InvalidValueError, match="backbone without a classification head"):
        cvt.pipeline("image-classification", tmp_path, image_processor=cvt.CvtImageProcessor(size=64),
                     engine="torch")


def test_load_takes_from_pretrained_arguments(tmp_path):
    randomise_(CvtForImageClassification(tiny_config()), 0).save_pretrained(tmp_path)
    model = cvt.load(tmp_path, hidden_act="quick_gelu", local_files_only=True)
    assert model.config.hidden_act == "quick_gelu"
    with pytest.raises(TypeError, match="colour"):  # neither a config field nor a loading argument
        cvt.load(tmp_path, colour="red")
