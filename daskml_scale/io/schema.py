"""One Arrow schema for many CSV files, and Arrow tables as pandas with the package's dtypes.

The schema is inferred from the first rows of a few files (the first, middle and last)
and merged: integer columns are ``int64`` (read as nullable ``Int64``), floats
``float64``, text ``str``; a column that is integer in one sampled file and fractional in
another is ``float64`` everywhere. The first sampled file decides text versus number.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
from fsspec.utils import infer_compression

from daskml_scale.exceptions import BadRowError, DataError, EmptyFileError
from daskml_scale.io.paths import display_name

__all__ = ["arrow_to_pandas", "infer_schema", "merge_schemas", "sample_schema"]

_INT64 = pd.Int64Dtype()
_TO_NULLABLE_INT = {
    pa.int8(): _INT64, pa.int16(): _INT64, pa.int32(): _INT64, pa.int64(): _INT64,
    pa.uint8(): _INT64, pa.uint16(): _INT64, pa.uint32(): _INT64,
}

_HEADER_ONLY = b"daskml_scale.header-only"

_DTYPE_TO_ARROW = {
    "float64": pa.float64(), "float32": pa.float32(), "float": pa.float64(),
    "int64": pa.int64(), "Int64": pa.int64(), "int": pa.int64(), "int32": pa.int64(),
    "str": pa.string(), "string": pa.string(), "object": pa.string(), "category": pa.string(),
    "bool": pa.bool_(), "boolean": pa.bool_(),
}


def arrow_to_pandas(table: pa.Table) -> pd.DataFrame:
    """``table`` as pandas: integers as nullable ``Int64``, text as ``str``."""
    df = table.to_pandas(types_mapper=_TO_NULLABLE_INT.get)
    for name, col in df.items():
        if isinstance(col.dtype, pd.StringDtype) and col.dtype != "str":
            df[name] = col.astype("str")
    return df


def _normalise_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_floating(t) or pa.types.is_null(t):
        return pa.float64()
    if pa.types.is_boolean(t):
        return pa.bool_()
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return pa.string()  # dates stay text; the user's transform parses them
    return pa.string()


def infer_schema(
    fs: fsspec.AbstractFileSystem, path: str, display: str, compression: str | None,
    dtype: dict[str, Any] | None, sample_bytes: int,
) -> pa.Schema:
    """The columns of one CSV file, typed from its first ``sample_bytes`` (whole lines).

    Raises
    ------
    EmptyFileError
        The file is empty.
    BadRowError
        Its first rows cannot be parsed.
    """
    with fs.open(path, "rb", compression=compression) as f:
        head = f.read(sample_bytes)
        if len(head) == sample_bytes:  # cut at the last full line
            head = head[: head.rfind(b"\n") + 1] or head
    if not head.strip():
        raise EmptyFileError(f"{display} is empty: expected a header line and rows", path=display, line=1)
    try:
        table = pacsv.read_csv(
            io.BytesIO(head),
            read_options=pacsv.ReadOptions(use_threads=False),
            parse_options=pacsv.ParseOptions(invalid_row_handler=lambda row: "skip"),
        )
    except pa.ArrowInvalid as exc:
        raise BadRowError(f"{display}: cannot infer the columns from its first rows: {exc}", path=display) from exc
    fields = []
    for field in table.schema:
        # a header-only file names its columns but not their types: null until merged
        t = _normalise_type(field.type) if table.num_rows else pa.null()
        if dtype and field.name in dtype:
            t = _DTYPE_TO_ARROW.get(str(dtype[field.name]), t)
        fields.append(pa.field(field.name, t))
    return pa.schema(fields, metadata=None if table.num_rows else {_HEADER_ONLY: b"1"})


def _header_only(schema: pa.Schema) -> bool:
    return bool(schema.metadata and _HEADER_ONLY in schema.metadata)


def merge_schemas(schemas: list[pa.Schema], dtype: dict[str, Any] | None) -> pa.Schema:
    """The first file's columns, each with a type every sampled file fits (a column
    typed in no file, as in header-only files, is ``float64``)."""
    first = schemas[0]
    fields = []
    for field in first:
        types = {s.field(field.name).type for s in schemas if field.name in s.names} - {pa.null()}
        if pa.types.is_null(field.type):
            typed = [s.field(field.name).type for s in schemas[1:] if field.name in s.names]
            field = pa.field(field.name, next((t for t in typed if not pa.types.is_null(t)), pa.float64()))
        # the first file decides text vs number (text in a later file is then a bad
        # cell, reported with its line); samples only widen integer to float
        if dtype and field.name in dtype:
            t = field.type
        elif pa.types.is_integer(field.type) and pa.float64() in types:
            t = pa.float64()
        else:
            t = field.type
        fields.append(pa.field(field.name, t))
    return pa.schema(fields)


def sample_schema(
    fs: fsspec.AbstractFileSystem,
    paths: Sequence[str],
    *,
    compression: str | None = "infer",
    dtype: dict[str, Any] | None = None,
    sample_bytes: int = 1 << 20,
    skip_unreadable: bool = False,
) -> pa.Schema | None:
    """One schema for ``paths``, inferred from the first, middle and last files and merged.

    Parameters
    ----------
    fs : fsspec.AbstractFileSystem
    paths : sequence of str
        CSV files on ``fs``.
    compression : str or None
        ``"infer"`` (from each file's name), ``None`` or an fsspec compression name.
    dtype : dict, optional
        Column types that override inference.
    sample_bytes : int
        How much of the start of each sampled file is read.
    skip_unreadable : bool
        ``False``: a sampled file that cannot be read (empty, broken first rows) raises
        its error. ``True``: it is left out and the next file not yet tried is sampled
        instead, until three are read; ``None`` when no file of ``paths`` can be read.

    Returns
    -------
    pyarrow.Schema or None

    Raises
    ------
    DataError
        A sampled file is empty or unreadable (only with ``skip_unreadable=False``).
    """
    n = len(paths)
    sample = sorted({0, n // 2, n - 1}) if n else []
    schemas: list[pa.Schema] = []
    header_only: list[pa.Schema] = []
    tried: set[int] = set()
    for i in sample + list(range(n)):
        if len(schemas) == 3:
            break
        if i in tried:
            continue
        if i not in sample and schemas and not skip_unreadable:
            break  # past the sample only to find a file with rows (or, skipping, a readable one)
        tried.add(i)
        comp = infer_compression(paths[i]) if compression == "infer" else compression
        try:
            schema = infer_schema(fs, paths[i], display_name(fs, paths[i]), comp, dtype, sample_bytes)
        except DataError:
            if not skip_unreadable:
                raise
            continue
        (header_only if _header_only(schema) else schemas).append(schema)
    found = schemas + header_only
    return merge_schemas(found, dtype) if found else None
