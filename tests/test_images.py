"""cvt.images: every image mode becomes the right RGB, EXIF orientation is applied, and a bad file
is one clear `ImageError` naming it."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

from cvt import ImageError, load_image
from cvt.images import as_rgb_image


def rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def png_with_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` 8-bit grey pixels but holds almost no data."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


# ------------------------------------------------------------------------------- modes
def test_transparency_is_composited_on_white() -> None:
    """The colour under a transparent pixel is arbitrary (here red); what shows is white."""
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere
    rgba[0, :, 3] = 0  # row 0 fully transparent
    rgba[1, :, 3] = 128  # row 1 half transparent
    out = rgb(as_rgb_image(Image.fromarray(rgba)))
    assert (out[0] == 255).all()
    assert (out[1, :, 0] == 255).all() and np.abs(out[1, :, 1:].astype(int) - 127).max() <= 1
    assert np.array_equal(rgb(as_rgb_image(rgba)), out)  # an RGBA array too


def test_grey_with_alpha_and_palette_with_transparency() -> None:
    la = Image.fromarray(np.stack([np.full((2, 2), 40, np.uint8), np.array([[0, 255], [255, 255]], np.uint8)],
                                  axis=-1), mode="LA")
    assert rgb(as_rgb_image(la)).tolist() == [[[255] * 3, [40] * 3], [[40] * 3, [40] * 3]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # palette entry 0 (blue) is transparent
    assert rgb(as_rgb_image(palette)).tolist() == [[[255, 255, 255], [0, 255, 0]]]


def test_cmyk_becomes_rgb(tmp_path) -> None:
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))  # no ink: white
    cmyk.putpixel((1, 0), (255, 0, 0, 0))  # cyan
    assert rgb(as_rgb_image(cmyk)).tolist() == [[[255, 255, 255], [0, 255, 255]]]
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "red.jpg", quality=95)  # a CMYK JPEG
    loaded = rgb(load_image(tmp_path / "red.jpg")).astype(int)
    assert np.abs(loaded - [255, 0, 0]).max() <= 3


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path) -> None:
    grey = skimage_data.camera()[::8, ::8]
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    loaded = load_image(tmp_path / "grey16.png")
    assert np.array_equal(rgb(loaded), np.repeat(grey[..., None], 3, axis=-1))


def test_exif_orientation_is_applied(tmp_path) -> None:
    """Orientation 6: the camera was turned; the stored pixels must be turned 90° clockwise."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:10, :20] = (255, 0, 0)  # red top-left quarter
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "turned.png", exif=exif)
    upright = np.rot90(stored, k=-1)
    assert np.array_equal(rgb(load_image(tmp_path / "turned.png")), upright)
    with Image.open(tmp_path / "turned.png") as opened:  # a PIL image the user opened
        assert np.array_equal(rgb(as_rgb_image(opened)), upright)
        assert opened.size == (40, 20)  # and theirs is untouched


# ------------------------------------------------------------------------------- bad files
@pytest.fixture()
def jpeg_bytes() -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    Image.fromarray(skimage_data.chelsea()).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("name, make, reason", [
    ("truncated.jpg", lambda jpeg: jpeg[: len(jpeg) // 2], "truncated image file"),
    ("text.png", lambda jpeg: b"just some text, not pixels\n", "not an image file"),
    ("empty.jpg", lambda jpeg: b"", "not an image file"),
    ("bomb.png", lambda jpeg: png_with_header(30_000, 30_000), "decompression bomb"),
])
def test_bad_files_are_one_clear_error_naming_the_file(tmp_path, jpeg_bytes, name, make, reason) -> None:
    path = tmp_path / name
    path.write_bytes(make(jpeg_bytes))
    with pytest.raises(ImageError, match=reason) as caught:
        load_image(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert isinstance(caught.value, ValueError)  # callers may catch it as a ValueError


def test_missing_paths_and_folders(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_a_good_file_loads_as_it_was_saved(tmp_path) -> None:
    Image.fromarray(skimage_data.coffee()).save(tmp_path / "coffee.png")
    assert np.array_equal(rgb(load_image(tmp_path / "coffee.png")), skimage_data.coffee())
