"""From an OpenAI request body to the engine's `SamplingOptions`, with the checks that need the
engine (vocabulary, context length, member names) and clear 400s for what chorus cannot honour."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ensemble.protocol import SAMPLING_EPS, SamplingOptions, StructuredOutput
from server.errors import APIError, bad_request
from server.protocol import MAX_SEQUENCES, ChatCompletionRequest, CompletionRequest


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """`stop` as a tuple of non-empty strings."""
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else list(stop)
    for item in items:
        if not item:
            raise bad_request("'stop' strings must be non-empty", param="stop")
    return tuple(items)


def check_sequences(prompts: int, n: int) -> None:
    """400 when one request asks for more than `MAX_SEQUENCES` sequences (prompts × n)."""
    if prompts * n > MAX_SEQUENCES:
        raise bad_request(f"this request asks for {prompts * n} sequences ({prompts} prompt(s) × n={n}); at most "
                          f"{MAX_SEQUENCES} per request: split it", param="n")


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    """400 if any id is outside the vocabulary."""
    for t in ids:
        if not 0 <= t < vocab_size:
            raise bad_request(f"'{param}' holds token id {t}, outside the vocabulary of {vocab_size}", param=param)


def logit_bias(asked: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as sorted (token id, bias) pairs, biases clamped to [-100, 100] (vLLM's rule);
    keys that name the same id ("5", "05") keep the last one given, as vLLM's server does; 400
    for a key that is not a token id of the vocabulary."""
    biases: dict[int, float] = {}
    for key, bias in (asked or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"'logit_bias' keys must be token ids, got {key[:40]!r}", param="logit_bias") from None
        biases[token] = max(-100.0, min(100.0, float(bias)))
    check_token_ids(list(biases), vocab_size, "logit_bias")
    return tuple(sorted(biases.items()))


def member_weights(asked: list[float] | dict[str, float] | None, members: list[str]) -> tuple[float, ...] | None:
    """Per-request weights in member order, from a list or a {name: weight} object."""
    if asked is None:
        return None
    if isinstance(asked, dict):
        unknown = sorted(set(asked) - set(members))
        missing = [m for m in members if m not in asked]
        if unknown or missing:
            parts = []
            if unknown:
                parts.append(f"unknown member(s) {', '.join(unknown)}")
            if missing:
                parts.append(f"missing member(s) {', '.join(missing)}")
            raise bad_request(
                f"'member_weights' must name every member exactly ({', '.join(members)}): {'; '.join(parts)}",
                param="member_weights",
            )
        return tuple(float(asked[m]) for m in members)
    if len(asked) != len(members):
        raise bad_request(
            f"'member_weights' has {len(asked)} values but the ensemble has {len(members)} members "
            f"({', '.join(members)})",
            param="member_weights",
        )
    return tuple(float(w) for w in asked)


def check_context(prompt_len: int, max_tokens: int, max_model_len: int, param: str) -> None:
    """400 `context_length_exceeded` when prompt + completion cannot fit, with the numbers."""
    if prompt_len + max_tokens > max_model_len:
        where = "messages" if param == "messages" else "prompt"
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the {where}, {max_tokens} in the completion). "
            f"Please reduce the length of the {where} or completion.",
            param=param,
            code="context_length_exceeded",
        )


def _reject_unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
    if isinstance(body, CompletionRequest):
        if body.suffix:
            raise bad_request("'suffix' is not supported by chorus", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise bad_request("'best_of' is not supported (it must equal 'n' if given)", param="best_of")
    else:
        if body.top_logprobs and not body.logprobs:
            raise bad_request("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    if body.stream_options is not None and not body.stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")


def build_options(
    body: CompletionRequest | ChatCompletionRequest,
    *,
    max_tokens: int,
    vocab_size: int,
    members: list[str],
    structured: StructuredOutput | None = None,
    member: str | None = None,
) -> SamplingOptions:
    """The engine options for `body` (already validated for types and ranges by pydantic);
    `structured` is the answer's grammar constraint, as `server.structured.answer_shape` found it;
    `member` the member the request names as its model, served alone."""
    _reject_unsupported(body)
    if member is not None:
        for field, value in (("pooling", body.pooling), ("member_weights", body.member_weights)):
            if value is not None:
                raise bad_request(f"'{field}' pools the ensemble's members; a request for member '{member}' alone "
                                  "takes none (name the ensemble as the model to pool)", param=field)
    stop_ids = tuple(body.stop_token_ids or ())
    check_token_ids(stop_ids, vocab_size, "stop_token_ids")
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    if temperature < SAMPLING_EPS:
        temperature = 0.0
    top_k = body.top_k or 0
    if top_k < 0 or top_k >= vocab_size:
        top_k = 0  # -1 and any k covering the whole vocabulary both mean "no top-k"
    if isinstance(body, CompletionRequest):
        logprobs = body.logprobs
        prompt_logprobs = body.logprobs if (body.echo and body.logprobs is not None) else None
    else:
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prompt_logprobs = None
    return SamplingOptions(
        n=int(body.n or 1),
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if body.top_p is None else float(body.top_p),
        top_k=top_k,
        min_p=float(body.min_p or 0.0),
        presence_penalty=float(body.presence_penalty or 0.0),
        frequency_penalty=float(body.frequency_penalty or 0.0),
        seed=body.seed,
        stop=stop_strings(body.stop),
        stop_token_ids=stop_ids,
        ignore_eos=bool(body.ignore_eos),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        logit_bias=logit_bias(body.logit_bias, vocab_size),
        priority=int(body.priority),
        structured_outputs=structured,
        pooling=body.pooling,
        weights=member_weights(body.member_weights, members),
        member_logprobs=bool(body.return_member_logprobs),
        member=member,
    )


def member_names(info: dict[str, Any]) -> list[str]:
    """Member names in order, from `Engine.info`."""
    return [str(m["name"]) for m in info.get("members", [])]
