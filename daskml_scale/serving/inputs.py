"""Request bodies in, prediction bodies out: parsing and checks against the bundle.

Every check answers with a :class:`~daskml_scale.serving.errors.RequestError` that
carries an HTTP status and a message naming what was wrong (the record or line, the
field, what was expected and what was received). Bodies are parsed as JSON or CSV text only: nothing
received is ever unpickled or evaluated.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from daskml_scale._utils.jsonable import json_default
from daskml_scale.dropped_rows import DROPPED_REASON
from daskml_scale.serving.errors import RequestError

try:  # optional speed-up; the standard library is the fallback
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

__all__ = ["RequestError", "InputSpec", "loads", "dumps", "DROPPED_COLUMN"]  # RequestError: re-exported from errors

#: the model's answer column (True: the transform dropped the row), present only when a row was
DROPPED_COLUMN = "_dropped"


def loads(body: bytes) -> Any:
    """Parse JSON bytes (orjson when installed)."""
    if _orjson is not None:
        return _orjson.loads(body)
    return json.loads(body)


def dumps(obj: Any) -> bytes:
    """JSON bytes; NaN and infinities become ``null``."""
    if _orjson is not None:
        return _orjson.dumps(obj, option=_orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(obj, allow_nan=False, default=json_default).encode()


class _Absent:
    """A field a record does not have (``None`` is JSON ``null``, which is a value)."""


_ABSENT = _Absent()
_NONE = type(None)
_NUMBER_OK = frozenset({int, float, _NONE})
_BOOL_OK = frozenset({bool, _NONE})
_STRING_OK = frozenset({str, int, float, _NONE})

_NUMERIC_PREFIXES = ("int", "uint", "float", "Int", "UInt", "Float", "double")


def _is_numeric_dtype_name(dtype: str) -> bool:
    return dtype.startswith(_NUMERIC_PREFIXES)


@dataclass
class Column:
    name: str
    dtype: str
    numeric: bool
    boolean: bool
    required: bool


class InputSpec:
    """What a prediction request must look like, derived from a bundle.

    A column is *required* when it is in the bundle's input schema and is a
    feature of the preprocessor; the other schema columns are optional (a
    transform may use them when present). Columns outside the schema are ignored,
    except the id column, which is passed through to the answer.

    Parameters
    ----------
    input_schema : dict
        Raw input column -> dtype string (``Bundle.input_schema``).
    features : sequence of str
        The preprocessor's numeric and categorical columns.
    target : str, optional
        The preprocessor's target: never passed to the model at serving time.
    """

    def __init__(self, input_schema: dict[str, str], features: Sequence[str], target: str | None = None) -> None:
        feats = set(features)
        self.target = target
        self.columns: list[Column] = []
        for name, dtype in input_schema.items():
            if name == target:
                continue
            dtype = str(dtype)
            self.columns.append(
                Column(
                    name=name, dtype=dtype,
                    numeric=_is_numeric_dtype_name(dtype) or dtype in ("bool", "boolean"),
                    boolean=dtype in ("bool", "boolean"),
                    required=name in feats,
                )
            )
        self.by_name = {c.name: c for c in self.columns}
        self.required = [c.name for c in self.columns if c.required]
        # per column: (name, required, the JSON types it takes, what to call them), for the checks
        self.checks = [
            (c.name, c.required, _BOOL_OK if c.boolean else (_NUMBER_OK if c.numeric else _STRING_OK),
             "a boolean" if c.boolean else ("a number" if c.numeric else "a string"))
            for c in self.columns
        ]

    def json_schema(self) -> dict[str, Any]:
        """The JSON schema of one record: every schema column, nullable, and the required ones."""
        props: dict[str, Any] = {}
        for c in self.columns:
            t = "boolean" if c.boolean else ("number" if c.numeric else "string")
            props[c.name] = {"type": [t, "null"], "description": f"dtype {c.dtype}"}
        return {"type": "object", "properties": props, "required": list(self.required)}

    # -- JSON ---------------------------------------------------------------------
    def parse_json(self, body: bytes, id_column: str | None = None) -> tuple[dict[str, list[Any]], int, list[Any] | None]:
        """Checked columns from a JSON body (a list of objects, or ``{"records": [...]}``).

        Returns
        -------
        columns : dict of list
            Schema column -> values in record order (``None`` where a record lacks an
            optional field); optional columns absent from every record are left out.
        n : int
            The number of records.
        ids : list or None
            The id column's values, when ``id_column`` is given.
        """
        if not body.strip():
            raise RequestError(400, "The request body is empty: expected a JSON list of records")
        try:
            data = loads(body)
        except (ValueError, TypeError) as exc:
            raise RequestError(400, f"Malformed JSON: {exc}") from None
        if isinstance(data, dict) and isinstance(data.get("records"), list):
            data = data["records"]
        if not isinstance(data, list):
            raise RequestError(
                400, f"Expected a JSON list of records (objects). Received: a JSON {type(data).__name__}"
            )
        if not data:
            raise RequestError(400, "Expected at least one record. Received: an empty list")
        cols = self.check_records(data)
        ids = None
        if id_column is not None:
            ids = [r.get(id_column, _ABSENT) for r in data]
            if _Absent in set(map(type, ids)):
                i = next(i for i, v in enumerate(ids) if v is _ABSENT)
                raise RequestError(422, f"Record {i}: the id field {id_column!r} is missing", field=id_column)
        return cols, len(data), ids

    def check_records(self, records: list[Any]) -> dict[str, list[Any]]:
        """Each record an object with every required field, of the right type.

        Works column by column (one ``set(map(type, values))`` per column) and
        returns the columns; an error names the first offending record.
        """
        if len(records) == 1 and type(records[0]) is dict:
            return self._check_record(records[0])
        if set(map(type, records)) != {dict}:
            i, r = next((i, r) for i, r in enumerate(records) if not isinstance(r, dict))
            raise RequestError(400, f"Record {i}: expected a JSON object. Received: {type(r).__name__} {str(r)[:80]}")
        cols: dict[str, list[Any]] = {}
        for c in self.columns:
            name = c.name
            vals = [r.get(name, _ABSENT) for r in records]
            types = set(map(type, vals))
            if _Absent in types:
                if c.required:
                    i = next(i for i, v in enumerate(vals) if v is _ABSENT)
                    raise RequestError(
                        422, f"Record {i}: required field {name!r} is missing; the model needs {self.required}",
                        field=name,
                    )
                if len(types) == 1:
                    continue  # an optional column nobody sent
                vals = [None if v is _ABSENT else v for v in vals]
                types.discard(_Absent)
                types.add(type(None))
            allowed = _BOOL_OK if c.boolean else (_NUMBER_OK if c.numeric else _STRING_OK)
            if not types <= allowed:
                i, v = next((i, v) for i, v in enumerate(vals) if type(v) not in allowed)
                what = "a boolean" if c.boolean else ("a number" if c.numeric else "a string")
                raise RequestError(422, f"Record {i}, field {name!r}: expected {what}. Received: {v!r}", field=name)
            cols[name] = vals
        return cols

    def _check_record(self, record: dict[str, Any]) -> dict[str, list[Any]]:
        """:meth:`check_records` of a single record (the same checks and messages, without
        the per-column lists and sets that pay off for many records)."""
        cols: dict[str, list[Any]] = {}
        for name, required, allowed, what in self.checks:
            v = record.get(name, _ABSENT)
            if v is _ABSENT:
                if required:
                    raise RequestError(
                        422, f"Record 0: required field {name!r} is missing; the model needs {self.required}",
                        field=name,
                    )
                continue  # an optional column the record does not have
            if type(v) not in allowed:
                raise RequestError(422, f"Record 0, field {name!r}: expected {what}. Received: {v!r}", field=name)
            cols[name] = [v]
        return cols

    def columns_to_frame(self, cols: dict[str, list[Any]]) -> pd.DataFrame:
        """A frame from checked columns: numbers as float64 (int where the schema says
        so and nothing is missing), everything else as object arrays."""
        data: dict[str, Any] = {}
        for name, vals in cols.items():
            c = self.by_name[name]
            if c.numeric and not c.boolean:
                arr = np.array(vals, dtype=np.float64)
                if c.dtype.startswith(("int", "uint")) and not np.isnan(arr).any():
                    arr = arr.astype(c.dtype)
                data[name] = arr
            else:  # object arrays: no per-value string inference here; the preprocessor keys them
                data[name] = np.array(vals, dtype=object)
        return pd.DataFrame(data, copy=False)

    def concat_columns(self, parts: list[tuple[dict[str, list[Any]], int]]) -> dict[str, list[Any]]:
        """The columns of several requests, one after the other (``None`` fills gaps)."""
        if len(parts) == 1:
            return parts[0][0]
        out: dict[str, list[Any]] = {}
        for c in self.columns:
            if not any(c.name in cols for cols, _ in parts):
                continue
            acc: list[Any] = []
            for cols, n in parts:
                acc.extend(cols.get(c.name) or [None] * n)
            out[c.name] = acc
        return out

    def records_to_frame(self, records: list[dict[str, Any]]) -> pd.DataFrame:
        """One frame of the schema columns present in ``records`` (checked first)."""
        return self.columns_to_frame(self.check_records(records))

    # -- CSV ----------------------------------------------------------------------
    def parse_csv(self, body: bytes, id_column: str | None = None) -> tuple[pd.DataFrame, list[Any] | None]:
        """A frame from a CSV body with a header line."""
        if not body.strip():
            raise RequestError(400, "The request body is empty: expected CSV text with a header line")
        try:
            df = pd.read_csv(io.BytesIO(body), engine="c")
        except pd.errors.EmptyDataError:
            raise RequestError(400, "The CSV body has no header line") from None
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
            raise RequestError(400, f"Malformed CSV: {str(exc).strip()}") from None
        if len(df) == 0:
            raise RequestError(400, "The CSV body has a header but no rows")
        for name in self.required:
            if name not in df.columns:
                raise RequestError(
                    422, f"CSV column {name!r} is missing; the model needs {self.required}; "
                    f"the body has {list(df.columns)}", field=name,
                )
        for c in self.columns:
            if c.name not in df.columns or not c.numeric or c.boolean:
                continue
            s = df[c.name]
            if pd.api.types.is_numeric_dtype(s.dtype):
                continue
            num = pd.to_numeric(s, errors="coerce")
            bad = num.isna() & s.notna()
            if bad.any():
                pos = int(np.flatnonzero(bad.to_numpy())[0])
                raise RequestError(
                    422, f"CSV line {pos + 2}, column {c.name!r}: expected a number. Received: {s.iloc[pos]!r}",
                    field=c.name, line=pos + 2,
                )
            df[c.name] = num
        ids = None
        if id_column is not None:
            if id_column not in df.columns:
                raise RequestError(422, f"The id column {id_column!r} is missing from the CSV header", field=id_column)
            ids = df[id_column].tolist()
        keep = [c.name for c in self.columns if c.name in df.columns]
        return df[keep], ids

    def frames_to_frame(self, frames: list[pd.DataFrame]) -> pd.DataFrame:
        return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)


# -------------------------------------------------------------------------- answers
def _split_dropped(cols: dict[str, list[Any]]) -> tuple[dict[str, list[Any]], list[bool] | None]:
    """(the output columns, which rows the transform dropped; ``None``: none was)."""
    dropped = cols.get(DROPPED_COLUMN)
    if dropped is None:
        return cols, None
    outputs = {c: v for c, v in cols.items() if c != DROPPED_COLUMN}
    return outputs, (dropped if any(dropped) else None)


def output_records(
    cols: dict[str, list[Any]], ids: list[Any] | None, id_column: str | None, *, omit_dropped: bool = False
) -> list[dict[str, Any]]:
    """One JSON object per row: the id (when asked for) then the output columns.

    A row the model's transform dropped has ``null`` outputs, ``"dropped": true`` and
    ``"reason"``; with ``omit_dropped`` it is left out.
    """
    cols, dropped = _split_dropped(cols)
    names = list(cols)
    values = list(cols.values())
    if ids is not None and id_column is not None:
        names = [id_column, *names]
        values = [ids, *values]
    records = [dict(zip(names, row)) for row in zip(*values)]
    if dropped is None:
        return records
    if omit_dropped:
        return [r for r, d in zip(records, dropped) if not d]
    empty = dict.fromkeys(cols)
    for r, d in zip(records, dropped):
        if d:
            r.update(empty, dropped=True, reason=DROPPED_REASON)
    return records


def output_csv(
    cols: dict[str, list[Any]], ids: list[Any] | None, id_column: str | None, *, omit_dropped: bool = False
) -> bytes:
    """CSV text with a header: the id column (when asked for) then the output columns.

    When the model's transform dropped rows, their outputs are empty and a last column
    ``dropped`` says which they are; with ``omit_dropped`` they are left out.
    """
    cols, dropped = _split_dropped(cols)
    data: dict[str, list[Any]] = {}
    if ids is not None and id_column is not None:
        data[id_column] = ids
    data.update(cols)
    frame = pd.DataFrame(data)
    if dropped is not None:
        if omit_dropped:
            frame = frame[~np.asarray(dropped, dtype=bool)]
        else:
            frame["dropped"] = dropped
    return frame.to_csv(index=False).encode()
