"""Run configuration for tokenizer transfer: frozen dataclasses loaded from YAML.

A config file has four sections (``model``, ``data``, ``train``, ``loss``, ``output``); any value
can be overridden on the command line with a dotted path (``train.lr=2e-5``,
``loss.terms=[sft]``), parsed as YAML. Every problem is reported as a one-line
:class:`~transfer.errors.ConfigError` naming the offending key.

Paths may be written as ``zoo:NAME`` (resolved through :mod:`transfer.zoo` by
:func:`resolve_model`, :func:`resolve_tokenizer`, :func:`resolve_text`); a student tokenizer
may also be ``bytes`` (the byte-level tokenizer).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import ConfigError

LOSS_TERMS = ("alm", "sft", "latents")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelConfig:
    """Which models and tokenizers take part.

    ``teacher``: the frozen model (HF folder or ``zoo:NAME``), scored with its own tokenizer.
    ``student``: the trained model; ``None`` means the teacher's weights (self-transfer).
    ``tokenizer``: the student's tokenizer (folder, ``zoo:NAME`` or ``bytes``); ``None`` keeps the
    student model's own tokenizer. When it differs from the student's own, the student is first
    initialised for it by FVT.
    """

    teacher: str
    student: Optional[str] = None
    tokenizer: Optional[str] = None


@dataclass(frozen=True)
class DataConfig:
    """Training / evaluation text.

    ``train``: one or more files (a YAML list), whose examples are pooled and shuffled together;
    ``eval``: one file. Each is a ``.txt`` file (cut into examples of ``chunk_bytes`` bytes at line
    or word boundaries) or a ``.jsonl`` file whose lines hold ``"text"`` or chat ``"messages"``.
    ``seq_len``: the token budget per example, enforced on both the teacher's and the
    student's tokenization.
    """

    train: tuple[str, ...]
    eval: Optional[str] = None
    format: Literal["auto", "text", "jsonl"] = "auto"
    seq_len: int = 512
    chunk_bytes: int = 0  # 0: 5 * seq_len
    seed: int = 0


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters (peft) on the student's projections, plus trainable embeddings and head."""

    r: int = 64
    alpha: int = 64
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    train_embeddings: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation. ``batch_size`` is the global number of examples per optimizer step; each
    process gets ``batch_size / (processes * grad_accum)`` per micro-batch."""

    steps: int = 5000
    lr: float = 1e-5
    embedding_lr: Optional[float] = None  # input/output embeddings' lr; None: train.lr
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    warmup_steps: int = 2000
    schedule: Literal["linear", "constant"] = "linear"
    clip: float = 1.0
    batch_size: int = 64
    grad_accum: int = 1
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where native (transfer.precision)
    full_finetune: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)
    seed: int = 0
    stop_after: Optional[int] = None  # end the run early after this step, as if it were killed


@dataclass(frozen=True)
class LossConfig:
    """Loss terms (``alm``, ``sft``, ``latents``), their weights or gradient balancing."""

    terms: tuple[str, ...] = ("alm",)
    weights: dict[str, float] = field(default_factory=dict)  # missing terms weigh 1.0
    balance: bool = False  # weight each term by 1 / ||grad|| over the last layer
    balance_every: int = 1  # refresh those weights every this many steps (each refresh: a backward per term)
    gamma: float = 0.1
    tau: float = 100.0
    distance: Literal["binary_kl", "binary_ce", "abs"] = "binary_kl"  # binary_kl: binary_ce minus its floor


@dataclass(frozen=True)
class OutputConfig:
    """Where the run writes, and how often it checkpoints / evaluates / logs."""

    dir: str = "runs/transfer"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 500
    eval_bytes: int = 50_000
    log_every: int = 1


@dataclass(frozen=True)
class RunConfig:
    """A whole transfer run."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def self_transfer(self) -> bool:
        """True when the student starts from the teacher's own weights."""
        return self.model.student is None or self.model.student == self.model.teacher

    def loss_weight(self, term: str) -> float:
        """The fixed weight of a loss term (1.0 unless configured)."""
        return float(self.loss.weights.get(term, 1.0))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), e.g. to write next to a run."""
        return _plain(dataclasses.asdict(self))


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
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(apply_overrides(raw, overrides))


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b.c=value`` override set (value parsed as YAML)."""
    out = _deepcopy(raw)
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
    """Build a :class:`RunConfig` from nested dicts and validate it."""
    cfg = _build(RunConfig, raw, "")
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Check value ranges and combinations; raise one-line :class:`ConfigError`."""
    t, lo, d, o = cfg.train, cfg.loss, cfg.data, cfg.output
    _positive("train.steps", t.steps)
    _positive("train.lr", t.lr)
    if t.embedding_lr is not None:
        _positive("train.embedding_lr", t.embedding_lr)
    _positive("train.batch_size", t.batch_size)
    _positive("train.grad_accum", t.grad_accum)
    _positive("data.seq_len", d.seq_len)
    if not d.train:
        raise ConfigError("data.train is empty: name at least one text or jsonl file")
    _positive("loss.tau", lo.tau)
    _positive("loss.balance_every", lo.balance_every)
    _positive("output.checkpoint_every", o.checkpoint_every)
    _positive("output.eval_every", o.eval_every)
    _positive("output.log_every", o.log_every)
    _positive("output.keep_checkpoints", o.keep_checkpoints)
    _positive("train.lora.r", t.lora.r)
    _positive("train.lora.alpha", t.lora.alpha)
    if d.seq_len < 2:
        raise ConfigError("data.seq_len must be at least 2 tokens")
    if d.chunk_bytes < 0:
        raise ConfigError("data.chunk_bytes must be >= 0")
    if o.eval_bytes < 0:
        raise ConfigError("output.eval_bytes must be >= 0")
    if t.warmup_steps < 0:
        raise ConfigError("train.warmup_steps must be >= 0")
    # warmup_steps > steps is allowed (a short probe of a long schedule): the rate never peaks.
    if not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), got {list(t.betas)}")
    if t.weight_decay < 0:
        raise ConfigError("train.weight_decay must be >= 0")
    if t.clip < 0:
        raise ConfigError("train.clip must be >= 0 (0 disables clipping)")
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be a multiple of train.grad_accum ({t.grad_accum})"
        )
    if t.stop_after is not None and not 0 < t.stop_after <= t.steps:
        raise ConfigError(f"train.stop_after must be in 1..train.steps ({t.steps})")
    if not 0.0 <= t.lora.dropout < 1.0:
        raise ConfigError("train.lora.dropout must be in [0, 1)")
    if not t.full_finetune and not t.lora.targets:
        raise ConfigError("train.lora.targets is empty: name the projections or set train.full_finetune=true")
    if not lo.terms:
        raise ConfigError(f"loss.terms is empty: choose from {list(LOSS_TERMS)}")
    for term in lo.terms:
        if term not in LOSS_TERMS:
            raise ConfigError(f"loss.terms: unknown term {term!r} (choose from {list(LOSS_TERMS)})")
    if len(set(lo.terms)) != len(lo.terms):
        raise ConfigError(f"loss.terms lists a term twice: {list(lo.terms)}")
    for term, weight in lo.weights.items():
        if term not in lo.terms:
            raise ConfigError(f"loss.weights.{term} is set but {term!r} is not in loss.terms")
        if weight < 0:
            raise ConfigError(f"loss.weights.{term} must be >= 0")
    if not 0.0 < lo.gamma < 1.0:
        raise ConfigError("loss.gamma must be in (0, 1)")
    if "latents" in lo.terms and not cfg.self_transfer:
        raise ConfigError("loss term 'latents' needs self-transfer (model.student unset or equal to model.teacher)")
    if lo.balance and len(lo.terms) < 2:
        raise ConfigError("loss.balance needs at least two loss terms")


# --------------------------------------------------------------------------------------------
# zoo: paths


def _zoo():
    from . import zoo  # the lead's module; only needed for zoo: specs

    return zoo


def _zoo_path(kind: str, name: str) -> Path:
    """The zoo's `kind` (model_dir, tokenizer_dir, corpus_path) for `name`; ConfigError if unknown."""
    try:
        return Path(getattr(_zoo(), kind)(name))
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


# --------------------------------------------------------------------------------------------
# helpers


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _deepcopy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _convert(hints[name], raw[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _build(hints[name], {}, f"{prefix}{name}.")
            else:
                raise ConfigError(f"missing required config key {prefix}{name}")
    return cls(**kwargs)


def _convert(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, name)
    if value is None:
        raise ConfigError(f"{name} must not be empty")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {list(args)}, got {_show(value)}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {_show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{name}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{name} must have {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {_show(value)}")
        return {str(k): _convert(args[1], v, f"{name}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name} must be an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name} must be a string, got {_show(value)}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {name}")  # a bug in this module


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
