"""What a request asks of its answer's shape, as one engine-neutral grammar constraint.

At most one source constrains an answer:

- `response_format` (chat; on /v1/completions as vLLM's extra): ``json_object`` asks for any JSON
  object, ``json_schema`` for JSON following `json_schema.schema` (checked against JSON Schema's
  meta-schema here, so a malformed schema is a 400 naming it before any work);
- vLLM's `structured_outputs` extra: ``json`` (a schema), ``regex``, ``choice``, ``grammar`` or
  ``json_object``;
- chat `tools` with a forcing `tool_choice`: a named function constrains the answer to that
  function's `parameters` schema (the answer *is* the arguments), ``"required"`` to a JSON array
  of ``{"name": ..., "parameters": {...}}`` calls of the given tools (one call at most with
  ``parallel_tool_calls: false``). These are the schemas vLLM's OpenAI server builds
  (`vllm.tool_parsers.utils.get_json_schema_from_tools`); `server.tool_calls` reads the answer
  back as `message.tool_calls`.

``tool_choice: "none"`` renders the tools into the chat template and constrains nothing.
``"auto"`` (also OpenAI's default when `tools` are given) constrains nothing either: with
``serve --enable-auto-tool-choice --tool-call-parser NAME`` vLLM's parser for the model family's
own call syntax reads the calls out of the free answer (`server.tool_parsing`); without it, a 400
that names the values that work.

The constraint is `ensemble.protocol.StructuredOutput`; only an engine whose `info` has
``structured_outputs`` (the vLLM engine) enforces it, and on any other the request is refused
here, naming the field.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Literal

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from ensemble.protocol import StructuredOutput
from server.errors import bad_request
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.protocol_tools import ChatTool, NamedToolChoice

WORKING_TOOL_CHOICES = ("'none' (the tools are shown to the model, which answers in text), 'required' or a named "
                        "function {\"type\": \"function\", \"function\": {\"name\": ...}}")


@dataclass(frozen=True)
class ForcedTools:
    """A `tool_choice` whose answer is read back as `message.tool_calls`: forced ("named",
    "required") or found by a vLLM tool parser in free text ("auto", `parser` names it)."""

    mode: Literal["named", "required", "auto"]
    name: str | None = None  # the named function
    parser: str | None = None  # "auto": vLLM's tool-call parser


@dataclass(frozen=True)
class AnswerShape:
    """The constraint a request puts on its answer, where it came from, and its forced tools."""

    structured: StructuredOutput | None = None
    source: str | None = None  # the request field of the constraint, for errors
    tools: ForcedTools | None = None


def schema_text(schema: Any, param: str) -> str:
    """`schema` as compact JSON text, after checking it against its JSON Schema meta-schema (the
    draft its ``$schema`` names, else the latest); 400 naming `param` when it is not one."""
    if not isinstance(schema, dict):
        raise bad_request(f"'{param}' must be a JSON Schema object, got {type(schema).__name__}", param=param)
    try:
        validator_for(schema).check_schema(schema)
        return json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError as err:  # json.dumps: NaN or Infinity, which Python's JSON reader lets through
        raise bad_request(f"'{param}' holds a number JSON does not have ({err})", param=param) from None
    except SchemaError as err:
        where = "/".join(str(p) for p in err.path)
        raise bad_request(f"'{param}' is not a valid JSON Schema: {err.message}"
                          + (f" (at '{where}')" if where else ""), param=param) from None
    except RecursionError:
        raise bad_request(f"'{param}' is nested too deeply", param=param) from None


def _parameters(tool: ChatTool) -> dict[str, Any]:
    """A tool's arguments schema; none (or empty) is an object with no properties, as vLLM has it."""
    return copy.deepcopy(tool.function.parameters) or {"type": "object", "properties": {}}


