"""Read CSV / Parquet from any fsspec URL into Dask DataFrames, with clear errors.

A CSV partition is a byte range of one file (whole files when they are compressed or
small). Every partition is parsed with pyarrow against one schema inferred up front,
so dtypes agree across partitions: integer columns are nullable ``Int64`` (an integer
column with missing values in some files does not break the others), floats are
``float64``, text is ``str``.

Bad input names its file, line and column. ``on_bad_rows="skip"`` drops malformed
rows, counts them per file and reports them through :func:`bad_rows_report`.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import dask
import dask.dataframe as dd
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
from fsspec.core import get_fs_token_paths
from fsspec.utils import infer_compression, read_block, seek_delimiter

from daskml_scale import config
from daskml_scale.exceptions import BadRowError, DataError, EmptyFileError, MissingColumnError

__all__ = ["read_csv", "read_parquet", "bad_rows_report", "PATH_COLUMN", "LINE_COLUMN", "expand_paths"]

logger = logging.getLogger(__name__)

PATH_COLUMN = "_path"
LINE_COLUMN = "_line"
BAD_ROWS_TOPIC = "daskml_scale.bad-rows"

_CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.xz", ".csv.zst", ".tsv", ".txt")


# ---------------------------------------------------------------------------- paths
def expand_paths(
    urlpath: str | Sequence[str], storage_options: dict[str, Any] | None = None, suffixes: Sequence[str] = _CSV_SUFFIXES
) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """Expand a URL, glob, directory or list of them into (filesystem, files), in order.

    Globs and directories are sorted; an explicit list keeps the user's order.
    """
    urls = [urlpath] if isinstance(urlpath, str) else list(urlpath)
    if not urls:
        raise DataError("Expected at least one path. Received: an empty list")
    fs, _, _ = get_fs_token_paths(urls[0], storage_options=storage_options or {})
    out: list[str] = []
    for url in urls:
        _, _, paths = get_fs_token_paths(url, storage_options=storage_options or {})
        if not paths:
            raise DataError(f"No files match {url!r}", path=str(url))
        for p in paths:
            if fs.isdir(p):
                inside = sorted(f for f in fs.find(p) if f.endswith(tuple(suffixes)))
                if not inside:
                    raise DataError(f"Directory {url!r} holds no files ending in {list(suffixes)}", path=str(url))
                out.extend(inside)
            else:
                out.append(p)
    return fs, out


def _display(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The path as a user would write it: with its protocol unless local."""
    return fs.unstrip_protocol(path) if not _is_local(fs) else path


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


# ---------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class _Piece:
    """One partition's source: a byte range of one file."""

    path: str
    display: str
    start: int
    length: int | None  # None: to the end of the file
    compression: str | None

    @property
    def first(self) -> bool:
        return self.start == 0


def _arrow_to_pandas(table: pa.Table) -> pd.DataFrame:
    mapping = {
        pa.int8(): pd.Int64Dtype(), pa.int16(): pd.Int64Dtype(), pa.int32(): pd.Int64Dtype(),
        pa.int64(): pd.Int64Dtype(), pa.uint8(): pd.Int64Dtype(), pa.uint16(): pd.Int64Dtype(),
        pa.uint32(): pd.Int64Dtype(),
    }
    df = table.to_pandas(types_mapper=mapping.get)
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


_DTYPE_TO_ARROW = {
    "float64": pa.float64(), "float32": pa.float32(), "float": pa.float64(),
    "int64": pa.int64(), "Int64": pa.int64(), "int": pa.int64(), "int32": pa.int64(),
    "str": pa.string(), "string": pa.string(), "object": pa.string(), "category": pa.string(),
    "bool": pa.bool_(), "boolean": pa.bool_(),
}


def _infer_schema(
    fs: fsspec.AbstractFileSystem, path: str, display: str, compression: str | None,
    dtype: dict[str, Any] | None, sample_bytes: int,
) -> pa.Schema:
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
        t = _normalise_type(field.type)
        if dtype and field.name in dtype:
            t = _DTYPE_TO_ARROW.get(str(dtype[field.name]), t)
        fields.append(pa.field(field.name, t))
    return pa.schema(fields)


def _merge_schemas(schemas: list[pa.Schema], dtype: dict[str, Any] | None) -> pa.Schema:
    """The first file's columns, each with a type every sampled file fits."""
    first = schemas[0]
    fields = []
    for field in first:
        types = {s.field(field.name).type for s in schemas if field.name in s.names}
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


