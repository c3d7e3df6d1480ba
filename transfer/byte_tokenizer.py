"""`ByteTokenizer`: a real fast Hugging Face tokenizer whose ids 0..255 are the bytes, with
special tokens after them (built from a list, or copied from another tokenizer's roles).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from .byte_view import _BYTE_ENCODER
from .special_tokens import ROLES, special_roles


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
