"""AdamW parameter groups, the per-iteration learning-rate schedule, and the weight EMA."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and norms, biases and cls tokens without decay (as the
    original code's WITHOUT_WD_LIST and no_weight_decay()). Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith("cls_token") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


MAX_WARMUP_FRACTION = 0.2  # a short run still reaches its peak and decays (1 epoch of a 1-epoch fine-tune would not)


class WarmupCosine:
    """Learning rate at an optimiser step: linear warmup to `peak`, then cosine decay to `floor`.
    The warm-up is at most MAX_WARMUP_FRACTION of the run.

    Stateless: the step count (saved with the training state) is all it needs to resume."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int, start: float, floor: float) -> None:
        self.peak, self.total, self.start, self.floor = peak, max(1, total_steps), start, floor
        self.warmup = min(warmup_steps, int(MAX_WARMUP_FRACTION * self.total))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.start + (self.peak - self.start) * step / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (self.peak - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


class WeightEMA:
    """Exponential moving average of a model's weights, kept as a second model (evaluated and
    saved in place of the trained one). Float parameters and buffers are averaged; integer
    buffers (BatchNorm's batch counters) are copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        for key, average in self.model.state_dict().items():
            if average.is_floating_point():
                average.lerp_(current[key], 1 - self.decay)
            else:
                average.copy_(current[key])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
