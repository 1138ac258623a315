"""CvtImageProcessor: parity with transformers' ConvNext processor on real photographs, the recipe
itself, every kind of input, preprocessor_config.json in both directions, and clear errors."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from skimage import data as skimage_data
from sklearn.datasets import load_sample_image

import cvt
from cvt import CvtImageProcessor
from cvt.variants import IMAGENET_MEAN, IMAGENET_STD, VARIANTS
from conftest import assert_close_to_scale

PHOTOS = {
    "chelsea": skimage_data.chelsea,  # 300 x 451
    "coffee": skimage_data.coffee,  # 400 x 600
    "astronaut": skimage_data.astronaut,  # 512 x 512
    "china": lambda: load_sample_image("china.jpg"),  # 427 x 640
    "coffee-portrait": lambda: np.ascontiguousarray(skimage_data.coffee().transpose(1, 0, 2)),
}


@lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    array = PHOTOS[name]()
    array.flags.writeable = False  # a test that modified it would fail loudly
    return array


def pixels(image, **settings) -> torch.Tensor:
    return CvtImageProcessor(**settings)(image, return_tensors="pt")["pixel_values"]


def transformers_processor(size: int):
    """transformers' ConvNext processor (PIL backend) configured as the CvT hub checkpoints are."""
    return transformers.ConvNextImageProcessorPil(
        size={"shortest_edge": size}, crop_pct=0.875, resample=3, do_resize=True, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD))


# ------------------------------------------------------------------------------- parity, recipe
@pytest.mark.parametrize("kind", ["pil", "numpy"])
@pytest.mark.parametrize("size", [224, 384])
@pytest.mark.parametrize("name", PHOTOS)
def test_pixel_values_equal_transformers_on_real_photographs(name, size, kind) -> None:
    image = Image.fromarray(photo(name)) if kind == "pil" else photo(name)
    ours = pixels(image, size=size)
    theirs = transformers_processor(size)(image, return_tensors="pt")["pixel_values"]
    assert ours.shape == (1, 3, size, size) and ours.dtype == torch.float32
    assert_close_to_scale(ours, theirs, rel=1e-5)


@pytest.mark.parametrize("size", [224, 384])
@pytest.mark.parametrize("name", PHOTOS)
def test_transformers_fast_processor_differs_by_uint8_rounding(name, size) -> None:
    """What `AutoImageProcessor` gives for a CvT folder: transformers' torchvision-backed ("fast")
    ConvNext processor, whose resampling rounds differently from PIL's. Below 384 (resize and
    crop) at most one uint8 step (1/255 / std) on under 1 % of values; at 384 (a warp to a
    square) at most 9 steps, more than one step on under 0.1 % (the README states this)."""
    theirs_fast = transformers.ConvNextImageProcessor(
        size={"shortest_edge": size}, crop_pct=0.875, resample=3, image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD))
    ours = pixels(photo(name), size=size)
    theirs = theirs_fast(np.array(photo(name)), return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape
    steps = (ours - theirs).abs() / torch.tensor([1 / 255 / s for s in IMAGENET_STD]).view(1, 3, 1, 1)
    if size < 384:
        assert steps.max().item() <= 1.001 and (steps > 0.5).float().mean().item() < 0.01
    else:
        assert steps.max().item() <= 9.001 and (steps > 1.5).float().mean().item() < 0.001


def test_recipe_crops_below_384_and_warps_from_384() -> None:
    """Written out by hand: 300x451 -> short side 256 (bicubic) -> centre 224; -> 384x384 (no crop)."""
    image = Image.fromarray(photo("chelsea"))
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)

    def expected(resized: Image.Image) -> torch.Tensor:
        values = (np.asarray(resized, np.float64) / 255).astype(np.float32)
        return torch.from_numpy(((values - mean) / std).transpose(2, 0, 1))[None]

    resized = image.resize((384, 256), Image.Resampling.BICUBIC)  # 451 * 256 / 300 = 384.9 -> 384
    assert_close_to_scale(pixels(image), expected(resized.crop((80, 16, 304, 240))), rel=1e-6)
    warped = image.resize((384, 384), Image.Resampling.BICUBIC)
    assert_close_to_scale(pixels(image, size=384), expected(warped), rel=1e-6)


