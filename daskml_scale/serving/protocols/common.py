"""What the protocol endpoints share: the model's name, the plain-ASGI endpoint, body
reading, the column checks, and the model that takes already-transformed features.

Every protocol turns its request into the same thing ``POST /predict`` hands the
micro-batcher: checked columns (name -> values) or a frame of raw rows. They then go
through the same queue, the same preprocessor and the same model call, so requests
of different dialects share batches.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from daskml_scale.serving.batcher import Block, Columns, MicroBatcher
from daskml_scale.serving.errors import RequestError, ServingError
from daskml_scale.serving.http import receive_body, require_ready
from daskml_scale.serving.inputs import DROPPED_COLUMN, dumps, loads

if TYPE_CHECKING:  # pragma: no cover
    from starlette.types import Receive, Scope, Send

    from daskml_scale.serving.app import ServingState
    from daskml_scale.serving.inputs import InputSpec
    from daskml_scale.serving.models import Served

__all__ = [
    "Endpoint", "FeatureModel", "served_of", "header", "read_body", "parse_json", "check_columns", "rows_to_columns",
    "JSON",
]

JSON = b"application/json"

Headers = list[tuple[bytes, bytes]]


def served_of(scope: "Scope") -> "Served":
    """The model a request names (``{name}``, ``{version}`` in its path), or 404."""
    return scope["app"].state.models.resolve(scope)


def header(scope: "Scope", name: bytes) -> bytes | None:
    """A request header's raw value (``name`` in lower case), or ``None``."""
    for k, v in scope["headers"]:
        if k == name:
            return v
    return None


def content_type(scope: "Scope") -> str:
    v = header(scope, b"content-type")
    return v.decode("latin-1").split(";")[0].strip().lower() if v else ""


async def read_body(state: "ServingState", scope: "Scope", receive: "Receive") -> bytes:
    """The body under ``serve.max-body-bytes``; ``Content-Encoding: gzip`` or ``deflate``
    is inflated, and the limit applies to the inflated size too."""
    limit = state.max_body_bytes
    body = await receive_body(receive, header(scope, b"content-length"), limit)
    enc = header(scope, b"content-encoding")
    if enc is None or enc.strip().lower() == b"identity":
        return body
    enc = enc.strip().lower()
    if enc not in (b"gzip", b"deflate"):
        raise RequestError(415, f"Unsupported Content-Encoding {enc.decode('latin-1')!r}: send gzip, deflate or none")
    d = zlib.decompressobj(wbits=31 if enc == b"gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise RequestError(400, f"The {enc.decode()} body cannot be inflated: {exc}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise RequestError(413, f"The inflated body is over the limit of {limit} bytes (serve.max-body-bytes)")
    return out


def parse_json(body: bytes, expected: str) -> Any:
    """JSON from a body, or 400 saying what was ``expected``."""
    if not body.strip():
        raise RequestError(400, f"The request body is empty: expected {expected}")
    try:
        return loads(body)
    except (ValueError, TypeError) as exc:
        raise RequestError(400, f"Malformed JSON: {exc}") from None


class Endpoint:
    """A protocol endpoint as a plain ASGI app (as ``POST /predict``): subclasses
    implement :meth:`handle`; a :class:`ServingError` becomes a JSON error body
    (:meth:`error_body`) with its status."""

    async def __call__(self, scope: "Scope", receive: "Receive", send: "Send") -> None:
        try:
            status, headers, body = await self.handle(served_of(scope), scope, receive)
        except ServingError as err:
            status, headers, body = err.status, [(b"content-type", JSON), *err.headers()], dumps(self.error_body(err))
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def handle(self, served: "Served", scope: "Scope", receive: "Receive") -> tuple[int, Headers, bytes]:
        raise NotImplementedError

    def error_body(self, err: ServingError) -> dict[str, Any]:
        return err.to_dict()


def json_answer(obj: Any, status: int = 200) -> tuple[int, Headers, bytes]:
    return status, [(b"content-type", JSON)], dumps(obj)


# ------------------------------------------------------------------------ columns
def check_columns(spec: "InputSpec", cols: Mapping[str, Any], what: str = "Column") -> tuple[Columns, int]:
    """Columns (name -> list of values) checked as ``POST /predict`` checks records:
    every required column, the same length, values of the right type.

    Returns
    -------
    columns : dict of list
        The schema's columns that were given (others are ignored).
    n : int
        The number of rows.
    """
    out: Columns = {}
    n: int | None = None
    first = ""
    for name, required, allowed, kind in spec.checks:
        vals = cols.get(name)
        if vals is None:
            if required:
                raise RequestError(422, f"{what} {name!r} is missing; the model needs {spec.required}", field=name)
            continue
        if type(vals) is not list:
            raise RequestError(422, f"{what} {name!r}: expected a list of values. Received: {type(vals).__name__}",
                               field=name)
        if n is None:
            n, first = len(vals), name
        elif len(vals) != n:
            raise RequestError(422, f"{what} {name!r} has {len(vals)} values; {what.lower()} {first!r} has {n}",
                               field=name)
        # one value (a single-row request): no set to build
        if not (type(vals[0]) in allowed if n == 1 else set(map(type, vals)) <= allowed):
            i, v = next((i, v) for i, v in enumerate(vals) if type(v) not in allowed)
            raise RequestError(422, f"Row {i}, {what.lower()} {name!r}: expected {kind}. Received: {v!r}", field=name)
        out[name] = vals
    if not n:
        raise RequestError(422 if n is None else 400, "Expected at least one row of the model's columns "
                           f"{spec.required}. Received: " + ("none of them" if n is None else "zero rows"))
    return out, n


def default_order(spec: "InputSpec", width: int) -> list[str]:
    """The columns a row given as a list of values holds, in order: the model's required
    columns when it has that many values, else every column of the input schema."""
    if width == len(spec.required):
        return list(spec.required)
    names = [c.name for c in spec.columns]
    if width == len(names):
        return names
    raise RequestError(422, f"A row given as a list has {width} values; expected {len(spec.required)} (the required "
                       f"columns {spec.required}) or {len(names)} (every column {names}), in that order")


def rows_to_columns(spec: "InputSpec", rows: Any, names: Sequence[str] | None, what: str = "Row") -> dict[str, list[Any]]:
    """Rows given as lists of values -> columns (``names``: their order, else :func:`default_order`)."""
    if not isinstance(rows, list) or not rows:
        raise RequestError(400, f"Expected a non-empty list of rows. Received: {str(rows)[:80]}")
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, list)), None)
    if bad is not None:
        raise RequestError(400, f"{what} {bad}: expected a list of values. Received: {str(rows[bad])[:80]}")
    if names is None:
        names = default_order(spec, len(rows[0]))
    width = len(names)
    bad = next((i for i, r in enumerate(rows) if len(r) != width), None)
    if bad is not None:
        raise RequestError(422, f"{what} {bad} has {len(rows[bad])} values; expected {width}: {list(names)}")
    return {name: list(vals) for name, vals in zip(names, zip(*rows))}


