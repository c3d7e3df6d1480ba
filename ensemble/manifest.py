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
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ensemble.pooling import DEFAULT_ALPHA, POOLING_RULES, EntropyGate, check_alpha, normalise_weights

MANIFEST_FILE = "chorus_ensemble.json"
FORMAT_VERSION = 1
SPECIAL_ROLES = ("bos", "eos", "eot", "pad")

# vLLM asserts that a layer name holds at most one integer (the layer index), so member names,
# which become module prefixes, must hold none.
_MEMBER_NAME = re.compile(r"^[A-Za-z_][A-Za-z_]*$")


class ManifestError(ValueError):
    """An ensemble definition or folder that is invalid; the message says what and where."""


@dataclass(frozen=True)
class MemberSpec:
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

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _MEMBER_NAME.match(self.name):
            raise ManifestError(
                f"member name {self.name!r} must be an identifier of letters and underscores, "
                "without digits (vLLM allows one integer per layer name), e.g. 'smollm' or 'member_a'"
            )
        if not str(self.path):
            raise ManifestError(f"member {self.name!r} has an empty path")
        object.__setattr__(self, "path", str(self.path))
        for what in ("weight", "temperature"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ManifestError(f"member {self.name!r} {what} must be a finite number, got {value!r}")
            object.__setattr__(self, what, float(value))
        if self.temperature <= 0:
            raise ManifestError(f"member {self.name!r} temperature must be > 0, got {self.temperature}")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size < 1):
            raise ManifestError(f"member {self.name!r} vocab_size must be a positive integer, got {self.vocab_size!r}")


