"""The parts of an ensemble manifest (`ensemble.manifest`, which re-exports them): one member
(`MemberSpec`), the special-token ids (`SpecialTokens`), their frozen pydantic base
(`ManifestModel`), and `ManifestError`, into which every validation error turns as one line
naming the field."""

from __future__ import annotations

import math
import os
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

SPECIAL_ROLES = ("bos", "eos", "eot", "pad")

# vLLM asserts that a layer name holds at most one integer (the layer index), so member names,
# which become module prefixes, must hold none.
_MEMBER_NAME = re.compile(r"^[A-Za-z_][A-Za-z_]*$")



class ManifestError(ValueError):
    """An ensemble definition or folder that is invalid; the message says what and where."""


class ManifestModel(BaseModel):
    """An immutable part of the manifest that refuses unknown fields. Its constructor also takes
    the fields positionally, in declaration order (``MemberSpec("a", "/a", 2.0)``), and raises
    `ManifestError`, never pydantic's ValidationError (pydantic builds nested parts through it too,
    so a member's error reaches the manifest as the member's own message)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = list(type(self).model_fields)
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} positional arguments")
        for key, value in zip(names, args):
            if key in kwargs:
                raise TypeError(f"{type(self).__name__} got multiple values for {key!r}")
            kwargs[key] = value
        try:
            super().__init__(**kwargs)
        except ValidationError as err:
            raise ManifestError(_message(err, self._label(kwargs))) from None

    @classmethod
    def _label(cls, data: dict[str, Any]) -> str:
        """What this part is called in error messages (``manifest``, ``member 'a'``)."""
        return cls.__name__

    @classmethod
    def _validated(cls, data: Any) -> Any:
        """`cls` built from `data` (a mapping, as in JSON); ManifestError on bad input."""
        try:
            return cls(**data)
        except TypeError as err:  # keys that are not strings
            raise ManifestError(f"{cls._label({})}: {err}") from None

    def updated(self, **changes: Any) -> Any:
        """A copy with `changes`, validated again (`model_copy(update=...)` does not validate)."""
        return self._validated({**dict(self), **changes})


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ManifestError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def positive_int(value: Any, what: str) -> int:
    """`value`, unless it is not a positive integer (a bool is not): then ManifestError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ManifestError(f"{what} must be a positive integer, got {value!r}")
    return value


class MemberSpec(ManifestModel):
    """One member model of an ensemble.

    Attributes:
        name: digit-free identifier (``smollm2``, ``member_a``); becomes the vLLM module prefix.
        path: the member's own Hugging Face folder (absolute, or relative to the ensemble folder).
        weight: relative pooling weight (normalised over members; negative only for
            ``logprob_mean``).
        temperature: the member's own softmax temperature before pooling (> 0).
        vocab_size: ids below this are tokens of this member; logits at ids from here up to the
            shared vocabulary size are masked to ``-inf`` (None: the whole shared vocabulary).
    """

    name: str
    path: str
    weight: float = 1.0
    temperature: float = 1.0
    vocab_size: int | None = None

    @classmethod
    def _label(cls, data: dict[str, Any]) -> str:
        name = data.get("name")
        return f"member {name!r}" if isinstance(name, str) else "member"

    @field_validator("name", mode="before")
    @classmethod
    def _check_name(cls, value: Any) -> str:
        if not isinstance(value, str) or not _MEMBER_NAME.match(value):
            raise ManifestError(
                f"member name {value!r} must be an identifier of letters and underscores, "
                "without digits (vLLM allows one integer per layer name), e.g. 'smollm' or 'member_a'"
            )
        return value

    @field_validator("path", mode="before")
    @classmethod
    def _check_path(cls, value: Any, info: ValidationInfo) -> str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise ManifestError(f"{cls._label(info.data)} path must be a string, got {value!r}")
        if not value:
            raise ManifestError(f"{cls._label(info.data)} has an empty path")
        return value

    @field_validator("weight", "temperature", mode="before")
    @classmethod
    def _check_number(cls, value: Any, info: ValidationInfo) -> float:
        value = _finite(value, f"{cls._label(info.data)} {info.field_name}")
        if info.field_name == "temperature" and value <= 0:
            raise ManifestError(f"{cls._label(info.data)} temperature must be > 0, got {value}")
        return value

    @field_validator("vocab_size", mode="before")
    @classmethod
    def _check_vocab(cls, value: Any, info: ValidationInfo) -> int | None:
        return None if value is None else positive_int(value, f"{cls._label(info.data)} vocab_size")


class SpecialTokens(ManifestModel):
    """One token id per special role in the shared vocabulary (None where the role is absent).

    ``eot`` is the chat end-of-turn token (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``);
    generation stops at ``eos`` and ``eot`` unless a request sets ``ignore_eos``.
    """

    bos: int | None = None
    eos: int | None = None
    eot: int | None = None
    pad: int | None = None

    @classmethod
    def _label(cls, data: dict[str, Any]) -> str:
        return "special_tokens"

    @field_validator(*SPECIAL_ROLES, mode="before")
    @classmethod
    def _check_id(cls, value: Any, info: ValidationInfo) -> int | None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ManifestError(f"special token {info.field_name!r} must be a non-negative id or null, got {value!r}")
        return value

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a generation (eos, then eot), without duplicates."""
        ids: list[int] = []
        for value in (self.eos, self.eot):
            if value is not None and value not in ids:
                ids.append(value)
        return tuple(ids)


def _message(err: ValidationError, label: str) -> str:
    """The first problem pydantic found (unknown fields first) as one line naming its place."""
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    if first["type"] == "value_error":  # our validators' own messages, which name their field
        return str(first["ctx"]["error"])
    loc = first["loc"]
    if first["type"] in ("extra_forbidden", "missing") and len(loc) == 1:
        keys = ", ".join(str(e["loc"][0]) for e in errors if e["type"] == first["type"] and len(e["loc"]) == 1)
        return f"unknown {label} field(s): {keys}" if first["type"] == "extra_forbidden" else \
            f"{label} lacks field(s): {keys}"
    field = ".".join(str(p) for p in loc)
    return f"{label} field {field!r}: {first['msg']}, got {_show(first.get('input'))}"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
