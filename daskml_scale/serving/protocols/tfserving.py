"""TensorFlow Serving's REST API: ``GET /v1/models/{name}[/versions/{v}]``,
``GET /v1/models/{name}[/versions/{v}]/metadata`` and
``POST /v1/models/{name}[/versions/{v}]:predict``.

A predict request is ``{"instances": [...]}`` (the row format: each instance an object
keyed by column, or a list of values in the order of the signature's inputs) or
``{"inputs": {column: [values...]}}`` (the columnar format). The answers are
``{"predictions": [...]}`` (one per instance: the value when the model has one output,
else an object keyed by output) and ``{"outputs": ...}`` (the values when the model has
one output, else an object of columns).

Two signatures: ``serving_default`` takes raw columns (the preprocessor runs, and the
requests share batches with every other dialect); ``features`` takes rows already
transformed (``instances``: lists of ``n_features`` numbers; ``inputs``: the same
matrix, or ``{"features": matrix}``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from daskml_scale.serving.errors import RequestError, ServingError
from daskml_scale.serving.http import require_ready
from daskml_scale.serving.inputs import dumps
from daskml_scale.serving.protocols.common import (
    Endpoint, check_columns, default_order, json_answer, parse_json, read_body, rows_to_columns, served_of,
    split_dropped,
)

if TYPE_CHECKING:  # pragma: no cover
    from starlette.types import Receive, Scope

    from daskml_scale.serving.app import ServingState
    from daskml_scale.serving.models import Served

__all__ = ["routes", "PredictEndpoint"]

_SIGNATURES = ("serving_default", "features")
_DT = {"BOOL": "DT_BOOL", "BYTES": "DT_STRING", "INT64": "DT_INT64", "UINT64": "DT_UINT64", "FP16": "DT_HALF",
       "FP32": "DT_FLOAT", "FP64": "DT_DOUBLE"}


def _answer(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json")


def _tensor_info(name: str, dtype: str, dims: list[int]) -> dict[str, Any]:
    return {"dtype": dtype, "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in dims],
                                             "unknown_rank": False}, "name": name}


async def model_status(request: Request) -> Response:
    """``GET /v1/models/{name}``: the version's state (``AVAILABLE``, ``LOADING`` or ``END``)."""
    try:
        served = served_of(request.scope)
    except ServingError as err:
        return _answer({"error": str(err)}, err.status)
    state = served.state
    if state.ready.is_set():
        st, status = "AVAILABLE", {"error_code": "OK", "error_message": ""}
    elif state.load_error:
        st, status = "END", {"error_code": "UNKNOWN", "error_message": state.load_error}
    else:
        st, status = "LOADING", {"error_code": "OK", "error_message": ""}
    return _answer({"model_version_status": [{"version": str(served.version), "state": st, "status": status}]})


async def model_metadata(request: Request) -> Response:
    """``GET /v1/models/{name}/metadata``: the signatures (inputs and outputs)."""
    from daskml_scale.serving.protocols.tensors import datatype_of_dtype
    from daskml_scale.serving.protocols.v2 import _output_datatype

    try:
        served = served_of(request.scope)
        require_ready(served.state)
    except ServingError as err:
        return _answer({"error": str(err)}, err.status)
    state = served.state
    spec, bundle = state.spec, state.bundle
    assert spec is not None and bundle is not None
    outputs = {o: _tensor_info(o, _DT.get(_output_datatype(state, o), "DT_FLOAT"), [-1]) for o in bundle.output_names}
    default = {
        "inputs": {c.name: _tensor_info(c.name, _DT.get(datatype_of_dtype(c.dtype), "DT_STRING"), [-1])
                   for c in spec.columns if c.required},
        "outputs": outputs, "method_name": "tensorflow/serving/predict",
    }
    features = {
        "inputs": {"features": _tensor_info("features", "DT_FLOAT", [-1, len(bundle.feature_names)])},
        "outputs": outputs, "method_name": "tensorflow/serving/predict",
    }
    return _answer({
        "model_spec": {"name": served.name, "signature_name": "", "version": str(served.version)},
        "metadata": {"signature_def": {
            "signature_def": {"serving_default": default, "features": features},
            "instance_order": default_order(spec, len(spec.required)),
            "feature_names": bundle.feature_names,
        }},
    })


