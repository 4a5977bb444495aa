"""Where rows came from: the file and line of a row named in an error, at no cost until then.

Reading with ``provenance=True`` adds a ``_path`` and a ``_line`` column to every row
(:data:`PATH_COLUMN`, :data:`LINE_COLUMN`). Without it, the CSV reader still notes in
each partition's ``DataFrame.attrs`` which piece of which file its rows came from (a
:class:`RowSource`, a few bytes). :func:`name_rows` runs a function of a partition; when
that raises a :class:`~daskml_scale.exceptions.DataError` that names no file, it reads
the same rows again with ``_path`` and ``_line`` and runs the function once more, so the
error raised names the file and line (the columns travel through the user's transform
like any other column). Nothing is paid unless an error is raised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, TypeVar

import pandas as pd

from daskml_scale.exceptions import DataError

if TYPE_CHECKING:  # pragma: no cover
    from daskml_scale.io.csv import CsvReader
    from daskml_scale.io.paths import FilePiece

__all__ = ["PATH_COLUMN", "LINE_COLUMN", "SOURCE_ATTR", "RowSource", "source_of", "name_rows"]

PATH_COLUMN = "_path"
LINE_COLUMN = "_line"
SOURCE_ATTR = "daskml_scale.source"

T = TypeVar("T")


class RowSource:
    """The piece of a file that a partition's rows were read from, how it was read, and
    the columns and number of rows it gave.

    Kept in ``df.attrs[SOURCE_ATTR]``; pandas copies ``attrs`` along with most
    operations (the object is immutable, so a copy is the same object), also into frames
    derived from the rows: only a frame with the columns and the number of rows read is
    taken as the rows read.
    """

    __slots__ = ("reader", "piece", "columns", "rows")

    def __init__(self, reader: CsvReader, piece: FilePiece, columns: tuple[str, ...], rows: int) -> None:
        self.reader = reader
        self.piece = piece
        self.columns = tuple(columns)
        self.rows = rows

    def __deepcopy__(self, memo: dict[int, Any]) -> RowSource:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (RowSource, (self.reader, self.piece, self.columns, self.rows))

    def read_as(self, df: pd.DataFrame) -> bool:
        """Whether ``df`` is the rows as read, not a frame derived from them (filtered,
        with other columns)."""
        return len(df) == self.rows and tuple(df.columns) == self.columns

    def read_with_provenance(self) -> pd.DataFrame:
        """The same rows, read again with ``_path`` and ``_line`` columns."""
        return self.reader.with_provenance()(self.piece)

    def __repr__(self) -> str:
        return f"RowSource({self.piece.display!r}, start={self.piece.start})"


def source_of(df: Any) -> RowSource | None:
    """The :class:`RowSource` of a partition, when it came from the CSV reader."""
    attrs = getattr(df, "attrs", None)
    source = attrs.get(SOURCE_ATTR) if isinstance(attrs, dict) else None
    return source if isinstance(source, RowSource) else None


def name_rows(fn: Callable[..., T], df: pd.DataFrame, *args: Any, **kwargs: Any) -> T:
    """``fn(df, *args, **kwargs)``, with errors about rows naming their file and line.

    When ``fn`` raises a :class:`DataError` without a ``path``, ``df`` has no ``_path``
    column and holds rows as read from a file (see :class:`RowSource`), the rows are read
    again with ``_path`` and ``_line`` and ``fn`` runs on them: the same error (class and
    column) raised then, naming the file and line, is raised instead. Otherwise the first
    error is raised as it was.

    Parameters
    ----------
    fn : callable
        A function of a raw partition (the user's transform runs inside it).
    df : pandas.DataFrame
        The partition, as read.

    Returns
    -------
    What ``fn`` returns.
    """
    try:
        return fn(df, *args, **kwargs)
    except DataError as exc:
        source = None if exc.path is not None or PATH_COLUMN in df.columns else source_of(df)
        if source is None or not source.read_as(df):
            raise
        located = _located(source, fn, args, kwargs, exc)
        if located is None:
            raise
    raise located from None


def _located(
    source: RowSource, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], first: DataError
) -> DataError | None:
    """The error ``fn`` raises on the rows of ``source`` read with provenance, when it is
    ``first`` again (class and column) and names a file."""
    try:
        again = source.read_with_provenance()
        fn(again, *args, **kwargs)
    except DataError as exc:
        if exc.path is not None and type(exc) is type(first) and exc.column == first.column:
            exc.__traceback__ = None
            return exc
    except Exception:  # noqa: BLE001  (the first error stands; this one is only a locator)
        return None
    return None
