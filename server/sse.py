"""Server-sent events as OpenAI streams them: `data: <json>\\n\\n` chunks, then `data: [DONE]`.

`SSEResponse` is Starlette's `StreamingResponse` plus an `on_close` coroutine that always runs when
the response ends, however it ends (normal end, client gone, cancelled, or never started): the
route uses it to abort the engine request and free its admission slot, so a stream can never leak
KV cache even if its body generator was never iterated.

A client that stops reading is cut off: events are made only as the connection takes them (the
HTTP server's `send` waits while the socket's buffers are full), so at most one event waits per
stream, and a `send` that waits longer than `stall_timeout` seconds ends the stream (`on_close`
gets the reason `slow_client`) instead of holding a running sequence for a reader who never comes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger("chorus.server")

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_data(payload: BaseModel | dict[str, Any]) -> bytes:
    """One SSE event holding `payload` as JSON."""
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json()
    else:
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


class SSEResponse(StreamingResponse):
    """A `text/event-stream` response whose `on_close` always runs, shielded from cancellation."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[str], Awaitable[None]],
                 stall_timeout: float | None = None) -> None:
        super().__init__(content, media_type=self.media_type, headers=SSE_HEADERS)
        self._on_close = on_close
        self._stall_timeout = stall_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reason = "client_disconnect"

        async def send_in_time(message: Message) -> None:
            with anyio.move_on_after(self._stall_timeout) as scope_:
                await send(message)
            if scope_.cancelled_caught:
                raise _Stalled()

        try:
            await super().__call__(scope, receive, send if self._stall_timeout is None else send_in_time)
        except BaseException as err:
            if not _only_stalls(err):
                raise
            reason = "slow_client"
            log.warning("a stream's client read nothing for %.0f s: stream ended, its sequences aborted",
                        self._stall_timeout)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self._on_close(reason)


class _Stalled(Exception):
    """The client did not take a stream event within the stall timeout."""


def _only_stalls(err: BaseException) -> bool:
    """Whether `err` is a stall (possibly wrapped in task-group exception groups)."""
    if isinstance(err, BaseExceptionGroup):
        return all(_only_stalls(e) for e in err.exceptions)
    return isinstance(err, _Stalled)
