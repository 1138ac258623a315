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
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .errors import ClusterError, InvalidValueError, install_hint
from .files import utf8_text
from .images import ImageError, load_image, load_image_bytes
from .inference import pipeline
from .predictions import Row, arrow_schema, to_row
from .processing import CvtImageProcessor
from .storage import StorageError, is_uri, read_object

try:
    import pyarrow as pa
    import ray
    import ray.data
except ImportError as err:  # absolute imports: Ray's package, never this module
    raise ImportError(f"cvt.ray needs Ray Data: {install_hint('ray')}") from err

log = logging.getLogger(__name__)
# "local" (a private instance), "auto", ray://HOST:PORT, or the HOST:PORT `ray start --head` prints
ADDRESS = re.compile(r"^(local|auto|ray://\S+|[\w.-]+:\d+|\[[0-9A-Fa-f:]+\]:\d+)$")
READERS = 8  # objects in storage read at once by one actor: their latency overlaps
MAX_BLOCKS = 10_000  # the file list is cut into blocks of one batch, fewer for huge lists
REACH_TIMEOUT_S = 10  # a cluster address that accepts no connection in this time is an error


class CvtPredictor:
    """Top-k labels for a batch of images, as a callable class for `Dataset.map_batches`.

    Ray builds one per actor, so the model is loaded and its engine built once per actor, in
    `__init__` (arguments as `cvt.pipeline`'s). A batch has a `path` column (files read by cvt's
    bounded loader; URIs such as s3://bucket/key are read from object storage through pyarrow)
    or an `image` column (arrays, as `ray.data.read_images` yields; its `path`
    column, if any, is passed through). The result is an Arrow table with one row per input:
    `path`, `labels` and `scores` (the top-k, best first), `error` (None, or why that file
    failed) and `node`, the id of the Ray node that classified it. Paths given as bytes (file
    names that are not UTF-8, which Arrow strings cannot hold) come back as the same bytes.
    """

    def __init__(self, model: str, *, engine: str = "auto", precision: str = "fp32", top_k: int = 5,
                 device: str | None = None, batch_size: int = 8, image_size: int | None = None,
                 calibration: str | None = None) -> None:
        processor = CvtImageProcessor.for_model(model, image_size)
        self.pipeline = pipeline("image-classification", model, image_processor=processor, device=device,
                                 top_k=top_k, batch_size=batch_size, engine=engine, precision=precision,
                                 calibration=calibration)
        self.node = ray.get_runtime_context().get_node_id()
        self.readers = ThreadPoolExecutor(max_workers=READERS)

    def __call__(self, batch: Any) -> pa.Table:
        if "image" in batch:
            paths = batch["path"] if "path" in batch else [None] * len(batch["image"])
            rows = self._classify_images(list(batch["image"]), list(paths))
        elif "path" in batch:
            return self._classify_files(list(batch["path"]))
        else:
            raise InvalidValueError(f"CvtPredictor needs a 'path' or an 'image' column; got {list(batch)}")
        return self._table(rows)

    def _table(self, rows: list[Row]) -> pa.Table:
        table = pa.Table.from_pylist(rows, schema=arrow_schema())
        return table.append_column("node", pa.array([self.node] * len(rows), pa.string()))

    def _classify_files(self, paths: list[str | bytes]) -> pa.Table:
        """Rows of files read by cvt's loader; names given as bytes are decoded as the operating
        system does (`os.fsdecode`) and given back as bytes, an error message made valid UTF-8."""
        files = [os.fsdecode(p) if isinstance(p, bytes) else p for p in paths]
        if any(is_uri(f) for f in files):
            rows = self._classify_images(list(self.readers.map(_read, files)), files)
        else:
            rows = [to_row(path, result) for path, result in self.pipeline.classify_files(files)]
        if not any(isinstance(p, bytes) for p in paths):
            return self._table(rows)
        rows = [{**row, "path": None, "error": row["error"] and utf8_text(row["error"])} for row in rows]
        return self._table(rows).set_column(0, "path", pa.array([bytes(p) for p in paths], pa.binary()))

    def _classify_images(self, images: list[Any], paths: list[str | None]) -> list[Row]:
        prepared = [self._prepare(image) for image in images]
        good = [p for p in prepared if isinstance(p, torch.Tensor)]
        predictions = iter(self.pipeline.classify(torch.cat(good)) if good else [])
        return [to_row(path, next(predictions) if isinstance(p, torch.Tensor) else p)
                for path, p in zip(paths, prepared)]

    def _prepare(self, image: Any) -> torch.Tensor | ImageError:
        if isinstance(image, ImageError):  # a file that could not be read
            return image
        try:
            return self.pipeline.image_processor(image)["pixel_values"]
        except (ImageError, TypeError) as err:
            return ImageError(str(err))


