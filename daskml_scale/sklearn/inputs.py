"""What the estimators take and give back: the translation between scikit-learn's
``(X, y)`` and the raw frames of :func:`daskml_scale.fit` / :func:`daskml_scale.predict`.

* ``X`` is a Dask DataFrame, a pandas DataFrame, a Dask array or a NumPy array (or
  anything :func:`numpy.asarray` takes). Arrays become frames with the columns
  ``x0, x1, ...``; every column is then a numeric feature.
* ``y`` is the name of a column of ``X``, a Series (Dask with a Dask ``X``), or a 1-D
  array (a column vector is raveled, with scikit-learn's ``DataConversionWarning``).
* Predictions come back as the type that came in: a Dask Series / DataFrame / array
  lazily, a pandas Series / DataFrame or a NumPy array eagerly.

Nothing here trains or predicts; it only reshapes arguments and results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from daskml_scale.exceptions import ArgumentError, DataError, MissingColumnError

__all__ = ["Kind", "TrainingFrame", "check_labels", "kind_of", "training_frame", "prediction_frame", "feature_columns", "array_columns"]

#: The kinds of ``X``: what the predictions come back as.
Kind = str  # "dask_frame" | "pandas" | "dask_array" | "numpy"

#: The target column's name when ``y`` has none.
DEFAULT_TARGET = "target"


def array_columns(n: int) -> list[str]:
    """The column names an array's features get: ``x0 ... x{n-1}``."""
    return [f"x{j}" for j in range(n)]


def kind_of(X: Any) -> Kind:
    import dask.array as da
    import dask.dataframe as dd

    if isinstance(X, dd.DataFrame):
        return "dask_frame"
    if isinstance(X, pd.DataFrame):
        return "pandas"
    if isinstance(X, da.Array):
        return "dask_array"
    if isinstance(X, (dd.Series, pd.Series)):
        raise ArgumentError(
            "Expected X to be a DataFrame or a 2-D array of features. Received: a Series; "
            "use X.to_frame() for a single feature column"
        )
    return "numpy"


def _numpy_features(X: Any) -> np.ndarray:
    """A 2-D array of numbers, with scikit-learn's checks and messages (empty, complex, 1-D)."""
    from sklearn.utils.validation import check_array

    return check_array(X, dtype="numeric", ensure_all_finite=False, ensure_min_samples=1, input_name="X")


def check_labels(y: Any) -> None:
    """In-memory class labels: scikit-learn's refusal of a continuous target ("Unknown label type")."""
    import dask.array as da
    import dask.dataframe as dd
    from sklearn.utils.multiclass import check_classification_targets

    if y is not None and not isinstance(y, (str, da.Array, dd.Series, dd.DataFrame)):
        values = np.asarray(y)
        if values.dtype.kind in "fc":
            check_classification_targets(values[~np.isnan(values)] if values.dtype.kind == "f" else values)


def _numpy_target(y: Any, n: int, missing_target: str) -> np.ndarray:
    """A 1-D array of targets, with scikit-learn's checks and messages (NaN, infinity, shape)."""
    from sklearn.utils.validation import check_array, column_or_1d

    y = np.asarray(y)
    if y.dtype.kind in "fc" or y.dtype == object:
        # NaN: a missing target (Preprocessor(missing_target=...)); infinity: never a target
        check_array(y, ensure_2d=False, dtype=None, input_name="y",
                    ensure_all_finite="allow-nan" if missing_target == "drop" else True)
    if y.ndim == 2 and y.shape[1] > 1:
        raise ArgumentError(
            f"Expected y with one target column. Received: y of shape {y.shape}; "
            "fit one estimator per target column"
        )
    y = column_or_1d(y, warn=True)
    if len(y) != n:
        raise ArgumentError(f"Expected y with one value per row of X ({n} rows). Received: {len(y)} values")
    return y


def _missing_y_error() -> ArgumentError:
    return ArgumentError(
        "This estimator requires y to be passed, but the target y is None. Pass y as a Series or array of "
        "targets, or as the name of X's target column (fit(ddf, 'price')), or set target= to a column of X"
    )


