"""Read and write data on any fsspec URL: read -> (preprocess, train, predict) -> write.

* :mod:`~daskml_scale.io.paths`: URLs, globs and folders as files; the names users see.
* :mod:`~daskml_scale.io.csv`: :func:`plan_csv` (one schema, the pieces, the reader of
  a piece) and :func:`read_csv`; :mod:`~daskml_scale.io.schema` infers the schema and
  :mod:`~daskml_scale.io.bad_rows` reports the rows skipped.
* :mod:`~daskml_scale.io.parquet`: :func:`read_parquet`, :func:`read_parquet_file`.
* :mod:`~daskml_scale.io.writers`: fast CSV / Parquet writers, atomic writes, and
  :data:`FORMATS`, the one list of output formats.
"""

from __future__ import annotations

from daskml_scale.io.bad_rows import bad_rows_report
from daskml_scale.io.csv import LINE_COLUMN, PATH_COLUMN, CsvPlan, CsvReader, plan_csv, read_csv
from daskml_scale.io.parquet import read_parquet, read_parquet_file
from daskml_scale.io.paths import FilePiece, display_name, expand_paths, is_local
from daskml_scale.io.writers import (
    FORMATS,
    frame_to_csv,
    frame_to_parquet,
    frame_to_table,
    write_bytes_atomic,
    write_frame_atomic,
)

__all__ = [
    # reading
    "read_csv",
    "read_parquet",
    "bad_rows_report",
    "plan_csv",
    "CsvPlan",
    "CsvReader",
    "read_parquet_file",
    "PATH_COLUMN",
    "LINE_COLUMN",
    # paths
    "expand_paths",
    "display_name",
    "is_local",
    "FilePiece",
    # writing
    "FORMATS",
    "write_bytes_atomic",
    "write_frame_atomic",
    "frame_to_table",
    "frame_to_csv",
    "frame_to_parquet",
]
