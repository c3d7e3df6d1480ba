"""Byte-level view of Hugging Face tokenizers: token bytes, byte-exact tokenization, special roles.

ALM compares two tokenizations of the same text through the bytes each token covers. This module
gives that view for any tokenizers-backed (fast) Hugging Face tokenizer:

* `token_bytes`: the bytes of every vocabulary entry (None for special/control tokens), decoded
  according to the tokenizer's backend (byte-level BPE or SentencePiece-style), never its name.
* `tokenize_bytes`: ids plus one byte piece per token whose concatenation is exactly the input.
* `special_roles` / `special_map`: special and chat tokens by shared role across families.
* `space_token_mask`: which next tokens start a new word (for ALM's tokenization-bias correction).
* `ByteTokenizer`: a byte-level tokenizer (ids 0..255 are the bytes, specials after them).
* `load_tokenizer`: a folder's tokenizer exactly as saved (the class its config names).

Modules: `transfer.byte_view` (token bytes, word-opening tokens, byte-exact tokenization),
`transfer.special_tokens` (roles, start token, special-id mapping), `transfer.byte_tokenizer`
(`ByteTokenizer`) and this one (`load_tokenizer`). Every public name of those modules is
importable from here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Re-exported: callers and tests use these as `transfer.tokens.<name>`.
from .byte_tokenizer import ByteTokenizer  # noqa: F401
from .byte_view import (  # noqa: F401
    _BYTE_DECODER,
    _BYTE_ENCODER,
    BYTE_LEVEL,
    PLAIN,
    SENTENCEPIECE,
    SPACE_BYTES,
    _backend,
    encode_text,
    piece_bytes,
    space_token_mask,
    token_bytes,
    tokenize_bytes,
    tokenizer_kind,
)
from .special_tokens import (  # noqa: F401
    MAP_PRIORITY,
    ROLES,
    special_map,
    special_roles,
    start_token_id,
)

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
