"""Image classification for people: `cvt.pipeline("image-classification", model=...)`.

Loads a checkpoint together with its preprocessing, builds an inference engine for it (`engine=`,
by default the fastest installed fp32 engine for the device, see `cvt.engines`) and runs batches
on the device the user chose. For each image it returns the top-k {"label", "score"}, sorted by
score. At fp32 a pipeline's scores are those of model(processor(images)) within the engines'
1e-4 check; reduced precision reports its cost when the engine is built (`pipe.engine.report`).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..engines import build_engine
from ..modeling.factory import load
from ..images import ImageError, ImageInput, split_batch
from ..modeling import CvtForImageClassification
from ..images.processing import CvtImageProcessor
from ..errors import InvalidValueError

TASKS = ("image-classification",)
Prediction = dict[str, Any]  # {"label": str, "score": float}


def select_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, checked to exist. With None: CUDA, then MPS, then the CPU."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidValueError(f"unknown device {device!r}; expected cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidValueError(f"device {str(device)!r} requested, but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidValueError(f"device {str(device)!r} requested, but only {torch.cuda.device_count()} "
                             f"CUDA device(s) exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidValueError("device 'mps' requested, but Apple's Metal (MPS) backend is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise InvalidValueError(f"unsupported device {str(device)!r}; expected cpu, cuda, cuda:N or mps")
    return device


class ImageClassificationPipeline:
    """Top-k labels of images from a `CvtForImageClassification` and its `CvtImageProcessor`.

    The pipeline owns the model: it moves it to `device`, puts it in eval mode and builds
    `self.engine` from it (`engine`, `precision`, `calibration` and `engine_cache_dir` as
    `cvt.engines.build_engine`'s `cache_dir`). Scores are a softmax over the classes, or a per-class sigmoid
    for multi-label models (and single-logit ones).
    """

    def __init__(self, model: CvtForImageClassification, image_processor: CvtImageProcessor, *,
                 device: str | torch.device | None = None, top_k: int = 5, batch_size: int = 8,
                 engine: str = "auto", precision: str = "fp32",
                 calibration: str | os.PathLike | None = None,
                 engine_cache_dir: str | os.PathLike | None = None) -> None:
        if not isinstance(model, CvtForImageClassification):
            raise TypeError(f"model must be a cvt.CvtForImageClassification, got {type(model).__name__}")
        if not isinstance(image_processor, CvtImageProcessor):
            raise TypeError(f"image_processor must be a cvt.CvtImageProcessor, "
                            f"got {type(image_processor).__name__}")
        self.top_k = _positive("top_k", top_k)
        self.batch_size = _positive("batch_size", batch_size)
        self.device = select_device(device)
        self.model = model.to(self.device).eval()
        self.image_processor = image_processor
        self.engine = build_engine(self.model, engine, device=self.device, precision=precision,
                                   image_size=image_processor.size, calibration=calibration,
                                   processor=image_processor, cache_dir=engine_cache_dir,
                                   batch_size=self.batch_size)
        config = model.config
        self.labels = [config.id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]
        self.multi_label = config.problem_type == "multi_label_classification" or config.num_labels == 1

    def __call__(self, images: ImageInput | list[ImageInput], top_k: int | None = None,
                 batch_size: int | None = None) -> list[Prediction] | list[list[Prediction]]:
        """The top-k of one image (a list of dicts) or of each image of a list (a list of lists).

        A file that cannot be read raises `cvt.ImageError` naming it; `classify_files` reports
        such files and classifies the rest.
        """
        items, is_batch = split_batch(images)
        if not items:
            raise InvalidValueError("no images given (an empty list)")
        size = _positive("batch_size", self.batch_size if batch_size is None else batch_size)
        results: list[list[Prediction]] = []
        for start in range(0, len(items), size):
            pixel_values = self.image_processor(items[start:start + size])["pixel_values"]
            results += self.classify(pixel_values, top_k)
        return results if is_batch else results[0]

    def classify(self, pixel_values: Tensor, top_k: int | None = None) -> list[list[Prediction]]:
        """The top-k of each image of a preprocessed (B, 3, H, W) batch."""
        k = min(_positive("top_k", self.top_k if top_k is None else top_k), len(self.labels))
        logits = self.engine(pixel_values.to(self.device)).float()
        scores = logits.sigmoid() if self.multi_label else logits.softmax(dim=-1)
        values, indices = scores.topk(k, dim=-1)
        return [[{"label": self.labels[i], "score": v} for v, i in zip(row_values, row_indices)]
                for row_values, row_indices in zip(values.cpu().tolist(), indices.cpu().tolist())]

    def classify_files(self, paths: Iterable[str | os.PathLike], top_k: int | None = None,
                       batch_size: int | None = None, workers: int = 2
                       ) -> Iterator[tuple[Path, list[Prediction] | ImageError]]:
        """(path, top-k) for each file in order, or (path, the `ImageError` that stopped it).

        While the model runs, background threads decode and preprocess the next files. At most
        two batches wait in memory. A failure in one file never ends the run: an unexpected
        exception while preparing a file is reported as that file's `ImageError` too (marked as
        a bug). When the caller stops early (Ctrl-C), the threads are not waited for: one may be
        blocked reading a slow file.
        """
        size = _positive("batch_size", self.batch_size if batch_size is None else batch_size)

        def prepare(path: Path) -> Tensor | ImageError:
            try:
                return self.image_processor(path)["pixel_values"]
            except ImageError as err:
                return err
            except MemoryError:
                return ImageError(f"{path}: not enough memory to prepare it")
            except Exception as err:  # a bug: named as one, and the other files go on
                return ImageError(f"{path}: unexpected {type(err).__name__} while preparing it "
                                  f"(a bug in cvt, please report it): {err}")

        queue = iter(Path(p) for p in paths)
        pool = ThreadPoolExecutor(max_workers=_positive("workers", workers))
        try:
            pending = deque(((path, pool.submit(prepare, path)) for path in _take(queue, 2 * size)))
            done: list[tuple[Path, Tensor | ImageError]] = []
            while pending:
                path, future = pending.popleft()
                pending.extend((p, pool.submit(prepare, p)) for p in _take(queue, 1))
                done.append((path, future.result()))
                if sum(isinstance(r, Tensor) for _, r in done) == size or not pending:
                    yield from self._finish(done, top_k)
                    done = []
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _finish(self, done: list[tuple[Path, Tensor | ImageError]], top_k: int | None
                ) -> Iterator[tuple[Path, list[Prediction] | ImageError]]:
        good = [r for _, r in done if isinstance(r, Tensor)]
        predictions = iter(self.classify(torch.cat(good), top_k) if good else [])
        for path, prepared in done:
            yield path, (next(predictions) if isinstance(prepared, Tensor) else prepared)


def pipeline(task: str, model: str | os.PathLike | CvtForImageClassification, *,
             image_processor: CvtImageProcessor | None = None, device: str | torch.device | None = None,
             top_k: int = 5, batch_size: int = 8, engine: str = "auto", precision: str = "fp32",
             calibration: str | os.PathLike | None = None,
             engine_cache_dir: str | os.PathLike | None = None, **hub_kwargs: Any) -> ImageClassificationPipeline:
    """An image-classification pipeline for a checkpoint, which can be given as a folder, a hub id,
    a variant name ("cvt-13" means "microsoft/cvt-13") or a loaded model.

    The checkpoint's own preprocessor_config.json gives the preprocessing unless `image_processor`
    is given (it must be given with a loaded model or a single weights file). `device` is "cpu",
    "cuda", "cuda:N" or "mps" (default: CUDA or MPS if available, else the CPU). `engine`
    ("auto", "torch", "onnxruntime", "openvino"), `precision` ("fp32", "bf16", "int8"),
    `calibration` (a folder of images, for int8) and `engine_cache_dir` (where built engines are
    kept) choose how it runs: see `cvt.engines.build_engine`. `revision`, `cache_dir`, `token`
    and `local_files_only` are passed to the hub.
    """
    if task not in TASKS:
        raise InvalidValueError(f"unknown task {task!r}; cvt.pipeline supports {', '.join(TASKS)}")
    if not isinstance(model, CvtForImageClassification):
        if isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a cvt.CvtForImageClassification, got {type(model).__name__}")
        if image_processor is None:
            image_processor = CvtImageProcessor.from_pretrained(model, **hub_kwargs)
        source, model = model, load(model, **hub_kwargs)
        if not isinstance(model, CvtForImageClassification):
            raise InvalidValueError(f"{source} holds a backbone without a classification head; "
                                    f"image classification needs a classifier checkpoint")
    elif image_processor is None:
        raise InvalidValueError("with a loaded model, pass image_processor= as well "
                         "(e.g. CvtImageProcessor.from_pretrained('cvt-13'))")
    return ImageClassificationPipeline(model, image_processor, device=device, top_k=top_k,
                                       batch_size=batch_size, engine=engine, precision=precision,
                                       calibration=calibration, engine_cache_dir=engine_cache_dir)


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _take(iterator: Iterator[Path], count: int) -> list[Path]:
    return [path for _, path in zip(range(count), iterator)]