@dataclass
class TrainingFrame:
    """Raw training rows (features and the target column) and what they came from."""

    data: Any  # pandas or Dask DataFrame, target included
    kind: Kind
    target: str
    columns: list[str]  # the raw feature columns of X (the target excluded)
    target_dtype: Any  # dtype of the target column, for classes_
    n_rows: int | None  # known for in-memory input


def training_frame(X: Any, y: Any, target: str | None, *, missing_target: str = "error") -> TrainingFrame:
    """``(X, y)`` as one frame of raw rows with the target as a column.

    Raises
    ------
    ArgumentError
        ``y`` is missing, of the wrong kind for ``X`` or of the wrong length.
    MissingColumnError
        ``y`` (or ``target``) names a column that ``X`` does not have.
    """
    kind = kind_of(X)
    X = _text_columns(X, kind)
    if isinstance(y, str):
        if target is not None and target != y:
            raise ArgumentError(f"Expected y to name the target column {target!r} (target=). Received: y={y!r}")
        if kind not in ("dask_frame", "pandas"):
            raise ArgumentError(f"Expected a DataFrame X when y names a column. Received: y={y!r} with an array X")
        if y not in X.columns:
            raise MissingColumnError(
                f"The target column {y!r} (y=) is missing: X has columns {list(X.columns)}", column=y
            )
        return _frame_result(X, kind, y)
    if y is None:
        if target is not None and kind in ("dask_frame", "pandas") and target in X.columns:
            return _frame_result(X, kind, target)
        raise _missing_y_error()
    name = target or getattr(y, "name", None) or DEFAULT_TARGET
    name = str(name)
    if kind == "dask_frame":
        return _frame_result(_attach_dask(X, y, name), kind, name)
    if kind == "pandas":
        values = y.to_numpy() if isinstance(y, pd.Series) else _numpy_target(_in_memory(y), len(X), missing_target)
        if len(values) != len(X):
            raise ArgumentError(f"Expected y with one value per row of X ({len(X)} rows). Received: {len(values)} values")
        return _frame_result(X.assign(**{name: values}), kind, name)
    if kind == "dask_array":
        return _frame_result(_dask_array_frame(X, y, name), kind, name)
    Xa = _numpy_features(X)
    ya = _numpy_target(_in_memory(y), len(Xa), missing_target)
    frame = pd.DataFrame(Xa, columns=array_columns(Xa.shape[1]))
    frame[name] = ya
    return _frame_result(frame, kind, name)


def _text_columns(X: Any, kind: Kind) -> Any:
    """A frame whose column names are text (the Preprocessor's names); others are renamed ``str(name)``."""
    if kind in ("dask_frame", "pandas") and not all(isinstance(c, str) for c in X.columns):
        return X.rename(columns=str)
    return X


def _in_memory(y: Any) -> Any:
    import dask.array as da
    import dask.dataframe as dd

    if isinstance(y, (da.Array, dd.Series, dd.DataFrame)):
        raise ArgumentError(
            f"Expected an in-memory y with an in-memory X. Received: a {type(y).__name__}; pass X as a Dask "
            "collection too, or compute y"
        )
    return y


def _attach_dask(X: Any, y: Any, name: str) -> Any:
    import dask.array as da
    import dask.dataframe as dd

    if isinstance(y, dd.DataFrame):
        if len(y.columns) != 1:
            raise ArgumentError(f"Expected y with one target column. Received: a Dask DataFrame with columns {list(y.columns)}")
        y = y[y.columns[0]]
    if isinstance(y, da.Array):
        if y.ndim != 1:
            raise ArgumentError(f"Expected a 1-D Dask array y. Received: shape {y.shape}")
        y = dd.from_dask_array(y)
    if not isinstance(y, dd.Series):
        raise ArgumentError(
            f"Expected y as a Dask Series, or the name of a column of X, with a Dask DataFrame X. "
            f"Received: y of type {type(y).__name__}"
        )
    if y.npartitions != X.npartitions:
        raise ArgumentError(
            f"Expected y with X's partitions ({X.npartitions}). Received: y with {y.npartitions}; take both from "
            "one frame (X = ddf[features], y = ddf['target']) or pass y as a column name"
        )
    return X.assign(**{name: y})


