"""`RunSettings`: how a model runs (engine, precision, device, batches, top-k), the one settings
object that `cvt.pipeline`, `cvt predict`, the Ray predictor, `cvt serve` and `cvt eval` take.
Each setting's default and check is declared here, once. Free of torch, so that the command line
offers the defaults in its help without loading it."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from .constants import ENGINE_PRECISIONS, ENGINES, IMAGE_SIZE_RANGE
from .errors import InvalidValueError, check_size


@dataclass(frozen=True)
class RunSettings:
    """How to run a model: `engine` ("auto", "torch", "onnxruntime", "openvino"), `precision`
    ("fp32", "bf16", "fp16", "int8"), `calibration` (a folder of images, for int8), `device`
    ("cpu", "cuda", "cuda:N", "mps" or a torch.device; None: CUDA or MPS if available, else the
    CPU), `image_size` (None: the model's own preprocessing), `batch_size` (images per forward
    pass), `top_k` (labels per image) and `engine_cache_dir` (where built engines are kept; see
    `cvt.engines.build_engine`). Checked when made: a bad value is an `InvalidValueError` naming
    the setting. Frozen: `replace` gives a changed copy."""

    engine: str = "auto"
    precision: str = "fp32"
    calibration: str | os.PathLike | None = None
    device: Any = None
    image_size: int | None = None
    batch_size: int = 8
    top_k: int = 5
    engine_cache_dir: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise InvalidValueError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.precision not in ENGINE_PRECISIONS:
            raise InvalidValueError(f"unknown precision {self.precision!r}; choose one of "
                                    f"{', '.join(ENGINE_PRECISIONS)}")
        if self.image_size is not None:
            check_size("image_size", self.image_size, IMAGE_SIZE_RANGE)
        positive("batch_size", self.batch_size)
        positive("top_k", self.top_k)

    def replace(self, **changes: Any) -> RunSettings:
        """A copy with `changes` (setting names), checked as any `RunSettings`."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def split(cls, settings: RunSettings | None, options: dict[str, Any]) -> tuple[RunSettings, dict[str, Any]]:
        """`settings` (None: the defaults) changed by those of `options` that name a setting, and
        the other options (for the caller's own use, such as the hub's `revision`)."""
        names = {field.name for field in dataclasses.fields(cls)}
        changes = {name: value for name, value in options.items() if name in names}
        rest = {name: value for name, value in options.items() if name not in names}
        return (settings or cls()).replace(**changes), rest


def positive(name: str, value: Any) -> int:
    """`value`, or an `InvalidValueError` naming `name` when it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidValueError(f"{name} must be a positive integer, got {value!r}")
    return value
