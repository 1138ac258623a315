"""The fused PyTorch engine: a frozen inference copy of the model, run without autograd.

What makes it faster than the plain model, all exact up to rounding:
- each 'dw_bn' projection's BatchNorm is folded into its depthwise convolution's weights;
- each layer writes both residual updates into the token tensor in place;
- on a CPU the MLP runs over equal row chunks, so its 4x-wide hidden activation stays small
  and cache-resident, and a batch runs in groups of about 16k first-stage tokens (keeping
  activations in cache and below the allocator's fresh-mapping threshold); with an image per
  intra-op thread, the groups go to that many single-threaded worker threads, which beats every
  small op split across threads (no fork/join barrier per op);
- on CUDA a batch runs whole; bf16 or fp16 weights and activations when asked for, and
  `compile=True` runs it through `torch.compile`.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn

from ..config import stage_grids
from ..modeling import CvtLayer, CvtStage, DepthwiseConvBatchNorm, QuickGELU
from .base import Engine, EngineError, Model, cpu_has_bf16

MLP_CHUNK_ELEMENTS = 1 << 20  # MLP hidden rows per chunk x width (4 MB in fp32)
GROUP_TOKENS = 16384  # images per group x first-stage tokens (keeps activations in cache)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class FusedTorchEngine(Engine):
    name = "torch"

    def __init__(self, model: Model, *, device: torch.device, precision: str,
                 image_size: tuple[int, int], compile: bool = False) -> None:
        super().__init__(model, device=device, precision=precision, image_size=image_size)
        _check_precision(precision, device)
        self.dtype = DTYPES[precision]
        self.model = frozen_copy(model, device, self.dtype)
        self.compiled = compile
        self._forward = torch.compile(self.forward_group, dynamic=False) if compile else self.forward_group

    def _run(self, pixel_values: Tensor) -> Tensor:
        x = pixel_values.to(self.device, self.dtype)
        groups, workers = (1, 1) if self.compiled else inference_plan(self.config, x)
        with torch.inference_mode():
            if groups == 1:
                return self._forward(x).float()
            chunks = x.tensor_split(groups)
            if workers == 1:
                return torch.cat([self._forward(chunk) for chunk in chunks]).float()
            return torch.cat(_map_in_threads(self._forward, chunks, workers)).float()

    def forward_group(self, pixel_values: Tensor) -> Tensor:
        """Logits (or the last feature map) of one group of images."""
        x = pixel_values.contiguous(memory_format=torch.channels_last)
        model = self.model.cvt if self.classifier else self.model
        cls = None
        for stage in model.encoder.stages:
            x, cls = _stage(stage, x)
        if not self.classifier:
            return x.contiguous()
        if cls is not None:
            features = self.model.layernorm(cls)[:, 0]
        else:
            features = self.model.layernorm(x.flatten(2).transpose(1, 2)).mean(dim=1)
        return self.model.classifier(features)


def _check_precision(precision: str, device: torch.device) -> None:
    if precision == "int8":
        raise EngineError("the torch engine runs fp32, bf16 or fp16; for int8 use engine='openvino' "
                          "or 'onnxruntime'")
    if precision == "fp16" and device.type != "cuda":
        raise EngineError("fp16 needs a CUDA GPU; on a CPU use bf16 (where it has bf16 units) or int8")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        raise EngineError("this CPU has no bf16 units (avx512_bf16 or amx_bf16), so bf16 would be "
                          "emulated and slower than fp32; use precision='int8' or 'fp32'")


def frozen_copy(model: Model, device: torch.device, dtype: torch.dtype) -> Model:
    """An eval-mode copy without hooks or gradients, with each BatchNorm folded into its
    depthwise convolution, on `device` in `dtype`."""
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    for module in list(frozen.modules()):
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
        for name, child in module.named_children():
            if isinstance(child, DepthwiseConvBatchNorm):
                setattr(module, name, _folded(child))
    return frozen.to(device=device, dtype=dtype)


def _folded(block: DepthwiseConvBatchNorm) -> nn.Conv2d:
    conv, bn = block.convolution, block.normalization
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                       conv.padding, groups=conv.groups, bias=True)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        folded.bias.copy_(bn.bias - bn.running_mean * scale)
    folded.weight.data = folded.weight.data.contiguous(memory_format=torch.channels_last)
    return folded.requires_grad_(False)


def _stage(stage: CvtStage, feature_map: Tensor) -> tuple[Tensor, Tensor | None]:
    x, height, width = stage.embedding(feature_map)
    if stage.cls_token is not None:
        x = torch.cat((stage.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for layer in stage.layers:
        x = _layer(layer, x, height, width)
    cls = None
    if stage.cls_token is not None:
        cls, x = x[:, :1], x[:, 1:]
    feature_map = x.reshape(x.shape[0], height, width, -1).permute(0, 3, 1, 2)
    return feature_map.contiguous(memory_format=torch.channels_last), cls


def _layer(layer: CvtLayer, x: Tensor, height: int, width: int) -> Tensor:
    """`layer(x)` writing both residual updates into `x` itself, with the MLP over row chunks."""
    residual = x.view(-1, x.shape[-1])  # (B*T, C), updated in place
    attended = layer.attention.attention(layer.layernorm_before(x), height, width)
    dense = layer.attention.output.dense
    residual.addmm_(attended.view(residual.shape), dense.weight.t()).add_(dense.bias)
    fc1, fc2 = layer.intermediate.dense, layer.output.dense
    quick = isinstance(layer.intermediate.activation, QuickGELU)
    # equal row chunks keep a CPU's cache warm (a small remainder chunk would run a slow GEMM);
    # a GPU wants the whole batch in one kernel
    chunks = -(-residual.shape[0] * fc1.out_features // MLP_CHUNK_ELEMENTS) if x.is_cpu else 1
    for part in residual.tensor_split(max(1, chunks)):
        hidden = torch.addmm(fc1.bias, layer.layernorm_after(part), fc1.weight.t())
        hidden = hidden.mul_(torch.sigmoid(1.702 * hidden)) if quick else torch.ops.aten.gelu_(hidden)
        part.addmm_(hidden, fc2.weight.t()).add_(fc2.bias)
    return x


def inference_plan(config: Any, pixel_values: Tensor) -> tuple[int, int]:
    """(groups, worker threads) for a batch: on a CPU, groups small enough that their
    activations stay in cache; with at least one image per intra-op thread, as many
    single-threaded workers, in equal shares. A GPU runs a batch whole."""
    batch = pixel_values.shape[0]
    if batch <= 1 or pixel_values.device.type != "cpu":
        return 1, 1
    height, width = stage_grids(config, *pixel_values.shape[-2:])[0]
    groups = -(-batch // max(1, GROUP_TOKENS // (height * width)))
    threads = torch.get_num_threads()
    workers = threads if batch >= threads >= 2 else 1
    return min(batch, -(-groups // workers) * workers), workers


# ---------------------------------------------------------------------------------------- threads
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (process id, workers, pool)
_pool_lock = threading.Lock()


def _worker_pool(workers: int) -> ThreadPoolExecutor:
    """This process's pool of `workers` single-threaded workers. They start at once, so that the
    caller's thread setting can be restored after theirs: torch.set_num_threads also changes
    process-wide defaults. A forked child (a DataLoader worker) gets a pool of its own."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[:2] != (os.getpid(), workers):
            if _pool is not None and _pool[0] == os.getpid():
                _pool[2].shutdown(wait=False)
            pool = ThreadPoolExecutor(workers, "cvt-group")
            caller_threads = torch.get_num_threads()
            started = threading.Barrier(workers, timeout=60)
            list(pool.map(lambda _: (torch.set_num_threads(1), started.wait()), range(workers)))
            torch.set_num_threads(caller_threads)
            _pool = (os.getpid(), workers, pool)
        return _pool[2]


def _map_in_threads(fn: Callable[[Tensor], Tensor], chunks: Sequence[Tensor], workers: int) -> list[Tensor]:
    """`[fn(c) for c in chunks]` on `workers` single-threaded worker threads, in inference mode
    (a per-thread setting)."""

    def run(chunk: Tensor) -> Tensor:
        with torch.inference_mode():
            return fn(chunk)

    return list(_worker_pool(workers).map(run, chunks))
