"""The engine's pooled `TokenLogprob`s in OpenAI's two shapes.

* completions (legacy): parallel lists `tokens`, `token_logprobs`, `top_logprobs` (a {token: logprob}
  dict per position holding the top alternatives plus the chosen token, as vLLM does) and
  `text_offset` (character offset of each token in the text the client receives);
* chat: a `content` list of `{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`.

`bytes` are the token's real bytes (from `ensemble.vocab.token_bytes_table`), so a client can
rebuild characters split across tokens. Log-probs of -inf are reported as -9999.0 (vLLM's value),
since JSON has no infinity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ensemble.protocol import TokenLogprob
from server.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    CompletionLogProbs,
)

MIN_LOGPROB = -9999.0


def finite(lp: float) -> float:
    """`lp` with -inf / NaN replaced by vLLM's -9999.0."""
    return lp if math.isfinite(lp) else MIN_LOGPROB


class TokenNamer:
    """How tokens are named in responses: their own text, or `token_id:<id>` when asked."""

    def __init__(self, token_str: Callable[[int], str], token_bytes: Callable[[int], bytes],
                 as_ids: bool = False) -> None:
        self._str = token_str
        self._bytes = token_bytes
        self.as_ids = as_ids

    def name(self, token_id: int) -> str:
        """The string shown for `token_id`."""
        return f"token_id:{token_id}" if self.as_ids else self._str(token_id)

    def text(self, token_id: int) -> str:
        """The token's own text (always text, also when names are ids)."""
        return self._str(token_id)

    def bytes(self, token_id: int) -> list[int]:
        """The token's bytes as a list of ints."""
        return list(self._bytes(token_id))


def completion_logprobs(
    entries: Sequence[TokenLogprob | None],
    token_ids: Sequence[int],
    namer: TokenNamer,
    initial_offset: int = 0,
) -> CompletionLogProbs:
    """Legacy completion logprobs for consecutive tokens; `None` entries (the first prompt token)
    get null log-probs. Offsets start at `initial_offset` and advance by each token's text length."""
    out = CompletionLogProbs()
    offset = initial_offset
    for token_id, entry in zip(token_ids, entries):
        token = namer.name(token_id)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(namer.text(token_id))
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(finite(entry.logprob))
        top: dict[str, float] = {}
        for tid, lp in entry.top:
            top.setdefault(namer.name(tid), finite(lp))
        top.setdefault(token, finite(entry.logprob))
        out.top_logprobs.append(top)
    return out


def chat_logprobs(entries: Sequence[TokenLogprob], token_ids: Sequence[int], namer: TokenNamer,
                  top_n: int) -> ChatCompletionLogProbs:
    """Chat logprobs (`content` list) for consecutive generated tokens."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        top = [
            ChatCompletionLogProb(token=namer.name(tid), logprob=finite(lp), bytes=namer.bytes(tid))
            for tid, lp in entry.top[:top_n]
        ]
        content.append(
            ChatCompletionLogProbsContent(
                token=namer.name(token_id), logprob=finite(entry.logprob), bytes=namer.bytes(token_id),
                top_logprobs=top,
            )
        )
    return ChatCompletionLogProbs(content=content)


def member_logprobs(entries: Sequence[TokenLogprob] | None) -> list[dict[str, float]] | None:
    """Per token, each member's log-prob of it (None when the engine did not report them)."""
    if not entries or entries[0].member_logprobs is None:
        return None
    return [{k: finite(v) for k, v in (e.member_logprobs or {}).items()} for e in entries]
