"""When a completion ends, and what text it shows, following vLLM's rules.

* A stop token (the ensemble's eos unless ``ignore_eos``, its end-of-turn token unless
  ``ignore_eos``, or any of the request's ``stop_token_ids``) ends the completion with
  finish_reason ``"stop"``. The token stays in ``token_ids`` but not in the text. ``stop_reason``
  is None for the eos token itself and the token id otherwise (vLLM adds the end-of-turn token,
  listed in the generation config, to the stop ids).
* A stop string ends it too, even one spanning several tokens; the text is cut just before the
  stop string, ``stop_reason`` is the string, and if several match the one completing earliest
  wins (ties: the order given).
* Otherwise ``max_tokens`` or the model's context length end it with ``"length"``.

Text is the decode of the completion's tokens with special tokens skipped, built incrementally as
vLLM's detokenizer builds it (`StopChecker`). While a completion is running, an incomplete UTF-8
character at the end is held back, so the cumulative text only grows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ensemble.protocol import FinishReason, SamplingOptions

_INCOMPLETE = "\ufffd"


@dataclass(frozen=True)
class StopDecision:
    """The outcome of checking one new token."""

    finished: bool
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    text: str = ""  # the completion's text after this token (trimmed when stopped)


def find_stop_string(text: str, stops: Sequence[str], search_from: int) -> tuple[str, int] | None:
    """The stop string completing earliest in `text` at or after `search_from` (ties: list order)
    and the index where it starts, or None. Only matches ending after `search_from` count."""
    best: tuple[str, int] | None = None
    best_end = None
    for stop in stops:
        index = text.find(stop, max(0, search_from - len(stop) + 1))
        if index == -1:
            continue
        end = index + len(stop)
        if best_end is None or end < best_end:
            best, best_end = (stop, index), end
    return best


def stop_token_reason(token_id: int, options: SamplingOptions, eos_id: int | None, eot_id: int | None) -> tuple[bool, int | None]:
    """(stopped, stop_reason) for a sampled token id under vLLM's rules."""
    if not options.ignore_eos and eos_id is not None and token_id == eos_id:
        return True, None
    if token_id in options.stop_token_ids or (not options.ignore_eos and eot_id is not None and token_id == eot_id):
        return True, token_id
    return False, None


class StopChecker:
    """Tracks one completion's text and decides after each token whether it has ended.

    The text grows incrementally, as vLLM's detokenizer does it: each step decodes only a short
    window (the tokens since the last settled text, behind a prefix of the few tokens before it,
    whose own decode is subtracted), so a step costs the same at token 10 and at token 10,000
    instead of re-decoding the whole completion. The prefix keeps the spacing a tokenizer gives a
    token only in context (SentencePiece's leading "▁"). A window whose text ends in U+FFFD (an
    incomplete UTF-8 character) waits for the next token; at the end it is taken as it is.
    """

    def __init__(
        self,
        tokenizer: Any,
        options: SamplingOptions,
        eos_id: int | None,
        eot_id: int | None,
        max_new_tokens: int,
    ) -> None:
        """`max_new_tokens` is ``min(max_tokens, max_model_len - prompt length)``."""
        self.tokenizer = tokenizer
        self.options = options
        self.eos_id = eos_id
        self.eot_id = eot_id
        self.max_new_tokens = max_new_tokens
        self.text = ""  # the text shown so far
        self._settled = ""  # the decoded text of token_ids[:_read]
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens whose text is settled

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def _advance(self, token_ids: Sequence[int], final: bool) -> str:
        """The text of `token_ids`, settling the new tokens' text when it is complete (or `final`)."""
        if len(token_ids) > self._read:
            before = self._decode(token_ids[self._prefix:self._read])
            after = self._decode(token_ids[self._prefix:])
            if len(after) > len(before) and (final or not after.endswith(_INCOMPLETE)):
                self._settled += after[len(before):]
                self._prefix, self._read = self._read, len(token_ids)
            elif final:
                self._prefix, self._read = self._read, len(token_ids)
        return self._settled

    def check(self, token_ids: Sequence[int]) -> StopDecision:
        """Decide after `token_ids` (the completion's tokens, the newest last) were generated."""
        stopped, reason = stop_token_reason(token_ids[-1], self.options, self.eos_id, self.eot_id)
        if stopped:
            self.text = self._advance(token_ids[:-1], final=True)
            return StopDecision(True, "stop", reason, self.text)
        shown = len(self.text)
        full = self._advance(token_ids, final=False)
        if self.options.stop:
            match = find_stop_string(full, self.options.stop, shown)
            if match is not None:
                stop, index = match
                self.text = full[:index]
                return StopDecision(True, "stop", stop, self.text)
        if len(token_ids) >= self.max_new_tokens:
            self.text = self._advance(token_ids, final=True)
            if self.options.stop:  # the last token's held-back text may still complete a stop string
                match = find_stop_string(self.text, self.options.stop, shown)
                if match is not None:
                    self.text = self.text[:match[1]]
                    return StopDecision(True, "stop", match[0], self.text)
            return StopDecision(True, "length", None, self.text)
        self.text = full
        return StopDecision(False, None, None, self.text)
