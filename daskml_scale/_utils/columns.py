"""Column helpers of the preprocessor and the target: categories as strings, checked
numbers, the words that locate a row in an error message, and moments that combine."""

from __future__ import annotations

import numpy as np
import pandas as pd

from daskml_scale.exceptions import DataError
from daskml_scale.io.provenance import LINE_COLUMN, PATH_COLUMN

__all__ = ["category_keys", "where_row", "numeric_column", "merge_moments"]


def category_keys(values: pd.Series) -> pd.Series:
    """Category values as strings, the same way at fit and at transform time.

    Integral numbers print without a decimal point (``3.0`` -> ``"3"``), so an integer
    column read with missing values in some files gives the same categories. Missing
    values stay missing. Vectorized: no Python call per row.
    """
    if isinstance(values.dtype, pd.StringDtype):
        return values
    if pd.api.types.is_bool_dtype(values.dtype):
        out = values.astype("object").where(values.notna(), None)
        return out.map({True: "True", False: "False"}).astype("str")
    if pd.api.types.is_numeric_dtype(values.dtype):
        num = values.astype("float64")
        integral = np.isfinite(num) & (num == np.floor(num))
        out = pd.Series(np.full(len(num), None, dtype=object), index=values.index)
        if integral.any():
            out[integral] = num[integral].astype("int64").astype("str").to_numpy(dtype=object)
        frac = num.notna() & ~integral
        if frac.any():
            out[frac] = num[frac].astype("str").to_numpy(dtype=object)
        return out.astype("str")
    out = values.astype("object")
    mask = out.notna()
    return out.where(~mask, out[mask].astype("str")).astype("str")


def where_row(df: pd.DataFrame, pos: int) -> tuple[str | None, int | None, str]:
    """(path, line, words) locating row ``pos`` of ``df`` for an error message.

    With provenance columns (``_path``, ``_line``) the words are ``"<file>, line <n>"``;
    without, ``"row <pos> (index <label>)"`` (see :func:`daskml_scale.io.provenance.name_rows`,
    which reads the rows again with provenance when such an error is raised).
    """
    if PATH_COLUMN in df.columns and LINE_COLUMN in df.columns:
        path = str(df[PATH_COLUMN].iloc[pos])
        line = int(df[LINE_COLUMN].iloc[pos])
        return path, line, f"{path}, line {line}"
    return None, None, f"row {pos} (index {df.index[pos]!r})"


def numeric_column(df: pd.DataFrame, col: str) -> np.ndarray:
    """Column ``col`` as a fresh float64 array (missing values NaN); text that is not a
    number is a :class:`DataError` naming the row."""
    s = df[col]
    if pd.api.types.is_bool_dtype(s.dtype) or pd.api.types.is_numeric_dtype(s.dtype):
        # a fresh array: callers scale it in place
        return s.to_numpy(dtype="float64", na_value=np.nan, copy=True)
    num = pd.to_numeric(s, errors="coerce")
    bad = num.isna() & s.notna()
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        path, line, where = where_row(df, pos)
        raise DataError(
            f"{where}, column {col!r}: expected a number, found {s.iloc[pos]!r}",
            path=path, line=line, column=col,
        )
    return num.to_numpy(dtype="float64", na_value=np.nan, copy=True)


def merge_moments(a: tuple[int, float, float], b: tuple[int, float, float]) -> tuple[int, float, float]:
    """Chan et al.'s exact combination of two (count, mean, M2)."""
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    if n == 0:
        return (0, 0.0, 0.0)
    delta = mb - ma
    mean = ma + delta * nb / n
    return (n, mean, m2a + m2b + delta * delta * na * nb / n)
