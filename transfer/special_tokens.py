"""Special and chat tokens by shared role across tokenizer families (bos, eos, pad, chat headers,
end of turn, document separator), the zero-byte start token of an ALM sequence, and the mapping
of one tokenizer's special ids onto another's.
"""

from __future__ import annotations

from typing import Any

from .byte_view import _backend

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
