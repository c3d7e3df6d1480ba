"""Pydantic models of chorus's other endpoints: /v1/models, vLLM's /tokenize and /detokenize.

The same conventions as `server.protocol` (whose base models they use): OpenAI / vLLM field
order, strict request validation, vLLM's extras described where they are declared.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import Field

from server.protocol import (
    INT64_MAX,
    MAX_MESSAGES,
    ChatMessageParam,
    RequestBody,
    ResponseModel,
    is_none,
)
from server.protocol_tools import MAX_TOOLS, ChatTool


# ----------------------------------------------------------------------------- /v1/models


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "chorus"
    root: str | None = Field(default=None, description="vLLM extra: where the model was loaded from.")
    parent: str | None = Field(default=None, description="vLLM extra: the base model of an adapter.")
    max_model_len: int | None = Field(default=None, description="vLLM extra: prompt + completion limit.")
    ensemble: dict[str, Any] | None = Field(
        default=None, exclude_if=is_none,
        description="chorus extra: the members, their weights and the pooling rule.")


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


# ----------------------------------------------------------------------------- /tokenize, /detokenize


class TokenizeCompletionRequest(RequestBody):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = Field(default=True, description="vLLM extra: add the tokenizer's special tokens (BOS).")
    return_token_strs: bool | None = False


class TokenizeChatRequest(RequestBody):
    model: str | None = None
    messages: Annotated[list[ChatMessageParam], Field(min_length=1, max_length=MAX_MESSAGES)]
    add_generation_prompt: bool = Field(
        default=True, description="vLLM extra: end the rendered chat with the assistant's turn header.")
    return_token_strs: bool | None = False
    continue_final_message: bool = Field(
        default=False, description="vLLM extra: let the final (assistant) message go on, unterminated.")
    add_special_tokens: bool = Field(
        default=False, description="vLLM extra: add special tokens on top of the chat template's.")
    chat_template: str | None = Field(
        default=None, description="vLLM extra: a Jinja chat template (needs --trust-request-chat-template).")
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="vLLM extra: extra variables for the chat template.")
    tools: Annotated[list[ChatTool], Field(min_length=1, max_length=MAX_TOOLS)] | None = Field(
        default=None, description="vLLM extra: tools rendered into the chat template's `tools`.")


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = Field(default=None, exclude_if=is_none)


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=INT64_MAX)]]


class DetokenizeResponse(ResponseModel):
    prompt: str
