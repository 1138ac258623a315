"""Training recipes as data: every hyper-parameter of a run that is not about the data or model.

`finetune` suits a few thousand labelled images and a pretrained checkpoint; `paper` is the
microsoft/CvT ImageNet-1k recipe (experiments/imagenet/cvt/cvt-13-224x224.yaml and
lib/config/default.py). Command-line options override single fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import InvalidValueError, Range


WHOLE, COUNT = Range(True, 0), Range(True, 1)  # 0 or more; 1 or more
PROBABILITY = Range(False, 0, 1)
# every number a run takes, by its name (a Recipe field or a `cvt train` option), and what it
# may be: checked when a Recipe is made and when `cvt train` parses its options, so that NaN, 0
# or a probability of 7 is a one-line error before any work, never a traceback mid-run
BOUNDS: dict[str, Range] = {
    "epochs": COUNT, "batch_size": COUNT, "lr": Range(False, 0, low_open=True), "lr_batch": COUNT,
    "weight_decay": Range(False, 0), "warmup_epochs": Range(False, 0), "warmup_lr": Range(False, 0),
    "min_lr": Range(False, 0), "label_smoothing": Range(False, 0, 1, high_open=True),
    "hflip": PROBABILITY, "random_erasing": PROBABILITY, "mixup": Range(False, 0), "cutmix": Range(False, 0),
    "clip_grad": Range(False, 0, low_open=True), "ema_decay": Range(False, 0, 1, high_open=True),
    "val_split": Range(False, 0, 1, high_open=True), "accum_steps": COUNT, "workers": WHOLE,
    "save_every": COUNT, "stop_at_step": COUNT, "extend_epochs": COUNT,
}


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

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if name in BOUNDS and value is not None:
                BOUNDS[name].check(f"the recipe's {name}", value)
        low, high = self.crop_scale
        if not (low in PROBABILITY and high in PROBABILITY and 0 < low <= high):
            raise InvalidValueError(f"the recipe's crop_scale must be two numbers 0 < low <= high <= 1; "
                                    f"got {self.crop_scale!r}")

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
