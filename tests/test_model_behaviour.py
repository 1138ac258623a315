"""Model behaviour: the named variants, the places where transformers' port is wrong done right,
outputs, losses and input errors (every architecture's forward, backward and save/load run in
test_every_architecture.py)."""

from __future__ import annotations

import pytest
import torch

import cvt
from cvt import CvtConfig, CvtForImageClassification, CvtModel
from cvt.modeling import DropPath
from conftest import assert_close_to_scale, randomise_, tiny_config


def test_list_models_names_the_published_checkpoints() -> None:
    assert {"cvt-13", "cvt-13-384", "cvt-13-384-22k", "cvt-21", "cvt-21-384", "cvt-21-384-22k",
            "cvt-w24-384-22k"} <= set(cvt.list_models())
    variant = cvt.get_variant("microsoft/cvt-13-384")
    assert variant.image_size == 384 and variant.hub_id == "microsoft/cvt-13-384"
    labels = cvt.imagenet_1k_labels()
    assert len(labels) == 1000 and labels[0] == "tench, Tinca tinca" and labels[281] == "tabby, tabby cat"
    with pytest.raises(ValueError, match="unknown CvT variant"):
        cvt.create_model("cvt-99")


def test_outputs_shapes_contiguity_and_tuples() -> None:
    model = CvtModel(tiny_config()).eval()
    x = torch.randn(1, 3, 64, 48)
    out = model(x, output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, 48, 4, 3) and out.last_hidden_state.is_contiguous()
    assert out.cls_token_value.shape == (1, 1, 48)
    assert [h.shape[1:] for h in out.hidden_states] == [(16, 16, 12), (32, 8, 6), (48, 4, 3)]
    # the stage outputs the next stage reads: channels-last views, as transformers returns them
    assert all(h.is_contiguous(memory_format=torch.channels_last) for h in out.hidden_states)
    assert out["last_hidden_state"] is out.last_hidden_state and out[0] is out.last_hidden_state
    as_tuple = model(x, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    torch.testing.assert_close(as_tuple[0], out.last_hidden_state)
    classifier = CvtForImageClassification(tiny_config()).eval()
    loss, logits, hidden = classifier(x, labels=torch.tensor([2]), output_hidden_states=True, return_dict=False)
    assert logits.shape == (1, 5) and len(hidden) == 3 and loss.dim() == 0


def test_config_defaults_for_outputs() -> None:
    model = CvtModel(tiny_config(output_hidden_states=True, return_dict=False)).eval()
    out = model(torch.randn(1, 3, 32, 32))
    assert isinstance(out, tuple) and len(out[-1]) == 3


def test_linear_projection_is_attention_on_the_flattened_tokens() -> None:
    """'linear' (no spatial op) equals 'dw_bn' with a 1x1 identity conv, identity BatchNorm and
    key/value stride 1, weight for weight."""
    linear = randomise_(CvtForImageClassification(tiny_config(qkv_projection_method=["linear"] * 3)), 1).eval()
    identity = CvtForImageClassification(tiny_config(kernel_qkv=[1] * 3, padding_kv=[0] * 3,
                                                     padding_q=[0] * 3, stride_kv=[1] * 3)).eval()
    state = dict(linear.state_dict())
    for key, tensor in identity.state_dict().items():
        if "convolution_projection" in key:
            bn_eps = 1e-5
            state[key] = {"weight": torch.ones_like(tensor), "bias": torch.zeros_like(tensor),
                          "running_mean": torch.zeros_like(tensor),
                          "running_var": torch.full_like(tensor, 1 - bn_eps)}.get(key.rsplit(".", 1)[1], tensor)
            if key.endswith("convolution.weight"):
                state[key] = torch.ones_like(tensor)
    identity.load_state_dict(state)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        assert_close_to_scale(linear(x).logits, identity(x).logits, rel=1e-5)


def test_cls_token_in_any_stage_is_sized_by_that_stage() -> None:
    model = CvtModel(tiny_config(cls_token=[True, True, False]))
    widths = [tuple(s.cls_token.shape) if s.cls_token is not None else None for s in model.encoder.stages]
    assert widths == [(1, 1, 16), (1, 1, 32), None]
    out = model(torch.randn(2, 3, 32, 32))
    assert out.cls_token_value is None  # only the last stage's cls token is an output


@pytest.mark.parametrize("return_dict", [True, False])
def test_no_cls_token_classifies_from_mean_pooled_normalised_tokens(return_dict) -> None:
    model = randomise_(CvtForImageClassification(tiny_config(cls_token=[False] * 3)), 4).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        out = model(x, return_dict=return_dict, output_hidden_states=True)
        logits = out.logits if return_dict else out[0]
        tokens = model.cvt(x).last_hidden_state.flatten(2).transpose(1, 2)
        expected = model.classifier(model.layernorm(tokens).mean(dim=1))
    torch.testing.assert_close(logits, expected)
    if not return_dict:
        assert len(out) == 2 and len(out[1]) == 3  # hidden states are not lost


def test_drop_path_ramps_linearly_over_each_stage() -> None:
    model = CvtModel(tiny_config(depth=[1, 1, 5], drop_path_rate=[0.0, 0.3, 0.2]))
    rates = [[layer.drop_path.rate for layer in stage.layers] for stage in model.encoder.stages]
    assert rates[0] == [0.0] and rates[1] == [0.0]
    assert rates[2] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_drop_path_drops_only_the_residual_branch(monkeypatch) -> None:
    """With every branch dropped, a layer passes its input through unchanged (transformers'
    port zeroes the whole residual stream instead)."""
    monkeypatch.setattr(DropPath, "forward", lambda self, x: torch.zeros_like(x))
    model = CvtModel(tiny_config(drop_path_rate=[0.1] * 3)).train()
    layer = model.encoder.stages[1].layers[1]
    x = torch.randn(2, 8 * 8, 32)
    torch.testing.assert_close(layer(x, 8, 8), x, atol=0, rtol=0)


def test_drop_path_statistics() -> None:
    torch.manual_seed(0)
    drop = DropPath(0.25).train()
    out = drop(torch.ones(4000, 3))
    kept = (out[:, 0] > 0).float().mean().item()
    assert abs(kept - 0.75) < 0.03 and torch.allclose(out[out > 0], torch.tensor(1 / 0.75))
    assert torch.equal(drop.eval()(torch.ones(5, 3)), torch.ones(5, 3))


@pytest.mark.parametrize("depth", [(1, 1, 1), (2, 1, 1), (3, 1, 2), (1,), (1, 1, 1, 1)])
def test_any_depth_list_builds(depth) -> None:
    """transformers cannot build depth[s] <= s (its drop-path list is indexed by stage)."""
    n = len(depth)
    config = CvtConfig(
        embed_dim=[8 * (i + 1) for i in range(n)], num_heads=[1] * n, depth=depth,
        patch_sizes=[7] + [3] * (n - 1), patch_stride=[4] + [2] * (n - 1), patch_padding=[2] + [1] * (n - 1),
        **{f: [getattr(CvtConfig(), f)[-1]] * n for f in (
            "mlp_ratio", "attention_drop_rate", "drop_rate", "drop_path_rate", "qkv_bias", "cls_token",
            "qkv_projection_method", "kernel_qkv", "padding_kv", "stride_kv", "padding_q", "stride_q")})
    model = CvtForImageClassification(config)
    assert [len(stage.layers) for stage in model.cvt.encoder.stages] == list(depth)
    assert model(torch.randn(2, 3, 64, 64)).logits.shape == (2, 2)


@pytest.mark.parametrize("size", [(16, 16), (17, 31), (33, 65), (64, 64), (97, 131)])
def test_any_input_size_and_batch_one(size) -> None:
    model = CvtForImageClassification(tiny_config()).eval()
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        batched = model(x).logits
        single = torch.cat([model(x[i:i + 1]).logits for i in range(3)])
    assert_close_to_scale(batched, single, rel=1e-5)


def test_initialisation_follows_the_original_code() -> None:
    torch.manual_seed(0)
    model = CvtForImageClassification(CvtConfig(num_labels=1000))
    fc = model.cvt.encoder.stages[2].layers[0].intermediate.dense
    assert abs(fc.weight.std().item() - 0.02) < 0.001 and fc.weight.abs().max() < 0.12
    assert torch.count_nonzero(fc.bias) == 0
    cls = model.cvt.encoder.stages[2].cls_token
    assert 0.01 < cls.std().item() < 0.03
    ln = model.cvt.encoder.stages[0].layers[0].layernorm_before
    assert torch.equal(ln.weight, torch.ones_like(ln.weight))


def test_eval_folds_batchnorm_and_training_uses_batch_statistics() -> None:
    model = randomise_(CvtModel(tiny_config()), 7)
    x = torch.randn(4, 3, 32, 32)
    projection = model.encoder.stages[0].layers[0].attention.attention.convolution_projection_key.convolution_projection
    feature_map = torch.randn(4, 16, 8, 8)
    with torch.no_grad():
        folded = projection.eval()(feature_map)
        unfolded = projection.normalization(projection.convolution(feature_map))
        assert_close_to_scale(folded, unfolded, rel=1e-5)
    before = projection.normalization.running_mean.clone()
    model.train()(x)
    assert not torch.equal(before, projection.normalization.running_mean)  # batch stats, updated
    assert projection.normalization.weight.requires_grad


class TestLoss:
    model = CvtForImageClassification(tiny_config(num_labels=3)).eval()
    x = torch.randn(4, 3, 32, 32)

    @pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
    def test_single_label(self, dtype) -> None:
        labels = torch.tensor([0, 2, 1, 1])
        out = self.model(self.x, labels=labels.to(dtype))
        torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
        assert self.model.config.problem_type is None  # not modified behind the user's back

    def test_multi_label(self) -> None:
        labels = torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]])
        out = self.model(self.x, labels=labels)
        expected = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels)
        torch.testing.assert_close(out.loss, expected)

    def test_regression(self) -> None:
        model = CvtForImageClassification(tiny_config(num_labels=1))
        labels = torch.randn(4)
        out = model(self.x, labels=labels)
        torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(), labels))

    def test_float_class_indices_are_explained(self) -> None:
        with pytest.raises(ValueError, match="multi-hot"):
            self.model(self.x, labels=torch.tensor([0.0, 2.0, 1.0, 1.0]))


@pytest.mark.parametrize("pixel_values, message", [
    (torch.randn(1, 4, 64, 64), "4 channels"),
    (torch.randn(3, 64, 64), "3-D"),
    (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), "floating-point"),
    (torch.randn(1, 3, 2, 2), "too small"),
    (torch.randn(1, 3, 16, 16), "batch of 2"),
    (torch.randn(1, 64, 64, 3), "channels"),
    ([[0.0]], "torch.Tensor"),
    (torch.randn(0, 3, 64, 64), "empty batch"),
])
def test_bad_input_is_explained(pixel_values, message) -> None:
    model = CvtForImageClassification(tiny_config())
    with pytest.raises((ValueError, TypeError), match=message):
        model(pixel_values)
