"""`CvtImageProcessor`: takes images and returns the normalised `pixel_values` batch that CvT checkpoints expect.

This is the recipe the released checkpoints were evaluated with. transformers ships it as the
ConvNext image processor in every CvT hub repo. Below 384 pixels: resize the short side to
size / crop_pct (bicubic) and centre-crop size x size. At 384 and above: resize straight to
size x size, with no crop. Then scale to [0, 1] and normalise with the ImageNet mean/std.
Settings are read from and written to transformers' `preprocessor_config.json`, so a checkpoint
folder carries its own preprocessing.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature

from ..checkpoints import hub
from ..checkpoints.read import PROCESSOR_CONFIG_NAME, stored_preprocessing
from ..files import write_json
from . import ImageInput, as_rgb_image, check_budget, split_batch
from ..variants import IMAGENET_MEAN, IMAGENET_STD
from ..constants import IMAGE_SIZE_RANGE
from ..errors import CheckpointError, InvalidValueError, check_size

WARP_FROM = 384  # from this size up the checkpoints were evaluated on the whole image, warped
RETURN_TENSORS = ("pt", "np")
_RESAMPLE_CODES = {int(r) for r in Image.Resampling}


@dataclass(frozen=True)
class CvtImageProcessor:
    """Preprocessing settings, with transformers' ConvNext image processor names and defaults for CvT.

    `resample` is a Pillow filter code (3 = bicubic). Call it as transformers' processors are
    called: `processor(images, return_tensors="pt")["pixel_values"]` gives a (B, 3, size, size)
    float32 batch. `images` can be one image or a list of them: file paths, PIL images, numpy
    arrays or torch tensors (see `cvt.images.as_rgb_image`).
    """

    size: int = 224
    crop_pct: float = 0.875
    resample: int = int(Image.Resampling.BICUBIC)
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        check_size("the image size", self.size, IMAGE_SIZE_RANGE)
        if not _is_number(self.crop_pct) or not 0 < self.crop_pct <= 1:
            raise InvalidValueError(f"crop_pct must be a number in (0, 1], got {self.crop_pct!r}")
        if isinstance(self.resample, bool) or self.resample not in _RESAMPLE_CODES:
            raise InvalidValueError(f"resample must be a Pillow filter code {sorted(_RESAMPLE_CODES)} "
                             f"(3 = bicubic), got {self.resample!r}")
        for name in ("do_resize", "do_rescale", "do_normalize"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not _is_number(self.rescale_factor) or self.rescale_factor <= 0:
            raise InvalidValueError(f"rescale_factor must be a positive number, got {self.rescale_factor!r}")
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if (not isinstance(values, (list, tuple)) or len(values) != 3
                    or not all(_is_number(v) for v in values)):
                raise InvalidValueError(f"{name} must be three numbers (R, G, B), got {values!r}")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if min(self.image_std) <= 0:
            raise InvalidValueError(f"image_std must be positive, got {self.image_std}")
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "resample", int(self.resample))

    # ------------------------------------------------------------------------------------ images
    def __call__(self, images: ImageInput | list[ImageInput], return_tensors: str = "pt"
                 ) -> BatchFeature:
        """{"pixel_values": (B, 3, H, W) float32}, a torch tensor ("pt") or a numpy array ("np"),
        as transformers' `BatchFeature` (`.to(device)`), so transformers' pipelines take it."""
        if return_tensors not in RETURN_TENSORS:
            raise InvalidValueError(f"return_tensors must be one of {RETURN_TENSORS}, got {return_tensors!r}")
        items, _ = split_batch(images)
        if not items:
            raise InvalidValueError("no images given (an empty list)")
        arrays = [self._pixel_values(as_rgb_image(item)) for item in items]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise InvalidValueError(f"images of different sizes {sorted(shapes)} cannot be batched with "
                             f"do_resize=False; resize them first or process them one at a time")
        batch = np.stack(arrays)
        return BatchFeature({"pixel_values": torch.from_numpy(batch) if return_tensors == "pt" else batch})

    def _pixel_values(self, image: Image.Image) -> np.ndarray:
        """(3, H, W) float32 of one RGB image: resize/crop, rescale, normalise."""
        if self.do_resize:
            image = self._resize(image)
        check_budget(*image.size, "its float64 copy", bytes_per_pixel=24)  # 3 channels of 8 bytes
        pixels = np.asarray(image)
        if self.do_rescale:  # in float64, then float32, exactly as transformers does
            values = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            values = pixels.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            values = (values - mean) / std
        return np.ascontiguousarray(values.transpose(2, 0, 1))

    def _resize(self, image: Image.Image) -> Image.Image:
        """Resize (and crop); the resized image and the resize's intermediate (at most the larger
        of each side) are checked against the pixel budget first (an extreme aspect ratio would
        make a huge one)."""
        width, height = image.size
        if self.size >= WARP_FROM:
            new_width = new_height = self.size
        else:
            short_side = int(self.size / self.crop_pct)
            if width <= height:
                new_width, new_height = short_side, int(short_side * height / width)
            else:
                new_width, new_height = int(short_side * width / height), short_side
        check_budget(max(width, new_width), max(height, new_height),
                     f"resizing this {width}x{height} image")
        image = image.resize((new_width, new_height), resample=self.resample)
        if self.size >= WARP_FROM:
            return image
        left, top = (new_width - self.size) // 2, (new_height - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    # ------------------------------------------------------------------------------------ config
    def to_dict(self) -> dict[str, Any]:
        """transformers' `preprocessor_config.json` contents (a ConvNext image processor)."""
        return {
            "image_processor_type": "ConvNextImageProcessor",
            "size": {"shortest_edge": self.size},
            "crop_pct": self.crop_pct,
            "resample": self.resample,
            "do_resize": self.do_resize,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CvtImageProcessor:
        """Read a `preprocessor_config.json`'s contents. Keys not listed here (`image_processor_type`, ...)
        describe the file and are ignored. A missing or null key keeps the default. `size` may
        be an int (older hub files) or {"shortest_edge": n}."""
        if not isinstance(data, dict):
            raise InvalidValueError(f"a processor config must be a JSON object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls) if f.name != "size"]
        settings = {name: data[name] for name in names if data.get(name) is not None}
        if data.get("size") is not None:
            settings["size"] = _shortest_edge(data["size"])
        return cls(**settings)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **hub_kwargs: Any) -> CvtImageProcessor:
        """The processor of a checkpoint folder or hub repo (its preprocessor_config.json), or of a
        named variant ("cvt-13", ...; see `cvt.list_models()`; known without the hub). `revision`, `cache_dir`, `token` and
        `local_files_only` are passed to the hub."""
        unknown = set(hub_kwargs) - hub.HUB_ARGUMENTS
        if unknown:
            raise TypeError(f"from_pretrained got unexpected arguments: {', '.join(sorted(unknown))}")
        data = stored_preprocessing(name_or_path, hub_kwargs)
        if data is None and hub.locate(name_or_path).kind == "file":
            raise CheckpointError(
                f"{name_or_path} is a single weights file, which carries no preprocessing; use a "
                f"variant's (CvtImageProcessor.from_pretrained('cvt-13')) or give image_size")
        if data is None:
            raise CheckpointError(
                f"{name_or_path} has no {PROCESSOR_CONFIG_NAME}, so its preprocessing is unknown; "
                f"save one with CvtImageProcessor(size=...).save_pretrained(folder), or use a "
                f"variant's, e.g. CvtImageProcessor.from_pretrained('cvt-13')")
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise CheckpointError(f"{name_or_path}'s {PROCESSOR_CONFIG_NAME}: {err}") from None

    @classmethod
    def for_model(cls, name_or_path: str | os.PathLike, image_size: int | None = None,
                  **hub_kwargs: Any) -> CvtImageProcessor:
        """The preprocessing to run a model with: its own (`from_pretrained`), at `image_size` if
        given; CvT's standard preprocessing at `image_size` for a model that carries none (a
        single weights file, a config). Without either, a `CheckpointError` (guessing a size
        silently would degrade results)."""
        if image_size is not None:
            check_size("the image size", image_size, IMAGE_SIZE_RANGE)
        try:
            processor = cls.from_pretrained(name_or_path, **hub_kwargs)
        except CheckpointError as err:
            if image_size is None or isinstance(err, hub.HubUnreachableError):
                raise CheckpointError(f"{err}; or give an image size (--image-size) to use "
                                              f"CvT's standard preprocessing") from None
            processor = cls()
        return dataclasses.replace(processor, size=image_size) if image_size is not None else processor

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `preprocessor_config.json` (readable here and by transformers) into `folder`."""
        write_json(Path(folder) / PROCESSOR_CONFIG_NAME, self.to_dict())


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _shortest_edge(size: Any) -> int:
    if isinstance(size, dict):
        if "shortest_edge" not in size:
            raise InvalidValueError(
                f"size {size} has no 'shortest_edge'; CvT checkpoints use ConvNext-style preprocessing "
                f"(size: {{\"shortest_edge\": n}})")
        size = size["shortest_edge"]
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidValueError(f"size must be an integer or {{\"shortest_edge\": n}}, got {size!r}")
    return size
