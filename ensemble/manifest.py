"""The ensemble folder format: one frozen, validated manifest (`chorus_ensemble.json`).

An ensemble folder holds

* ``chorus_ensemble.json``: the `EnsembleManifest` (members, weights, pooling rule, shared
  vocabulary size, context length, special-token ids, where the tokenizer came from);
* the shared tokenizer files (``tokenizer.json``, ``tokenizer_config.json`` with the chat
  template), so any Hugging Face / vLLM loader can tokenize for the ensemble;
* ``config.json`` for vLLM, made by `hf_config` (the vLLM model class reads its members from it).

Members keep their own folders; nothing is copied. Member paths are stored absolute, or relative
to the ensemble folder, and `EnsembleManifest.load` resolves them to absolute paths.
Build folders with `ensemble.builder.build_ensemble` (or ``ensemble build`` on the command line).

The manifest and its parts are frozen pydantic models; bad input raises `ManifestError` with one
line naming the field. The parts (`MemberSpec`, `SpecialTokens`, `ManifestError`) live in
`ensemble.manifest_parts` and `hf_config` in `ensemble.hf_config`; all are importable from here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationInfo, field_serializer, field_validator, model_validator

from ensemble.hf_config import hf_config
from ensemble.manifest_parts import SPECIAL_ROLES, ManifestError, ManifestModel, MemberSpec, SpecialTokens, positive_int
from ensemble.pooling import DEFAULT_ALPHA, EntropyGate, check_alpha, check_rule, normalise_weights

__all__ = ["FORMAT_VERSION", "MANIFEST_FILE", "SPECIAL_ROLES", "EnsembleManifest", "ManifestError", "MemberSpec",
           "SpecialTokens", "check_members", "check_weights", "hf_config"]

MANIFEST_FILE = "chorus_ensemble.json"
FORMAT_VERSION = 1


class EnsembleManifest(ManifestModel):
    """Everything an engine needs to run an ensemble, validated on construction.

    Attributes:
        name: the served model name.
        members: the member models, in pooling order.
        rule: the default pooling rule (``prob_mean`` or ``logprob_mean``).
        vocab_size: size of the shared vocabulary (every pooled distribution has this width).
        max_model_len: the longest prompt + completion, the minimum over members.
        special_tokens: one id per role.
        tokenizer_from: the member whose tokenizer is the ensemble's.
        chat_template_from: the member whose chat template the ensemble uses (None: no template).
        contrastive_alpha: the plausibility threshold that pooling applies when a weight is
            negative (`ensemble.pooling`; 0: off).
        entropy_gate: ``logprob_mean`` only: weights that follow the members' entropies token by
            token (`ensemble.pooling.EntropyGate`), as `ensemble fit` chooses them. None (or all
            slopes zero): fixed weights.
        format_version: the folder format version.
    """

    name: str
    members: tuple[MemberSpec, ...]
    rule: str
    vocab_size: int
    max_model_len: int
    special_tokens: SpecialTokens = SpecialTokens()
    tokenizer_from: str | None = None
    chat_template_from: str | None = None
    contrastive_alpha: float = DEFAULT_ALPHA
    entropy_gate: EntropyGate | None = None
    format_version: int = FORMAT_VERSION

    @classmethod
    def _label(cls, data: dict[str, Any]) -> str:
        return "manifest"

    # ------------------------------------------------------------------ validation, field by field

    @field_validator("name", mode="before")
    @classmethod
    def _check_name(cls, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ManifestError("the ensemble needs a non-empty name")
        return value

    @field_validator("members")
    @classmethod
    def _check_members(cls, members: tuple[MemberSpec, ...]) -> tuple[MemberSpec, ...]:
        _check_member_names(members)
        return members

    @field_validator("rule", mode="before")
    @classmethod
    def _check_rule(cls, value: Any) -> str:
        check_rule(value)
        return value

    @field_validator("vocab_size", "max_model_len", mode="before")
    @classmethod
    def _check_size(cls, value: Any, info: ValidationInfo) -> int:
        return positive_int(value, info.field_name)

    @field_validator("special_tokens", mode="before")
    @classmethod
    def _no_special_tokens(cls, value: Any) -> Any:
        return SpecialTokens() if value is None else value

    @field_validator("contrastive_alpha", mode="before")
    @classmethod
    def _check_alpha(cls, value: Any) -> float:
        return check_alpha(value)

    @field_validator("entropy_gate", mode="plain")
    @classmethod
    def _check_gate(cls, value: Any, info: ValidationInfo) -> EntropyGate | None:
        if value is None:
            return None
        gate = _entropy_gate(value)
        if "members" not in info.data or "rule" not in info.data:
            return gate  # their own errors are the ones to report
        return _checked_gate(gate, info.data["members"], info.data["rule"])

    @field_validator("format_version", mode="before")
    @classmethod
    def _check_version(cls, value: Any) -> int:
        if value != FORMAT_VERSION or isinstance(value, bool):
            raise ManifestError(
                f"ensemble format version {value!r} is not supported (this chorus reads {FORMAT_VERSION})"
            )
        return value

    @field_serializer("entropy_gate")
    def _gate_as_dict(self, gate: EntropyGate | None) -> dict[str, Any] | None:
        return None if gate is None else {"centre": list(gate.centre), "slopes": [list(r) for r in gate.slopes]}

    # ------------------------------------------------------------------ validation across fields

    @model_validator(mode="after")
    def _check_together(self) -> EnsembleManifest:
        names = list(self.member_names)
        check_weights(list(self.weights), self.rule, names)
        for role in SPECIAL_ROLES:
            value = getattr(self.special_tokens, role)
            if value is not None and value >= self.vocab_size:
                raise ManifestError(
                    f"special token {role!r} id {value} is outside the shared vocabulary of {self.vocab_size}"
                )
        for m in self.members:
            if m.vocab_size is not None and m.vocab_size > self.vocab_size:
                raise ManifestError(
                    f"member {m.name!r} vocab_size {m.vocab_size} exceeds the shared vocabulary {self.vocab_size}"
                )
        for what in ("tokenizer_from", "chat_template_from"):
            value = getattr(self, what)
            if value is not None and value not in names:
                raise ManifestError(f"{what} {value!r} is not a member (members: {', '.join(names)})")
        return self

    # ------------------------------------------------------------------ views

    @property
    def member_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(m.weight for m in self.members)

    @property
    def temperatures(self) -> tuple[float, ...]:
        return tuple(m.temperature for m in self.members)

    def without_idle_members(self) -> EnsembleManifest:
        """A copy without the members of weight 0: under either rule they add nothing to the pool
        (bit for bit), so an engine whose weights are fixed (vLLM) need not load or run them."""
        keep = [i for i, m in enumerate(self.members) if m.weight != 0]
        if len(keep) == len(self.members):
            return self
        kept = tuple(self.members[i] for i in keep)
        names = {m.name for m in kept}
        gate = None if self.entropy_gate is None else EntropyGate(  # an idle member's slope column is 0
            tuple(self.entropy_gate.centre[i] for i in keep),
            tuple(tuple(self.entropy_gate.slopes[i][j] for j in keep) for i in keep))
        return self.updated(
            members=kept, entropy_gate=gate,
            tokenizer_from=self.tokenizer_from if self.tokenizer_from in names else None,
            chat_template_from=self.chat_template_from if self.chat_template_from in names else None,
        )

    def member(self, name: str) -> MemberSpec:
        """The member called `name`; ManifestError if there is none."""
        for m in self.members:
            if m.name == name:
                return m
        raise ManifestError(f"no member named {name!r} (members: {', '.join(self.member_names)})")

    def resolved(self, folder: str | Path) -> EnsembleManifest:
        """A copy whose member paths are absolute, relative ones taken from `folder`."""
        base = Path(folder).resolve()
        members = tuple(m.model_copy(update={"path": str((base / Path(m.path).expanduser()).resolve())})
                        for m in self.members)
        return self.model_copy(update={"members": members})

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the content of ``chorus_ensemble.json``)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EnsembleManifest:
        """Build and validate a manifest from `to_dict` output; ManifestError on bad input."""
        if not isinstance(data, Mapping):
            raise ManifestError(f"an ensemble manifest must be a JSON object, got {type(data).__name__}")
        return cls._validated(dict(data))

    def save(self, folder: str | Path) -> Path:
        """Write ``chorus_ensemble.json`` into `folder` (which must exist); return its path."""
        path = Path(folder) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> EnsembleManifest:
        """Read an ensemble folder's manifest, with member paths resolved to absolute paths."""
        folder = Path(folder)
        path = folder / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(f"{folder} is not an ensemble folder: {MANIFEST_FILE} is missing")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(data).resolved(folder)


