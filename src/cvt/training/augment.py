"""Training-time augmentation with torchvision's v2 transforms, and batch mixing (MixUp/CutMix).

Evaluation never augments: it uses the model's own `CvtImageProcessor`. Training crops to the
same size and normalises with the same mean and std, so train and eval inputs agree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..images.processing import CvtImageProcessor
from .recipes import Recipe


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block on the CPU generator seeded with `seed`, then restore the generator's state.
    (torchvision's random transforms draw from the global CPU generator.)"""
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


def train_transform(recipe: Recipe, processor: CvtImageProcessor) -> Callable:
    """RandomResizedCrop to the processor's size with its resampling filter, flip, (RandAugment),
    to a float tensor normalised with the processor's mean and std, (RandomErasing)."""
    from torchvision.transforms import v2

    mode = v2.InterpolationMode[Image.Resampling(processor.resample).name]
    steps: list = [v2.RandomResizedCrop(processor.size, scale=recipe.crop_scale, interpolation=mode)]
    if recipe.hflip:
        steps.append(v2.RandomHorizontalFlip(recipe.hflip))
    if recipe.randaugment:
        steps.append(RandAugmentM9(mode))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
              v2.Normalize(list(processor.image_mean), list(processor.image_std))]
    if recipe.random_erasing:
        steps.append(v2.RandomErasing(recipe.random_erasing, value="random"))
    return v2.Compose(steps)


class RandAugmentM9(torch.nn.Module):
    """RandAugment with two operations at magnitude 9 of 30 jittered by a standard deviation of
    0.5 per image (timm's 'rand-m9-mstd0.5', as the original CvT recipe)."""

    def __init__(self, interpolation) -> None:
        super().__init__()
        self.interpolation = interpolation

    def forward(self, image):
        from torchvision.transforms import v2

        magnitude = int(round(min(30.0, max(0.0, 9 + 0.5 * torch.randn(()).item()))))
        return v2.RandAugment(num_ops=2, magnitude=magnitude, num_magnitude_bins=31,
                              interpolation=self.interpolation)(image)


class BatchMixer:
    """MixUp or CutMix (one per batch, chosen at random) into label-smoothed soft targets."""

    def __init__(self, recipe: Recipe, num_classes: int) -> None:
        from torchvision.transforms import v2

        choices = []
        if recipe.mixup:
            choices.append(v2.MixUp(alpha=recipe.mixup, num_classes=num_classes))
        if recipe.cutmix:
            choices.append(v2.CutMix(alpha=recipe.cutmix, num_classes=num_classes))
        self.mix = v2.RandomChoice(choices) if choices else None
        self.num_classes, self.smoothing = num_classes, recipe.label_smoothing

    @property
    def active(self) -> bool:
        return self.mix is not None

    def __call__(self, images: Tensor, labels: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        with seeded(seed):
            images, targets = self.mix(images, labels)
        return images, targets * (1 - self.smoothing) + self.smoothing / self.num_classes


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against probability targets (mixed and smoothed labels)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
