"""Everything a user calls an image, turned into an 8-bit RGB PIL image: the one place images are decoded.

Files are decoded in full here, so a file that is not an image, is truncated or is corrupt fails at
once with an `ImageError` naming the file and the reason, not later inside a batch. Pillow's pixel
limit (`PIL.Image.MAX_IMAGE_PIXELS`) refuses decompression bombs. EXIF orientation is applied.
Transparency is composited on white, because the colour hidden under transparent pixels is
arbitrary. 16-bit and float images are scaled to 8 bits, not clipped. Nothing passed in is
modified: every conversion makes a new image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]

# What `cvt predict` picks up when walking a folder (compared case-insensitively).
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
})
_CHANNEL_COUNTS = (1, 3, 4)  # grey, RGB, RGBA
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WHITE = (255, 255, 255, 255)


class ImageError(ValueError):
    """An input that cannot be used as an image: unreadable file, unknown format, unusable array."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to RGB, with EXIF orientation applied; `ImageError` says why it cannot."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()  # decode now: truncation and corrupt data surface here, not later
            return to_rgb(image)
    except Image.DecompressionBombError as err:
        raise ImageError(f"{path}: refused as a possible decompression bomb: {err}") from None
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image file") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file (or in a format Pillow cannot read)") from None
    except ImageError as err:
        raise ImageError(f"{path}: {err}") from None
    except OSError as err:
        if "truncated" in str(err):
            raise ImageError(f"{path}: truncated image file (an incomplete download or copy?)") from None
        raise ImageError(f"{path}: corrupt image data: {err}") from None
    except Exception as err:  # Pillow's decoders also raise SyntaxError, ValueError, EOFError, ...
        raise ImageError(f"{path}: corrupt image data: {type(err).__name__}: {err}") from None


def as_rgb_image(image: ImageInput) -> Image.Image:
    """One image of any supported kind as an 8-bit RGB PIL image.

    Paths are loaded with `load_image`. Arrays and tensors may be (H, W), (H, W, C) or (C, H, W)
    with C = 1, 3 or 4: uint8 (0-255), uint16 (0-65535), other integers in 0-255, or floats in
    [0, 1] (rounded to the nearest 8-bit value). An array whose first and last dimensions could
    both be channels is read as HWC if it is a numpy array and CHW if it is a tensor, which is
    how each library usually stores images.
    """
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        try:
            image.load()
        except Exception as err:  # a lazily opened file that turns out to be broken
            raise ImageError(f"the PIL image could not be decoded: {type(err).__name__}: {err}") from None
        return to_rgb(image)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        return _array_to_rgb(tensor.numpy(), channels_first=True)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, channels_first=False)
    raise TypeError(f"cannot use a {type(image).__name__} as an image; expected a file path, "
                    f"a PIL image, a numpy array or a torch tensor")


def split_batch(images: ImageInput | Sequence[ImageInput]) -> tuple[list[ImageInput], bool]:
    """(the single images, whether a batch was given): a list or tuple, or a 4-D array or tensor."""
    if isinstance(images, (list, tuple)):
        return list(images), True
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images), True
    return [images], False


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy (or `image` itself if already upright RGB) of a PIL image of any mode."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
        return Image.fromarray(_to_uint8(values)).convert("RGB")
    if image.mode == "F":
        return _array_to_rgb(np.asarray(image), channels_first=False)
    if image.has_transparency_data:
        background = Image.new("RGBA", image.size, _WHITE)
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ImageError(f"cannot convert a {image.mode} image to RGB: {err}") from None


def _array_to_rgb(array: np.ndarray, channels_first: bool) -> Image.Image:
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim == 3:
        first, last = array.shape[0] in _CHANNEL_COUNTS, array.shape[-1] in _CHANNEL_COUNTS
        if not (first or last):
            raise ImageError(
                f"an image array must be (H, W), (H, W, C) or (C, H, W) with C = 1, 3 or 4 "
                f"channels; got shape {array.shape}")
        if first and (channels_first or not last):
            array = np.moveaxis(array, 0, -1)
    else:
        raise ImageError(
            f"an image array must have 2 or 3 dimensions (a batch may have 4); got shape {array.shape}")
    pixels = np.ascontiguousarray(_to_uint8(array))
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    return to_rgb(Image.fromarray(pixels))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """8-bit values for an array of any supported dtype (see `as_rgb_image`); a new array or `array`."""
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # uint16, either byte order
        return np.round(array / 257.0).astype(np.uint8)  # 257 * v -> v exactly
    if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.integer)
                                       or np.issubdtype(array.dtype, np.floating)):
        raise ImageError(f"image arrays must hold integers or floats, got dtype {array.dtype}")
    if array.size == 0:
        raise ImageError(f"the image array is empty (shape {array.shape})")
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ImageError(
                f"integer pixel values must lie in 0-255 (uint16 images: 0-65535); got {array.dtype} "
                f"values in [{low}, {high}]")
        return array.astype(np.uint8)
    if not np.isfinite(array).all():
        raise ImageError("the image array holds NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        raise ImageError(
            f"float pixel values must lie in [0, 1]; got values in [{low:g}, {high:g}] (for 0-255 "
            f"values pass a uint8 array, e.g. array.astype(np.uint8))")
    return np.round(array.astype(np.float64) * 255).astype(np.uint8)


def find_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named directly (whatever their extension), plus the image files found recursively in
    named folders, in sorted order. Files are picked by extension, and hidden files and folders
    (".*") are skipped. A missing path, or no image at all, is an error."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for root, folders, files in os.walk(path):
                folders[:] = sorted(f for f in folders if not f.startswith("."))
                found += [Path(root, name) for name in sorted(files) if not name.startswith(".")
                          and Path(name).suffix.lower() in IMAGE_EXTENSIONS]
        elif path.exists():
            found.append(path)
        else:
            raise ValueError(f"{item}: no such file or folder")
    if not found:
        raise ValueError(f"no image files in {', '.join(map(str, inputs))} "
                         f"(looked for {' '.join(sorted(IMAGE_EXTENSIONS))})")
    return list(dict.fromkeys(found))
