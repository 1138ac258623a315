"""What several commands share: the usage error, the --engine/--precision/--calibration options
and the `RunSettings` built from a command's options,
numbers parsed within their range, the pixel sizes (--image-size, --size) bounded before a
command runs, the library's messages on stderr while a command runs, stdout that writes any
text, SIGTERM as an interrupt, and the input size a checkpoint's preprocessing gives."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from ..constants import ENGINE_PRECISIONS, ENGINES, IMAGE_SIZE_RANGE, PICTURE_SIZE_RANGE
from ..errors import CvtError, Range, check_size
from ..files import TEXT_ERRORS
from ..run_settings import RunSettings


class UsageError(CvtError):
    """A mistake in what the user asked for; printed without a traceback."""


# the pixel sizes commands accept (argparse dest -> option, inclusive range), checked before a
# command runs so that 0, negatives and absurd sizes are one-line errors, never "not given"
BOUNDED_SIZES = {"image_size": ("--image-size", IMAGE_SIZE_RANGE), "size": ("--size", PICTURE_SIZE_RANGE)}


def check_sizes(args: argparse.Namespace) -> None:
    for dest, (option, limits) in BOUNDED_SIZES.items():
        if getattr(args, dest, None) is not None:
            check_size(option, getattr(args, dest), limits)


def bounded(limits: Range) -> Callable[[str], int | float]:
    """An argparse type: the option's number, refused by argparse (one line naming the option and
    `limits`, exit status 2) when it is not a number within `limits` (0 images, a NaN rate)."""
    def parse(text: str) -> int | float:
        try:
            value = int(text) if limits.whole else float(text)
        except ValueError:
            value = None
        if value not in limits:
            raise argparse.ArgumentTypeError(f"must be {limits}; got {text!r}")
        return value

    parse.__name__ = "whole number" if limits.whole else "number"
    return parse


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--engine, --precision and --calibration, shared by `cvt predict` and `cvt eval`."""
    parser.add_argument("--engine", choices=ENGINES, default=RunSettings.engine,
                        help="how to run the model (default auto: the fastest installed fp32 engine "
                             "for the device)")
    parser.add_argument("--precision", choices=ENGINE_PRECISIONS, default=RunSettings.precision,
                        help="fp32 (exact), bf16 (CPUs with bf16 units, GPUs), int8 (needs "
                             "--calibration), fp16 (CUDA); reduced precision reports its cost")
    parser.add_argument("--calibration", metavar="DIR",
                        help="folder of your images for int8 calibration (class subfolders named "
                             "after the labels also report accuracy)")


def run_settings(args: argparse.Namespace, **named_otherwise: object) -> RunSettings:
    """The one `RunSettings` a command runs its model with, built from its parsed options: each
    setting the command has an option of that name for, and `named_otherwise` (serve's
    --max-batch-size is its batch_size). A bad value is a one-line error naming the setting."""
    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(RunSettings)
             if hasattr(args, field.name)}
    return RunSettings(**{**given, **named_otherwise})


@contextlib.contextmanager
def progress_bars_on_a_terminal_only() -> Iterator[None]:
    """transformers' progress bars (loading weights, downloading) only while stderr is a
    terminal: a log file or a pipe gets no carriage-return frames."""
    if sys.stderr.isatty():
        yield
        return
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


@contextlib.contextmanager
def messages_on_stderr() -> Iterator[None]:
    """Show the library's progress messages (INFO) and problems (WARNING) on stderr while a
    command runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("cvt")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


@contextlib.contextmanager
def stdout_writes_any_text() -> Iterator[None]:
    """While a command runs, stdout writes what its encoding cannot (a file name that is not
    UTF-8, a lone surrogate in a label) by cvt's one policy (`cvt.files.TEXT_ERRORS`: the name's
    own bytes, else an escape), as --output files do, never failing with a strict encoding
    (PYTHONIOENCODING=utf-8:strict). stderr escapes them already (Python's backslashreplace)."""
    stream = sys.stdout
    errors = getattr(stream, "errors", None)
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is None or errors is None:  # not a text file (a StringIO encodes nothing)
        yield
        return
    reconfigure(errors=TEXT_ERRORS)
    try:
        yield
    finally:
        reconfigure(errors=errors)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the command as Ctrl-C does (the results finished so far are still written,
    as a complete file), instead of ending the process at once. Python runs signal handlers in
    the main thread only: elsewhere (a command called from a thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def processor_image_size(source: str) -> int:
    """The input size a checkpoint's image processor gives (224 when it has none)."""
    from ..errors import CheckpointError
    from ..images.processing import CvtImageProcessor

    try:
        return CvtImageProcessor.from_pretrained(source).size
    except CheckpointError:
        return 224


def add_ray_arguments(parser: argparse.ArgumentParser, workers: bool = True) -> None:
    """--ray [ADDRESS], and --workers N unless `workers` is False (`cvt serve` has replicas),
    for the commands that run on a Ray cluster."""
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="run on Ray: alone, a private Ray instance on this machine; with the "
                        "HOST:PORT that `ray start --head` printed, that cluster (write it after the inputs)")
    if workers:
        parser.add_argument("--workers", type=int, metavar="N", help="with --ray: N actors, one model "
                            "each (default: one per node, with that node's CPUs)")
        parser.add_argument("--cpus-per-worker", type=int, metavar="C", help="with --ray: C CPUs, and as "
                            "many engine threads, per actor (default: a node's; with --workers alone, "
                            "as many as lets N actors fit)")
