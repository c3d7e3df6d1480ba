"""The contract between an ensemble engine and its callers (the server, benchmarks, tests).

Both engines, the plain PyTorch reference (`ensemble.reference`) and the vLLM one
(`ensemble.vllm_engine`), implement `Engine`. The shapes follow vLLM's own
`SamplingParams` / `RequestOutput` so the vLLM adapter is a thin translation, and the server
never needs to know which engine it talks to.

Outputs are *cumulative*: every `RequestOutput` yielded by `Engine.generate` carries the whole
text and all token ids produced so far for each of the `n` completions, like vLLM's default
`RequestOutputKind.CUMULATIVE`. A streaming caller computes deltas itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args, runtime_checkable

if TYPE_CHECKING:
    from ensemble.manifest import EnsembleManifest

PoolingRule = Literal["prob_mean", "logprob_mean"]
POOLING_RULES: tuple[str, ...] = get_args(PoolingRule)
ALONE = "alone"  # engines' internal rule for a request that names one member: its own distribution
FinishReason = Literal["stop", "length", "abort"]
StructuredKind = Literal["json", "json_object", "regex", "choice", "grammar"]
STRUCTURED_KINDS: tuple[str, ...] = get_args(StructuredKind)
SAMPLING_EPS = 1e-5  # temperatures below this decode greedily (vLLM's constant)
MAX_LOGPROBS = 20  # the most top alternatives a request may ask for (vLLM's default max_logprobs)


class EngineRequestError(ValueError):
    """A request the engine cannot serve as asked (the server answers 400 with this message)."""


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on a completion's text, enforced by a grammar at every decoding step (vLLM's
    `StructuredOutputsParams`): only tokens that keep the text a prefix of the language are
    allowed, and end-of-sequence only where the text is complete.

    `kind` and `spec`:

    - ``json``: `spec` is a JSON Schema, as JSON text (so the options stay hashable);
    - ``json_object``: any JSON object; `spec` is None;
    - ``regex``: `spec` is the pattern the whole text must match;
    - ``choice``: `spec` is a tuple of the strings the text may be;
    - ``grammar``: `spec` is a context-free grammar (EBNF, or Lark, as vLLM takes it).

    The vLLM engine translates it (`ensemble.vllm_translate`); the reference engine has no grammar
    backend and refuses it.
    """

    kind: StructuredKind
    spec: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(STRUCTURED_KINDS)}, got {self.kind!r}")
        if self.kind == "json_object":
            if self.spec is not None:
                raise ValueError("a json_object constraint takes no spec")
        elif self.kind == "choice":
            if not (isinstance(self.spec, tuple) and self.spec and all(isinstance(c, str) for c in self.spec)):
                raise ValueError("a choice constraint needs a non-empty tuple of strings")
        elif not (isinstance(self.spec, str) and self.spec):
            raise ValueError(f"a {self.kind} constraint needs its spec as non-empty text")


@dataclass(frozen=True)
class SamplingOptions:
    """What to generate for one request. Field meanings follow vLLM's `SamplingParams`."""

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables top-k
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives of the *pooled* distribution per token
    prompt_logprobs: int | None = None  # same, for the prompt tokens (used by `echo`)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the pooled logits
    priority: int = 0  # scheduling priority, lower first (vLLM's); non-zero needs a priority-scheduling engine
    structured_outputs: StructuredOutput | None = None  # a grammar the text must follow (vLLM engine only)
    # Ensemble extras.
    pooling: PoolingRule | None = None  # per-request rule; None = the ensemble's own
    weights: tuple[float, ...] | None = None  # per-request member weights; None = the ensemble's own
    member_logprobs: bool = False  # report each member's log-prob of the chosen token
    # Serve this member alone (a request for it by name): its own next-token distribution, at
    # temperature 1 and without pooling; None = the ensemble.
    member: str | None = None


@dataclass
class TokenLogprob:
    """Log-probability information for one sampled (or prompt) token."""

    token_id: int
    logprob: float  # under the pooled distribution
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, pooled log-prob), best first
    member_logprobs: dict[str, float] | None = None  # member name -> that member's log-prob


@dataclass
class CompletionOutput:
    """One of the `n` completions of a request, cumulative so far."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it


@dataclass
class RequestOutput:
    """The state of a request after an engine step."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first entry None: never scored


@dataclass(frozen=True)
class EngineStats:
    """Engine load, exported as Prometheus metrics by the server (see `server.metrics`).

    The first three fields are instantaneous gauges. The rest are optional ensemble counters,
    cumulative since the engine started; None means the engine does not measure them (the server
    then exports no `chorus:` series for them).
    """

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1
    pooled_tokens: int | None = None  # next-token distributions pooled (rows)
    agreement_rows: int | None = None  # of those, rows on which member agreement was counted
    member_agreement: dict[str, int] | None = None  # member name -> of those, rows whose pooled top-1 was its own
    pooling_seconds: float | None = None  # time spent pooling member distributions
    pooling_steps: int | None = None  # engine steps that pooled (the count behind pooling_seconds)
    prefix_cache_queries: int | None = None  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int | None = None  # of those, tokens found there (their KV was reused)
    spec_decode_drafts: int | None = None  # speculative decoding: draft runs (None: not drafting)
    spec_decode_draft_tokens: int | None = None  # tokens proposed
    spec_decode_accepted_tokens: int | None = None  # of those, tokens the ensemble accepted


@runtime_checkable
class Engine(Protocol):
    """A running ensemble that turns prompts into pooled generations.

    An engine may also offer ``async check_health() -> None`` that raises when it can no longer
    serve (both chorus engines do; the server's `/health` and its watchdog call it).

    ``info["structured_outputs"]`` is truthy (the grammar backend's name) when the engine enforces
    `SamplingOptions.structured_outputs`; an engine without it refuses such requests with
    `EngineRequestError`, and the server refuses them before any work.
    """

    model_name: str
    max_model_len: int
    tokenizer: Any  # a Hugging Face PreTrainedTokenizerBase
    info: dict[str, Any]  # members, weights, rule, chat template presence: shown by /v1/models

    def generate(
        self, prompt_token_ids: list[int], options: SamplingOptions, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Start a request and yield its cumulative state until `finished` is True."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its KV cache; its generator ends with finish_reason 'abort'."""
        ...

    def stats(self) -> EngineStats:
        """Current load."""
        ...

    async def shutdown(self) -> None:
        """Abort everything in flight and release the engine's resources."""
        ...


def engine_info(engine: str, manifest: EnsembleManifest, tokenizer: Any, *, max_model_len: int, dtype: Any,
                **settings: Any) -> dict[str, Any]:
    """An engine's `Engine.info`: what every engine reports (its kind, the manifest's members,
    rule and weights, the context length, whether the tokenizer has a chat template, the dtype),
    then its own `settings` (e.g. ``scheduling_policy``, ``structured_outputs``)."""
    return {
        "engine": engine,
        "members": [{"name": m.name, "path": m.path, "weight": m.weight, "temperature": m.temperature}
                    for m in manifest.members],
        "rule": manifest.rule,
        "weights": list(manifest.weights),
        "vocab_size": manifest.vocab_size,
        "max_model_len": max_model_len,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "dtype": str(dtype).removeprefix("torch."),
        **settings,
    }
