"""Object storage (s3://, gs://, and the other file systems pyarrow knows) for `cvt predict`:
listing the images under a prefix, reading one object with a size bound, and uploading a finished
results file. Everything goes through `pyarrow.fs`, which reads the usual credentials and
settings of each store (for S3: AWS_ACCESS_KEY_ID, AWS_PROFILE, AWS_ENDPOINT_URL, ...).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Collection
from typing import Any

from .errors import CvtError, install_hint

URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# an object read whole into memory: far above any image within the pixel budget (24 Mpx of 16-bit
# RGBA is 192 MB uncompressed), and a bound on what one hostile object can take
MAX_OBJECT_BYTES = 256 << 20


class StorageError(CvtError):
    """A bucket, prefix or object that cannot be reached: missing, or refused to these credentials."""


def is_uri(name: object) -> bool:
    """Whether `name` names an object in a store (scheme://...), not a local path."""
    return isinstance(name, str) and bool(URI.match(name))


def _filesystem(uri: str) -> tuple[Any, str, str]:
    """(pyarrow file system, path in it, the URI's prefix up to the path) for `uri`."""
    try:
        import pyarrow.fs as pafs
    except ImportError as err:
        raise ImportError(f"object storage needs pyarrow: {install_hint('parquet')}") from err
    try:  # options in a query (s3://b/k?endpoint_override=...) go to the file system
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as err:  # ArrowInvalid, ArrowNotImplementedError: a scheme pyarrow lacks
        raise StorageError(f"{uri}: pyarrow cannot open this location ({_first_line(err)})") from None
    return fs, path, uri.partition("://")[0] + "://"


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _info(fs: Any, path: str, uri: str) -> Any:
    """The FileInfo of `path`, after checking that its bucket exists (a store reports a path in a
    missing bucket as merely not found)."""
    import pyarrow.fs as pafs

    bucket = path.split("/", 1)[0]  # "" for a file system without buckets (hdfs:///...)
    try:
        if bucket and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageError(f"{uri}: the bucket {bucket!r} does not exist (or these credentials "
                               f"cannot see it)")
        return fs.get_file_info(path)
    except OSError as err:
        raise StorageError(f"{uri}: cannot reach it: {_first_line(err)} (check the store's "
                           f"credentials and endpoint)") from None


def list_files(uri: str, extensions: Collection[str]) -> list[str]:
    """The object at `uri`, or the objects under that prefix whose names end with one of
    `extensions` (hidden names, ".*", skipped), sorted, as URIs."""
    import pyarrow.fs as pafs

    fs, path, scheme = _filesystem(uri)
    query = uri.partition("?")[1] + uri.partition("?")[2]
    info = _info(fs, path, uri)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: no such object or prefix")
    try:
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as err:
        raise StorageError(f"{uri}: cannot list it: {_first_line(err)}") from None
    names = sorted(i.path for i in found if i.type == pafs.FileType.File
                   and not any(part.startswith(".") for part in i.path[len(path):].split("/"))
                   and "." + i.path.rpartition(".")[2].lower() in extensions)
    return [f"{scheme}{name}{query}" for name in names]


def read_object(uri: str, limit: int = MAX_OBJECT_BYTES) -> bytes:
    """The bytes of the object at `uri`; over `limit` bytes it is refused, having read no more."""
    fs, path, _ = _filesystem(uri)
    try:
        with fs.open_input_stream(path) as stream:
            data = stream.read(limit + 1)
    except FileNotFoundError:
        raise StorageError("no such object") from None
    except OSError as err:
        raise StorageError(f"cannot read it: {_first_line(err)}") from None
    if len(data) > limit:
        raise StorageError(f"over {limit >> 20} MiB, cvt's limit for one object read from storage")
    return data


def check_writable(uri: str) -> None:
    """Before any work: `uri`'s bucket exists and `uri` is not a prefix holding objects."""
    import pyarrow.fs as pafs

    fs, path, _ = _filesystem(uri)
    if _info(fs, path, uri).type == pafs.FileType.Directory:
        raise StorageError(f"--output {uri} is a prefix holding objects; give the name of the object to write")


def upload(local: str, uri: str) -> None:
    """Copy the finished file `local` to `uri` (stores make an object visible whole, when its
    upload completes)."""
    fs, path, _ = _filesystem(uri)
    try:
        with open(local, "rb") as source, fs.open_output_stream(path) as target:
            shutil.copyfileobj(source, target, 1 << 20)
    except OSError as err:
        raise StorageError(f"--output {uri}: the upload failed: {_first_line(err)}; the results are "
                           f"kept in {local}") from None
