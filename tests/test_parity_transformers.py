"""Parity with transformers' CvT (the oracle) on seeded random architectures, both directions:
transformers saves -> we load -> same outputs; we save -> transformers loads -> same outputs."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

import cvt
from cvt.config import min_input_size
from conftest import assert_close_to_scale, assert_gradients_close, randomise_

REL = 1e-5  # of the values' scale: float32 rounding scales with them


def random_architecture(seed: int) -> dict:
    """Stage count 1-4 and random depths, widths, heads, kernels, strides, paddings, qkv_bias and
    cls token. transformers can only build depth[s] > s and a cls token in the last stage."""
    rng = random.Random(seed)
    n = 1 + seed % 4
    heads = [rng.randint(1, 3) for _ in range(n)]
    patch = [rng.choice([3, 5, 7]) for _ in range(n)]
    kernel_qkv = [rng.choice([1, 3, 5]) for _ in range(n)]
    return dict(
        embed_dim=[h * rng.choice([4, 8]) for h in heads],
        num_heads=heads,
        depth=[rng.randint(s + 1, s + 2) for s in range(n)],
        patch_sizes=patch,
        patch_stride=[rng.randint(1, 3) if s else rng.randint(2, 4) for s in range(n)],
        patch_padding=[rng.randint(0, k // 2) for k in patch],
        mlp_ratio=[rng.choice([1.0, 2.0, 2.5, 4.0]) for _ in range(n)],
        qkv_bias=[rng.random() < 0.7 for _ in range(n)],
        cls_token=[False] * (n - 1) + [rng.random() < 0.7],
        qkv_projection_method=["dw_bn"] * n,
        kernel_qkv=kernel_qkv,
        padding_q=[(k - 1) // 2 for k in kernel_qkv],
        stride_q=[1] * n,
        padding_kv=[rng.randint(0, k // 2) for k in kernel_qkv],
        stride_kv=[rng.randint(1, 3) for _ in range(n)],
        attention_drop_rate=[0.0] * n,
        drop_rate=[0.0] * n,
        drop_path_rate=[rng.choice([0.0, 0.1]) for _ in range(n)],
        num_labels=rng.randint(2, 7),
    )


def random_input(seed: int, config: cvt.CvtConfig) -> torch.Tensor:
    rng = random.Random(seed + 100)
    base = min_input_size(config)
    height, width = base + rng.randint(0, 24), base + rng.randint(0, 24)
    return torch.randn(rng.randint(1, 3), config.num_channels, height, width,
                       generator=torch.Generator().manual_seed(seed))


def assert_same_outputs(ours, theirs, x: torch.Tensor, rel: float = REL) -> None:
    with torch.no_grad():
        a = ours(x, output_hidden_states=True)
        b = theirs(x, output_hidden_states=True)
        base_a = ours.cvt(x)
        base_b = theirs.cvt(x)
    assert_close_to_scale(a.logits, b.logits, rel=rel, msg="logits")
    assert len(a.hidden_states) == len(b.hidden_states) == ours.config.num_stages
    for stage, (ha, hb) in enumerate(zip(a.hidden_states, b.hidden_states)):
        assert_close_to_scale(ha, hb, rel=rel, msg=f"hidden state {stage}")
    if base_b.cls_token_value is None:
        assert base_a.cls_token_value is None
    else:
        assert_close_to_scale(base_a.cls_token_value, base_b.cls_token_value, rel=rel, msg="cls token")
    assert_close_to_scale(base_a.last_hidden_state, base_b.last_hidden_state, rel=rel, msg="last hidden state")


@pytest.mark.parametrize("seed", range(12))
def test_random_architecture_round_trip(seed: int, tmp_path) -> None:
    arch = random_architecture(seed)
    hf_model = randomise_(transformers.CvtForImageClassification(transformers.CvtConfig(**arch)), seed)
    hf_model.eval().save_pretrained(tmp_path / "from_transformers")

    ours = cvt.CvtForImageClassification.from_pretrained(tmp_path / "from_transformers")
    assert not ours.training
    x = random_input(seed, ours.config)
    assert_same_outputs(ours, hf_model, x)

    ours.save_pretrained(tmp_path / "from_cvt")
    reloaded = transformers.CvtForImageClassification.from_pretrained(tmp_path / "from_cvt").eval()
    assert_same_outputs(ours, reloaded, x)
    assert reloaded.config.to_dict()["embed_dim"] == list(arch["embed_dim"])
    # in float64 the two implementations agree to rounding: any real difference would show
    assert_same_outputs(ours.double(), hf_model.double(), x.double(), rel=1e-9)


def test_base_model_parity(tmp_path) -> None:
    """CvtModel (no 'cvt.' prefix in its keys) loads transformers' CvtModel and back."""
    arch = random_architecture(3)
    hf_model = randomise_(transformers.CvtModel(transformers.CvtConfig(**arch)), 3).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    ours = cvt.CvtModel.from_pretrained(tmp_path / "hf")
    x = random_input(3, ours.config)
    with torch.no_grad():
        a, b = ours(x), hf_model(x)
    assert_close_to_scale(a.last_hidden_state, b.last_hidden_state, rel=REL)
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.CvtModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close_to_scale(back(x).last_hidden_state, a.last_hidden_state, rel=REL)


def test_training_mode_matches_transformers(tmp_path) -> None:
    """Training mode (batch-statistics BatchNorm, no dropout): same loss and gradients."""
    arch = random_architecture(2) | dict(drop_path_rate=[0.0] * 3)
    hf_model = randomise_(transformers.CvtForImageClassification(transformers.CvtConfig(**arch)), 2)
    hf_model.save_pretrained(tmp_path / "hf")
    ours = cvt.CvtForImageClassification.from_pretrained(tmp_path / "hf").train()
    hf_model.train()
    x = random_input(2, ours.config)
    x = torch.cat([x, x.flip(0) * 0.5])  # batch >= 2 for batch statistics
    labels = torch.arange(x.shape[0]) % ours.config.num_labels
    loss_a = ours(x, labels=labels).loss
    loss_b = hf_model(x, labels=labels).loss
    assert_close_to_scale(loss_a, loss_b, rel=REL)
    loss_a.backward()
    loss_b.backward()
    assert_gradients_close({n: p.grad for n, p in ours.named_parameters()},
                           {n: p.grad for n, p in hf_model.named_parameters()}, rel=1e-5)
