"""The inference fast path (eval + no autograd: folded BatchNorm, in-place residual, chunked MLP,
batch groups) gives the plain path's outputs, never leaks into training, and compiles."""

from __future__ import annotations

import random
import threading

import pytest
import torch

import cvt
from cvt import CvtConfig, CvtForImageClassification, modeling
from cvt.config import min_input_size
from conftest import randomise_, tiny_config


def random_config(seed: int) -> CvtConfig:
    """Any projection method per stage, cls tokens anywhere, odd kernels and strides."""
    rng = random.Random(seed)
    n = 1 + seed % 3
    heads = [rng.randint(1, 3) for _ in range(n)]
    kernel_qkv = [rng.choice([1, 3, 5]) for _ in range(n)]
    return CvtConfig(
        embed_dim=[h * rng.choice([4, 8]) for h in heads], num_heads=heads,
        depth=[rng.randint(1, 3) for _ in range(n)],
        patch_sizes=[rng.choice([3, 5, 7]) for _ in range(n)],
        patch_stride=[rng.randint(1, 3) for _ in range(n)], patch_padding=[rng.randint(0, 1) for _ in range(n)],
        mlp_ratio=[rng.choice([1.0, 2.5, 4.0]) for _ in range(n)],
        qkv_bias=[rng.random() < 0.5 for _ in range(n)], cls_token=[rng.random() < 0.5 for _ in range(n)],
        qkv_projection_method=[rng.choice(["dw_bn", "avg", "linear"]) for _ in range(n)],
        kernel_qkv=kernel_qkv, padding_q=[(k - 1) // 2 for k in kernel_qkv], stride_q=[1] * n,
        padding_kv=[rng.randint(0, k // 2) for k in kernel_qkv], stride_kv=[rng.randint(1, 3) for _ in range(n)],
        attention_drop_rate=[0.1] * n, drop_rate=[0.1] * n, drop_path_rate=[0.2] * n,
        hidden_act=rng.choice(["gelu", "quick_gelu"]), num_labels=rng.randint(1, 6))


@pytest.fixture
def small_groups(monkeypatch):
    """Force several batch groups, run by two worker threads, and MLP chunks even on tiny inputs."""
    monkeypatch.setattr(modeling, "GROUP_TOKENS", 1)  # one image per group
    monkeypatch.setattr(modeling, "MLP_CHUNK_ELEMENTS", 257)  # a few rows per MLP chunk
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _threads_of_a_new_thread() -> int:
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_groups_run_in_worker_threads_with_the_callers_modes(small_groups, monkeypatch) -> None:
    model = randomise_(CvtForImageClassification(tiny_config()), 4).eval()
    x = torch.randn(5, 3, 48, 40)
    seen = []
    encode = model.cvt._encode

    def recording_encode(chunk, every_stage):
        maps, cls = encode(chunk, every_stage)
        seen.append((threading.current_thread().name, maps[-1].is_inference()))
        return maps, cls

    monkeypatch.setattr(model.cvt, "_encode", recording_encode)
    monkeypatch.setattr(modeling, "_pool", None)  # a fresh pool, started by this test
    with torch.no_grad():
        no_grad = model(x).logits
    with torch.inference_mode():
        inference = model(x).logits
    # the caller's thread setting survives, also as the default of threads started later
    assert torch.get_num_threads() == 2 and _threads_of_a_new_thread() == 2
    assert len(seen) == 10 and all(name.startswith("cvt-group") for name, _ in seen)
    assert [flag for _, flag in seen] == [False] * 5 + [True] * 5
    assert not no_grad.is_inference() and inference.is_inference()
    torch.testing.assert_close(no_grad, model(x).logits.detach(), atol=1e-5, rtol=0)


def test_forward_hooks_see_the_whole_batch(small_groups) -> None:
    """Feature-collecting hooks inside the model get the batch whole, on the caller's thread."""
    model = randomise_(CvtForImageClassification(tiny_config()), 4).eval()
    x = torch.randn(5, 3, 48, 40)
    seen = []
    model.cvt.encoder.stages[0].register_forward_hook(
        lambda module, args, out: seen.append((threading.current_thread().name, out[0].shape[0])))
    with torch.no_grad():
        fast = model(x).logits
    assert seen == [(threading.current_thread().name, 5)]
    torch.testing.assert_close(fast, model(x).logits.detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(10))
def test_fast_path_equals_plain_path(seed, small_groups) -> None:
    config = random_config(seed)
    model = randomise_(CvtForImageClassification(config), seed).eval()
    rng = random.Random(seed)
    size = min_input_size(config)
    x = torch.randn(3, 3, size + rng.randint(0, 20), size + rng.randint(0, 20))
    original = x.clone()
    with torch.enable_grad():  # eval mode, autograd on: the plain path
        plain = model(x, output_hidden_states=True)
        plain_base = model.cvt(x)
    with torch.no_grad():  # the fast path
        fast = model(x, output_hidden_states=True)
        fast_base = model.cvt(x)
    assert torch.equal(x, original)  # the input is never written to
    torch.testing.assert_close(fast.logits, plain.logits, atol=1e-5, rtol=0)
    for a, b in zip(fast.hidden_states, plain.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    if config.cls_token[-1]:
        torch.testing.assert_close(fast_base.cls_token_value, plain_base.cls_token_value, atol=1e-5, rtol=0)
    else:
        assert fast_base.cls_token_value is None and plain_base.cls_token_value is None


def test_inference_mode_is_the_fast_path_too(small_groups) -> None:
    model = randomise_(CvtForImageClassification(tiny_config()), 3).eval()
    x = torch.randn(4, 3, 48, 40)
    with torch.inference_mode():
        fast = model(x).logits
    plain = model(x).logits.detach()
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)


def test_folded_batchnorm_never_leaks_into_training() -> None:
    model = randomise_(CvtForImageClassification(tiny_config()), 5)
    x = torch.randn(4, 3, 48, 48)
    labels = torch.tensor([0, 1, 2, 3])
    model.eval()
    with torch.no_grad():
        model(x)  # fills the folded-weight caches
    bn = model.cvt.encoder.stages[1].layers[0].attention.attention.convolution_projection_value.convolution_projection.normalization
    running_before = bn.running_mean.clone()
    model.train()
    with torch.no_grad():  # training mode without autograd still uses batch statistics
        model(x)
    assert not torch.equal(bn.running_mean, running_before)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(x, labels=labels).loss
    loss.backward()
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
    optimizer.step()
    model.eval()
    with torch.no_grad():
        fast = model(x).logits  # must see the updated weights and statistics, not the cache
    with torch.enable_grad():
        plain = model(x).logits
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)


def test_cache_follows_load_state_dict_and_dtype() -> None:
    a = randomise_(CvtForImageClassification(tiny_config()), 1).eval()
    b = randomise_(CvtForImageClassification(tiny_config()), 2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a(x)
        a.load_state_dict(b.state_dict())
        torch.testing.assert_close(a(x).logits, b(x).logits, atol=0, rtol=0)
        a.double()
        torch.testing.assert_close(a(x.double()).logits.float(), b(x).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_torch_compile_on_cpu(tmp_path) -> None:
    """torch.compile(model): same logits as eager in eval mode, and a training step that matches."""
    torch._dynamo.reset()
    model = randomise_(CvtForImageClassification(tiny_config(drop_path_rate=[0.0] * 3)), 9)
    x = torch.randn(2, 3, 48, 48)
    labels = torch.tensor([1, 4])
    compiled = torch.compile(model)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
    model.train()
    eager_loss = model(x, labels=labels).loss
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled_loss = compiled(x, labels=labels).loss
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("hidden_act", ["gelu", "quick_gelu"])
def test_memory_saving_mlp_has_autograd_gradients(hidden_act) -> None:
    """Training's MLP recomputes its LayerNorm and activation in backward; gradients equal plain
    autograd's, also with frozen weights (only the needed gradients are computed)."""
    layer = randomise_(CvtForImageClassification(tiny_config(hidden_act=hidden_act)), 2).cvt.encoder.stages[1].layers[0]
    x = torch.randn(2, 37, 32, requires_grad=True)
    layer.intermediate.dense.weight.requires_grad_(False)
    layer.layernorm_after.bias.requires_grad_(False)
    out = layer._mlp(x)
    reference = layer.output(layer.intermediate(layer.layernorm_after(x)))
    torch.testing.assert_close(out, reference, atol=0, rtol=0)
    grad = torch.randn_like(out)
    params = [p for p in layer.parameters() if p.requires_grad]
    ours = torch.autograd.grad(out, [x, *params], grad, allow_unused=True)
    theirs = torch.autograd.grad(reference, [x, *params], grad, allow_unused=True)
    for a, b in zip(ours, theirs):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_autocast_inference_takes_the_plain_path() -> None:
    """bf16 autocast (CPU here; the same switch on CUDA) runs, close to float32."""
    model = randomise_(CvtForImageClassification(tiny_config()), 6).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).logits
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, atol=0.1, rtol=0.05)
