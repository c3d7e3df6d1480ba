"""A forced tool call's answer read back as OpenAI's `message.tool_calls`, whole or streamed.

The grammar (`server.structured`) made the generated text the call itself, so nothing is parsed
out of free text:

- a named function: the text is the call's `arguments` (JSON text of its parameters' schema);
- ``"required"``: the text is a JSON array of ``{"name": ..., "parameters": {...}}``; each item is
  a call whose `arguments` are its parameters as JSON text.

As in vLLM's server (and OpenAI's API), `finish_reason` is ``"tool_calls"`` for a completed
``"required"`` answer and stays ``"stop"`` for a named function. An answer cut short (`length`, a
stop string) keeps its finish reason: a named call then has truncated `arguments`, as vLLM
returns them; a ``"required"`` array that does not parse comes back as plain `content`.

Streaming: a named call's `arguments` stream as they are generated (the first delta carries the
call's `id`, `type` and function `name`); ``"required"`` calls are sent whole, in the chunk that
finishes the choice, since an array's items are only known once it parses.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from server.protocol import DeltaMessage
from server.protocol_base import random_id
from server.protocol_tools import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from server.structured import ForcedTools


def tool_calls_from_text(text: str, forced: ForcedTools) -> list[ToolCall] | None:
    """The calls in a finished answer, or None when it holds none (empty, or not a parsable array)."""
    if forced.mode == "named":
        if not text.strip():
            return None
        return [ToolCall(function=FunctionCall(name=str(forced.name), arguments=text))]
    try:
        items = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(items, list) or not items:
        return None
    calls = []
    for item in items:
        if not (isinstance(item, dict) and isinstance(item.get("name"), str) and "parameters" in item):
            return None
        calls.append(ToolCall(function=FunctionCall(
            name=item["name"], arguments=json.dumps(item["parameters"], ensure_ascii=False))))
    return calls


def tool_finish_reason(forced: ForcedTools | None, calls: list[ToolCall] | None, reason: str | None) -> str | None:
    """OpenAI's finish reason: "tool_calls" for completed "required" calls, else the engine's."""
    if forced is not None and forced.mode == "required" and calls and reason == "stop":
        return "tool_calls"
    return reason


class ToolCallStream:
    """One streamed choice of a forced tool call: text deltas in, tool-call deltas out."""

    def __init__(self, forced: ForcedTools) -> None:
        self.forced = forced
        self.call_id = random_id("chatcmpl-tool")
        self.named_started = False
        self.calls: list[ToolCall] | None = None  # "required": the calls, once the choice finished

    def delta(self, text_delta: str, text: str, finishing: bool, token_ids: Sequence[int] = ()) -> DeltaMessage:
        """The delta message for `text_delta` (`text`: the whole answer so far; `token_ids` unused,
        as for `server.tool_parsing.AutoToolParser.delta`)."""
        if self.forced.mode == "named":
            if not text_delta:
                return DeltaMessage()
            if self.named_started:
                more = DeltaFunctionCall(arguments=text_delta)
                return DeltaMessage(tool_calls=[DeltaToolCall(index=0, function=more)])
            self.named_started = True
            return DeltaMessage(tool_calls=[DeltaToolCall(
                index=0, id=self.call_id, type="function",
                function=DeltaFunctionCall(name=self.forced.name, arguments=text_delta))])
        if not finishing:
            return DeltaMessage()
        self.calls = tool_calls_from_text(text, self.forced)
        if self.calls is None:
            return DeltaMessage(content=text) if text else DeltaMessage()
        return DeltaMessage(tool_calls=[
            DeltaToolCall(index=i, id=call.id, type="function",
                          function=DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments))
            for i, call in enumerate(self.calls)])

    def finish_reason(self, reason: str | None) -> str | None:
        """The finish reason to send for the engine's `reason`."""
        return tool_finish_reason(self.forced, self.calls, reason)
