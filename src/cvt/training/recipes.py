"""Training recipes as data: every hyper-parameter of a run that is not about the data or model.

`finetune` suits a few thousand labelled images and a pretrained checkpoint; `paper` is the
microsoft/CvT ImageNet-1k recipe (experiments/imagenet/cvt/cvt-13-224x224.yaml and
lib/config/default.py). Command-line options override single fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import InvalidValueError


@dataclass(frozen=True)
class Recipe:
    epochs: int
    batch_size: int  # images per optimiser step, over all processes and accumulation steps
    lr: float  # peak learning rate at `lr_batch` images per step; scaled linearly with batch_size
    lr_batch: int
    weight_decay: float  # not applied to norms, biases and cls tokens
    warmup_epochs: float  # linear from warmup_lr to the peak, then cosine down to min_lr
    warmup_lr: float
    min_lr: float
    label_smoothing: float
    crop_scale: tuple[float, float]  # RandomResizedCrop area range
    hflip: float  # probability of a horizontal flip
    randaugment: bool  # RandAugment, magnitude 9 with standard deviation 0.5
    random_erasing: float  # probability
    mixup: float  # MixUp alpha (0: off)
    cutmix: float  # CutMix alpha (0: off); with both, each batch uses one of them
    clip_grad: float | None  # max gradient norm
    ema_decay: float | None  # exponential moving average of the weights, per optimiser step

    def peak_lr(self, batch_size: int) -> float:
        return self.lr * batch_size / self.lr_batch

    def replace(self, **changes) -> Recipe:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


RECIPES: dict[str, Recipe] = {
    "finetune": Recipe(
        epochs=10, batch_size=32, lr=1e-4, lr_batch=32, weight_decay=0.05, warmup_epochs=1,
        warmup_lr=1e-6, min_lr=1e-6, label_smoothing=0.1, crop_scale=(0.25, 1.0), hflip=0.5,
        randaugment=False, random_erasing=0.0, mixup=0.0, cutmix=0.0, clip_grad=1.0, ema_decay=None),
    "paper": Recipe(
        epochs=300, batch_size=2048, lr=1e-3, lr_batch=1024, weight_decay=0.05, warmup_epochs=5,
        warmup_lr=1e-6, min_lr=1e-5, label_smoothing=0.1, crop_scale=(0.08, 1.0), hflip=0.5,
        randaugment=True, random_erasing=0.25, mixup=0.8, cutmix=1.0, clip_grad=None, ema_decay=None),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise InvalidValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]
