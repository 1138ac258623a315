"""`cvt predict`: finds image files, classifies them in batches, and reports the results as a table, JSON or CSV.

If a file cannot be classified (it is not an image, is truncated, or is a decompression bomb),
one line on stderr gives its path and the reason, and the file is skipped. Every other file is
still classified, and exit status 1 says that some failed. A file whose scores are not finite
(NaN weights) counts as failed too, with its scores written as null: the JSON is always valid.
Inputs are only read. The --output file is written atomically, so a run that crashes leaves an
earlier file intact; Ctrl-C stops the run, and the results finished so far are still written
(a complete JSON/CSV file) before `KeyboardInterrupt` goes on up.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from .constants import PREDICT_FORMATS
from .images import ImageError, find_images
from .files import write_atomic
from .inference import ImageClassificationPipeline, Prediction, pipeline
from .processing import CvtImageProcessor
from .errors import InvalidValueError

MAX_PATH_COLUMN = 60  # the table's path column grows to the longest path, up to this


def run(model: str, inputs: Sequence[str], *, top_k: int = 5, batch_size: int = 8,
        device: str | None = None, fmt: str = "table", output: str | None = None,
        engine: str = "auto", precision: str = "fp32", calibration: str | None = None,
        image_size: int | None = None) -> int:
    """Classify every image under `inputs`. Returns 0 if all were classified, 1 if some could not be."""
    if fmt not in PREDICT_FORMATS:
        raise InvalidValueError(f"unknown format {fmt!r}; choose one of {', '.join(PREDICT_FORMATS)}")
    paths = find_images(inputs)
    if output is not None and Path(output).resolve() in {p.resolve() for p in paths}:
        raise InvalidValueError(f"--output {output} is one of the input images and would be overwritten")
    classifier = pipeline("image-classification", model, device=device, top_k=top_k,
                          image_processor=CvtImageProcessor.for_model(model, image_size),
                          batch_size=batch_size, engine=engine, precision=precision,
                          calibration=calibration)
    if output is None:
        done, failures = report(classifier, paths, fmt, sys.stdout)
    else:
        def write(tmp: str) -> None:
            nonlocal done, failures
            with open(tmp, "w", encoding="utf-8", newline="") as out:
                done, failures = report(classifier, paths, fmt, out)

        done = failures = 0
        write_atomic(output, write)
        print(f"wrote {fmt} results for {done - failures} of {len(paths)} files to {output}"
              + (f" ({failures} could not be classified)" if failures else ""))
    if done < len(paths):
        raise KeyboardInterrupt(f"after {done} of {len(paths)} files")
    return 1 if failures else 0


def report(classifier: ImageClassificationPipeline, paths: list[Path], fmt: str, out: TextIO
           ) -> tuple[int, int]:
    """Write each file's result to `out` as it is ready, with errors on stderr. Ctrl-C stops it
    early, with the output still complete. Returns (files done, how many of them failed)."""
    width = min(max(len(str(p)) for p in paths), MAX_PATH_COLUMN)

    def emit(line: str) -> None:
        if out.isatty():  # lift the progress bar off the terminal, write, put it back
            tqdm.write(line, file=out)
        else:
            print(line, file=out)

    if fmt == "table":
        emit(f"{'image':<{width}}  {'score':>6}  label")
    elif fmt == "csv":
        emit(_csv_row("path", "rank", "label", "score", "error"))
    else:
        emit("[")
    done = failures = 0
    with tqdm(total=len(paths), unit="image", desc="classifying", file=sys.stderr, delay=1.0, leave=False,
              disable=not sys.stderr.isatty()) as bar:
        try:
            for path, result in classifier.classify_files(paths):
                reason = _failure(path, result)
                if reason:
                    failures += 1
                    tqdm.write(f"cvt: error: {path}: {reason}", file=sys.stderr)
                for line in _format(fmt, path, result, reason, width, first=done == 0):
                    emit(line)
                done += 1
                bar.update()
        except KeyboardInterrupt:  # keep what is finished: the caller writes it and re-raises
            pass
    if fmt == "json":
        emit("]")
    if failures:
        tqdm.write(f"cvt: {failures} of {done} files could not be classified", file=sys.stderr)
    return done, failures


def _failure(path: Path, result: list[Prediction] | ImageError) -> str | None:
    """Why a file's result is not usable (its error, or scores that are not finite), or None."""
    if isinstance(result, ImageError):
        return str(result).removeprefix(f"{path}: ")
    if not all(math.isfinite(p["score"]) for p in result):
        return "the model gave NaN or infinite scores (written as null; check its weights)"
    return None


def _format(fmt: str, path: Path, result: list[Prediction] | ImageError, reason: str | None,
            width: int, first: bool) -> list[str]:
    if fmt == "json":
        entry: dict = {"path": str(path)}
        if isinstance(result, list):
            entry["predictions"] = [{"label": p["label"], "score": _finite(p["score"])} for p in result]
        if reason:
            entry["error"] = reason
        return [("" if first else ",") + json.dumps(entry, allow_nan=False)]
    if fmt == "csv":
        if isinstance(result, ImageError):
            return [_csv_row(path, "", "", "", reason)]
        return [_csv_row(path, rank, p["label"], _finite(p["score"]), reason or "")
                for rank, p in enumerate(result, 1)]
    if reason:
        return []  # the table holds results; the error line went to stderr
    return [f"{str(path) if rank == 0 else '':<{width}}  {p['score']:.4f}  {p['label']}"
            for rank, p in enumerate(result)]


def _finite(score: float) -> float | None:
    return score if math.isfinite(score) else None


def _csv_row(*fields: object) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(fields)
    return buffer.getvalue()
