"""Chunk alignment between two tokenizations of the same bytes (ALM, docs/alm.md section 2).

A chunk is the smallest pair of token spans (teacher span, student span) covering the same
bytes: walking both token lists with two pointers over cumulative byte counts, a chunk closes
whenever both counts are equal (and the chunk covers at least one byte). Spans are half-open
[start, end) token indices. Pieces come from `transfer.tokens.tokenize_bytes`; a token may cover
zero bytes (a BOS given the piece b"", a lone SentencePiece dummy prefix): it joins the chunk
that starts at its position, or the last chunk when it trails the text.

Convention for ALM: start both sequences with a zero-byte token (`tokens.start_token_id`, piece
b""). Position 0 is never scored, so the first chunk is then P(first bytes | start) on both
sides; were token 0 to carry bytes, the two sides of the first chunk would condition on
different things.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Span = tuple[int, int]
Chunk = tuple[Span, Span]


class AlignmentError(ValueError):
    """The two token sequences do not spell the same bytes."""


def _check_same_bytes(teacher_pieces: Sequence[bytes], student_pieces: Sequence[bytes]) -> None:
    a, b = b"".join(teacher_pieces), b"".join(student_pieces)
    if a == b:
        return
    at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    raise AlignmentError(
        f"teacher and student pieces spell different bytes ({len(a)} vs {len(b)} bytes, first "
        f"difference at byte {at}: teacher {a[at:at + 12]!r}, student {b[at:at + 12]!r})"
    )


def align_chunks(teacher_pieces: Sequence[bytes], student_pieces: Sequence[bytes]) -> list[Chunk]:
    """Minimal aligned chunks [((t_start, t_end), (s_start, s_end)), ...] in text order.

    Chunks tile both token lists (every token in exactly one chunk) and each chunk's teacher
    and student spans cover the same bytes, with no shorter split possible. Raises
    AlignmentError when the two byte strings differ. Both lists empty give [].
    """
    _check_same_bytes(teacher_pieces, student_pieces)
    lt = [len(p) for p in teacher_pieces]
    ls = [len(p) for p in student_pieces]
    nt, ns = len(lt), len(ls)
    chunks: list[Chunk] = []
    i = j = 0  # next teacher / student token
    ct = cs = 0  # bytes covered by tokens [0, i) / [0, j)
    ti = sj = base = 0  # where the open chunk starts (tokens, bytes)
    while i < nt or j < ns:
        if ct == cs:
            if ct > base:  # both sides end at the same byte: close the chunk
                chunks.append(((ti, i), (sj, j)))
                ti, sj, base = i, j, ct
            if i < nt:
                ct += lt[i]
                i += 1
            if j < ns:
                cs += ls[j]
                j += 1
        elif ct < cs:
            ct += lt[i]
            i += 1
        else:
            cs += ls[j]
            j += 1
    if ti < nt or sj < ns:
        if ct == base and chunks:  # only zero-byte tokens trail: they join the last chunk
            (t0, _), (s0, _) = chunks[-1]
            chunks[-1] = ((t0, nt), (s0, ns))
        else:
            chunks.append(((ti, nt), (sj, ns)))
    return chunks


def chunk_matrices(
    chunks: Sequence[Chunk], n_teacher: int, n_student: int, n_chunks: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """0/1 float32 matrices (A_student [n_student, K], B_teacher [n_teacher, K]).

    Column k marks the tokens of chunk k on each side. K = len(chunks), or `n_chunks` to pad
    with empty columns (for batching; an empty column is an absent chunk). `n_teacher` /
    `n_student` may exceed the aligned lengths (padding rows stay zero).
    """
    k = len(chunks) if n_chunks is None else n_chunks
    if k < len(chunks):
        raise ValueError(f"n_chunks={k} is smaller than the {len(chunks)} chunks")
    a = torch.zeros(n_student, k, dtype=torch.float32)
    b = torch.zeros(n_teacher, k, dtype=torch.float32)
    for col, ((t0, t1), (s0, s1)) in enumerate(chunks):
        if t1 > n_teacher or s1 > n_student:
            raise ValueError(
                f"chunk {col} spans teacher tokens [{t0}, {t1}) and student tokens [{s0}, {s1}), "
                f"beyond n_teacher={n_teacher} / n_student={n_student}"
            )
        b[t0:t1, col] = 1.0
        a[s0:s1, col] = 1.0
    return a, b
