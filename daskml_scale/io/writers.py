"""Fast CSV / Parquet writers and atomic writes to any fsspec URL.

* :func:`write_bytes_atomic` / :func:`write_frame_atomic`: a reader never sees half a
  file. Locally, the data goes to a temporary file in the same directory, then
  ``os.replace`` renames it into place; on object storage (S3, GCS, Azure) it is one
  ``put`` of the whole object, which the store makes visible all at once; on other
  filesystems, a temporary name then ``mv``.
* :func:`frame_to_csv` writes with ``pyarrow.csv.write_csv`` (several times faster
  than ``DataFrame.to_csv``, see ``benchmarks/bench_predict.py``). Floats are written
  in their shortest round-trip form, so ``pandas.read_csv`` reads back the same
  float64 values (float32 columns: the same float32 values); missing values (NaN,
  ``<NA>`` in ``Int64``, missing strings) are empty fields; text is quoted when needed.
  Columns pyarrow cannot convert fall back to ``DataFrame.to_csv``.
* :data:`FORMATS` is the one list of output formats (the CLI, ``predict_files`` and
  the jobs of the REST server take theirs from it).
"""

from __future__ import annotations

import glob
import io
import os
import uuid
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from daskml_scale.exceptions import ArgumentError
from daskml_scale.io.paths import is_local, protocol

__all__ = [
    "write_bytes_atomic",
    "write_frame_atomic",
    "frame_to_table",
    "frame_to_csv",
    "frame_to_parquet",
    "remove_stale_temps",
    "check_format",
    "FORMATS",
]

FORMATS = ("csv", "parquet")
# stores where one put of an object is atomic: readers see the old or the new object
_ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "memory"}


def _tmp_name(path: str) -> str:
    """A hidden name next to ``path`` (never read as an output; see :func:`remove_stale_temps`)."""
    head, tail = path.rsplit("/", 1) if "/" in path else ("", path)
    name = f".{tail}.tmp-{uuid.uuid4().hex[:12]}"
    return f"{head}/{name}" if head else name


def remove_stale_temps(outputs: list[str]) -> None:
    """Remove the temporary files that a killed writer left next to local ``outputs``."""
    for out in outputs:
        head, tail = os.path.split(out)
        for tmp in glob.glob(os.path.join(head, f".{glob.escape(tail)}.tmp-*")):
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


# ------------------------------------------------------------------------- frames
def frame_to_table(df: pd.DataFrame) -> pa.Table:
    """``df`` (without its index) as an Arrow table.

    ``df.attrs`` stays out: the reader keeps where a partition's rows came from there
    (``io/provenance.py``), which is not data, and Arrow would try to store it."""
    if df.attrs:
        df = df.copy(deep=False)
        df.attrs = {}
    return pa.Table.from_pandas(df, preserve_index=False)


def frame_to_csv(df: pd.DataFrame, sink: Any) -> None:
    """Write ``df`` (header, no index) as CSV to a path or binary file object, fast.

    Parameters
    ----------
    df : pandas.DataFrame
    sink : str or binary file-like
    """
    try:
        table = frame_to_table(df)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        # mixed-type object columns and the like: the slow writer copes
        if isinstance(sink, str):
            df.to_csv(sink, index=False)
        else:
            sink.write(df.to_csv(index=False).encode("utf-8"))
        return
    pacsv.write_csv(table, sink, write_options=pacsv.WriteOptions(include_header=True))


def frame_to_parquet(df: pd.DataFrame, sink: Any) -> None:
    """Write ``df`` (without its index) as Parquet to a path or binary file object."""
    pq.write_table(frame_to_table(df), sink)


_WRITERS = {"csv": frame_to_csv, "parquet": frame_to_parquet}


def check_format(format: str) -> None:
    """Raise unless ``format`` is one of :data:`FORMATS`.

    Raises
    ------
    ArgumentError
        ``format`` is not an output format.
    """
    if format not in FORMATS:
        raise ArgumentError(f"Expected format to be one of {list(FORMATS)}. Received: format={format!r}")


# ------------------------------------------------------------------------- atomic
def write_bytes_atomic(
    url: str,
    data: bytes,
    *,
    storage_options: dict[str, Any] | None = None,
    fs: fsspec.AbstractFileSystem | None = None,
) -> None:
    """Write ``data`` to ``url`` so that a reader sees the old file or the whole new one.

    Parameters
    ----------
    url : str
        Local path or fsspec URL; parent directories are created.
    data : bytes
    storage_options : dict, optional
        Passed to fsspec when ``fs`` is not given.
    fs : fsspec.AbstractFileSystem, optional
        The filesystem; then ``url`` may be a path without protocol.
    """
    if fs is None:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    else:
        path = fs._strip_protocol(url)
    _atomic(fs, path, lambda sink: sink.write(data), data)


def write_frame_atomic(
    df: pd.DataFrame,
    url: str,
    *,
    format: str = "csv",
    storage_options: dict[str, Any] | None = None,
    fs: fsspec.AbstractFileSystem | None = None,
) -> int:
    """Write a frame as CSV or Parquet to ``url`` atomically; returns the bytes written.

    Parameters
    ----------
    df : pandas.DataFrame
        Written without its index.
    url : str
        Local path or fsspec URL.
    format : {"csv", "parquet"}
        One of :data:`FORMATS`.
    storage_options : dict, optional
    fs : fsspec.AbstractFileSystem, optional

    Raises
    ------
    ArgumentError
        ``format`` is not one of :data:`FORMATS`.
    """
    check_format(format)
    writer = _WRITERS[format]
    if fs is None:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    else:
        path = fs._strip_protocol(url)
    if is_local(fs):
        return _atomic(fs, path, lambda sink: writer(df, sink), None)
    buf = io.BytesIO()
    writer(df, buf)
    data = buf.getvalue()
    return _atomic(fs, path, lambda sink: sink.write(data), data)


def _atomic(fs: fsspec.AbstractFileSystem, path: str, write: Any, data: bytes | None) -> int:
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if is_local(fs):
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = _tmp_name(path)
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return size
    if data is None:
        buf = io.BytesIO()
        write(buf)
        data = buf.getvalue()
    if protocol(fs) in _ATOMIC_PUT:
        fs.pipe_file(path, data)
        return len(data)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = _tmp_name(path)
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)
    return len(data)
