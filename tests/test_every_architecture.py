"""Every architecture through the same checks, as timm's tests/test_models.py runs every model:
the tiny tricky configurations and the named variants at full width (both sets live in conftest.py;
the seven variants have three architectures, CvT-13, CvT-21 and W24, each checked once: the names
differ in preprocessing only). Forward and backward, save and load (ours and transformers', both
ways), the timm interface, the TensorFlow twin, and every fp32 engine.

Tiers: the full-width architectures are in the slow tier, the tiny ones in the fast tier. TF
parity and the engines run on the tiny configurations and CvT-13 only (CvT-21 and W24 only add
layers and width)."""

from __future__ import annotations

import pytest
import torch
import transformers

import cvt
from cvt import CvtConfig, CvtForImageClassification, CvtModel, engines
from cvt.config import stage_grids
from cvt.engines import EngineError, build_engine
from conftest import TINY_ARCHITECTURES, VARIANTS, assert_close_to_scale, randomise_, transformers_computes

CVT_13 = "cvt-13"
VARIANT_SIZE = (64, 80)  # the variants' stages give 16x20, 8x10 and 4x5 maps; W24 fits in memory


def tiered(names: list[str]) -> list:
    """Full-width variants go to the slow tier."""
    return [pytest.param(n, marks=pytest.mark.slow) if n in VARIANTS else n for n in names]


def config_and_size(name: str, **overrides) -> tuple[CvtConfig, tuple[int, int]]:
    if name in TINY_ARCHITECTURES:
        return TINY_ARCHITECTURES[name].config(**overrides), TINY_ARCHITECTURES[name].size
    return cvt.get_variant(name).config(**overrides), VARIANT_SIZE


def build(name: str, model_class=CvtForImageClassification, seed: int = 0, **overrides):
    """The architecture with random weights and BatchNorm statistics (randomise_), and its input size."""
    config, size = config_and_size(name, **overrides)
    return randomise_(model_class(config), seed), size


def no_dropping(name: str) -> dict:
    """Config overrides that switch off every random drop (dropout, attention dropout, drop path)."""
    stages = config_and_size(name)[0].num_stages
    return {rate: (0.0,) * stages for rate in ("drop_rate", "attention_drop_rate", "drop_path_rate")}


def architecture(config: CvtConfig) -> dict:
    """What a config says about the computation (a loaded config.json may add keys like dtype)."""
    fields = ("num_channels", "hidden_act", "num_labels", "id2label", *CvtConfig.stage_fields())
    return {f: getattr(config, f) for f in fields}


