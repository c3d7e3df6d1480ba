"""API-key check as a pure ASGI middleware (no BaseHTTPMiddleware: it would break disconnect
detection and streaming).

When a key is configured every path needs `Authorization: Bearer <key>` except an explicit list of
open ones: `/health`, `/metrics` and the API docs, so probes and scrapers work without the secret.
Deny by default, not protect by prefix: a path the check did not foresee (a `root_path` prefix, a
doubled or percent-encoded slash) needs the key too. The path is compared the way Starlette's router
sees it (`root_path` removed, percent-decoded by the HTTP server). A wrong or missing key gets
OpenAI's 401 body.
"""

from __future__ import annotations

import hmac
import json

from starlette._utils import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import error_body

OPEN_PATHS = frozenset({"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def is_protected(path: str) -> bool:
    """Whether `path` (as the router sees it) needs the API key: every path but `OPEN_PATHS`."""
    return path not in OPEN_PATHS


def key_matches(authorization: str | None, api_key: str) -> bool:
    """Constant-time check of an `Authorization` header value against `api_key`."""
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


class APIKeyMiddleware:
    """Reject requests to protected paths that lack the right bearer token."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        if not api_key:
            raise ValueError("APIKeyMiddleware needs a non-empty api_key")
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or not is_protected(get_route_path(scope)):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if key_matches(headers.get("authorization"), self.api_key):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            error_body(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")
        ).encode()
        await send({
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer"),
            ],
        })
        await send({"type": "http.response.body", "body": body})
