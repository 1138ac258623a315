"""Named CvT variants as data: architecture, input size, preprocessing, labels, hub id.

`list_models()` names them; `cvt.create_model(name)` (in `cvt.modeling`) builds one. The 1000 ImageNet-1k class names ship with the
package in the standard order (taken from timm's `imagenet_synset_to_lemma.txt`, Apache-2.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import CvtConfig

from .errors import InvalidValueError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIL_FILTERS = {"bilinear": 2, "bicubic": 3}  # Pillow's resampling codes, as the JSON stores them


@dataclass(frozen=True)
class Variant:
    """A published CvT checkpoint: its architecture and how its inputs were prepared."""

    name: str
    architecture: dict[str, Any]
    image_size: int
    pretraining: str  # "imagenet-1k" or "imagenet-22k" (all heads are ImageNet-1k)
    top1: float  # ImageNet-1k top-1 (%) reported by the authors
    crop_pct: float = 0.875  # below 384: resize the short side to size / crop_pct, centre-crop
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def hub_id(self) -> str:
        return f"microsoft/{self.name}"

    def preprocessor_config(self) -> dict[str, Any]:
        """Its evaluation preprocessing as transformers' preprocessor_config.json contents (a
        ConvNext image processor; `CvtImageProcessor` reads and writes the same keys)."""
        return {"image_processor_type": "ConvNextImageProcessor",
                "size": {"shortest_edge": self.image_size}, "crop_pct": self.crop_pct,
                "resample": PIL_FILTERS[self.interpolation], "do_resize": True, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(self.mean),
                "image_std": list(self.std)}

    def config(self, **overrides: Any) -> CvtConfig:
        """Its architecture with the ImageNet-1k labels, and any fields in `overrides` changed.
        (CvtConfig, a transformers config, is imported here: the variants' names and sizes are
        read by `cvt --help`, which loads neither transformers nor torch.)"""
        from .config import CvtConfig

        base = CvtConfig(**self.architecture, id2label=dict(enumerate(imagenet_1k_labels())))
        return base.replace(**overrides) if overrides else base


_CVT_13 = dict(depth=(1, 2, 10))
_CVT_21 = dict(depth=(1, 4, 16))
_CVT_W24 = dict(depth=(2, 2, 20), embed_dim=(192, 768, 1024), num_heads=(3, 12, 16),
                drop_path_rate=(0.0, 0.0, 0.3))

VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("cvt-13", _CVT_13, 224, "imagenet-1k", 81.6),
    Variant("cvt-13-384", _CVT_13, 384, "imagenet-1k", 83.0),
    Variant("cvt-13-384-22k", _CVT_13, 384, "imagenet-22k", 83.3),
    Variant("cvt-21", _CVT_21, 224, "imagenet-1k", 82.5),
    Variant("cvt-21-384", _CVT_21, 384, "imagenet-1k", 83.3),
    Variant("cvt-21-384-22k", _CVT_21, 384, "imagenet-22k", 84.9),
    Variant("cvt-w24-384-22k", _CVT_W24, 384, "imagenet-22k", 87.6),
)}


def list_models() -> list[str]:
    """Names accepted by `create_model` (and as `microsoft/<name>` hub ids)."""
    return list(VARIANTS)


def get_variant(name: str) -> Variant:
    """The published variant `name` ("cvt-13" or its hub id "microsoft/cvt-13"), as data."""
    key = name.removeprefix("microsoft/")
    if key not in VARIANTS:
        raise InvalidValueError(f"unknown CvT variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[key]


@lru_cache(maxsize=1)
def imagenet_1k_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, index order as in every CvT checkpoint."""
    text = resources.files("cvt").joinpath("imagenet_1k_labels.txt").read_text(encoding="utf-8")
    return tuple(text.splitlines())
