"""The protocol endpoints in the server's OpenAPI document (see ``serving.openapi``)."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["protocol_paths", "protocol_schemas"]

_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "The served model's name (the bundle file's name without .bundle, or --model-name)"}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string", "enum": ["1"]}}


def _ok(desc: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": desc}
    if schema is not None:
        out["content"] = {"application/json": {"schema": schema}}
    return out


def protocol_schemas() -> dict[str, Any]:
    """Component schemas of the protocols' bodies."""
    tensor = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": {"type": "string"},
        "datatype": {"enum": ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                              "FP16", "FP32", "FP64", "BYTES"]},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "data": {"type": "array", "description": "flat or nested, row-major; absent with parameters.binary_data_size"},
        "parameters": {"type": "object"},
    }}
    return {
        "V2Tensor": tensor,
        "V2InferenceRequest": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "properties": {
                "content_type": {"enum": ["pd", "np"], "description": "pd: one input per column (the default); np: "
                                 "one FP32 matrix [rows, n_features] of transformed features"},
                "binary_data_output": {"type": "boolean"}}},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/V2Tensor"}},
            "outputs": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "parameters": {"type": "object", "properties": {
                    "binary_data": {"type": "boolean"}}}}}},
        }},
        "V2InferenceResponse": {"type": "object", "properties": {
            "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
            "parameters": {"type": "object"},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/V2Tensor"}}}},
        "TFPredictRequest": {"type": "object", "properties": {
            "signature_name": {"enum": ["serving_default", "features"]},
            "instances": {"type": "array", "description": "rows: objects keyed by column, or lists of values in the "
                          "metadata's instance_order (signature features: lists of n_features numbers)"},
            "inputs": {"description": "columns: {column: [values...]} (signature features: the matrix)"}}},
        "MLflowInvocation": {"type": "object", "description": "exactly one of the four formats; params is ignored",
                             "properties": {
            "dataframe_split": {"type": "object", "properties": {
                "columns": {"type": "array", "items": {"type": "string"}},
                "data": {"type": "array", "items": {"type": "array"}}}},
            "dataframe_records": {"type": "array", "items": {"$ref": "#/components/schemas/Record"}},
            "instances": {"type": "array"},
            "inputs": {"description": "{column: [values...]} or a list of rows"},
            "params": {"type": "object"}}},
    }


def protocol_paths(problem: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """The paths of the v2, TensorFlow Serving and MLflow endpoints."""
    ref = "#/components/schemas/"
    errors = {"400": problem("Malformed request"), "404": problem("No such model or version"),
              "413": problem("Body over the size limit"),
              "422": problem("A missing column, a value of the wrong type, or a feature matrix of the wrong width"),
              "401": problem("No bearer token, or the wrong one (when the server has a token)"),
              "503": problem("The model is not loaded yet, or the queue is full (with Retry-After)")}
    paths: dict[str, Any] = {
        "/v2": {"get": {"summary": "v2 server metadata", "responses": {"200": _ok("name, version, extensions")}}},
        "/v2/health/live": {"get": {"summary": "v2 liveness", "responses": {"200": _ok("Live")}}},
        "/v2/health/ready": {"get": {"summary": "v2 readiness", "responses": {
            "200": _ok("Ready"), "503": problem("Loading, or failed to load")}}},
        "/ping": {"get": {"summary": "MLflow liveness", "responses": {"200": _ok("Ready"), "503": _ok("Not ready")}}},
        "/version": {"get": {"summary": "MLflow: the server's version", "responses": {
            "200": {"description": "version", "content": {"text/plain": {}}}}}},
        "/invocations": {"post": {
            "summary": "MLflow scoring (micro-batched with every other dialect)",
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"$ref": ref + "MLflowInvocation"}},
                "text/csv": {"schema": {"type": "string"}}}},
            "responses": {"200": _ok("{\"predictions\": [one object per row]}"), **errors,
                          "415": problem("Unsupported content type")},
        }},
    }
    named = {"parameters": [_NAME]}
    paths["/models"] = {"get": {"summary": "The served models: version, state, URL, content hash, last reload error",
                                "responses": {"200": _ok("{\"default\": name, \"models\": [...]}")}}}
    paths["/models/{name}/predict"] = {"post": {**named, "summary": "POST /predict for the model {name}",
                                                "responses": {"200": _ok("As POST /predict"), **errors}}}
    for what in ("info", "metrics", "health"):
        paths[f"/models/{{name}}/{what}"] = {"get": {**named, "summary": f"GET /{what} of the model {{name}}",
                                                     "responses": {"200": _ok(f"As GET /{what}"), "404": errors["404"]}}}
    paths["/v2/repository/index"] = {"post": {"summary": "v2 model repository: every model and its state",
                                              "responses": {"200": _ok("[{name, version, state, reason, ...}]")}}}
    paths["/v2/repository/models/{name}/load"] = {"post": {
        **named, "summary": "Load a new version (parameters.url, else the model's URL again) and swap it in once ready, "
        "without failing a request in flight; a new name with a URL adds a model",
        "requestBody": {"required": False, "content": {"application/json": {"schema": {"type": "object", "properties": {
            "parameters": {"type": "object", "properties": {"url": {"type": "string"}}}}}}}},
        "responses": {"200": _ok("The model's new version"), "400": errors["400"], "404": errors["404"],
                      "422": problem("The new version failed to load; the old one goes on serving")}}}
    paths["/v2/repository/models/{name}/unload"] = {"post": {
        **named, "summary": "Stop serving a model (not the default) once its requests are done",
        "responses": {"200": _ok("Unloaded"), "400": errors["400"], "404": errors["404"]}}}
    for base, params in (("/v2/models/{name}", [_NAME]), ("/v2/models/{name}/versions/{version}", [_NAME, _VERSION])):
        paths[base] = {"get": {"summary": "v2 model metadata", "parameters": params,
                               "responses": {"200": _ok("name, versions, inputs, outputs"), "404": errors["404"]}}}
        paths[f"{base}/ready"] = {"get": {"summary": "v2 model readiness", "parameters": params, "responses": {
            "200": _ok("Ready"), "503": problem("Not ready"), "404": errors["404"]}}}
        paths[f"{base}/infer"] = {"post": {
            "summary": "v2 inference: one input per column, or one FP32 matrix of transformed features",
            "parameters": [*params, {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                                     "schema": {"type": "integer"},
                                     "description": "binary tensor extension: the JSON header's length"}],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"$ref": ref + "V2InferenceRequest"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                             "description": "JSON header, then binary tensors"}}},
            "responses": {"200": {"description": "One output per prediction column, shape [rows, 1]", "content": {
                "application/json": {"schema": {"$ref": ref + "V2InferenceResponse"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}, **errors},
        }}
    for base, params in (("/v1/models/{name}", [_NAME]), ("/v1/models/{name}/versions/{version}", [_NAME, _VERSION])):
        paths[base] = {"get": {"summary": "TensorFlow Serving model status", "parameters": params, "responses": {
            "200": _ok("model_version_status"), "404": errors["404"]}}}
        paths[f"{base}/metadata"] = {"get": {"summary": "TensorFlow Serving signatures", "parameters": params,
                                             "responses": {"200": _ok("model_spec, metadata"), "404": errors["404"]}}}
        paths[f"{base}:predict"] = {"post": {
            "summary": "TensorFlow Serving predict (row format: instances; columnar: inputs)", "parameters": params,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": ref + "TFPredictRequest"}}}},
            "responses": {"200": _ok("{\"predictions\": [...]} or {\"outputs\": ...}"), **errors},
        }}
    return paths
