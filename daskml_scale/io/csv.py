"""Read CSV files from any fsspec URL: one plan (schema, pieces, reader) and ``read_csv``.

A CSV partition is a byte range of one file (whole files when they are compressed or
small). Every partition is parsed with pyarrow against one schema inferred up front
(see :mod:`daskml_scale.io.schema`), so dtypes agree across partitions: integer columns
are nullable ``Int64`` (an integer column with missing values in some files does not
break the others), floats are ``float64``, text is ``str``.

:func:`plan_csv` makes the plan, :func:`read_csv` maps its reader over its pieces, and
``predict_files`` gives each file's piece to the same reader in one task per file.

Bad input names its file, line and column. ``on_bad_rows="skip"`` drops malformed
rows, counts them per file and reports them (see :mod:`daskml_scale.io.bad_rows`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import dask
import dask.dataframe as dd
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
from fsspec.utils import infer_compression, read_block, seek_delimiter

from daskml_scale import config
from daskml_scale.exceptions import BadRowError, DataError, EmptyFileError, MissingColumnError
from daskml_scale.io.bad_rows import check_on_bad_rows, record_skipped
from daskml_scale.io.paths import FilePiece, display_name, expand_paths
from daskml_scale.io.provenance import LINE_COLUMN, PATH_COLUMN, SOURCE_ATTR, RowSource
from daskml_scale.io.schema import arrow_to_pandas, sample_schema

__all__ = ["CsvPlan", "CsvReader", "plan_csv", "read_csv", "PATH_COLUMN", "LINE_COLUMN"]

_BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark ("CSV UTF-8" of spreadsheet programs)


def _meta_for(schema: pa.Schema, provenance: bool) -> pd.DataFrame:
    meta = arrow_to_pandas(schema.empty_table())
    if provenance:
        meta[PATH_COLUMN] = pd.Series([], dtype="str")
        meta[LINE_COLUMN] = pd.Series([], dtype="int64")
    return meta


# ---------------------------------------------------------------------------- pieces
def _plan_pieces(
    fs: fsspec.AbstractFileSystem, paths: Sequence[str], blocksize: int | None, compression: str | None
) -> list[FilePiece]:
    pieces: list[FilePiece] = []
    sizes = fs.sizes(paths) if blocksize else [None] * len(paths)
    for path, size in zip(paths, sizes):
        comp = infer_compression(path) if compression == "infer" else compression
        display = display_name(fs, path)
        if comp or not blocksize or size is None or size <= blocksize:
            pieces.append(FilePiece(path, display, 0, None, comp))
            continue
        for start in range(0, size, blocksize):
            pieces.append(FilePiece(path, display, start, blocksize, None))
    return pieces


def _line_offset(fs: fsspec.AbstractFileSystem, piece: FilePiece, block_start: int) -> int:
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

    def is_blank(self) -> bool:
        """No data at all (a header-only file, or a piece past the last line); blank lines only."""
        n = len(self.raw) - self.skip
        return n <= 0 or (n <= 4096 and not self.raw[self.skip :].strip())


class _Lines:
    """The file's physical line numbers of a piece's rows, worked out only when needed."""

    def __init__(self, fs: fsspec.AbstractFileSystem, piece: FilePiece, data: _Bytes, data_start: int) -> None:
        self.fs = fs
        self.piece = piece
        self.data = data
        self.data_start = data_start
        self._offset: int | None = None
        self._numbers: np.ndarray | None = None

    @property
    def offset(self) -> int:
        """The file's line at which the data starts."""
        if self._offset is None:
            self._offset = _line_offset(self.fs, self.piece, self.data_start)
        return self._offset

    def _nonempty(self) -> np.ndarray:
        if self._numbers is None:
            self._numbers = _nonempty_line_numbers(self.data.bytes())
        return self._numbers

    def of_row(self, row_number: int) -> int:
        """The line of the ``row_number``-th (1-based) non-empty line of the data."""
        numbers = self._nonempty()
        idx = row_number - 1
        within = int(numbers[idx]) if 0 <= idx < len(numbers) else row_number
        return self.offset + within - 1

    def of_rows(self, ordinals: np.ndarray) -> np.ndarray:
        """The lines of rows given by their (1-based) ordinals among non-empty lines."""
        if self.data.has_empty_lines():
            return self._nonempty()[ordinals - 1] + self.offset - 1
        return ordinals + self.offset - 1


