"""Attention maps: `output_attentions=True` (PyTorch and TensorFlow), `cvt.attention_maps`,
attention rollout across grids, and `cvt attention` drawing a PNG."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import cvt
from cvt.modeling.attention_maps import attention_maps, draw, keys_on_token_grid, rollout
from cvt.cli import main
from cvt.config import kv_grid, stage_grids
from cvt.modeling import SelfAttention
from conftest import TINY_ARCHITECTURES, assert_close_to_scale, randomise_, save_tiny_classifier, tiny_config

# the cls token in the last stage with 2x2-strided keys (dw_bn); in the first stage with pooled
# ('avg') and unprojected ('linear') keys; or in no stage, on a non-square input
ARCHITECTURES = ["dw_bn-cls_last", "avg_linear_dw_bn-cls_first-quick_gelu", "linear_dw_bn-no_cls-2_stages"]


@pytest.fixture(params=ARCHITECTURES)
def model_and_input(request):
    architecture = TINY_ARCHITECTURES[request.param]
    model = randomise_(cvt.CvtForImageClassification(architecture.config()), seed=4).eval()
    return model, torch.randn(2, 3, *architecture.size, generator=torch.Generator().manual_seed(5))


def test_probabilities_sum_to_one_and_times_values_give_the_attention_output(model_and_input) -> None:
    model, x = model_and_input
    config = model.config
    values, outputs = [], []
    for module in model.modules():
        if isinstance(module, SelfAttention):
            module.projection_value.register_forward_hook(lambda m, i, out: values.append(out))
            module.register_forward_hook(lambda m, i, out: outputs.append(out[0]))
    with torch.no_grad():
        attentions = model(x, output_attentions=True).attentions
    assert len(attentions) == len(values) == len(outputs) == sum(config.depth)
    layer = 0
    for stage, (height, width) in enumerate(stage_grids(config, *x.shape[-2:])):
        key_height, key_width = kv_grid(config, stage, height, width)
        cls = int(config.cls_token[stage])
        for _ in range(config.depth[stage]):
            probabilities, heads = attentions[layer], config.num_heads[stage]
            assert probabilities.shape == (2, heads, cls + height * width, cls + key_height * key_width)
            assert (probabilities >= 0).all()
            # rows of probabilities: 1 is their scale
            torch.testing.assert_close(probabilities.sum(-1), torch.ones(probabilities.shape[:-1]),
                                       rtol=0, atol=1e-6)
            v = values[layer].view(2, -1, heads, config.embed_dim[stage] // heads).transpose(1, 2)
            attended = (probabilities @ v).transpose(1, 2).reshape(outputs[layer].shape)
            assert_close_to_scale(attended, outputs[layer], rel=1e-5, msg=f"layer {layer}")
            layer += 1
    assert layer == len(attentions)


def test_other_outputs_are_unchanged(model_and_input) -> None:
    model, x = model_and_input
    with torch.no_grad():
        plain = model(x, output_hidden_states=True)
        asked = model(x, output_hidden_states=True, output_attentions=True)
        as_tuple = model(x, output_attentions=True, return_dict=False)
    assert plain.attentions is None and "attentions" not in plain.keys()
    assert torch.equal(plain.logits, asked.logits)
    assert len(plain.hidden_states) == len(asked.hidden_states) == model.config.num_stages
    assert all(torch.equal(a, b) for a, b in zip(plain.hidden_states, asked.hidden_states))
    assert len(asked.attentions) == sum(model.config.depth)
    assert torch.equal(as_tuple[0], plain.logits) and len(as_tuple[1]) == sum(model.config.depth)


def test_gradient_checkpointing_keeps_the_attentions() -> None:
    model = randomise_(cvt.CvtForImageClassification(tiny_config()), seed=2).train()
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)  # the same stochastic-depth draws in both passes
    want = model(x, output_attentions=True).attentions
    model.set_grad_checkpointing(True)
    torch.manual_seed(0)
    out = model(x, output_attentions=True)
    out.logits.sum().backward()
    assert len(out.attentions) == len(want) == sum(model.config.depth)
    for layer, (got, expected) in enumerate(zip(out.attentions, want)):  # probabilities: scale 1
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=f"layer {layer}")


def test_tensorflow_attentions_match_pytorch() -> None:
    from cvt.tf import TFCvtForImageClassification  # the tf extra, which dev includes

    model = randomise_(cvt.CvtForImageClassification(tiny_config(qkv_projection_method=(
        "avg", "linear", "dw_bn"), cls_token=(True, False, True))), seed=3).eval()
    tf_model = TFCvtForImageClassification(model.config)
    tf_model.load_pytorch_state_dict(model.state_dict())
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        want = model(x, output_attentions=True).attentions
    out = tf_model(x.numpy(), output_attentions=True)
    assert len(out.attentions) == len(want) == sum(model.config.depth)
    for layer, (got, expected) in enumerate(zip(out.attentions, want)):  # probabilities: scale 1
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5, rtol=0, err_msg=f"layer {layer}")
    np.testing.assert_array_equal(out.logits.numpy(), tf_model(x.numpy()).logits.numpy())


# ---------------------------------------------------------------------------------------- maps
def test_keys_resampled_to_the_token_grid_keep_each_row_a_distribution() -> None:
    probabilities = torch.softmax(torch.randn(3, 1 + 6 * 8, 1 + 3 * 4), -1)
    resampled = keys_on_token_grid(probabilities, (3, 4), (6, 8), cls=True)
    assert resampled.shape == (3, 49, 49)
    torch.testing.assert_close(resampled.sum(-1), torch.ones(3, 49))
    assert torch.equal(resampled[..., 0], probabilities[..., 0])  # the cls key as it was
    # a key grid equal to the token grid is left alone
    square = torch.softmax(torch.randn(2, 20, 20), -1)
    torch.testing.assert_close(keys_on_token_grid(square, (4, 5), (4, 5), cls=False), square)


def test_rollout_is_the_product_of_residual_attention() -> None:
    first, second = (torch.softmax(torch.randn(5, 5), -1) for _ in range(2))
    identity = torch.eye(5)
    want = ((second + identity) / 2) @ ((first + identity) / 2)
    torch.testing.assert_close(rollout([first, second]), want)
    torch.testing.assert_close(rollout([first, second]).sum(-1), torch.ones(5))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_attention_maps_of_an_image(name) -> None:
    config = TINY_ARCHITECTURES[name].config()
    model = randomise_(cvt.CvtForImageClassification(config), seed=4).train()
    image = np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    maps = attention_maps(model, image, cvt.CvtImageProcessor(size=64))
    assert model.training  # its mode is restored
    grid = stage_grids(config, 64, 64)[-1]
    assert maps.image.size == (64, 64) and maps.cls_token == config.cls_token[-1]
    assert maps.heads.shape == (config.num_heads[-1], *grid)
    assert maps.mean.shape == maps.rollout.shape == grid
    assert_close_to_scale(maps.mean, maps.heads.mean(0), rel=1e-5)
    assert (maps.heads >= 0).all() and (maps.rollout >= 0).all()
    # per position, everything the cls token (or an average query) gives: 1 less the cls's share
    # (a distribution: 1 is its scale, and 1e-5 float32 rounding of it)
    assert maps.rollout.sum() <= 1 + 1e-5
    if not config.cls_token[-1]:
        assert maps.rollout.sum() == pytest.approx(1, abs=1e-5)
    heads = config.num_heads[-1]
    with pytest.raises(ValueError, match=f"head index 0-{heads - 1}"):
        draw(maps, heads)


def test_a_model_without_preprocessing_asks_for_a_processor() -> None:
    model = cvt.CvtModel(tiny_config())
    with pytest.raises(ValueError, match="processor="):
        attention_maps(model, np.zeros((64, 64, 3), np.uint8))


@pytest.fixture(scope="module")
def classifier_and_image(tmp_path_factory):
    folder = save_tiny_classifier(tmp_path_factory.mktemp("model"))
    image = tmp_path_factory.mktemp("images") / "photo.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 100, 3), dtype=np.uint8)).save(image)
    return str(folder), str(image)


def test_cli_draws_the_requested_map_at_the_requested_size(classifier_and_image, tmp_path, capsys) -> None:
    folder, image = classifier_and_image
    pictures = {}
    for name, args in {"head0": ["--head", "0"], "head1": ["--head", "1"], "rollout": ["--rollout"]}.items():
        out = tmp_path / f"{name}.png"
        assert main(["attention", folder, image, "--output", str(out), "--size", "120", *args]) == 0
        with Image.open(out) as picture:
            assert picture.format == "PNG" and picture.size == (120, 120) and picture.mode == "RGB"
            pictures[name] = np.asarray(picture, dtype=int)
    assert "head 1" in capsys.readouterr().out.splitlines()[1]
    assert np.abs(pictures["head0"] - pictures["head1"]).max() > 0
    assert np.abs(pictures["head0"] - pictures["rollout"]).max() > 0
    default = tmp_path / "mean.png"
    assert main(["attention", folder, image, "--output", str(default)]) == 0
    with Image.open(default) as picture:
        assert picture.size == (64, 64)  # the model's input size


@pytest.mark.parametrize("args, message", [
    (["--head", "3"], "heads 0-2"),
    (["--head", "0", "--rollout"], "not both"),
    (["--size", "0"], "positive"),
])
def test_cli_refuses_what_it_cannot_draw(classifier_and_image, tmp_path, capsys, args, message) -> None:
    folder, image = classifier_and_image
    out = tmp_path / "map.png"
    assert main(["attention", folder, image, "--output", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(out)
