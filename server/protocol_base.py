"""The base models and helpers of chorus's API models (`server.protocol`, `server.protocol_tools`,
`server.protocol_misc`): strict request models whose text must be valid Unicode, response models
whose None extras stay out of the JSON, and OpenAI-style object ids."""

from __future__ import annotations

import functools
import json
import uuid
from typing import Annotated, Any, get_args, get_origin

from annotated_types import MaxLen
from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError


def random_id(prefix: str) -> str:
    """An OpenAI-style object id, e.g. `cmpl-3f2a...`."""
    return f"{prefix}-{uuid.uuid4().hex}"


def invalid_text_path(value: Any, path: str = "") -> str | None:
    """The path (`messages[0].content`) of the first string in `value` (nested dicts and lists,
    keys included) that is not valid Unicode text, i.e. holds a lone surrogate such as the JSON
    escape `"\\ud800"`, which cannot be encoded to UTF-8; None when every string is valid.

    Valid bodies, the common case, are checked in C: the whole value re-encoded as UTF-8 JSON
    (about 7 ns a byte; the walk that builds paths costs 6x that and runs only to name a bad field)."""
    try:
        json.dumps(value, ensure_ascii=False, check_circular=False).encode("utf-8")
        return None
    except (UnicodeEncodeError, TypeError, ValueError, RecursionError):
        pass  # a bad string, or a value JSON cannot hold or nest: find the path the slow way
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
        if isinstance(data, dict):
            # Oversized lists are refused before anything walks or validates their items: a
            # 100,000-string `stop` costs microseconds, not the 70 ms it took to validate.
            for key, cap in list_caps(cls).items():
                value = data.get(key)
                if isinstance(value, (list, dict)) and len(value) > cap:
                    raise PydanticCustomError("too_many_items", "'{param}' has {count} items; at most {cap} "
                                              "are allowed", {"param": key, "count": len(value), "cap": cap})
        where = invalid_text_path(data)
        if where is not None:
            # A 400 naming the field (`server.errors` reads `param` from the context).
            raise PydanticCustomError("invalid_unicode", "'{param}' is not valid Unicode text (it holds a lone "
                                      "surrogate)", {"param": where})
        return data


@functools.cache
def list_caps(model: type[BaseModel]) -> dict[str, int]:
    """Field name -> the most items its list (or object) form may hold, for the fields of `model`
    whose every list/object form has a `max_length` (a field with one unbounded list form, such as
    a prompt of token ids, has no cap here and is bounded by its own validation)."""
    caps: dict[str, int] = {}
    for name, field in model.model_fields.items():
        forms = [(field.annotation, field.metadata)]
        if get_origin(field.annotation) not in (list, dict):  # a union: one form per member
            forms = [_form(arg) for arg in get_args(field.annotation)]
        limits = [_max_len(meta) for kind, meta in forms if get_origin(kind) in (list, dict)]
        if limits and None not in limits:
            caps[field.alias or name] = max(limits)  # type: ignore[type-var]
    return caps


def _form(arg: Any) -> tuple[Any, list[Any]]:
    """A union member as (its type, its constraints)."""
    if get_origin(arg) is Annotated:
        base, *meta = get_args(arg)
        return base, [m for item in meta for m in (item.metadata if isinstance(item, FieldInfo) else [item])]
    return arg, []


def _max_len(metadata: list[Any]) -> int | None:
    return next((m.max_length for m in metadata if isinstance(m, MaxLen)), None)


class ResponseModel(BaseModel):
    """Base of every response body. Extras that are None are left out of the JSON with
    `Field(exclude_if=is_none)`, so plain OpenAI responses look exactly like OpenAI's (and the
    OpenAPI document still shows every field)."""

    model_config = ConfigDict(extra="forbid")


def is_none(value: object) -> bool:
    """`exclude_if` predicate for optional extras."""
    return value is None
