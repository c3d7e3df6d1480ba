"""Fast Vocabulary Transfer: initialise a model for a new tokenizer.

For every token of the new vocabulary the new embedding row (and output-head row) is

* the old row of the token with the same bytes, when the old vocabulary has one;
* for a special / chat token, the old row of the token with the same role (bos, end of turn,
  ...; :func:`transfer.tokens.special_map`), or of the old token with the same string;
* otherwise the mean of the old rows of the token's tokenization by the old tokenizer
  (bytes that are not valid UTF-8 are split greedily into the longest old tokens);
* for a special token with no counterpart at all, the mean of all old rows.

The output head gets the same rule applied to the old head rows, and input and output
embeddings are untied (the old model may tie them; the new rows of the two differ once trained).
The module classes stay (Gemma's scaled embedding keeps its scale), the config's vocab size,
special token ids and the generation config follow the new tokenizer. The target may be any
fast tokenizer, including :class:`transfer.tokens.ByteTokenizer`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .tokens import ByteTokenizer, load_tokenizer, special_map, special_roles, token_bytes, tokenize_bytes

_BATCH = 4096


def fvt_plan(old_tok: Any, new_tok: Any) -> list[list[int]]:
    """For each new token id, the old token ids whose rows it averages ([] = mean of all rows)."""
    old_table = token_bytes(old_tok)
    new_table = token_bytes(new_tok)
    lookup = _byte_lookup(old_tok, old_table)
    by_role = special_map(new_tok, old_tok)
    old_added = {e.content: i for i, e in old_tok.backend_tokenizer.get_added_tokens_decoder().items()}
    new_added = new_tok.backend_tokenizer.get_added_tokens_decoder()

    plan: list[Optional[list[int]]] = [None] * len(new_table)
    to_tokenize: list[int] = []
    for j, piece in enumerate(new_table):
        if piece is None:  # special / control token
            if j in by_role:
                plan[j] = [by_role[j]]
            else:
                content = new_added[j].content if j in new_added else None
                plan[j] = [old_added[content]] if content in old_added else []
        elif piece in lookup:
            plan[j] = [lookup[piece]]
        elif not piece:
            plan[j] = []
        else:
            to_tokenize.append(j)
    for ids, j in zip(_old_tokenizations(old_tok, old_table, [new_table[j] for j in to_tokenize]), to_tokenize):
        plan[j] = ids
    return [p if p is not None else [] for p in plan]


def _byte_lookup(tok: Any, table: list[Optional[bytes]]) -> dict[bytes, int]:
    """bytes -> old id; when several old tokens share bytes (SentencePiece's `<0x20>` and `▁`),
    prefer the one the tokenizer itself produces for them, else the lowest id."""
    lookup: dict[bytes, int] = {}
    dups: set[bytes] = set()
    for i, piece in enumerate(table):
        if piece is None or not piece:
            continue
        if piece in lookup:
            dups.add(piece)
        else:
            lookup[piece] = i
    for piece in dups:
        try:
            ids, _ = tokenize_bytes(tok, piece.decode("utf-8"))
        except UnicodeDecodeError:
            continue
        if len(ids) == 1 and table[ids[0]] == piece:
            lookup[piece] = ids[0]
    return lookup


def _old_tokenizations(tok: Any, table: list[Optional[bytes]], pieces: list[bytes]) -> list[list[int]]:
    """Old token ids covering each byte string (batched through the fast tokenizer)."""
    out: list[list[int]] = [[] for _ in pieces]
    texts: list[tuple[int, str]] = []
    lookup: dict[bytes, int] = {}
    for i, p in enumerate(table):
        if p and p not in lookup:
            lookup[p] = i
    for k, piece in enumerate(pieces):
        try:
            texts.append((k, piece.decode("utf-8")))
        except UnicodeDecodeError:
            out[k] = _greedy(piece, lookup)
    for start in range(0, len(texts), _BATCH):
        batch = texts[start : start + _BATCH]
        enc = [e.ids for e in tok.backend_tokenizer.encode_batch([t for _, t in batch], add_special_tokens=False)]
        for (k, text), ids in zip(batch, enc):
            got = [table[i] if i < len(table) else None for i in ids]
            if all(g is not None for g in got) and b"".join(got) == pieces[k]:  # type: ignore[arg-type]
                out[k] = list(ids)
            else:  # the tokenizer rewrote the text (dummy prefix, normaliser): exact pieces
                try:
                    ids, _ = tokenize_bytes(tok, text)
                except ValueError:  # a normaliser removed everything
                    ids = []
                out[k] = [i for i in ids if i < len(table) and table[i]] or _greedy(pieces[k], lookup)
    return out


def _greedy(piece: bytes, lookup: dict[bytes, int]) -> list[int]:
    """Longest-match split of ``piece`` into old tokens (for bytes that are not valid UTF-8)."""
    ids, pos = [], 0
    while pos < len(piece):
        for end in range(len(piece), pos, -1):
            if piece[pos:end] in lookup:
                ids.append(lookup[piece[pos:end]])
                pos = end
                break
        else:
            pos += 1  # a byte no old token covers: skip it
    return ids


def average_rows(old: torch.Tensor, plan: list[list[int]]) -> torch.Tensor:
    """New matrix whose row j is the mean of ``old[plan[j]]`` (the mean of all rows if empty)."""
    src = old.detach().float()
    fallback = src.mean(dim=0)
    flat = [i for ids in plan for i in ids]
    seg = [j for j, ids in enumerate(plan) for _ in ids]
    out = torch.zeros(len(plan), src.shape[1], dtype=torch.float32)
    counts = torch.zeros(len(plan), dtype=torch.float32)
    if flat:
        index = torch.tensor(seg, dtype=torch.long)
        out.index_add_(0, index, src[torch.tensor(flat, dtype=torch.long)])
        counts.index_add_(0, index, torch.ones(len(flat)))
    empty = counts == 0
    out[~empty] /= counts[~empty].unsqueeze(1)
    out[empty] = fallback
    return out.to(old.dtype)


def transfer_chat_template(old_tok: Any, new_tok: Any) -> Optional[str]:
    """The old tokenizer's chat template with its special tokens swapped for the new tokenizer's
    tokens of the same role (specials with no counterpart are dropped from the template); the
    new tokenizer's own template if the old has none. The student keeps the chat format its
    weights were trained on, written with its new tokenizer's tokens."""
    template = getattr(old_tok, "chat_template", None)
    if not template or not isinstance(template, str):
        return getattr(new_tok, "chat_template", None)
    mapping = special_map(old_tok, new_tok)
    new_strings = set(new_tok.get_vocab())
    pairs = []
    for old_id, entry in old_tok.backend_tokenizer.get_added_tokens_decoder().items():
        if not entry.special or entry.content not in template:
            continue
        if old_id in mapping:
            new_s = new_tok.convert_ids_to_tokens(mapping[old_id])
        else:  # same string in the new vocabulary, or no counterpart: dropped
            new_s = entry.content if entry.content in new_strings else ""
        if new_s != entry.content:
            pairs.append((entry.content, new_s))
    # Replace through placeholders so that a swap (a -> b, b -> a) stays correct.
    for k, (old_s, _) in enumerate(sorted(pairs, key=lambda p: -len(p[0]))):
        template = template.replace(old_s, f"\x00{k}\x00")
    for k, (_, new_s) in enumerate(sorted(pairs, key=lambda p: -len(p[0]))):
        template = template.replace(f"\x00{k}\x00", new_s)
    return template


def fvt_init(model: Any, old_tok: Any, new_tok: Any) -> Any:
    """Re-initialise ``model`` (in place) for ``new_tok`` by FVT; return it.

    Input embeddings and output head get new rows computed from the old ones (see the module
    docstring), are untied, and the config (vocab size, tying, special ids) and generation
    config follow the new tokenizer.
    """
    plan = fvt_plan(old_tok, new_tok)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output head to transfer")
    new_in = average_rows(emb.weight.data, plan)
    new_out = average_rows(head.weight.data, plan)

    emb.weight = nn.Parameter(new_in, requires_grad=emb.weight.requires_grad)
    emb.num_embeddings = len(plan)
    if getattr(emb, "padding_idx", None) is not None:
        emb.padding_idx = new_tok.pad_token_id if new_tok.pad_token_id is not None else None
    head.weight = nn.Parameter(new_out, requires_grad=head.weight.requires_grad)
    head.out_features = len(plan)
    if getattr(head, "bias", None) is not None:  # rare; same rule on the bias entries
        head.bias = nn.Parameter(average_rows(head.bias.data.unsqueeze(1), plan).squeeze(1))

    _update_config(model, old_tok, new_tok, len(plan))
    return model


def _update_config(model: Any, old_tok: Any, new_tok: Any, vocab_size: int) -> None:
    configs = [model.config]
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if text is not model.config:
        configs.append(text)
    roles = special_roles(new_tok)
    ids = {
        "bos_token_id": new_tok.bos_token_id,
        "eos_token_id": new_tok.eos_token_id if new_tok.eos_token_id is not None else roles.get("eos"),
        "pad_token_id": new_tok.pad_token_id if new_tok.pad_token_id is not None else roles.get("end_of_text"),
    }
    for cfg in configs:
        cfg.vocab_size = vocab_size
        cfg.tie_word_embeddings = False
        for key, value in ids.items():
            setattr(cfg, key, value)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        mapping = special_map(old_tok, new_tok)
        old_eos = gen.eos_token_id
        old_eos = [old_eos] if isinstance(old_eos, int) else list(old_eos or [])
        eos = [mapping[i] for i in old_eos if i in mapping]
        if ids["eos_token_id"] is not None and ids["eos_token_id"] not in eos:
            eos.append(ids["eos_token_id"])
        gen.eos_token_id = eos[0] if len(eos) == 1 else (eos or None)
        gen.bos_token_id = ids["bos_token_id"]
        gen.pad_token_id = ids["pad_token_id"]


# --------------------------------------------------------------------------------------------
# Loading and saving a transferred student


def load_target_tokenizer(spec: Any, old_tok: Any) -> Any:
    """The new tokenizer: ``"bytes"`` builds a :class:`ByteTokenizer` with the old tokenizer's
    role tokens, anything else is an HF tokenizer folder."""
    if str(spec) == "bytes":
        return ByteTokenizer.like(old_tok)
    return load_tokenizer(spec)


def init_student(model: Any, old_tok: Any, new_tok: Any) -> tuple[Any, Any]:
    """FVT-initialise ``model`` for ``new_tok`` and give ``new_tok`` the student's chat template."""
    template = transfer_chat_template(old_tok, new_tok)
    if template:
        new_tok.chat_template = template
    return fvt_init(model, old_tok, new_tok), new_tok


def save_model_folder(model: Any, tokenizer: Any, out: str | Path) -> Path:
    """Write an HF folder (weights, config, generation config, tokenizer, chat template)
    atomically: into a temporary sibling folder first, renamed into place when complete."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
