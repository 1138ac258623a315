"""Everything cvt writes into torch's global registries, in this one place, done once when
`cvt.modeling` is imported (`register`):

- the model outputs (`BaseModelOutputWithCLSToken`, `ImageClassifierOutput`) as pytree nodes
  (`torch.export.register_dataclass`), so `torch.export.export(model, (x,))` works with the
  default `return_dict=True` and the exported module returns the same dataclasses, read by key
  (`out["logits"]`) as eager ones;
- FLOP formulas for the CPU flash-attention kernels that `scaled_dot_product_attention` runs
  (torch's `FlopCounterMode` has them only for the GPU kernels): without them a FLOP count on
  the CPU silently leaves attention out. A torch that has its own keeps its own.
"""

from __future__ import annotations

import torch
from torch.utils import flop_counter

_done: set[str] = set()


def register(*outputs: type) -> None:
    """Register the output dataclasses `outputs` and the CPU attention FLOP formulas (once)."""
    for cls in outputs:
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name not in _done:
            torch.export.register_dataclass(cls, serialized_type_name=name)
            _done.add(name)
    if "flops" not in _done:
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
