"""MLflow's scoring server: ``GET /ping``, ``GET /version``, ``POST /invocations``
(``GET /health`` is the server's own, which answers 200 once the model is ready as
MLflow's does).

``POST /invocations`` takes ``application/json`` with exactly one of

* ``dataframe_split``: ``{"columns": [...], "data": [[...], ...]}`` (``index`` ignored);
* ``dataframe_records``: a list of objects keyed by column;
* ``instances``: a list of objects, or of lists of values in the signature's order;
* ``inputs``: an object of columns ``{column: [values...]}``, or a list as ``instances``;

and optionally ``params`` (ignored: the model takes none), or ``text/csv`` with a header
line. The answer is ``{"predictions": [...]}``, one object per row with the prediction
columns (as MLflow writes a pandas frame). Errors carry MLflow's ``error_code`` and
``message`` besides ``error``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from daskml_scale._version import __version__
from daskml_scale.serving.errors import RequestError, ServingError
from daskml_scale.serving.http import require_ready
from daskml_scale.serving.inputs import output_records
from daskml_scale.serving.protocols.common import (
    Endpoint, check_columns, content_type, json_answer, parse_json, read_body, rows_to_columns,
)

if TYPE_CHECKING:  # pragma: no cover
    from starlette.types import Receive, Scope

    from daskml_scale.serving.app import ServingState
    from daskml_scale.serving.models import Served

__all__ = ["routes", "InvocationsEndpoint"]

_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
_CODES = {400: "BAD_REQUEST", 404: "RESOURCE_DOES_NOT_EXIST", 413: "BAD_REQUEST", 415: "BAD_REQUEST",
          422: "BAD_REQUEST", 503: "TEMPORARILY_UNAVAILABLE"}


async def ping(request: Request) -> Response:
    """200 with a newline once every model is loaded; 503 before."""
    ok = all(s.state.ready.is_set() for s in request.app.state.models.served.values())
    return Response("\n", status_code=200 if ok else 503, media_type="application/json")


async def version(request: Request) -> Response:
    return Response(__version__, media_type="text/plain")


def _columns(state: "ServingState", req: dict[str, Any]) -> tuple[dict[str, list[Any]], int]:
    spec = state.spec
    assert spec is not None
    given = [k for k in _FORMATS if k in req]
    unknown = sorted(set(req) - {*_FORMATS, "params"})
    if len(given) != 1 or unknown:
        raise RequestError(400, f"Expected a JSON object with exactly one of {list(_FORMATS)} (and optionally "
                           f"'params'). Received the keys {sorted(req)}")
    key = given[0]
    data = req[key]
    if key == "dataframe_split":
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise RequestError(400, "Expected 'dataframe_split' to be {\"columns\": [...], \"data\": [[...], ...]}")
        names = data.get("columns")
        if names is not None and (not isinstance(names, list) or not all(isinstance(c, str) for c in names)):
            raise RequestError(400, f"Expected dataframe_split 'columns' to be a list of names. Received: {names!r}")
        return check_columns(spec, rows_to_columns(spec, data["data"], names), "Column")
    if isinstance(data, dict) and key == "inputs":
        return check_columns(spec, data, "Column")
    if not isinstance(data, list) or not data:
        raise RequestError(400, f"Expected {key!r} to be a non-empty list of rows")
    if all(isinstance(r, dict) for r in data):
        return spec.check_records(data), len(data)
    if key == "dataframe_records":
        raise RequestError(400, "Expected 'dataframe_records' to be a list of objects keyed by column")
    return check_columns(spec, rows_to_columns(spec, data, None), "Column")


class InvocationsEndpoint(Endpoint):
    """``POST /invocations``."""

    async def handle(self, served: "Served", scope: "Scope", receive: "Receive") -> tuple[int, list, bytes]:
        state = served.state
        require_ready(state)
        spec = state.spec
        assert spec is not None
        ctype = content_type(scope)
        is_csv = ctype in ("text/csv", "application/csv")
        if not is_csv and ctype not in ("application/json", ""):
            raise RequestError(415, f"Unsupported Content-Type {ctype!r}: send application/json (dataframe_split, "
                               "dataframe_records, instances or inputs) or text/csv")
        batcher = state.batcher
        batcher.check_room()  # a full queue: 503 at once, before reading the body
        with batcher.arrival():
            body = await read_body(state, scope, receive)
            if is_csv:
                rows, _ = spec.parse_csv(body)
                n = len(rows)
            else:
                req = parse_json(body, "a JSON object with dataframe_split, dataframe_records, instances or inputs")
                if not isinstance(req, dict):
                    raise RequestError(400, f"Expected a JSON object. Received: a JSON {type(req).__name__}")
                rows, n = _columns(state, req)
        out = await batcher.submit(rows, n, receive)
        return json_answer({"predictions": output_records(out, None, None, omit_dropped=state.options.on_dropped == "omit")})

    def error_body(self, err: ServingError) -> dict[str, Any]:
        d = err.to_dict()
        d.update(error_code=_CODES.get(err.status, "INTERNAL_ERROR"), message=str(err))
        return d


def routes() -> list[Route]:
    """The MLflow routes (``/health`` is the server's own)."""
    return [
        Route("/ping", ping, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/invocations", InvocationsEndpoint(), methods=["POST"]),
    ]
