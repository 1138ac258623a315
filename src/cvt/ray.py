"""Batch inference on Ray Data (the "ray" extra): `CvtPredictor`, a callable class for
`Dataset.map_batches` that builds one engine per actor, and `predict_rows`, which runs
`cvt predict --ray` on a cluster.

Ray moves the work across nodes, restarts dead actors, retries their batches and streams the
results back; cvt brings its bounded image loader and an error row for each file that fails, so
that one bad file never fails a batch. Reading the file list needs no CPU beyond the actors', so a
run finishes on a cluster with exactly as many CPUs as actors.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .errors import InvalidValueError, install_hint
from .images import ImageError
from .inference import pipeline
from .predictions import Row, arrow_schema, to_row
from .processing import CvtImageProcessor

try:
    import pyarrow as pa
    import ray
    import ray.data
except ImportError as err:  # absolute imports: Ray's package, never this module
    raise ImportError(f"cvt.ray needs Ray Data: {install_hint('ray')}") from err

log = logging.getLogger(__name__)
# "local" (a private instance), "auto", ray://HOST:PORT, or the HOST:PORT `ray start --head` prints
ADDRESS = re.compile(r"^(local|auto|ray://\S+|[\w.-]+:\d+|\[[0-9A-Fa-f:]+\]:\d+)$")
MAX_BLOCKS = 10_000  # the file list is cut into blocks of one batch, fewer for huge lists


class CvtPredictor:
    """Top-k labels for a batch of images, as a callable class for `Dataset.map_batches`.

    Ray builds one per actor, so the model is loaded and its engine built once per actor, in
    `__init__` (arguments as `cvt.pipeline`'s). A batch has a `path` column (files read by cvt's
    bounded loader) or an `image` column (arrays, as `ray.data.read_images` yields; its `path`
    column, if any, is passed through). The result is an Arrow table with one row per input:
    `path`, `labels` and `scores` (the top-k, best first), `error` (None, or why that file
    failed) and `node`, the id of the Ray node that classified it.
    """

    def __init__(self, model: str, *, engine: str = "auto", precision: str = "fp32", top_k: int = 5,
                 device: str | None = None, batch_size: int = 8, image_size: int | None = None,
                 calibration: str | None = None) -> None:
        processor = CvtImageProcessor.for_model(model, image_size)
        self.pipeline = pipeline("image-classification", model, image_processor=processor, device=device,
                                 top_k=top_k, batch_size=batch_size, engine=engine, precision=precision,
                                 calibration=calibration)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: Any) -> pa.Table:
        if "image" in batch:
            paths = batch["path"] if "path" in batch else [None] * len(batch["image"])
            rows = self._classify_images(list(batch["image"]), list(paths))
        elif "path" in batch:
            rows = [to_row(path, result) for path, result in self.pipeline.classify_files(list(batch["path"]))]
        else:
            raise InvalidValueError(f"CvtPredictor needs a 'path' or an 'image' column; got {list(batch)}")
        table = pa.Table.from_pylist(rows, schema=arrow_schema())
        return table.append_column("node", pa.array([self.node] * len(rows), pa.string()))

    def _classify_images(self, images: list[Any], paths: list[str | None]) -> list[Row]:
        prepared = [self._prepare(image) for image in images]
        good = [p for p in prepared if isinstance(p, torch.Tensor)]
        predictions = iter(self.pipeline.classify(torch.cat(good)) if good else [])
        return [to_row(path, next(predictions) if isinstance(p, torch.Tensor) else p)
                for path, p in zip(paths, prepared)]

    def _prepare(self, image: Any) -> torch.Tensor | ImageError:
        try:
            return self.pipeline.image_processor(image)["pixel_values"]
        except (ImageError, TypeError) as err:
            return ImageError(str(err))


def connect(address: str = "local") -> bool:
    """Connect this process to Ray, unless it is already: "local" starts a private instance on
    this machine. The workers' logs stay in Ray's session folder: forwarded, they would mix
    with results written to stdout. Returns whether this call connected (the caller then calls
    `ray.shutdown`)."""
    if ray.is_initialized():
        return False
    if not ADDRESS.match(address):
        raise InvalidValueError(f"--ray {address}: expected HOST:PORT (as `ray start --head` prints it), "
                                f"ray://HOST:PORT or auto; write --ray after the inputs, or --ray=ADDRESS")
    private = {"include_dashboard": False} if address == "local" else {}
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, **private)
    return True


def classify_dataset(paths: Sequence[str], model: str, *, workers: int, batch_size: int = 8,
                     **settings: Any) -> ray.data.Dataset:
    """The lazy dataset of `paths`' rows: the list cut into blocks, classified by a pool of
    `workers` `CvtPredictor` actors of one CPU (and one GPU with a CUDA device) each."""
    per_block = max(batch_size, math.ceil(len(paths) / MAX_BLOCKS))
    items = ray.data.from_items([{"path": path} for path in paths],
                                override_num_blocks=math.ceil(len(paths) / per_block))
    gpu = str(settings.get("device") or "").startswith("cuda")
    return items.map_batches(CvtPredictor, fn_constructor_args=(model,),
                             fn_constructor_kwargs=dict(batch_size=batch_size, **settings),
                             batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers),
                             num_cpus=1, num_gpus=1 if gpu else None)


def predict_rows(paths: Sequence[str], model: str, *, address: str = "local", workers: int | None = None,
                 **settings: Any) -> Iterator[Row]:
    """Connect to Ray and classify `paths` there: each file's row, in the order they finish.
    `settings` are `CvtPredictor`'s; `workers` defaults to one per CPU of the cluster."""
    if workers is not None and workers < 1:
        raise InvalidValueError(f"--workers must be a positive number of actors, got {workers}")
    started = connect(address)
    try:
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
        dataset = classify_dataset(paths, model, workers=workers, **settings)
    except BaseException:
        if started:
            ray.shutdown()
        raise
    log.info("cvt: ray: %d files on %d actors", len(paths), workers)
    return _stream(dataset, started)


def _stream(dataset: ray.data.Dataset, started: bool) -> Iterator[Row]:
    """The dataset's rows as they arrive, each node named when its first results come; closing
    it (or Ctrl-C) stops the job, and a private instance is shut down."""
    per_node: dict[str, int] = {}
    try:
        for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in table.to_pylist():
                node = row.pop("node")
                if node not in per_node:
                    log.info("cvt: ray: node %s: first results", node)
                per_node[node] = per_node.get(node, 0) + 1
                yield row
        log.info("cvt: ray: files per node: %s", ", ".join(f"{n} {count}" for n, count in per_node.items()))
    finally:
        if started:
            ray.shutdown()
