"""`POST /v1/chat/completions`: messages (and `tools`) rendered with the ensemble tokenizer's chat
template; a forced tool call's answer comes back as `message.tool_calls` (`server.tool_calls`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from ensemble.protocol import CompletionOutput, RequestOutput
from server.cancellation import run_until_disconnect
from server.client_budgets import ClientId
from server.errors import bad_request
from server.generation import GenerationCall
from server.logprobs import chat_logprobs, member_logprobs
from server.prompts import flatten_messages
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    DeltaMessage,
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
from server.sampling import build_options, check_context
from server.state import Ready, ServerState
from server.structured import AnswerShape, answer_shape
from server.tool_calls import ToolCallStream, tool_calls_from_text, tool_finish_reason
from server.tool_parsing import AutoToolParser

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=GENERATION_RESPONSES)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    """OpenAI chat completions."""
    return await run_until_disconnect(request, _chat(body, request.app.state.chorus, client_of(request)))


async def chat_prompt_ids(ready: Ready, state: ServerState, body) -> list[int]:
    """Token ids of a chat request's rendered conversation (shared with /tokenize)."""
    if body.chat_template is not None and not state.config.trust_request_chat_template:
        raise bad_request(
            "a 'chat_template' in the request is refused: the server was not started with "
            "--trust-request-chat-template", param="chat_template",
        )
    tools = getattr(body, "tools", None)
    text = await ready.tokenization.render_chat(
        body.messages,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        chat_template=body.chat_template,
        chat_template_kwargs=body.chat_template_kwargs,
        tools=[tool.model_dump(mode="json", exclude_none=True) for tool in tools] if tools else None,
    )
    ids = await ready.tokenization.encode(text, body.add_special_tokens)
    if not ids:
        raise bad_request("the rendered conversation has no tokens", param="messages")
    return ids


async def _chat(body: ChatCompletionRequest, state: ServerState, client: ClientId | None = None):
    ready = state.require_ready()
    member = state.check_model(ready, body.model)
    shape = answer_shape(body, engine_supports=bool(ready.engine.info.get("structured_outputs")),
                         tool_parser=state.config.tool_call_parser)  # set only with --enable-auto-tool-choice
    refuse_if_full(ready, body.n or 1, body.priority, client)  # before rendering and tokenizing
    prompt = await chat_prompt_ids(ready, state, body)
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = int(asked) if asked is not None else max(1, ready.max_model_len - len(prompt))
    check_context(len(prompt), max_tokens, ready.max_model_len, "messages")
    options = build_options(body, max_tokens=max_tokens, vocab_size=ready.vocab_size, members=ready.members,
                            structured=shape.structured, member=member)
    request_id = random_id("chatcmpl")
    call = engine_call(state, ready, request_id, [prompt], options, client)
    async with admitted(call) as outputs:
        if body.stream:
            first = await first_output(outputs, call)
            return stream_response(call, _stream(body, ready, call, outputs, first, shape),
                                   state.config.stream_stall_timeout)
        final: RequestOutput | None = None
        async for _, out in outputs:
            final = out
        call.raise_if_stopped()
        assert final is not None, "the engine ended a request without output"
        return _response(body, ready, final, request_id, shape)


def echoed_text(body: ChatCompletionRequest) -> str:
    """vLLM's chat `echo`: the last message's text when it is the role being answered (the
    assistant, or with `add_generation_prompt: false` the last message's own role), else ""."""
    if not body.echo:
        return ""
    last = body.messages[-1]
    role = "assistant" if body.add_generation_prompt else last.role
    if last.role != role:
        return ""
    return flatten_messages([last])[0]["content"]


def _response(body: ChatCompletionRequest, ready: Ready, out: RequestOutput, request_id: str,
              shape: AnswerShape) -> ChatCompletionResponse:
    namer = ready.namer(bool(body.return_tokens_as_token_ids))
    echo = echoed_text(body)
    choices = []
    for c in out.outputs:
        logprobs = None
        if body.logprobs:
            logprobs = chat_logprobs(c.logprobs or [], c.token_ids, namer, body.top_logprobs or 0)
        message, reason = _message(c, shape, echo, ready, body)
        choices.append(ChatCompletionResponseChoice(
            index=c.index, message=message, logprobs=logprobs,
            finish_reason=reason, stop_reason=c.stop_reason,
            member_logprobs=member_logprobs(c.logprobs) if body.return_member_logprobs else None,
        ))
    prompt_tokens = len(out.prompt_token_ids)
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    return ChatCompletionResponse(id=request_id, model=ready.answered_as(body.model), choices=choices,
                                  usage=usage_info(prompt_tokens, completion_tokens))


