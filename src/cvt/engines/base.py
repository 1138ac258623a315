"""What every engine shares: the call interface, the check against the plain model when built,
and the report of what reduced precision costs.

An engine is built from a plain cvt model for one device, one input size and one precision, and
is called on a `pixel_values` batch (B, C, H, W); it returns the logits of a
`CvtForImageClassification`, or the last feature map (B, C, H', W') of a `CvtModel`, as float32.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import platform
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import pixel_values_problem
from ..constants import TOLERANCE
from ..modeling import CvtForImageClassification, CvtModel
from ..errors import CvtError, InvalidValueError, install_hint

logger = logging.getLogger("cvt")

CHECK_BATCH = 3  # images in the build check (not the 2 an exporter traces with)
# the most a reduced-precision engine may differ from the plain model on the check batch, as a
# fraction of the outputs' largest magnitude: int8 builds of the test models differ by 1-7 %, of
# a CvT-13 with random weights (small, flat outputs) by about 40 %; an engine of another model
# with the same architecture by 100-200 %
REDUCED_LIMIT = 0.75

Model = CvtModel | CvtForImageClassification


@lru_cache(maxsize=1)
def cpu_description() -> str:
    """The CPU's model name and instruction-set flags (Linux), else what `platform` knows."""
    lines = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    lines.append(line.strip())
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    return "\n".join(lines + [torch.backends.cpu.get_cpu_capability()])


def cpu_has_bf16() -> bool:
    flags = cpu_description().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


class EngineError(CvtError, RuntimeError):
    """An engine cannot be built here, or does not compute what the plain model computes."""


def import_runtime(module: str, extra: str) -> Any:
    """The runtime package `module`, or an `EngineError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise EngineError(f"this engine needs {module}: {install_hint(extra)}") from None


@dataclasses.dataclass(frozen=True)
class PrecisionReport:
    """What a reduced-precision engine costs, measured against the fp32 plain model on `images`
    inputs: the largest logit difference, the fraction of images whose top-1 class agrees, and
    top-1 accuracy of both when the images were labelled."""

    images: int
    max_abs_logit_error: float
    top1_agreement: float
    accuracy: float | None = None
    fp32_accuracy: float | None = None

    def __str__(self) -> str:
        text = (f"max |logit - fp32| {self.max_abs_logit_error:.3g}, top-1 agrees with fp32 on "
                f"{100 * self.top1_agreement:.2f} % of {self.images} images")
        if self.accuracy is not None:
            text += f"; top-1 {100 * self.accuracy:.2f} % (fp32 {100 * self.fp32_accuracy:.2f} %)"
        return text


class Engine:
    """A model compiled for fast inference. Subclasses set `name` and implement `_run`."""

    name = "engine"

    def __init__(self, model: Model, *, device: torch.device, precision: str,
                 image_size: tuple[int, int]) -> None:
        self.config = model.config
        self.classifier = isinstance(model, CvtForImageClassification)
        self.device = device
        self.precision = precision
        self.image_size = image_size
        self.from_cache = False  # set by engines that load a stored build
        self.report: PrecisionReport | None = None  # set for reduced precision

    def __call__(self, pixel_values: Tensor) -> Tensor:
        if isinstance(pixel_values, np.ndarray):
            raise TypeError(f"pixel_values must be a torch.Tensor, got a numpy.ndarray of "
                            f"{pixel_values.dtype}; pass torch.from_numpy(array)")
        if not isinstance(pixel_values, Tensor) or not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a floating-point torch.Tensor, got "
                            f"{getattr(pixel_values, 'dtype', type(pixel_values).__name__)}")
        shape = tuple(pixel_values.shape)
        problem = pixel_values_problem(self.config, shape, training=False)
        if problem:
            raise InvalidValueError(problem)
        if shape[-2:] != self.image_size:
            raise InvalidValueError(f"this {self.name} engine was built for {self.image_size[0]}x"
                             f"{self.image_size[1]} inputs, got {shape[-2]}x{shape[-1]}; build "
                             f"another with image_size={shape[-2]}")
        return self._run(pixel_values)

    def _run(self, pixel_values: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        height, width = self.image_size
        return (f"{type(self).__name__}(precision={self.precision!r}, device={str(self.device)!r}, "
                f"image_size=({height}, {width}){', from cache' if self.from_cache else ''})")


def plain_output(model: Model, pixel_values: Tensor) -> Tensor:
    """What an engine must reproduce: the plain model's logits (or last feature map), float32."""
    with torch.no_grad():
        out = model(pixel_values.to(next(model.parameters()).device), return_dict=True)
    return (out.logits if isinstance(model, CvtForImageClassification) else out.last_hidden_state).float()


