"""The reference engine's request state: a request (prompt, options, pooling rule and weights,
where its outputs go) and its `n` completions (caches, sampler, stop checker, tokens so far),
each able to report itself as the protocol's output objects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ensemble.protocol import CompletionOutput, RequestOutput, SamplingOptions, TokenLogprob
from ensemble.stopping import StopChecker


@dataclass
class _Sequence:
    """One of a request's `n` completions."""

    index: int
    caches: list[Any]
    generator: torch.Generator
    checker: StopChecker
    rows: list[Tensor]  # each member's logits [V] for the next token
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=list(self.token_ids),
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason,  # type: ignore[arg-type]
            stop_reason=self.stop_reason,
        )


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    options: SamplingOptions
    rule: str
    weights: tuple[float, ...]
    sink: Callable[[RequestOutput | BaseException], None]
    sequences: list[_Sequence] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    aborted: bool = False

    @property
    def finished(self) -> bool:
        return self.aborted or (bool(self.sequences) and all(s.finished for s in self.sequences))

    def output(self) -> RequestOutput:
        if self.sequences:
            outputs = [s.output() for s in self.sequences]
        else:  # not prefilled yet (aborted while waiting)
            reason = "abort" if self.aborted else None
            outputs = [CompletionOutput(i, "", [], finish_reason=reason) for i in range(self.options.n)]
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=list(self.prompt),
            outputs=outputs,
            finished=self.finished,
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
        )