def _message(c: CompletionOutput, shape: AnswerShape, echo: str, ready: Ready,
             body: ChatCompletionRequest) -> tuple[ChatMessage, str | None]:
    """One finished choice's message and finish reason: its text, or the tool calls read from it."""
    if shape.tools is None:
        return ChatMessage(role="assistant", content=echo + c.text), c.finish_reason
    if shape.tools.mode == "auto":
        parser = AutoToolParser(str(shape.tools.parser), ready.tokenization.tokenizer, body)
        content, calls = parser.extract(c.text)  # (no echo: as streamed, a tool answer has none)
        return (ChatMessage(role="assistant", content=(content or None) if calls else content, tool_calls=calls),
                parser.finish_reason(c.finish_reason))
    calls = tool_calls_from_text(c.text, shape.tools)
    message = (ChatMessage(role="assistant", content=None, tool_calls=calls) if calls
               else ChatMessage(role="assistant", content=echo + c.text))
    return message, tool_finish_reason(shape.tools, calls, c.finish_reason)


class _ChatStream(UsageStream):
    """The chunks of one streamed chat completion (its `n` choices)."""

    response_type = ChatCompletionStreamResponse

    def __init__(self, body: ChatCompletionRequest, ready: Ready, call: GenerationCall, shape: AnswerShape) -> None:
        super().__init__(body, ready, call, len(call.prompts[0]))
        n = call.options.n
        self.tool_streams: list[ToolCallStream | AutoToolParser] | None = None
        if shape.tools is not None and shape.tools.mode == "auto":
            self.tool_streams = [AutoToolParser(str(shape.tools.parser), ready.tokenization.tokenizer, body)
                                 for _ in range(n)]
        elif shape.tools is not None:
            self.tool_streams = [ToolCallStream(shape.tools) for _ in range(n)]
        self.sent_text, self.sent_tokens, self.finished = [0] * n, [0] * n, [False] * n

    def completion_tokens(self) -> int:
        return sum(self.sent_tokens)

    def lead(self) -> list[bytes]:
        """The role first, as OpenAI and vLLM send it, then the echoed last message, if asked for
        (a forced tool call's answer has no content, so nothing is echoed then)."""
        n = self.call.options.n
        role = DeltaMessage(role="assistant", content="")
        events = [self.event([ChatCompletionResponseStreamChoice(index=i, delta=role)]) for i in range(n)]
        echo = echoed_text(self.body) if self.tool_streams is None else ""  # (tool answers: no echo)
        if echo:
            events += [self.event([ChatCompletionResponseStreamChoice(index=i, delta=DeltaMessage(content=echo))])
                       for i in range(n)]
        return events

    def chunks(self, _index: int, out: RequestOutput) -> list[bytes]:
        """The events for what is new in `out`, one per choice that moved."""
        events = []
        for c in out.outputs:
            choice = None if self.finished[c.index] else self._choice(c)
            if choice is not None:
                events.append(self.event([choice]))
        return events

    def _choice(self, c: CompletionOutput) -> ChatCompletionResponseStreamChoice | None:
        """One choice's delta since it was last sent (None when nothing moved)."""
        body, i = self.body, c.index
        new_ids = c.token_ids[self.sent_tokens[i]:]
        delta = c.text[self.sent_text[i]:]
        finishing = c.finish_reason is not None
        if not (new_ids or delta or finishing):
            return None
        entries = (c.logprobs or [])[self.sent_tokens[i]:]
        logprobs = chat_logprobs(entries, new_ids, self.namer, body.top_logprobs or 0) if body.logprobs else None
        members = member_logprobs(entries) if body.return_member_logprobs else None
        self.sent_text[i], self.sent_tokens[i], self.finished[i] = len(c.text), len(c.token_ids), finishing
        reason = c.finish_reason if finishing else None
        if self.tool_streams is not None:
            message = self.tool_streams[i].delta(delta, c.text, finishing, c.token_ids)
            reason = self.tool_streams[i].finish_reason(reason)
        else:
            message = DeltaMessage(content=delta) if (delta or not finishing) else DeltaMessage()
        return ChatCompletionResponseStreamChoice(
            index=i, delta=message, logprobs=logprobs, finish_reason=reason,
            stop_reason=c.stop_reason if finishing else None, member_logprobs=members,
        )


def _stream(body: ChatCompletionRequest, ready: Ready, call: GenerationCall,
            outputs: AsyncIterator[tuple[int, RequestOutput]],
            first: tuple[int, RequestOutput] | None, shape: AnswerShape) -> AsyncIterator[bytes]:
    """The SSE body of a streamed chat completion."""
    stream = _ChatStream(body, ready, call, shape)
    return stream_events(call, first, outputs, stream.chunks, stream.final, stream.lead)
