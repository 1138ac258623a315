"""The model is plain PyTorch, and users rely on what that gives them: forward hooks see the
tensors that really flow (nothing is overwritten in place afterwards), an adapter swapped into a
layer is really called and trained, dynamic quantisation and `torch.func` work on it, FlopCounterMode
counts the whole forward (attention included), and gradient checkpointing changes neither the
loss, the gradients nor the BatchNorm statistics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cvt import CvtConfig, CvtForImageClassification, CvtModel
from cvt.config import kv_grid, stage_grids
from cvt.modeling import CvtLayer, ModelOutput
from conftest import TINY_ARCHITECTURES, assert_close_to_scale, assert_gradients_close, randomise_, tiny_config

NO_DROP = dict(drop_path_rate=(0.0, 0.0, 0.0))  # tiny_config keeps CvT's 0.1 in the last stage


def _tensors(value) -> list:
    """Everything a module returned, flattened: tensors, and plain values (token-grid sizes, None)."""
    if isinstance(value, ModelOutput):
        value = value.to_tuple()
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return [value]


def _assert_same_outputs(actual, expected, what: str) -> None:
    actual, expected = _tensors(actual), _tensors(expected)
    assert len(actual) == len(expected), what
    for a, e in zip(actual, expected):
        if isinstance(e, torch.Tensor):
            assert_close_to_scale(a, e, rel=1e-6, msg=what)
        else:
            assert a == e, what


# ------------------------------------------------------------------------------------------ hooks
HOOK_CONFIGS = {  # dw_bn with a cls token in the last stage; avg, linear, cls token in the first only
    name: TINY_ARCHITECTURES[name].config(**NO_DROP)
    for name in ("dw_bn-cls_last", "avg_linear_dw_bn-cls_first-quick_gelu")}
GRAD_MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("config_name", HOOK_CONFIGS)
def test_forward_hooks_see_what_really_runs(config_name, grad_mode) -> None:
    """Every module runs through its own forward (so its hook fires), and what a hook was shown,
    kept by reference without cloning, is still true after the whole forward: re-running each
    module on its recorded input gives its recorded output. An in-place residual or any later
    in-place update of a tensor a hook saw, or a fast path bypassing submodules, fails this."""
    model = randomise_(CvtForImageClassification(HOOK_CONFIGS[config_name]), 3).eval()
    x = torch.randn(2, 3, 48, 40)
    calls: dict[str, list] = {}

    def recorder(name):
        def hook(module, args, kwargs, output):
            calls.setdefault(name, []).append((args, kwargs, output))
        return hook

    handles = [m.register_forward_hook(recorder(n), with_kwargs=True) for n, m in model.named_modules()]
    with GRAD_MODES[grad_mode]():
        logits = model(x).logits
        for handle in handles:
            handle.remove()
        # containers without a forward of their own (ModuleList, CvtEncoder) are never called
        runnable = {n for n, m in model.named_modules() if type(m).forward is not nn.Module.forward}
        assert runnable - set(calls) == set(), "modules whose forward never ran"
        assert len(calls["cvt.encoder.stages.2.layers.2"]) == 1
        for name, recorded in calls.items():
            module = model.get_submodule(name)
            for args, kwargs, output in recorded:
                _assert_same_outputs(output, module(*args, **kwargs), f"{name} ({type(module).__name__})")
        torch.testing.assert_close(logits, calls[""][0][2].logits, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------- adapter
class LoRALinear(nn.Linear):
    """A LoRA adapter: the frozen base layer plus a trainable low-rank update x A^T B^T."""

    def __init__(self, base: nn.Linear, rank: int = 4, generator: torch.Generator | None = None) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        with torch.no_grad():
            self.weight.copy_(base.weight)
            if base.bias is not None:
                self.bias.copy_(base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # B is non-zero from the start (unlike LoRA's usual zero init), so the adapter shows at once
        a = torch.randn(rank, self.in_features, generator=generator) / math.sqrt(self.in_features)
        b = torch.randn(self.out_features, rank, generator=generator) / math.sqrt(rank)
        self.lora_a, self.lora_b = nn.Parameter(a), nn.Parameter(b)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x) + F.linear(F.linear(x, self.lora_a), self.lora_b)


def test_adapter_swapped_into_a_layer_changes_logits_and_is_what_trains() -> None:
    torch.manual_seed(0)
    model = randomise_(CvtForImageClassification(tiny_config(**NO_DROP)), 5)
    adapted = copy.deepcopy(model)
    intermediate = adapted.cvt.encoder.stages[1].layers[1].intermediate
    adapter = LoRALinear(intermediate.dense, generator=torch.Generator().manual_seed(1))
    intermediate.dense = adapter
    assert adapted.cvt.encoder.stages[1].layers[1].intermediate.dense is adapter
    x, labels = torch.randn(4, 3, 48, 48), torch.tensor([0, 1, 2, 3])

    for training in (False, True):
        plain, swapped = copy.deepcopy(model).train(training), copy.deepcopy(adapted).train(training)
        with torch.no_grad():
            before, after = plain(x).logits, swapped(x).logits
        assert (after - before).abs().max() > 1e-2, f"adapter ignored (training={training})"
    # the base layer alone, with the adapter's B zeroed, gives back the original logits
    check = copy.deepcopy(adapted).eval()
    with torch.no_grad():
        check.cvt.encoder.stages[1].layers[1].intermediate.dense.lora_b.zero_()
        assert_close_to_scale(check(x).logits, model.eval()(x).logits, rel=1e-5)

    # fine-tune only the adapter
    adapted.train()
    for name, p in adapted.named_parameters():
        p.requires_grad_(name.endswith(("lora_a", "lora_b")))
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert trainable == [adapter.lora_a, adapter.lora_b]
    frozen = {n: p.detach().clone() for n, p in adapted.named_parameters() if not p.requires_grad}
    optimiser = torch.optim.SGD(trainable, lr=0.1)
    adapter.calls = 0
    losses = []
    for _ in range(5):
        optimiser.zero_grad()
        loss = adapted(x, labels=labels).loss
        loss.backward()
        assert adapter.lora_a.grad.abs().sum() > 0 and adapter.lora_b.grad.abs().sum() > 0
        optimiser.step()
        losses.append(loss.item())
    assert adapter.calls == 5
    with torch.no_grad():
        final = adapted(x, labels=labels).loss.item()
    assert final < losses[0] - 1e-3, (losses, final)
    for name, p in adapted.named_parameters():
        if name in frozen:
            assert p.grad is None, name
            assert torch.equal(p, frozen[name]), f"{name} changed though frozen"


# ---------------------------------------------------------------------------------- quantisation
@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_dynamic_int8_quantisation_replaces_every_linear_and_stays_close() -> None:
    model = randomise_(CvtForImageClassification(tiny_config()), 6).eval()
    num_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    quantised = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    dynamic_linear = torch.ao.nn.quantized.dynamic.Linear
    assert sum(isinstance(m, dynamic_linear) for m in quantised.modules()) == num_linear
    assert not any(type(m) is nn.Linear for m in quantised.modules())
    x = torch.randn(8, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference, logits = model(x).logits, quantised(x).logits
    difference = (logits - reference).abs().max().item()
    scale = reference.abs().max().item()
    assert 0 < difference < 0.1 * scale, (difference, scale)  # int8 runs (about 5 % off here)
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.75


# ------------------------------------------------------------------------------------ torch.func
def test_torch_func_grad_matches_autograd() -> None:
    model = randomise_(CvtForImageClassification(tiny_config()), 7).eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x = torch.randn(2, 3, 40, 48)

    def summed_logits(params, pixel_values):
        state = {**params, **buffers}
        return torch.func.functional_call(model, state, (pixel_values,)).logits.sum()

    grad_params, grad_input = torch.func.grad(summed_logits, argnums=(0, 1))(params, x)

    reference_x = x.clone().requires_grad_(True)
    model.zero_grad()
    model(reference_x).logits.sum().backward()
    assert_close_to_scale(grad_input, reference_x.grad, rel=1e-5)
    assert reference_x.grad.abs().sum() > 0
    assert_gradients_close(grad_params, {n: p.grad for n, p in model.named_parameters()}, rel=1e-5)


# ------------------------------------------------------------------------------------------ FLOPs
def test_flop_counter_counts_the_whole_cvt13_forward_attention_included() -> None:
    """At CvT-13 size, torch's FlopCounterMode agrees with `config.macs_per_image`; the attention
    products (about 11 % of CvT-13) are counted, through the CPU flash-attention formula."""
    config = CvtConfig(num_labels=1000)
    with torch.device("meta"):  # skip initialising 20 M weights; values do not change counts
        model = CvtForImageClassification(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t.fill_(1 if name.endswith("running_var") else 0)
    model.eval()
    batch = 2
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randn(batch, 3, 224, 224))
    total = counter.get_total_flops()
    expected = 2 * batch * config.macs_per_image(224, 224)
    assert abs(total - expected) <= 0.02 * expected, (total, expected)

    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    dense = sum(n for op, n in counts.items() if op in ("aten.addmm", "aten.mm", "aten.convolution"))
    attention = total - dense
    attention_macs = 0
    for s, (h, w) in enumerate(stage_grids(config, 224, 224)):
        hk, wk = kv_grid(config, s, h, w)
        cls = int(config.cls_token[s])
        attention_macs += config.depth[s] * 2 * (h * w + cls) * (hk * wk + cls) * config.embed_dim[s]
    assert attention == 2 * batch * attention_macs, counts
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in counts, counts


# -------------------------------------------------------------------------- gradient checkpointing
def _step(model: CvtForImageClassification, x, labels, seed: int):
    """One training forward + backward (seeded); the loss, gradients, layer calls and BN buffers.
    A layer's calls are counted at its attention block: a recomputation re-runs the layer's
    forward, inside its own hooks."""
    layer_calls = [0]
    handles = [m.attention.register_forward_pre_hook(lambda *_: layer_calls.__setitem__(0, layer_calls[0] + 1))
               for m in model.modules() if isinstance(m, CvtLayer)]
    torch.manual_seed(seed)
    loss = model(x, labels=labels).loss
    loss.backward()
    for handle in handles:
        handle.remove()
    grads = {n: p.grad for n, p in model.named_parameters()}
    bn = {n: b for n, b in model.named_buffers() if "convolution_projection" in n}
    return loss.detach(), grads, layer_calls[0], bn


@pytest.mark.parametrize("drops", [
    dict(drop_path_rate=(0.0, 0.0, 0.0)),
    dict(drop_path_rate=(0.1, 0.2, 0.3), drop_rate=(0.1, 0.1, 0.2), attention_drop_rate=(0.1, 0.1, 0.1)),
], ids=["no-dropout", "dropout-and-drop-path"])
def test_gradient_checkpointing_gives_the_same_step(drops) -> None:
    model = randomise_(CvtForImageClassification(tiny_config(**drops)), 8).train()
    x, labels = torch.randn(4, 3, 48, 48), torch.tensor([0, 4, 2, 1])
    num_layers = sum(model.config.depth)
    plain, checkpointed = copy.deepcopy(model), copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)

    loss, grads, calls, bn = _step(plain, x, labels, seed=11)
    loss_ckpt, grads_ckpt, calls_ckpt, bn_ckpt = _step(checkpointed, x, labels, seed=11)
    assert calls == num_layers and calls_ckpt == 2 * num_layers  # each layer really recomputed
    assert_close_to_scale(loss_ckpt, loss, rel=1e-5)
    assert all(g is not None for g in [*grads.values(), *grads_ckpt.values()])
    assert_gradients_close(grads_ckpt, grads, rel=1e-5)
    # BatchNorm statistics updated exactly once, to the same values
    assert bn and bn.keys() == bn_ckpt.keys()
    for name, buffer in bn.items():
        if name.endswith("num_batches_tracked"):
            assert buffer.item() == bn_ckpt[name].item() == 1, name
        else:
            assert not torch.equal(buffer, dict(model.named_buffers())[name]), name
            torch.testing.assert_close(bn_ckpt[name], buffer, atol=0, rtol=0, msg=name)


def test_gradient_checkpointing_switches_and_eval_outputs() -> None:
    model = randomise_(CvtForImageClassification(tiny_config()), 9).eval()
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        reference = model(x).logits
    assert not model.is_gradient_checkpointing
    model.set_grad_checkpointing(True)
    assert model.is_gradient_checkpointing
    assert all(layer.gradient_checkpointing for stage in model.cvt.encoder.stages for layer in stage.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference, atol=0, rtol=0)
    assert_close_to_scale(model(x).logits.detach(), reference, rel=1e-6)  # grad on
    model.set_grad_checkpointing(False)
    assert not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    model.gradient_checkpointing_disable()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})  # Trainer's
    assert model.is_gradient_checkpointing  # recomputed non-reentrantly all the same
    model.gradient_checkpointing_disable()

    backbone = CvtModel(tiny_config())
    backbone.gradient_checkpointing_enable()
    assert backbone.is_gradient_checkpointing
    assert all(layer.gradient_checkpointing for stage in backbone.encoder.stages for layer in stage.layers)
    backbone.activation_checkpointing_enable(every_n_layers=2)  # transformers' option
    layers = [layer for stage in backbone.encoder.stages for layer in stage.layers]
    assert [layer.gradient_checkpointing for layer in layers] == [i % 2 == 0 for i in range(len(layers))]
