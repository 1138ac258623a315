"""The scoring behind `cvt eval` and validation during `cvt train`: top-1, top-5, loss and the
confusion matrix over a labelled dataset, each image counted once across ranks (torchrun)."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..constants import EVAL_BATCH_SIZE
from ..engines import build_engine
from ..errors import InvalidValueError
from ..images.processing import CvtImageProcessor
from ..inference import processor_for
from ..run_settings import RunSettings
from ..modeling import CvtForImageClassification
from ..modeling.factory import load
from . import distributed
from .data import DataError, LabelledImages, ShardSampler, TransformedImages, load_eval_source, make_loader
from .report import EvalResult

logger = logging.getLogger("cvt")


def eval_transform(processor: CvtImageProcessor) -> Callable[[Any], torch.Tensor]:
    """One image -> (3, H, W) pixel values, exactly as `cvt predict` prepares it."""
    return functools.partial(_single_pixel_values, processor)


def _single_pixel_values(processor: CvtImageProcessor, image: Any) -> torch.Tensor:
    return processor(image, return_tensors="pt")["pixel_values"][0]


@torch.no_grad()
def score(logits_of: Callable[[torch.Tensor], torch.Tensor], images: LabelledImages,
          processor: CvtImageProcessor, batch_size: int, workers: int, ctx: distributed.Context
          ) -> EvalResult:
    """Top-1, top-5, mean cross-entropy and the confusion matrix of `logits_of(pixel_values)`
    over `images`; each rank scores its own shard and the counts are summed, so every image
    counts exactly once."""
    dataset = TransformedImages(images, eval_transform(processor))
    loader = make_loader(dataset, batch_size, ShardSampler(len(dataset), ctx.world_size, ctx.rank),
                         workers, drop_last=False)
    k = len(images.classes)
    confusion = torch.zeros(k, k, dtype=torch.float64, device=ctx.device)
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # top-5 hits, loss sum, count
    show = ctx.is_main and sys.stderr.isatty()
    for batch, labels in tqdm(loader, desc="evaluating", unit="batch", disable=not show, leave=False):
        if len(labels) == 0:
            continue
        batch, labels = batch.to(ctx.device), labels.to(ctx.device)
        logits = logits_of(batch).float().to(ctx.device)
        top = logits.topk(min(5, k), dim=-1).indices
        totals[0] += (top == labels[:, None]).any(dim=-1).sum()
        totals[1] += F.cross_entropy(logits, labels, reduction="sum")
        totals[2] += len(labels)
        confusion.index_put_((labels, top[:, 0]), torch.ones_like(labels, dtype=torch.float64),
                             accumulate=True)
    ctx.sum(confusion)
    ctx.sum(totals)
    count = int(totals[2].item())
    if count == 0:
        raise DataError("no readable images to evaluate")
    confusion = confusion.round().long().cpu()
    return EvalResult(top1=confusion.diag().sum().item() / count, top5=totals[0].item() / count,
                      loss=totals[1].item() / count, count=count, classes=list(images.classes),
                      confusion=confusion)


def evaluate_model(model_source: str, data: Any, settings: RunSettings | None = None,
                   workers: int | None = None) -> EvalResult:
    """`cvt eval`: score a saved model on a labelled dataset with an inference engine
    (distributed under torchrun), as `settings` say (None: the defaults, in batches of
    `EVAL_BATCH_SIZE`); the device is torchrun's (or this process's), and top-5 is always scored."""
    settings = settings or RunSettings(batch_size=EVAL_BATCH_SIZE)
    ctx = distributed.start()
    try:
        model = load(model_source)
        if not isinstance(model, CvtForImageClassification):
            raise InvalidValueError(f"{model_source} holds a backbone without a classification head: "
                                    f"nothing to evaluate")
        model = model.to(ctx.device)
        classes = [model.config.id2label[i] for i in range(model.config.num_labels)]
        images = load_eval_source(data).relabel(classes, f"{data}")
        processor = processor_for(model_source, settings)
        runner = build_engine(model, settings.engine, device=ctx.device, precision=settings.precision,
                              image_size=processor.size, calibration=settings.calibration, processor=processor,
                              cache_dir=settings.engine_cache_dir, batch_size=settings.batch_size)
        if runner.report is not None:
            logger.info("cvt: %s at %s: %s", runner.name, settings.precision, runner.report)
        return score(runner, images, processor, settings.batch_size,
                     min(4, os.cpu_count() or 1) if workers is None else workers, ctx)
    finally:
        distributed.stop(ctx)
