"""API-key check as a pure ASGI middleware (no BaseHTTPMiddleware: it would break disconnect
detection and streaming).

When a key is configured every path needs `Authorization: Bearer <key>` except an explicit list of
open ones: `/health`, `/metrics` and the API docs, so probes and scrapers work without the secret.
Deny by default, not protect by prefix: a path the check did not foresee (a `root_path` prefix, a
doubled or percent-encoded slash) needs the key too. The path is compared the way Starlette's router
sees it (`root_path` removed, percent-decoded by the HTTP server). A wrong or missing key gets
OpenAI's 401 body.

Besides the server's own key, each client of a keys file (`server.clients`) has one; the name of
the client whose key matched (None for the server's own key) is left in the request's state as
``chorus_client``, where the routes find its admission budget.
"""

from __future__ import annotations

import hmac

from starlette._utils import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from server.clients import ClientKey
from server.errors import send_error

OPEN_PATHS = frozenset({"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def is_protected(path: str) -> bool:
    """Whether `path` (as the router sees it) needs the API key: every path but `OPEN_PATHS`."""
    return path not in OPEN_PATHS


def key_matches(authorization: str | None, api_key: str) -> bool:
    """Constant-time check of an `Authorization` header value against `api_key`."""
    return matching_client(authorization, {api_key: None})[0]


def authorization_header(scope: Scope) -> str | None:
    """The request's `Authorization` header (the last one, if it has several)."""
    value = None
    for key, raw in scope.get("headers", []):
        if key.lower() == b"authorization":
            value = raw.decode("latin-1")
    return value


def _bearer(header: str | None) -> bytes | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" else None


def matching_client(authorization: str | None, keys: dict[str, str | None]) -> tuple[bool, str | None]:
    """(whether the bearer token is one of `keys`, the client it names): every key is compared,
    in constant time each, so the answer's timing does not tell which key came close."""
    token = _bearer(authorization)
    if token is None:
        return False, None
    found, client = False, None
    for key, name in keys.items():
        if hmac.compare_digest(token, key.encode()):
            found, client = True, name
    return found, client


class APIKeyMiddleware:
    """Reject requests to protected paths that lack the right bearer token."""

    def __init__(self, app: ASGIApp, api_key: str | None, clients: tuple[ClientKey, ...] = ()) -> None:
        if not api_key and not clients:
            raise ValueError("APIKeyMiddleware needs a non-empty api_key or client keys")
        self.app = app
        self.keys: dict[str, str | None] = {c.key: c.name for c in clients}
        if api_key:
            self.keys[api_key] = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or not is_protected(get_route_path(scope)):
            await self.app(scope, receive, send)
            return
        found, client = matching_client(authorization_header(scope), self.keys)
        if found:
            scope.setdefault("state", {})["chorus_client"] = client
            await self.app(scope, receive, send)
            return
        await send_error(send, 401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                         code="invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])
