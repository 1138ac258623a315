"""Batch inference on Ray Data (the "ray" extra): `CvtPredictor`, a callable class for
`Dataset.map_batches` that builds one engine per actor, and `predict_rows`, which runs
`cvt predict --ray` on a cluster.

Ray moves the work across nodes, restarts dead actors, retries their batches and streams the
results back; cvt brings its bounded image loader and an error row for each file that fails, so
that one bad file never fails a batch. Reading the file list needs no CPU beyond the actors', so a
run finishes on a cluster with exactly as many CPUs as actors.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ClusterError, ClusterLostError, InvalidValueError, install_hint
from ..files import utf8_text
from ..images import ImageError, load_image, load_image_bytes
from ..inference import pipeline
from ..run_settings import RunSettings
from ..inference.predictions import Row, arrow_schema, to_row
from ..storage import StorageError, is_uri, read_object

try:
    import psutil
    import pyarrow as pa
    import ray
    import ray.data
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,  # Ray's own rule for a token at hand, as `ray start` applies it
    )
except ImportError as err:  # absolute imports: Ray's package, never this module
    raise ImportError(f"cvt.ray needs Ray Data: {install_hint('ray')}") from err

log = logging.getLogger(__name__)
# "local" (a private instance), "auto", ray://HOST:PORT, or the HOST:PORT `ray start --head` prints
ADDRESS = re.compile(r"^(local|auto|ray://\S+|[\w.-]+:\d+|\[[0-9A-Fa-f:]+\]:\d+)$")
READERS = 8  # objects in storage read at once by one actor: their latency overlaps
MAX_BLOCKS = 10_000  # the file list is cut into blocks of one batch, fewer for huge lists
REACH_TIMEOUT_S = 10  # a cluster address that accepts no connection in this time is an error
# a cluster whose GCS accepts no connection for this long is lost: well before Ray's own driver
# gives up on it (60 s, gcs_rpc_server_reconnect_timeout_s) and ends the process with status 1
LOST_AFTER_S = 15
ORPHAN_GRACE_S = 2  # a private instance's process left after ray.shutdown: time to end, then to stop


class CvtPredictor:
    """Top-k labels for a batch of images, as a callable class for `Dataset.map_batches`.

    Ray builds one per actor, so the model is loaded and its engine built once per actor, in
    `__init__` (a `cvt.RunSettings`, or its settings as keywords, `top_k=3`; `threads`, the engine's
    threads, is best set to the actor's `num_cpus`). A batch has a `path` column (files read by cvt's bounded loader; URIs
    such as s3://bucket/key are read from object storage through pyarrow) or an `image` column
    (arrays, as `ray.data.read_images` yields; its `path` column, if any, is passed through).
    The result is an Arrow table with one row per input: `path`, `labels` and `scores` (the
    top-k, best first), `error` (None, or why that file failed) and `node`, the id of the Ray
    node that classified it. Paths given as bytes (file
    names that are not UTF-8, which Arrow strings cannot hold) come back as the same bytes.
    """

    def __init__(self, model: str, settings: RunSettings | None = None, *, threads: int | None = None,
                 **options: Any) -> None:
        if threads is not None:  # before the engine is built: every engine runs on torch's thread count
            torch.set_num_threads(threads)
        self.pipeline = pipeline("image-classification", model, settings=settings, **options)
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
    if address != "local":
        use_token_as_ray_start_does()
    private = {"include_dashboard": False} if address == "local" else {}
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:  # Ray's SIGTERM handler ends the process (sys.exit): the caller's keeps the results
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, **private)
    except SystemExit as err:  # Ray's handler ran while Ray started: the caller's decides
        if err.code != signal.SIGTERM or not callable(handler):
            raise
        disconnect()
        handler(signal.SIGTERM, None)
        raise
    finally:
        if callable(handler):
            signal.signal(signal.SIGTERM, handler)
    return True


def disconnect() -> None:
    """`ray.shutdown`, after `connect` returned True; a private instance this process started
    ends with it, and what of it outlives Ray's shutdown is ended here. Ray gives the raylet 1 s
    after SIGTERM, then SIGKILL: on a busy machine (workers still starting) it has not stopped its
    agents by then, and these, orphaned, spend up to 60 s reporting its death to a GCS already
    gone. Stopping the raylet ourselves first cannot help: the driver ends (status 1) when its
    raylet does."""
    instance = [process for raylet in psutil.Process().children() if _named(raylet, "raylet")
                for process in _with_descendants(raylet)]
    try:
        ray.shutdown()
    finally:
        _end_processes(instance, ORPHAN_GRACE_S)


def _end_processes(processes: list[psutil.Process], grace_s: float) -> None:
    """Those of `processes` still alive after `grace_s` get SIGTERM, and SIGKILL `grace_s` later.
    One that ends on its own in between is passed over, never the end of the others' ending."""
    left = psutil.wait_procs(processes, timeout=grace_s)[1]
    for process in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    for process in psutil.wait_procs(left, timeout=grace_s)[1]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def _named(process: psutil.Process, name: str) -> bool:
    """Whether `process` runs the program `name` (False once it has ended)."""
    try:
        return process.name() == name
    except psutil.Error:
        return False


def _with_descendants(process: psutil.Process) -> list[psutil.Process]:
    """`process` and the processes it started, theirs included (none once it has ended)."""
    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return []


def use_token_as_ray_start_does() -> None:
    """Ray's token authentication, on when `RAY_AUTH_MODE` is unset and a token is at hand
    (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`): the rule `ray start` follows
    for a cluster, which then asks every client for the token, while `ray.init` of an address does
    not apply it (it retried, refused, for minutes). `RAY_AUTH_MODE` set, either way, is obeyed."""
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


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


@dataclass(frozen=True)
class Layout:
    """How a run's actors sit on the cluster: `actors` of `cpus` CPUs each (and as many engine
    threads), with one GPU each when `gpu`."""
    actors: int
    cpus: int
    gpu: bool = False


def plan_layout(node_cpus: Sequence[float], gpus: float = 0, workers: int | None = None,
                cpus_per_worker: int | None = None) -> Layout:
    """The actors for nodes of `node_cpus` CPUs (and `gpus` GPUs in all, when the run asks for a
    CUDA device). By default one actor per node with the CPUs of the smallest node, so a node
    twice as large runs two; `workers` alone: that many actors, each with as many CPUs as still
    lets them all fit; `cpus_per_worker` alone: as many actors of that many CPUs as fit; both:
    that many of that size. More actors than fit cannot start: a warning says so, and what fits
    runs. With GPUs: one actor per GPU, one CPU each unless `cpus_per_worker` says more."""
    check_counts(workers, cpus_per_worker)
    sizes = [int(n) for n in node_cpus if n >= 1]
    if not sizes:
        raise ClusterError("the Ray cluster has no node with a CPU for an actor")

    def fit(cpus: int) -> int:
        return sum(n // cpus for n in sizes)

    if gpus >= 1:
        cpus, room, has = cpus_per_worker or 1, int(gpus), f"{int(gpus)} GPUs"
    elif cpus_per_worker is not None:
        cpus, room = cpus_per_worker, fit(cpus_per_worker)
        has = f"room for {room} actors of {cpus} CPUs"
    elif workers is not None:
        room, has = fit(1), f"{fit(1)} CPUs"
        cpus = max(c for c in range(1, max(sizes) + 1) if fit(c) >= min(workers, room))
    else:
        cpus = min(sizes)
        room = has = fit(cpus)
    if room < 1:
        raise InvalidValueError(f"--cpus-per-worker {cpus}: no node of the cluster has {cpus} CPUs "
                                f"(the largest has {max(sizes)})")
    if workers is not None and workers > room:
        log.warning("cvt: ray: --workers %d, but the cluster has %s: running %d actors", workers, has, room)
    return Layout(actors=room if workers is None else min(workers, room), cpus=cpus, gpu=gpus >= 1)


def check_counts(workers: int | None, cpus_per_worker: int | None) -> None:
    """--workers and --cpus-per-worker, when given, are positive (checked before Ray starts)."""
    for option, value in (("--workers", workers), ("--cpus-per-worker", cpus_per_worker)):
        if value is not None and value < 1:
            raise InvalidValueError(f"{option} must be a positive number, got {value}")


def cluster_layout(workers: int | None, cpus_per_worker: int | None, gpu: bool) -> Layout:
    """`plan_layout` for the connected cluster's alive nodes."""
    nodes = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    return plan_layout(nodes, ray.cluster_resources().get("GPU", 0) if gpu else 0, workers, cpus_per_worker)


def classify_dataset(paths: Sequence[str | bytes], model: str, settings: RunSettings, *,
                     layout: Layout) -> ray.data.Dataset:
    """The lazy dataset of `paths`' rows: the list cut into blocks, classified by a pool of
    `CvtPredictor` actors as `layout` says (each node holds those its CPUs fit)."""
    batch_size = settings.batch_size
    per_block = max(batch_size, math.ceil(len(paths) / MAX_BLOCKS))
    items = ray.data.from_items([{"path": path} for path in paths],
                                override_num_blocks=math.ceil(len(paths) / per_block))
    return items.map_batches(CvtPredictor, fn_constructor_args=(model,),
                             fn_constructor_kwargs={"settings": settings, "threads": layout.cpus},
                             batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=layout.actors),
                             num_cpus=layout.cpus, num_gpus=1 if layout.gpu else None)


def predict_rows(paths: Sequence[str | os.PathLike], model: str, settings: RunSettings | None = None, *,
                 address: str = "local", workers: int | None = None, cpus_per_worker: int | None = None,
                 **options: Any) -> Iterator[Row]:
    """Connect to Ray and classify `paths` there: each file's row (its path as given), in the
    order they finish, as `settings` (changed by `options`, `top_k=3`) say; `workers` and `cpus_per_worker` shape
    the actors (`plan_layout`; by default one per node, with its CPUs). Local paths (files,
    model folder, calibration folder) go to the cluster absolute and as bytes: each node
    resolves a relative one from its own working directory, and Arrow strings cannot hold a file
    name that is not UTF-8; storage URIs go as they are."""
    check_counts(workers, cpus_per_worker)
    names = {os.fsencode(p if is_uri(p) else Path(p).absolute()): str(p) for p in paths}
    settings = (settings or RunSettings()).replace(**options)
    model, settings = _absolute(model), settings.replace(calibration=_absolute(settings.calibration))
    started = connect(address)
    try:  # a Ctrl-C at any moment from here on ends a private instance with its agents
        layout = cluster_layout(workers, cpus_per_worker, gpu=str(settings.device or "").startswith("cuda"))
        ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
        dataset = classify_dataset(list(names), model, settings, layout=layout)
        log.info("cvt: ray: %d files on %d actors of %d CPUs (and engine threads) each%s", len(paths),
                 layout.actors, layout.cpus, " and 1 GPU" if layout.gpu else "")
        rows = _stream(dataset, names, started, watch=not address.startswith("ray://"))
        next(rows)  # into its `try`: closing it from now on shuts Ray down, even before the first row
    except BaseException:
        if started:
            disconnect()
        raise
    return rows


def _batches(dataset: ray.data.Dataset, watch: bool) -> Iterator[pa.Table]:
    """The dataset's result batches, read on a thread of their own so that, while none comes,
    this one watches the cluster: a GCS that accepts no connection for `LOST_AFTER_S` seconds
    is a `ClusterLostError` here, where Ray would wait, then end the process (status 1). Not
    with `watch` False: a Ray Client driver (ray://) need not reach the GCS itself."""
    results: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def read() -> None:
        try:
            for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                _put(results, table, stop)
            _put(results, None, stop)
        except BaseException as err:  # given to the consumer, which raises it
            _put(results, err, stop)

    gcs = ray.get_runtime_context().gcs_address if watch else None
    threading.Thread(target=read, name="cvt-ray-results", daemon=True).start()
    silent_since: float | None = None
    try:
        while True:
            try:
                item = results.get(timeout=1.0)
            except queue.Empty:
                silent_since = None if _answers(gcs) else silent_since or time.monotonic()
                if silent_since is not None and time.monotonic() - silent_since > LOST_AFTER_S:
                    raise ClusterLostError(f"its GCS at {gcs} has not answered for {LOST_AFTER_S} s")
                continue
            if item is None:
                return
            if isinstance(item, Exception) and not _answers(gcs):
                raise ClusterLostError(f"its GCS at {gcs} does not answer ({type(item).__name__})") from item
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _put(results: queue.Queue, item: Any, stop: threading.Event) -> None:
    """`item` into `results`, waiting for room until the consumer stops."""
    while not stop.is_set():
        try:
            results.put(item, timeout=0.5)
            return
        except queue.Full:
            continue


def _answers(gcs: str | None) -> bool:
    """Whether the GCS at HOST:PORT accepts a connection (True when not watched: None)."""
    if gcs is None:
        return True
    host, _, port = gcs.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
        return True
    except OSError:
        return False


def _absolute(name: str | None) -> str | None:
    """`name` made absolute when it is a local file or folder (a hub id goes as it is)."""
    return str(Path(name).absolute()) if name is not None and Path(name).exists() else name


def _stream(dataset: ray.data.Dataset, names: dict[bytes, str], started: bool,
            watch: bool) -> Iterator[Row | None]:
    """The dataset's rows as they arrive (each path as the caller gave it), each node named when
    its first results come; closing it (or Ctrl-C) stops the job, and a private instance is shut
    down. It first yields None, once, when it is ready (`predict_rows` takes that one)."""
    per_node: dict[str, int] = {}
    try:
        yield None
        for table in _batches(dataset, watch):
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
            disconnect()

