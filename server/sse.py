"""Server-sent events as OpenAI streams them: `data: <json>\\n\\n` chunks, then `data: [DONE]`.

`SSEResponse` is Starlette's `StreamingResponse` plus an `on_close` coroutine that always runs when
the response ends, however it ends (normal end, client gone, cancelled, or never started): the
route uses it to abort the engine request and free its admission slot, so a stream can never leak
KV cache even if its body generator was never iterated.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

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

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, media_type=self.media_type, headers=SSE_HEADERS)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self._on_close()
