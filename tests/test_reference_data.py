"""The original microsoft/CvT code's outputs (../shared/testdata, see its README) reproduced:
QuickGELU for the original activation, exact GELU for transformers', square and non-square
inputs, every per-stage intermediate; plus the transformers copy and `cvt convert`."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import cvt
from cvt.checkpoints import convert
from cvt.cli import main as cli_main
from conftest import assert_close_to_scale

REL = 1e-5  # of the values' scale: float32 rounding scales with them
MODELS = ["tiny_dwbn", "tiny_avg"]
ACTIVATIONS = {"quick_gelu": "logits", "gelu": "logits_gelu"}


def load(testdata, name: str, name_suffix: str) -> torch.Tensor:
    return torch.load(testdata / name / f"{name_suffix}.pt", weights_only=True)


def original_model(testdata, name: str, hidden_act: str) -> cvt.CvtForImageClassification:
    spec = json.loads((testdata / name / "spec.json").read_text())
    return cvt.CvtForImageClassification.from_pretrained(
        testdata / name / "original_state_dict.pth", **{**convert.spec_fields(spec), "hidden_act": hidden_act})


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("hidden_act", ACTIVATIONS)
@pytest.mark.parametrize("shape", ["", "_nonsquare"])
def test_original_checkpoint_logits(testdata, name, hidden_act, shape) -> None:
    model = original_model(testdata, name, hidden_act)
    with torch.no_grad():
        logits = model(load(testdata, name, f"input{shape}")).logits
    assert_close_to_scale(logits, load(testdata, name, f"{ACTIVATIONS[hidden_act]}{shape}"), rel=REL)


@pytest.mark.parametrize("name", MODELS)
def test_original_intermediates(testdata, name) -> None:
    model = original_model(testdata, name, "quick_gelu")
    expected = load(testdata, name, "intermediates")
    captured = {}

    def save_embedding(stage):
        def hook(module, args, output):
            tokens, height, width = output
            captured[f"stage{stage}.patch_embed"] = tokens.transpose(1, 2).unflatten(2, (height, width))
        return hook

    for s, stage in enumerate(model.cvt.encoder.stages):
        stage.embedding.convolution_embeddings.register_forward_hook(save_embedding(s))
    model.classifier.register_forward_pre_hook(lambda m, args: captured.update(pre_logits=args[0]))
    with torch.no_grad():
        out = model.cvt(load(testdata, name, "input"), output_hidden_states=True)
        model(load(testdata, name, "input"))
    for s, hidden in enumerate(out.hidden_states):
        captured[f"stage{s}"] = hidden
    captured["stage2.cls_token_out"] = out.cls_token_value
    assert set(expected) <= set(captured), set(expected) - set(captured)
    for key, value in expected.items():
        assert_close_to_scale(captured[key], value, rel=REL, msg=key)


def test_transformers_copy_loads(testdata) -> None:
    """tiny_dwbn/hf (saved by transformers) loads with exact GELU and gives logits_gelu.pt."""
    model = cvt.CvtForImageClassification.from_pretrained(testdata / "tiny_dwbn" / "hf")
    assert model.config.hidden_act == "gelu"
    for shape in ("", "_nonsquare"):
        with torch.no_grad():
            logits = model(load(testdata, "tiny_dwbn", f"input{shape}")).logits
        assert_close_to_scale(logits, load(testdata, "tiny_dwbn", f"logits_gelu{shape}"), rel=REL)


def test_original_keys_map_onto_transformers_copy(testdata) -> None:
    """Renaming the original keys gives exactly the tensors transformers' converter produced."""
    from safetensors.torch import load_file

    original = torch.load(testdata / "tiny_dwbn" / "original_state_dict.pth", weights_only=True)
    renamed = convert.original_to_transformers(original)
    reference = load_file(testdata / "tiny_dwbn" / "hf" / "model.safetensors")
    assert renamed.keys() == reference.keys()
    for key, tensor in reference.items():
        assert torch.equal(renamed[key], tensor), key


def test_cli_convert_writes_a_folder_transformers_loads(testdata, tmp_path, capsys) -> None:
    out = tmp_path / "converted"
    status = cli_main(["convert", str(testdata / "tiny_dwbn" / "original_state_dict.pth"), str(out),
                       "--config", str(testdata / "tiny_dwbn" / "spec.json")])
    assert status == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "carries no preprocessing" in captured.err
    assert not (out / "preprocessor_config.json").exists()
    sized = tmp_path / "sized"  # --image-size: the folder carries CvT's preprocessing at that size
    assert cli_main(["convert", str(testdata / "tiny_dwbn" / "original_state_dict.pth"), str(sized),
                     "--config", str(testdata / "tiny_dwbn" / "spec.json"), "--image-size", "96"]) == 0
    assert cvt.CvtImageProcessor.from_pretrained(sized) == cvt.CvtImageProcessor(size=96)
    x = load(testdata, "tiny_dwbn", "input")
    theirs = transformers.CvtForImageClassification.from_pretrained(out).eval()
    with torch.no_grad():  # transformers always runs exact GELU
        assert_close_to_scale(theirs(x).logits, load(testdata, "tiny_dwbn", "logits_gelu"), rel=REL)
        ours = cvt.CvtForImageClassification.from_pretrained(out)  # keeps the original QuickGELU
        assert ours.config.hidden_act == "quick_gelu"
        assert_close_to_scale(ours(x).logits, load(testdata, "tiny_dwbn", "logits"), rel=REL)


def test_original_checkpoint_without_spec_needs_heads(testdata) -> None:
    """Widths 16/32/48 say nothing about the head count: a clear request for it."""
    with pytest.raises(cvt.CheckpointError, match="num_heads"):
        cvt.CvtForImageClassification.from_pretrained(testdata / "tiny_dwbn" / "original_state_dict.pth")
    model = cvt.CvtForImageClassification.from_pretrained(
        testdata / "tiny_dwbn" / "original_state_dict.pth", num_heads=[1, 2, 3])
    assert model.config.depth == (1, 2, 3) and model.config.num_labels == 10
    with torch.no_grad():
        logits = model(load(testdata, "tiny_dwbn", "input")).logits
    assert_close_to_scale(logits, load(testdata, "tiny_dwbn", "logits"), rel=REL)
