"""The ALM loss: group scores of teacher and student, and their distance (docs/alm.md).

The four steps (token log-probs, chunk log-probs, the tokenization-bias correction that merges
chunks into groups, the distance averaged over valid groups) are described in the module
docstring of `transfer.losses`, which re-exports everything here.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .losses_distances import abs_divergence, binarised_divergence, binary_kl_divergence
from .losses_logprobs import (
    _chunk_ends,
    _floor,
    _shifted_logprobs,
    chunk_logprobs,
    next_token_targets,
    scored_positions,
    vocab_stats,
)

DEBIAS_MODES = ("space", "none")
DISTANCES = ("binary_kl", "binary_ce", "binarised", "abs")


@dataclass(frozen=True)
class GroupScores:
    """Per-group scores of one batch (G = K columns; unused columns are invalid).

    teacher, student: float32 [B, G] log-scores (the student's carries the gradient);
    valid: bool [B, G]; chunk_group: long [B, K], the group of each chunk (-1 for none).
    """

    teacher: Tensor
    student: Tensor
    valid: Tensor
    chunk_group: Tensor


@dataclass(frozen=True)
class _SideChunks:
    """One side's statistics for `alm_group_scores` (K chunks, T positions).

    lp: float32 [B, K] chunk log-probs; has: bool [B, K] chunk holds a scored token; end: long
    [B, K] index of the chunk's last token; exists: bool [B, K] chunk has tokens; lse / sub:
    float32 [B, T] the log-normalizer and the word-boundary logsumexp (-inf without a space mask).
    """

    lp: Tensor
    has: Tensor
    end: Tensor
    exists: Tensor
    lse: Tensor
    sub: Tensor


def _check_alm_args(
    debias: str, gamma: float, student_matrix: Tensor, teacher_matrix: Tensor,
    student_space_mask: Tensor | None, teacher_space_mask: Tensor | None,
) -> None:
    """Raise ValueError for an unknown debias mode, a gamma outside (0, 1), chunk matrices with
    different chunk counts, or debias="space" without both space masks."""
    if debias not in DEBIAS_MODES:
        raise ValueError(f"debias must be one of {DEBIAS_MODES}, got {debias!r}")
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be in (0, 1), got {gamma}")
    if student_matrix.shape[-1] != teacher_matrix.shape[-1]:
        raise ValueError(
            f"student matrix has {student_matrix.shape[-1]} chunks, teacher matrix {teacher_matrix.shape[-1]}"
        )
    if debias == "space" and (student_space_mask is None or teacher_space_mask is None):
        raise ValueError('debias="space" needs student_space_mask and teacher_space_mask')


def _side_chunks(
    logits: Tensor, ids: Tensor, mask: Tensor | None, matrix: Tensor, space_mask: Tensor | None,
    *, no_grad: bool,
) -> _SideChunks:
    """Chunk statistics of one side. One blockwise pass gives the normalizers, the next-token
    logits and (with a space mask) the word-boundary logsumexp, without float32 copies of the
    logits; `no_grad` runs that pass without autograd (the teacher)."""
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    with torch.no_grad() if no_grad else contextlib.nullcontext():
        lse, pick, sub = vocab_stats(logits, next_token_targets(ids), space_mask)
    tok = _shifted_logprobs(pick[:, :-1], lse, ids, mask)
    lp, has = chunk_logprobs(tok, matrix, scored_positions(mask))
    end, exists = _chunk_ends(matrix)
    return _SideChunks(lp, has, end, exists, lse, sub)


def _chunk_scores(teacher: _SideChunks, student: _SideChunks, exists: Tensor, ok: Tensor) -> GroupScores:
    """debias="none": every valid chunk is its own group, scored by its log-prob alone."""
    batch, k = exists.shape
    group = torch.where(exists, torch.arange(k, device=exists.device).expand(batch, k), -1)
    zero = torch.zeros_like(teacher.lp)
    return GroupScores(torch.where(ok, teacher.lp, zero), torch.where(ok, student.lp, zero), ok, group)


def _space_group_scores(
    teacher: _SideChunks, student: _SideChunks, exists: Tensor, ok: Tensor, gamma: float
) -> GroupScores:
    """debias="space": chunks merged into groups that end where the teacher's p_sp exceeds gamma;
    a group scores the sum of its chunks' log-probs plus log p_sp at its end, each side its own.
    The chunks after the last such boundary form the row's last group, which ends at the row's
    last chunk whatever its p_sp (as tokenkit's merge_by_space_prob does)."""
    k = exists.shape[1]
    t_sp = (teacher.sub - teacher.lse).gather(1, teacher.end)  # log p_sp; -inf if no token opens a word
    s_sp = (student.sub - student.lse).gather(1, student.end)
    marks = exists & (t_sp > math.log(gamma))  # the teacher decides where groups end
    last = exists & (exists.flip(1).long().cumsum(dim=1).flip(1) == 1)  # each row's last chunk
    ends = marks | last
    ends_l = ends.long()
    before = ends_l.cumsum(dim=1) - ends_l  # group index = group ends strictly before the chunk
    member = exists
    onehot = ((before.unsqueeze(-1) == torch.arange(k, device=marks.device)) & member.unsqueeze(-1)).float()
    zero = torch.zeros_like(teacher.lp)
    t_chunk = _floor(teacher.lp + torch.where(ends, t_sp, zero))
    s_chunk = _floor(student.lp + torch.where(ends, s_sp, zero))
    t_group = torch.einsum("bk,bkg->bg", t_chunk, onehot)
    s_group = torch.einsum("bk,bkg->bg", s_chunk, onehot)
    bad = torch.einsum("bk,bkg->bg", (member & ~ok).float(), onehot)
    valid = (onehot.sum(dim=1) > 0) & (bad == 0)
    group = torch.where(member, before, -1)
    zero_g = torch.zeros_like(t_group)
    return GroupScores(torch.where(valid, t_group, zero_g), torch.where(valid, s_group, zero_g), valid, group)


def alm_group_scores(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_ids: Tensor,
    teacher_ids: Tensor,
    student_matrix: Tensor,
    teacher_matrix: Tensor,
    student_mask: Tensor | None = None,
    teacher_mask: Tensor | None = None,
    student_space_mask: Tensor | None = None,
    teacher_space_mask: Tensor | None = None,
    chunk_mask: Tensor | None = None,
    *,
    debias: str = "space",
    gamma: float = 0.1,
) -> GroupScores:
    """Teacher and student log-scores of the comparable outcomes (groups) of a batch.

    student_logits [B, Ts, Vs], teacher_logits [B, Tt, Vt]; ids [B, Ts] / [B, Tt];
    student_matrix A [B, Ts, K], teacher_matrix B [B, Tt, K] (0/1, padded columns empty);
    masks [B, T] attention masks (default all real); space masks bool [V] (required for
    debias="space"); chunk_mask [B, K] bool: chunks allowed in the loss (e.g. response only).
    debias="space": groups as in the `transfer.losses` module docstring; debias="none": every valid chunk is
    its own group, scored by its log-prob alone.
    """
    _check_alm_args(debias, gamma, student_matrix, teacher_matrix, student_space_mask, teacher_space_mask)
    spaced = debias == "space"
    student = _side_chunks(student_logits, student_ids, student_mask, student_matrix,
                           student_space_mask if spaced else None, no_grad=False)
    teacher = _side_chunks(teacher_logits.detach(), teacher_ids, teacher_mask, teacher_matrix,
                           teacher_space_mask if spaced else None, no_grad=True)
    exists = student.exists & teacher.exists
    ok = exists & student.has & teacher.has
    if chunk_mask is not None:
        ok = ok & chunk_mask.bool()
    if debias == "none":
        return _chunk_scores(teacher, student, exists, ok)
    return _space_group_scores(teacher, student, exists, ok, gamma)


def group_distance(scores: GroupScores, distance: str = "binary_kl", tau: float = 100.0) -> Tensor:
    """Scalar: the distance between teacher and student group scores, averaged over valid groups.

    distance: "binary_kl" (`binary_kl_divergence`: 0 at a match), "binary_ce" (alias
    "binarised": `binarised_divergence`, the same gradient plus the teacher's binary entropy),
    both at temperature tau, or "abs". With no valid group the result is 0 (still attached to the
    student's graph).
    """
    if distance == "binary_kl":
        per_group = binary_kl_divergence(scores.teacher, scores.student, tau)
    elif distance in ("binary_ce", "binarised"):
        per_group = binarised_divergence(scores.teacher, scores.student, tau)
    elif distance == "abs":
        per_group = abs_divergence(scores.teacher, scores.student)
    else:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    per_group = torch.where(scores.valid, per_group, torch.zeros_like(per_group))
    return per_group.sum() / scores.valid.sum().clamp(min=1)


def alm_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_ids: Tensor,
    teacher_ids: Tensor,
    student_matrix: Tensor,
    teacher_matrix: Tensor,
    student_mask: Tensor | None = None,
    teacher_mask: Tensor | None = None,
    student_space_mask: Tensor | None = None,
    teacher_space_mask: Tensor | None = None,
    chunk_mask: Tensor | None = None,
    *,
    debias: str = "space",
    gamma: float = 0.1,
    distance: str = "binary_kl",
    tau: float = 100.0,
) -> Tensor:
    """Scalar ALM loss of a batch: `alm_group_scores` then `group_distance` (see their shapes).

    Differentiable w.r.t. `student_logits` only (the teacher's logits are detached).
    """
    scores = alm_group_scores(
        student_logits, teacher_logits, student_ids, teacher_ids, student_matrix, teacher_matrix,
        student_mask, teacher_mask, student_space_mask, teacher_space_mask, chunk_mask,
        debias=debias, gamma=gamma,
    )
    return group_distance(scores, distance, tau)
