"""`cvt predict`: finds image files, classifies them in batches, and reports the results as a table, JSON or CSV.

If a file cannot be classified (it is not an image, is truncated, or is a decompression bomb),
one line on stderr gives its path and the reason, and the file is skipped. Every other file is
still classified, and exit status 1 says that some failed. Inputs are only read. The --output
file is written atomically, so an interrupted run leaves an earlier file intact.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from .images import ImageError, find_images
from .files import write_atomic
from .inference import ImageClassificationPipeline, Prediction, pipeline
from .processing import CvtImageProcessor

FORMATS = ("table", "json", "csv")
MAX_PATH_COLUMN = 60  # the table's path column grows to the longest path, up to this


def run(model: str, inputs: Sequence[str], *, top_k: int = 5, batch_size: int = 8,
        device: str | None = None, fmt: str = "table", output: str | None = None,
        engine: str = "auto", precision: str = "fp32", calibration: str | None = None,
        image_size: int | None = None) -> int:
    """Classify every image under `inputs`. Returns 0 if all were classified, 1 if some could not be."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    paths = find_images(inputs)
    if output is not None and Path(output).resolve() in {p.resolve() for p in paths}:
        raise ValueError(f"--output {output} is one of the input images and would be overwritten")
    classifier = pipeline("image-classification", model, device=device, top_k=top_k,
                          image_processor=CvtImageProcessor.for_model(model, image_size),
                          batch_size=batch_size, engine=engine, precision=precision,
                          calibration=calibration)
    if output is None:
        return 1 if report(classifier, paths, fmt, sys.stdout) else 0
    failures = 0

    def write(tmp: str) -> None:
        nonlocal failures
        with open(tmp, "w", encoding="utf-8", newline="") as out:
            failures = report(classifier, paths, fmt, out)

    write_atomic(output, write)
    print(f"wrote {fmt} results for {len(paths) - failures} of {len(paths)} files to {output}"
          + (f" ({failures} could not be classified)" if failures else ""))
    return 1 if failures else 0


def report(classifier: ImageClassificationPipeline, paths: list[Path], fmt: str, out: TextIO) -> int:
    """Write each file's result to `out` as it is ready, with errors on stderr. Returns how many failed."""
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
    failures = 0
    with tqdm(total=len(paths), unit="image", desc="classifying", file=sys.stderr, delay=1.0, leave=False,
              disable=not sys.stderr.isatty()) as bar:
        for index, (path, result) in enumerate(classifier.classify_files(paths)):
            if isinstance(result, ImageError):
                failures += 1
                tqdm.write(f"cvt: error: {result}", file=sys.stderr)
            for line in _format(fmt, path, result, width, last=index == len(paths) - 1):
                emit(line)
            bar.update()
    if fmt == "json":
        emit("]")
    if failures:
        tqdm.write(f"cvt: {failures} of {len(paths)} files could not be classified", file=sys.stderr)
    return failures


def _format(fmt: str, path: Path, result: list[Prediction] | ImageError, width: int, last: bool
            ) -> list[str]:
    reason = str(result).removeprefix(f"{path}: ") if isinstance(result, ImageError) else None
    if fmt == "json":
        entry = {"path": str(path), "error": reason} if reason else {"path": str(path), "predictions": result}
        return [json.dumps(entry) + ("" if last else ",")]
    if fmt == "csv":
        if reason:
            return [_csv_row(path, "", "", "", reason)]
        return [_csv_row(path, rank, p["label"], p["score"], "") for rank, p in enumerate(result, 1)]
    if reason:
        return []  # the table holds results; the error line went to stderr
    return [f"{str(path) if rank == 0 else '':<{width}}  {p['score']:.4f}  {p['label']}"
            for rank, p in enumerate(result)]


def _csv_row(*fields: object) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(fields)
    return buffer.getvalue()
