"""Read Parquet from any fsspec URL: a dataset as a Dask DataFrame, or one file as pandas."""

from __future__ import annotations

from typing import Any, Sequence

import dask.dataframe as dd
import fsspec
import pandas as pd
import pyarrow.parquet as pq

from daskml_scale.exceptions import MissingColumnError
from daskml_scale.io.schema import arrow_to_pandas

__all__ = ["read_parquet", "read_parquet_file"]


def read_parquet(
    urlpath: str | Sequence[str],
    *,
    columns: Sequence[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dd.DataFrame:
    """Read Parquet files or datasets from any fsspec URL into a Dask DataFrame.

    A thin shell over :func:`dask.dataframe.read_parquet` that names a missing column.

    Parameters
    ----------
    urlpath : str or list of str
        A file, folder or glob; local or an fsspec URL.
    columns : list of str, optional
        Columns to read; one the data does not have is a :class:`MissingColumnError`.
    storage_options : dict, optional
        Passed to fsspec.
    **kwargs
        Passed to :func:`dask.dataframe.read_parquet`.

    Returns
    -------
    dask.dataframe.DataFrame

    Raises
    ------
    MissingColumnError
        A column of ``columns`` is not in the data.
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


def read_parquet_file(fs: fsspec.AbstractFileSystem, path: str) -> pd.DataFrame:
    """One Parquet file of ``fs`` as pandas, with the dtypes of the CSV reader
    (integers as nullable ``Int64``, text as ``str``).

    Parameters
    ----------
    fs : fsspec.AbstractFileSystem
    path : str
        The file's path on ``fs``.

    Returns
    -------
    pandas.DataFrame
    """
    with fs.open(path, "rb") as f:
        return arrow_to_pandas(pq.read_table(f))
