"""Everything a user calls an image, turned into an 8-bit RGB PIL image: the one place images are decoded.

Files are decoded in full here, so a file that is not an image, is truncated or is corrupt fails at
once with an `ImageError` naming the file and the reason, not later inside a batch. Only regular
files are opened (a FIFO or a device would block or never end). One pixel budget, `MAX_PIXELS`,
bounds memory: a file's size is read from its header before anything is decoded, a JPEG larger
than the budget is decoded at a reduced size (1/2 to 1/8, Pillow's `draft`), any other image larger
than it is refused, and preprocessing checks its own intermediates against it (`check_budget`).
EXIF orientation is applied. Transparency is composited on white, because the colour hidden
under transparent pixels is arbitrary. 16-bit and float images are scaled to 8 bits, not clipped;
integer images wider than 16 bits by their real range. Nothing passed in is modified: every
conversion makes a new image.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import stat
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from ..errors import InvalidValueError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]

# What `cvt predict` picks up when walking a folder (compared case-insensitively).
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
})
_CHANNEL_COUNTS = (1, 3, 4)  # grey, RGB, RGBA
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # integer modes wider than 8 bits
_WHITE = (255, 255, 255)
# The pixel budget: no decoded image, and no copy made while preparing one, may hold more than
# this many 4-byte pixels (96 MB). A 24 MP camera image fits; larger JPEGs are decoded reduced.
MAX_PIXELS = 24_000_000
_DRAFT_SCALES = (2, 4, 8)  # the reductions a JPEG decoder does for free
_CHUNK = 1 << 20  # elements converted at a time, so scaling to 8 bits adds no full float copy


class ImageError(InvalidValueError):
    """An input that cannot be used as an image: unreadable file, unknown format, unusable array."""


def check_budget(width: int, height: int, what: str, bytes_per_pixel: int = 4) -> None:
    """`ImageError` unless a width x height image of `bytes_per_pixel` fits the pixel budget
    (`MAX_PIXELS` pixels of 4 bytes); called before the memory is spent."""
    if width < 1 or height < 1:
        raise ImageError(f"the image is empty ({width}x{height} pixels)")
    if width * height * bytes_per_pixel > MAX_PIXELS * 4:
        raise ImageError(
            f"{what} would need {width}x{height} pixels ({width * height / 1e6:.1f} Mpx at "
            f"{bytes_per_pixel} bytes each), over cvt's budget of {MAX_PIXELS / 1e6:g} Mpx of 4 bytes; "
            f"refused before using the memory (downscale or crop the image first)")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to RGB, with EXIF orientation applied; `ImageError` says why it cannot.

    Only regular files are read. An image over the pixel budget is refused before it is decoded,
    except a JPEG, which is decoded at the smallest reduction (1/2, 1/4, 1/8) that fits.
    """
    with _opened(Path(path)) as image:
        image.load()  # decode now: truncation and corrupt data surface here, not later
        return to_rgb(image)


def load_image_bytes(data: bytes, name: str = "the upload") -> Image.Image:
    """Decode an image held in memory (an upload) exactly as `load_image` decodes a file: the
    same budget and the same messages, `name` standing for the file's path in them."""
    with _opened(Path(name), data) as image:
        image.load()
        return to_rgb(image)


def check_image_file(path: str | os.PathLike) -> None:
    """A cheap check, without decoding, that `path` is a regular image file within the pixel
    budget (a JPEG counted at the size it will be decoded at); `ImageError` says why not."""
    with _opened(Path(path)) as image:
        image.verify()


@contextlib.contextmanager
def _opened(path: Path, data: bytes | None = None) -> Iterator[Image.Image]:
    """The image file at `path` (or, given `data`, those bytes, named `path` in messages), opened
    (not decoded) and fitted to the budget; any failure, here or in the caller's block, becomes an
    `ImageError` naming the file and the reason."""
    try:
        source = _open_regular(path) if data is None else io.BytesIO(data)
        with source as file, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our budget decides
            with Image.open(file) as image:
                _fit_budget(image)
                yield image
    except Image.DecompressionBombError as err:
        raise ImageError(f"{path}: refused as a possible decompression bomb "
                         f"(over cvt's budget of {MAX_PIXELS / 1e6:g} Mpx): {err}") from None
    except MemoryError:
        raise ImageError(f"{path}: not enough memory to decode it") from None
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
        if "truncated" in str(err).lower():
            raise ImageError(f"{path}: truncated image file (an incomplete download or copy?)") from None
        raise ImageError(f"{path}: corrupt image data: {err}") from None
    except Exception as err:  # Pillow's decoders also raise SyntaxError, ValueError, EOFError, ...
        raise ImageError(f"{path}: corrupt image data: {type(err).__name__}: {err}") from None


def _open_regular(path: Path) -> io.BufferedReader:
    """The open file, if `path` is a regular file; a FIFO, device or socket is an `ImageError`
    (opened without blocking, then checked: reading one could wait forever)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode):
        os.close(fd)
        raise IsADirectoryError(path)
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise ImageError(f"is {kind}, not a regular file; skipped")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _fit_budget(image: Image.Image) -> None:
    """Check an opened, not yet decoded image against the budget: a JPEG over it is set to decode
    reduced; anything else over it is an `ImageError`."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"the image is empty ({width}x{height} pixels)")
    if width * height > MAX_PIXELS and image.format == "JPEG":
        scale = next((s for s in _DRAFT_SCALES
                      if math.ceil(width / s) * math.ceil(height / s) <= MAX_PIXELS), _DRAFT_SCALES[-1])
        image.draft(image.mode, (width // scale, height // scale))
        width, height = image.size
    check_budget(width, height, f"decoding this {image.format or 'image'} file")


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
        if image.width < 1 or image.height < 1:
            raise ImageError(f"the image is empty ({image.width}x{image.height} pixels)")
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
    if image.mode in _WIDE_MODES:
        values = np.asarray(image)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:  # wider than 16 bits: its real range, never clipped
            return Image.fromarray(_scaled(values, low, max(high, low + 1))).convert("RGB")
        return Image.fromarray(_scaled(values, 0, 65535)).convert("RGB")
    if image.mode == "F":
        return _array_to_rgb(np.asarray(image), channels_first=False)
    if image.has_transparency_data:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        background = Image.new("RGB", image.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ImageError(f"cannot convert a {image.mode} image to RGB: {err}") from None


def _array_to_rgb(array: np.ndarray, channels_first: bool) -> Image.Image:
    if array.size == 0:
        raise ImageError(f"the image array is empty (shape {array.shape})")
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
        return _scaled(array, 0, 65535)  # 257 * v -> v exactly
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
    return _scaled(array, 0.0, 1.0)


def _scaled(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint8 of `values` mapped linearly from [low, high] to [0, 255] and rounded, converted a
    chunk at a time so that no float copy of the whole image is made."""
    flat, out = values.reshape(-1), np.empty(values.size, np.uint8)
    factor = 255.0 / (high - low)
    for start in range(0, flat.size, _CHUNK):
        part = flat[start:start + _CHUNK].astype(np.float64)
        out[start:start + _CHUNK] = np.round((part - low) * factor)
    return out.reshape(values.shape)


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
            raise InvalidValueError(f"{item}: no such file or folder")
    if not found:
        raise InvalidValueError(f"no image files in {', '.join(map(str, inputs))} "
                         f"(looked for {' '.join(sorted(IMAGE_EXTENSIONS))})")
    return list(dict.fromkeys(found))
