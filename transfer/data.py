"""Training data for tokenizer transfer: loading, resumable shuffling, two-sided batches.

* :func:`load_examples` reads a ``.txt`` file (cut into pieces of about ``chunk_bytes`` bytes at
  line or word boundaries) or a ``.jsonl`` file whose lines hold ``{"text": ...}`` or chat
  ``{"messages": [{"role": ..., "content": ...}, ...]}``.
* :class:`ShuffledOrder` gives a deterministic order over the examples (a new permutation per
  epoch) whose position is saved and restored with checkpoints.
* :class:`PairCollator` renders each example for the teacher and for the student (chat data
  through each side's chat template), tokenizes both into byte pieces, aligns them into chunks,
  cuts both sides to the token budget at a common chunk boundary, and builds padded tensors
  with the chunk matrices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .align import AlignmentError, align_chunks, chunk_matrices
from .errors import DataError
from .tokens import special_map, start_token_id, token_bytes, tokenize_bytes


@dataclass(frozen=True)
class Example:
    """One training example: plain ``text`` or chat ``messages`` (exactly one is set)."""

    text: Optional[str] = None
    messages: Optional[tuple[dict[str, str], ...]] = None


# --------------------------------------------------------------------------------------------
# Loading


def load_examples(path: str | Path, fmt: str = "auto", chunk_bytes: int = 2048) -> list[Example]:
    """Read examples from a text or JSON-lines file (``fmt``: auto, text or jsonl)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    if fmt == "auto":
        fmt = "jsonl" if path.suffix in (".jsonl", ".json") else "text"
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {path} is not UTF-8 text (byte {exc.start})") from None
    if fmt == "text":
        examples = [Example(text=t) for t in split_text(content, chunk_bytes)]
    elif fmt == "jsonl":
        examples = [_parse_jsonl_line(line, path, i) for i, line in enumerate(content.splitlines(), 1) if line.strip()]
    else:
        raise DataError(f"unknown data format {fmt!r} (choose auto, text or jsonl)")
    if not examples:
        raise DataError(f"data file {path} holds no examples")
    return examples


def _parse_jsonl_line(line: str, path: Path, lineno: int) -> Example:
    where = f"data file {path} line {lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where} is not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where} must be a JSON object with 'text' or 'messages'")
    if isinstance(obj.get("text"), str):
        return Example(text=obj["text"])
    messages = obj.get("messages")
    if isinstance(messages, list) and messages:
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: every message needs string 'role' and 'content'")
        return Example(messages=tuple({"role": m["role"], "content": m["content"]} for m in messages))
    raise DataError(f"{where} has neither a 'text' string nor a non-empty 'messages' list")


def split_text(text: str, chunk_bytes: int) -> list[str]:
    """Cut ``text`` into consecutive pieces of at most ``chunk_bytes`` UTF-8 bytes.

    Each piece ends after the last newline inside its budget, else after the last space, else at
    the last character boundary; pieces that are only whitespace are dropped. Concatenating all
    pieces (whitespace-only ones included) gives back ``text``.
    """
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    data = text.encode("utf-8")
    pieces, start = [], 0
    while start < len(data):
        end = min(start + chunk_bytes, len(data))
        if end < len(data):
            cut = data.rfind(b"\n", start, end) + 1
            if cut <= start + chunk_bytes // 4:
                cut = data.rfind(b" ", start, end) + 1
            if cut <= start + chunk_bytes // 4:
                cut = end
                while cut > start + 1 and (data[cut] & 0xC0) == 0x80:  # not inside a character
                    cut -= 1
            end = cut
        piece = data[start:end].decode("utf-8")
        if piece.strip():
            pieces.append(piece)
        start = end
    return pieces


# --------------------------------------------------------------------------------------------
# Order


class ShuffledOrder:
    """A deterministic, resumable stream of example indices.

    Epoch ``e`` visits all ``n`` examples in the permutation drawn from ``(seed, e)``; the
    position (epoch, offset) is the whole state, so a restored order continues exactly.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        if n <= 0:
            raise ValueError("ShuffledOrder needs at least one example")
        self.n, self.seed = n, seed
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def take(self, k: int) -> list[int]:
        """The next ``k`` indices (crossing into the next epoch when needed)."""
        out = []
        while len(out) < k:
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            step = min(k - len(out), self.n - self.offset)
            out.extend(int(i) for i in self._perm[self.offset : self.offset + step])
            self.offset += step
        return out

    def state_dict(self) -> dict[str, int]:
        """Position and identity of the stream."""
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position (the data and seed must be the same)."""
        if state["n"] != self.n or state["seed"] != self.seed:
            raise DataError(
                f"checkpoint was made with {state['n']} examples / seed {state['seed']}, "
                f"this run has {self.n} / {self.seed}: resume with the same data"
            )
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._perm = self._permutation(self.epoch)


# --------------------------------------------------------------------------------------------
# Rendering and collation


def render(example: Example, tokenizer: Any, chat_template: Optional[str] = None) -> str:
    """The text a model sees for ``example``: the plain text, or the chat rendered through the
    tokenizer's chat template (or ``chat_template`` when given)."""
    if example.text is not None:
        return example.text
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"chat data needs a chat template but tokenizer {name} has none")
    return tokenizer.apply_chat_template(list(example.messages), chat_template=template, tokenize=False)


@dataclass
class Side:
    """One side of the pair: a tokenizer and, for chat data, its chat template."""

    tokenizer: Any
    chat_template: Optional[str] = None