def _read(name: str) -> Any:
    """The decoded image at `name` (a URI in object storage, or a local file), or why not."""
    try:
        return load_image_bytes(read_object(name), name) if is_uri(name) else load_image(name)
    except StorageError as err:
        return ImageError(f"{name}: {err}")
    except ImageError as err:
        return err


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
    check_reachable(address)
    private = {"include_dashboard": False} if address == "local" else {}
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:  # Ray's SIGTERM handler ends the process (sys.exit): the caller's keeps the results
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, **private)
    except SystemExit as err:  # Ray's handler ran while Ray started: the caller's decides
        if err.code != signal.SIGTERM or not callable(handler):
            raise
        ray.shutdown()
        handler(signal.SIGTERM, None)
        raise
    finally:
        if callable(handler):
            signal.signal(signal.SIGTERM, handler)
    return True


def check_reachable(address: str) -> None:
    """A HOST:PORT where nothing accepts a connection is an error at once: `ray.init` would wait
    minutes for it, deaf to Ctrl-C."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        return  # local, auto
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as err:
        raise ClusterError(f"--ray {address}: no Ray cluster answers there ({err.strerror or err}); "
                           f"check the address `ray start --head` printed, and that the head node runs") from err


def classify_dataset(paths: Sequence[str | bytes], model: str, *, workers: int, batch_size: int = 8,
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


def predict_rows(paths: Sequence[str | os.PathLike], model: str, *, address: str = "local",
                 workers: int | None = None, **settings: Any) -> Iterator[Row]:
    """Connect to Ray and classify `paths` there: each file's row (its path as given), in the
    order they finish. `settings` are `CvtPredictor`'s; `workers` defaults to one per CPU of the
    cluster. Local paths (files, model folder, calibration folder) go to the cluster absolute and
    as bytes: each node resolves a relative one from its own working directory, and Arrow
    strings cannot hold a file name that is not UTF-8."""
    if workers is not None and workers < 1:
        raise InvalidValueError(f"--workers must be a positive number of actors, got {workers}")
    names = {os.fsencode(p if is_uri(p) else Path(p).absolute()): str(p) for p in paths}
    model, settings["calibration"] = _absolute(model), _absolute(settings.get("calibration"))
    started = connect(address)
    try:
        workers = _actors(workers, gpu=str(settings.get("device") or "").startswith("cuda"))
        ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
        dataset = classify_dataset(list(names), model, workers=workers, **settings)
    except BaseException:
        if started:
            ray.shutdown()
        raise
    log.info("cvt: ray: %d files on %d actors", len(paths), workers)
    rows = _stream(dataset, names, started)
    next(rows)  # into its `try`: closing it from now on shuts Ray down, even before the first row
    return rows


def _absolute(name: str | None) -> str | None:
    """`name` made absolute when it is a local file or folder (a hub id goes as it is)."""
    return str(Path(name).absolute()) if name is not None and Path(name).exists() else name


def _actors(asked: int | None, gpu: bool) -> int:
    """How many actors run: `asked`, at most one per CPU (GPU) of the cluster, which has no room
    for more; by default one per CPU."""
    room = max(1, int(ray.cluster_resources().get("GPU" if gpu else "CPU", 1)))
    if asked is not None and asked > room:
        log.warning("cvt: ray: --workers %d, but the cluster has %d %ss: running %d actors", asked, room,
                    "GPU" if gpu else "CPU", room)
    return room if asked is None else min(asked, room)


def _stream(dataset: ray.data.Dataset, names: dict[bytes, str], started: bool) -> Iterator[Row | None]:
    """The dataset's rows as they arrive (each path as the caller gave it), each node named when
    its first results come; closing it (or Ctrl-C) stops the job, and a private instance is shut
    down. It first yields None, once, when it is ready (`predict_rows` takes that one)."""
    per_node: dict[str, int] = {}
    try:
        yield None
        for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in table.to_pylist():
                row["path"] = names[row["path"]]
                node = row.pop("node")
                if node not in per_node:
                    log.info("cvt: ray: node %s: first results", node)
                per_node[node] = per_node.get(node, 0) + 1
                yield row
        log.info("cvt: ray: files per node: %s", ", ".join(f"{n} {count}" for n, count in per_node.items()))
    finally:
        if started:
            ray.shutdown()

