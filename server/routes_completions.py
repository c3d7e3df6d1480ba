"""`POST /v1/completions`: plain prompts (string, strings, token ids, lists of ids), streaming or not."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from ensemble.protocol import CompletionOutput, RequestOutput
from server.cancellation import run_until_disconnect
from server.client_budgets import ClientId
from server.errors import bad_request
from server.generation import GenerationCall
from server.logprobs import completion_logprobs, member_logprobs
from server.prompts import Prompt
from server.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    prompt_count,
    random_id,
)
from server.routes_common import (
    GENERATION_RESPONSES,
    UsageStream,
    admitted,
    client_of,
    engine_call,
    first_output,
    refuse_if_full,
    stream_events,
    stream_response,
    usage_info,
)
from server.sampling import build_options, check_context, check_sequences
from server.state import Ready, ServerState
from server.structured import answer_shape

router = APIRouter()


@router.post("/v1/completions", response_model=CompletionResponse, responses=GENERATION_RESPONSES)
async def create_completion(body: CompletionRequest, request: Request):
    """OpenAI completions."""
    return await run_until_disconnect(request, _completion(body, request.app.state.chorus, client_of(request)))


async def _completion(body: CompletionRequest, state: ServerState, client: ClientId | None = None):
    ready = state.require_ready()
    member = state.check_model(ready, body.model)
    max_tokens = int(body.max_tokens if body.max_tokens is not None else 16)
    if max_tokens == 0 and not body.echo:
        raise bad_request("max_tokens must be at least 1, got 0 (0 is only allowed with 'echo': true, "
                          "which returns the prompt alone)", param="max_tokens")
    check_sequences(prompt_count(body.prompt), body.n)  # before tokenizing anything
    shape = answer_shape(body, engine_supports=bool(ready.engine.info.get("structured_outputs")))
    refuse_if_full(ready, prompt_count(body.prompt) * body.n, body.priority, client)
    prompts = await ready.tokenization.completion_prompts(body.prompt, body.add_special_tokens, ready.vocab_size)
    # Echo without generation runs one engine step, as vLLM does, and drops its token.
    engine_tokens = max(max_tokens, 1)
    check_context(max(len(p.token_ids) for p in prompts), engine_tokens, ready.max_model_len, "prompt")
    options = build_options(body, max_tokens=engine_tokens, vocab_size=ready.vocab_size, members=ready.members,
                            structured=shape.structured, member=member)
    request_id = random_id("cmpl")
    call = engine_call(state, ready, request_id, [p.token_ids for p in prompts], options, client)
    async with admitted(call) as outputs:
        if max_tokens == 0:
            outputs = _prompt_only(outputs)
        if body.stream:
            first = await first_output(outputs, call)
            body_iter = _stream(body, ready, call, prompts, outputs, first)
            return stream_response(call, body_iter, state.config.stream_stall_timeout)
        finals: dict[int, RequestOutput] = {}
        async for index, out in outputs:
            finals[index] = out
        return _response(body, ready, call, prompts, finals, request_id)


async def _prompt_only(outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """`outputs` with the generated tokens removed (`max_tokens: 0` with `echo`): every completion
    is empty and, once the engine step is done, finished for `length` (or `abort`)."""
    async for index, out in outputs:
        yield index, dataclasses.replace(out, outputs=[
            CompletionOutput(index=c.index, text="", token_ids=[], logprobs=None if c.logprobs is None else [],
                             finish_reason=None if c.finish_reason is None else
                             "abort" if c.finish_reason == "abort" else "length")
            for c in out.outputs
        ])


def _response(body: CompletionRequest, ready: Ready, call: GenerationCall, prompts: list[Prompt],
              finals: dict[int, RequestOutput], request_id: str) -> CompletionResponse:
    call.raise_if_stopped()
    namer = ready.namer(bool(body.return_tokens_as_token_ids))
    n = call.options.n
    choices = []
    completion_tokens = 0
    for i, prompt in enumerate(prompts):
        out = finals[i]
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            text = c.text
            logprobs = None
            if body.logprobs is not None:
                if body.echo:
                    entries = list(out.prompt_logprobs or [None] * len(prompt.token_ids))
                    logprobs = completion_logprobs(entries + list(c.logprobs or []),
                                                   prompt.token_ids + c.token_ids, namer)
                else:
                    logprobs = completion_logprobs(c.logprobs or [], c.token_ids, namer)
            if body.echo:
                text = prompt.text + text
            choices.append(CompletionResponseChoice(
                index=i * n + c.index, text=text, logprobs=logprobs, finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                member_logprobs=member_logprobs(c.logprobs) if body.return_member_logprobs else None,
            ))
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    return CompletionResponse(
        id=request_id, model=ready.answered_as(body.model), choices=sorted(choices, key=lambda ch: ch.index),
        usage=usage_info(prompt_tokens, completion_tokens),
    )


class _ChoiceState:
    """What has been sent so far for one choice of a stream."""

    __slots__ = ("text_len", "tokens", "offset", "started", "finished")

    def __init__(self) -> None:
        self.text_len = 0
        self.tokens = 0
        self.offset = 0
        self.started = False
        self.finished = False


class _CompletionStream(UsageStream):
    """The chunks of one streamed completion request (all its prompts and choices)."""

    response_type = CompletionStreamResponse

    def __init__(self, body: CompletionRequest, ready: Ready, call: GenerationCall, prompts: list[Prompt]) -> None:
        super().__init__(body, ready, call, sum(len(p.token_ids) for p in prompts))
        self.prompts = prompts
        self.states: dict[tuple[int, int], _ChoiceState] = {}

    def completion_tokens(self) -> int:
        return sum(st.tokens for st in self.states.values())

    def chunks(self, index: int, out: RequestOutput) -> list[bytes]:
        """The events for what is new in `out` (prompt `index`), one per choice that moved."""
        events = []
        for c in out.outputs:
            st = self.states.setdefault((index, c.index), _ChoiceState())
            if st.finished:
                continue
            choice = self._choice(index, out, c, st)
            if choice is not None:
                events.append(self.event([choice]))
        return events

    def _choice(self, index: int, out: RequestOutput, c: CompletionOutput,
                st: _ChoiceState) -> CompletionResponseChoice | None:
        """One choice's delta since `st` (None when nothing moved); advances `st`."""
        body, prompt = self.body, self.prompts[index]
        new_ids = c.token_ids[st.tokens:]
        delta = c.text[st.text_len:]
        finishing = c.finish_reason is not None
        echo = body.echo and not st.started
        if not (new_ids or delta or finishing or echo):
            return None
        logprobs: CompletionLogProbs | None = None
        if body.logprobs is not None:
            entries = list((c.logprobs or [])[st.tokens:])
            ids = list(new_ids)
            if echo:
                entries = list(out.prompt_logprobs or [None] * len(prompt.token_ids)) + entries
                ids = prompt.token_ids + ids
            logprobs = completion_logprobs(entries, ids, self.namer, initial_offset=st.offset)
        text = (prompt.text if echo else "") + delta
        st.started, st.offset, st.text_len, st.tokens, st.finished = (
            True, st.offset + len(text), len(c.text), len(c.token_ids), finishing)
        return CompletionResponseChoice(
            index=index * self.call.options.n + c.index, text=text, logprobs=logprobs,
            finish_reason=c.finish_reason if finishing else None,
            stop_reason=c.stop_reason if finishing else None,
            member_logprobs=(member_logprobs((c.logprobs or [])[len(c.token_ids) - len(new_ids):])
                             if body.return_member_logprobs else None),
        )


def _stream(body: CompletionRequest, ready: Ready, call: GenerationCall, prompts: list[Prompt],
            outputs: AsyncIterator[tuple[int, RequestOutput]],
            first: tuple[int, RequestOutput] | None) -> AsyncIterator[bytes]:
    """The SSE body of a streamed completion request."""
    stream = _CompletionStream(body, ready, call, prompts)
    return stream_events(call, first, outputs, stream.chunks, stream.final)
