"""timm's model interface, which detectors, segmentation heads and feature extractors call:
forward_features / forward_head / reset_classifier / forward_intermediates, create_model's
num_classes / in_chans / features_only; then torch.export and torch.compile against eager. (The
checks timm runs on every model it ships run on every architecture in test_every_architecture.py.)"""

from __future__ import annotations

import copy

import pytest
import torch

import cvt
from conftest import assert_close_to_scale, assert_gradients_close, randomise_, tiny_config
from cvt.modeling.factory import CvtFeatures

TINY = {f: getattr(tiny_config(), f) for f in ("embed_dim", "num_heads", "depth")}  # on CvT-13's other fields


def tiny_classifier(seed: int = 0, **overrides) -> cvt.CvtForImageClassification:
    return randomise_(cvt.CvtForImageClassification(tiny_config(**overrides)), seed).eval()


@pytest.mark.parametrize("cls_token", [(False, False, True), (False, False, False)])
@torch.no_grad()
def test_forward_head_of_forward_features_is_the_logits(cls_token):
    model = tiny_classifier(cls_token=cls_token)
    x = torch.randn(2, 3, 64, 64)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 16 + cls_token[-1], 48)  # a 4x4 grid (+ the cls token, first)
    assert_close_to_scale(model.forward_head(tokens), model(x).logits, rel=1e-6)
    pooled = model.forward_head(tokens, pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    expected = tokens[:, 0] if cls_token[-1] else tokens.mean(1)
    torch.testing.assert_close(pooled, expected)
    # the backbone alone: the same tokens before the final norm, pooled the same way
    backbone_tokens = model.cvt.forward_features(x)
    torch.testing.assert_close(model.layernorm(backbone_tokens), tokens)
    assert model.cvt.num_classes == 0 and model.cvt.num_features == 48
    torch.testing.assert_close(model.cvt.forward_head(backbone_tokens),
                               backbone_tokens[:, 0] if cls_token[-1] else backbone_tokens.mean(1))


@torch.no_grad()
def test_reset_classifier():
    model = tiny_classifier()
    x = torch.randn(2, 3, 64, 64)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model.config.num_labels == 0
    torch.testing.assert_close(model(x).logits, pooled)
    model.reset_classifier(7)
    assert model(x).logits.shape == (2, 7) and model.cvt.config.num_labels == 7
    assert model.config.id2label[6] == "LABEL_6"
    with pytest.raises(ValueError, match="backbone without a classifier"):
        model.cvt.reset_classifier(3)
    with pytest.raises(ValueError, match="non-negative"):
        model.reset_classifier(-1)


@torch.no_grad()
def test_forward_intermediates():
    model = tiny_classifier()
    x = torch.randn(1, 3, 80, 64)
    final, maps = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
    hidden = model(x, output_hidden_states=True).hidden_states
    for got, want in zip(maps, hidden, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    only = model.forward_intermediates(x, indices=2, intermediates_only=True)  # the last two
    assert [m.shape[1] for m in only] == [32, 48]
    only = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
    assert [tuple(m.shape) for m in only] == [(1, 16, 20, 16), (1, 48, 5, 4)]
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[3])
    with pytest.raises(ValueError, match="last 4 stages"):
        model.forward_intermediates(x, indices=4)


@torch.no_grad()
def test_create_model_features_only():
    features = cvt.create_model("cvt-13", features_only=True, out_indices=(1, 2), **TINY)
    assert isinstance(features, CvtFeatures)
    assert features.feature_info.channels() == [32, 48]
    assert features.feature_info.reduction() == [8, 16]
    assert features.feature_info.module_name() == ["cvt.encoder.stages.1", "cvt.encoder.stages.2"]
    maps = features.eval()(torch.randn(2, 3, 96, 128))
    assert [tuple(m.shape) for m in maps] == [(2, 32, 12, 16), (2, 48, 6, 8)]
    assert all(key.startswith("cvt.encoder.") for key in features.state_dict())


def test_create_model_num_classes_and_in_chans():
    model = cvt.create_model("cvt-13", num_classes=0, in_chans=1, **TINY).eval()
    assert model.num_classes == 0 and model.config.num_channels == 1
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).logits.shape == (1, 48)
    with pytest.raises(ValueError, match="num_channels values must be positive"):
        cvt.create_model("cvt-13", in_chans=0, **TINY)
    with pytest.raises(ValueError, match="in_chans must be a positive"):
        model.adapt_input_channels(0)


