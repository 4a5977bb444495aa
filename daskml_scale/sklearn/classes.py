"""A classifier's labels: the Preprocessor's class keys (text) as values of ``y``'s type, and back."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from daskml_scale.exceptions import ArgumentError
from daskml_scale.preprocessing import Preprocessor

__all__ = ["labels_of", "typed_classes", "declare_classes"]


def labels_of(proba: pd.DataFrame, classes: np.ndarray, name: str) -> pd.Series:
    """The label of the largest probability of every row (a row without one: missing)."""
    values = proba.to_numpy(dtype=np.float64, na_value=np.nan)
    if len(values) == 0:
        return pd.Series(classes[:0], index=proba.index, name=name, dtype=classes.dtype)
    missing = np.isnan(values).any(axis=1)
    out = pd.Series(classes[np.argmax(np.where(np.isnan(values), -np.inf, values), axis=1)], index=proba.index, name=name)
    if missing.any():
        out = out.astype(object).where(~missing, None)
    return out


def typed_classes(keys: list[str], dtype: Any) -> np.ndarray:
    """The Preprocessor's class keys (strings) as values of the target's type."""
    if pd.api.types.is_bool_dtype(dtype):
        return np.asarray([k == "True" for k in keys])
    if pd.api.types.is_integer_dtype(dtype):
        return np.asarray([int(float(k)) for k in keys], dtype=np.dtype(dtype) if isinstance(dtype, np.dtype) else np.int64)
    if pd.api.types.is_float_dtype(dtype):
        return np.asarray([float(k) for k in keys])
    return np.asarray(keys, dtype=object)


def declare_classes(pre: Preprocessor, classes: Any) -> None:
    """``partial_fit(..., classes=...)``: every label later data may hold, in the classes'
    order, so that the model is built with an output for each."""
    from daskml_scale._utils.columns import category_keys
    from daskml_scale.target import resolve_task

    values = pd.Series(np.asarray(classes))
    keys = [str(k) for k in category_keys(values).dropna().unique()]
    seen = set(pre.classes_ or [])
    unknown = sorted(seen - set(keys))
    if unknown:
        raise ArgumentError(f"Expected classes= to hold every label of y. Received: y has {unknown} besides {keys}")
    counts = dict((pre.target_stats_ or {}).get("class_counts") or {})
    numeric = pd.api.types.is_numeric_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype)
    found = resolve_task(("classes", {k: counts.get(k, 0) for k in keys}, numeric), "classification")
    pre.classes_, pre.target_stats_ = found.classes, found.stats
    pre.feature_names_ = list(pre.feature_names_)
