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

Text is the decode of the completion's tokens with special tokens skipped. While a completion is
running, a trailing U+FFFD (an incomplete UTF-8 character) is held back, so the cumulative text
only grows.
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
    """Tracks one completion's text and decides after each token whether it has ended."""

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

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def check(self, token_ids: Sequence[int]) -> StopDecision:
        """Decide after `token_ids` (the completion's tokens, the newest last) were generated."""
        stopped, reason = stop_token_reason(token_ids[-1], self.options, self.eos_id, self.eot_id)
        if stopped:
            self.text = self._decode(token_ids[:-1])
            return StopDecision(True, "stop", reason, self.text)
        full = self._decode(token_ids)
        if self.options.stop:
            match = find_stop_string(full, self.options.stop, len(self.text.rstrip(_INCOMPLETE)))
            if match is not None:
                stop, index = match
                self.text = full[:index]
                return StopDecision(True, "stop", stop, self.text)
        if len(token_ids) >= self.max_new_tokens:
            self.text = full
            return StopDecision(True, "length", None, self.text)
        self.text = full.rstrip(_INCOMPLETE)
        return StopDecision(False, None, None, self.text)