def _meta_for(schema: pa.Schema, provenance: bool) -> pd.DataFrame:
    meta = _arrow_to_pandas(schema.empty_table())
    if provenance:
        meta[PATH_COLUMN] = pd.Series([], dtype="str")
        meta[LINE_COLUMN] = pd.Series([], dtype="int64")
    return meta


# ---------------------------------------------------------------------------- pieces
def _plan_pieces(
    fs: fsspec.AbstractFileSystem, paths: list[str], blocksize: int | None, compression: str | None
) -> list[_Piece]:
    pieces: list[_Piece] = []
    sizes = fs.sizes(paths) if blocksize else [None] * len(paths)
    for path, size in zip(paths, sizes):
        comp = infer_compression(path) if compression == "infer" else compression
        display = _display(fs, path)
        if comp or not blocksize or size is None or size <= blocksize:
            pieces.append(_Piece(path, display, 0, None, comp))
            continue
        for start in range(0, size, blocksize):
            pieces.append(_Piece(path, display, start, blocksize, None))
    return pieces


def _line_offset(fs: fsspec.AbstractFileSystem, piece: _Piece, block_start: int) -> int:
    """Number of the file's physical line at which the block starts (1-based)."""
    if block_start == 0:
        return 1
    if piece.start == 0:  # the data follows the header line directly
        return 2
    n = 0
    with fs.open(piece.path, "rb") as f:
        remaining = block_start
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 24))
            if not chunk:
                break
            n += chunk.count(b"\n")
            remaining -= len(chunk)
    return n + 1


def _nonempty_line_numbers(block: bytes) -> np.ndarray:
    """1-based physical line (within the block) of each non-empty line."""
    lines = block.split(b"\n")
    if lines and lines[-1] == b"":
        lines = lines[:-1]
    return np.array([i + 1 for i, ln in enumerate(lines) if ln.strip(b"\r")], dtype=np.int64)


class _Bytes:
    """The data lines of a piece: ``raw[skip:]`` without copying ``raw``."""

    def __init__(self, raw: bytes, skip: int = 0) -> None:
        self.raw = raw
        self.skip = skip
        self._bytes: bytes | None = None

    def reader(self) -> pa.BufferReader:
        """A zero-copy file for pyarrow."""
        return pa.BufferReader(pa.py_buffer(self.raw).slice(self.skip))

    def bytes(self) -> bytes:
        """The data as ``bytes`` (a copy; only for the rare paths that scan lines)."""
        if self._bytes is None:
            self._bytes = self.raw[self.skip :]
        return self._bytes

    def has_empty_lines(self) -> bool:
        return self.raw.find(b"\n\n", self.skip) >= 0 or self.raw.find(b"\n\r\n", self.skip) >= 0


