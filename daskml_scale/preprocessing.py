"""The bridge from the user's pandas code: a row-wise transform plus global statistics.

``Preprocessor(transform=fn, target=..., numeric=[...], categorical=[...])``

* ``fit(ddf)`` runs ``fn`` on every partition and computes, in ONE ``compute`` of
  one graph, the statistics the features need: the mean and scale of every numeric
  column (Chan's parallel update, so partitions combine exactly), the value that
  imputes its missing numbers (the mean), and the category set of every categorical
  column (one-hot, columns sorted by value).
* ``transform(pandas_df)`` returns ``(X, y)`` as float32 arrays; the same object
  transforms a partition on a worker and a single frame in a server, with identical
  numbers. ``y`` is ``None`` when the target column is absent (prediction time).
* Unseen categories (and missing ones) encode as all zeros in that column's one-hot
  block: the stated rule, never an exception in the middle of a job. With
  ``categorical_encoding="int"`` a column is instead ONE integer code (0 for unseen or
  missing), for an ``Embedding`` in the model: O(columns) memory per row, whatever the
  number of categories (see :mod:`daskml_scale.encoding`).
* The target (see :mod:`daskml_scale.target`): ``task="auto"`` makes a text target
  or a two-valued integer target (0/1) a classification, other numbers a regression;
  ``missing_target="error"`` refuses a row without a target, naming its file and
  line, ``"drop"`` drops such rows and counts them (``dropped_missing_target_``).
* An error about a row of a file names the file and line, whether or not the data
  was read with ``provenance=True`` (see :func:`daskml_scale.io.provenance.name_rows`).
* ``to_json()`` / ``from_json()``: no pickle. The user's function is stored as an
  import reference (``package.module:function``); a lambda cannot be stored and must
  be passed again to ``from_json(..., transform=fn)``.
"""

from __future__ import annotations

import importlib
import json
import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from daskml_scale._utils.columns import category_keys, merge_moments, numeric_column, where_row
from daskml_scale.encoding import category_codes, check_encoding, resolve_encodings
from daskml_scale.exceptions import (
    ArgumentError,
    DataError,
    MissingColumnError,
    NonFiniteValueError,
    NotFittedError,
)
from daskml_scale.io.provenance import LINE_COLUMN, PATH_COLUMN, name_rows
from daskml_scale.target import (
    check_missing_target,
    check_task,
    encode_target,
    merge_target_stats,
    missing_rows,
    missing_target_error,
    partition_target_stats,
    resolve_task,
)

__all__ = ["Preprocessor"]

FORMAT = "daskml_scale.Preprocessor/1"
Transform = Callable[[pd.DataFrame], pd.DataFrame]


# ------------------------------------------------------------------------- helpers
def _transform_ref(fn: Transform | None) -> str | None:
    """``module:qualname`` when ``fn`` can be imported back, else ``None``."""
    if fn is None:
        return None
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname or module == "__main__":
        return None
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return f"{module}:{qualname}" if obj is fn else None


def _resolve_ref(ref: str) -> Transform:
    module, _, qualname = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------- partition statistics
def _partition_stats(df: pd.DataFrame, pre: "Preprocessor") -> dict[str, Any]:
    """Sufficient statistics of one partition (after the user's transform)."""
    df = pre._apply_user_transform(df)
    pre._check_columns(df, need_target=pre.target is not None)
    df, dropped = pre._without_missing_target(df)
    out: dict[str, Any] = {"rows": int(len(df)), "dropped": dropped, "numeric": {}, "categorical": {}, "target": None}
    for col in pre.numeric:
        x = numeric_column(df, col)
        inf = np.isinf(x)
        if inf.any():
            pos = int(np.flatnonzero(inf)[0])
            path, line, where = where_row(df, pos)
            raise NonFiniteValueError(
                f"{where}, column {col!r}: found {x[pos]} (an infinite value) in a numeric feature; "
                "clean it in your transform or drop the row", path=path, line=line, column=col,
            )
        nan = np.isnan(x)
        if nan.any() and pre.missing == "error":
            pos = int(np.flatnonzero(nan)[0])
            path, line, where = where_row(df, pos)
            raise NonFiniteValueError(
                f"{where}, column {col!r}: missing value (NaN) where missing='error'; "
                "use Preprocessor(missing='impute') to fill it with the mean",
                path=path, line=line, column=col,
            )
        v = x[~nan]
        n = int(v.size)
        mean = float(v.mean()) if n else 0.0
        m2 = float(((v - mean) ** 2).sum()) if n else 0.0
        out["numeric"][col] = (n, mean, m2)
    for col in pre.categorical:
        counts = category_keys(df[col]).value_counts(dropna=True)
        out["categorical"][col] = {str(k): int(c) for k, c in counts.items()}
    if pre.target is not None and pre.target in df.columns:
        out["target"] = partition_target_stats(df, pre.target, pre.task)
    return out