def _entropy_gate(value: Any) -> EntropyGate:
    """`value` as an `EntropyGate`: one already, or its JSON object (``centre``, ``slopes``)."""
    if isinstance(value, EntropyGate):
        return value
    if not isinstance(value, Mapping) or set(value) != {"centre", "slopes"}:
        raise ManifestError("entropy_gate must be an object with 'centre' and 'slopes'")
    try:
        return EntropyGate(tuple(value["centre"]), tuple(tuple(r) for r in value["slopes"]))
    except (TypeError, ValueError) as err:
        raise ManifestError(f"entropy_gate: {err}") from None


def _checked_gate(gate: EntropyGate, members: tuple[MemberSpec, ...], rule: str) -> EntropyGate | None:
    """The entropy gate (None when its slopes are all zero); ManifestError unless it is for these
    members under ``logprob_mean`` and reads no member of weight 0 (engines drop such members, so
    their entropy cannot be read)."""
    if len(gate.centre) != len(members):
        raise ManifestError(f"entropy_gate is for {len(gate.centre)} members, the ensemble has {len(members)}")
    if gate.is_off:
        return None
    if rule != "logprob_mean":
        raise ManifestError(f"entropy_gate applies to rule 'logprob_mean' only, not {rule!r}")
    for j, m in enumerate(members):
        if m.weight == 0 and any(row[j] for row in gate.slopes):
            raise ManifestError(f"entropy_gate reads the entropy of member {m.name!r}, whose weight is 0")
    return gate