def test_a_batch_equals_its_images_one_by_one() -> None:
    names = ["chelsea", "coffee-portrait", "china"]
    batch = pixels([photo(n) for n in names])
    assert batch.shape == (3, 3, 224, 224)
    for row, name in zip(batch, names):
        assert torch.equal(row, pixels(photo(name))[0])
    as_numpy = CvtImageProcessor()([photo(n) for n in names], return_tensors="np")["pixel_values"]
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float32
    assert np.array_equal(as_numpy, batch.numpy())


def test_each_step_can_be_switched_off() -> None:
    image = photo("astronaut")[:64, :80]
    raw = pixels(image, do_resize=False, do_rescale=False, do_normalize=False)
    assert torch.equal(raw[0], torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32)))
    scaled = pixels(image, do_resize=False, do_normalize=False)
    assert_close_to_scale(scaled, raw / 255, rel=1e-7)


# ------------------------------------------------------------------------------- kinds of input
def test_every_kind_of_input_gives_the_same_pixel_values(tmp_path) -> None:
    rgb = photo("coffee")
    expected = pixels(rgb)
    path = tmp_path / "coffee.png"
    Image.fromarray(rgb).save(path)
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    inputs = {
        "PIL": Image.fromarray(rgb),
        "path str": str(path),
        "path": path,
        "numpy CHW": chw,
        "torch CHW uint8": torch.from_numpy(chw),
        "torch HWC uint8": torch.from_numpy(rgb.copy()),
        "numpy float64 in [0, 1]": rgb / 255.0,
        "torch float32 CHW in [0, 1]": torch.from_numpy(chw).float() / 255,
        "torch float16 CHW": (torch.from_numpy(chw).float() / 255).half(),
        "numpy uint16": rgb.astype(np.uint16) * 257,
        "numpy big-endian uint16": (rgb.astype(np.uint16) * 257).astype(">u2"),
        "numpy int64": rgb.astype(np.int64),
    }
    for kind, image in inputs.items():
        assert torch.equal(pixels(image), expected), kind
    batch = pixels(np.stack([rgb, rgb]))  # a 4-D array is a batch
    assert batch.shape == (2, 3, 224, 224) and torch.equal(batch[1], expected[0])


def test_grey_images_become_three_equal_channels() -> None:
    grey = photo("astronaut")[..., 1]
    replicated = pixels(np.repeat(grey[..., None], 3, axis=-1))
    for image in (grey, grey[..., None], Image.fromarray(grey), torch.from_numpy(grey.copy())[None]):
        assert torch.equal(pixels(image), replicated)


def test_inputs_are_not_modified(tmp_path) -> None:
    array = photo("chelsea").copy()
    tensor = torch.from_numpy(array.transpose(2, 0, 1).copy())
    image = Image.fromarray(array).convert("RGBA")
    before = (array.copy(), tensor.clone(), image.tobytes(), image.mode, image.size)
    CvtImageProcessor()([array, tensor, image])
    assert np.array_equal(array, before[0]) and torch.equal(tensor, before[1])
    assert (image.tobytes(), image.mode, image.size) == before[2:]


@pytest.mark.parametrize("image, message", [
    (np.zeros((8, 8, 5), np.uint8), "C = 1, 3 or 4"),
    (np.zeros((2, 2, 8, 8, 3), np.uint8), "2 or 3 dimensions"),
    (np.full((8, 8, 3), 2.0), r"float pixel values must lie in \[0, 1\]"),
    (np.full((8, 8, 3), np.nan), "NaN"),
    (np.full((8, 8, 3), -1, np.int32), "0-255"),
    (np.zeros((8, 8, 3), bool), "dtype bool"),
    ([], "no images"),
])
def test_unusable_arrays_are_clear_errors(image, message) -> None:
    with pytest.raises(ValueError, match=message):
        pixels(image)


def test_wrong_types_and_options_are_clear_errors() -> None:
    with pytest.raises(TypeError, match="cannot use a int as an image"):
        pixels(3)
    with pytest.raises(ValueError, match="return_tensors"):
        CvtImageProcessor()(photo("chelsea"), return_tensors="tf")
    with pytest.raises(ValueError, match="different sizes"):
        pixels([photo("chelsea"), photo("coffee")], do_resize=False)