class _BlockReader:
    """Parse one piece: header check, types, bad rows, provenance."""

    def __init__(
        self, fs: fsspec.AbstractFileSystem, schema: pa.Schema, columns: list[str] | None,
        on_bad_rows: str, provenance: bool, sep: str,
    ) -> None:
        self.fs = fs
        self.schema = schema
        self.columns = columns
        self.on_bad_rows = on_bad_rows
        self.provenance = provenance
        self.sep = sep

    # -- reading ---------------------------------------------------------------
    def _read_bytes(self, piece: _Piece) -> tuple[bytes, _Bytes, int]:
        """(header line, data lines, byte offset of the data in the file) for the piece."""
        fs = self.fs
        if piece.length is None:
            with fs.open(piece.path, "rb", compression=piece.compression) as f:
                raw = f.read()
            nl = raw.find(b"\n")
            header = raw if nl < 0 else raw[: nl + 1]
            return header, _Bytes(raw, len(header)), len(header)
        with fs.open(piece.path, "rb") as f:
            header = f.readline()
            block = read_block(f, piece.start, piece.length, delimiter=b"\n")
            if piece.start == 0:
                return header, _Bytes(block, len(header)), len(header)
            # read_block starts after the first newline at or past `start`: find where
            f.seek(piece.start)
            seek_delimiter(f, b"\n", 1 << 16)
            return header, _Bytes(block), f.tell()

    def __call__(self, piece: _Piece) -> pd.DataFrame:
        header, data, data_start = self._read_bytes(piece)
        if not header.strip():
            raise EmptyFileError(
                f"{piece.display} is empty: expected a header line naming the columns {self.schema.names}",
                path=piece.display, line=1,
            )
        names = [n.strip().strip('"') for n in header.decode("utf-8", "replace").rstrip("\r\n").split(self.sep)]
        wanted = self.columns or self.schema.names
        for col in wanted:
            if col not in names:
                raise MissingColumnError(
                    f"{piece.display}: required column {col!r} is missing (line 1 has {names})",
                    path=piece.display, line=1, column=col,
                )
        bad: list[tuple[int, str]] = []  # (row number among non-empty lines, text)

        def on_invalid(row: Any) -> str:
            bad.append((int(row.number) if row.number is not None else -1, row.text))
            return "skip"

        types = {f.name: f.type for f in self.schema if f.name in names}
        # pyarrow's default 1 MiB blocks parse ~30% faster on one thread than one big block
        read_opts = pacsv.ReadOptions(use_threads=False, column_names=names)
        parse_opts = pacsv.ParseOptions(delimiter=self.sep, invalid_row_handler=on_invalid)
        convert = pacsv.ConvertOptions(
            column_types=types, include_columns=list(wanted), strings_can_be_null=True,
        )
        try:
            table = pacsv.read_csv(data.reader(), read_options=read_opts, parse_options=parse_opts, convert_options=convert)
            conversion_bad: dict[int, str] = {}
        except pa.ArrowInvalid:
            bad.clear()
            table, conversion_bad = self._read_with_text_check(data, names, wanted, types, read_opts, parse_opts)

        line_offset: int | None = None

        def physical_line(row_number: int) -> int:
            nonlocal line_offset
            if line_offset is None:
                line_offset = _line_offset(self.fs, piece, data_start)
            numbers = _nonempty_line_numbers(data.bytes())
            idx = row_number - 1
            within = int(numbers[idx]) if 0 <= idx < len(numbers) else row_number
            return line_offset + within - 1

        # rows pyarrow numbered: header is row 1 in its numbering (column_names given -> no header)
        problems: list[tuple[int, str]] = []
        for number, text in bad:
            problems.append((number, f"expected {len(names)} fields, found {text.count(self.sep) + 1}: {text[:200]!r}"))
        # conversion failures are reported by row position among parsed rows; map later
        if problems and self.on_bad_rows == "error":
            number, why = problems[0]
            line = physical_line(number) if number > 0 else None
            raise BadRowError(f"{piece.display}, line {line}: malformed row, {why}", path=piece.display, line=line)

        df = _arrow_to_pandas(table)
        # parsed rows -> their ordinal among non-empty lines
        n_parsed = len(df)
        bad_numbers = sorted(n for n, _ in bad if n > 0)
        ordinals = np.arange(1, n_parsed + len(bad_numbers) + 1, dtype=np.int64)
        if bad_numbers:
            ordinals = np.setdiff1d(ordinals, np.array(bad_numbers, dtype=np.int64), assume_unique=True)
        ordinals = ordinals[:n_parsed]

        if conversion_bad:
            rows = sorted(conversion_bad)
            if self.on_bad_rows == "error":
                pos = rows[0]
                col, value = conversion_bad[pos].split("\x00", 1)
                line = physical_line(int(ordinals[pos]))
                kind = "an integer" if pa.types.is_integer(types.get(col, pa.float64())) else "a number"
                hint = (
                    f" (the column was read as integer from the first file; pass dtype={{{col!r}: 'float64'}})"
                    if kind == "an integer" else ""
                )
                raise BadRowError(
                    f"{piece.display}, line {line}, column {col!r}: expected {kind}, found {value!r}{hint}",
                    path=piece.display, line=line, column=col,
                )
            keep = np.ones(n_parsed, dtype=bool)
            keep[rows] = False
            df = df[keep]
            ordinals = ordinals[keep]
            for pos in rows:
                col, value = conversion_bad[pos].split("\x00", 1)
                problems.append((-1, f"column {col!r}: expected a number, found {value!r}"))

        if problems:
            self._report_skipped(piece, [p[1] for p in problems])

        if self.provenance:
            if line_offset is None:
                line_offset = _line_offset(self.fs, piece, data_start)
            if data.has_empty_lines():
                numbers = _nonempty_line_numbers(data.bytes())
                lines = numbers[ordinals - 1] + line_offset - 1
            else:
                lines = ordinals + line_offset - 1
            df[PATH_COLUMN] = pd.Series([piece.display] * len(df), dtype="str", index=df.index)
            df[LINE_COLUMN] = np.asarray(lines, dtype=np.int64)
        df = df.reset_index(drop=True)
        return df[list(wanted) + ([PATH_COLUMN, LINE_COLUMN] if self.provenance else [])]

    def _read_with_text_check(
        self, data: _Bytes, names: list[str], wanted: Sequence[str], types: dict[str, pa.DataType],
        read_opts: pacsv.ReadOptions, parse_opts: pacsv.ParseOptions,
    ) -> tuple[pa.Table, dict[int, str]]:
        """Parse every column as text, then convert, noting cells that are not numbers."""
        text_types = {n: pa.string() for n in names}
        table = pacsv.read_csv(
            data.reader(), read_options=read_opts, parse_options=parse_opts,
            convert_options=pacsv.ConvertOptions(column_types=text_types, include_columns=list(wanted)),
        )
        df = table.to_pandas()
        bad: dict[int, str] = {}
        arrays = []
        for name in wanted:
            target = types.get(name, pa.string())
            col = df[name]
            if pa.types.is_integer(target) or pa.types.is_floating(target):
                stripped = col.where(col.str.strip() != "", None)
                num = pd.to_numeric(stripped, errors="coerce")
                is_bad = num.isna() & stripped.notna() & ~stripped.str.strip().str.lower().isin(
                    ["nan", "na", "n/a", "null", "none", "-nan", "#n/a"]
                )
                if pa.types.is_integer(target):
                    # the schema says integer: a fraction or inf here is a bad cell
                    with np.errstate(invalid="ignore"):
                        frac = num.notna() & ~(np.isfinite(num) & (num == num.round()))
                    is_bad = is_bad | frac
                for pos in np.flatnonzero(is_bad.to_numpy()):
                    bad.setdefault(int(pos), f"{name}\x00{col.iloc[pos]}")
                if pa.types.is_integer(target):
                    num = num.where(~is_bad, None)
                    arr = pa.array(pd.array(num, dtype="Int64"), type=pa.int64())
                else:
                    arr = pa.array(num.astype("float64"), type=pa.float64())
            elif pa.types.is_boolean(target):
                arr = pa.array(col.str.lower().map({"true": True, "false": False}), type=pa.bool_())
            else:
                arr = pa.array(col, type=pa.string())
            arrays.append(arr)
        return pa.table(arrays, names=list(wanted)), bad

    def _report_skipped(self, piece: _Piece, reasons: list[str]) -> None:
        record = {
            "path": piece.display, "start": piece.start, "skipped": len(reasons), "examples": reasons[:5],
        }
        logger.warning("%s: skipped %d malformed row(s), e.g. %s", piece.display, len(reasons), reasons[0])
        try:
            from distributed import get_worker

            get_worker().log_event(BAD_ROWS_TOPIC, record)
        except ValueError:  # not on a worker (e.g. the synchronous scheduler)
            _LOCAL_BAD_ROWS.append(record)


