"""Run configuration for tokenizer transfer: frozen pydantic models loaded from YAML.

A config file has five sections (``model``, ``data``, ``train``, ``loss``, ``output``); any value
can be overridden on the command line with a dotted path (``train.lr=2e-5``,
``loss.terms=[sft]``), parsed as YAML. Every problem is reported as a one-line
:class:`~transfer.errors.ConfigError` naming the offending key.

Each section is a frozen pydantic model; values keep their YAML types (strict validation, plus
the few conversions of :data:`Int`, :data:`Float`, :data:`Str` and :data:`Strs`).

Paths may be written as ``zoo:NAME`` (resolved through :mod:`transfer.zoo` by
:func:`resolve_model`, :func:`resolve_tokenizer`, :func:`resolve_text`); a student tokenizer
may also be ``bytes`` (the byte-level tokenizer).
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, model_validator
from pydantic_core import ErrorDetails

from .errors import ConfigError

LOSS_TERMS = ("alm", "sft", "latents")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------
# Value types: strict, plus the few conversions YAML needs


def _numeric(value: Any) -> Any:
    """A numeric string as its float (YAML 1.1 reads ``1e-5``, without a dot, as a string)."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


Int = Annotated[int, Strict(), BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)]
"""An integer; a whole float (``5.0``) too."""
Float = Annotated[float, Strict(), BeforeValidator(_numeric)]
"""A number: a float, an integer or a numeric string."""
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict(), BeforeValidator(lambda v: v if v is None or isinstance(v, (dict, list)) else str(v))]
"""A string; any other scalar as its text (``2024`` -> ``"2024"``)."""
Strs = Annotated[tuple[Str, ...], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)]
"""A list of strings; a single string is a list of one."""


class _Section(BaseModel):
    """A config section: immutable, refuses unknown keys; an empty YAML section (``None``) is ``{}``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _empty_is_default(cls, raw: Any) -> Any:
        return {} if raw is None else raw


class ModelConfig(_Section):
    """Which models and tokenizers take part.

    ``teacher``: the frozen model (HF folder or ``zoo:NAME``), scored with its own tokenizer.
    ``student``: the trained model; ``None`` means the teacher's weights (self-transfer).
    ``tokenizer``: the student's tokenizer (folder, ``zoo:NAME`` or ``bytes``); ``None`` keeps the
    student model's own tokenizer. When it differs from the student's own, the student is first
    initialised for it by FVT.
    """

    teacher: Str
    student: Optional[Str] = None
    tokenizer: Optional[Str] = None


class DataConfig(_Section):
    """Training / evaluation text.

    ``train``: one or more files (a YAML list), whose examples are pooled and shuffled together;
    ``eval``: one file. Each is a ``.txt`` file (cut into examples of ``chunk_bytes`` bytes at line
    or word boundaries) or a ``.jsonl`` file whose lines hold ``"text"`` or chat ``"messages"``.
    ``seq_len``: the token budget per example, enforced on both the teacher's and the
    student's tokenization.
    """

    train: Strs
    eval: Optional[Str] = None
    format: Literal["auto", "text", "jsonl"] = "auto"
    seq_len: Int = Field(512, ge=2)
    chunk_bytes: Int = Field(0, ge=0)  # 0: 5 * seq_len
    seed: Int = 0

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not self.train:
            raise ValueError("data.train is empty: name at least one text or jsonl file")
        return self


class LoraSettings(_Section):
    """LoRA adapters (peft) on the student's projections, plus trainable embeddings and head."""

    r: Int = Field(64, gt=0)
    alpha: Int = Field(64, gt=0)
    dropout: Float = Field(0.0, ge=0, lt=1)
    targets: Strs = DEFAULT_LORA_TARGETS
    train_embeddings: Bool = True


