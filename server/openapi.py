"""The OpenAPI document (`/openapi.json`) as the server really answers.

FastAPI's generated document needs two corrections, made once by `install_openapi`:

* it lists a 422 `HTTPValidationError` on every route with a body, but chorus answers validation
  errors with OpenAI's 400 error body (`server.errors`): the 422s and their schemas go;
* it cannot describe the SSE streams of the generation routes: `text/event-stream` gets the schema
  of one event (OpenAPI 3.1 style), whose `data` is `[DONE]` or the JSON of a stream chunk (or of
  an error), with the chunk models added to the components.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.protocol import ChatCompletionStreamResponse, CompletionStreamResponse, ErrorResponse

_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")
_REF = "#/components/schemas/{model}"
# Generation routes and the model of their stream chunks.
STREAM_CHUNKS: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionStreamResponse,
    "/v1/chat/completions": ChatCompletionStreamResponse,
}


def without_validation_422(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with FastAPI's default 422 responses and their component schemas removed (in place)."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if isinstance(operation, dict):
                operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    text = repr(schema.get("paths", {}))
    for name in _FASTAPI_VALIDATION_SCHEMAS:
        if f"#/components/schemas/{name}'" not in text:
            components.pop(name, None)
    return schema


def sse_event_schema(chunk_ref: str) -> dict[str, Any]:
    """One server-sent event of a generation stream: `data` is `[DONE]` or a JSON chunk / error."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"type": "string", "const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"anyOf": [{"$ref": chunk_ref}, {"$ref": _REF.format(model="ErrorResponse")}]},
                    },
                ]
            },
            "event": {"type": "string"},
            "id": {"type": "string"},
        },
    }


def with_event_streams(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with the generation routes' `text/event-stream` responses described (in place)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    models = [*STREAM_CHUNKS.values(), ErrorResponse]
    refs, defs = models_json_schema([(m, "serialization") for m in models], ref_template=_REF)
    for name, definition in defs.get("$defs", {}).items():
        components.setdefault(name, definition)
    for path, model in STREAM_CHUNKS.items():
        ok = schema.get("paths", {}).get(path, {}).get("post", {}).get("responses", {}).get("200")
        if ok is None:
            continue
        chunk_ref = refs[(model, "serialization")]["$ref"]
        ok.setdefault("content", {})["text/event-stream"] = {"schema": sse_event_schema(chunk_ref)}
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve the corrected document (built once, then cached like FastAPI's own)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            with_event_streams(without_validation_422(FastAPI.openapi(app)))  # FastAPI caches it on the app
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