def required_calls_schema(tools: list[ChatTool], parallel_tool_calls: bool | None) -> dict[str, Any]:
    """The schema of a ``tool_choice: "required"`` answer: an array of one call or more (one at
    most when `parallel_tool_calls` is false), each ``{"name": <a tool>, "parameters": <its
    arguments>}``; the tools' ``$defs`` move to the top, where their ``#/$defs/...`` refs point."""
    calls, defs = [], {}
    for i, tool in enumerate(tools):
        params = _parameters(tool)
        for name, definition in (params.pop("$defs", None) or {}).items():
            if name in defs and defs[name] != definition:
                raise bad_request(f"tools[{i}].function.parameters defines '$defs/{name}' differently from an "
                                  "earlier tool; with tool_choice 'required' the tools' $defs are shared",
                                  param=f"tools[{i}].function.parameters")
            defs[name] = definition
        calls.append({"properties": {"name": {"type": "string", "enum": [tool.function.name]}, "parameters": params},
                      "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": calls}}
    if parallel_tool_calls is False:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def _forced_tools(body: ChatCompletionRequest,
                  tool_parser: str | None = None) -> tuple[ForcedTools | None, StructuredOutput | None]:
    """The tools' forced calls and their constraint; 400s for a `tool_choice` that cannot apply."""
    for legacy, modern in (("functions", "tools"), ("function_call", "tool_choice")):
        if (body.model_extra or {}).get(legacy) is not None:
            raise bad_request(f"'{legacy}' (OpenAI's deprecated form) is not supported: send '{modern}'", param=legacy)
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise bad_request("'tool_choice' needs 'tools': send the functions the model may call", param="tool_choice")
        return None, None
    names: dict[str, int] = {}
    for i, tool in enumerate(body.tools):
        if tool.function.name in names:
            raise bad_request(f"tools[{i}] repeats the function name {tool.function.name!r} of "
                              f"tools[{names[tool.function.name]}]", param=f"tools[{i}].function.name")
        names[tool.function.name] = i
    if choice == "none":
        return None, None
    if choice in (None, "auto"):
        if tool_parser is not None:
            return ForcedTools("auto", parser=tool_parser), None
        implicit = " (the default when 'tools' are given)" if choice is None else ""
        raise bad_request(f"tool_choice 'auto'{implicit} needs a tool-call parser, and this server was started "
                          f"without one (serve --enable-auto-tool-choice --tool-call-parser NAME); use "
                          f"{WORKING_TOOL_CHOICES}", param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in names:
            raise bad_request(f"tool_choice names the function {name!r}, which is not among the tools "
                              f"({', '.join(repr(n) for n in names)})", param="tool_choice.function.name")
        i = names[name]
        spec = schema_text(_parameters(body.tools[i]), f"tools[{i}].function.parameters")
        return ForcedTools("named", name), StructuredOutput("json", spec)
    for i, tool in enumerate(body.tools):  # "required": every tool's arguments must be a schema
        if tool.function.parameters:
            schema_text(tool.function.parameters, f"tools[{i}].function.parameters")
    spec = schema_text(required_calls_schema(body.tools, body.parallel_tool_calls), "tools")
    return ForcedTools("required"), StructuredOutput("json", spec)


def _from_response_format(body: ChatCompletionRequest | CompletionRequest) -> StructuredOutput | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput("json_object")
    assert fmt.json_schema is not None and fmt.json_schema.json_schema is not None  # the model checks it
    return StructuredOutput("json", schema_text(fmt.json_schema.json_schema, "response_format.json_schema.schema"))


def _from_structured_outputs(body: ChatCompletionRequest | CompletionRequest) -> StructuredOutput | None:
    asked = body.structured_outputs
    if asked is None:
        return None
    if asked.json_ is not None:
        schema = asked.json_
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except (json.JSONDecodeError, RecursionError):
                raise bad_request("'structured_outputs.json' is text but not JSON: give the JSON Schema "
                                  "as an object", param="structured_outputs.json") from None
        return StructuredOutput("json", schema_text(schema, "structured_outputs.json"))
    if asked.json_object:
        return StructuredOutput("json_object")
    if asked.choice is not None:
        return StructuredOutput("choice", tuple(asked.choice))
    if asked.regex is not None:
        return StructuredOutput("regex", asked.regex)
    return StructuredOutput("grammar", asked.grammar)


def answer_shape(body: ChatCompletionRequest | CompletionRequest, *, engine_supports: bool,
                 tool_parser: str | None = None) -> AnswerShape:
    """What `body` asks of its answer (400 for a contradiction, an invalid schema, a `tool_choice`
    chorus cannot serve, or a constraint on an engine without a grammar backend); `tool_parser`:
    the vLLM tool-call parser that serves `tool_choice` "auto" (None: it is refused)."""
    forced, tools_constraint = (_forced_tools(body, tool_parser) if isinstance(body, ChatCompletionRequest)
                                else (None, None))
    from_format = _from_response_format(body)
    from_extra = _from_structured_outputs(body)
    if from_format is not None and from_extra is not None:
        raise bad_request("give one of 'response_format' and 'structured_outputs', not both: each sets the "
                          "answer's grammar", param="structured_outputs")
    if tools_constraint is not None and (from_format is not None or from_extra is not None):
        other = "response_format" if from_format is not None else "structured_outputs"
        raise bad_request(f"a forced tool call fixes the answer's format itself: send '{other}' or a tool_choice "
                          "of 'required' or a named function, not both", param="tool_choice")
    structured, source = next(((c, s) for c, s in ((tools_constraint, "tool_choice"), (from_format, "response_format"),
                                                  (from_extra, "structured_outputs")) if c is not None), (None, None))
    if structured is not None and not engine_supports:
        raise bad_request(f"'{source}' needs the vLLM engine (serve --engine vllm): the answer's format is enforced "
                          "by vLLM's grammar backend while decoding, and this server runs the reference engine, "
                          "which has none", param=source)
    return AnswerShape(structured, source, forced)
