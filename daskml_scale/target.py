"""The target column: its task, its classes, the rows without one, and its encoding.

* ``task="auto"`` (the default): a text target is a classification; an integer or
  boolean target with exactly two values (a 0/1 column) is a binary classification;
  any other numeric target is a regression. ``"classification"`` and ``"regression"``
  decide it outright. The task is found in the preprocessor's one pass over the data,
  from per-partition statistics (:func:`partition_target_stats`) that combine exactly.
* Classes are strings (numbers written as ``"0"``, ``"1"``), sorted by value for a
  numeric target; ``y`` is the class index.
* ``missing_target="error"`` (the default) raises at the first row without a target,
  naming its file and line; ``"drop"`` drops such rows and counts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from daskml_scale._utils.columns import category_keys, merge_moments, numeric_column, where_row
from daskml_scale.exceptions import ArgumentError, DataError, NonFiniteValueError

__all__ = [
    "TASKS", "MISSING_TARGET", "check_task", "check_missing_target", "is_numeric", "missing_rows",
    "missing_target_error", "partition_target_stats", "merge_target_stats", "resolve_task", "TargetFit",
    "encode_target",
]

TASKS = ("auto", "classification", "regression")
MISSING_TARGET = ("error", "drop")
_BINARY = 2  # "auto": an integer target with this many values is a classification


def check_task(task: str) -> str:
    """``task``, checked.

    Raises
    ------
    ArgumentError
        ``task`` is not one of :data:`TASKS`.
    """
    if task not in TASKS:
        raise ArgumentError(f"Expected task to be one of {list(TASKS)}. Received: task={task!r}")
    return task


def check_missing_target(missing_target: str) -> str:
    """``missing_target``, checked.

    Raises
    ------
    ArgumentError
        ``missing_target`` is not one of :data:`MISSING_TARGET`.
    """
    if missing_target not in MISSING_TARGET:
        raise ArgumentError(
            f"Expected missing_target to be 'error' or 'drop'. Received: missing_target={missing_target!r}"
        )
    return missing_target


def is_numeric(t: pd.Series) -> bool:
    """Whether the target column holds numbers (or booleans)."""
    return bool(pd.api.types.is_numeric_dtype(t.dtype) or pd.api.types.is_bool_dtype(t.dtype))


def _is_integral(t: pd.Series) -> bool:
    return bool(pd.api.types.is_integer_dtype(t.dtype) or pd.api.types.is_bool_dtype(t.dtype))


def missing_rows(t: pd.Series) -> np.ndarray:
    """A boolean mask of the rows whose target is missing (NaN, None, ``<NA>``)."""
    return np.asarray(t.isna().to_numpy(), dtype=bool)


def missing_target_error(df: pd.DataFrame, target: str, missing: np.ndarray) -> NonFiniteValueError:
    """The error for the first row without a target, with its file and line and the fix."""
    pos = int(np.flatnonzero(missing)[0])
    path, line, where = where_row(df, pos)
    return NonFiniteValueError(
        f"{where}, column {target!r}: the target is missing ({int(missing.sum())} such row(s) in this part of "
        "the data). Drop those rows with Preprocessor(missing_target='drop') (CLI: --missing-target drop), "
        "or fill the target in your transform",
        path=path, line=line, column=target,
    )


# ---------------------------------------------------------------- the one pass
def _class_counts(t: pd.Series) -> dict[str, int]:
    return {str(k): int(c) for k, c in category_keys(t).value_counts(dropna=True).items()}


def partition_target_stats(df: pd.DataFrame, target: str, task: str) -> tuple[Any, ...]:
    """Statistics of one partition's target (rows without one already dropped).

    ``("numeric", count, mean, M2, values)``: ``values`` counts the values of an integer
    target while it has at most two (``None`` once it has more, or for fractions);
    ``("classes", counts, numeric)``.

    Raises
    ------
    DataError
        ``task="regression"`` and the target is text.
    """
    t = df[target]
    numeric = is_numeric(t)
    if task == "classification" or (not numeric and task == "auto"):
        return ("classes", _class_counts(t), numeric)
    if not numeric:
        raise DataError(
            f"Expected a numeric target for task='regression'. Received: column {target!r} of dtype {t.dtype}; "
            "use task='classification' (or 'auto') for class labels",
            column=target,
        )
    y = numeric_column(df, target)
    y = y[~np.isnan(y)]
    n = int(y.size)
    mean = float(y.mean()) if n else 0.0
    m2 = float(((y - mean) ** 2).sum()) if n else 0.0
    values: dict[str, int] | None = None
    if task == "auto" and (_is_integral(t) or n == 0):
        counts = t.value_counts(dropna=True)  # on the integers: no text per row
        if len(counts) <= _BINARY:
            keys = category_keys(pd.Series(counts.index.to_numpy(), dtype=t.dtype))
            values = {str(k): int(c) for k, c in zip(keys, counts.to_numpy())}
    return ("numeric", n, mean, m2, values)


def _add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, c in b.items():
        out[k] = out.get(k, 0) + c
    return out


def merge_target_stats(a: tuple[Any, ...] | None, b: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    """Two partitions' target statistics as one (exact, in any order)."""
    if a is None or b is None:
        return a if b is None else b
    if a[0] == "numeric" and b[0] == "numeric":
        values = None
        if a[4] is not None and b[4] is not None:
            values = _add_counts(a[4], b[4])
            values = values if len(values) <= _BINARY else None
        return ("numeric", *merge_moments(a[1:4], b[1:4]), values)
    if a[0] == "classes" and b[0] == "classes":
        return ("classes", _add_counts(a[1], b[1]), a[2] and b[2])
    # "auto": text in some partitions, numbers in others -> labels
    counts = [s[1] if s[0] == "classes" else (s[4] or {}) for s in (a, b)]
    return ("classes", _add_counts(*counts), False)


