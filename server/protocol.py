"""Pydantic models of the OpenAI HTTP API as chorus serves it.

Field order follows the OpenAI API reference (and vLLM's `entrypoints/openai/*/protocol.py`):
first the OpenAI fields, then vLLM's sampling extras (`top_k`, `min_p`, ...), then the ensemble
extras, each block under its own comment. Clients send ensemble extras as extra body fields,
e.g. `client.completions.create(..., extra_body={"pooling": "logprob_mean"})`.

Requests are validated strictly (no string-to-number coercion, no NaN/inf) so wrong types and
out-of-range values become 400s with the offending field named. Unknown fields are accepted and
ignored, as OpenAI and vLLM do. Fields that exist in the OpenAI API but that chorus cannot honour
(`suffix`, `best_of`, `tool_choice: "auto"`, ...) are rejected with a clear 400 by
`server.sampling` and `server.structured`, never silently dropped. The models of structured
output and tool calls are in `server.protocol_tools`, the shared base models in
`server.protocol_base`.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from ensemble.protocol import MAX_LOGPROBS, PoolingRule
from server.protocol_base import (  # noqa: F401 - re-exported: the API models' base classes and helpers
    RequestBody,
    RequestModel,
    ResponseModel,
    invalid_text_path,
    is_none,
    random_id,
)
from server.protocol_tools import (
    MAX_TOOLS,
    ChatTool,
    DeltaToolCall,
    ResponseFormat,
    StructuredOutputsParam,
    ToolCall,
    ToolCallParam,
    ToolChoiceParam,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 32
# Size limits on lists a client controls (README "Security"). OpenAI allows 4 stop strings; vLLM
# has no limit; these leave room for lm-eval's `until` lists and tokenizers' special ids.
MAX_STOP = 64
MAX_STOP_LEN = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # token ids in one `logit_bias` (like stop_token_ids)
MAX_PROMPTS = 64
MAX_SEQUENCES = 128  # prompts × n in one request
MAX_MESSAGES = 4096

StopString = Annotated[str, Field(max_length=MAX_STOP_LEN)]
StopParam = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None
StopTokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)] | None
# OpenAI's {token id as a string: bias}; biases are clamped to [-100, 100] as vLLM does.
LogitBias = Annotated[dict[str, Annotated[float, Field(allow_inf_nan=False)]], Field(max_length=MAX_LOGIT_BIAS)] | None


# The extras every choice (completion or chat, whole or streamed) carries.
StopReason = Annotated[
    int | str | None, Field(description="vLLM extra: the stop string or token id that ended the completion.")]
MemberLogprobs = Annotated[
    list[dict[str, float]] | None,
    Field(exclude_if=is_none, description="chorus extra: per generated token, each member's log-prob of it.")]


# ----------------------------------------------------------------------------- shared pieces


class StreamOptions(RequestModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = Field(default=False, description="vLLM extra: a usage object on every chunk.")


# Ensemble extras (not part of the OpenAI API), declared last in each request model.
MemberWeight = Annotated[float, Field(ge=-1e6, le=1e6)]
MemberWeights = list[MemberWeight] | dict[str, MemberWeight] | None
POOLING_DOC = "chorus extra: pooling rule for this request (default: the ensemble's own)."
WEIGHTS_DOC = (
    "chorus extra: member weights for this request, a list in /v1/models order or an object "
    "{member name: weight} naming every member (default: the ensemble's own)."
)
MEMBER_LOGPROBS_DOC = "chorus extra: report each member's log-prob of every generated token."
RESPONSE_FORMAT_DOC = ("The answer's format: text, any JSON object, or JSON following a schema (enforced by a "
                       "grammar: vLLM engine only).")
STRUCTURED_DOC = ("vLLM extra: one grammar constraint for the answer (json, regex, choice, grammar or json_object; "
                  "vLLM engine only).")


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo


# ----------------------------------------------------------------------------- /v1/completions


class CompletionRequest(RequestBody):
    # OpenAI fields, in the API reference's order.
    model: str | None = None
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
        | Annotated[
            list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]],
            Field(min_length=1, max_length=MAX_PROMPTS),
        ]
    )
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    echo: bool | None = False
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = 0.0
    logit_bias: LogitBias = Field(
        default=None, description="{token id: bias}: added to the pooled logits before sampling (clamped to ±100).")
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = Field(
        default=16, description="Tokens to generate; 0 only with `echo` (vLLM's behaviour): the prompt alone "
                                "comes back, with its log-probs when `logprobs` is set.")
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = 0.0
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    stop: StopParam = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    user: str | None = None
    # vLLM sampling extras.
    top_k: Annotated[int, Field(ge=-1, le=2**31 - 1)] | None = Field(
        default=None, description="vLLM extra: sample from the k most likely tokens (-1 or 0: all).")
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        default=None, description="vLLM extra: drop tokens below min_p times the top probability.")
    stop_token_ids: StopTokenIds = Field(
        default=None, description="vLLM extra: token ids that end the completion.")
    ignore_eos: bool = Field(default=False, description="vLLM extra: keep generating past end-of-sequence tokens.")
    add_special_tokens: bool = Field(default=True, description="vLLM extra: add the tokenizer's special tokens (BOS).")
    return_tokens_as_token_ids: bool | None = Field(
        default=None, description="vLLM extra: name logprob tokens as 'token_id:<id>'.")
    priority: Annotated[int, Field(ge=-(2**31), le=2**31 - 1)] = Field(
        default=0, description="vLLM extra: scheduling priority, lower values first (needs an engine started "
                               "with --scheduling-policy priority; any other value than 0 is a 400 otherwise).")
    response_format: ResponseFormat | None = Field(default=None, description=f"vLLM extra: {RESPONSE_FORMAT_DOC}")
    structured_outputs: StructuredOutputsParam | None = Field(default=None, description=STRUCTURED_DOC)
    # chorus ensemble extras.
    pooling: PoolingRule | None = Field(default=None, description=POOLING_DOC)
    member_weights: MemberWeights = Field(default=None, description=WEIGHTS_DOC)
    return_member_logprobs: bool = Field(default=False, description=MEMBER_LOGPROBS_DOC)


def prompt_items(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """A completion request's `prompt` (a string, strings, token ids, or lists of ids) as a list
    with one item per prompt."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