_LOCAL_BAD_ROWS: list[dict[str, Any]] = []


def bad_rows_report(client: Any = None) -> pd.DataFrame:
    """Rows skipped under ``on_bad_rows="skip"``, counted per file.

    Returns
    -------
    pandas.DataFrame
        Columns ``path``, ``skipped`` (rows) and ``examples`` (a few reasons).
    """
    records = list(_LOCAL_BAD_ROWS)
    if client is None:
        try:
            from distributed import get_client

            client = get_client()
        except ValueError:
            client = None
    if client is not None:
        records += [msg for _, msg in client.get_events(BAD_ROWS_TOPIC)]
    if not records:
        return pd.DataFrame({"path": pd.Series([], dtype="str"), "skipped": pd.Series([], dtype="int64"), "examples": []})
    # a recomputed partition reports again: count each (file, byte range) once
    unique = {(r["path"], r["start"]): r for r in records}
    frame = pd.DataFrame(list(unique.values()))
    return (
        frame.groupby("path", sort=True)
        .agg(skipped=("skipped", "sum"), examples=("examples", lambda s: [e for ex in s for e in ex][:5]))
        .reset_index()
    )


# ---------------------------------------------------------------------------- public
def read_csv(
    urlpath: str | Sequence[str],
    *,
    columns: Sequence[str] | None = None,
    dtype: dict[str, Any] | None = None,
    blocksize: int | str | None = "default",
    storage_options: dict[str, Any] | None = None,
    compression: str | None = "infer",
    on_bad_rows: str | None = None,
    provenance: bool = False,
    sep: str = ",",
    sample_bytes: int = 1 << 20,
) -> dd.DataFrame:
    """Read CSV files from any fsspec URL into a Dask DataFrame.

    Parameters
    ----------
    urlpath : str or list of str
        A file, a glob (``data/*.csv``), a directory, or a list of them; local paths
        or fsspec URLs (``s3://bucket/prefix/*.csv``). Rows keep the order of the
        files (sorted for globs and directories, as given for lists) and of the lines.
    columns : list of str, optional
        Columns to read; a file without one of them is a :class:`MissingColumnError`.
    dtype : dict, optional
        Column types that override inference (``{"zip": "str"}``).
    blocksize : int, str or None
        Partition size for uncompressed files (``"64MiB"``). ``"default"`` takes
        ``daskml_scale.io.blocksize``; ``None`` makes one partition per file.
        Compressed files are always one partition each.
    storage_options : dict, optional
        Passed to fsspec (e.g. s3fs ``key``, ``secret``, ``client_kwargs``).
    compression : str or None
        ``"infer"`` (from the file name), ``None`` or an fsspec compression name.
    on_bad_rows : {"error", "skip"}
        ``"error"`` (the default, ``daskml_scale.io.on-bad-rows``) raises
        :class:`BadRowError` naming the file, line and column; ``"skip"`` drops the
        row, logs it and counts it per file (see :func:`bad_rows_report`).
    provenance : bool
        Add ``_path`` and ``_line`` columns: the file and 1-based line (the header
        is line 1) every row came from.

    Returns
    -------
    dask.dataframe.DataFrame

    Raises
    ------
    DataError
        No file matches, or a file is empty (:class:`EmptyFileError`).
    """
    on_bad_rows = on_bad_rows or config.get("io.on-bad-rows", "error")
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"Expected on_bad_rows to be 'error' or 'skip'. Received: on_bad_rows={on_bad_rows!r}")
    if blocksize == "default":
        blocksize = config.get("io.blocksize", "64MiB")
    if isinstance(blocksize, str):
        blocksize = dask.utils.parse_bytes(blocksize)
    fs, paths = expand_paths(urlpath, storage_options)
    # infer from the first, middle and last files, so a column that is integer in one
    # file and fractional in another is read as float64 everywhere
    sample = sorted({0, len(paths) // 2, len(paths) - 1})
    schemas = []
    for i in sample:
        comp = infer_compression(paths[i]) if compression == "infer" else compression
        schemas.append(_infer_schema(fs, paths[i], _display(fs, paths[i]), comp, dtype, sample_bytes))
    schema = _merge_schemas(schemas, dtype)
    if columns is not None:
        for col in columns:
            if col not in schema.names:
                raise MissingColumnError(
                    f"{_display(fs, paths[0])}: required column {col!r} is missing (line 1 has {schema.names})",
                    path=_display(fs, paths[0]), line=1, column=col,
                )
        schema = pa.schema([schema.field(c) for c in columns])
    pieces = _plan_pieces(fs, paths, blocksize, compression)
    reader = _BlockReader(fs, schema, list(columns) if columns else None, on_bad_rows, provenance, sep)
    meta = _meta_for(schema, provenance)
    return dd.from_map(reader, pieces, meta=meta, label="daskml-read-csv", enforce_metadata=False)


def read_parquet(
    urlpath: str | Sequence[str],
    *,
    columns: Sequence[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dd.DataFrame:
    """Read Parquet files or datasets from any fsspec URL into a Dask DataFrame.

    A thin shell over :func:`dask.dataframe.read_parquet` that names a missing column.
    """
    ddf = dd.read_parquet(urlpath, storage_options=storage_options, **kwargs)
    if columns is not None:
        missing = [c for c in columns if c not in ddf.columns]
        if missing:
            raise MissingColumnError(
                f"{urlpath}: required column {missing[0]!r} is missing (the data has {list(ddf.columns)})",
                path=str(urlpath), column=missing[0],
            )
        ddf = ddf[list(columns)]
    return ddf
