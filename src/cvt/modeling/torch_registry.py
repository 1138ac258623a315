"""Everything cvt writes into torch's global registries, in this one place, done once when
`cvt.modeling` is imported (`register`): FLOP formulas for the CPU flash-attention kernels that
`scaled_dot_product_attention` runs (torch's `FlopCounterMode` has them only for the GPU
kernels): without them a FLOP count on the CPU silently leaves attention out. A torch that has
its own keeps its own. (The model outputs are transformers' `ModelOutput`s, which register
themselves as pytree nodes.)
"""

from __future__ import annotations

import torch
from torch.utils import flop_counter

_done: set[str] = set()


def register() -> None:
    """Register the CPU attention FLOP formulas (once)."""
    if not _done:
        _register_cpu_attention_flops()
        _done.add("flops")


def _register_cpu_attention_flops() -> None:
    aten = torch.ops.aten
    forward_op = aten._scaled_dot_product_flash_attention_for_cpu
    backward_op = aten._scaled_dot_product_flash_attention_for_cpu_backward
    if forward_op in flop_counter.flop_registry:  # a newer torch has its own
        return

    @flop_counter.register_flop_formula(forward_op)
    def _forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    @flop_counter.register_flop_formula(backward_op)
    def _backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)
