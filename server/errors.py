"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

`APIError` is what route code raises; the handlers installed by `install_error_handlers` turn it,
FastAPI's validation errors (bad JSON, wrong types, out-of-range values: all 400, as OpenAI and
vLLM answer), Starlette's HTTP errors (404, 405) and `EngineRequestError` into that shape.
Anything else is a bug in chorus and becomes a 500 with the same shape.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ensemble.protocol import EngineRequestError
from server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("chorus.server")

# HTTP status -> OpenAI error `type`.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """An error answered to the client with `status` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The JSON body: `{"error": {...}}`."""
        return error_body(self.status, self.message, param=self.param, code=self.code)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 `invalid_request_error`."""
    return APIError(400, message, param=param, code=code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object for `status`."""
    info = ErrorInfo(message=message, type=_TYPES.get(status, "invalid_request_error"), param=param, code=code)
    return ErrorResponse(error=info).model_dump()


async def send_error(send: Any, status: int, message: str, *, code: str,
                     headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Answer OpenAI's error JSON straight from an ASGI middleware (before any route runs), with
    `headers` beside the content type and length."""
    body = json.dumps(error_body(status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def internal_error(what: str, exc: BaseException) -> APIError:
    """A 500 that tells the client nothing about the server's insides: the detail (exception,
    traceback) goes to the log under a fresh error id, and the client gets that id to quote."""
    error_id = f"err-{uuid.uuid4().hex[:16]}"
    log.error("%s [%s]", what, error_id, exc_info=exc)
    return APIError(500, f"{what}; the server log has the details under id {error_id}", code=error_id)


def engine_dead_error(detail: str | None = None) -> APIError:
    """The 503 every request gets once the engine has died (see `server.app`'s watchdog)."""
    why = f" ({detail})" if detail else ""
    return APIError(503, f"the engine has died{why}; the server is stopping and needs a restart",
                    code="engine_dead")


def error_response(err: APIError) -> JSONResponse:
    """A JSONResponse for `err`."""
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line for a request validation failure, and the offending parameter."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    # FastAPI prefixes body errors with "body"; union members add their type name to the path.
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"request body is not valid JSON: {ctx.get('error', first.get('msg'))}", None
    if first.get("type") in ("invalid_unicode", "too_many_items"):  # server.protocol_base.RequestBody
        return first.get("msg", "invalid Unicode text"), (first.get("ctx") or {}).get("param")
    if first.get("type") == "missing" and not loc:
        return "request body is missing or empty", None
    param = _param_name(loc)
    msg = first.get("msg", "invalid value")
    where = f"'{param}'" if param else "request body"
    extra = f" ({len(errors)} problems in all)" if len(errors) > 1 and not _same_param(errors, loc) else ""
    return f"{where}: {msg}{extra}", param


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _param_name(loc: list[str]) -> str | None:
    """`['prompt', 'list[int]', '3']` -> 'prompt[3]'; union member tags (`constrained-str`,
    `list[int]`, `function-after[...]`) dropped."""
    parts: list[str] = []
    for part in loc:
        if part.isdigit():
            parts.append(f"[{part}]")
        elif part.isidentifier() and part not in _TYPE_TAGS:
            parts.append(("." if parts else "") + part)
    return "".join(parts) or None


def _same_param(errors: list[dict], loc: list[str]) -> bool:
    """True when all errors are about the first error's top-level field (union alternatives)."""
    top = loc[0] if loc else None
    return all([str(p) for p in e.get("loc", ()) if p != "body"][:1] == [top] for e in errors)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(exc)
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(EngineRequestError)
    async def _engine_request_error(_: Request, exc: EngineRequestError) -> JSONResponse:
        return error_response(APIError(400, str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail), headers=exc.headers))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(internal_error("internal error while serving a request", exc))