class PairCollator:
    """Turn examples into a batch for both models.

    Each side's token list starts with its zero-byte start token (``tokens.start_token_id``, so
    the first chunk is scored fairly) followed by the tokenization of its rendering of the
    example. Special tokens are aligned by role: a teacher special with a student counterpart
    (``tokens.special_map``) and that counterpart get the same marker bytes, other specials
    cover no bytes. Both sides are cut to ``seq_len`` tokens at a common chunk boundary, so
    they always cover the same text.

    Output keys: ``teacher_input_ids`` / ``teacher_attention_mask`` [B, Lt],
    ``student_input_ids`` / ``student_attention_mask`` [B, Ls], ``teacher_chunks`` [B, Lt, K]
    and ``student_chunks`` [B, Ls, K] (``align.chunk_matrices``), ``chunk_mask`` [B, K]
    (real chunks) and ``text_bytes`` [B] (bytes of text each row covers).
    """

    def __init__(self, teacher: Side, student: Side, seq_len: int) -> None:
        self.teacher, self.student, self.seq_len = teacher, student, seq_len
        mapping = special_map(teacher.tokenizer, student.tokenizer)
        self._t_markers = {t: _marker(s) for t, s in mapping.items()}
        self._s_markers = {s: _marker(s) for s in mapping.values()}

    def _side(self, side: Side, example: Example, markers: dict[int, bytes]) -> tuple[list[int], list[bytes]]:
        text = render(example, side.tokenizer, side.chat_template)
        # Special-token strings in plain text are text; a chat template writes them on purpose.
        ids, pieces = tokenize_bytes(side.tokenizer, text, parse_specials=example.messages is not None)
        table = token_bytes(side.tokenizer)
        pieces = [markers.get(i, b"") if (i >= len(table) or table[i] is None) else p for i, p in zip(ids, pieces)]
        start = start_token_id(side.tokenizer)
        if ids and ids[0] == start:  # a chat template that writes the bos itself
            pieces[0] = b""
            return list(ids), pieces
        return [start] + list(ids), [b""] + pieces

    def encode(self, example: Example) -> tuple[list[int], list[int], list, int]:
        """(teacher ids, student ids, chunks, text bytes), cut to the token budget."""
        t_ids, t_pieces = self._side(self.teacher, example, self._t_markers)
        s_ids, s_pieces = self._side(self.student, example, self._s_markers)
        try:
            chunks = align_chunks(t_pieces, s_pieces)
        except AlignmentError as exc:
            raise DataError(f"teacher and student renderings of an example differ beyond special tokens: {exc}") from None
        keep = cut_chunks(chunks, self.seq_len)
        if not keep:
            raise DataError(f"an example's first chunk does not fit data.seq_len={self.seq_len} on both sides; raise data.seq_len")
        t_end, s_end = keep[-1][0][1], keep[-1][1][1]
        covered = sum(len(p) for p in t_pieces[:t_end] if not p.startswith(b"\x00<special"))
        return t_ids[:t_end], s_ids[:s_end], keep, covered

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        return build_batch([self.encode(e) for e in examples], self.teacher.tokenizer, self.student.tokenizer)


def _marker(student_id: int) -> bytes:
    return b"\x00<special %d>\x00" % student_id


def cut_chunks(chunks: list, budget: int) -> list:
    """The longest prefix of ``chunks`` whose teacher and student spans both end within ``budget``."""
    keep = []
    for chunk in chunks:
        (_, t1), (_, s1) = chunk
        if t1 > budget or s1 > budget:
            break
        keep.append(chunk)
    return keep


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def build_batch(encoded: Sequence[tuple[list[int], list[int], list, int]], teacher_tok: Any, student_tok: Any) -> dict[str, torch.Tensor]:
    """Pad token ids (right) and stack chunk matrices of several encoded examples."""
    b = len(encoded)
    lt = max(len(e[0]) for e in encoded)
    ls = max(len(e[1]) for e in encoded)
    k = max(len(e[2]) for e in encoded)
    out = {
        "teacher_input_ids": torch.full((b, lt), _pad_id(teacher_tok), dtype=torch.long),
        "teacher_attention_mask": torch.zeros((b, lt), dtype=torch.long),
        "student_input_ids": torch.full((b, ls), _pad_id(student_tok), dtype=torch.long),
        "student_attention_mask": torch.zeros((b, ls), dtype=torch.long),
        "chunk_mask": torch.zeros((b, k), dtype=torch.bool),
        "text_bytes": torch.tensor([e[3] for e in encoded], dtype=torch.long),
    }
    a_rows, b_rows = [], []
    for i, (t_ids, s_ids, chunks, _) in enumerate(encoded):
        out["teacher_input_ids"][i, : len(t_ids)] = torch.tensor(t_ids, dtype=torch.long)
        out["teacher_attention_mask"][i, : len(t_ids)] = 1
        out["student_input_ids"][i, : len(s_ids)] = torch.tensor(s_ids, dtype=torch.long)
        out["student_attention_mask"][i, : len(s_ids)] = 1
        out["chunk_mask"][i, : len(chunks)] = True
        a, bt = chunk_matrices(chunks, lt, ls, n_chunks=k)
        a_rows.append(a)
        b_rows.append(bt)
    out["student_chunks"] = torch.stack(a_rows)
    out["teacher_chunks"] = torch.stack(b_rows)
    return out
