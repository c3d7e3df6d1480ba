"""transfer.align: minimal chunks between real tokenizer pairs, and their 0/1 matrices."""

from __future__ import annotations

from functools import lru_cache
from itertools import accumulate

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from transfer import align, tokens, zoo

FRAGMENTS = [" ", "\n", "\t", "  ", "\r\n", "    ", "\n\n", "日本語", "中文", "한국어", "👍🏽", "👨\u200d👩\u200d👧", "é",
             "e\u0301", "def f(x):\n", "    return x", "{}", "'s", "<|im_start|>", "<|eot_id|>", "<start_of_turn>",
             "▁", " the", "Hello", "123456", "naïve café", "x = [1, 2]  # ok\n"]
TEXT = st.lists(
    st.one_of(st.text(st.characters(codec="utf-8"), max_size=8), st.sampled_from(FRAGMENTS)), max_size=12
).map("".join)

PAIRS = [("llama3", "qwen2"), ("gemma3", "qwen2"), ("gpt2", "bytes")]


@lru_cache(maxsize=None)
def load(name: str):
    if name == "bytes":
        return tokens.ByteTokenizer.like(load("gpt2"))
    return AutoTokenizer.from_pretrained(zoo.tokenizer_dir(name))


def reference_boundaries(teacher_pieces, student_pieces) -> list[int]:
    """Byte positions where both tokenizations have a token boundary (the chunk ends), by sets."""
    ends_t = set(accumulate(len(p) for p in teacher_pieces))
    ends_s = set(accumulate(len(p) for p in student_pieces))
    return sorted(p for p in ends_t & ends_s if p > 0)


def check_chunks(teacher_pieces, student_pieces, chunks):
    nt, ns = len(teacher_pieces), len(student_pieces)
    # The spans tile both token lists in order.
    t_next = s_next = 0
    for (t0, t1), (s0, s1) in chunks:
        assert (t0, s0) == (t_next, s_next)
        assert t1 > t0 and s1 > s0
        t_next, s_next = t1, s1
    assert (t_next, s_next) == (nt, ns)
    # Each chunk spells the same bytes on both sides; together they spell the text.
    spelled = []
    for (t0, t1), (s0, s1) in chunks:
        t_bytes, s_bytes = b"".join(teacher_pieces[t0:t1]), b"".join(student_pieces[s0:s1])
        assert t_bytes == s_bytes
        spelled.append(t_bytes)
        # Minimal: no byte position inside the chunk is a boundary on both sides.
        inner_t = set(accumulate(len(p) for p in teacher_pieces[t0:t1])) - {0, len(t_bytes)}
        inner_s = set(accumulate(len(p) for p in student_pieces[s0:s1])) - {0, len(t_bytes)}
        assert not inner_t & inner_s
    assert b"".join(spelled) == b"".join(teacher_pieces)
    # The chunk ends are exactly the common boundaries.
    ends = list(accumulate(len(b"".join(teacher_pieces[t0:t1])) for (t0, t1), _ in chunks))
    assert ends == reference_boundaries(teacher_pieces, student_pieces)


@pytest.mark.parametrize("teacher,student", PAIRS)
@settings(max_examples=60, deadline=None)
@given(text=TEXT)
def test_chunks_of_real_tokenizer_pairs(teacher, student, text):
    _, t_pieces = tokens.tokenize_bytes(load(teacher), text)
    _, s_pieces = tokens.tokenize_bytes(load(student), text)
    chunks = align.align_chunks(t_pieces, s_pieces)
    if not text:
        assert chunks == []
        return
    check_chunks(t_pieces, s_pieces, chunks)
    a, b = align.chunk_matrices(chunks, len(t_pieces), len(s_pieces))
    assert a.shape == (len(s_pieces), len(chunks)) and b.shape == (len(t_pieces), len(chunks))
    assert torch.equal(a.sum(1), torch.ones(len(s_pieces))) and torch.equal(b.sum(1), torch.ones(len(t_pieces)))
    len_s = torch.tensor([len(p) for p in s_pieces], dtype=torch.float32)
    len_t = torch.tensor([len(p) for p in t_pieces], dtype=torch.float32)
    assert torch.equal(len_s @ a, len_t @ b)  # every chunk covers as many bytes on both sides


@settings(max_examples=60, deadline=None)
@given(text=TEXT)
def test_same_tokenizer_gives_one_token_per_chunk(text):
    _, pieces = tokens.tokenize_bytes(load("llama3"), text)
    chunks = align.align_chunks(pieces, pieces)
    assert chunks == [((k, k + 1), (k, k + 1)) for k in range(len(pieces))]


def test_hand_built_example():
    teacher = [b"Hel", b"lo", b" wor", b"ld", b"!"]
    student = [b"H", b"ello", b" ", b"world!"]
    chunks = align.align_chunks(teacher, student)
    assert chunks == [((0, 2), (0, 2)), ((2, 5), (2, 4))]
    a, b = align.chunk_matrices(chunks, 5, 4)
    assert a.tolist() == [[1, 0], [1, 0], [0, 1], [0, 1]]
    assert b.tolist() == [[1, 0], [1, 0], [0, 1], [0, 1], [0, 1]]


def test_zero_byte_tokens_join_the_following_chunk():
    # A BOS with no bytes on both sides, a lone dummy prefix on the teacher side.
    teacher = [b"", b"", b"ab", b"c"]
    student = [b"", b"a", b"bc"]
    assert align.align_chunks(teacher, student) == [((0, 4), (0, 3))]
    teacher = [b"", b"a", b"", b"b"]
    student = [b"", b"a", b"b"]
    assert align.align_chunks(teacher, student) == [((0, 2), (0, 2)), ((2, 4), (2, 3))]
    # Trailing zero-byte tokens (an EOS with no bytes) join the last chunk.
    assert align.align_chunks([b"ab", b""], [b"a", b"b"]) == [((0, 2), (0, 2))]
    assert align.align_chunks([b""], []) == [((0, 1), (0, 0))]
    assert align.align_chunks([], []) == []


def test_different_bytes_are_refused():
    with pytest.raises(align.AlignmentError, match="first difference at byte 3"):
        align.align_chunks([b"abc", b"d"], [b"abc", b"e"])
    with pytest.raises(ValueError, match="different bytes"):
        align.align_chunks([b"abc"], [b"ab"])


def test_matrices_pad_and_check_bounds():
    chunks = [((0, 1), (0, 2))]
    a, b = align.chunk_matrices(chunks, n_teacher=3, n_student=4, n_chunks=2)
    assert a.tolist() == [[1, 0], [1, 0], [0, 0], [0, 0]] and b.tolist() == [[1, 0], [0, 0], [0, 0]]
    with pytest.raises(ValueError, match="smaller"):
        align.chunk_matrices(chunks * 3, 3, 4, n_chunks=2)
    with pytest.raises(ValueError, match="beyond"):
        align.chunk_matrices(chunks, n_teacher=1, n_student=1)
