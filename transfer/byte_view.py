"""The byte view of a Hugging Face tokenizer: the bytes of every vocabulary entry, which tokens
open a word, and byte-exact tokenization of text (ids plus the bytes each token covers).

Works for any tokenizers-backed (fast) tokenizer, decoding vocabulary strings according to its
backend (byte-level BPE, SentencePiece-style, or plain UTF-8), never its name.
"""

from __future__ import annotations

import json
import weakref
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

BYTE_LEVEL = "byte_level"
SENTENCEPIECE = "sentencepiece"
PLAIN = "plain"

_BYTE_ENCODER: dict[int, str] = bytes_to_unicode()
# str.translate table: byte-level symbol -> the Latin-1 character of its byte.
_BYTE_DECODER: dict[int, str] = {ord(char): chr(byte) for byte, char in _BYTE_ENCODER.items()}
# Bytes that start a new word for the tokenization-bias correction (space, newline, tab).
SPACE_BYTES = (b" ", b"\n", b"\t")

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _backend(tokenizer: Any) -> Tokenizer:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise TypeError(
            f"{type(tokenizer).__name__} has no `tokenizers` backend; chorus needs a fast "
            "(tokenizers-backed) Hugging Face tokenizer"
        )
    return backend


def _walk(node: Any):
    """Yield every dict inside a tokenizer.json component (Sequence members included)."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def tokenizer_kind(tokenizer: Any) -> tuple[str, str]:
    """How the tokenizer's vocabulary strings map to bytes, read from its backend.

    Returns (kind, space_char): kind is "byte_level" (GPT-2 byte-to-unicode alphabet: a
    ByteLevel pre-tokenizer or decoder), "sentencepiece" (a Metaspace pre-tokenizer/decoder,
    a `Replace("▁", " ")` decoder/normalizer, or a byte-fallback model; `<0xNN>` tokens are
    bytes) or "plain" (token strings are UTF-8 text). space_char is the SentencePiece
    word-boundary character (normally "▁"), "" otherwise.
    """
    backend = _backend(tokenizer)
    parts = [backend.pre_tokenizer, backend.decoder, backend.normalizer]
    nodes = [n for part in parts if part is not None for n in _walk(json.loads(part.__getstate__()))]
    if any(n.get("type") == "ByteLevel" for n in nodes):
        return BYTE_LEVEL, ""
    for n in nodes:
        if n.get("type") == "Metaspace":
            return SENTENCEPIECE, n.get("replacement", "▁")
    for n in nodes:
        if n.get("type") == "Replace":
            pattern = n.get("pattern", {}).get("String")
            if pattern == "▁" and n.get("content") == " ":
                return SENTENCEPIECE, "▁"
            if pattern == " " and n.get("content") == "▁":
                return SENTENCEPIECE, "▁"
    if any(n.get("type") == "ByteFallback" for n in nodes) or getattr(backend.model, "byte_fallback", False):
        return SENTENCEPIECE, "▁"
    return PLAIN, ""


def _byte_fallback(token: str) -> bytes | None:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            return None
    return None


def piece_bytes(token: str, kind: str, space_char: str) -> bytes:
    """The bytes a regular vocabulary string stands for, under `tokenizer_kind`'s (kind, space_char)."""
    if kind == BYTE_LEVEL:
        try:
            return token.translate(_BYTE_DECODER).encode("latin-1")
        except UnicodeEncodeError:  # not in the byte alphabet: a literal
            return token.encode("utf-8")
    if kind == SENTENCEPIECE:
        raw = _byte_fallback(token)
        if raw is not None:
            return raw
        return token.replace(space_char, " ").encode("utf-8")
    return token.encode("utf-8")


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """Bytes of every token id, length `len(tokenizer)`.

    Byte-level BPE vocabularies (GPT-2, Llama 3, Qwen2) are decoded through the GPT-2
    byte-to-unicode table; SentencePiece-style ones (Gemma, Llama 2, Mistral) map `▁` to a space
    and `<0xNN>` to the byte NN. Added tokens that are not special are their literal UTF-8
    content; special/control tokens (bos, eos, chat markers, reserved) are None. The result is
    cached per tokenizer object (recomputed if its length changes).
    """
    try:
        cached = _CACHE.get(tokenizer)
    except TypeError:
        cached = None
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    backend = _backend(tokenizer)
    kind, space_char = tokenizer_kind(tokenizer)
    vocab = backend.get_vocab(with_added_tokens=True)
    added = backend.get_added_tokens_decoder()
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
    out: list[bytes | None] = [None] * size
    for token, idx in vocab.items():
        if idx in added:
            entry = added[idx]
            out[idx] = None if (entry.special or idx in special_ids) else entry.content.encode("utf-8")
        elif idx in special_ids:
            out[idx] = None
        else:
            out[idx] = piece_bytes(token, kind, space_char)
    try:
        _CACHE[tokenizer] = (len(tokenizer), out)
    except TypeError:
        pass
    return out


