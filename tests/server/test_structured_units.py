"""Structured output and tool calls without an engine: requests to constraints (`server.structured`),
the 400s at the edge, constrained answers back to tool calls (`server.tool_calls`), and tools in
the chat template (`server.prompts`, with the real Qwen2 tokenizer)."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from ensemble.protocol import StructuredOutput
from server.errors import APIError
from server.prompts import Tokenization, flatten_messages
from server.protocol import ChatCompletionRequest, ChatMessageParam, CompletionRequest
from server.protocol_tools import ChatTool
from server.structured import ForcedTools, answer_shape, required_calls_schema
from server.tool_calls import ToolCallStream, tool_calls_from_text, tool_finish_reason

MESSAGES = [{"role": "user", "content": "hi"}]
PARAMS = {"type": "object", "properties": {"on": {"type": "boolean"}, "room": {"enum": ["kitchen", "hall"]}},
          "required": ["on", "room"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "set_light", "parameters": PARAMS}},
         {"type": "function", "function": {"name": "ping"}}]
NAMED = {"type": "function", "function": {"name": "set_light"}}


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields})


def refused(body, *, supports: bool = True) -> APIError:
    with pytest.raises(APIError) as err:
        answer_shape(body, engine_supports=supports)
    assert err.value.status == 400
    return err.value


def test_each_source_becomes_one_constraint() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}}
    for body, want, source in [
        (chat(response_format=fmt), StructuredOutput("json", json.dumps(schema, separators=(",", ":"))),
         "response_format"),
        (chat(response_format={"type": "json_object"}), StructuredOutput("json_object"), "response_format"),
        (CompletionRequest.model_validate({"prompt": "x", "response_format": {"type": "json_object"}}),
         StructuredOutput("json_object"), "response_format"),
        (CompletionRequest.model_validate({"prompt": "x", "structured_outputs": {"choice": ["a", "b"]}}),
         StructuredOutput("choice", ("a", "b")), "structured_outputs"),
        (chat(structured_outputs={"regex": "[a-z]+"}), StructuredOutput("regex", "[a-z]+"), "structured_outputs"),
        (chat(structured_outputs={"grammar": 'root ::= "x"'}), StructuredOutput("grammar", 'root ::= "x"'),
         "structured_outputs"),
        (chat(structured_outputs={"json": json.dumps(schema)}), StructuredOutput("json", json.dumps(
            schema, separators=(",", ":"))), "structured_outputs"),
        (chat(tools=TOOLS, tool_choice=NAMED), StructuredOutput("json", json.dumps(PARAMS, separators=(",", ":"))),
         "tool_choice"),
    ]:
        shape = answer_shape(body, engine_supports=True)
        assert (shape.structured, shape.source) == (want, source)
    assert answer_shape(chat(response_format={"type": "text"}), engine_supports=False).structured is None
    none = answer_shape(chat(tools=TOOLS, tool_choice="none"), engine_supports=False)  # rendered, not forced
    assert none.structured is None and none.tools is None


def test_forced_tool_choices() -> None:
    named = answer_shape(chat(tools=TOOLS, tool_choice=NAMED), engine_supports=True)
    assert named.tools == ForcedTools("named", "set_light")
    no_params = answer_shape(chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "ping"}}),
                             engine_supports=True)
    assert json.loads(no_params.structured.spec) == {"type": "object", "properties": {}}  # vLLM's empty object
    required = answer_shape(chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False), engine_supports=True)
    assert required.tools == ForcedTools("required")
    schema = json.loads(required.structured.spec)
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    jsonschema.validate([{"name": "set_light", "parameters": {"on": True, "room": "hall"}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "set_light", "parameters": {"on": "yes", "room": "hall"}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "ping", "parameters": {}}] * 2, schema)  # one call at most


def test_required_schema_shares_the_tools_defs() -> None:
    with_defs = {"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "$defs": {"P": {"type": "integer"}}}
    tools = [ChatTool.model_validate({"function": {"name": "f", "parameters": with_defs}})]
    schema = required_calls_schema(tools, None)
    assert schema["$defs"] == {"P": {"type": "integer"}} and "maxItems" not in schema
    jsonschema.validate([{"name": "f", "parameters": {"p": 3}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "f", "parameters": {"p": "three"}}], schema)
    assert "$defs" in tools[0].function.parameters  # the request's own schema is left alone
    clash = {"type": "object", "$defs": {"P": {"type": "string"}}}
    tools.append(ChatTool.model_validate({"function": {"name": "g", "parameters": clash}}))
    with pytest.raises(APIError, match="differently"):
        required_calls_schema(tools, None)


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": TOOLS}, "tool_choice", "the default when 'tools' are given"),
    ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "'required' or a named function"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "'nope', which is not among the tools"),
    ({"tools": [TOOLS[0], TOOLS[0]], "tool_choice": "none"}, "tools[1].function.name", "repeats"),
    ({"tools": TOOLS, "tool_choice": NAMED, "response_format": {"type": "json_object"}}, "tool_choice", "not both"),
    ({"tools": TOOLS, "tool_choice": "required", "structured_outputs": {"regex": "a"}}, "tool_choice", "not both"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs",
     "not both"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema", "not a valid JSON Schema"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not JSON"),
    ({"functions": [{"name": "f"}]}, "functions", "send 'tools'"),
    ({"structured_outputs": {"json": "[1]"}}, "structured_outputs.json", "must be a JSON Schema object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": []}}}],
      "tool_choice": "required"}, "tools[0].function.parameters", "not a valid JSON Schema"),
])
def test_refusals_name_the_field(fields, param, words) -> None:
    err = refused(chat(**fields))
    assert err.param == param and words in err.message, err.message


def test_a_constraint_on_an_engine_without_grammars_names_its_field() -> None:
    for body, param in [(chat(response_format={"type": "json_object"}), "response_format"),
                        (chat(structured_outputs={"choice": ["a"]}), "structured_outputs"),
                        (chat(tools=TOOLS, tool_choice="required"), "tool_choice"),
                        (CompletionRequest.model_validate({"prompt": "x", "response_format": {"type": "json_object"}}),
                         "response_format")]:
        err = refused(body, supports=False)
        assert err.param == param and "needs the vLLM engine" in err.message


def test_request_models_refuse_malformed_shapes() -> None:
    from pydantic import ValidationError

    for fields in [{"response_format": {"type": "json_schema"}},
                   {"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}},
                   {"structured_outputs": {"regex": "a", "choice": ["b"]}},
                   {"structured_outputs": {}},
                   {"structured_outputs": {"json_object": False}},
                   {"structured_outputs": {"whitespace_pattern": " "}},  # vLLM's, not honoured: refused
                   {"tools": []},
                   {"tool_choice": "sometimes"},
                   {"tool_choice": {"type": "function", "function": {}}}]:
        with pytest.raises(ValidationError):
            chat(**fields)


def test_answers_become_tool_calls() -> None:
    named = ForcedTools("named", "set_light")
    calls = tool_calls_from_text('{"on":true,"room":"hall"}', named)
    assert [(c.type, c.function.name, c.function.arguments) for c in calls] == [
        ("function", "set_light", '{"on":true,"room":"hall"}')]
    assert calls[0].id.startswith("chatcmpl-tool-") and tool_calls_from_text("  ", named) is None
    required = ForcedTools("required")
    calls = tool_calls_from_text('[{"name":"ping","parameters":{}},{"name":"set_light","parameters":{"on":false}}]',
                                 required)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("ping", {}), ("set_light", {"on": False})]
    for cut in ('[{"name":"ping","param', "[]", '{"name":"ping"}', '[{"parameters":{}}]'):
        assert tool_calls_from_text(cut, required) is None
    assert tool_finish_reason(required, calls, "stop") == "tool_calls"
    assert tool_finish_reason(required, calls, "length") == "length"
    assert tool_finish_reason(named, calls, "stop") == "stop"  # as vLLM and OpenAI: a named call stops
    assert tool_finish_reason(None, None, "stop") == "stop"


def test_streamed_tool_calls() -> None:
    named = ToolCallStream(ForcedTools("named", "f"))
    first = named.delta('{"a"', '{"a"', False).tool_calls[0]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (0, "function", "f", '{"a"')
    assert first.id == named.call_id
    later = named.delta(":1}", '{"a":1}', True).tool_calls[0]
    assert later.id is None and later.function.name is None and later.function.arguments == ":1}"
    assert named.delta("", '{"a":1}', True).tool_calls is None and named.finish_reason("stop") == "stop"
    required = ToolCallStream(ForcedTools("required"))
    assert required.delta('[{"name":"f",', '[{"name":"f",', False).model_dump() == {}  # held back
    done = required.delta('"parameters":{}}]', '[{"name":"f","parameters":{}}]', True)
    assert [(d.index, d.function.name, d.function.arguments) for d in done.tool_calls] == [(0, "f", "{}")]
    assert required.finish_reason("stop") == "tool_calls"
    cut = ToolCallStream(ForcedTools("required"))
    assert cut.delta("", '[{"na', True).content == '[{"na' and cut.finish_reason("length") == "length"


def test_tools_and_tool_calls_reach_the_chat_template() -> None:
    """The template sees `tools` and the earlier calls' arguments as objects (the Transformers
    convention vLLM follows), with the real Qwen2 tokenizer."""
    from transformers import AutoTokenizer

    from transfer import zoo

    template = ("{% for t in tools %}[tool {{ t.function.name }} {{ t.function.parameters | tojson }}]{% endfor %}"
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                "{% for c in m.tool_calls or [] %}(call {{ c.function.name }} on={{ c.function.arguments.on }})"
                "{% endfor %}{% endfor %}")
    messages = [ChatMessageParam.model_validate(m) for m in [
        {"role": "user", "content": "light"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "set_light", "arguments": '{"on": true}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"}]]
    assert flatten_messages(messages)[1]["tool_calls"][0]["function"]["arguments"] == {"on": True}
    tokenization = Tokenization(AutoTokenizer.from_pretrained(zoo.tokenizer_dir("qwen2")), workers=1)
    try:
        tools = [ChatTool.model_validate(TOOLS[0]).model_dump(mode="json", exclude_none=True)]
        text = asyncio.run(tokenization.render_chat(messages, add_generation_prompt=False, continue_final_message=False,
                                                    chat_template=template, chat_template_kwargs=None, tools=tools))
    finally:
        tokenization.close()
    assert text.startswith('[tool set_light {"') and '"room"' in text
    assert "<assistant>(call set_light on=True)<tool>done" in text
