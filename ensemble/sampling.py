"""Choosing the next token from a pooled distribution, the way vLLM's sampler does.

Pure functions over one row of pooled log-probabilities (``[V]`` float32); the only state is the
caller's seeded `torch.Generator`. The order follows vLLM's v1 sampler:

1. `logit_bias` added to the scores, then presence / frequency penalties from the tokens
   generated so far;
2. greedy (argmax) when ``temperature`` is (almost) 0;
3. otherwise divide by the temperature, apply min-p, then top-k, then top-p, and draw with the
   exponential race ``argmax(p / q), q ~ Exp(1)`` (equivalent to sampling from ``p``).

Reported log-probs are those of the pooled distribution itself, before any of these steps
(vLLM's default ``raw_logprobs``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

from ensemble.protocol import MAX_LOGPROBS, SAMPLING_EPS, EngineRequestError, SamplingOptions


def is_greedy(options: SamplingOptions) -> bool:
    """True when `options` asks for deterministic argmax decoding."""
    return options.temperature < SAMPLING_EPS


def check_options(options: SamplingOptions, vocab_size: int) -> None:
    """Raise EngineRequestError (one clear line) on sampling options the samplers cannot honour."""

    def bad(message: str) -> EngineRequestError:
        return EngineRequestError(message)

    if not isinstance(options.n, int) or options.n < 1:
        raise bad(f"n must be at least 1, got {options.n}")
    if not isinstance(options.max_tokens, int) or options.max_tokens < 1:
        raise bad(f"max_tokens must be at least 1, got {options.max_tokens}")
    if not (math.isfinite(options.temperature) and options.temperature >= 0):
        raise bad(f"temperature must be a finite number >= 0, got {options.temperature}")
    if not (0 < options.top_p <= 1):
        raise bad(f"top_p must be in (0, 1], got {options.top_p}")
    if not isinstance(options.top_k, int) or options.top_k < -1:
        raise bad(f"top_k must be -1, 0 (disabled) or a positive integer, got {options.top_k}")
    if not (0 <= options.min_p <= 1):
        raise bad(f"min_p must be in [0, 1], got {options.min_p}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(options, name)
        if not (-2 <= value <= 2):
            raise bad(f"{name} must be in [-2, 2], got {value}")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(options, name)
        if value is not None and not (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS):
            raise bad(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value}")
    if options.member is not None and (options.pooling is not None or options.weights is not None):
        raise bad(f"a request for member {options.member!r} alone takes no pooling rule or member weights")
    if len({token for token, _ in options.logit_bias}) != len(options.logit_bias):
        raise bad("logit_bias names a token id twice")
    for token, bias in options.logit_bias:
        if not 0 <= token < vocab_size:
            raise bad(f"logit_bias holds token id {token}, outside the vocabulary of {vocab_size}")
        if not math.isfinite(bias):
            raise bad(f"logit_bias for token {token} is {bias}, not a finite number")
    for token in options.stop_token_ids:
        if not (isinstance(token, int) and 0 <= token < vocab_size):
            raise bad(f"stop_token_ids holds {token}, outside the vocabulary of {vocab_size}")
    for stop in options.stop:
        if not isinstance(stop, str) or not stop:
            raise bad(f"stop strings must be non-empty strings, got {stop!r}")


def apply_penalties(scores: Tensor, output_token_ids: Sequence[int], presence: float, frequency: float) -> Tensor:
    """vLLM's OpenAI penalties: ``s - frequency * count - presence * (count > 0)`` per token,
    counting only generated (not prompt) tokens. Returns a new tensor."""
    if (presence == 0 and frequency == 0) or not output_token_ids:
        return scores
    counts = Counter(output_token_ids)
    ids = torch.tensor(list(counts.keys()), dtype=torch.long, device=scores.device)
    n = torch.tensor(list(counts.values()), dtype=scores.dtype, device=scores.device)
    out = scores.clone()
    out[ids] -= frequency * n + presence
    return out


def apply_logit_bias(scores: Tensor, bias: Sequence[tuple[int, float]]) -> Tensor:
    """``scores[id] += b`` for each (id, b) of `bias` (OpenAI's / vLLM's `logit_bias`)."""
    if not bias:
        return scores
    ids = torch.tensor([t for t, _ in bias], dtype=torch.long, device=scores.device)
    values = torch.tensor([b for _, b in bias], dtype=scores.dtype, device=scores.device)
    return scores.index_add(-1, ids, values)


def apply_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below ``min_p`` times the most likely one's."""
    if min_p <= 0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.max() * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k(logits: Tensor, top_k: int) -> Tensor:
    """Keep the `top_k` best tokens (ties at the boundary kept); 0 or -1 disables."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of best tokens whose probability reaches `top_p` (at least one)."""
    if top_p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1 - top_p
    drop_sorted[-1] = False  # the best token always survives
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def random_sample(probs: Tensor, generator: torch.Generator | None) -> int:
    """Draw one index from `probs` with the exponential race (what vLLM uses)."""
    q = torch.empty_like(probs).exponential_(generator=generator)
    return int(torch.argmax(probs / q))


def sample_token(
    pooled_logprobs: Tensor,
    options: SamplingOptions,
    output_token_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> int:
    """Choose the next token id from one row of pooled log-probabilities ``[V]``.

    `output_token_ids` are this completion's tokens so far (for the penalties); `generator` makes
    random draws reproducible (same seed, same tokens).
    """
    scores = apply_logit_bias(pooled_logprobs.to(torch.float32), options.logit_bias)
    scores = apply_penalties(scores, output_token_ids, options.presence_penalty, options.frequency_penalty)
    if is_greedy(options):
        return int(torch.argmax(scores))
    logits = scores / options.temperature
    logits = apply_min_p(logits, options.min_p)
    logits = apply_top_k(logits, options.top_k)
    logits = apply_top_p(logits, options.top_p)
    return random_sample(torch.softmax(logits, dim=-1), generator)


def top_logprobs(logprobs: Tensor, k: int) -> list[tuple[int, float]]:
    """The `k` most likely (token id, log-prob) pairs of a ``[V]`` row, best first."""
    if k <= 0:
        return []
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    return [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist())]
