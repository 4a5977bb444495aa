"""Rows that the user's transform drops at prediction time: the policy, and the matching.

A real pandas transform drops rows it cannot use (``df.dropna(subset=[...])``), and
may reorder them. The rows it returns are matched to the input rows by index label,
and ``on_dropped`` says what the output holds for the input rows it left out:

* ``"keep"`` (the default, ``daskml_scale.predict.on-dropped``): every input row, in
  input order, with empty predictions (NaN; ``<NA>`` for labels) where the transform
  dropped the row. Nothing is lost and the output stays aligned with the input.
* ``"omit"``: only the rows the transform kept, in input order.
* ``"error"``: a :class:`~daskml_scale.exceptions.DataError` naming the first dropped
  row (its file and line when the rows came from a file).

A transform that keeps the input's index as it is (the common case: it adds or
changes columns) costs nothing here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from daskml_scale import config
from daskml_scale.exceptions import ArgumentError, DataError
from daskml_scale.io.provenance import LINE_COLUMN, PATH_COLUMN

__all__ = ["ON_DROPPED", "DROPPED_REASON", "check_on_dropped", "kept_rows", "apply_on_dropped", "nullable"]

ON_DROPPED = ("keep", "omit", "error")
#: what an answer says about a row without a prediction
DROPPED_REASON = "the transform dropped this row"


def check_on_dropped(on_dropped: str | None) -> str:
    """``on_dropped`` checked; ``None`` is the ``daskml_scale.predict.on-dropped`` default."""
    value = config.get("predict.on-dropped", "keep") if on_dropped is None else on_dropped
    if value not in ON_DROPPED:
        raise ArgumentError(
            f"Expected on_dropped to be 'keep' (empty predictions for the rows the transform drops), "
            f"'omit' (leave them out) or 'error'. Received: on_dropped={value!r}"
        )
    return str(value)


def _labels(index: pd.Index, n: int = 5) -> str:
    shown = [repr(v) for v in index[:n].tolist()]
    return ", ".join(shown) + (f" and {len(index) - n} more" if len(index) > n else "")


def kept_rows(before: pd.Index, after: pd.Index) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Match the rows a transform returned (index ``after``) to its input (``before``).

    Returns
    -------
    order : ndarray or None
        Puts the transform's rows in input order (``None``: they already are).
    rows : ndarray or None
        Input positions of the kept rows, in input order (``None``: every row).

    Raises
    ------
    DataError
        The transform returned a label twice or a label that is not in its input, or
        dropped or reordered rows of an input whose index has duplicate labels.
    """
    if after.equals(before):
        return None, None
    if not after.is_unique:
        raise DataError(
            f"Expected the transform to return each input row at most once at prediction time. Received: the index "
            f"labels {_labels(after[after.duplicated()].unique())} more than once. It may drop or reorder rows "
            "(they are matched to the input by index label), not repeat them."
        )
    if not before.is_unique:
        raise DataError(
            f"Expected a unique index on the input of a transform that drops or reorders rows: its rows are matched "
            f"to the input by index label. Received: an input with the labels "
            f"{_labels(before[before.duplicated()].unique())} more than once. Give the input a unique index "
            "(e.g. ddf.reset_index(drop=True) or read it with read_csv) or make the transform keep every row."
        )
    positions = before.get_indexer(after)
    foreign = positions < 0
    if foreign.any():
        raise DataError(
            f"Expected the transform to keep the index of its input at prediction time: its rows are matched to the "
            f"input by index label. Received: the labels {_labels(after[foreign])}, which are not in the input. "
            "Do not reset the index in the transform (no reset_index() or ignore_index=True)."
        )
    order = np.argsort(positions, kind="stable")
    rows = positions[order]
    in_order = bool((order == np.arange(len(order))).all())
    every = len(rows) == len(before)
    return (None if in_order else order), (None if every else rows)


def nullable(pred: pd.DataFrame) -> pd.DataFrame:
    """``pred`` with integer and boolean columns as pandas' nullable dtypes (they can
    then hold the empty cells of dropped rows); floats and strings already can."""
    names = {"b": "boolean", "i": "Int{bits}", "u": "UInt{bits}"}
    cast = {
        c: names[t.kind].format(bits=8 * t.itemsize)
        for c, t in pred.dtypes.items()
        if isinstance(t, np.dtype) and t.kind in names
    }
    return pred.astype(cast) if cast else pred


def _first_dropped(df: pd.DataFrame, rows: np.ndarray) -> tuple[str, str | None, int | None]:
    """(words, path, line) locating the first input row that is not in ``rows``."""
    pos = int(np.setdiff1d(np.arange(len(df)), rows, assume_unique=True)[0])
    if PATH_COLUMN in df.columns and LINE_COLUMN in df.columns:
        path, line = str(df[PATH_COLUMN].iloc[pos]), int(df[LINE_COLUMN].iloc[pos])
        return f"the first is {path}, line {line}", path, line
    return f"the first is row {pos} (index {df.index[pos : pos + 1].tolist()[0]!r})", None, None


def apply_on_dropped(
    df: pd.DataFrame, pred: pd.DataFrame, rows: np.ndarray | None, on_dropped: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(input rows, prediction rows) to write side by side, under the policy.

    Parameters
    ----------
    df : pandas.DataFrame
        The input rows.
    pred : pandas.DataFrame
        Predictions for the rows the transform kept, in input order.
    rows : ndarray or None
        Their positions in ``df`` (``None``: every row), see :func:`kept_rows`.
    on_dropped : {"keep", "omit", "error"}

    Raises
    ------
    DataError
        ``on_dropped="error"`` and the transform dropped rows.
    """
    if rows is None:
        return df, (nullable(pred) if on_dropped == "keep" else pred)
    if on_dropped == "error":
        where, path, line = _first_dropped(df, rows)
        raise DataError(
            f"Expected the transform to keep every row at prediction time (on_dropped='error'). Received: "
            f"{len(df)} rows in, {len(rows)} out; {where}. Pass on_dropped='keep' to write empty predictions "
            "for the rows it drops, or 'omit' to leave them out.",
            path=path, line=line,
        )
    if on_dropped == "omit":
        return df.iloc[rows], pred
    back = np.full(len(df), -1, dtype=np.int64)  # input row -> its prediction row, -1: dropped
    back[rows] = np.arange(len(rows))
    pred = nullable(pred)
    cols = {c: pd.api.extensions.take(pred[c].array, back, allow_fill=True) for c in pred.columns}
    return df, pd.DataFrame(cols, index=df.index, columns=pred.columns)
