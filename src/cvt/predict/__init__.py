"""`cvt predict`: finds image files, classifies them in batches (in this process, or on a Ray
cluster with `ray=`), and reports the results as a table, JSON, JSON lines, CSV or parquet.

If a file cannot be classified (it is not an image, is truncated, or is a decompression bomb),
one line on stderr gives its path and the reason, and the file is skipped. Every other file is
still classified, and exit status 1 says that some failed. A file whose scores are not finite
(NaN weights) counts as failed too, with its scores written as null: the JSON is always valid.
Inputs are only read. Results are written as they arrive, so memory does not grow with the
folder. The --output file is written to a temporary file beside it (named on stderr for the
streaming formats) and renamed over it at the end, so an earlier file stays intact until then.
Ctrl-C (and SIGTERM, under `cvt predict`) stops the run, and the results finished so far are
still written (a complete file, parquet's footer included) before `KeyboardInterrupt` goes on
up. A process killed outright leaves in the temporary file whole lines of jsonl or csv, a valid
prefix; a parquet file is readable only once its footer is written, so that one is not.
CSV cells a spreadsheet would run as a formula get a leading single quote (`_csv_cell`).
Under Ray, inputs may be object-storage prefixes (s3://bucket/prefix, `cvt.storage`); --output
may be an object, uploaded once the local file is complete. A Ray cluster lost mid-run also
keeps the rows finished, then raises `ClusterLostError`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from ..constants import PREDICT_FORMATS
from .. import storage
from ..images import IMAGE_EXTENSIONS, find_images
from ..files import TEXT_ERRORS, write_atomic
from ..inference import RunSettings, pipeline, processor_for
from ..inference.predictions import ParquetRows, Row, jsonl_line, to_row
from ..errors import ClusterLostError, InvalidValueError, short

STREAMING = ("jsonl", "csv", "parquet")  # rows written as they arrive, to a temporary file named at the start
MAX_PATH_COLUMN = 60  # the table's path column grows to the longest path, up to this
# what makes a spreadsheet read a CSV cell as a formula (OWASP's list: = + - @, tab, carriage return)
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
Outcome = tuple[int, int, BaseException | None]  # files done, how many failed, what stopped the run early


def run(model: str, inputs: Sequence[str], settings: RunSettings | None = None, *, fmt: str = "table",
        output: str | None = None, ray: str | None = None, workers: int | None = None,
        cpus_per_worker: int | None = None) -> int:
    """Classify every image under `inputs` as `settings` say (None: the defaults); with `ray` (an
    address, or "local" for a private instance) on Ray actors (`workers` of `cpus_per_worker`
    CPUs; by default one per node, with its CPUs). Returns 0 if all were classified, 1 if some
    could not be."""
    settings = settings or RunSettings()
    if fmt not in PREDICT_FORMATS:
        raise InvalidValueError(f"unknown format {fmt!r}; choose one of {', '.join(PREDICT_FORMATS)}")
    if fmt == "parquet" and output is None:
        raise InvalidValueError("--format parquet writes a file: give --output FILE.parquet")
    if (workers is not None or cpus_per_worker is not None) and ray is None:
        option = "--workers" if workers is not None else "--cpus-per-worker"
        raise InvalidValueError(f"{option} shapes the Ray actors: give --ray as well")
    paths = find_inputs(inputs, ray is not None)
    if output is not None:
        check_output(output, model, paths)
    processor = processor_for(model, settings)  # checked here, before any work starts
    if ray is None:
        classifier = pipeline("image-classification", model, image_processor=processor, settings=settings)
        rows: Iterable[Row] = (to_row(path, result) for path, result in classifier.classify_files(paths))
    else:
        from .. import ray as on_ray  # the "ray" extra

        rows = on_ray.predict_rows(paths, model, settings, address=ray, workers=workers,
                                   cpus_per_worker=cpus_per_worker)
    try:
        done, failures, stopped = _write(rows, paths, fmt, output)
    finally:  # even when stopped before the first row was asked for (a Ray instance ends with it)
        _close(rows)
    if output is not None:
        print(f"wrote {fmt} results for {done - failures} of {len(paths)} files to {output}"
              + (f" ({failures} could not be classified)" if failures else ""))
    if isinstance(stopped, ClusterLostError):
        raise ClusterLostError(f"the Ray cluster was lost after {done} of {len(paths)} files ({stopped}); "
                               f"the rows finished before are written" + (f" to {output}" if output else ""))
    if done < len(paths):
        raise KeyboardInterrupt(f"after {done} of {len(paths)} files")
    return 1 if failures else 0


def find_inputs(inputs: Sequence[str], on_ray: bool) -> list[Path | str]:
    """The image files under `inputs`: local ones as `find_images` finds them, then the objects
    under each storage URI (s3://bucket/prefix), which Ray's actors read where they are."""
    remote = [item for item in inputs if storage.is_uri(item)]
    if remote and not on_ray:
        raise InvalidValueError(f"{remote[0]}: images in object storage are read by Ray actors: add --ray "
                                f"(alone, it starts a private Ray instance on this machine)")
    local = [item for item in inputs if not storage.is_uri(item)]
    found: list[Path | str] = list(find_images(local)) if local else []
    for uri in remote:
        objects = storage.list_files(uri, IMAGE_EXTENSIONS)
        if not objects:
            raise InvalidValueError(f"no image files under {uri} (looked for {' '.join(sorted(IMAGE_EXTENSIONS))})")
        found += objects
    return list(dict.fromkeys(found))


def check_output(output: str, model: str, paths: list[Path | str]) -> None:
    """Before anything is read or written: the results never go over what the run reads, an
    input image, the model's weights file, or a file in its folder (a new file there could
    change which weights the folder holds); and it can be written (a folder, or a parent that is
    a file or not writable, is refused here, before any Ray cluster starts; in object storage,
    a bucket that does not exist)."""
    if storage.is_uri(output):
        if output in paths:
            raise InvalidValueError(f"--output {short(output)} is one of the input images and would be overwritten")
        storage.check_writable(output)
        return
    target = Path(output).resolve()
    if target.is_dir():
        raise InvalidValueError(f"--output {short(output)} is a folder; give the name of the file to write")
    parent = next(folder for folder in target.parents if folder.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = "is a file" if not parent.is_dir() else "is not writable"
        raise InvalidValueError(f"--output {short(output)} cannot be written: {short(parent)} {why}")
    if target in {p.resolve() for p in paths if isinstance(p, Path)}:
        raise InvalidValueError(f"--output {short(output)} is one of the input images and would be overwritten")
    source = Path(model).resolve() if model and Path(model).exists() else None
    if source is not None and (target == source or (source.is_dir() and target.is_relative_to(source))):
        what = "the model's weights file" if target == source else f"in the model folder {short(model)}"
        raise InvalidValueError(f"--output {short(output)} is {what}, which this run reads; write the "
                                f"results elsewhere")


def _write(rows: Iterable[Row], paths: list[Path | str], fmt: str, output: str | None) -> Outcome:
    """Report `rows` on stdout, or into a temporary file renamed over `output` once complete (for
    object storage: a local file, uploaded once complete)."""
    if output is None:
        return report(rows, paths, fmt, sys.stdout)
    if storage.is_uri(output):
        staging = Path(tempfile.mkdtemp(prefix="cvt-predict-"))
        local = staging / (output.partition("?")[0].rstrip("/").rpartition("/")[2] or "results")
        counts = _write(rows, paths, fmt, str(local))
        storage.upload(str(local), output)  # a failed upload keeps the file, and names it
        shutil.rmtree(staging)
        return counts
    counts: Outcome = (0, 0, None)

    def write(tmp: str) -> None:
        nonlocal counts
        if fmt in STREAMING:
            print(f"cvt: writing to {tmp} (renamed to {output} when complete)", file=sys.stderr)
        if fmt == "parquet":
            counts = report(rows, paths, fmt, ParquetRows(tmp))
            return
        # file names that are not UTF-8 go out as their own bytes: a reader decoding the file
        # with surrogateescape gets the names back exactly (JSON escapes them); as on stdout
        with open(tmp, "w", encoding="utf-8", errors=TEXT_ERRORS, newline="") as out:
            counts = report(rows, paths, fmt, out)

    write_atomic(output, write)
    return counts


def report(rows: Iterable[Row], paths: list[Path | str], fmt: str, out: TextIO | ParquetRows) -> Outcome:
    """Write each file's row to `out` as it arrives, with errors on stderr. Ctrl-C (or a lost
    Ray cluster) stops it early, with the output still complete. Returns (files done, how many
    of them failed, what stopped it early or None)."""
    width = min(max(len(str(p)) for p in paths), MAX_PATH_COLUMN)
    streaming = fmt in STREAMING

    def emit(line: str) -> None:
        if out.isatty():  # lift the progress bar off the terminal, write, put it back
            tqdm.write(line, file=out)
        else:
            out.write(line + "\n")
            if streaming:  # one write per line: a killed run leaves whole lines only
                out.flush()

    if fmt == "table":
        emit(f"{'image':<{width}}  {'score':>6}  label")
    elif fmt == "csv":
        emit(_csv_row("path", "rank", "label", "score", "error"))
    elif fmt == "json":
        emit("[")
    done = failures = 0
    stopped = None
    with tqdm(total=len(paths), unit="image", desc="classifying", file=sys.stderr, delay=1.0, leave=False,
              disable=not sys.stderr.isatty()) as bar:
        try:
            for row in rows:
                if row["error"]:
                    failures += 1
                    tqdm.write(f"cvt: error: {row['path']}: {row['error']}", file=sys.stderr)
                if isinstance(out, ParquetRows):
                    out.write(row)
                else:
                    for line in _format(fmt, row, width, first=done == 0):
                        emit(line)
                done += 1
                bar.update()
        except (KeyboardInterrupt, ClusterLostError) as err:  # keep what is finished: the caller raises
            stopped = err
    if fmt == "json":
        emit("]")
    elif isinstance(out, ParquetRows):
        out.close()
    if failures:
        tqdm.write(f"cvt: {failures} of {done} files could not be classified", file=sys.stderr)
    return done, failures, stopped


def _close(rows: Iterable[Row]) -> None:
    """Stop the source of rows now (its threads, or its Ray job), not when it is collected."""
    close = getattr(rows, "close", None)
    if close is not None:
        close()


def _format(fmt: str, row: Row, width: int, first: bool) -> list[str]:
    if fmt == "jsonl":
        return [jsonl_line(row)]
    if fmt == "json":
        entry: dict = {"path": row["path"]}
        if row["labels"] is not None:
            entry["predictions"] = [{"label": label, "score": score}
                                    for label, score in zip(row["labels"], row["scores"])]
        if row["error"]:
            entry["error"] = row["error"]
        return [("" if first else ",") + json.dumps(entry, allow_nan=False)]
    if fmt == "csv":
        if row["labels"] is None:
            return [_csv_row(row["path"], "", "", "", row["error"])]
        return [_csv_row(row["path"], rank, label, score, row["error"] or "")
                for rank, (label, score) in enumerate(zip(row["labels"], row["scores"]), 1)]
    if row["error"]:
        return []  # the table holds results; the error line went to stderr
    return [f"{row['path'] if rank == 0 else '':<{width}}  {score:.4f}  {label}"
            for rank, (label, score) in enumerate(zip(row["labels"], row["scores"]))]


def _csv_row(*fields: object) -> str:
    """One CSV line; the writer's own line ending makes it quote fields holding \\r or \\n."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow([_csv_cell(field) for field in fields])
    return buffer.getvalue().removesuffix("\r\n")


def _csv_cell(field: object) -> object:
    """A text cell that starts with one of FORMULA_START gets a leading single quote, as OWASP
    advises against formula injection (a label `=HYPERLINK(...)` stays text in a spreadsheet);
    so does one that starts with quotes before such a character, so that reading back is one
    rule: a cell starting with `'` followed (after any quotes) by one of them had one added."""
    if isinstance(field, str) and field.lstrip("'").startswith(FORMULA_START):
        return "'" + field
    return field