# ------------------------------------------------------------------------------- settings and files
@pytest.mark.parametrize("settings, message", [
    (dict(size=0), "image size must be a positive whole number of pixels, from 1 to 1024; got 0"),
    (dict(size="224"), "image size must be a positive whole number of pixels, from 1 to 1024; got '224'"),
    (dict(size=100000), "image size must be a positive whole number of pixels, from 1 to 1024; got 100000"),
    (dict(crop_pct=0), r"crop_pct must be a number in \(0, 1\]"),
    (dict(crop_pct=1.2), r"crop_pct must be a number in \(0, 1\]"),
    (dict(resample=9), "Pillow filter code"),
    (dict(do_resize="yes"), "do_resize must be true or false"),
    (dict(image_mean=(0.5, 0.5)), "image_mean must be three numbers"),
    (dict(image_std=(0.2, 0.0, 0.2)), "image_std must be positive"),
])
def test_bad_settings_are_clear_errors(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        CvtImageProcessor(**settings)


def test_saved_settings_are_read_by_transformers_and_give_the_same_pixels(tmp_path) -> None:
    ours = CvtImageProcessor(size=160, crop_pct=0.9, resample=2, image_mean=(0.5, 0.4, 0.3),
                             image_std=(0.2, 0.25, 0.3))
    ours.save_pretrained(tmp_path)
    assert CvtImageProcessor.from_pretrained(tmp_path) == ours
    stored = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert stored["size"] == {"shortest_edge": 160} and stored["image_processor_type"] == "ConvNextImageProcessor"
    theirs = transformers.ConvNextImageProcessorPil.from_pretrained(tmp_path)
    assert (theirs.size.shortest_edge, theirs.crop_pct, theirs.resample) == (160, 0.9, 2)
    image = photo("china")
    assert_close_to_scale(ours(image)["pixel_values"],
                               theirs(image, return_tensors="pt")["pixel_values"], rel=1e-5)
    auto = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert type(auto).__name__.startswith("ConvNextImageProcessor")


def test_reads_what_transformers_saves(tmp_path) -> None:
    theirs = transformers.ConvNextImageProcessorPil(size={"shortest_edge": 288}, crop_pct=0.95, resample=3,
                                                    image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    theirs.save_pretrained(tmp_path)
    ours = CvtImageProcessor.from_pretrained(tmp_path)
    assert ours == CvtImageProcessor(size=288, crop_pct=0.95)
    image = photo("coffee-portrait")
    assert_close_to_scale(ours(image)["pixel_values"],
                               theirs(image, return_tensors="pt")["pixel_values"], rel=1e-5)


def test_reads_the_older_hub_format_with_an_integer_size(tmp_path) -> None:
    """The CvT hub repos were converted in 2022 with ConvNextFeatureExtractor: `"size": 224`."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_pct": 0.875, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "ConvNextFeatureExtractor", "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD), "resample": 3, "size": 384}))
    assert CvtImageProcessor.from_pretrained(tmp_path) == CvtImageProcessor.from_pretrained("cvt-13-384")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_named_variants_carry_their_evaluation_preprocessing(name) -> None:
    processor = CvtImageProcessor.from_pretrained(name)
    variant = cvt.get_variant(name)
    assert processor.size == variant.image_size and processor.resample == Image.Resampling.BICUBIC
    assert processor.image_mean == IMAGENET_MEAN and processor.image_std == IMAGENET_STD
    out = processor(photo("chelsea"))["pixel_values"]
    assert out.shape == (1, 3, variant.image_size, variant.image_size)


def test_missing_or_broken_config_files_are_clear_errors(tmp_path) -> None:
    with pytest.raises(cvt.CheckpointError, match="has no preprocessor_config.json"):
        CvtImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(cvt.CheckpointError, match="not valid JSON"):
        CvtImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 224, "width": 224}}))
    with pytest.raises(cvt.CheckpointError, match="shortest_edge"):
        CvtImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="unexpected arguments: size"):
        CvtImageProcessor.from_pretrained("cvt-13", size=384)
