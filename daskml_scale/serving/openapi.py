"""The OpenAPI 3.1 description of the server, with the record schema from the bundle."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from daskml_scale.io.writers import FORMATS
from daskml_scale.serving.protocols.openapi import protocol_paths, protocol_schemas

__all__ = ["openapi_document"]


def openapi_document(
    *, record_schema: Mapping[str, Any] | None, output_names: Sequence[str], version: str
) -> dict[str, Any]:
    """An OpenAPI 3.1 description of the server's endpoints.

    Parameters
    ----------
    record_schema : mapping or None
        The JSON schema of one input record (``InputSpec.json_schema()``); ``None``
        before the bundle is loaded (an object with no properties).
    output_names : sequence of str
        The prediction's columns (``Bundle.output_names``); ``label`` is a string,
        the others numbers.
    version : str
        The version of daskml_scale, for ``info.version``.

    Returns
    -------
    dict
        The document, ready for JSON.
    """
    record = dict(record_schema) if record_schema is not None else {"type": "object", "properties": {}, "required": []}
    outputs = {name: {"type": "string"} if name == "label" else {"type": "number"} for name in output_names}
    error = {"$ref": "#/components/schemas/Error"}

    def problem(desc: str) -> dict[str, Any]:
        return {"description": desc, "content": {"application/json": {"schema": error}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "daskml_scale model server", "version": version},
        "paths": {
            "/predict": {
                "post": {
                    "summary": "Predict rows (micro-batched)",
                    "parameters": [{
                        "name": "id", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "A field of each record to copy into its prediction",
                    }],
                    "requestBody": {"required": True, "content": {
                        "application/json": {"schema": {"type": "array", "minItems": 1,
                                                        "items": {"$ref": "#/components/schemas/Record"}}},
                        "text/csv": {"schema": {"type": "string"}},
                    }},
                    "responses": {
                        "200": {"description": "One prediction per input row, in order (rows the model's "
                                "transform dropped: null outputs with dropped and reason, or left out under "
                                "on_dropped='omit')", "content": {
                            "application/json": {"schema": {"type": "array",
                                                            "items": {"$ref": "#/components/schemas/Prediction"}}},
                            "text/csv": {"schema": {"type": "string"}},
                        }},
                        "400": problem("Empty or malformed body"),
                        "413": problem("Body over the size limit"),
                        "415": problem("Unsupported content type"),
                        "422": problem("A missing field or a value of the wrong type, or rows the transform "
                                       "dropped under on_dropped='error'"),
                        "401": problem("No bearer token, or the wrong one (when the server has a token)"),
                        "503": problem("The model is not loaded yet, or the queue is full (with Retry-After)"),
                    },
                }
            },
            "/health": {"get": {"summary": "Liveness and readiness", "responses": {
                "200": {"description": "Ready"}, "503": {"description": "Live, not ready"}}}},
            "/info": {"get": {"summary": "Model, versions, schema, outputs, training summary",
                              "responses": {"200": {"description": "The bundle's description"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "Prometheus text format", "content": {"text/plain": {}}}}}},
            "/jobs": {
                "post": {
                    "summary": "Run predict_files on the Dask cluster in the background",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {
                        "type": "object", "required": ["input", "output"], "properties": {
                            "input": {"type": "string", "description": "input URL path or glob"},
                            "output": {"type": "string", "description": "output directory URL"},
                            "format": {"enum": list(FORMATS)},
                            "keep": {"type": "array", "items": {"type": "string"}},
                            "on_dropped": {"enum": ["keep", "omit", "error"]},
                        }}}}},
                    "responses": {"202": {"description": "Accepted; poll GET /jobs/{id}"},
                                  "422": problem("Bad job request"), "503": problem("No cluster configured")},
                },
                "get": {"summary": "List jobs", "responses": {"200": {"description": "Jobs"}}},
            },
            "/jobs/{job_id}": {"get": {
                "summary": "A job's state and report",
                "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The job"}, "404": problem("No such job")},
            }},
            **protocol_paths(problem),
        },
        "components": {"schemas": {
            "Record": record,
            "Prediction": {"type": "object", "properties": {
                **{k: {"type": [v["type"], "null"]} for k, v in outputs.items()},
                "dropped": {"type": "boolean", "description": "present and true when the model's transform dropped "
                            "the row: its outputs are null"},
                "reason": {"type": "string", "description": "why the row has no prediction"},
            }},
            "Error": {"type": "object", "properties": {
                "error": {"type": "string"}, "status": {"type": "integer"}, "field": {"type": "string"},
                "line": {"type": "integer"}}},
            **protocol_schemas(),
        }},
    }