class TrainConfig(_Section):
    """Optimisation. ``batch_size`` is the global number of examples per optimizer step; each
    process gets ``batch_size / (processes * grad_accum)`` per micro-batch. ``warmup_steps`` may
    exceed ``steps`` (a short probe of a long schedule: the rate never peaks)."""

    steps: Int = Field(5000, gt=0)
    lr: Float = Field(1e-5, gt=0)
    embedding_lr: Optional[Annotated[Float, Field(gt=0)]] = None  # input/output embeddings' lr; None: train.lr
    betas: tuple[Float, ...] = (0.9, 0.95)
    weight_decay: Float = Field(0.01, ge=0)
    warmup_steps: Int = Field(2000, ge=0)
    schedule: Literal["linear", "constant"] = "linear"
    clip: Float = Field(1.0, ge=0, description="0 disables clipping")
    batch_size: Int = Field(64, gt=0)
    grad_accum: Int = Field(1, gt=0)
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where native (transfer.precision)
    full_finetune: Bool = False
    lora: LoraSettings = LoraSettings()
    seed: Int = 0
    stop_after: Optional[Int] = None  # end the run early after this step, as if it were killed

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if len(self.betas) != 2:
            raise ValueError(f"train.betas must have 2 items, got {len(self.betas)}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be a multiple of "
                        f"train.grad_accum ({self.grad_accum})")
        if self.stop_after is not None and not 0 < self.stop_after <= self.steps:
            raise ValueError(f"train.stop_after must be in 1..train.steps ({self.steps})")
        if not self.full_finetune and not self.lora.targets:
            raise ValueError("train.lora.targets is empty: name the projections or set train.full_finetune=true")
        return self


class LossConfig(_Section):
    """Loss terms (``alm``, ``sft``, ``latents``), their weights or gradient balancing."""

    terms: Strs = ("alm",)
    weights: dict[Str, Annotated[Float, Field(ge=0)]] = {}  # missing terms weigh 1.0
    balance: Bool = False  # weight each term by 1 / ||grad|| over the last layer
    balance_every: Int = Field(1, gt=0)  # refresh those weights every this many steps (a backward per term)
    gamma: Float = Field(0.1, gt=0, lt=1)
    tau: Float = Field(100.0, gt=0)
    distance: Literal["binary_kl", "binary_ce", "abs"] = "binary_kl"  # binary_kl: binary_ce minus its floor

    @model_validator(mode="after")
    def _check(self) -> LossConfig:
        if not self.terms:
            raise ValueError(f"loss.terms is empty: choose from {list(LOSS_TERMS)}")
        for term in self.terms:
            if term not in LOSS_TERMS:
                raise ValueError(f"loss.terms: unknown term {term!r} (choose from {list(LOSS_TERMS)})")
        if len(set(self.terms)) != len(self.terms):
            raise ValueError(f"loss.terms lists a term twice: {list(self.terms)}")
        for term in self.weights:
            if term not in self.terms:
                raise ValueError(f"loss.weights.{term} is set but {term!r} is not in loss.terms")
        if self.balance and len(self.terms) < 2:
            raise ValueError("loss.balance needs at least two loss terms")
        if self.balance_every != 1 and not self.balance:
            raise ValueError(f"loss.balance_every is {self.balance_every} but loss.balance is false: "
                             "there are no balancing factors to refresh")
        return self


class OutputConfig(_Section):
    """Where the run writes, and how often it checkpoints / evaluates / logs."""

    dir: Str = "runs/transfer"
    checkpoint_every: Int = Field(500, gt=0)
    keep_checkpoints: Int = Field(2, gt=0)
    eval_every: Int = Field(500, gt=0)
    eval_bytes: Int = Field(50_000, ge=0)
    log_every: Int = Field(1, gt=0)


class RunConfig(_Section):
    """A whole transfer run."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    loss: LossConfig = LossConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="before")
    @classmethod
    def _required_sections(cls, raw: Any) -> Any:
        """``model`` and ``data`` left out are empty, so the error names the key they lack."""
        raw = {} if raw is None else raw
        return {"model": {}, "data": {}, **raw} if isinstance(raw, dict) else raw

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if "latents" in self.loss.terms and not self.self_transfer:
            raise ValueError("loss term 'latents' needs self-transfer (model.student unset or equal to model.teacher)")
        return self

    @property
    def self_transfer(self) -> bool:
        """True when the student starts from the teacher's own weights."""
        return self.model.student is None or self.model.student == self.model.teacher

    def loss_weight(self, term: str) -> float:
        """The fixed weight of a loss term (1.0 unless configured)."""
        return float(self.loss.weights.get(term, 1.0))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), e.g. to write next to a run."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config, apply dotted ``key=value`` overrides, build and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"config {path} is not valid YAML{where}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(apply_overrides(raw, overrides))


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b.c=value`` override set (value parsed as YAML)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from nested dicts; the first problem (an unknown
    key before any other) becomes a one-line :class:`ConfigError`."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise ConfigError(_message(errors[0])) from None