def prompt_count(prompt: str | list[str] | list[int] | list[list[int]]) -> int:
    """How many prompts a completion request's `prompt` holds."""
    return len(prompt_items(prompt))


class CompletionLogProbs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: StopReason = None
    member_logprobs: MemberLogprobs = None


class CompletionResponse(ResponseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo


class CompletionStreamResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None


# ----------------------------------------------------------------------------- /v1/chat/completions


class ContentPart(RequestModel):
    type: str
    text: str | None = None


class ChatMessageParam(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCallParam], Field(max_length=MAX_TOOLS)] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessageParam:
        # As OpenAI: only an assistant message that carries tool calls may go without content.
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a '{self.role}' message needs 'content'")
        return self


class ChatCompletionRequest(RequestBody):
    # OpenAI fields, in the API reference's order (messages, model, then alphabetical).
    messages: Annotated[list[ChatMessageParam], Field(min_length=1, max_length=MAX_MESSAGES)]
    model: str | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = 0.0
    logit_bias: LogitBias = Field(
        default=None, description="{token id: bias}: added to the pooled logits before sampling (clamped to ±100).")
    logprobs: bool | None = False
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Deprecated by OpenAI in favour of max_completion_tokens."
    )
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = 1
    parallel_tool_calls: bool | None = Field(
        default=None, description="false: tool_choice 'required' makes exactly one call.")
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = 0.0
    response_format: ResponseFormat | None = Field(default=None, description=RESPONSE_FORMAT_DOC)
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    stop: StopParam = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    tool_choice: ToolChoiceParam | None = Field(
        default=None, description="'none', 'required' or a named function {\"type\": \"function\", \"function\": "
                                  "{\"name\": ...}} (these two need the vLLM engine); 'auto' is refused (no tool-call "
                                  "parser). Default with tools: 'auto', as OpenAI.")
    tools: Annotated[list[ChatTool], Field(min_length=1, max_length=MAX_TOOLS)] | None = Field(
        default=None, description="Functions the model may call; rendered into the chat template's `tools`.")
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = 0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    user: str | None = None
    # vLLM sampling extras.
    top_k: Annotated[int, Field(ge=-1, le=2**31 - 1)] | None = Field(
        default=None, description="vLLM extra: sample from the k most likely tokens (-1 or 0: all).")
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        default=None, description="vLLM extra: drop tokens below min_p times the top probability.")
    stop_token_ids: StopTokenIds = Field(
        default=None, description="vLLM extra: token ids that end the completion.")
    ignore_eos: bool = Field(default=False, description="vLLM extra: keep generating past end-of-sequence tokens.")
    return_tokens_as_token_ids: bool | None = Field(
        default=None, description="vLLM extra: name logprob tokens as 'token_id:<id>'.")
    priority: Annotated[int, Field(ge=-(2**31), le=2**31 - 1)] = Field(
        default=0, description="vLLM extra: scheduling priority, lower values first (needs an engine started "
                               "with --scheduling-policy priority; any other value than 0 is a 400 otherwise).")
    structured_outputs: StructuredOutputsParam | None = Field(default=None, description=STRUCTURED_DOC)
    # vLLM chat-template extras.
    echo: bool = Field(default=False, description="vLLM extra: prepend the last message if it has the answered role.")
    add_generation_prompt: bool = Field(
        default=True, description="vLLM extra: end the rendered chat with the assistant's turn header.")
    continue_final_message: bool = Field(
        default=False, description="vLLM extra: let the final (assistant) message go on, unterminated.")
    add_special_tokens: bool = Field(
        default=False, description="vLLM extra: add special tokens on top of the chat template's.")
    chat_template: str | None = Field(
        default=None, description="vLLM extra: a Jinja chat template (needs --trust-request-chat-template).")
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="vLLM extra: extra variables for the chat template.")
    # chorus ensemble extras.
    pooling: PoolingRule | None = Field(default=None, description=POOLING_DOC)
    member_weights: MemberWeights = Field(default=None, description=WEIGHTS_DOC)
    return_member_logprobs: bool = Field(default=False, description=MEMBER_LOGPROBS_DOC)


class ChatCompletionLogProb(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(ResponseModel):
    content: list[ChatCompletionLogProbsContent] | None = None


class ChatMessage(ResponseModel):
    role: str
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, exclude_if=is_none)


class DeltaMessage(ResponseModel):
    role: str | None = Field(default=None, exclude_if=is_none)
    content: str | None = Field(default=None, exclude_if=is_none)
    tool_calls: list[DeltaToolCall] | None = Field(default=None, exclude_if=is_none)


class ChatCompletionResponseChoice(ResponseModel):
    index: int
    message: ChatMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = "stop"
    stop_reason: StopReason = None
    member_logprobs: MemberLogprobs = None


class ChatCompletionResponse(ResponseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo


class ChatCompletionResponseStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: StopReason = None
    member_logprobs: MemberLogprobs = None


class ChatCompletionStreamResponse(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None
