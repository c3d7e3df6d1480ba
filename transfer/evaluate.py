"""Bits per byte: a quality measure that is comparable across tokenizers.

The held-out text is cut into fixed byte windows (:func:`byte_windows`, a function of the text
alone, so every model sees the same bytes). Each window is tokenized by the model's own
tokenizer, preceded by its zero-byte start token (``tokens.start_token_id``), and every token of
the window is scored:

    bits per byte = sum over windows and tokens of -log2 p(token | previous tokens)
                    / number of bytes in the windows.

A teacher, its FVT-initialised student and the trained student (each with its own tokenizer)
are therefore measured on exactly the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .data import split_text
from .errors import DataError
from .losses import token_logprobs
from .tokens import encode_text, load_tokenizer, start_token_id


@dataclass(frozen=True)
class BitsPerByte:
    """Result of an evaluation: total bits, bytes, tokens and windows scored."""

    bits: float
    bytes: int
    tokens: int
    windows: int

    @property
    def bits_per_byte(self) -> float:
        return self.bits / max(self.bytes, 1)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)

    def as_dict(self) -> dict[str, float]:
        return {"bits_per_byte": self.bits_per_byte, "bytes": self.bytes, "tokens": self.tokens,
                "windows": self.windows, "bytes_per_token": self.bytes_per_token}


def byte_windows(text: str, window_bytes: int = 1024, max_bytes: Optional[int] = None) -> list[str]:
    """Consecutive windows of at most ``window_bytes`` UTF-8 bytes, ending at line (else word)
    boundaries, up to ``max_bytes`` bytes in all; whitespace-only windows are skipped."""
    windows, total = [], 0
    for piece in split_text(text, window_bytes):
        size = len(piece.encode("utf-8"))
        if max_bytes is not None and total + size > max_bytes:
            break
        windows.append(piece)
        total += size
    return windows


def read_windows(path: str | Path, window_bytes: int = 1024, max_bytes: Optional[int] = None) -> list[str]:
    """:func:`byte_windows` of a UTF-8 text file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"text file {path} is not UTF-8 (byte {exc.start})") from None
    windows = byte_windows(text, window_bytes, max_bytes)
    if not windows:
        raise DataError(f"text file {path} has no text to evaluate (or --max-bytes is below one window)")
    return windows


@torch.no_grad()
def bits_per_byte(
    model: Any,
    tokenizer: Any,
    windows: Sequence[str],
    batch_size: int = 4,
    progress: Optional[Callable[[int], None]] = None,
) -> BitsPerByte:
    """Score every token of every window with ``model`` (see the module docstring)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = start_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    limit = getattr(model.config, "max_position_embeddings", None)
    bits, n_bytes, n_tokens = 0.0, 0, 0
    try:
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size]
            rows = [[start] + encode_text(tokenizer, w) for w in batch]
            longest = max(len(r) for r in rows)
            if limit is not None and longest > limit:
                raise DataError(f"a window has {longest} tokens, more than the model's {limit} positions; use smaller windows")
            ids = torch.full((len(rows), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), longest), dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, : len(row)] = torch.tensor(row)
                mask[r, : len(row)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            lp = token_logprobs(logits, ids, mask)
            bits += float(-lp.sum()) / math.log(2)
            n_tokens += int(mask.sum()) - len(rows)
            n_bytes += sum(len(w.encode("utf-8")) for w in batch)
            if progress is not None:
                progress(len(batch))
    finally:
        model.train(was_training)
    return BitsPerByte(bits, n_bytes, n_tokens, len(windows))


def evaluate_folder(
    model_dir: str | Path,
    text_path: str | Path,
    tokenizer_dir: Optional[str | Path] = None,
    max_bytes: Optional[int] = None,
    window_bytes: int = 1024,
    batch_size: int = 4,
    dtype: str = "fp32",
    show_progress: bool = True,
) -> BitsPerByte:
    """Load an HF model folder (and its tokenizer, or ``tokenizer_dir``) and measure bits per byte."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise DataError(f"model folder {model_dir} not found or has no config.json")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
    if not tok_dir.is_dir():
        raise DataError(f"tokenizer folder {tok_dir} not found")
    windows = read_windows(text_path, window_bytes, max_bytes)
    tokenizer = load_tokenizer(tok_dir)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise DataError(
            f"tokenizer {tok_dir} has {len(tokenizer)} tokens but the model only "
            f"{model.get_input_embeddings().weight.shape[0]} embedding rows: wrong tokenizer for this model"
        )
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(windows), desc=f"bpb {model_dir.name}", unit="win", leave=False)
    try:
        return bits_per_byte(model, tokenizer, windows, batch_size, bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