def _check_member_names(members: Sequence[MemberSpec]) -> None:
    if not members:
        raise ManifestError("an ensemble needs at least one member")
    names = [m.name for m in members]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ManifestError(f"member names must be unique; repeated: {', '.join(dupes)}")


def check_members(members: Sequence[MemberSpec], rule: str) -> None:
    """Raise ManifestError unless `rule` is a pooling rule and `members` could form an ensemble
    under it: at least one, unique names, weights that suit the rule (the manifest's own checks,
    for a caller that has no manifest yet)."""
    try:
        check_rule(rule)
    except ValueError as err:
        raise ManifestError(str(err)) from None
    _check_member_names(members)
    check_weights([m.weight for m in members], rule, [m.name for m in members])


def check_weights(weights: list[float], rule: str, names: list[str] | None = None) -> None:
    """Raise ManifestError unless `weights` suit `rule`: the pooling's own check
    (`ensemble.pooling.normalise_weights`: finite; >= 0 for prob_mean; a positive sum), with the
    members named."""
    names = names or [f"#{i}" for i in range(len(weights))]
    try:
        normalise_weights(weights, len(weights), rule)
    except ValueError as err:
        named = ", ".join(f"{name}={w}" for name, w in zip(names, weights))
        raise ManifestError(f"member weights ({named}): {err}") from None
