"""`engine="auto"`: the fastest installed fp32 engine on the machine it runs on, measured once.

No engine wins everywhere: which is fastest depends on the CPU, the batch size and the image
size, and only the machine the user runs on can tell. So the first time `auto` meets a model
architecture at an input size, a batch-size bucket (1, 2-8, over 8), a device, a CPU, a thread
count (torch's, which every engine uses) and `compile` (with these runtime versions), it builds
each installed fp32 engine that can run the model exactly (each checked against the plain model
to 1e-4, as every engine is), times them on a random batch of the bucket's size (1, 8 or 32
images) in alternating rounds, keeps the fastest median, and records the choice in the engine
cache; a stored choice that names no candidate is replaced, with a warning. A file lock
(`filelock`, which never follows a symbolic link: one planted there is removed) makes the first
process measure while the others (Ray actors, serve replicas started together) wait and read
its choice; a waiting process says which lock it waits for, and after LOCK_WAIT_S (a stopped
first process) gives up with an `EngineError`. Later runs pay nothing. The weights are not part
of the key: a fine-tuned copy of an architecture runs at its speed.

The bound on what it costs, once: engines are built until BUILD_BUDGET_S seconds have gone (those
built by then compete), then each gets one warm-up call and timed rounds stop after ROUNDS
rounds or once TIMING_BUDGET_S seconds have gone, whichever is first (at least MIN_ROUNDS).
Measured on a 2-core Zen 5, CvT-13 at 224: 27 s at batch 1 (both runtime exports included),
23 s at batch 32 with those engines already built; a later run reads the choice and loads the
chosen engine from the cache (0.9 s), as the runtime engines the measurement built stay there.

`CVT_AUTO_ENGINE=order` skips the measurement and takes the first installed engine of
AUTO_ORDER (the test suite sets it); the default is `measure`. At reduced precision `auto`
takes the fixed order too (what it measures is fp32 speed).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from ..constants import DISTRIBUTION
from ..errors import InvalidValueError, short
from . import openvino_engine
from .base import Engine, EngineError, Model, cpu_description, random_batch
from .cache import EngineCache, installed_version

logger = logging.getLogger("cvt")

# the fixed order (fastest first on a 2-core Zen 3, benchmarks/README.md): `order` mode, ties, CUDA
AUTO_ORDER = {"cpu": ("onnxruntime", "openvino", "torch"), "cuda": ("torch",)}
ENVIRONMENT = "CVT_AUTO_ENGINE"
MODES = ("measure", "order")
BUCKETS = (1, 8, 32)  # a batch is timed at the first of these it does not exceed, else the last
BUILD_BUDGET_S = 60.0
TIMING_BUDGET_S = 15.0
ROUNDS, MIN_ROUNDS = 7, 3
# before each timed call: lets the previous runtime park its spinning worker threads, which
# otherwise steal cores from whichever engine runs next (a 5 % swing at batch 1 on 2 cores)
PAUSE_S = 0.05
# how long a process waits for another measuring the same choice: far beyond a measurement's
# budgets (and the build that may overrun them); a first process stopped or hung holds it longer
LOCK_WAIT_S = 900.0
LOCK_WARN_S = 120.0  # after this, the wait is said again as a warning (it shows without logging set up)


def candidates(device: torch.device, model: Model | None = None) -> list[str]:
    """The installed fp32 engines for `device` that can run `model` exactly, in AUTO_ORDER."""
    names = [name for name in AUTO_ORDER.get(device.type, ("torch",))
             if name == "torch" or importlib.util.find_spec(name) is not None]
    if model is not None and openvino_engine.unsupported(model):
        names = [name for name in names if name != "openvino"]
    return names  # torch is always there


def mode() -> str:
    """`measure` (the default) or `order`, from $CVT_AUTO_ENGINE."""
    value = os.environ.get(ENVIRONMENT, "measure").strip().lower() or "measure"
    if value not in MODES:
        raise InvalidValueError(f"${ENVIRONMENT} must be one of {', '.join(MODES)}, got {value!r}")
    return value


def bucket(batch_size: int) -> int:
    """The batch size `auto` times for batches of `batch_size` (and keys its choice by)."""
    return next((size for size in BUCKETS if batch_size <= size), BUCKETS[-1])


def choose(model: Model, device: torch.device, image_size: tuple[int, int], batch_size: int,
           cache: EngineCache, build: Callable[[str], Engine], compile: bool = False) -> Engine:
    """The fastest of `candidates(device, model)` (`build(name)` builds one): measured the first
    time, read from the engine cache afterwards."""
    names = candidates(device, model)
    if len(names) == 1 or mode() == "order":
        return build(names[0])
    batch = bucket(batch_size)
    key = choice_key(model, device, image_size, batch, names, compile=compile)
    with _locked(cache.root, key):
        found = cache.load(key)
        chosen = found[1].get("engine") if found is not None else None
        if found is not None and chosen not in names:
            cache.discard(key, f"it chose {short(repr(chosen))}, not one of {', '.join(names)}")
        if chosen in names:
            logger.debug("cvt: auto: %s, as measured before", chosen)
        else:
            engine, seconds = _measure(model, image_size, batch, names, build)
            cache.store(key, lambda folder: None, {"engine": engine.name, "batch": batch, "seconds": seconds})
            return engine
    return build(chosen)


def choice_key(model: Model, device: torch.device, image_size: tuple[int, int], batch: int,
               names: list[str], compile: bool = False) -> str:
    """What the speed depends on: the architecture (not the weights or labels), the input,
    the device and CPU, the threads every engine runs on, `compile`, and the versions of cvt,
    torch and the runtimes."""
    config = model.config.architecture()
    versions = {name: installed_version(name) for name in (DISTRIBUTION, "torch", *names)}
    description = json.dumps({"auto": config, "class": type(model).__name__, "image_size": image_size,
                              "batch": batch, "device": device.type, "cpu": cpu_description(),
                              "threads": torch.get_num_threads(), "compile": compile,
                              "engines": names, "versions": versions}, sort_keys=True, default=str)
    return "auto-" + hashlib.sha256(description.encode()).hexdigest()[:40]


@contextlib.contextmanager
def _locked(root: Path, key: str) -> Iterator[None]:
    """An exclusive lock on the choice `key` (a file beside the entries; a symbolic link there is
    removed, never followed); without a writable cache there is nothing to share, and no lock."""
    path = root / f".{key}.lock"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            logger.warning("cvt: auto: the lock file %s is a symbolic link; removed, not followed", short(path))
            path.unlink()
        lock = _acquire(FileLock(path), path)
    except OSError:
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _acquire(lock: FileLock, path: Path) -> FileLock:
    """`lock`, taken; while another process holds it, says what it waits for (again, as a
    warning, after LOCK_WARN_S); `EngineError` after LOCK_WAIT_S."""
    waited = 0.0
    for until, say in ((0.0, None), (min(LOCK_WARN_S, LOCK_WAIT_S), logger.info), (LOCK_WAIT_S, logger.warning)):
        if say is not None:
            say("cvt: auto: waiting%s for another process measuring the engines for this model (lock %s); "
                "giving up after %.0f s", f" ({waited:.0f} s so far)" if waited else "", short(path), LOCK_WAIT_S)
        try:
            lock.acquire(timeout=until - waited)
            return lock
        except Timeout:
            waited = until
    raise EngineError(f"auto: another process has held the lock {short(path)} for {LOCK_WAIT_S:.0f} s while "
                      f"measuring the engines for this model (stopped, or hung); end it, or choose an engine "
                      f"(engine='onnxruntime', --engine) or set ${ENVIRONMENT}=order")


def _measure(model: Model, image_size: tuple[int, int], batch: int, names: list[str],
             build: Callable[[str], Engine]) -> tuple[Engine, dict[str, float]]:
    """(the fastest engine, each engine's median seconds per call) on a random batch."""
    started = time.perf_counter()
    engines: dict[str, Engine] = {}
    for name in names:
        if engines and time.perf_counter() - started > BUILD_BUDGET_S:
            logger.info("cvt: auto: %.0f s spent building; %s not measured", BUILD_BUDGET_S, name)
            break
        try:
            engines[name] = build(name)
        except EngineError as err:
            logger.warning("cvt: auto: the %s engine is not a candidate here (%s)", name, err)
    if not engines:
        raise EngineError(f"auto: none of the engines {', '.join(names)} can run this model here")
    times = time_rounds(engines, random_batch(model, image_size, batch))
    seconds = {name: statistics.median(values) for name, values in times.items()}
    best = min(seconds, key=seconds.get)
    logger.info("cvt: auto chose the %s engine for batches of about %d at %dx%d (median s per call: %s), "
                "in %.0f s", best, batch, *image_size,
                ", ".join(f"{name} {s:.4g}" for name, s in seconds.items()), time.perf_counter() - started)
    return engines[best], seconds


def time_rounds(engines: dict[str, Engine], pixel_values: torch.Tensor) -> dict[str, list[float]]:
    """Seconds per call of each engine, one call each per round in a rotating order, after one
    warm-up call each: ROUNDS rounds, fewer (not under MIN_ROUNDS) past TIMING_BUDGET_S."""
    for engine in engines.values():
        engine(pixel_values)
    names = list(engines)
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for round_ in range(ROUNDS):
        if round_ >= MIN_ROUNDS and time.perf_counter() - started > TIMING_BUDGET_S:
            break
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            time.sleep(PAUSE_S)
            start = time.perf_counter()
            engines[name](pixel_values)
            times[name].append(time.perf_counter() - start)
    return times
