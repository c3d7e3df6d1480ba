"""`tool_choice: "auto"`: vLLM's own tool-call parsers find the calls a model wrote in free text.

With ``serve --enable-auto-tool-choice --tool-call-parser NAME`` (vLLM's flags and parser names,
e.g. ``hermes`` for the ``<tool_call>{...}</tool_call>`` syntax of Qwen2.5's chat template), a chat
request whose `tools` come with `tool_choice` "auto" (OpenAI's default when tools are given) is
answered as the model writes it, unconstrained, and the answer goes through vLLM's parser:

- whole: the text before the first call stays `content`, the calls become `message.tool_calls`
  and `finish_reason` is ``"tool_calls"`` (an answer cut short keeps ``"length"``);
- streamed: the parser's own incremental deltas (content first, then each call's `id`, `name` and
  `arguments` pieces), and at the end whatever arguments it parsed but had not sent yet, as vLLM's
  server does;
- ``parallel_tool_calls: false`` keeps the first call only, as vLLM's server does.

The answer's text is decoded without special tokens. A parser whose call marker is a special token
of the ensemble's tokenizer would never see it, so `check_parser` refuses that pairing when the
server starts (as it refuses a parser that cannot be built on the tokenizer at all).

The parser is vLLM's (`vllm.tool_parsers.ToolParserManager`), given the ensemble's tokenizer and
vLLM's own request model built from the request's tools; nothing of it is re-implemented here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.protocol import ChatCompletionRequest, DeltaMessage
from server.protocol_tools import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall


def tool_parser_names() -> list[str]:
    """The parser names vLLM registers (``--tool-call-parser``)."""
    from vllm.tool_parsers import ToolParserManager

    return sorted(ToolParserManager.list_registered())


def check_tool_parser(name: str) -> None:
    """Raise ValueError naming the choices unless vLLM has a tool-call parser called `name`."""
    names = tool_parser_names()
    if name not in names:
        raise ValueError(f"--tool-call-parser {name!r} is not one of vLLM's parsers: {', '.join(names)}")


def check_parser(name: str, tokenizer: Any) -> None:
    """Raise ValueError unless vLLM's parser `name` can be built on `tokenizer` and its call
    marker (``tool_call_start_token``, where the parser has one) survives decoding, i.e. is not a
    special token there: chorus decodes answers without special tokens."""
    from vllm.tool_parsers import ToolParserManager

    try:
        parser = ToolParserManager.get_tool_parser(name)(tokenizer, [])
    except Exception as err:  # noqa: BLE001  (vLLM's parsers raise what they like on a wrong tokenizer)
        raise ValueError(f"--tool-call-parser {name!r} does not work with this ensemble's tokenizer: {err}") from None
    marker = getattr(parser, "tool_call_start_token", None)
    if isinstance(marker, str) and marker in set(getattr(tokenizer, "all_special_tokens", ())):
        raise ValueError(f"--tool-call-parser {name!r} looks for {marker!r}, a special token of this ensemble's "
                         "tokenizer, which answers are decoded without: it would never find a call")


class AutoToolParser:
    """One answer's vLLM tool parser (the parsers keep per-answer state while streaming)."""

    def __init__(self, name: str, tokenizer: Any, body: ChatCompletionRequest) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VLLMChatRequest
        from vllm.tool_parsers import ToolParserManager

        tools = [tool.model_dump(mode="json", exclude_none=True) for tool in body.tools or ()]
        request = VLLMChatRequest.model_validate({"model": body.model or "chorus", "messages": [],
                                                  "tools": tools, "tool_choice": "auto"})
        self.single = body.parallel_tool_calls is False  # keep the first call only
        self.parser = ToolParserManager.get_tool_parser(name)(tokenizer, request.tools)
        self.request = self.parser.adjust_request(request)
        self.text, self.token_ids = "", []  # what the streaming parser has seen
        self.called = False  # whether a call was found (finish_reason "tool_calls")

    def extract(self, text: str) -> tuple[str | None, list[ToolCall] | None]:
        """A finished answer's content and calls (None: no call in it)."""
        found = self.parser.extract_tool_calls(text, self.request)
        if not found.tools_called:
            return text, None
        self.called = True
        calls = [ToolCall(id=call.id, function=FunctionCall(name=call.function.name, arguments=call.function.arguments))
                 for call in found.tool_calls]
        return found.content, calls[:1] if self.single else calls

    def delta(self, text_delta: str, text: str, finishing: bool, token_ids: Sequence[int] = ()) -> DeltaMessage:
        """The delta message for `text_delta` (`text`, `token_ids`: the answer so far; the parser
        keeps its own copy of the text, `text` is taken for `ToolCallStream.delta`'s signature)."""
        previous_text, previous_ids = self.text, self.token_ids
        self.text, self.token_ids = self.text + text_delta, list(token_ids)
        found = None
        if text_delta or token_ids != previous_ids:
            found = self.parser.extract_tool_calls_streaming(
                previous_text, self.text, text_delta, previous_ids, self.token_ids,
                self.token_ids[len(previous_ids):], self.request)
        content = found.content if found is not None else None
        calls = [DeltaToolCall.model_validate(call.model_dump(exclude_none=True))
                 for call in (found.tool_calls if found is not None else ())
                 if not (self.single and call.index > 0)]
        if finishing and self.parser.prev_tool_call_arr:
            rest = self.parser.get_remaining_unstreamed_args()
            if rest and not (self.single and len(self.parser.prev_tool_call_arr) > 1):
                calls.append(DeltaToolCall(index=len(self.parser.prev_tool_call_arr) - 1,
                                           function=DeltaFunctionCall(arguments=rest)))
        self.called = self.called or bool(calls)
        return DeltaMessage(content=content, tool_calls=calls or None) if (content or calls) else DeltaMessage()

    def finish_reason(self, reason: str | None) -> str | None:
        """``"tool_calls"`` for an answer that stopped after making calls, else the engine's reason
        (a call cut short by ``length`` says so)."""
        return "tool_calls" if self.called and reason == "stop" else reason
