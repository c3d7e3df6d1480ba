"""The base models and helpers of chorus's API models (`server.protocol`, `server.protocol_tools`,
`server.protocol_misc`): strict request models whose text must be valid Unicode, response models
whose None extras stay out of the JSON, and OpenAI-style object ids."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError


def random_id(prefix: str) -> str:
    """An OpenAI-style object id, e.g. `cmpl-3f2a...`."""
    return f"{prefix}-{uuid.uuid4().hex}"


def invalid_text_path(value: Any, path: str = "") -> str | None:
    """The path (`messages[0].content`) of the first string in `value` (nested dicts and lists,
    keys included) that is not valid Unicode text, i.e. holds a lone surrogate such as the JSON
    escape `"\\ud800"`, which cannot be encoded to UTF-8; None when every string is valid."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return where or "request body"
        elif isinstance(item, dict):
            for key, sub in item.items():
                stack.append((key, where))  # a bad key is reported at its object
                key = str(key).encode("utf-8", "backslashreplace").decode("utf-8")  # never echo bad text
                stack.append((sub, f"{where}.{key}" if where else key))
        elif isinstance(item, (list, tuple)):
            stack.extend((sub, f"{where}[{i}]") for i, sub in enumerate(item))
    return None


class RequestModel(BaseModel):
    """Base of every request model: strict types, finite floats, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class RequestBody(RequestModel):
    """Base of a whole request body: a `RequestModel` whose every string (unknown fields and nested
    objects included) must be valid Unicode text. Checked once, on the whole body: the nested
    models inside it (messages, content parts) are plain `RequestModel`s."""

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data: Any) -> Any:
        where = invalid_text_path(data)
        if where is not None:
            # A 400 naming the field (`server.errors` reads `param` from the context).
            raise PydanticCustomError("invalid_unicode", "'{param}' is not valid Unicode text (it holds a lone "
                                      "surrogate)", {"param": where})
        return data


class ResponseModel(BaseModel):
    """Base of every response body. Extras that are None are left out of the JSON with
    `Field(exclude_if=is_none)`, so plain OpenAI responses look exactly like OpenAI's (and the
    OpenAPI document still shows every field)."""

    model_config = ConfigDict(extra="forbid")


def is_none(value: object) -> bool:
    """`exclude_if` predicate for optional extras."""
    return value is None
