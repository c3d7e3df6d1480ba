"""A limit on request body size, as a pure ASGI middleware.

A body over `max_bytes` is refused with OpenAI's error JSON and HTTP 413 before anything parses it:
at once from its `Content-Length`, or, for a chunked body, as soon as the bytes read pass the
limit. Bodies under the limit are read here and replayed to the app, which would read them whole
anyway (FastAPI parses JSON from the full body); later `receive` calls (the client's disconnect)
pass straight through.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import send_error

_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


async def _send_413(send: Send, max_bytes: int) -> None:
    await send_error(send, 413, f"request body is larger than the server's limit of {max_bytes} bytes (--max-body-mb)",
                     code="request_too_large", headers=[(b"connection", b"close")])


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with a 413."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in _NO_BODY:
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _send_413(send, self.max_bytes)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_413(send, self.max_bytes)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that returns `messages` first, then defers to `receive`."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