@dataclass
class _Parsed:
    """A piece's rows as parsed: the table, and the rows and cells that did not fit."""

    table: pa.Table
    malformed: list[tuple[int, str]]  # (row number among non-empty lines, text); -1: unknown
    bad_cells: dict[int, str]  # parsed row position -> "column\x00value"


# ---------------------------------------------------------------------------- reader
class CsvReader:
    """Read one piece of a CSV file against one schema: check the header, parse, map
    bad rows and failed conversions to their lines, add provenance.

    Parameters
    ----------
    fs : fsspec.AbstractFileSystem
    schema : pyarrow.Schema or None
        The columns and their types; ``None`` when no input file was readable (each
        piece then fails, naming its file).
    columns : list of str, optional
        The columns to return (default: the schema's).
    on_bad_rows : {"error", "skip"}
    provenance : bool
        Add ``_path`` and ``_line`` columns.
    sep : str
        The field separator.
    """

    def __init__(
        self, fs: fsspec.AbstractFileSystem, schema: pa.Schema | None, columns: list[str] | None,
        on_bad_rows: str, provenance: bool, sep: str,
    ) -> None:
        self.fs = fs
        self.schema = schema
        self.columns = columns
        self.on_bad_rows = on_bad_rows
        self.provenance = provenance
        self.sep = sep

    def with_provenance(self, provenance: bool = True) -> CsvReader:
        """A copy of this reader that adds (or leaves out) the ``_path`` and ``_line`` columns."""
        other = copy.copy(self)
        other.provenance = provenance
        return other

    def __call__(self, piece: FilePiece) -> pd.DataFrame:
        """The rows of ``piece`` as a pandas DataFrame with the schema's dtypes."""
        if self.schema is None:
            raise DataError(
                f"{piece.display}: expected a header line and rows; no CSV file of the input had first rows "
                "that could be read to infer the columns from",
                path=piece.display,
            )
        header, data, data_start = self._read_bytes(piece)
        names = self._check_header(piece, header)
        wanted = self.columns or self.schema.names
        types = {f.name: f.type for f in self.schema if f.name in names}
        parsed = self._parse(data, names, wanted, types)
        lines = _Lines(self.fs, piece, data, data_start)
        problems = self._malformed_rows(piece, parsed, names, lines)
        df = arrow_to_pandas(parsed.table)
        ordinals = _parsed_ordinals(len(df), parsed.malformed)
        df, ordinals = self._failed_conversions(piece, df, ordinals, parsed.bad_cells, types, lines, problems)
        if problems:
            record_skipped(piece.display, piece.start, [p[1] for p in problems])
        if self.provenance:
            df[PATH_COLUMN] = pd.Series([piece.display] * len(df), dtype="str", index=df.index)
            df[LINE_COLUMN] = np.asarray(lines.of_rows(ordinals), dtype=np.int64)
        df = df.reset_index(drop=True)
        df = df[list(wanted) + ([PATH_COLUMN, LINE_COLUMN] if self.provenance else [])]
        # where the rows came from, for an error about one of them (see io.provenance)
        df.attrs[SOURCE_ATTR] = RowSource(self, piece, tuple(wanted), len(df))
        return df

    # -- the steps ---------------------------------------------------------------
    def _read_bytes(self, piece: FilePiece) -> tuple[bytes, _Bytes, int]:
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

    def _check_header(self, piece: FilePiece, header: bytes) -> list[str]:
        """The column names of the header line; every wanted column must be among them."""
        assert self.schema is not None
        if header.startswith(_BOM):  # only ever at the start of the file, so in its header line
            header = header[len(_BOM) :]
        if not header.strip():
            raise EmptyFileError(
                f"{piece.display} is empty: expected a header line naming the columns {self.schema.names}",
                path=piece.display, line=1,
            )
        names = [n.strip().strip('"') for n in header.decode("utf-8", "replace").rstrip("\r\n").split(self.sep)]
        for col in self.columns or self.schema.names:
            if col not in names:
                raise MissingColumnError(
                    f"{piece.display}: required column {col!r} is missing (line 1 has {names})",
                    path=piece.display, line=1, column=col,
                )
        return names

    def _parse(
        self, data: _Bytes, names: list[str], wanted: Sequence[str], types: dict[str, pa.DataType]
    ) -> _Parsed:
        """Parse the data lines with the schema's types; on a cell that does not convert,
        parse again as text and note the cells that are not numbers."""
        malformed: list[tuple[int, str]] = []
        if data.is_blank():  # pyarrow: "Empty CSV file"; here: the columns and no rows
            fields = [pa.field(n, types.get(n, pa.string())) for n in wanted]
            return _Parsed(pa.schema(fields).empty_table(), malformed, {})

        def on_invalid(row: Any) -> str:
            malformed.append((int(row.number) if row.number is not None else -1, row.text))
            return "skip"

        # pyarrow's default 1 MiB blocks parse ~30% faster on one thread than one big block
        read_opts = pacsv.ReadOptions(use_threads=False, column_names=names)
        parse_opts = pacsv.ParseOptions(delimiter=self.sep, invalid_row_handler=on_invalid)
        convert = pacsv.ConvertOptions(
            column_types=types, include_columns=list(wanted), strings_can_be_null=True,
        )
        try:
            table = pacsv.read_csv(data.reader(), read_options=read_opts, parse_options=parse_opts, convert_options=convert)
            return _Parsed(table, malformed, {})
        except pa.ArrowInvalid:
            malformed.clear()  # the second parse reports them again
            table, bad_cells = self._read_with_text_check(data, names, wanted, types, read_opts, parse_opts)
            return _Parsed(table, malformed, bad_cells)

    def _malformed_rows(
        self, piece: FilePiece, parsed: _Parsed, names: list[str], lines: _Lines
    ) -> list[tuple[int, str]]:
        """(row number, reason) per malformed row; under ``"error"`` the first one raises."""
        # rows pyarrow numbered: header is row 1 in its numbering (column_names given -> no header)
        problems = [
            (number, f"expected {len(names)} fields, found {text.count(self.sep) + 1}: {text[:200]!r}")
            for number, text in parsed.malformed
        ]
        if problems and self.on_bad_rows == "error":
            number, why = problems[0]
            line = lines.of_row(number) if number > 0 else None
            raise BadRowError(f"{piece.display}, line {line}: malformed row, {why}", path=piece.display, line=line)
        return problems

    def _failed_conversions(
        self, piece: FilePiece, df: pd.DataFrame, ordinals: np.ndarray, bad_cells: dict[int, str],
        types: dict[str, pa.DataType], lines: _Lines, problems: list[tuple[int, str]],
    ) -> tuple[pd.DataFrame, np.ndarray]:
        """Rows with a cell that is not a number: under ``"error"`` the first one raises,
        under ``"skip"`` they are dropped and added to ``problems``."""
        if not bad_cells:
            return df, ordinals
        rows = sorted(bad_cells)
        if self.on_bad_rows == "error":
            col, value = bad_cells[rows[0]].split("\x00", 1)
            line = lines.of_row(int(ordinals[rows[0]]))
            kind = "an integer" if pa.types.is_integer(types.get(col, pa.float64())) else "a number"
            hint = (
                f" (the column was read as integer from the first file; pass dtype={{{col!r}: 'float64'}})"
                if kind == "an integer" else ""
            )
            raise BadRowError(
                f"{piece.display}, line {line}, column {col!r}: expected {kind}, found {value!r}{hint}",
                path=piece.display, line=line, column=col,
            )
        keep = np.ones(len(df), dtype=bool)
        keep[rows] = False
        for pos in rows:
            col, value = bad_cells[pos].split("\x00", 1)
            problems.append((-1, f"column {col!r}: expected a number, found {value!r}"))
        return df[keep], ordinals[keep]

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


