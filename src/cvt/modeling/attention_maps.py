"""What a CvT model looks at: `attention_maps(model, image)` and `draw(maps, ...)` (`cvt attention`).

All maps are of the last stage, on its token grid (H, W), for one image:

- `heads` / `mean`: the last layer's attention from the cls token to every position, per head
  and averaged over heads; for a model without a cls token, the mean attention each position
  receives (averaged over all queries).
- `rollout`: attention rollout (Abnar & Zuidema, 2020) through the stage's layers: each layer's
  head-averaged attention plus the identity (the residual), rows renormalised, multiplied from
  the first layer to the last; then the cls token's row (or, without one, the mean row).

Keys live on a coarser grid than queries when `stride_kv > 1`. Every key axis is resampled to
the token grid explicitly: the spatial keys' map is upsampled bilinearly (align_corners=False)
and rescaled to keep its total, so each row still sums to 1; the cls key is kept as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..config import kv_grid, stage_grids
from ..images import ImageInput
from . import CvtForImageClassification, CvtModel
from ..images.processing import CvtImageProcessor
from ..constants import PICTURE_SIZE_RANGE
from ..errors import InvalidValueError, check_size

# viridis at five points: a perceptually even ramp that needs no plotting library
_COLORS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], float)


@dataclass(frozen=True)
class AttentionMaps:
    """One image's attention maps (float32 numpy arrays on the last stage's H x W token grid)
    and `image`, the RGB picture the model saw (after resizing and cropping)."""

    image: Image.Image
    heads: np.ndarray  # (heads, H, W)
    mean: np.ndarray  # (H, W)
    rollout: np.ndarray  # (H, W)
    cls_token: bool  # True: attention from the cls token; False: mean attention received


def attention_maps(model: CvtModel | CvtForImageClassification, image: ImageInput,
                   processor: CvtImageProcessor | None = None) -> AttentionMaps:
    """The attention maps of `model` for one image (a path, PIL image, array or tensor),
    preprocessed with `processor` (default: the preprocessing the model carries)."""
    if not isinstance(model, (CvtModel, CvtForImageClassification)):
        raise TypeError(f"model must be a cvt.CvtModel or cvt.CvtForImageClassification, "
                        f"got {type(model).__name__}")
    if processor is None:
        if model.preprocessing is None:
            raise InvalidValueError("this model carries no preprocessing; pass processor=CvtImageProcessor(size=...)")
        processor = CvtImageProcessor.from_dict(model.preprocessing)
    pixel_values = processor(image)["pixel_values"]
    parameter = next(model.parameters())
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(pixel_values.to(parameter.device, parameter.dtype), output_attentions=True)
    finally:
        model.train(was_training)
    config, stage = model.config, model.config.num_stages - 1
    grid = stage_grids(config, *pixel_values.shape[-2:])[stage]
    key_grid = kv_grid(config, stage, *grid)
    layers = [a[0].float().cpu() for a in out.attentions[-config.depth[stage]:]]  # (heads, T_q, T_kv)
    cls = config.cls_token[stage]
    heads = _position_maps(keys_on_token_grid(layers[-1], key_grid, grid, cls), cls)
    rolled = _position_maps(rollout([keys_on_token_grid(a.mean(0), key_grid, grid, cls) for a in layers]), cls)
    return AttentionMaps(image=_seen_image(pixel_values[0], processor),
                         heads=heads.reshape(-1, *grid).numpy(), mean=heads.mean(0).reshape(grid).numpy(),
                         rollout=rolled.reshape(grid).numpy(), cls_token=cls)


def keys_on_token_grid(probabilities: Tensor, key_grid: tuple[int, int], grid: tuple[int, int],
                       cls: bool) -> Tensor:
    """(..., T_kv) attention over keys on `key_grid` -> (..., T_q) over the token `grid`: the
    spatial part upsampled bilinearly and rescaled to its former total; a cls key stays first."""
    split = 1 if cls else 0
    first, spatial = probabilities[..., :split], probabilities[..., split:]
    maps = spatial.reshape(-1, 1, *key_grid)
    resampled = F.interpolate(maps, size=grid, mode="bilinear", align_corners=False)
    total = maps.sum((-2, -1), keepdim=True)
    resampled = resampled * total / resampled.sum((-2, -1), keepdim=True).clamp_min(1e-30)
    return torch.cat((first, resampled.reshape(*spatial.shape[:-1], -1)), -1)


def rollout(layers: list[Tensor]) -> Tensor:
    """Attention rollout of square (T, T) head-averaged attention matrices, first layer first:
    the product of (A + I) / 2 over the layers, the last layer leftmost."""
    identity = torch.eye(layers[0].shape[-1])
    result = identity
    for attention in layers:
        result = ((attention + identity) / 2) @ result
    return result


def _position_maps(square: Tensor, cls: bool) -> Tensor:
    """(..., T, T) token-to-token attention -> (..., H*W) per position: the cls token's row
    without its own column, or (no cls token) the mean over all rows."""
    return square[..., 0, 1:] if cls else square.mean(-2)


def _seen_image(pixel_values: Tensor, processor: CvtImageProcessor) -> Image.Image:
    """The (3, H, W) model input back as the 8-bit RGB picture it was made from."""
    values = pixel_values.permute(1, 2, 0).numpy().astype(np.float64)
    if processor.do_normalize:
        values = values * np.asarray(processor.image_std) + np.asarray(processor.image_mean)
    if processor.do_rescale:
        values = values / processor.rescale_factor
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def draw(maps: AttentionMaps, which: str | int = "mean", size: int | None = None,
         opacity: float = 0.6) -> Image.Image:
    """`maps.image` (at `size` x `size` pixels, default its own size) under one map, min-max
    scaled and coloured (viridis): "mean", "rollout" or a head's index."""
    if which in ("mean", "rollout"):
        values = getattr(maps, which)
    elif isinstance(which, int) and not isinstance(which, bool) and 0 <= which < len(maps.heads):
        values = maps.heads[which]
    else:
        raise InvalidValueError(f"which map to draw: 'mean', 'rollout' or a head index 0-{len(maps.heads) - 1}, "
                         f"got {which!r}")
    if size is not None:
        check_size("the picture size", size, PICTURE_SIZE_RANGE)
    width, height = (size, size) if size is not None else maps.image.size
    span = float(values.max() - values.min())
    scaled = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    heat = Image.fromarray(scaled.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
    levels = np.clip(np.asarray(heat), 0, 1) * (len(_COLORS) - 1)
    colored = np.stack([np.interp(levels, np.arange(len(_COLORS)), _COLORS[:, c]) for c in range(3)], -1)
    picture = np.asarray(maps.image.resize((width, height), Image.Resampling.BICUBIC), float)
    blended = (1 - opacity) * picture + opacity * colored
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
