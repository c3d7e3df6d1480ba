"""Translation between chorus's engine protocol and vLLM's request objects.

`sampling_params` turns our `SamplingOptions` into vLLM's `SamplingParams` (delta outputs;
a `StructuredOutput` becomes vLLM's `StructuredOutputsParams`, `structured_outputs_params`);
`OutputTranslator` adds vLLM's delta `RequestOutput`s up into our cumulative `RequestOutput`;
`token_logprob` converts one position of vLLM log-probs; `request_pooling` checks a request's own
pooling rule and weights and turns them into the ``extra_args`` that carry them to the model
(`ensemble.vllm_pooling`), refusing what the vLLM engine cannot serve (per-member log-probs, a
member it did not load, prompt log-probs with per-request pooling, an engine without the
tracker). Used by `ensemble.vllm_engine.VLLMEngine`; pure functions of their arguments, tested
without an engine (tests/ensemble/test_vllm_translation.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ensemble.manifest import EnsembleManifest
from ensemble.pooling import normalise_weights
from ensemble.protocol import (
    CompletionOutput,
    EngineRequestError,
    RequestOutput,
    SamplingOptions,
    StructuredOutput,
    TokenLogprob,
)


def request_pooling(
    options: SamplingOptions, manifest: EnsembleManifest, served: EnsembleManifest, unavailable: str | None = None,
) -> dict[str, Any] | None:
    """The ``SamplingParams.extra_args`` that carry `options`' own pooling to the vLLM model, or None
    when the request pools as the ensemble does (asks for nothing, or for its own rule and weights
    at any scale).

    `manifest` is the ensemble's (`options.weights` follow its members), `served` the members vLLM
    runs (`EnsembleManifest.without_idle_members`); `unavailable` says why this engine cannot pool
    per request (None: it can). Raises EngineRequestError (a 400) for per-member log-probs, invalid
    weights (the reference engine's checks and words), weight on a member the engine did not load,
    and per-request pooling that this engine or request cannot have.
    """
    from ensemble.vllm_pooling import pooling_extra_args

    if options.member_logprobs:
        raise EngineRequestError(
            "member_logprobs is not supported by the vLLM engine: it reports the pooled "
            "distribution only (use the reference engine for per-member log-probs)"
        )
    if options.member is not None:
        return _alone(options, served, unavailable)
    if options.pooling is None and options.weights is None:
        return None
    rule = options.pooling or manifest.rule
    weights = tuple(float(w) for w in options.weights) if options.weights is not None else manifest.weights
    try:
        normalise_weights(weights, len(manifest.members), rule)
    except ValueError as err:
        raise EngineRequestError(f"pooling: {err}") from None
    loaded = {m.name for m in served.members}
    idle = [f"{m.name!r} ({w:g})" for m, w in zip(manifest.members, weights) if m.name not in loaded and w != 0]
    if idle:
        raise EngineRequestError(
            f"per-request weights give weight to member(s) {', '.join(idle)} that the ensemble's manifest "
            "weights 0, so the vLLM engine neither loads nor runs them: give them weight 0, or serve with "
            "--engine torch (which runs every member)"
        )
    asked = tuple(w for m, w in zip(manifest.members, weights) if m.name in loaded)
    if rule == served.rule and _same_weights(asked, served.weights):
        return None
    if unavailable is not None:
        raise EngineRequestError(f"per-request pooling (rule {rule!r}, weights {list(weights)}) is not available "
                                 f"on this vLLM engine: {unavailable}; the reference engine (--engine torch) "
                                 "serves it")
    if options.prompt_logprobs is not None:
        raise EngineRequestError(
            "prompt log-probs (echo with logprobs) with per-request pooling are not supported by the vLLM engine "
            "(vLLM scores prompt tokens in calls that do not say which request they belong to); drop echo or "
            "logprobs, pool as the ensemble does, or use the reference engine (--engine torch)"
        )
    return pooling_extra_args(rule, asked)


def _alone(options: SamplingOptions, served: EnsembleManifest, unavailable: str | None) -> dict[str, Any]:
    """The ``extra_args`` of a request for one member alone (`SamplingOptions.member`)."""
    from ensemble.vllm_pooling import alone_extra_args

    names = [m.name for m in served.members]
    if options.member not in names:
        raise EngineRequestError(f"member {options.member!r} is not served by this vLLM engine (it serves "
                                 f"{', '.join(names)}; a member the manifest weights 0 is not loaded)")
    if unavailable is not None:
        raise EngineRequestError(f"a request for member {options.member!r} alone is not available on this vLLM "
                                 f"engine: {unavailable}")
    if options.prompt_logprobs is not None:
        raise EngineRequestError(f"prompt log-probs (echo with logprobs) for member {options.member!r} alone are "
                                 "not supported by the vLLM engine (vLLM scores prompt tokens in calls that do not "
                                 "say which request they belong to); drop echo or logprobs")
    return alone_extra_args(names.index(options.member))


def _same_weights(asked: Sequence[float], own: Sequence[float]) -> bool:
    """Equal after dividing each by its (positive) sum."""
    a, b = sum(asked), sum(own)
    return len(asked) == len(own) and a > 0 and all(
        math.isclose(x / a, y / b, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(asked, own))


def structured_outputs_params(structured: StructuredOutput | None):
    """vLLM's `StructuredOutputsParams` for our engine-neutral constraint (None for none), as vLLM's
    own OpenAI server builds them: a JSON Schema as a dict, ``json_object=True``, the regex, the
    grammar text, or the list of choices. vLLM picks the grammar backend (its
    ``--structured-outputs-config``; by default xgrammar, falling back to guidance for schema
    features xgrammar lacks) and checks the constraint when the request is added."""
    if structured is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if structured.kind == "json":
        return StructuredOutputsParams(json=json.loads(str(structured.spec)))
    if structured.kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if structured.kind == "choice":
        return StructuredOutputsParams(choice=list(structured.spec or ()))
    if structured.kind == "regex":
        return StructuredOutputsParams(regex=str(structured.spec))
    return StructuredOutputsParams(grammar=str(structured.spec))


def sampling_params(options: SamplingOptions, extra_args: dict[str, Any] | None = None):
    """Translate our `SamplingOptions` into vLLM's `SamplingParams` (delta outputs: each carries
    only what is new, which `OutputTranslator` adds up, so nothing is copied whole per token);
    `extra_args` (`request_pooling`'s) become its ``extra_args``.

    Raises EngineRequestError when vLLM rejects a value.
    """
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind

    try:
        return SamplingParams(
            n=options.n,
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            min_p=options.min_p,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            seed=options.seed,
            stop=list(options.stop) or None,
            stop_token_ids=list(options.stop_token_ids) or None,
            ignore_eos=options.ignore_eos,
            logprobs=options.logprobs,
            prompt_logprobs=options.prompt_logprobs,
            logit_bias=dict(options.logit_bias) or None,
            structured_outputs=structured_outputs_params(options.structured_outputs),
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra_args or None,
        )
    except (ValueError, TypeError, VLLMClientError) as err:
        raise EngineRequestError(str(err)) from None


def token_logprob(token_id: int, position: Mapping[int, Any], top: int) -> TokenLogprob:
    """Our `TokenLogprob` from one position of vLLM logprobs (``{token id: Logprob}``).

    vLLM reports the chosen token plus the `top` best ones, each with its rank; `top` keeps the
    ranks 1..top, best first.
    """
    chosen = position[token_id]
    best = sorted(
        ((tid, lp) for tid, lp in position.items() if lp.rank is not None and lp.rank <= top),
        key=lambda item: item[1].rank,
    )
    return TokenLogprob(token_id=token_id, logprob=float(chosen.logprob), top=[(t, float(lp.logprob)) for t, lp in best])


def _finish_reason(reason: str | None) -> str | None:
    if reason is None or reason in ("stop", "length", "abort"):
        return reason
    if reason == "repetition":
        return "stop"
    raise RuntimeError(f"vLLM ended the request with {reason!r} (an internal error; retry it)")


class OutputTranslator:
    """Turns one request's stream of vLLM `RequestOutput`s into ours, incrementally.

    `update` takes each *delta* vLLM output in turn (new text, token ids, log-probs and prompt
    log-probs since the previous one; vLLM's may carry only the completions that changed), adds it
    to the request's state, and returns our cumulative `RequestOutput` with all `n` completions.
    Each log-prob is converted once.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], options: SamplingOptions) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.options = options
        self.completions = [
            CompletionOutput(index=i, text="", token_ids=[], logprobs=[] if options.logprobs is not None else None)
            for i in range(options.n)
        ]
        self.prompt_logprobs: list[TokenLogprob | None] | None = None

    def _add_prompt_logprobs(self, entries: Sequence[Any]) -> None:
        """Prompt positions in order (vLLM's first is None: nothing predicts the first token)."""
        k = self.options.prompt_logprobs or 0
        if self.prompt_logprobs is None:
            self.prompt_logprobs = []
        for entry in entries:
            pos = len(self.prompt_logprobs)
            if pos == 0 or entry is None or pos >= len(self.prompt_token_ids):
                self.prompt_logprobs.append(None)
            else:
                self.prompt_logprobs.append(token_logprob(self.prompt_token_ids[pos], entry, k))

    def update(self, out: Any) -> RequestOutput:
        if self.options.prompt_logprobs is not None and out.prompt_logprobs:
            self._add_prompt_logprobs(list(out.prompt_logprobs))
        for vc in out.outputs:
            mine = self.completions[vc.index]
            mine.text += vc.text
            first_new = len(mine.token_ids)
            mine.token_ids.extend(vc.token_ids)
            if mine.logprobs is not None and vc.logprobs is not None:
                k = self.options.logprobs or 0
                for i, position in enumerate(vc.logprobs):
                    mine.logprobs.append(token_logprob(mine.token_ids[first_new + i], position, k))
            mine.finish_reason = _finish_reason(vc.finish_reason)  # type: ignore[assignment]
            mine.stop_reason = vc.stop_reason
        if out.finished:
            for mine in self.completions:
                if mine.finish_reason is None:
                    mine.finish_reason = "abort"
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[dataclasses.replace(c, token_ids=list(c.token_ids),
                                         logprobs=list(c.logprobs) if c.logprobs is not None else None)
                     for c in self.completions],
            finished=bool(out.finished),
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
        )
