"""The NumPy path of a served batch: checked columns straight to the model's features,
the model's outputs straight to answer columns, no pandas object where the bundle
allows it.

The general path builds a DataFrame of the batch's rows, runs
:meth:`Bundle.predict_kept` (the user's transform, then :meth:`Preprocessor.transform`)
and turns the output frame into lists. For one-row requests most of that time is
pandas' per-object overhead, not arithmetic. :class:`FastPath` does the same
arithmetic on NumPy arrays:

* **bundles without a user transform**: the request's columns (lists of JSON values,
  already checked by :class:`~daskml_scale.serving.inputs.InputSpec`) become the
  feature matrix directly: numbers as float64, imputed and standardized exactly as
  ``Preprocessor._numeric_block`` does, categories looked up in a dict made once;
* **bundles with a transform**: the user's pandas transform runs on the batch's frame
  as before (it is the user's code), then the features are read from its columns'
  arrays; categories are matched as the preprocessor's own
  :func:`~daskml_scale.encoding.category_codes` matches them (by it, or, for a few rows of
  Arrow strings, by the same exact lookup in a dict);
* the answer columns are made from the model's float32 outputs, as
  :func:`~daskml_scale.outputs.outputs_to_frame` makes them, without a frame.

Anything unusual is left to the general path, which then answers or refuses exactly
as before: infinite values, missing values under ``missing="error"``, numbers in a
text column, text or booleans in a numeric feature, a column the transform did not
make, rows the transform dropped, a group bundle. Every check and every error message
therefore stays the general path's own, and a test holds the two paths' answers equal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd

from daskml_scale.encoding import category_codes

if TYPE_CHECKING:  # pragma: no cover
    from daskml_scale.bundle import Bundle
    from daskml_scale.serving.inputs import InputSpec

__all__ = ["FastPath", "fast_path_for"]

Columns = dict[str, list[Any]]
Forward = Callable[[np.ndarray], np.ndarray]
_INT_PREFIXES = ("int", "uint")
#: up to this many rows, Arrow strings are looked up one by one in a dict (cheaper than Arrow's own lookup)
_LOOKUP_ROWS = 256


def fast_path_for(bundle: "Bundle", spec: "InputSpec", numpy_forward: bool = True) -> "FastPath | None":
    """The NumPy path of ``bundle`` with the server's model call
    (:func:`~daskml_scale.serving.forward.serving_forward`), or ``None`` where it has
    none (a group bundle, or any subclass: their ``predict_kept`` does more than the
    model call)."""
    from daskml_scale.bundle import Bundle
    from daskml_scale.serving.forward import serving_forward

    if type(bundle) is not Bundle:
        return None
    return FastPath(bundle, spec, serving_forward(bundle, numpy=numpy_forward))


class FastPath:
    """Features and answers of a batch without the general path's pandas objects.

    Parameters
    ----------
    bundle : Bundle
        A plain bundle (see :func:`fast_path_for`), its model loaded.
    spec : InputSpec
        The request checks the columns went through.
    forward : callable, optional
        ``X -> outputs`` (float32 in, any float out); default ``bundle.predict_array``
        on the whole batch.
    """

    def __init__(self, bundle: "Bundle", spec: "InputSpec", forward: Forward | None = None) -> None:
        pre = bundle.preprocessor
        self.bundle = bundle
        self.pre = pre
        self.forward: Forward = forward or (lambda X: bundle.predict_array(X, batch_size=max(len(X), 1)))
        #: True: the user's transform runs (on a frame), so the columns cannot go straight to features
        self.transforms = pre.transform_fn is not None or bool(getattr(pre, "_transform_missing", None))
        self.numeric = list(pre.numeric)
        self.means = np.array([pre.means_[c] for c in self.numeric], dtype=np.float64)
        self.scales = np.array([pre.scales_[c] for c in self.numeric], dtype=np.float64)
        self.fill = np.array([pre.fill_values_[c] for c in self.numeric], dtype=np.float64)
        self.width = len(pre.feature_names_)
        # (column, "one_hot" or "int", offset in X, number of categories), in X's order
        self.categorical: list[tuple[str, str, int, int]] = []
        offset = len(self.numeric)
        for col in pre.categorical:
            if pre.encodings_[col] == "one_hot":
                self.categorical.append((col, "one_hot", offset, len(pre.categories_[col])))
                offset += len(pre.categories_[col])
        for col in pre.categorical:
            if pre.encodings_[col] == "int":
                self.categorical.append((col, "int", offset, len(pre.categories_[col])))
                offset += 1
        self.lookup = {col: {v: i for i, v in enumerate(pre.categories_[col])} for col in pre.categorical}
        # schema column -> "int64" etc. for the numeric features, when every feature is a schema
        # column the general path would hand the preprocessor unchanged (no transform)
        self.direct = not self.transforms and self._direct_columns(spec)
        self.spec = spec
        self._answer = _answer_maker(bundle)

    def _direct_columns(self, spec: "InputSpec") -> bool:
        """Every numeric feature a numeric (not boolean) schema column, every categorical one
        a text column: the kinds whose conversion this path repeats exactly."""
        for col in self.numeric:
            c = spec.by_name.get(col)
            if c is None or not c.numeric or c.boolean:
                return False
            if c.dtype.startswith(_INT_PREFIXES):
                try:
                    np.dtype(c.dtype)
                except TypeError:
                    return False  # not a NumPy integer type: the frame's conversion decides
        for col in self.pre.categorical:
            c = spec.by_name.get(col)
            if c is None or c.numeric or c.boolean:
                return False
        return True

    # -- features ------------------------------------------------------------------
    def features_of_columns(self, cols: Columns, n: int) -> np.ndarray | None:
        """The feature matrix of checked request columns (no transform), or ``None`` to
        leave the batch to the general path."""
        by_name = self.spec.by_name
        parts = []
        for col in self.numeric:
            vals = cols.get(col)
            if vals is None:
                return None
            arr = np.array(vals, dtype=np.float64)  # None -> NaN, as InputSpec.columns_to_frame
            dtype = by_name[col].dtype
            if dtype.startswith(_INT_PREFIXES) and not np.isnan(arr).any():
                arr = arr.astype(dtype).astype(np.float64)  # an int column truncates as the frame's would
            parts.append(arr)
        codes = {}
        for col, _, _, _ in self.categorical:
            vals = cols.get(col)
            if vals is None:
                return None
            lookup = self.lookup[col]
            get = lookup.get
            if not all(type(v) is str or v is None for v in vals):
                return None  # numbers in a text column: pandas' string rules decide
            codes[col] = np.fromiter((-1 if v is None else get(v, -1) for v in vals), dtype=np.int64, count=n)
        return self._assemble(parts, codes, n)

    def features_of_frame(self, df: pd.DataFrame) -> np.ndarray | None:
        """The feature matrix of rows the user's transform returned, or ``None`` to leave
        them to :meth:`Preprocessor.transform`."""
        columns = df.columns
        if not columns.is_unique:
            return None
        parts = []
        for col in self.numeric:
            if col not in columns:
                return None  # the preprocessor names the missing column
            arr = _column_array(df, columns.get_loc(col))
            if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
                return None  # text, booleans, nullable types: the preprocessor's checked conversion
            parts.append(arr.astype(np.float64, copy=False))
        codes = {}
        n = len(df)
        for col, _, _, _ in self.categorical:
            if col not in columns:
                return None
            values = df[col]
            strings = getattr(values.array, "_pa_array", None) if isinstance(values.dtype, pd.StringDtype) else None
            if strings is not None and n <= _LOOKUP_ROWS:
                # Arrow strings, as category_codes matches them (exactly; null: -1), by a dict
                # lookup: ~3 us against ~20 us for Arrow's index_in on a few rows
                get = self.lookup[col].get
                codes[col] = np.fromiter((get(v, -1) for v in strings.to_pylist()), dtype=np.int64, count=n)
            else:
                codes[col] = category_codes(self.pre, values, col)
        return self._assemble(parts, codes, n)

    def _assemble(self, parts: list[np.ndarray], codes: dict[str, np.ndarray], n: int) -> np.ndarray | None:
        """X as ``Preprocessor._transform`` lays it out: the standardized numeric block, the
        one-hot blocks, then one code column per ``"int"`` categorical."""
        X = np.zeros((n, self.width), dtype=np.float32)
        if parts:
            block = np.stack(parts, axis=1) if len(parts) > 1 else parts[0].reshape(n, 1)
            tmp = np.subtract(block, self.means)
            np.divide(tmp, self.scales, out=tmp)
            if not np.isfinite(tmp.sum()):
                if np.isinf(block).any() or (self.pre.missing == "error" and np.isnan(block).any()):
                    return None  # the preprocessor's error names the row and the column
                np.subtract(np.where(np.isfinite(block), block, self.fill), self.means, out=tmp)
                np.divide(tmp, self.scales, out=tmp)
            X[:, : len(parts)] = tmp
        if self.categorical:
            flat = X.reshape(-1)
            row_starts = np.arange(n, dtype=np.int64) * self.width
            for col, encoding, offset, k in self.categorical:
                c = codes[col]
                if encoding == "int":
                    X[:, offset] = c + 1 if k else 0
                elif k:
                    hit = c >= 0  # unseen and missing values: all zeros (the stated rule)
                    flat[row_starts[hit] + offset + c[hit]] = 1.0
        return X

    # -- prediction ---------------------------------------------------------------
    def predict_columns(self, cols: Columns, n: int) -> Columns | None:
        """Answer columns for checked request columns, or ``None`` (the general path's turn)."""
        X = self.features_of_columns(cols, n)
        return None if X is None else self.answer(self.forward(X), n)

    def predict_kept(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`Bundle.predict_kept` returning the model's raw outputs: (outputs of the rows
        the transform kept, their positions in ``df`` or ``None`` for every row)."""
        kept, rows = self.bundle.transformed_rows(df)
        X = self.features_of_frame(kept)
        if X is None:
            X, _ = self.bundle._features().transform(kept, with_target=False)
        return self.forward(X), rows

    def answer(self, out: np.ndarray, n: int) -> Columns:
        """Output column -> values, as ``outputs_to_frame(out)[c].tolist()`` gives them."""
        return self._answer(np.asarray(out, dtype=np.float32).reshape(n, -1))


def _column_array(df: pd.DataFrame, loc: int) -> Any:
    """The array behind column ``loc`` of ``df``, without making a Series (pandas'
    ``_get_column_array``: ~1 us against ~12 us for ``df[col].to_numpy()``)."""
    return df._get_column_array(loc)


def _answer_maker(bundle: "Bundle") -> Callable[[np.ndarray], Columns]:
    names = list(bundle.output_names)
    if bundle.task != "classification":
        return lambda out: {name: out[:, j].tolist() for j, name in enumerate(names)}
    classes = bundle.preprocessor.classes_
    assert classes is not None
    # each class's label as outputs_to_frame writes it (a "str" array), made once
    labels = pd.array(np.asarray(classes, dtype=object), dtype="str").tolist()
    two = len(classes) == 2

    def answer(out: np.ndarray) -> Columns:
        if out.shape[1] == 1 and two:
            out = np.concatenate([1.0 - out, out], axis=1)
        cols = {name: out[:, j].tolist() for j, name in enumerate(names[:-1])}
        cols["label"] = [labels[i] for i in np.argmax(out, axis=1).tolist()]
        return cols

    return answer