def inputs(size: tuple[int, int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def one_per_architecture(names: list[str]) -> list[str]:
    """The first variant of each architecture (the -384 and -22k ones share CvT-13's and CvT-21's)."""
    first: dict[str, str] = {}
    for name in names:
        first.setdefault(repr(cvt.get_variant(name).architecture), name)
    return list(first.values())


# the variants' names differ in preprocessing only; at one input size each architecture's
# checks compute the same thing, so they run once per architecture
ARCHITECTURES = [*TINY_ARCHITECTURES, *one_per_architecture(VARIANTS)]
EVERY = tiered(ARCHITECTURES)
TRANSFORMERS_CAN_RUN = tiered([n for n in ARCHITECTURES if transformers_computes(config_and_size(n)[0])])
TINY_AND_CVT13 = tiered([*TINY_ARCHITECTURES, CVT_13])


# ------------------------------------------------------------------------------ forward, backward
@pytest.mark.parametrize("name", EVERY)
def test_forward_and_backward_reach_every_parameter(name) -> None:
    model, size = build(name, **no_dropping(name))
    config = model.config
    x = inputs(size)
    labels = torch.tensor([1, config.num_labels - 1])
    out = model.train()(x, labels=labels, output_hidden_states=True)
    assert out.logits.shape == (2, config.num_labels) and torch.isfinite(out.logits).all()
    grids = stage_grids(config, *size)
    assert [tuple(h.shape) for h in out.hidden_states] == [
        (2, width, *grid) for width, grid in zip(config.embed_dim, grids, strict=True)]
    # with a cls token, the last layer's spatial queries reach only the feature map, not the logits
    (out.loss + out.hidden_states[-1].square().mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    for stage, method in enumerate(config.qkv_projection_method):  # a depthwise conv only for dw_bn
        convs = [n for n in dict(model.named_parameters()) if f"stages.{stage}." in n and "convolution_projection" in n]
        assert bool(convs) == (method == "dw_bn"), (stage, method)


# ------------------------------------------------------------------------------ save and load
@pytest.mark.parametrize("name", EVERY)
def test_save_and_load_give_the_same_model(name, tmp_path) -> None:
    model, size = build(name)
    model.eval().save_pretrained(tmp_path)
    again = CvtForImageClassification.from_pretrained(tmp_path)
    assert not again.training and architecture(again.config) == architecture(model.config)
    x = inputs(size)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, atol=0, rtol=0)
    backbone = CvtModel.from_pretrained(tmp_path)  # the classifier's checkpoint, head left out
    with torch.no_grad():
        torch.testing.assert_close(backbone(x).last_hidden_state, model.cvt(x).last_hidden_state, atol=0, rtol=0)


def same_outputs(ours, theirs, x: torch.Tensor) -> None:
    """Logits (classifier) or last hidden state and cls token (backbone), and every hidden state."""
    with torch.no_grad():
        a, b = ours(x, output_hidden_states=True), theirs(x, output_hidden_states=True)
    keys = ["logits"] if hasattr(b, "logits") else ["last_hidden_state", "cls_token_value"]
    for key in keys:
        if getattr(b, key) is None:
            assert getattr(a, key) is None, key
        else:
            assert_close_to_scale(getattr(a, key), getattr(b, key), rel=1e-5, msg=key)
    assert len(a.hidden_states) == len(b.hidden_states)
    for stage, (got, want) in enumerate(zip(a.hidden_states, b.hidden_states)):
        assert_close_to_scale(got, want, rel=1e-5, msg=f"hidden state {stage}")


@pytest.mark.parametrize("kind", ["ForImageClassification", "Model"])
@pytest.mark.parametrize("name", TRANSFORMERS_CAN_RUN)
def test_transformers_loads_ours_and_we_load_theirs(name, kind, tmp_path) -> None:
    """The architectures transformers' port computes (conftest.transformers_computes)."""
    ours_class, theirs_class = getattr(cvt, f"Cvt{kind}"), getattr(transformers, f"Cvt{kind}")
    ours, size = build(name, ours_class, seed=1)
    x = inputs(size, seed=1)
    ours.eval().save_pretrained(tmp_path / "ours")
    theirs = theirs_class.from_pretrained(tmp_path / "ours").eval()
    same_outputs(ours, theirs, x)
    theirs.save_pretrained(tmp_path / "theirs")
    back = ours_class.from_pretrained(tmp_path / "theirs")
    assert architecture(back.config) == architecture(ours.config)
    same_outputs(back, theirs, x)


# ------------------------------------------------------------------------------ timm's interface
def create(name: str, **kwargs):
    """cvt.create_model for a variant; a tiny architecture as CvT-13 with its fields overridden."""
    if name in TINY_ARCHITECTURES:
        config = TINY_ARCHITECTURES[name].config()
        fields = {f: getattr(config, f) for f in CvtConfig.stage_fields()}
        kwargs = {**fields, "hidden_act": config.hidden_act, **kwargs}
        name = CVT_13
    return cvt.create_model(name, **kwargs)


@pytest.mark.parametrize("name", EVERY)
def test_timm_model_checks(name, tmp_path) -> None:
    """What timm's tests/test_models.py checks on every model: training mode at batch 1, a
    gradient for every weight, gradient checkpointing, forward_features / forward_head /
    forward_intermediates, reset_classifier, features_only and in_chans from a saved checkpoint."""
    torch.manual_seed(0)
    size = config_and_size(name)[1]
    model = create(name, num_classes=42, **no_dropping(name)).train()
    x = inputs(size, batch=1)
    out = model(x).logits  # training mode, batch 1
    assert out.shape == (1, 42) and not torch.isnan(out).any()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing[:5]}"
    model.set_grad_checkpointing(True)
    assert_close_to_scale(model(x).logits, out, rel=1e-5, msg="with gradient checkpointing")
    model.set_grad_checkpointing(False)
    model.zero_grad(set_to_none=True)
    model.eval()
    config = model.config
    grids, reductions = stage_grids(config, *size), config.stage_reductions()
    with torch.no_grad():
        tokens = model.forward_features(x)
        cls = int(config.cls_token[-1])
        assert tokens.shape == (1, cls + grids[-1][0] * grids[-1][1], model.num_features)
        pooled = model.forward_head(tokens, pre_logits=True)
        assert pooled.shape == (1, model.num_features)
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, tokens, rtol=0, atol=0)
        assert [tuple(m.shape) for m in maps] == [(1, c, *g) for c, g in zip(config.embed_dim, grids, strict=True)]
        model.save_pretrained(tmp_path)  # the layout of published weights (config.json + safetensors)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x).logits, pooled, rtol=0, atol=0)

        features = create(name, checkpoint_path=str(tmp_path), features_only=True).eval()
        assert features.feature_info.channels() == list(config.embed_dim)
        assert features.feature_info.reduction() == list(reductions)
        for stage, (got, want) in enumerate(zip(features(x), maps, strict=True)):
            assert_close_to_scale(got, want, rel=1e-5, msg=f"feature map {stage}")
        del features
        grey = x[:, :1]
        loaded = create(name, checkpoint_path=str(tmp_path), in_chans=1, num_classes=5).eval()
        assert loaded(grey).logits.shape == (1, 5)
        assert_close_to_scale(loaded.forward_head(loaded.forward_features(grey), pre_logits=True),
                              model.forward_head(model.forward_features(grey.expand(-1, 3, -1, -1)), pre_logits=True),
                              rel=1e-5, msg="grey input on summed RGB weights")
        loaded.reset_classifier(0)
        assert loaded(grey).logits.shape == (1, model.num_features)


