"""Shared test helpers: tiny configurations, weight randomisation, and the shared test data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cvt import CvtConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTDATA = REPO_ROOT.parent / "shared" / "testdata"


@pytest.fixture(scope="session")
def testdata() -> Path:
    """`../shared/testdata` beside the repository; a clear failure (not a skip) when absent."""
    if not (TESTDATA / "README.md").is_file():
        pytest.fail(f"shared test data missing: expected {TESTDATA} (the repository's ../shared/testdata)")
    return TESTDATA


def tiny_config(**overrides) -> CvtConfig:
    """A 3-stage CvT small enough for unit tests (about 140 k parameters)."""
    fields = dict(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 2, 3), num_labels=5)
    return CvtConfig(**{**fields, **overrides})


def randomise_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every weight and BatchNorm statistic a non-default random value, so that a test can
    not pass on initial values (unit LayerNorms, zero biases, identity BatchNorm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
            elif name.endswith("cls_token"):
                t.copy_(torch.randn(t.shape, generator=g))
            elif t.dim() >= 2:
                # residual-branch outputs get half gain, keeping the residual stream near unit
                # scale, where float32 rounding stays well below the 1e-5 parity tolerance
                gain = 0.5 if "output.dense" in name else 1.0
                t.copy_(torch.randn(t.shape, generator=g) * (gain / math.sqrt(t[0].numel())))
            elif name.endswith("weight"):
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return model


TINY_LABELS = ("tabby cat", "espresso", "astronaut", "pagoda", "teapot")


def save_tiny_classifier(folder: Path, image_size: int = 64, seed: int = 1) -> Path:
    """A checkpoint folder as users have them: a randomised tiny classifier with named labels,
    in transformers' layout, with its preprocessor_config.json. (With seed 1 its top-1 label
    differs between the skimage/sklearn photographs; many seeds give one label to all.)"""
    from cvt import CvtForImageClassification, CvtImageProcessor

    model = CvtForImageClassification(tiny_config(id2label=dict(enumerate(TINY_LABELS))))
    randomise_(model, seed).save_pretrained(folder)
    CvtImageProcessor(size=image_size).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True, scope="session")
def engine_cache(tmp_path_factory) -> Path:
    """Built engines go to one folder per test session, never to the user's cache; tests that
    build the same tiny model's engine twice reuse it, as users' second runs do."""
    folder = tmp_path_factory.mktemp("engine-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("CVT_CACHE_DIR", str(folder))
    yield folder
    patch.undo()

