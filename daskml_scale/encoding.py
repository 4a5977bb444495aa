"""How a categorical column becomes numbers, and how the features reach a model's inputs.

Two encodings, named as Keras's ``FeatureSpace`` / ``StringLookup`` name them:

* ``"one_hot"`` (the default): one float column per category, in the dense block.
  Memory per row grows with the number of categories.
* ``"int"``: ONE column per categorical: the category's integer code, ``0`` for a
  value not seen at fit time or missing (Keras's out-of-vocabulary index),
  ``1 .. n`` for the fitted categories (sorted by value). Memory per row is O(columns)
  whatever the number of categories; the model's first layer for that column is an
  ``Embedding(vocabulary_size, dim)`` (see :func:`daskml_scale.features.model_inputs`).

``X`` stays ONE float32 matrix everywhere (partitions on the workers, batches, served
frames): the dense block first (numeric columns, then one-hot blocks), then one code
column per ``"int"`` categorical. Codes are exact in float32 up to 2**24 categories.
A model with several named inputs receives the matrix cut by :func:`input_layout`:
``"numeric"`` (the dense block) and one input per ``"int"`` column, named by the
column; the cut happens inside the compiled step (:mod:`daskml_scale.backend`), so
no per-input copy of the data is ever made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd

from daskml_scale._utils.columns import category_keys
from daskml_scale.exceptions import ArgumentError

__all__ = ["ENCODINGS", "DENSE_INPUT", "InputSlot", "check_encoding", "resolve_encodings", "input_layout", "category_codes"]

ENCODINGS = ("one_hot", "int")
DENSE_INPUT = "numeric"  # the name of the dense block's input in a multi-input model


@dataclass(frozen=True)
class InputSlot:
    """One named model input: columns ``[start, stop)`` of ``X``; ``dtype`` is the
    dtype the model receives (``"int32"`` for codes)."""

    name: str
    start: int
    stop: int
    dtype: str = "float32"
    squeeze: bool = False  # the model's input is rank 1 (``shape=()``): one column, no axis

    @property
    def width(self) -> int:
        return self.stop - self.start


def check_encoding(encoding: Any, categorical: list[str]) -> Any:
    """``encoding`` validated: one of :data:`ENCODINGS`, or a dict column -> encoding
    whose columns are all categorical."""
    if isinstance(encoding, Mapping):
        unknown = sorted(set(encoding) - set(categorical))
        if unknown:
            raise ArgumentError(
                f"Expected categorical_encoding to name categorical columns only. Received: {unknown} "
                f"(the categorical columns are {categorical})"
            )
        for col, mode in encoding.items():
            if mode not in ENCODINGS:
                raise ArgumentError(
                    f"Expected the encoding of {col!r} to be one of {list(ENCODINGS)}. Received: {mode!r}"
                )
        return dict(encoding)
    if encoding not in ENCODINGS:
        raise ArgumentError(f"Expected categorical_encoding to be one of {list(ENCODINGS)} or a dict. Received: {encoding!r}")
    if encoding == "int" and DENSE_INPUT in categorical:
        raise ArgumentError(f"A categorical column cannot be named {DENSE_INPUT!r} (the dense block's input name)")
    return encoding


def resolve_encodings(encoding: Any, categorical: list[str]) -> dict[str, str]:
    """Column -> ``"one_hot"`` or ``"int"`` for every categorical column."""
    if isinstance(encoding, Mapping):
        return {col: encoding.get(col, "one_hot") for col in categorical}
    return {col: encoding for col in categorical}


def input_layout(pre: Any) -> tuple[InputSlot, ...]:
    """The named inputs of a fitted preprocessor's ``X``: the dense block ``"numeric"``
    (when it has any column), then one ``int32`` input per ``"int"`` categorical."""
    pre._check_fitted()
    coded = [c for c in pre.categorical if pre.encodings_[c] == "int"]
    dense = pre.n_features_ - len(coded)
    slots = [InputSlot(DENSE_INPUT, 0, dense)] if dense else []
    slots += [InputSlot(col, dense + i, dense + i + 1, "int32") for i, col in enumerate(coded)]
    return tuple(slots)


def category_codes(pre: Any, values: pd.Series, col: str) -> np.ndarray:
    """Position of every value in ``pre``'s fitted categories of ``col``, -1 when unseen
    or missing. Arrow-backed strings are looked up by Arrow, others by a pandas index;
    both lookups are cached on ``pre`` per column."""
    cats = pre.categories_[col]
    arr = getattr(values.array, "_pa_array", None)
    if arr is not None and isinstance(values.dtype, pd.StringDtype):
        import pyarrow as pa
        import pyarrow.compute as pc

        cache = pre.__dict__.setdefault("_value_sets", {})
        value_set = cache.get(col)
        if value_set is None or len(value_set) != len(cats):
            value_set = cache[col] = pa.array(cats, type=pa.string())
        found = pc.index_in(arr.cast(pa.string()) if arr.type != pa.string() else arr, value_set=value_set)
        return np.asarray(pc.fill_null(found, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
    cache = pre.__dict__.setdefault("_index_cache", {})
    idx = cache.get(col)
    if idx is None or len(idx) != len(cats):
        idx = cache[col] = pd.Index(cats)
    return idx.get_indexer(category_keys(values))