def _matrix(state: "ServingState", data: Any, what: str) -> np.ndarray:
    if isinstance(data, dict) and set(data) == {"features"}:
        data = data["features"]
    if not isinstance(data, list) or not data or not all(isinstance(r, list) for r in data):
        raise RequestError(400, f"{what}: the 'features' signature takes a list of rows, each a list of "
                           f"{state.features.width} numbers")
    try:
        X = np.array(data, dtype=np.float32)
    except (ValueError, TypeError):
        raise RequestError(422, f"{what}: expected rows of {state.features.width} numbers each") from None
    return state.features.check(X, what)


class PredictEndpoint(Endpoint):
    """``POST /v1/models/{name}[/versions/{version}]:predict``."""

    async def handle(self, served: "Served", scope: "Scope", receive: "Receive") -> tuple[int, list, bytes]:
        state = served.state
        require_ready(state)
        spec = state.spec
        assert spec is not None
        batcher = state.batcher
        batcher.check_room()  # a full queue: 503 at once, before reading the body
        X = None
        with batcher.arrival():
            body = await read_body(state, scope, receive)
            req = parse_json(body, 'a JSON object {"instances": [...]} or {"inputs": ...}')
            if not isinstance(req, dict) or ("instances" in req) == ("inputs" in req):
                raise RequestError(400, "Expected a JSON object with either 'instances' (a list of rows) or 'inputs' "
                                   f"(columns). Received: {str(req)[:120]}")
            signature = req.get("signature_name") or "serving_default"
            if signature not in _SIGNATURES:
                raise RequestError(400, f"Unknown signature_name {signature!r}; this model has {list(_SIGNATURES)}")
            rowwise = "instances" in req
            data = req["instances"] if rowwise else req["inputs"]
            if signature == "features":
                X = _matrix(state, data, "'instances'" if rowwise else "'inputs'")
            elif rowwise:
                if not isinstance(data, list) or not data:
                    raise RequestError(400, "Expected 'instances' to be a non-empty list of rows")
                if all(isinstance(r, dict) for r in data):
                    cols, n = spec.check_records(data), len(data)
                else:
                    cols, n = check_columns(spec, rows_to_columns(spec, data, None, "Instance"), "Input")
            else:
                if not isinstance(data, dict):
                    raise RequestError(400, "Expected 'inputs' to be an object of columns {column: [values...]} "
                                       "(or use signature_name 'features' for a matrix of transformed features)")
                cols, n = check_columns(spec, data, "Input")
        out = await (state.features.submit(X) if X is not None else batcher.submit(cols, n, receive))
        outputs, dropped = split_dropped(out, state.options.on_dropped == "omit")
        names = list(outputs)
        if rowwise:
            if len(names) == 1:
                preds: list[Any] = outputs[names[0]]
            else:
                preds = [dict(zip(names, row)) for row in zip(*outputs.values())]
            if dropped is not None:
                preds = [{**(r if isinstance(r, dict) else {names[0]: r}), "dropped": True} if d else r
                         for r, d in zip(preds, dropped)]
            return json_answer({"predictions": preds})
        result: dict[str, Any] = {"outputs": outputs[names[0]] if len(names) == 1 and dropped is None else
                                  {**outputs, **({"dropped": dropped} if dropped is not None else {})}}
        return json_answer(result)

    def error_body(self, err: ServingError) -> dict[str, Any]:
        return err.to_dict()  # {"error": message, ...} as TensorFlow Serving answers


def routes() -> list[Route]:
    """The TensorFlow Serving routes."""
    predict = PredictEndpoint()
    out: list[Route] = []
    for base in ("/v1/models/{name}", "/v1/models/{name}/versions/{version}"):
        out += [
            Route(base, model_status, methods=["GET"]),
            Route(f"{base}/metadata", model_metadata, methods=["GET"]),
            Route(f"{base}:predict", predict, methods=["POST"]),
        ]
    return out
