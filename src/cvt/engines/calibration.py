"""Images from a user's folder for int8 calibration and for measuring what reduced precision costs.

The folder is searched recursively; up to `limit` images are taken, evenly spread over the
sorted file list (so every class folder contributes). When each image sits in a class folder
named after one of the model's labels, the images are labelled and accuracy is reported too.
Unreadable files are reported and skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from ..images import ImageError, find_images
from ..images.processing import CvtImageProcessor
from .base import EngineError

logger = logging.getLogger("cvt")

CALIBRATION_IMAGES = 300  # enough for post-training quantization statistics, quick to run
BATCH = 16


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    """Preprocessed batches (pixel_values, labels or None), and a digest of their contents."""

    batches: list[tuple[Tensor, Tensor | None]]
    digest: str

    @property
    def images(self) -> int:
        return sum(len(x) for x, _ in self.batches)


def load_calibration(folder: str | os.PathLike, processor: CvtImageProcessor,
                     labels: list[str] | None = None, limit: int = CALIBRATION_IMAGES) -> CalibrationSet:
    root = Path(folder)
    if not root.is_dir():
        raise EngineError(f"calibration: {folder} is not a folder of images")
    paths = find_images([root])
    step = max(1, len(paths) / limit)
    chosen = [paths[int(i * step)] for i in range(min(limit, len(paths)))]
    index = {name: i for i, name in enumerate(labels or [])}
    targets = [index.get(p.relative_to(root).parts[0]) if len(p.relative_to(root).parts) > 1 else None
               for p in chosen]
    labelled = all(t is not None for t in targets)
    pixels, kept = [], []
    for path, target in zip(chosen, targets):
        try:
            pixels.append(processor(path)["pixel_values"])
            kept.append(target)
        except ImageError as err:
            logger.warning("cvt: calibration: skipped %s", err)
    if not pixels:
        raise EngineError(f"calibration: no readable images in {folder}")
    digest = hashlib.sha256()
    batches = []
    for start in range(0, len(pixels), BATCH):
        x = torch.cat(pixels[start:start + BATCH])
        y = torch.tensor(kept[start:start + BATCH]) if labelled else None
        digest.update(x.numpy().tobytes())
        batches.append((x, y))
    logger.info("cvt: calibration: %d images from %s%s", len(pixels), folder,
                " (labelled by their class folders)" if labelled else "")
    return CalibrationSet(batches, digest.hexdigest())
