"""Unit tests for ensemble.stopping with the real Qwen2 tokenizer."""

from __future__ import annotations

import pytest

from ensemble.protocol import SamplingOptions
from ensemble.stopping import StopChecker, find_stop_string, stop_token_reason

EOS, EOT = 151645, 151643  # <|im_end|> as eos; <|endoftext|> standing in for a distinct end-of-turn


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer):
    return qwen_tokenizer


def _run(tokenizer, token_ids: list[int], options: SamplingOptions, max_new: int = 100):
    """Feed tokens one at a time; return (decisions, tokens consumed)."""
    checker = StopChecker(tokenizer, options, EOS, EOT, max_new)
    decisions = []
    for i in range(1, len(token_ids) + 1):
        decision = checker.check(token_ids[:i])
        decisions.append(decision)
        if decision.finished:
            return decisions, i
    return decisions, len(token_ids)


def test_find_stop_string_prefers_the_earliest_completion() -> None:
    assert find_stop_string("abcdef", ["cd", "bcde"], 0) == ("cd", 2)
    assert find_stop_string("abcdef", ["ef", "bc"], 0) == ("bc", 1)
    assert find_stop_string("abcdef", ["x"], 0) is None
    # Only matches that end after `search_from` count (older text was already searched).
    assert find_stop_string("abcdef", ["ab"], 3) is None
    assert find_stop_string("abcdef", ["cd"], 3) == ("cd", 2)


def test_stop_token_reasons() -> None:
    opts = SamplingOptions()
    assert stop_token_reason(EOS, opts, EOS, EOT) == (True, None)
    assert stop_token_reason(EOT, opts, EOS, EOT) == (True, EOT)
    assert stop_token_reason(5, SamplingOptions(stop_token_ids=(5,)), EOS, EOT) == (True, 5)
    assert stop_token_reason(7, opts, EOS, EOT) == (False, None)
    ignore = SamplingOptions(ignore_eos=True, stop_token_ids=(5,))
    assert stop_token_reason(EOS, ignore, EOS, EOT) == (False, None)
    assert stop_token_reason(EOT, ignore, EOS, EOT) == (False, None)
    assert stop_token_reason(5, ignore, EOS, EOT) == (True, 5)


def test_stop_string_spanning_tokens_is_trimmed(tokenizer) -> None:
    ids = tokenizer("Hello world, the quick brown fox jumps.")["input_ids"]
    # "d, t" spans ' world' | ',' | ' the'.
    decisions, used = _run(tokenizer, ids, SamplingOptions(stop=("d, t",)))
    last = decisions[-1]
    assert used == 4  # 'Hello', ' world', ',', ' the'
    assert (last.finished, last.finish_reason, last.stop_reason, last.text) == (True, "stop", "d, t", "Hello worl")


def test_stop_string_earliest_completion_wins(tokenizer) -> None:
    ids = tokenizer("Hello world, the quick brown fox jumps.")["input_ids"]
    decisions, _ = _run(tokenizer, ids, SamplingOptions(stop=("brown", "the quick")))
    assert decisions[-1].stop_reason == "the quick" and decisions[-1].text == "Hello world, "


def test_stop_token_is_kept_out_of_the_text(tokenizer) -> None:
    ids = tokenizer("Hello world, the quick")["input_ids"]
    decisions, used = _run(tokenizer, ids + [EOS, 11], SamplingOptions())
    assert used == len(ids) + 1
    assert (decisions[-1].finish_reason, decisions[-1].stop_reason) == ("stop", None)
    assert decisions[-1].text == "Hello world, the quick"
    decisions, used = _run(tokenizer, ids, SamplingOptions(stop_token_ids=(ids[2],)))
    assert used == 3 and decisions[-1].stop_reason == ids[2] and decisions[-1].text == "Hello world"
    decisions, used = _run(tokenizer, ids + [EOS, EOT, 11], SamplingOptions(ignore_eos=True), max_new=len(ids) + 3)
    assert used == len(ids) + 3 and decisions[-1].finish_reason == "length"


def test_length_limit(tokenizer) -> None:
    ids = tokenizer("Hello world, the quick brown fox")["input_ids"]
    decisions, used = _run(tokenizer, ids, SamplingOptions(), max_new=3)
    assert used == 3
    assert (decisions[-1].finish_reason, decisions[-1].text) == ("length", "Hello world,")
    assert [d.finished for d in decisions] == [False, False, True]


def test_incomplete_utf8_is_held_back_while_running(tokenizer) -> None:
    hello = tokenizer("Caf")["input_ids"]
    e_acute = tokenizer.convert_tokens_to_ids(["Ã", "©"])  # the two bytes of "é" as byte-level tokens
    assert tokenizer.decode(hello + e_acute) == "Café"
    decisions, _ = _run(tokenizer, hello + e_acute, SamplingOptions())
    texts = [d.text for d in decisions]
    assert texts[-2] == "Caf" and texts[-1] == "Café"
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative text only grows


TEXTS = [
    "The quick brown fox  jumps over the lazy dog.\n\nNew paragraph:\ttabs, \"quotes\" and 3.14159.",
    "Émigré naïveté — 日本語のテキスト, 한국어, emoji 🎵🎶👩‍👩‍👧 and a rare char 𝔘𝔫𝔦𝔠𝔬𝔡𝔢.",
    "   leading spaces, trailing spaces   ",
    "def f(x):\n    return x ** 2  # code\n",
]


@pytest.mark.parametrize("name", ["qwen2", "gemma3", "llama3"])
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_incremental_text_equals_the_full_decode_on_real_tokenizers(name: str, text: str) -> None:
    """Token by token the shown text only grows, never ends in an incomplete character, and at
    the end equals decoding the whole completion at once, on byte-level BPE (Qwen2, Llama 3) and
    SentencePiece-style (Gemma 3) tokenizers."""
    from transformers import AutoTokenizer

    from transfer import zoo

    tok = AutoTokenizer.from_pretrained(zoo.tokenizer_dir(name))
    ids = tok.encode(text, add_special_tokens=False)
    checker = StopChecker(tok, SamplingOptions(), None, None, len(ids))
    shown = ""
    for i in range(1, len(ids) + 1):
        decision = checker.check(ids[:i])
        assert decision.text.startswith(shown) and not (not decision.finished and decision.text.endswith("\ufffd"))
        shown = decision.text
    assert decision.finished and decision.finish_reason == "length"
    assert shown == tok.decode(ids, skip_special_tokens=True)


def test_incremental_decoding_looks_at_a_short_window(tokenizer) -> None:
    """A step decodes a few tokens, not the whole completion: the work per token stays flat."""
    ids = tokenizer.encode("word " * 500, add_special_tokens=False)
    calls: list[int] = []

    class Counting:
        def decode(self, token_ids, skip_special_tokens=True):
            calls.append(len(token_ids))
            return tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    checker = StopChecker(Counting(), SamplingOptions(), EOS, EOT, len(ids))
    for i in range(1, len(ids) + 1):
        checker.check(ids[:i])
    assert max(calls) <= 8 and checker.text == tokenizer.decode(ids)