def _dask_array_frame(X: Any, y: Any, name: str) -> Any:
    import dask.array as da
    import dask.dataframe as dd

    if X.ndim != 2:
        raise ArgumentError(f"Expected a 2-D Dask array X (rows, features). Received: shape {X.shape}")
    if isinstance(y, (dd.Series, dd.DataFrame)):
        y = y.to_dask_array(lengths=True)
    if not isinstance(y, da.Array):
        y = da.from_array(np.asarray(y), chunks=(X.chunks[0],) if np.asarray(y).ndim == 1 else (X.chunks[0], -1))
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ArgumentError(f"Expected y with one target column. Received: y of shape {y.shape}")
    if X.shape[0] != y.shape[0] and not (np.isnan(X.shape[0]) or np.isnan(y.shape[0])):
        raise ArgumentError(f"Expected y with one value per row of X ({X.shape[0]} rows). Received: {y.shape[0]} values")
    if len(X.chunks[1]) > 1:
        X = X.rechunk({1: -1})
    if y.chunks[0] != X.chunks[0]:
        y = y.rechunk((X.chunks[0],))
    frame = dd.from_dask_array(X, columns=array_columns(X.shape[1]))
    return frame.assign(**{name: dd.from_dask_array(y, index=frame.index)})


def _frame_result(frame: Any, kind: Kind, target: str) -> TrainingFrame:
    columns = [str(c) for c in frame.columns if c != target]
    n = len(frame) if isinstance(frame, pd.DataFrame) else None
    if n is not None and n == 0:
        raise ArgumentError("Expected training data with rows. Received: 0 rows (0 sample(s))")
    return TrainingFrame(frame, kind, target, columns, frame[target].dtype, n)


def feature_columns(numeric: list[str] | None, categorical: list[str] | None, data: Any, columns: list[str]) -> tuple[list[str], list[str]]:
    """The numeric and categorical features: as given, or every raw column of ``X`` by dtype
    (numbers and booleans numeric, the rest categorical) when neither is given."""
    if numeric is not None or categorical is not None:
        return list(numeric or []), list(categorical or [])
    dtypes = data.dtypes
    num = [c for c in columns if pd.api.types.is_numeric_dtype(dtypes[c]) or pd.api.types.is_bool_dtype(dtypes[c])]
    cat = [c for c in columns if c not in num]
    return num, cat


def prediction_frame(X: Any, kind: Kind, n_features_in: int, required: list[str], name: str) -> Any:
    """``X`` as raw rows for prediction: a Dask or pandas DataFrame with the columns fit saw.

    Raises
    ------
    ValueError
        An array with another number of features than fit saw.
    MissingColumnError
        A frame without a column the preprocessor needs.
    """
    import dask.dataframe as dd

    X = _text_columns(X, kind)
    if kind in ("dask_frame", "pandas"):
        missing = [c for c in required if c not in X.columns]
        if missing:
            raise MissingColumnError(
                f"X lacks the column(s) {missing} that {name} was fitted on (the Preprocessor's input); "
                f"X has columns {list(X.columns)}", column=missing[0],
            )
        return X
    if kind == "dask_array":
        if X.ndim != 2 or X.shape[1] != n_features_in:
            width = X.shape[1] if X.ndim == 2 else X.shape
            raise ArgumentError(f"X has {width} features, but {name} is expecting {n_features_in} features as input")
        if len(X.chunks[1]) > 1:
            X = X.rechunk({1: -1})
        return dd.from_dask_array(X, columns=array_columns(n_features_in))
    Xa = _numpy_features(X)
    if Xa.shape[1] != n_features_in:
        raise ArgumentError(f"X has {Xa.shape[1]} features, but {name} is expecting {n_features_in} features as input")
    return pd.DataFrame(Xa, columns=array_columns(n_features_in))


def check_frame_columns(frame: Any) -> None:
    if len(frame.columns) == 0:
        raise DataError("Expected X with feature columns. Received: none")
