"""Comparing tokenizers id by id, as the bytes each token stands for.

Ensemble members can only be pooled token by token if token id ``i`` means the same bytes for
every member. Tokenizers spell the same bytes differently:

* GPT-2 style byte-level BPE (GPT-2, Llama 3, Qwen2) maps each byte to a printable character
  (``Ġ`` is a space);
* SentencePiece style (Llama 2, Gemma) writes a space as ``▁`` and unknown bytes as ``<0xNN>``;
* added/special tokens (``<|im_end|>``) are literal text.

`token_bytes_table` turns a tokenizer into one ``bytes`` entry per id in those terms (the
regular tokens decoded by `transfer.tokens`, the one token-to-bytes implementation), and
`first_mismatch` finds the first id whose bytes differ between two tokenizers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from transfer.tokens import piece_bytes, tokenizer_kind

# Vocabulary fillers that are not tokens of any text.
_PLACEHOLDER = re.compile(r"\[PAD\d+\]|<\|?(?:pad|PAD)_?\d*\|?>|<pad_\d+>")

# End-of-turn markers of the common chat formats, most specific first.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|end_of_turn|>", "<|endofturn|>")


@dataclass(frozen=True)
class TokenTable:
    """One tokenizer's vocabulary as bytes per id (None for an unused id)."""

    view: str  # `transfer.tokens.tokenizer_kind`: byte_level, sentencepiece or plain
    entries: tuple[bytes | None, ...]
    pieces: tuple[str | None, ...]  # the raw token strings, for error messages
    num_regular: int  # ids covered by the tokenizer model's own vocabulary (no added tokens)
    added: frozenset[int] = frozenset()  # ids of added (special) tokens

    def __len__(self) -> int:
        return len(self.entries)

    def is_text_token(self, token_id: int) -> bool:
        """True for a regular token of text: neither added/special nor a padding placeholder."""
        if token_id >= len(self.entries) or self.entries[token_id] is None or token_id in self.added:
            return False
        return not _PLACEHOLDER.fullmatch(self.pieces[token_id] or "")

    def useful_size(self) -> int:
        """The length without trailing padding placeholders (``[PAD151665]`` ... that GGUF
        exports and padded tokenizers append to fill the embedding matrix)."""
        end = len(self.entries)
        while end > 0 and (self.entries[end - 1] is None or _PLACEHOLDER.fullmatch(self.pieces[end - 1] or "")):
            end -= 1
        return end


def token_bytes_table(tokenizer: Any) -> TokenTable:
    """Every id of a Hugging Face fast tokenizer as the bytes its token stands for.

    Regular tokens are decoded under the tokenizer's view; added tokens (specials such as
    ``<|im_end|>``) are their literal UTF-8 text.
    """
    view, space_char = tokenizer_kind(tokenizer)
    regular = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    added = {i: tok.content for i, tok in tokenizer.added_tokens_decoder.items()}
    size = max([len(tokenizer), *(i + 1 for i in regular.values()), *(i + 1 for i in added)])
    pieces: list[str | None] = [None] * size
    entries: list[bytes | None] = [None] * size
    for piece, i in regular.items():
        pieces[i] = piece
        entries[i] = piece_bytes(piece, view, space_char)
    for i, content in added.items():
        pieces[i] = content
        entries[i] = content.encode("utf-8")
    num_regular = max(regular.values()) + 1 if regular else 0
    return TokenTable(view, tuple(entries), tuple(pieces), num_regular, frozenset(added))


def first_mismatch(a: TokenTable, b: TokenTable, limit: int | None = None) -> int | None:
    """The first id below `limit` (default: both tables' length) whose bytes differ, or None."""
    end = min(len(a), len(b)) if limit is None else limit
    ea, eb = a.entries, b.entries
    for i in range(end):
        x = ea[i] if i < len(ea) else None
        y = eb[i] if i < len(eb) else None
        if x != y:
            return i
    return None


def describe_token(table: TokenTable, token_id: int) -> str:
    """A readable description of id `token_id` in `table`: the piece and its bytes."""
    if token_id >= len(table) or table.entries[token_id] is None:
        return "<no token>"
    piece, data = table.pieces[token_id], table.entries[token_id]
    return f"{piece!r} (bytes {data!r})"


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The end-of-turn marker a tokenizer knows (``<|im_end|>``, ``<end_of_turn>``, ...), if any."""
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            return token
    return None