def space_token_mask(tokenizer: Any, vocab_size: int | None = None) -> torch.Tensor:
    """Bool [vocab_size]: True where a token starts with a space, newline or tab, or is special.

    These are the tokens that open a new word; their total probability is ALM's p_sp. Ids past
    `len(tokenizer)` (an embedding matrix padded beyond the vocabulary) are False.
    """
    table = token_bytes(tokenizer)
    size = len(table) if vocab_size is None else vocab_size
    if size < len(table):
        raise ValueError(f"vocab_size {size} is smaller than the tokenizer's {len(table)} tokens")
    mask = torch.zeros(size, dtype=torch.bool)
    mask[: len(table)] = torch.tensor([p is None or p[:1] in SPACE_BYTES for p in table], dtype=torch.bool)
    return mask


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """The ids of plain `text`: no added specials, and special-token strings in it read as text.

    Text data is text: the Penn Treebank writes rare words as the literal ``<unk>``, which
    Gemma's tokenizer would otherwise turn into its unknown-token id (a token no model predicts)
    while SmolLM2's spells it out. Scoring and training on text use this; chat renderings, whose
    templates write special tokens on purpose, do not.
    """
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def tokenize_bytes(tokenizer: Any, text: str, parse_specials: bool = True) -> tuple[list[int], list[bytes]]:
    """Tokenize `text` without added specials; return (ids, pieces), b"".join(pieces) == text.encode().

    `parse_specials`: special-token strings in `text` become special tokens (chat renderings);
    False reads them as text (plain text data, see `encode_text`).

    Each piece is the bytes of the input that its token covers. Usually that is the token's own
    bytes (`token_bytes`). Where the tokenizer rewrites the text before splitting it, pieces come
    from the character offsets instead, per maximal run of tokens with overlapping offsets:
    * SentencePiece dummy prefix (Llama 2 / Mistral `▁Hello` for "Hello"): the added space is not
      in the input, so the first token's piece is b"Hello"; a token that is only the dummy
      prefix gets b"".
    * normalisers (Qwen2's NFC: "e" + U+0301 becomes "é"): the token covering the rewritten
      characters gets the original bytes.
    * special tokens written in the text (e.g. "<|im_start|>"): their literal bytes.
    Characters no token covers (a normaliser dropped them) go to the next token (or the last).
    """
    raw = text.encode("utf-8")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                    split_special_tokens=not parse_specials)
    ids: list[int] = list(enc["input_ids"])
    table = token_bytes(tokenizer)
    pieces = [table[i] if 0 <= i < len(table) else None for i in ids]
    if all(p is not None for p in pieces) and b"".join(pieces) == raw:
        return ids, pieces  # type: ignore[return-value]
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    return ids, _pieces_from_offsets(text, raw, pieces, offsets)


def _pieces_from_offsets(
    text: str, raw: bytes, pieces: list[bytes | None], offsets: list[tuple[int, int]]
) -> list[bytes]:
    n = len(pieces)
    if n == 0:
        if raw:
            raise ValueError("the tokenizer produced no tokens for non-empty text")
        return []
    char_to_byte = [0] * (len(text) + 1)
    for i, ch in enumerate(text):
        char_to_byte[i + 1] = char_to_byte[i] + len(ch.encode("utf-8"))
    # Runs of tokens whose offsets overlap (a character split across tokens) stay together.
    runs: list[tuple[int, int]] = []
    first, reach = 0, offsets[0][1]
    for i in range(1, n):
        if offsets[i][0] >= reach:
            runs.append((first, i))
            first = i
        reach = max(reach, offsets[i][1])
    runs.append((first, n))
    # Character bounds of each run: uncovered characters go to the following run.
    bounds = [0]
    for start, _ in runs[1:]:
        bounds.append(min(max(offsets[start][0], bounds[-1]), len(text)))
    bounds.append(len(text))
    out: list[bytes] = []
    for (start, stop), lo, hi in zip(runs, bounds[:-1], bounds[1:]):
        original = raw[char_to_byte[lo]:char_to_byte[hi]]
        own = pieces[start:stop]
        if all(p is not None for p in own) and b"".join(own) == original:  # type: ignore[arg-type]
            out.extend(own)  # type: ignore[arg-type]
            continue
        cut = lo
        starts = []
        for j in range(start, stop):
            cut = lo if j == start else min(max(offsets[j][0], cut), hi)
            starts.append(cut)
        ends = starts[1:] + [hi]
        out.extend(raw[char_to_byte[a]:char_to_byte[b]] for a, b in zip(starts, ends))
    if b"".join(out) != raw:  # pragma: no cover - guarded by construction
        raise AssertionError("byte pieces do not reproduce the text")
    return out