# ------------------------------------------------------------------------------ TensorFlow
@pytest.mark.parametrize("name", TINY_AND_CVT13)
def test_tensorflow_twin_computes_what_pytorch_computes(name) -> None:
    """TFCvtForImageClassification and TFCvtModel given the PyTorch weights: the same logits,
    hidden states, last hidden state and cls token (TFCvtModel takes the classifier's keys, 'cvt.*',
    and the backbone's, 'encoder.*')."""
    from cvt.tf import TFCvtForImageClassification, TFCvtModel  # the tf extra, part of dev

    model, size = build(name, seed=2)
    model.eval()
    x = inputs(size, seed=2)
    with torch.no_grad():
        want = model(x, output_hidden_states=True)
        want_base = model.cvt(x)
    tf_model = TFCvtForImageClassification(model.config)
    tf_model.load_pytorch_state_dict(model.state_dict())
    got = tf_model(x.numpy(), output_hidden_states=True)
    assert_close_to_scale(got.logits, want.logits, rel=1e-5, msg="logits")
    assert len(got.hidden_states) == len(want.hidden_states) == model.config.num_stages
    for stage, (a, b) in enumerate(zip(got.hidden_states, want.hidden_states)):
        assert_close_to_scale(a, b, rel=1e-5, msg=f"hidden state {stage}")
    for state_dict in (model.state_dict(), model.cvt.state_dict()):
        base = TFCvtModel(model.config)
        base.load_pytorch_state_dict(state_dict)
        out = base(x.numpy())
        assert_close_to_scale(out.last_hidden_state, want_base.last_hidden_state, rel=1e-5, msg="last hidden state")
        if want_base.cls_token_value is None:
            assert out.cls_token_value is None
        else:
            assert_close_to_scale(out.cls_token_value, want_base.cls_token_value, rel=1e-5, msg="cls token")


# ------------------------------------------------------------------------------ engines
def plain(model, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values, return_dict=True)
    return out.logits if isinstance(model, CvtForImageClassification) else out.last_hidden_state


def engine_cases() -> list:
    """Every tiny architecture (as a classifier; two as backbones too) and CvT-13, on each engine.
    The graph engines' builds take seconds: the fast tier runs them on the two smallest
    architectures (a classifier and a backbone) and OpenVINO's refusal of 'avg'; the rest is slow."""
    models = [(name, CvtForImageClassification, name) for name in [*TINY_ARCHITECTURES, CVT_13]] + [
        (name, CvtModel, f"{name}-backbone") for name in ("linear_dw_bn-no_cls-2_stages", "dw_bn-cls_last-4_stages")]
    fast = {"dw_bn-cls_last-1_stage", "linear_dw_bn-no_cls-2_stages-backbone"}
    cases = []
    for name, model_class, label in models:
        config = config_and_size(name)[0]
        for engine in ("torch", "onnxruntime", "openvino"):
            refused = engine == "openvino" and "avg" in config.qkv_projection_method
            slow = name in VARIANTS or (engine != "torch" and not refused and label not in fast)
            cases.append(pytest.param(name, model_class, engine, id=f"{label}-{engine}",
                                      marks=[pytest.mark.slow] if slow else []))
    return cases


@pytest.mark.parametrize("name, model_class, engine", engine_cases())
def test_fp32_engine_computes_what_the_plain_model_computes(name, model_class, engine) -> None:
    """Within 1e-4 of the output's scale (the engines' own check at build time is of that order;
    fused kernels and graph compilers reorder float32 sums)."""
    model, size = build(name, model_class)
    model.eval()
    if engine == "openvino" and "avg" in model.config.qkv_projection_method:
        with pytest.raises(EngineError, match="ceil-mode average pooling"):
            build_engine(model, engine, image_size=size)
        assert engines.auto_engine(torch.device("cpu"), model) != "openvino"
        return
    built = build_engine(model, engine, image_size=size)
    assert built.name == engine and built.precision == "fp32" and built.report is None
    for batch in (1, 5):
        pixel_values = inputs(size, batch=batch, seed=batch)
        got, want = built(pixel_values), plain(model, pixel_values)
        assert got.dtype == torch.float32
        assert_close_to_scale(got, want, rel=1e-4, msg=f"{engine}, batch {batch}")
    with pytest.raises(ValueError, match=f"built for {size[0]}x{size[1]}"):
        built(torch.randn(1, 3, size[0] + 8, size[1]))
