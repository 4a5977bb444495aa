"""The Open Inference Protocol (v2, as spoken by KServe and Triton) over REST.

``GET /v2``, ``GET /v2/health/live``, ``GET /v2/health/ready``,
``GET /v2/models/{name}[/versions/{v}]``, ``GET /v2/models/{name}[/versions/{v}]/ready``
and ``POST /v2/models/{name}[/versions/{v}]/infer``. An inference request is either

* **tabular**: one input per column of the bundle's input schema, shape ``[rows]`` or
  ``[rows, 1]`` (MLServer's ``"parameters": {"content_type": "pd"}`` convention; the
  parameter may be left out). The rows go through the preprocessor and the same
  micro-batcher as ``POST /predict``;
* **features**: one FP32 (or FP16/FP64) input of shape ``[rows, n_features]`` that is
  not a column of the schema (or any input with ``"content_type": "np"``): rows already
  transformed, handed to the model as they are.

The answer has one output per prediction column (``Bundle.output_names``), shape
``[rows, 1]``, plus a BOOL ``dropped`` output when the transform dropped rows. The
binary tensor extension (``Inference-Header-Content-Length``, ``binary_data_size``,
``binary_data`` / ``binary_data_output``) is spoken both ways, as ``tritonclient``
uses it by default. Errors are ``{"error": ...}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from daskml_scale._version import __version__
from daskml_scale.serving.errors import RequestError, ServingError
from daskml_scale.serving.http import require_ready
from daskml_scale.serving.inputs import dumps
from daskml_scale.serving.protocols.common import (
    JSON, Endpoint, check_columns, header, parse_json, read_body, served_of, split_dropped,
)
from daskml_scale.serving.protocols.tensors import (
    Layout, Tensor, binary_layout, datatype_of_dtype, decode_inputs, encode_output, flat_columns, read_layout,
    split_body,
)

if TYPE_CHECKING:  # pragma: no cover
    from starlette.types import Receive, Scope

    from daskml_scale.serving.app import ServingState
    from daskml_scale.serving.models import Served

__all__ = ["routes", "InferEndpoint"]

_FLOATS = ("FP16", "FP32", "FP64")


def _answer(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json")


def _error(err: ServingError) -> Response:
    return _answer(err.to_dict(), err.status)


# ---------------------------------------------------------------------- metadata
async def server_metadata(request: Request) -> Response:
    return _answer({"name": "daskml_scale", "version": __version__, "extensions": ["binary_tensor_data"]})


async def live(request: Request) -> Response:
    return _answer({"live": True})


async def ready(request: Request) -> Response:
    """200 once every served model is ready."""
    states = [s.state for s in request.app.state.models.served.values()]
    ok = all(s.ready.is_set() for s in states)
    body: dict[str, Any] = {"ready": ok}
    errors = [s.load_error for s in states if s.load_error]
    if errors:
        body["error"] = "; ".join(errors)
    return _answer(body, 200 if ok else 503)


# --------------------------------------------------------------------- repository
async def repository_index(request: Request) -> Response:
    """``POST /v2/repository/index``: every model, its version, state and last error."""
    return _answer([s.describe() for s in request.app.state.models.served.values()])


async def repository_load(request: Request) -> Response:
    """``POST /v2/repository/models/{name}/load``: load a new version (``{"parameters": {"url": URL}}``,
    else the model's own URL again) and swap it in once ready, without failing a request."""
    models = request.app.state.models
    name = request.path_params["name"]
    try:
        body = await request.body()
        url = None
        if body.strip():
            req = parse_json(body, '{"parameters": {"url": URL}} or nothing')
            params = req.get("parameters") if isinstance(req, dict) else None
            url = params.get("url") if isinstance(params, dict) else None
            if url is not None and not isinstance(url, str):
                raise RequestError(400, f"Expected parameters.url to be a URL string. Received: {url!r}")
        served = await models.load(name, url)
    except ServingError as err:
        return _error(err)
    return _answer(served.describe())


async def repository_unload(request: Request) -> Response:
    """``POST /v2/repository/models/{name}/unload``: stop serving a model once its requests are done."""
    try:
        await request.app.state.models.unload(request.path_params["name"])
    except ServingError as err:
        return _error(err)
    return _answer({})


async def model_ready(request: Request) -> Response:
    try:
        served = served_of(request.scope)
    except ServingError as err:
        return _error(err)
    state = served.state
    ok = state.ready.is_set()
    body: dict[str, Any] = {"name": served.name, "ready": ok}
    if state.load_error:
        body["error"] = state.load_error
    return _answer(body, 200 if ok else 503)


def _output_datatype(state: "ServingState", name: str) -> str:
    if name != "label":
        return "FP32"
    classes = state.bundle.preprocessor.classes_ if state.bundle is not None else None
    if classes and all(isinstance(c, bool) for c in classes):
        return "BOOL"
    if classes and all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
        return "INT64"
    return "BYTES"


def describe_model(served: "Served") -> dict[str, Any]:
    """The v2 model metadata: the required columns as inputs, the prediction columns as outputs."""
    state = served.state
    require_ready(state)
    spec, bundle = state.spec, state.bundle
    assert spec is not None and bundle is not None
    inputs = [{"name": c.name, "datatype": datatype_of_dtype(c.dtype), "shape": [-1, 1]} for c in spec.columns if c.required]
    optional = [{"name": c.name, "datatype": datatype_of_dtype(c.dtype), "shape": [-1, 1]}
                for c in spec.columns if not c.required]
    outputs = [{"name": o, "datatype": _output_datatype(state, o), "shape": [-1, 1]} for o in bundle.output_names]
    return {
        "name": served.name, "versions": [str(served.version)], "platform": "daskml_scale", "inputs": inputs,
        "outputs": outputs,
        "parameters": {
            "content_type": "pd", "optional_inputs": optional, "task": bundle.task, "content_hash": bundle.content_hash,
            "features": {"name": "features", "datatype": "FP32", "shape": [-1, len(bundle.feature_names)],
                         "feature_names": bundle.feature_names},
        },
    }


async def model_metadata(request: Request) -> Response:
    try:
        return _answer(describe_model(served_of(request.scope)))
    except ServingError as err:
        return _error(err)


# ------------------------------------------------------------------------- infer
def _columns(state: "ServingState", tensors: list[Tensor]) -> tuple[dict[str, list[Any]], int]:
    cols: dict[str, list[Any]] = {}
    for t in tensors:
        if len(t.shape) > 2 or (len(t.shape) == 2 and t.shape[1] != 1):
            raise RequestError(400, f"Input {t.name!r}: a column is a tensor of shape [rows] or [rows, 1]. Received: "
                               f"shape {t.shape} (rows already transformed into features are one FP32 input of "
                               f"shape [rows, {len(state.bundle.feature_names)}])", field=t.name)  # type: ignore[union-attr]
        cols[t.name] = t.tolist()
    assert state.spec is not None
    return check_columns(state.spec, cols, "Input")


def _features(state: "ServingState", tensors: list[Tensor], content_type: Any) -> np.ndarray | None:
    """The feature matrix when the request is one tensor of transformed features, else ``None``."""
    assert state.spec is not None
    if len(tensors) != 1:
        if content_type == "np":
            raise RequestError(400, f"content_type 'np' expects one input (the feature matrix). Received: {len(tensors)}")
        return None
    t = tensors[0]
    if content_type != "np" and (t.name in state.spec.by_name or len(t.shape) != 2 or t.shape[1] == 1):
        return None
    if t.datatype not in _FLOATS:
        raise RequestError(422, f"Input {t.name!r}: the feature matrix must be FP32 (or FP16/FP64). Received: {t.datatype}",
                           field=t.name)
    return state.features.check(t.array(), f"Input {t.name!r}")


def _selection(req: dict[str, Any], names: list[str]) -> list[tuple[str, bool]]:
    params = req.get("parameters") or {}
    default = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    requested = req.get("outputs")
    if requested is None:
        return [(n, default) for n in names]
    if not isinstance(requested, list):
        raise RequestError(400, f"Expected 'outputs' to be a list of {{\"name\": ...}}. Received: {str(requested)[:80]}")
    out = []
    for r in requested:
        name = r.get("name") if isinstance(r, dict) else None
        if name not in names:
            raise RequestError(400, f"Requested output {name!r} is not an output of the model; its outputs are {names}",
                               field=str(name))
        p = r.get("parameters") or {}
        out.append((name, bool(p.get("binary_data", default)) if isinstance(p, dict) else default))
    return out


class InferEndpoint(Endpoint):
    """``POST /v2/models/{name}[/versions/{version}]/infer``.

    A request with binary inputs carries its values after a JSON header that, for one
    client sending rows of one shape, is the same bytes every time. The endpoint keeps
    what it read from such a header (the parsed request and where each input's values
    lie: :func:`~daskml_scale.serving.protocols.tensors.binary_layout`) by its bytes, and
    the header of a binary answer by what it depends on, so that a repeated request
    parses no JSON and writes none (up to :attr:`CACHED` of each; then they start over).
    """

    #: how many request headers (and answer headers) are kept
    CACHED = 512

    def __init__(self) -> None:
        self._requests: dict[bytes, tuple[dict[str, Any], Any, Layout]] = {}
        self._answers: dict[tuple, bytes] = {}

    def _keep(self, store: dict, key: Any, value: Any) -> None:
        """``store[key] = value``, ``store`` emptied first when it holds :attr:`CACHED`."""
        if len(store) >= self.CACHED:
            store.clear()
        store[key] = value

    async def handle(self, served: "Served", scope: "Scope", receive: "Receive") -> tuple[int, list, bytes]:
        state = served.state
        require_ready(state)
        batcher = state.batcher
        batcher.check_room()  # a full queue: 503 at once, before reading the body
        with batcher.arrival():
            body = await read_body(state, scope, receive)
            head, binary = split_body(body, header(scope, b"inference-header-content-length"))
            known = self._requests.get(head) if binary else None
            if known is not None:
                req, ctype, layout = known
                fast = read_layout(layout, binary)
            else:
                req, ctype = _request(head)
                fast = None
                if ctype != "np" and not binary:
                    fast = flat_columns(req.get("inputs"))
                elif ctype != "np" and (layout := binary_layout(req.get("inputs"))) is not None:
                    self._keep(self._requests, head, (req, ctype, layout))
                    fast = read_layout(layout, binary)
            # one flat column per input, all JSON or all binary: straight to the column checks
            if fast is not None:
                X = None
                cols, n = check_columns(state.spec, fast, "Input")  # type: ignore[arg-type]
            else:
                tensors = decode_inputs(req.get("inputs"), binary)
                X = _features(state, tensors, ctype)
                if X is None:
                    cols, n = _columns(state, tensors)
        if X is not None:
            out, ctype = await state.features.submit(X), "np"
        else:
            out, ctype = await batcher.submit(cols, n, receive), "pd"
        return self.encode(served, req, out, ctype)

    def encode(self, served: "Served", req: dict[str, Any], out: dict[str, list[Any]], ctype: str):
        state = served.state
        outputs, dropped = split_dropped(out, state.options.on_dropped == "omit")
        if dropped is not None:
            outputs = {**outputs, "dropped": dropped}
        selection = _selection(req, list(outputs))
        rows = len(next(iter(outputs.values()))) if outputs else 0
        tensors, raws = [], []
        for o, binary in selection:
            dt = "BOOL" if o == "dropped" else _output_datatype(state, o)
            t, raw = encode_output(o, dt, outputs[o], [rows, 1], binary)
            tensors.append(t)
            if binary:
                raws.append(raw)
        has_id, rid = "id" in req, req.get("id")
        key = None
        if raws and len(raws) == len(tensors) and (rid is None or type(rid) is str):
            # every output binary: the header holds no values, only their sizes
            key = (served.name, served.version, ctype, has_id, rid, rows,
                   *[(t["name"], t["datatype"], len(r)) for t, r in zip(tensors, raws)])
            head = self._answers.get(key)
        else:
            head = None
        if head is None:
            resp: dict[str, Any] = {"model_name": served.name, "model_version": str(served.version),
                                    "outputs": tensors, "parameters": {"content_type": ctype}}
            if has_id:
                resp["id"] = rid
            head = dumps(resp)
            if key is not None:
                self._keep(self._answers, key, head)
        if not raws:
            return 200, [(b"content-type", JSON)], head
        return 200, [(b"content-type", b"application/octet-stream"),
                     (b"inference-header-content-length", str(len(head)).encode())], b"".join([head, *raws])


def _request(head: bytes) -> tuple[dict[str, Any], Any]:
    """The parsed inference request and its content_type, or 400."""
    req = parse_json(head, 'a v2 inference request {"inputs": [...]}')
    if not isinstance(req, dict):
        raise RequestError(400, f"Expected a JSON object {{\"inputs\": [...]}}. Received: {type(req).__name__}")
    params = req.get("parameters") or {}
    ctype = params.get("content_type") if isinstance(params, dict) else None
    if ctype not in (None, "pd", "np"):
        raise RequestError(400, f"Unsupported content_type {ctype!r}: send \"pd\" (one input per column) or "
                           "\"np\" (one matrix of transformed features)")
    return req, ctype


def routes() -> list[Route]:
    """The v2 routes."""
    infer = InferEndpoint()
    out = [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
    ]
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        out += [
            Route(base, model_metadata, methods=["GET"]),
            Route(f"{base}/ready", model_ready, methods=["GET"]),
            Route(f"{base}/infer", infer, methods=["POST"]),
        ]
    out += [
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", repository_load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", repository_unload, methods=["POST"]),
    ]
    return out