def split_dropped(cols: Columns, omit: bool) -> tuple[Columns, list[bool] | None]:
    """(output columns, which rows the transform dropped or ``None``); with ``omit`` the
    dropped rows are left out of the columns (and ``None`` is returned for them)."""
    dropped = cols.get(DROPPED_COLUMN)
    outputs = {c: v for c, v in cols.items() if c != DROPPED_COLUMN} if dropped is not None else cols
    if dropped is None or not any(dropped):
        return outputs, None
    if omit:
        keep = [not d for d in dropped]
        return {c: [v for v, k in zip(vals, keep) if k] for c, vals in outputs.items()}, None
    return outputs, dropped


# ------------------------------------------------------------- transformed features
def _stack(blocks: Sequence[Block]) -> np.ndarray:
    return blocks[0].rows if len(blocks) == 1 else np.concatenate([b.rows for b in blocks])


class FeatureModel:
    """The model alone, for rows already transformed into the model's features (a
    float32 matrix, one column per ``Bundle.feature_names``): no preprocessor.

    Requests are coalesced like raw rows, by a second micro-batcher that shares the
    model thread (one model call at a time in the process).
    """

    def __init__(self, state: "ServingState") -> None:
        self.state = state
        o = state.options
        self.batcher = MicroBatcher(
            self._predict, _stack, max_batch_rows=o.max_batch_rows, max_wait_ms=o.max_wait_ms,
            enabled=o.micro_batching, metrics=state.metrics, executor=state.batcher.executor,
            max_queue_rows=o.max_queue_rows, run=self._run,
        )

    @property
    def width(self) -> int:
        assert self.state.bundle is not None
        return len(self.state.bundle.feature_names)

    def check(self, X: np.ndarray, what: str) -> np.ndarray:
        if X.ndim != 2 or X.shape[1] != self.width or X.shape[0] == 0:
            raise RequestError(422, f"{what}: expected a matrix of shape [rows, {self.width}] (the model's features "
                               f"{self.state.bundle.feature_names[:5]}...). Received: shape {list(X.shape)}")
        return np.ascontiguousarray(X, dtype=np.float32)

    def _predict(self, X: np.ndarray) -> pd.DataFrame:
        b = self.state.bundle
        assert b is not None
        return b.outputs_to_frame(b.predict_array(X, batch_size=max(len(X), 1)), pd.RangeIndex(len(X)))

    def _run(self, blocks: Sequence[Block]) -> Columns:
        """The batch's answer columns: from the model's outputs where the bundle has the
        NumPy path (:mod:`daskml_scale.serving.fastpath`), else through a frame."""
        X = _stack(blocks)
        fast = self.state.fast
        if fast is not None:
            return fast.answer(fast.forward(X), len(X))
        out = self._predict(X)
        return {str(c): out[c].tolist() for c in out.columns}

    async def submit(self, X: np.ndarray) -> Columns:
        require_ready(self.state)
        return await self.batcher.submit(X, len(X))

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