# --------------------------------------------------------------------------------------------
# Validation errors as one line naming the dotted key

_TYPE_WORDS = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
               "string_type": "a string", "tuple_type": "a list", "dict_type": "a mapping", "model_type": "a mapping"}


def _message(err: ErrorDetails) -> str:
    """One pydantic error as a sentence that starts with (or names) its dotted key."""
    kind, loc, value, ctx = err["type"], err["loc"], err.get("input"), err.get("ctx") or {}
    name = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "config"
    section, field = _lookup(loc)
    if kind == "value_error":  # a model validator's cross-field rule, whose message names its keys
        return str(ctx["error"])
    if kind == "missing":
        return f"missing required config key {name}"
    if kind == "extra_forbidden":
        known = list(section.model_fields) if section else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {name[: -len(str(loc[-1]))]}{close[0]}?" if close else f"known: {', '.join(known)}"
        return f"unknown config key {name} ({hint})"
    if value is None and (kind in _TYPE_WORDS or kind == "literal_error"):
        return f"{name} must not be empty"
    if kind in _TYPE_WORDS:
        return f"{name} must be {_TYPE_WORDS[kind]}, got {_show(value)}"
    if kind == "literal_error":
        choices = list(get_args(field.annotation)) if field else ctx.get("expected")
        return f"{name} must be one of {choices}, got {_show(value)}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        note = f" ({field.description})" if field and field.description else ""
        return f"{name} must be {_range(field, ctx)}, got {_show(value)}{note}"
    return f"{name}: {err['msg']}, got {_show(value)}"


def _lookup(loc: tuple[int | str, ...]) -> tuple[Any, Any]:
    """The section model holding the key at ``loc`` and that key's ``FieldInfo``; (None, None) where
    ``loc`` leads into a list or a mapping, and no ``FieldInfo`` for an unknown key."""
    section: Any = RunConfig
    for part in loc[:-1]:
        field = section.model_fields.get(part) if isinstance(part, str) else None
        section = field.annotation if field else None
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            return None, None
    return section, section.model_fields.get(loc[-1]) if loc else None


def _range(field: Any, ctx: dict[str, Any]) -> str:
    """``> 0``, ``>= 2`` or, bounded on both sides, ``in [0, 1)``: every bound of the key, not only
    the broken one (from its ``FieldInfo``, else from the error)."""
    metadata = field.metadata if field else ()
    b = {n: getattr(m, n) for m in metadata for n in ("gt", "ge", "lt", "le") if hasattr(m, n)} or ctx
    low = ("(", ">", b["gt"]) if "gt" in b else ("[", ">=", b["ge"]) if "ge" in b else None
    high = (")", "<", b["lt"]) if "lt" in b else ("]", "<=", b["le"]) if "le" in b else None
    if low and high:
        return f"in {low[0]}{low[2]}, {high[2]}{high[0]}"
    _, op, bound = low or high
    return f"{op} {bound}"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------------------------
# zoo: paths


def _zoo_path(kind: str, name: str) -> Path:
    """The zoo's `kind` (model_dir, tokenizer_dir, corpus_path) for `name`; ConfigError if unknown."""
    from . import zoo  # the lead's module; only needed for zoo: specs

    try:
        return Path(getattr(zoo, kind)(name))
    except ValueError as err:  # an unknown zoo name: the zoo's message lists the known ones
        raise ConfigError(f"zoo:{name}: {err}") from None


def resolve_model(spec: str) -> Path:
    """A model folder from a path or ``zoo:NAME``; error if it is not an HF model folder."""
    path = _zoo_path("model_dir", spec[4:]) if spec.startswith("zoo:") else Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"model folder {path} not found or has no config.json")
    return path


def resolve_tokenizer(spec: str) -> Path | str:
    """A tokenizer folder from a path or ``zoo:NAME``; ``bytes`` stays ``"bytes"``."""
    if spec == "bytes":
        return spec
    path = _zoo_path("tokenizer_dir", spec[4:]) if spec.startswith("zoo:") else Path(spec).expanduser()
    if not path.is_dir() or not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ConfigError(f"tokenizer folder {path} not found or holds no tokenizer files")
    return path


def resolve_text(spec: str) -> Path:
    """A text/jsonl file from a path or ``zoo:train`` / ``zoo:heldout``."""
    path = _zoo_path("corpus_path", spec[4:]) if spec.startswith("zoo:") else Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"data file {path} not found")
    return path
