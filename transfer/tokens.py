"""Byte-level view of Hugging Face tokenizers: token bytes, byte-exact tokenization, special roles.

ALM compares two tokenizations of the same text through the bytes each token covers. This module
gives that view for any tokenizers-backed (fast) Hugging Face tokenizer:

* `token_bytes`: the bytes of every vocabulary entry (None for special/control tokens), decoded
  according to the tokenizer's backend (byte-level BPE or SentencePiece-style), never its name.
* `tokenize_bytes`: ids plus one byte piece per token whose concatenation is exactly the input.
* `special_roles` / `special_map`: special and chat tokens by shared role across families.
* `space_token_mask`: which next tokens start a new word (for ALM's tokenization-bias correction).
* `ByteTokenizer`: a byte-level tokenizer (ids 0..255 are the bytes, specials after them).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast
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


# --------------------------------------------------------------------------- special roles

#: Canonical roles. Family names: ChatML `<|im_start|>` / Gemma `<start_of_turn>` are
#: `start_header`; `<|im_end|>` / `<end_of_turn>` / `<|eot_id|>` are `eot`; the document
#: separator (`<|endoftext|>`, `<|end_of_text|>`, `<eos>`, `</s>`) is `end_of_text`.
ROLES = ("bos", "eos", "pad", "start_header", "end_header", "eot", "end_of_text")

_ROLE_TOKENS: dict[str, tuple[str, ...]] = {
    "bos": ("<|begin_of_text|>", "<bos>", "<s>"),
    "eos": ("<|end_of_text|>", "<eos>", "</s>", "<|endoftext|>"),
    "pad": ("<pad>", "<|finetune_right_pad_id|>", "<|pad|>"),
    "start_header": ("<|start_header_id|>", "<|im_start|>", "<start_of_turn>"),
    "end_header": ("<|end_header_id|>",),
    "eot": ("<|eot_id|>", "<|im_end|>", "<end_of_turn>"),
    "end_of_text": ("<|end_of_text|>", "<|endoftext|>", "<eos>", "</s>"),
}
_ATTRIBUTE_ROLES = ("bos", "eos", "pad")
_CHAT_ROLES = ("start_header", "end_header", "eot")
#: Order in which `special_map` claims ids (a token with several roles maps by its first).
MAP_PRIORITY = ("eot", "start_header", "end_header", "bos", "end_of_text", "eos", "pad")


def special_roles(tokenizer: Any) -> dict[str, int]:
    """Special/chat token ids by role (only the roles the tokenizer has).

    bos/eos/pad come from the tokenizer's declared tokens, else from the family's usual token;
    start_header (Llama 3 `<|start_header_id|>`, ChatML `<|im_start|>`, Gemma
    `<start_of_turn>`), end_header (Llama 3 only), eot (`<|eot_id|>`, `<|im_end|>`,
    `<end_of_turn>`) and end_of_text (the document separator) are found by their token
    strings among the tokenizer's added tokens. Works for Llama 3, Gemma 2/3, Qwen 2/2.5,
    GPT-2 and SmolLM (ChatML on a Llama-arch model) alike.
    """
    # Only added tokens count: Qwen2's BPE vocabulary holds "<s>" as ordinary text.
    # Gemma's "<s>" and "</s>" are non-special HTML tags: bos/eos/pad/end_of_text need special ones.
    decoder = _backend(tokenizer).get_added_tokens_decoder()
    added = {entry.content: idx for idx, entry in decoder.items()}
    special = {entry.content: idx for idx, entry in decoder.items() if entry.special}
    roles: dict[str, int] = {}
    for role in _ATTRIBUTE_ROLES:
        idx = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(idx, int) and idx >= 0:
            roles[role] = idx
    for role, candidates in _ROLE_TOKENS.items():
        if role in roles:
            continue
        pool = added if role in _CHAT_ROLES else special
        for token in candidates:
            if token in pool:
                roles[role] = pool[token]
                break
    return roles


def start_token_id(tokenizer: Any) -> int:
    """The zero-byte token to put at position 0 of an ALM sequence: bos, else the document separator.

    Position 0 is never scored, so ALM compares the first chunk fairly only when token 0 covers
    no bytes on both sides: prepend this id with the piece b"" to both tokenizations (Llama 3
    `<|begin_of_text|>`, Gemma `<bos>`; Qwen2, GPT-2 and SmolLM2 `<|endoftext|>`, which is how
    those models separate documents). A bos that is a chat marker is passed over.
    """
    roles = special_roles(tokenizer)
    chat = {roles[r] for r in _CHAT_ROLES if r in roles}
    if "bos" in roles and roles["bos"] not in chat:  # SmolLM2 declares <|im_start|> as its bos
        return roles["bos"]
    for role in ("end_of_text", "bos", "eos"):
        if role in roles:
            return roles[role]
    raise ValueError(f"{type(tokenizer).__name__} has no bos, end-of-text or eos token to start a sequence with")


def special_map(source: Any, target: Any) -> dict[int, int]:
    """Map special ids of `source` to those of `target` by shared role ({source id: target id}).

    Roles are claimed in MAP_PRIORITY order, so e.g. Qwen2's `<|im_end|>` (eos and eot) maps
    to Llama 3's `<|eot_id|>` and its `<|endoftext|>` to `<|end_of_text|>`. Roles one side lacks
    are dropped.
    """
    src, dst = special_roles(source), special_roles(target)
    out: dict[int, int] = {}
    for role in MAP_PRIORITY:
        if role in src and role in dst and src[role] not in out:
            out[src[role]] = dst[role]
    return out


# --------------------------------------------------------------------------- loading


def load_tokenizer(folder: str | Path) -> Any:
    """A folder's tokenizer exactly as saved: the class its ``tokenizer_config.json`` names.

    ``AutoTokenizer`` in transformers 5 overrides that class for some model types (qwen2, phi3 and
    others in its ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``) and rebuilds their pipeline: a
    Qwen2.5 model moved onto Gemma-3's tokenizer would tokenize as byte-level BPE over Gemma's
    vocabulary ("to be" as different ids). Every model folder chorus writes or reads goes
    through here; folders without a named class fall back to ``AutoTokenizer``.
    """
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    config = Path(folder) / "tokenizer_config.json"
    name = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class") if config.is_file() else None
    cls = tokenizer_class_from_name(name) if name else None
    return (cls or AutoTokenizer).from_pretrained(str(folder))


# --------------------------------------------------------------------------- byte tokenizer


class ByteTokenizer(PreTrainedTokenizerFast):
    """A byte-level tokenizer: id b (0..255) is the byte b, special tokens follow from 256.

    A real `PreTrainedTokenizerFast`: the backend is a `tokenizers` BPE model without merges
    over the 256 GPT-2 byte-level symbols, with a ByteLevel pre-tokenizer (no regex split, no
    prefix space) and decoder, so every byte of any text is one token. `save_pretrained` writes
    an ordinary tokenizer.json that `AutoTokenizer.from_pretrained` loads as a plain fast
    tokenizer; chat templates work as for any tokenizer. Build one with `ByteTokenizer.build`
    or copy another tokenizer's role tokens and chat template with `ByteTokenizer.like`.
    """

    @classmethod
    def build(
        cls,
        special_tokens: Sequence[str] = ("<|begin_of_text|>", "<|end_of_text|>", "<pad>"),
        *,
        bos_token: str | None = "<|begin_of_text|>",
        eos_token: str | None = "<|end_of_text|>",
        pad_token: str | None = "<pad>",
        chat_template: str | None = None,
        model_max_length: int = 1 << 20,
    ) -> "ByteTokenizer":
        """A byte tokenizer with `special_tokens` at ids 256, 257, ... in the given order."""
        specials = list(dict.fromkeys(special_tokens))
        for name, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
            if token is not None and token not in specials:
                raise ValueError(f"{name}_token {token!r} is not among special_tokens {specials}")
        vocab = {_BYTE_ENCODER[b]: b for b in range(256)}
        backend = Tokenizer(BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(specials)
        kwargs: dict[str, Any] = {}
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            if token is not None:
                kwargs[name] = token
        extra = [t for t in specials if t not in (bos_token, eos_token, pad_token)]
        return cls(
            tokenizer_object=backend,
            chat_template=chat_template,
            model_max_length=model_max_length,
            clean_up_tokenization_spaces=False,
            extra_special_tokens=extra,
            **kwargs,
        )

    @classmethod
    def like(cls, tokenizer: Any) -> "ByteTokenizer":
        """A byte tokenizer with `tokenizer`'s role tokens (same strings) and chat template."""
        roles = special_roles(tokenizer)
        names = [tokenizer.convert_ids_to_tokens(roles[r]) for r in ROLES if r in roles]
        specials = list(dict.fromkeys(names))
        if not specials:
            raise ValueError(f"{type(tokenizer).__name__} has no special tokens to copy")

        def role_token(role: str) -> str | None:
            return tokenizer.convert_ids_to_tokens(roles[role]) if role in roles else None

        return cls.build(
            specials,
            bos_token=role_token("bos"),
            eos_token=role_token("eos"),
            pad_token=role_token("pad") or role_token("end_of_text") or role_token("eos"),
            chat_template=getattr(tokenizer, "chat_template", None),
            model_max_length=1 << 20,
        )

    def save_pretrained(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        """Save as a plain fast tokenizer (tokenizer.json + config) that AutoTokenizer loads."""
        files = super().save_pretrained(*args, **kwargs)
        for path in files:
            if str(path).endswith("tokenizer_config.json"):
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
                config["tokenizer_class"] = "PreTrainedTokenizerFast"
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(config, f, indent=2, ensure_ascii=False)
        return files
