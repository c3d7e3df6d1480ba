"""Pydantic models for the shape of an answer: OpenAI's `response_format`, `tools`, `tool_choice`
and `message.tool_calls` (whole and streamed), and vLLM's `structured_outputs` extra.

They are parts of `server.protocol`'s request and response models. What they mean for generation
is decided elsewhere: `server.structured` turns them into the engine's grammar constraint (with
the cross-field checks: a `tool_choice` needs `tools`, a named function must be one of them, ...),
`server.tool_calls` turns a constrained answer back into tool calls.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag, model_validator

from server.protocol_base import RequestModel, ResponseModel, is_none, random_id

MAX_TOOLS = 128  # OpenAI's limit on the tools of one request
FunctionName = Annotated[str, Field(min_length=1, max_length=256)]


# ----------------------------------------------------------------------------- response_format


class JsonSchemaFormat(RequestModel):
    name: FunctionName
    description: str | None = None
    # `schema` would shadow a BaseModel attribute; it is the field's JSON name (as in vLLM).
    json_schema: dict[str, Any] | None = Field(
        default=None, alias="schema", description="The JSON Schema the answer must follow (required by chorus).")
    strict: bool | None = Field(
        default=None, description="Accepted; the grammar enforces the schema whatever its value.")


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_for_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.json_schema is None):
            raise ValueError("type 'json_schema' needs 'json_schema': {\"name\": ..., \"schema\": {...}}")
        return self


class StructuredOutputsParam(RequestModel):
    """vLLM's `structured_outputs` extra: exactly one constraint. vLLM's other fields
    (`whitespace_pattern`, `structural_tag`, ...) are refused rather than ignored."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    json_: dict[str, Any] | str | None = Field(
        default=None, alias="json", description="A JSON Schema (object, or its JSON text) the answer must follow.")
    regex: Annotated[str, Field(min_length=1)] | None = Field(
        default=None, description="A regular expression the whole answer must match.")
    choice: Annotated[list[str], Field(min_length=1)] | None = Field(
        default=None, description="The answer is exactly one of these strings.")
    grammar: Annotated[str, Field(min_length=1)] | None = Field(
        default=None, description="A context-free grammar (EBNF, or Lark) the answer must follow.")
    json_object: bool | None = Field(default=None, description="true: the answer is a JSON object.")

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputsParam:
        given = [name for name, value in (("json", self.json_), ("regex", self.regex), ("choice", self.choice),
                                          ("grammar", self.grammar), ("json_object", self.json_object))
                 if value is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of json, regex, choice, grammar, json_object (got "
                             f"{', '.join(given) or 'none'})")
        if self.json_object is False:
            raise ValueError("json_object: false asks for no constraint; leave structured_outputs out instead")
        return self


# ----------------------------------------------------------------------------- tools


class FunctionDefinition(RequestModel):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="The JSON Schema of the arguments (none: an object with no properties).")
    strict: bool | None = Field(
        default=None, description="Accepted; a forced call's arguments always follow the schema.")


class ChatTool(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: FunctionName


class NamedToolChoice(RequestModel):
    type: Literal["function"] = "function"
    function: NamedFunction


def _tool_choice_tag(value: Any) -> str:
    return "tool-choice-mode" if isinstance(value, str) else "named-tool-choice"


# "none" / "auto" / "required", or {"type": "function", "function": {"name": ...}}; the tag keeps a
# bad value's error about the form it has (a string, or an object).
ToolChoiceParam = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("tool-choice-mode")]
    | Annotated[NamedToolChoice, Tag("named-tool-choice")],
    Discriminator(_tool_choice_tag),
]


class FunctionCallParam(RequestModel):
    name: str
    arguments: str | dict[str, Any] = Field(description="The arguments as JSON text (OpenAI) or an object.")


class ToolCallParam(RequestModel):
    """A tool call of an earlier assistant message (conversation history)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallParam


# ----------------------------------------------------------------------------- tool calls in answers


class FunctionCall(ResponseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(ResponseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl-tool"))
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(ResponseModel):
    name: str | None = Field(default=None, exclude_if=is_none)
    arguments: str | None = Field(default=None, exclude_if=is_none)


class DeltaToolCall(ResponseModel):
    """A piece of a streamed tool call: the first piece of a call has its `id`, `type` and function
    `name`; `arguments` pieces follow, to be concatenated by `index`."""

    index: int
    id: str | None = Field(default=None, exclude_if=is_none)
    type: Literal["function"] | None = Field(default=None, exclude_if=is_none)
    function: DeltaFunctionCall | None = Field(default=None, exclude_if=is_none)