def _parsed_ordinals(n_parsed: int, malformed: list[tuple[int, str]]) -> np.ndarray:
    """Each parsed row's ordinal (1-based) among the non-empty lines: the malformed ones skipped."""
    bad_numbers = sorted(n for n, _ in malformed if n > 0)
    ordinals = np.arange(1, n_parsed + len(bad_numbers) + 1, dtype=np.int64)
    if bad_numbers:
        ordinals = np.setdiff1d(ordinals, np.array(bad_numbers, dtype=np.int64), assume_unique=True)
    return ordinals[:n_parsed]


# ---------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class CsvPlan:
    """How a set of CSV files is read: one schema, the pieces, and the reader of a piece.

    ``reader(piece)`` reads one piece (a whole file when the plan has no ``blocksize``)
    into pandas; :func:`read_csv` maps the reader over every piece.
    """

    fs: fsspec.AbstractFileSystem
    schema: pa.Schema | None
    pieces: tuple[FilePiece, ...]
    reader: CsvReader

    @property
    def meta(self) -> pd.DataFrame:
        """The empty frame every piece's rows fit (columns and dtypes)."""
        if self.schema is None:
            raise DataError("No CSV file of the input could be read to infer the columns from")
        return _meta_for(self.schema, self.reader.provenance)


def plan_csv(
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
    fs: fsspec.AbstractFileSystem | None = None,
    skip_unreadable: bool = False,
) -> CsvPlan:
    """Plan the reading of CSV files: infer one schema, cut the files into pieces.

    Parameters
    ----------
    urlpath : str or list of str
        As in :func:`read_csv`; with ``fs``, a list of paths on ``fs``, taken as they are
        (no glob or folder expansion; an empty list gives a plan without pieces or schema).
    columns, dtype, blocksize, storage_options, compression, on_bad_rows, provenance, sep, sample_bytes
        As in :func:`read_csv`.
    fs : fsspec.AbstractFileSystem, optional
        The filesystem of already expanded paths.
    skip_unreadable : bool
        ``False`` (as :func:`read_csv`): a file sampled for the schema that is empty or
        whose first rows cannot be parsed raises its error. ``True`` (as
        ``predict_files``): it is left out of the sample, the next file is sampled
        instead, and the file fails only when its own piece is read. The schema is
        ``None`` when no file can be read.

    Returns
    -------
    CsvPlan

    Raises
    ------
    ArgumentError
        ``on_bad_rows`` is not ``"error"`` or ``"skip"``.
    DataError
        No file matches, or a sampled file is empty (:class:`EmptyFileError`) or
        unreadable (:class:`BadRowError`); a column of ``columns`` is missing
        (:class:`MissingColumnError`).

    Examples
    --------
    >>> plan = plan_csv("data/*.csv", blocksize=None)  # doctest: +SKIP
    >>> first = plan.reader(plan.pieces[0])  # the first file, as pandas  # doctest: +SKIP
    """
    on_bad_rows = check_on_bad_rows(on_bad_rows)
    if blocksize == "default":
        blocksize = config.get("io.blocksize", "64MiB")
    if isinstance(blocksize, str):
        blocksize = dask.utils.parse_bytes(blocksize)
    if fs is None:
        fs, paths = expand_paths(urlpath, storage_options)
    else:
        paths = [urlpath] if isinstance(urlpath, str) else list(urlpath)
    # infer from the first, middle and last files, so a column that is integer in one
    # file and fractional in another is read as float64 everywhere
    schema = sample_schema(
        fs, paths, compression=compression, dtype=dtype, sample_bytes=sample_bytes, skip_unreadable=skip_unreadable
    )
    if columns is not None and schema is not None:
        for col in columns:
            if col not in schema.names:
                first = display_name(fs, paths[0])
                raise MissingColumnError(
                    f"{first}: required column {col!r} is missing (line 1 has {schema.names})",
                    path=first, line=1, column=col,
                )
        schema = pa.schema([schema.field(c) for c in columns])
    pieces = _plan_pieces(fs, paths, blocksize, compression)
    reader = CsvReader(fs, schema, list(columns) if columns else None, on_bad_rows, provenance, sep)
    return CsvPlan(fs, schema, tuple(pieces), reader)


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
    sep : str
        The field separator.
    sample_bytes : int
        How much of the first, middle and last files is read to infer the schema.

    Returns
    -------
    dask.dataframe.DataFrame

    Raises
    ------
    ArgumentError
        ``on_bad_rows`` is not ``"error"`` or ``"skip"``.
    DataError
        No file matches, or a file is empty (:class:`EmptyFileError`).

    Examples
    --------
    >>> ddf = read_csv("s3://bucket/data/*.csv", provenance=True)  # doctest: +SKIP
    """
    plan = plan_csv(
        urlpath, columns=columns, dtype=dtype, blocksize=blocksize, storage_options=storage_options,
        compression=compression, on_bad_rows=on_bad_rows, provenance=provenance, sep=sep, sample_bytes=sample_bytes,
    )
    return dd.from_map(plan.reader, list(plan.pieces), meta=plan.meta, label="daskml-read-csv", enforce_metadata=False)
