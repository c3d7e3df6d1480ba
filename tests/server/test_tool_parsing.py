"""tool_choice "auto" (server/tool_parsing.py): vLLM's own Hermes parser, given the real Qwen2
tokenizer, reads calls out of a finished answer and out of the same answer streamed piece by piece."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from server.config import ConfigError, ServerConfig
from server.protocol import ChatCompletionRequest
from server.tool_parsing import AutoToolParser, check_parser, tool_parser_names

TOOLS = [{"type": "function", "function": {"name": "set_light", "parameters": {
    "type": "object", "properties": {"on": {"type": "boolean"}, "room": {"type": "string"}}}}}]
CALL = {"name": "set_light", "arguments": {"on": True, "room": "hall"}}
ANSWER = f"On it. <tool_call>\n{json.dumps(CALL)}\n</tool_call>"


@pytest.fixture(scope="module")
def tokenizer():
    from transfer import zoo

    return AutoTokenizer.from_pretrained(zoo.tokenizer_dir("qwen2"))


def _body() -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "pair", "messages": [{"role": "user", "content": "hi"}],
                                                 "tools": TOOLS})


def test_a_finished_answer_gives_its_content_and_calls(tokenizer) -> None:
    parser = AutoToolParser("hermes", tokenizer, _body())
    content, calls = parser.extract(ANSWER)
    assert content == "On it. " and len(calls) == 1
    assert calls[0].function.name == "set_light" and json.loads(calls[0].function.arguments) == CALL["arguments"]
    assert parser.finish_reason("stop") == "tool_calls" and parser.finish_reason("length") == "length"
    plain = AutoToolParser("hermes", tokenizer, _body())
    assert plain.extract("No tools needed.") == ("No tools needed.", None)
    assert plain.finish_reason("stop") == "stop"


def test_a_streamed_answer_gives_the_same_content_and_call(tokenizer) -> None:
    parser = AutoToolParser("hermes", tokenizer, _body())
    ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    content, calls, text = "", {}, ""
    for n in range(1, len(ids) + 1):  # one token at a time, as the engine streams
        new = tokenizer.decode(ids[:n])[len(text):]
        text += new
        delta = parser.delta(new, text, n == len(ids), ids[:n])
        content += delta.content or ""
        for call in delta.tool_calls or ():
            entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
            entry["id"] = entry["id"] or call.id
            entry["name"] = entry["name"] or (call.function.name if call.function else None)
            entry["arguments"] += (call.function.arguments or "") if call.function else ""
    assert content == "On it. " and list(calls) == [0]
    assert calls[0]["name"] == "set_light" and calls[0]["id"]
    assert json.loads(calls[0]["arguments"]) == CALL["arguments"]
    assert parser.finish_reason("stop") == "tool_calls"


def test_the_parser_is_checked_at_start_up(tmp_path: Path) -> None:
    assert "hermes" in tool_parser_names()
    for kwargs, message in [({"enable_auto_tool_choice": True}, "needs --tool-call-parser"),
                            ({"tool_call_parser": "hermes"}, "only with --enable-auto-tool-choice"),
                            ({"enable_auto_tool_choice": True, "tool_call_parser": "nope"}, "not one of vLLM's parsers")]:
        with pytest.raises(ConfigError, match=message):
            ServerConfig(ensemble=str(tmp_path), **kwargs)


def test_parallel_tool_calls_false_keeps_the_first_call(tokenizer) -> None:
    second = {"name": "set_light", "arguments": {"on": False, "room": "attic"}}
    both = f"{ANSWER}\n<tool_call>\n{json.dumps(second)}\n</tool_call>"
    body = _body().model_copy(update={"parallel_tool_calls": False})
    _, calls = AutoToolParser("hermes", tokenizer, body).extract(both)
    assert [json.loads(c.function.arguments) for c in calls] == [CALL["arguments"]]
    _, calls = AutoToolParser("hermes", tokenizer, _body()).extract(both)
    assert len(calls) == 2


def test_a_parser_that_cannot_see_its_marker_is_refused(tokenizer) -> None:
    check_parser("hermes", tokenizer)  # Qwen2's <tool_call> is an added token, not a special one
    special = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    special.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    with pytest.raises(ValueError, match="special token of this ensemble's tokenizer"):
        check_parser("hermes", special)
    with pytest.raises(ValueError, match="does not work with this ensemble's tokenizer"):
        check_parser("llama3_json", _NoVocab())


class _NoVocab:
    """A tokenizer without the tokens a parser looks up (vLLM's parsers raise on it)."""

    def get_vocab(self) -> dict[str, int]:
        return {}
