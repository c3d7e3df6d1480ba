"""Stop a handler when its client goes away (vLLM's `with_cancellation`, as a plain function).

The handler coroutine runs as a task raced against a listener for `http.disconnect`. If the
client disconnects first, the handler task is cancelled; its `finally` blocks abort the engine
requests. Once a handler returns a streaming response, the response itself watches for the
disconnect (Starlette's `StreamingResponse` does) and `server.sse.SSEResponse` cleans up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import Request
from starlette.responses import Response

T = TypeVar("T")

# 499: nginx's "client closed request"; nobody reads it, but logs show why the request ended.
CLIENT_CLOSED = 499


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, handler: Coroutine[Any, Any, T]) -> T | Response:
    """Await `handler`, cancelling it if the client disconnects first (then answer 499)."""
    handler_task = asyncio.ensure_future(handler)
    listener = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({handler_task, listener}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        handler_task.cancel()
        listener.cancel()
        raise
    if handler_task in done:
        listener.cancel()
        return handler_task.result()
    handler_task.cancel()
    try:
        await handler_task
    except asyncio.CancelledError:
        pass
    except Exception:  # noqa: BLE001 - the client is gone; nothing to report to
        pass
    return Response(status_code=CLIENT_CLOSED)