@pytest.mark.parametrize("in_chans", [1, 2, 6, 7])
@torch.no_grad()
def test_adapt_input_channels_keeps_what_the_weights_compute(in_chans):
    """Summing over RGB answers a grey image as the RGB model answers it repeated in every
    channel; repeating and rescaling answers channels that repeat the RGB ones the same way."""
    model = tiny_classifier()
    adapted = copy.deepcopy(model)
    adapted.adapt_input_channels(in_chans)
    assert adapted.config.num_channels == in_chans == adapted.cvt.config.num_channels
    rgb = torch.randn(2, 3, 64, 64)
    if in_chans == 1:
        grey = rgb[:, :1]
        x, reference = grey, grey.expand(-1, 3, -1, -1)
    else:
        x = rgb.repeat(1, 3, 1, 1)[:, :in_chans]
        # each trained channel c is seen (in_chans // 3 or one more) times at scale 3 / in_chans
        counts = torch.tensor([len(range(c, in_chans, 3)) for c in range(3)], dtype=rgb.dtype)
        reference = rgb * (counts * 3 / in_chans).view(1, 3, 1, 1)
    assert_close_to_scale(adapted(x).logits, model(reference).logits, rel=1e-5)


def test_checkpoint_of_another_variant_is_refused(tmp_path):
    cvt.create_model("cvt-13", **TINY).save_pretrained(tmp_path)
    with pytest.raises(cvt.CheckpointError, match="architecture is not cvt-21's"):
        cvt.create_model("cvt-21", checkpoint_path=str(tmp_path))


# ------------------------------------------------------------------------------ export, compile
def _compile_model() -> cvt.CvtForImageClassification:
    """A tiny model with no random dropping, so compiled and eager runs can be compared."""
    return tiny_classifier(seed=3, depth=(1, 1, 1), drop_path_rate=(0.0, 0.0, 0.0))


@pytest.mark.slow
def test_torch_export_dynamic_batch_and_size():
    """Any batch and any height and width from 35 to 1024 pixels in one exported graph (below
    35 the last stage's key/value grid is one pixel, which the graph would specialise)."""
    model = _compile_model()
    batch = torch.export.Dim("batch", min=1, max=256)
    height = torch.export.Dim("height", min=35, max=1024)
    width = torch.export.Dim("width", min=35, max=1024)
    program = torch.export.export(
        model, (torch.randn(2, 3, 64, 64),), kwargs={"return_dict": False},
        dynamic_shapes={"pixel_values": {0: batch, 2: height, 3: width}, "return_dict": None})
    exported = program.module()
    with torch.no_grad():
        for shape in [(1, 3, 35, 35), (3, 3, 96, 80), (2, 3, 200, 131)]:
            x = torch.randn(shape)
            assert_close_to_scale(exported(x, return_dict=False)[0], model(x).logits, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torch_compile_fullgraph_equals_eager(train):
    """Inductor (C++ kernels on CPU) with no graph break; in training mode the gradients and
    the BatchNorm running statistics match too."""
    eager = _compile_model().train(train)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.set_grad_enabled(train):
        got, want = compiled(x).logits, eager(x).logits
    assert_close_to_scale(got, want, rel=1e-5)
    if train:
        got.square().mean().backward()
        want.square().mean().backward()
        assert_gradients_close({n: p.grad for n, p in compiled_model.named_parameters()},
                               {n: p.grad for n, p in eager.named_parameters()}, rel=1e-5)
        for a, b in zip(compiled_model.buffers(), eager.buffers()):
            assert_close_to_scale(a, b, rel=1e-5)
