"""Bits per byte: windows that depend on the text only, batched scoring equal to a direct
computation, and the same bytes for a teacher and its FVT student on another tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from transfer import cli
from transfer.evaluate import bits_per_byte, byte_windows, evaluate_folder
from transfer.tokens import start_token_id


def test_byte_windows_depend_on_the_text_only():
    text = "First line of verse,\nsecond line here.\n" * 40 + "naïve café " * 30
    windows = byte_windows(text, window_bytes=100)
    assert all(0 < len(w.encode()) <= 100 for w in windows)
    assert "".join(windows) == text  # nothing here is whitespace-only, so nothing is dropped
    capped = byte_windows(text, window_bytes=100, max_bytes=450)
    assert capped == windows[: len(capped)] and sum(len(w.encode()) for w in capped) <= 450
    assert sum(len(w.encode()) for w in windows[: len(capped) + 1]) > 450


def test_batched_bits_per_byte_equal_a_direct_computation(tiny_dir, corpus):
    """Windows of different token lengths in one padded batch score as they do one by one."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama-gpt2")).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir("llama-gpt2"))
    windows = byte_windows(corpus["heldout"].read_text(), window_bytes=150, max_bytes=900)
    assert len({len(tok(w)["input_ids"]) for w in windows}) > 1
    got = bits_per_byte(model, tok, windows, batch_size=4)
    bits, tokens = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([[start_token_id(tok)] + tok(w, add_special_tokens=False)["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            bits -= float(logp.gather(-1, ids[0, 1:, None]).sum()) / math.log(2)
            tokens += ids.shape[1] - 1
    assert got.bytes == sum(len(w.encode()) for w in windows) and got.tokens == tokens
    assert got.bits_per_byte == pytest.approx(bits / got.bytes, rel=1e-5)


def test_teacher_and_fvt_student_are_measured_on_the_same_bytes(tiny_dir, corpus, tmp_path, capsys):
    teacher = tiny_dir("llama-gpt2")
    student = tmp_path / "bytes-student"
    assert cli.main(["init", "--model", str(teacher), "--tokenizer", "bytes", "--out", str(student)]) == 0
    a = evaluate_folder(teacher, corpus["heldout"], max_bytes=1200, show_progress=False)
    b = evaluate_folder(student, corpus["heldout"], max_bytes=1200, show_progress=False)
    assert a.bytes == b.bytes and a.windows == b.windows
    assert b.tokens == b.bytes > 2 * a.tokens  # one token per byte on the student's side
    assert math.isfinite(a.bits_per_byte) and math.isfinite(b.bits_per_byte) and a.bits_per_byte != b.bits_per_byte
    # an existing --out is refused, untouched
    assert cli.main(["init", "--model", str(teacher), "--tokenizer", "bytes", "--out", str(student)]) == 2
    assert "choose a new --out" in capsys.readouterr().err