def random_batch(model: Model, image_size: tuple[int, int], batch: int = CHECK_BATCH) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, model.config.num_channels, *image_size, generator=generator)


def check_difference(engine: Engine, model: Model) -> tuple[float, float]:
    """(the largest difference between the engine and the plain model on a fixed random batch,
    NaN when the engine gives non-finite outputs; the plain outputs' scale, their largest
    magnitude)."""
    pixel_values = random_batch(model, engine.image_size)
    want = plain_output(model, pixel_values).cpu()
    got = engine(pixel_values.to(engine.device)).float().cpu()
    if got.shape != want.shape:
        raise EngineError(f"the {engine.name} engine's output has shape {tuple(got.shape)}, the "
                          f"model's {tuple(want.shape)}")
    return (got - want).abs().max().item(), want.abs().max().item()


def check_fp32(engine: Engine, model: Model) -> float:
    """`check_difference`; above 1e-4 (or NaN) raises `EngineError`."""
    difference, _ = check_difference(engine, model)
    if not difference <= TOLERANCE:
        raise EngineError(f"the {engine.name} engine differs from the plain model by up to "
                          f"{difference:.3g} (allowed {TOLERANCE:g}) on a random batch; not used")
    return difference


def check_reduced(engine: Engine, model: Model, within: float | None = None) -> float:
    """`check_difference` of a reduced-precision engine, which must stay within REDUCED_LIMIT of
    the outputs' scale (and within `within`, when given and tighter), else `EngineError`. The
    bound is the code's own: a stored engine's record can tighten it, never loosen it."""
    difference, scale = check_difference(engine, model)
    allowed = REDUCED_LIMIT * scale + TOLERANCE
    if within is not None:
        allowed = min(allowed, within)
    if not difference <= allowed:
        raise EngineError(f"the {engine.name} engine at {engine.precision} differs from the plain model by "
                          f"up to {difference:.3g} on a random batch (allowed {allowed:.3g}; outputs up to "
                          f"{scale:.3g}); not used")
    return difference


def measure_precision(engine: Engine, model: Model,
                      batches: Iterable[tuple[Tensor, Tensor | None]]) -> PrecisionReport:
    """Compare a reduced-precision engine with the fp32 plain model on (pixel_values, labels or
    None) batches; non-finite outputs raise `EngineError`."""
    images = agree = right = fp32_right = 0
    worst, labelled = 0.0, True
    for pixel_values, labels in batches:
        want = plain_output(model, pixel_values).cpu()
        got = engine(pixel_values.to(engine.device)).float().cpu()
        if not torch.isfinite(got).all():
            raise EngineError(f"the {engine.name} engine gives non-finite outputs at {engine.precision}")
        worst = max(worst, (got - want).abs().max().item())
        if engine.classifier:
            agree += (got.argmax(-1) == want.argmax(-1)).sum().item()
            if labels is not None:
                right += (got.argmax(-1) == labels).sum().item()
                fp32_right += (want.argmax(-1) == labels).sum().item()
        labelled = labelled and labels is not None
        images += len(pixel_values)
    if images == 0:
        raise EngineError("no images to measure the reduced precision on")
    if not engine.classifier:  # feature maps: agreement is not defined; report the error only
        return PrecisionReport(images, worst, float("nan"))
    accuracy = (right / images, fp32_right / images) if labelled else (None, None)
    return PrecisionReport(images, worst, agree / images, *accuracy)


def verify(engine: Engine, model: Model, batches: list[tuple[Tensor, Tensor | None]] | None) -> float:
    """What every new engine goes through: at fp32 the check against the plain model; at reduced
    precision its cost, measured on `batches` (calibration images, else random ones) and kept
    as `engine.report`, and `check_reduced`. Returns the difference on the check batch."""
    if engine.precision == "fp32":
        return check_fp32(engine, model)
    batches = batches or [(random_batch(model, engine.image_size, 8), None)]
    engine.report = measure_precision(engine, model, batches)
    logger.info("cvt: %s engine at %s: %s", engine.name, engine.precision, engine.report)
    return check_reduced(engine, model)


def report_dict(report: PrecisionReport | None) -> dict[str, Any] | None:
    return None if report is None else dataclasses.asdict(report)
