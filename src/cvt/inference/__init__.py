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
from ..run_settings import RunSettings, positive

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

    The pipeline owns the model: it moves it to the settings' `device`, puts it in eval mode and
    builds `self.engine` from it as `settings` say (a `cvt.RunSettings`, changed by `options`
    such as `top_k=3`). Scores are a softmax over the classes, or a per-class sigmoid for
    multi-label models (and single-logit ones).
    """

    def __init__(self, model: CvtForImageClassification, image_processor: CvtImageProcessor,
                 settings: RunSettings | None = None, **options: Any) -> None:
        if not isinstance(model, CvtForImageClassification):
            raise TypeError(f"model must be a cvt.CvtForImageClassification, got {type(model).__name__}")
        if not isinstance(image_processor, CvtImageProcessor):
            raise TypeError(f"image_processor must be a cvt.CvtImageProcessor, "
                            f"got {type(image_processor).__name__}")
        settings = (settings or RunSettings()).replace(**options)
        if settings.image_size not in (None, image_processor.size):
            raise InvalidValueError(f"image_size {settings.image_size} differs from the image processor's "
                                    f"size, {image_processor.size}: give one of them")
        self.settings = settings
        self.top_k, self.batch_size = settings.top_k, settings.batch_size
        self.device = select_device(settings.device)
        self.model = model.to(self.device).eval()
        self.image_processor = image_processor
        self.engine = build_engine(self.model, settings.engine, device=self.device, precision=settings.precision,
                                   image_size=image_processor.size, calibration=settings.calibration,
                                   processor=image_processor, cache_dir=settings.engine_cache_dir,
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
        size = positive("batch_size", self.batch_size if batch_size is None else batch_size)
        results: list[list[Prediction]] = []
        for start in range(0, len(items), size):
            pixel_values = self.image_processor(items[start:start + size])["pixel_values"]
            results += self.classify(pixel_values, top_k)
        return results if is_batch else results[0]

    def classify(self, pixel_values: Tensor, top_k: int | None = None) -> list[list[Prediction]]:
        """The top-k of each image of a preprocessed (B, 3, H, W) batch."""
        k = min(positive("top_k", self.top_k if top_k is None else top_k), len(self.labels))
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
        size = positive("batch_size", self.batch_size if batch_size is None else batch_size)

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
        pool = ThreadPoolExecutor(max_workers=positive("workers", workers))
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
             image_processor: CvtImageProcessor | None = None, settings: RunSettings | None = None,
             **options: Any) -> ImageClassificationPipeline:
    """An image-classification pipeline for a checkpoint, which can be given as a folder, a hub id,
    a variant name ("cvt-13" means "microsoft/cvt-13") or a loaded model.

    How it runs is `settings` (a `cvt.RunSettings`), changed by the options that name one of its
    settings (`device`, `top_k`, `batch_size`, `engine`, `precision`, `calibration`, `image_size`,
    `engine_cache_dir`): `cvt.pipeline("image-classification", "cvt-13", top_k=3)`. The
    checkpoint's own preprocessor_config.json gives the preprocessing (at `image_size` if given;
    a single weights file, which carries none, needs `image_size`) unless `image_processor` is
    given (it must be given with a loaded model). The other options,
    `revision`, `cache_dir`, `token` and `local_files_only`, are passed to the hub.
    """
    settings, hub_kwargs = RunSettings.split(settings, options)
    if task not in TASKS:
        raise InvalidValueError(f"unknown task {task!r}; cvt.pipeline supports {', '.join(TASKS)}")
    if not isinstance(model, CvtForImageClassification):
        if isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a cvt.CvtForImageClassification, got {type(model).__name__}")
        if image_processor is None:
            image_processor = processor_for(model, settings, **hub_kwargs)
        source, model = model, load(model, **hub_kwargs)
        if not isinstance(model, CvtForImageClassification):
            raise InvalidValueError(f"{source} holds a backbone without a classification head; "
                                    f"image classification needs a classifier checkpoint")
    elif image_processor is None:
        raise InvalidValueError("with a loaded model, pass image_processor= as well "
                         "(e.g. CvtImageProcessor.from_pretrained('cvt-13'))")
    return ImageClassificationPipeline(model, image_processor, settings)


def processor_for(model: str | os.PathLike, settings: RunSettings, **hub_kwargs: Any) -> CvtImageProcessor:
    """The preprocessing a model runs with under `settings`: the one place a run resolves it
    (`CvtImageProcessor.for_model`: the model's own, at the settings' `image_size` if given)."""
    return CvtImageProcessor.for_model(model, settings.image_size, **hub_kwargs)


def _take(iterator: Iterator[Path], count: int) -> list[Path]:
    return [path for _, path in zip(range(count), iterator)]