def _located_stats(df: pd.DataFrame, pre: "Preprocessor") -> dict[str, Any]:
    """:func:`_partition_stats`, an error about a row naming its file and line."""
    return name_rows(_partition_stats, df, pre)


def _combine_stats(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"rows": 0, "dropped": 0, "numeric": {}, "categorical": {}, "target": None}
    for p in parts:
        total["rows"] += p["rows"]
        total["dropped"] += p.get("dropped", 0)
        for col, mom in p["numeric"].items():
            total["numeric"][col] = merge_moments(total["numeric"].get(col, (0, 0.0, 0.0)), mom)
        for col, counts in p["categorical"].items():
            acc = total["categorical"].setdefault(col, {})
            for k, c in counts.items():
                acc[k] = acc.get(k, 0) + c
        total["target"] = merge_target_stats(total["target"], p["target"])
    return total


# ---------------------------------------------------------------------- Preprocessor
class Preprocessor:
    """Global feature statistics fitted in one pass, applied identically everywhere.

    Parameters
    ----------
    target : str, optional
        The target column (after the transform).
    numeric : list of str
        Numeric feature columns: missing values imputed with the mean, then
        standardized (``(x - mean) / std``; a constant column gets scale 1).
    categorical : list of str
        Categorical feature columns, one-hot encoded with columns sorted by value (or
        integer codes: see ``categorical_encoding``).
    transform : callable, optional
        The user's pandas function, DataFrame -> DataFrame, row-wise. It runs before
        everything else, on every partition and on every served frame.
    missing : {"impute", "error"}
        What to do with NaN in a numeric feature. Infinite values are always an error.
    max_categories : int
        Keep at most this many categories per column (the most frequent); the rest
        encode as unseen.
    task : {"auto", "classification", "regression"}
        ``"auto"``: a text target, or an integer (or boolean) target with exactly two
        values such as 0/1, is a classification (``classes_``, ``y`` the class index;
        a bundle of a model with one sigmoid output then answers each class's
        probability and a label); any other numeric target is a regression.
    missing_target : {"error", "drop"}
        A row without a target (NaN, empty): ``"error"`` raises
        :class:`NonFiniteValueError` naming its file and line; ``"drop"`` leaves it out
        of the statistics and of training and counts it (``dropped_missing_target_``;
        ``transform_training`` returns the count per partition).
    categorical_encoding : {"one_hot", "int"} or dict
        ``"one_hot"``: a float column per category. ``"int"``: one column per
        categorical holding its code (0 unseen or missing, 1..n the categories), for a
        model with named inputs (``"numeric"`` and one per coded column; build them with
        :func:`daskml_scale.model_inputs`). A dict picks per column (default one-hot).

    Attributes
    ----------
    feature_names_ : list of str
        The columns of X, in order.
    means_, scales_, fill_values_ : dict
        Per numeric column.
    categories_ : dict of list of str
        Per categorical column.
    encodings_ : dict of str
        Per categorical column: ``"one_hot"`` or ``"int"``.
    vocabulary_sizes_ : dict of int
        Per ``"int"`` column: its number of categories + 1 (code 0), the ``input_dim``
        of its ``Embedding``.
    task_ : str or None
        ``"regression"`` or ``"classification"`` (``None`` without a target).
    classes_ : list of str or None
        Class labels of a classification, sorted (by value for numbers).
    n_samples_ : int
        Rows seen by ``fit`` (without the rows dropped for a missing target).
    dropped_missing_target_ : int
        Rows ``fit`` dropped because their target was missing.
    input_schema_ : dict
        Column -> dtype of the raw input ``fit`` saw (before the transform).
    """

    def __init__(
        self,
        *,
        target: str | None = None,
        numeric: Sequence[str] = (),
        categorical: Sequence[str] = (),
        transform: Transform | None = None,
        missing: str = "impute",
        max_categories: int = 1000,
        task: str = "auto",
        missing_target: str = "error",
        categorical_encoding: Any = "one_hot",
    ) -> None:
        self.target = target
        self.numeric = list(numeric)
        self.categorical = list(categorical)
        self.transform_fn = transform
        self.missing = missing
        self.max_categories = max_categories
        self.task = check_task(task)
        self.missing_target = check_missing_target(missing_target)
        if missing not in ("impute", "error"):
            raise ArgumentError(f"Expected missing to be 'impute' or 'error'. Received: missing={missing!r}")
        overlap = set(self.numeric) & set(self.categorical)
        if overlap:
            raise ArgumentError(f"Columns cannot be both numeric and categorical. Received: {sorted(overlap)}")
        if target is not None and target in set(self.numeric) | set(self.categorical):
            raise ArgumentError(f"The target {target!r} cannot also be a feature")
        self.categorical_encoding = check_encoding(categorical_encoding, self.categorical)

    # -- helpers ----------------------------------------------------------------
    def _apply_user_transform(self, df: pd.DataFrame) -> pd.DataFrame:
        if self.transform_fn is None:
            if getattr(self, "_transform_missing", None):
                raise NotFittedError(
                    f"This preprocessor was fitted with the transform {self._transform_missing!r}, which "
                    "cannot be stored (it is not importable by name). Pass it again: "
                    "Preprocessor.from_json(text, transform=fn) or load_bundle(url, transform=fn)."
                )
            return df
        out = self.transform_fn(df)
        if not isinstance(out, pd.DataFrame):
            raise TypeError(
                f"Expected the transform to return a pandas DataFrame. Received: {type(out).__name__}"
            )
        # keep provenance columns for error messages when the transform dropped them
        for col in (PATH_COLUMN, LINE_COLUMN):
            if col in df.columns and col not in out.columns and len(out) == len(df) and out.index.equals(df.index):
                out = out.assign(**{col: df[col]})
        return out

    def _check_columns(self, df: pd.DataFrame, need_target: bool) -> None:
        required = self.numeric + self.categorical + ([self.target] if need_target and self.target else [])
        for col in required:
            if col not in df.columns:
                where = ""
                if PATH_COLUMN in df.columns and len(df):
                    where = f"{df[PATH_COLUMN].iloc[0]}: "
                raise MissingColumnError(
                    f"{where}required column {col!r} is missing; the data has columns {list(df.columns)}",
                    column=col, path=str(df[PATH_COLUMN].iloc[0]) if where else None,
                )

    def _without_missing_target(self, df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
        """``df`` without the rows that have no target, and how many there were
        (``missing_target="drop"``); under ``"error"`` the first such row raises."""
        if self.target is None or self.target not in df.columns:
            return df, 0
        missing = missing_rows(df[self.target])
        if not missing.any():
            return df, 0
        if self.missing_target == "error":
            raise missing_target_error(df, self.target, missing)
        return df[~missing], int(missing.sum())

    def _check_fitted(self) -> None:
        if not hasattr(self, "feature_names_"):
            raise NotFittedError("This Preprocessor is not fitted yet. Call fit(data) first.")

    # -- fit ----------------------------------------------------------------------
    def fit(self, data: Any, *, client: Any = None) -> "Preprocessor":
        """Compute every global statistic in one pass over ``data``.

        Parameters
        ----------
        data : dask.dataframe.DataFrame or pandas.DataFrame
        client : distributed.Client, optional
            Defaults to the current client, or the local scheduler when none.

        Returns
        -------
        self
        """
        if isinstance(data, pd.DataFrame):
            stats = _combine_stats([_located_stats(data, self)])
            schema = data.dtypes
        else:
            import dask

            parts = data.to_delayed()
            if not parts:
                raise DataError("Expected data with at least one partition. Received: an empty DataFrame")
            chunks = [dask.delayed(_located_stats)(p, self) for p in parts]
            total = dask.delayed(_combine_stats)(chunks)
            if client is not None:
                (stats,) = client.compute([total], sync=True)
            else:
                (stats,) = dask.compute(total)
            schema = data.dtypes
        self._set_stats(stats, schema)
        return self

    def _set_stats(self, stats: dict[str, Any], schema: pd.Series) -> None:
        if stats["rows"] == 0:
            raise DataError("Expected data with rows. Received: 0 rows (every file empty or every row skipped)")
        self.n_samples_ = int(stats["rows"])
        self.dropped_missing_target_ = int(stats.get("dropped", 0))
        self.means_, self.scales_, self.fill_values_ = {}, {}, {}
        for col in self.numeric:
            n, mean, m2 = stats["numeric"].get(col, (0, 0.0, 0.0))
            if n == 0:
                raise DataError(f"Numeric column {col!r} has no values at all: cannot compute its mean", column=col)
            std = math.sqrt(m2 / n) if n else 0.0
            self.means_[col] = float(mean)
            self.scales_[col] = float(std) if std > 0 else 1.0
            self.fill_values_[col] = float(mean)
        self.categories_ = {}
        for col in self.categorical:
            counts = stats["categorical"].get(col, {})
            top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: self.max_categories]
            self.categories_[col] = sorted(k for k, _ in top)
        self.encodings_ = resolve_encodings(self.categorical_encoding, self.categorical)
        found = resolve_task(stats["target"], self.task)
        self.task_ = found.task if self.target is not None else None
        self.classes_ = found.classes
        self.target_stats_: dict[str, Any] = found.stats
        self.feature_names_ = self._feature_names()
        self.input_schema_ = {
            str(c): str(d) for c, d in schema.items() if c not in (PATH_COLUMN, LINE_COLUMN)
        }

    def _feature_names(self) -> list[str]:
        """Numeric columns, one-hot blocks, then one code column per ``"int"`` categorical."""
        one_hot = [c for c in self.categorical if self.encodings_[c] == "one_hot"]
        coded = [c for c in self.categorical if self.encodings_[c] == "int"]
        return [*self.numeric, *(f"{c}={v}" for c in one_hot for v in self.categories_[c]), *coded]

    # -- transform ------------------------------------------------------------------
    @property
    def n_features_(self) -> int:
        self._check_fitted()
        return len(self.feature_names_)

    @property
    def vocabulary_sizes_(self) -> dict[str, int]:
        self._check_fitted()
        return {c: len(self.categories_[c]) + 1 for c in self.categorical if self.encodings_[c] == "int"}

    def transform(self, df: pd.DataFrame, *, with_target: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Features and target of a pandas frame, as float32 arrays.

        Parameters
        ----------
        df : pandas.DataFrame
            Raw rows, as read.
        with_target : bool
            ``False`` at prediction time: the target column, when the input has it, is
            dropped before the user's transform (so a transform that drops rows without a
            target keeps every row), and the transform must then keep every row.

        Returns
        -------
        X : ndarray of shape (rows, n_features_), float32
        y : ndarray of shape (rows,) or None
            float32 values for regression, int64 class indices for classification;
            ``None`` when the target column is absent.

        Raises
        ------
        NonFiniteValueError
            A row has no target and ``missing_target="error"`` (under ``"drop"`` the
            row is left out of ``X`` and ``y``), or a feature is infinite.
        DataError
            A value cannot be used; the message names its file and line when the rows
            came from a file (see :func:`daskml_scale.io.provenance.name_rows`).
        """
        X, y, _ = name_rows(self._transform, df, with_target=with_target)
        return X, y

    def transform_training(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray | None, int]:
        """``transform(df)`` for training: ``(X, y, dropped)``, ``dropped`` the rows left
        out for a missing target (``missing_target="drop"``; always 0 under ``"error"``).

        An error about a row names its file and line when ``df`` was read from a file
        (see :func:`daskml_scale.io.provenance.name_rows`).
        """
        return name_rows(self._transform, df, with_target=True)

    def _transform(self, df: pd.DataFrame, *, with_target: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
        self._check_fitted()
        if not with_target and self.target is not None and self.target in df.columns:
            df = df.drop(columns=[self.target])
        n_in = len(df)
        df = self._apply_user_transform(df)
        if not with_target and len(df) != n_in:
            raise DataError(
                f"Expected the transform to keep every row at prediction time. Received: {n_in} rows in, "
                f"{len(df)} out; filter rows only when the target column {self.target!r} is present"
            )
        self._check_columns(df, need_target=False)
        dropped = 0
        if with_target:
            df, dropped = self._without_missing_target(df)
        n = len(df)
        X = np.zeros((n, len(self.feature_names_)), dtype=np.float32)
        if self.numeric:
            self._numeric_block(df, out=X[:, : len(self.numeric)])
        offset = len(self.numeric)
        width = X.shape[1]
        flat = X.reshape(-1)
        row_starts = np.arange(n, dtype=np.int64) * width
        coded = []
        for col in self.categorical:
            if self.encodings_[col] == "int":
                coded.append(col)
                continue
            cats = self.categories_[col]
            if cats:
                codes = category_codes(self, df[col], col)
                hit = codes >= 0  # unseen and missing values: all zeros (the stated rule)
                flat[row_starts[hit] + offset + codes[hit]] = 1.0
            offset += len(cats)
        for col in coded:  # 0: unseen or missing (the out-of-vocabulary code), 1..n: the categories
            X[:, offset] = category_codes(self, df[col], col) + 1 if self.categories_[col] else 0
            offset += 1
        y = None
        if with_target and self.target is not None and self.target in df.columns:
            y = encode_target(df, self.target, self.classes_)
        return X, y, dropped

    def _numeric_block(self, df: pd.DataFrame, out: np.ndarray | None = None) -> np.ndarray:
        """The numeric features, imputed and standardized, as one (rows, k) block.

        Numeric columns convert in one call; text columns go through a checked
        conversion that names the first bad cell. The arithmetic is float64 (a column
        of large values with a small spread keeps its precision), done on row chunks
        that stay in cache, and written straight into ``out`` (float32) when given.
        """
        cols = self.numeric
        if all(pd.api.types.is_numeric_dtype(df[c].dtype) or pd.api.types.is_bool_dtype(df[c].dtype) for c in cols):
            block = df[cols].to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            block = np.column_stack([numeric_column(df, c) for c in cols])
        n = len(block)
        if out is None:
            out = np.empty((n, len(cols)), dtype=np.float32)
        means = np.array([self.means_[c] for c in cols])
        scales = np.array([self.scales_[c] for c in cols])
        fill = None
        step = max(1, (1 << 15) // max(1, len(cols)))  # ~256 KiB of float64 per chunk
        scratch = np.empty((min(step, n), len(cols)), dtype=np.float64)
        for i in range(0, n, step):
            chunk = block[i : i + step]
            m = len(chunk)
            tmp = scratch[:m]
            np.subtract(chunk, means, out=tmp)
            np.divide(tmp, scales, out=tmp)
            if not np.isfinite(tmp.sum()):  # one cheap pass: NaN and inf propagate into the sum
                finite = np.isfinite(chunk)
                inf = np.isinf(chunk)
                if inf.any():
                    pos, j = (int(v[0]) for v in np.nonzero(inf))
                    path, line, where = where_row(df, i + pos)
                    raise NonFiniteValueError(
                        f"{where}, column {cols[j]!r}: found {chunk[pos, j]} (an infinite value) in a numeric feature",
                        path=path, line=line, column=cols[j],
                    )
                if not finite.all() and self.missing == "error":
                    pos, j = (int(v[0]) for v in np.nonzero(~finite))
                    path, line, where = where_row(df, i + pos)
                    raise NonFiniteValueError(
                        f"{where}, column {cols[j]!r}: missing value (NaN) where missing='error'",
                        path=path, line=line, column=cols[j],
                    )
                if fill is None:
                    fill = np.array([self.fill_values_[c] for c in cols])
                np.subtract(np.where(finite, chunk, fill), means, out=tmp)
                np.divide(tmp, scales, out=tmp)
            out[i : i + m] = tmp
        return out

    def fit_transform(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray | None]:
        return self.fit(df).transform(df)

    # -- serialization ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (parameters and fitted statistics)."""
        fn = self.transform_fn
        ref = _transform_ref(fn)
        d: dict[str, Any] = {
            "format": FORMAT,
            "params": {
                "target": self.target, "numeric": self.numeric, "categorical": self.categorical,
                "missing": self.missing, "max_categories": self.max_categories,
                "task": self.task, "missing_target": self.missing_target,
                "categorical_encoding": self.categorical_encoding,
            },
            "transform": {
                "ref": ref,
                "name": None if fn is None else getattr(fn, "__qualname__", repr(fn)),
            },
        }
        if fn is None and getattr(self, "_transform_missing", None):
            d["transform"]["name"] = self._transform_missing
        if hasattr(self, "feature_names_"):
            d["fitted"] = {
                "n_samples": self.n_samples_, "means": self.means_, "scales": self.scales_,
                "fill_values": self.fill_values_, "categories": self.categories_, "classes": self.classes_,
                "target_stats": self.target_stats_, "feature_names": self.feature_names_,
                "input_schema": self.input_schema_, "task": self.task_,
                "dropped_missing_target": self.dropped_missing_target_,
            }
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, transform: Transform | None = None) -> "Preprocessor":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise DataError(
                f"Expected a preprocessor description with format {FORMAT!r}. "
                f"Received: format={d.get('format') if isinstance(d, dict) else type(d).__name__!r}"
            )
        pre = cls(**d["params"])
        info = d.get("transform") or {}
        if transform is not None:
            pre.transform_fn = transform
        elif info.get("ref"):
            pre.transform_fn = _resolve_ref(info["ref"])
        elif info.get("name"):
            pre._transform_missing = info["name"]
        f = d.get("fitted")
        if f:
            pre.n_samples_ = f["n_samples"]
            pre.means_, pre.scales_, pre.fill_values_ = f["means"], f["scales"], f["fill_values"]
            pre.categories_ = f["categories"]
            pre.classes_ = f["classes"]
            pre.target_stats_ = f["target_stats"]
            pre.feature_names_ = f["feature_names"]
            pre.input_schema_ = f["input_schema"]
            # written before task_ was stored: a preprocessor with classes classified
            default_task = None if pre.target is None else ("classification" if pre.classes_ else "regression")
            pre.task_ = f.get("task", default_task)
            pre.dropped_missing_target_ = int(f.get("dropped_missing_target", 0))
            pre.encodings_ = resolve_encodings(pre.categorical_encoding, pre.categorical)
        return pre

    @classmethod
    def from_json(cls, text: str, *, transform: Transform | None = None) -> "Preprocessor":
        return cls.from_dict(json.loads(text), transform=transform)

    def __repr__(self) -> str:
        fitted = f", {len(self.feature_names_)} features" if hasattr(self, "feature_names_") else ""
        return (
            f"Preprocessor(target={self.target!r}, numeric={self.numeric!r}, "
            f"categorical={self.categorical!r}{fitted})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Preprocessor) and self.to_dict() == other.to_dict()
