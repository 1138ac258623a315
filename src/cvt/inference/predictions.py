"""One row per classified file, the same with or without Ray, and the writers that stream rows to
disk as they arrive, so that memory is bounded by a batch, not by the folder.

A row is {"path", "labels", "scores", "error"}: the top-k labels and their scores, best first, and
`error`, None or why the file failed. A file that could not be read has no labels or scores
(None); one whose scores are not finite keeps its labels, with its scores written as None.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, TypedDict

from ..errors import InvalidValueError, install_hint
from ..files import utf8_text
from ..images import ImageError
from . import Prediction

COLUMNS = ("path", "labels", "scores", "error")
ROW_GROUP = 1024  # rows per parquet row group: bounded memory, and groups large enough to read well


class Row(TypedDict):
    path: str | None
    labels: list[str] | None
    scores: list[float | None] | None
    error: str | None


def to_row(path: str | os.PathLike | None, result: list[Prediction] | ImageError) -> Row:
    """The row of one file's result: its top-k, or the error that stopped it (`path` is None for
    an image that came without one)."""
    path = None if path is None else str(path)
    if isinstance(result, ImageError):
        return {"path": path, "labels": None, "scores": None, "error": str(result).removeprefix(f"{path}: ")}
    scores = [p["score"] if math.isfinite(p["score"]) else None for p in result]
    error = None if None not in scores else ("the model gave NaN or infinite scores (written as null; "
                                              "check its weights)")
    return {"path": path, "labels": [p["label"] for p in result], "scores": scores, "error": error}


def jsonl_line(row: Row) -> str:
    """One row as a line of JSON (always valid JSON: no NaN)."""
    return json.dumps({key: row[key] for key in COLUMNS}, allow_nan=False)


def arrow_schema() -> Any:
    """The Arrow schema of rows (with Ray, an actor's output batch also carries `node`)."""
    pa = _pyarrow()
    return pa.schema([("path", pa.string()), ("labels", pa.list_(pa.string())),
                      ("scores", pa.list_(pa.float64())), ("error", pa.string())])


def parquet_row(row: Row) -> Row:
    """A row as parquet can hold it: parquet strings are UTF-8, so the bytes of a file name that
    is not UTF-8 are written as `\\xNN` escapes, and a lone surrogate in a label or message as
    `\\udNNN` (JSON lines and CSV keep the exact name)."""
    def text(value: str | None) -> str | None:
        return None if value is None else utf8_text(value)

    labels = None if row["labels"] is None else [text(label) for label in row["labels"]]
    return {**row, "path": text(row["path"]), "labels": labels, "error": text(row["error"])}


class ParquetRows:
    """Rows written to a parquet file in row groups of `ROW_GROUP` as they come; the file is
    valid once `close` has run (its footer is written last), so `predict` writes it beside the
    target, closes it even when interrupted, and renames it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.schema = arrow_schema()  # without pyarrow: an error naming the extra
        import pyarrow.parquet as pq

        self.file = open(path, "wb")  # by Python: pyarrow opens only names that are UTF-8
        try:
            self.writer = pq.ParquetWriter(self.file, self.schema)
        except BaseException:
            self.file.close()
            raise
        self.pending: list[Row] = []

    def write(self, row: Row) -> None:
        self.pending.append(parquet_row(row))
        if len(self.pending) >= ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        rows, self.pending = self.pending, []  # taken first: an interrupt mid-write never repeats them
        if rows:
            self.writer.write_table(_pyarrow().Table.from_pylist(rows, schema=self.schema))

    def close(self) -> None:
        try:
            self.flush()
            self.writer.close()
        finally:
            self.file.close()


def _pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError:
        raise InvalidValueError(f"parquet output needs pyarrow: {install_hint('parquet')}") from None
    return pyarrow