@dataclass
class TargetFit:
    """What the one pass decided about the target."""

    task: str  # "regression" or "classification"
    classes: list[str] | None
    stats: dict[str, Any] = field(default_factory=dict)


def _sorted_classes(keys: list[str], numeric: bool) -> list[str]:
    if numeric:
        try:
            return sorted(keys, key=float)
        except ValueError:  # "True"/"False"
            pass
    return sorted(keys)


def resolve_task(stats: tuple[Any, ...] | None, task: str) -> TargetFit:
    """The task, classes and target statistics from the combined statistics."""
    if stats is None:
        return TargetFit("regression" if task != "classification" else "classification", None)
    if stats[0] == "numeric":
        n, mean, m2, values = stats[1:]
        if task == "auto" and values is not None and len(values) == _BINARY:
            classes = _sorted_classes(list(values), True)
            return TargetFit("classification", classes, {"class_counts": {c: values[c] for c in classes}})
        return TargetFit("regression", None, {"count": n, "mean": mean, "std": math.sqrt(m2 / n) if n else 0.0})
    counts, numeric = stats[1], stats[2]
    classes = _sorted_classes(list(counts), numeric)
    return TargetFit("classification", classes, {"class_counts": {c: counts[c] for c in classes}})


# ---------------------------------------------------------------- transform time
def encode_target(df: pd.DataFrame, target: str, classes: list[str] | None) -> np.ndarray:
    """``y``: float32 values for a regression, int64 class indices for a classification.

    Rows without a target must have been dropped or refused before (see
    :func:`missing_rows`).

    Raises
    ------
    DataError
        A label that ``fit`` did not see (names its row).
    """
    if classes is None:
        return numeric_column(df, target).astype(np.float32)
    t = df[target]
    codes = pd.Index(classes).get_indexer(category_keys(t))
    if (codes < 0).any():
        pos = int(np.flatnonzero(codes < 0)[0])
        path, line, where = where_row(df, pos)
        raise DataError(
            f"{where}, column {target!r}: label {t.iloc[pos]!r} is not one of the classes seen in fit {classes}",
            path=path, line=line, column=target,
        )
    return codes.astype(np.int64)