@dataclass(frozen=True)
class SpecialTokens:
    """One token id per special role in the shared vocabulary (None where the role is absent).

    ``eot`` is the chat end-of-turn token (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``);
    generation stops at ``eos`` and ``eot`` unless a request sets ``ignore_eos``.
    """

    bos: int | None = None
    eos: int | None = None
    eot: int | None = None
    pad: int | None = None

    def __post_init__(self) -> None:
        for role in SPECIAL_ROLES:
            value = getattr(self, role)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ManifestError(f"special token {role!r} must be a non-negative id or null, got {value!r}")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a generation (eos, then eot), without duplicates."""
        ids: list[int] = []
        for value in (self.eos, self.eot):
            if value is not None and value not in ids:
                ids.append(value)
        return tuple(ids)


@dataclass(frozen=True)
class EnsembleManifest:
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
    special_tokens: SpecialTokens = field(default_factory=SpecialTokens)
    tokenizer_from: str | None = None
    chat_template_from: str | None = None
    contrastive_alpha: float = DEFAULT_ALPHA
    entropy_gate: EntropyGate | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ManifestError("the ensemble needs a non-empty name")
        members = tuple(self.members)
        object.__setattr__(self, "members", members)
        if not members:
            raise ManifestError("an ensemble needs at least one member")
        if not all(isinstance(m, MemberSpec) for m in members):
            raise ManifestError("members must be MemberSpec instances")
        names = [m.name for m in members]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ManifestError(f"member names must be unique; repeated: {', '.join(dupes)}")
        if self.rule not in POOLING_RULES:
            raise ManifestError(f"unknown pooling rule {self.rule!r}; expected one of {', '.join(POOLING_RULES)}")
        check_weights([m.weight for m in members], self.rule, names)
        try:
            object.__setattr__(self, "contrastive_alpha", check_alpha(self.contrastive_alpha))
        except ValueError as err:
            raise ManifestError(str(err)) from None
        if self.entropy_gate is not None:
            object.__setattr__(self, "entropy_gate", _checked_gate(self.entropy_gate, members, self.rule))
        for what in ("vocab_size", "max_model_len"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ManifestError(f"{what} must be a positive integer, got {value!r}")
        if not isinstance(self.special_tokens, SpecialTokens):
            raise ManifestError("special_tokens must be a SpecialTokens instance")
        for role in SPECIAL_ROLES:
            value = getattr(self.special_tokens, role)
            if value is not None and value >= self.vocab_size:
                raise ManifestError(
                    f"special token {role!r} id {value} is outside the shared vocabulary of {self.vocab_size}"
                )
        for m in members:
            if m.vocab_size is not None and m.vocab_size > self.vocab_size:
                raise ManifestError(
                    f"member {m.name!r} vocab_size {m.vocab_size} exceeds the shared vocabulary {self.vocab_size}"
                )
        for what in ("tokenizer_from", "chat_template_from"):
            value = getattr(self, what)
            if value is not None and value not in names:
                raise ManifestError(f"{what} {value!r} is not a member (members: {', '.join(names)})")
        if self.format_version != FORMAT_VERSION:
            raise ManifestError(
                f"ensemble format version {self.format_version} is not supported (this chorus reads {FORMAT_VERSION})"
            )

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
        return replace(
            self, members=kept, entropy_gate=gate,
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
        members = tuple(replace(m, path=str((base / Path(m.path).expanduser()).resolve())) for m in self.members)
        return replace(self, members=members)

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the content of ``chorus_ensemble.json``)."""
        out = asdict(self)
        out["members"] = [asdict(m) for m in self.members]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EnsembleManifest:
        """Build and validate a manifest from `to_dict` output; ManifestError on bad input."""
        if not isinstance(data, Mapping):
            raise ManifestError(f"an ensemble manifest must be a JSON object, got {type(data).__name__}")
        known = {"name", "members", "rule", "vocab_size", "max_model_len", "special_tokens",
                 "tokenizer_from", "chat_template_from", "contrastive_alpha", "entropy_gate", "format_version"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ManifestError(f"unknown manifest field(s): {', '.join(unknown)}")
        missing = sorted({"name", "members", "rule", "vocab_size", "max_model_len"} - set(data))
        if missing:
            raise ManifestError(f"manifest lacks field(s): {', '.join(missing)}")
        raw_members = data["members"]
        if not isinstance(raw_members, list):
            raise ManifestError("manifest 'members' must be a list")
        members = []
        for i, raw in enumerate(raw_members):
            if not isinstance(raw, Mapping) or "name" not in raw or "path" not in raw:
                raise ManifestError(f"member #{i} must be an object with at least 'name' and 'path'")
            extra = sorted(set(raw) - {"name", "path", "weight", "temperature", "vocab_size"})
            if extra:
                raise ManifestError(f"member {raw['name']!r} has unknown field(s): {', '.join(extra)}")
            members.append(MemberSpec(**raw))
        specials = data.get("special_tokens") or {}
        if not isinstance(specials, Mapping) or set(specials) - set(SPECIAL_ROLES):
            raise ManifestError(f"special_tokens must map roles {', '.join(SPECIAL_ROLES)} to ids, got {specials!r}")
        fields = {k: v for k, v in data.items() if k not in ("members", "special_tokens")}
        gate = fields.get("entropy_gate")
        if gate is not None:
            if not isinstance(gate, Mapping) or set(gate) != {"centre", "slopes"}:
                raise ManifestError("entropy_gate must be an object with 'centre' and 'slopes'")
            try:
                fields["entropy_gate"] = EntropyGate(tuple(gate["centre"]), tuple(tuple(r) for r in gate["slopes"]))
            except (TypeError, ValueError) as err:
                raise ManifestError(f"entropy_gate: {err}") from None
        return cls(members=tuple(members), special_tokens=SpecialTokens(**specials), **fields)

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


def _checked_gate(gate: Any, members: tuple[MemberSpec, ...], rule: str) -> EntropyGate | None:
    """The entropy gate (None when its slopes are all zero); ManifestError unless it is an
    `EntropyGate` for these members under ``logprob_mean`` that reads no member of weight 0
    (engines drop such members, so their entropy cannot be read)."""
    if not isinstance(gate, EntropyGate):
        raise ManifestError(f"entropy_gate must be an EntropyGate, got {type(gate).__name__}")
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


def _transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "5.0.0"


def hf_config(manifest: EnsembleManifest) -> dict[str, Any]:
    """The ``config.json`` that makes an ensemble folder loadable by vLLM.

    vLLM reads the architecture and sizes from here; the vLLM model class finds its members in
    the ``chorus`` entry (the manifest as a dict). Callers may extend the dict.
    """
    special = manifest.special_tokens
    config: dict[str, Any] = {
        "architectures": ["EnsembleForCausalLM"],
        "model_type": "chorus_ensemble",
        "chorus": manifest.to_dict(),
        "vocab_size": manifest.vocab_size,
        "max_position_embeddings": manifest.max_model_len,
        "torch_dtype": "float32",
        # Marks the folder as written for transformers 5 (which also silences a tokenizer check
        # that otherwise treats unknown local configs as old Mistral checkpoints).
        "transformers_version": _transformers_version(),
    }
    for role in ("bos", "eos", "pad"):
        value = getattr(special, role)
        if value is not None:
            config[f"{role}_token_id"] = value
    # Sizes vLLM derives its buffers and checks from (read from the members' own config.json,
    # so member paths must resolve, as they do after plan_ensemble / EnsembleManifest.load).
    # The ensemble's hidden state is the members' hidden states side by side, so hidden_size is
    # their sum; head counts are gcds, so a tensor-parallel size divides them exactly when it
    # divides every member's; the ensemble owns no embedding, so nothing is tied.
    from transformers import AutoConfig

    texts = []
    for member in manifest.members:
        try:
            texts.append(AutoConfig.from_pretrained(member.path).get_text_config())
        except (OSError, ValueError) as err:
            raise ManifestError(f"member {member.name!r}: cannot read the config.json in {member.path}: {err}") from None
    heads = [int(t.num_attention_heads) for t in texts]
    config.update(
        hidden_size=sum(int(t.hidden_size) for t in texts),
        num_hidden_layers=sum(int(t.num_hidden_layers) for t in texts),
        num_attention_heads=math.gcd(*heads),
        num_key_value_heads=math.gcd(*(int(getattr(t, "num_key_value_heads", None) or h)
                                        for t, h in zip(texts, heads))),
        head_dim=max(int(getattr(t, "head_dim", None) or t.hidden_size // h) for t, h in zip(texts, heads)),
        tie_word_embeddings=False,
    )
    return config
