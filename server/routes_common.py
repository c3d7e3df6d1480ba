"""Plumbing shared by the generation routes: starting a `GenerationCall`, turning its failures into
OpenAI errors, handing a stream's cleanup to its response, and a streamed answer's usage
accounting (`UsageStream`)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import anyio
from starlette.requests import Request

from ensemble.protocol import EngineRequestError, RequestOutput, SamplingOptions
from server.client_budgets import ClientId
from server.engines import engine_healthy
from server.errors import APIError, bad_request, engine_dead_error, internal_error
from server.generation import DeadlineExceeded, GenerationCall
from server.limits import QueueFullError
from server.protocol import ErrorResponse, UsageInfo
from server.sse import DONE, SSEResponse, sse_data
from server.state import Ready, ServerState

log = logging.getLogger("chorus.server")

OPENAI_ERRORS = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in {
        400: "Invalid request (validation, context length, unsupported parameter)",
        401: "Missing or wrong API key",
        404: "Unknown model",
        429: "Queue full",
        503: "Engine loading or server shutting down",
        504: "Request timed out",
    }.items()
}


def openai_errors(*statuses: int) -> dict[int | str, dict]:
    """The OpenAPI `responses` entries for these error statuses."""
    return {s: OPENAI_ERRORS[s] for s in statuses}


# The generation routes: JSON, or with "stream": true an SSE stream of chunks ending in [DONE].
GENERATION_RESPONSES: dict[int | str, dict] = {
    200: {
        "description": "The completion; with `stream: true`, server-sent events of chunks, then `data: [DONE]`.",
        "content": {"text/event-stream": {}},  # each event's schema: server.openapi.with_event_streams
    },
    **openai_errors(400, 401, 404, 429, 503, 504),
}


def refuse_if_full(ready: Ready, sequences: int, priority: int = 0, client: ClientId | None = None) -> None:
    """Before any work (tokenizing): 400 for a `priority` the engine cannot honour, 429 when
    admission (the `client`'s own, then the server's) would refuse `sequences` anyway."""
    policy = ready.engine.info.get("scheduling_policy")
    if priority and policy != "priority":
        raise bad_request(f"'priority' {priority} needs an engine that schedules by priority (vLLM: "
                          f"--scheduling-policy priority); this one schedules {policy or 'first come, first served'}",
                          param="priority")
    try:
        budget = ready.client_budgets.get(client)
        if budget is not None:
            budget.check(sequences, priority)
            ready.client_budgets.check_waiting(client, sequences)
        ready.admission.check(sequences, priority)
    except QueueFullError as err:
        ready.metrics.queue_rejections.inc()
        raise _as_api_error(err) from None


def engine_call(state: ServerState, ready: Ready, request_id: str, prompts: list[list[int]],
                options: SamplingOptions, client: ClientId | None = None) -> GenerationCall:
    """A new call for `prompts` (not yet admitted), for `client` (its budget, if it has one)."""
    return GenerationCall(ready.engine, ready.admission, ready.metrics, request_id, prompts, options,
                          state.config.request_timeout, state.calls,
                          client_admission=ready.client_budgets.get(client))


def client_of(request: Request) -> ClientId | None:
    """Who sent the request: the client whose key it carried (`server.auth`), else its peer address."""
    name = getattr(request.state, "chorus_client", None)
    if name is not None:
        return ClientId("key", name)
    return ClientId("address", request.client.host) if request.client else None


def _as_api_error(err: BaseException) -> APIError:
    if isinstance(err, APIError):
        return err
    if isinstance(err, QueueFullError):
        return APIError(429, str(err), code="queue_full", headers={"Retry-After": "1"})
    if isinstance(err, DeadlineExceeded):
        return APIError(504, str(err), code="request_timeout")
    if isinstance(err, EngineRequestError):
        return APIError(400, str(err))
    return internal_error("the engine failed on this request", err)


def _abort_reason(err: BaseException | None) -> str | None:
    if err is None:
        return None
    if isinstance(err, anyio.get_cancelled_exc_class()):
        return "client_disconnect"
    if isinstance(err, DeadlineExceeded) or (isinstance(err, APIError) and err.status == 504):
        return "timeout"
    return "error"


async def _mapped(call: GenerationCall) -> AsyncIterator[tuple[int, RequestOutput]]:
    """`call.outputs()` with failures closed and turned into APIError."""
    try:
        async for item in call.outputs():
            yield item
    except (DeadlineExceeded, EngineRequestError, Exception) as err:  # noqa: BLE001
        with anyio.CancelScope(shield=True):
            await call.close(_abort_reason(err))
            problem = None if isinstance(err, (DeadlineExceeded, EngineRequestError, APIError)) else (
                await engine_healthy(call.engine))
        if problem is not None:  # the engine died under this request: 503, as /health says
            log.error("request %s failed because the engine died: %s", call.request_id, problem)
            raise engine_dead_error(problem) from None
        raise _as_api_error(err) from None


@asynccontextmanager
async def admitted(call: GenerationCall) -> AsyncIterator[AsyncIterator[tuple[int, RequestOutput]]]:
    """Admit `call` and yield its outputs; close it on exit unless a stream response took it over.

    Queue full -> 429, timeout while queued -> 504, engine refusal -> 400.
    """
    try:
        await call.admit()
    except (QueueFullError, DeadlineExceeded) as err:
        with anyio.CancelScope(shield=True):
            await call.close(None)
        raise _as_api_error(err) from None
    except BaseException:
        with anyio.CancelScope(shield=True):
            await call.close("client_disconnect")
        raise
    try:
        yield _mapped(call)
    except BaseException as err:
        with anyio.CancelScope(shield=True):
            await call.close(_abort_reason(err))
        raise
    else:
        if not getattr(call, "owned_by_response", False):
            with anyio.CancelScope(shield=True):
                await call.close(None)


async def first_output(outputs: AsyncIterator[tuple[int, RequestOutput]],
                       call: GenerationCall) -> tuple[int, RequestOutput] | None:
    """The first output, so that errors before any token still get a proper HTTP status."""
    async for item in outputs:
        return item
    call.raise_if_stopped()
    return None


def stream_response(call: GenerationCall, body: AsyncIterator[bytes], stall_timeout: float | None) -> SSEResponse:
    """An SSE response that owns `call` from now on and closes it when the stream ends (a client
    that reads nothing for `stall_timeout` seconds is cut off, its sequences aborted)."""
    call.owned_by_response = True

    async def on_close(reason: str) -> None:
        await call.close(reason)

    return SSEResponse(body, on_close, stall_timeout)


def stream_error_event(err: APIError) -> bytes:
    """An error inside an already started stream, as vLLM sends it: `data: {"error": ...}`."""
    return sse_data(err.body())


async def stream_events(
    call: GenerationCall,
    first: tuple[int, RequestOutput] | None,
    outputs: AsyncIterator[tuple[int, RequestOutput]],
    chunks: Callable[[int, RequestOutput], list[bytes]],
    final: Callable[[], bytes | None],
    lead: Callable[[], Iterable[bytes]] = tuple,
) -> AsyncIterator[bytes]:
    """The SSE body of a streamed generation: `lead()`'s events, the `chunks` of every engine
    output (`first`, already awaited, then the rest of `outputs`), `final()` (the usage chunk, or
    None), then ``[DONE]``; an `APIError` on the way (a stopped call, a dead engine) becomes an
    error event before ``[DONE]``, as vLLM sends it."""
    try:
        for event in lead():
            yield event
        if first is not None:
            for event in chunks(*first):
                yield event
        async for index, out in outputs:
            for event in chunks(index, out):
                yield event
        call.raise_if_stopped()
        tail = final()
        if tail is not None:
            yield tail
    except APIError as err:
        yield stream_error_event(err)
    yield DONE


def usage_info(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    """The `usage` block of an answer."""
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


class UsageStream:
    """The parts every streamed generation shares: the chunk envelope (request id, creation time,
    model) and the usage accounting of ``stream_options`` (``include_usage``: a last chunk with the
    totals, `final`; ``continuous_usage_stats``: the running totals on every chunk too).

    A subclass sets `response_type` (the chunk model) and says how many tokens it has sent
    (`completion_tokens`)."""

    response_type: ClassVar[type]

    def __init__(self, body: Any, ready: Ready, call: GenerationCall, prompt_tokens: int) -> None:
        self.body, self.ready, self.call = body, ready, call
        self.created = int(time.time())
        self.namer = ready.namer(bool(body.return_tokens_as_token_ids))
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.continuous = self.include_usage and bool(body.stream_options.continuous_usage_stats)
        self.prompt_tokens = prompt_tokens

    def completion_tokens(self) -> int:
        """The tokens sent so far, over all choices."""
        raise NotImplementedError

    def usage(self) -> UsageInfo:
        return usage_info(self.prompt_tokens, self.completion_tokens())

    def event(self, choices: list[Any], usage: UsageInfo | None = None) -> bytes:
        """One chunk of `choices`, with the running usage when ``continuous_usage_stats`` asks for it."""
        return sse_data(self.response_type(
            id=self.call.request_id, created=self.created, model=self.ready.answered_as(self.body.model),
            choices=choices, usage=usage or (self.usage() if self.continuous else None),
        ))

    def final(self) -> bytes | None:
        """The usage chunk that ends the stream, when asked for."""
        return self.event([], self.usage()) if self.include_usage else None
