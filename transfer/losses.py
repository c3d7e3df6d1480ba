"""ALM losses as pure tensor functions (docs/alm.md), plus SFT, latents and combination.

Shapes: B batch, Tt / Ts teacher / student positions, Vt / Vs vocabularies, K chunks (columns of
the chunk matrices from `transfer.align.chunk_matrices`, padded per batch), D hidden size.
Log-probabilities are float32 whatever the logits' dtype. The teacher side is always detached:
every loss here is differentiable w.r.t. the student's tensors only.

ALM in four steps:
1. per-token log-probs l_t = log p(x_t | x_<t); position 0 (and padding) is never scored;
2. chunk log-prob log P(chunk) = min(0, sum of its tokens' l_t); a chunk is valid when both of
   its spans hold a scored token (the design asks this of the teacher; requiring it of the
   student too drops comparisons where the student's side is a constant). Sequences should
   start with a zero-byte token on both sides (see `transfer.align`), so that the unscored
   position 0 carries no text;
3. tokenization-bias correction ("space" debiasing): the teacher marks the chunks after which
   its p_sp (probability that the next token opens a word: starts with space, newline or tab,
   or is special) exceeds gamma; consecutive chunks are merged into groups ending at a marked
   chunk; group score = sum of its chunks' log-probs + log p_sp at the group's end, each side
   with its own p_sp. Chunks after the last marked one form no group. A group is valid when all
   its chunks are valid (and inside `chunk_mask`, if given);
4. distance per valid group (binarised divergence at temperature tau, by default minus its
   floor, the teacher's binary entropy, which leaves the gradient unchanged and makes a perfect
   match score 0; or |lpT - lpS|), averaged over all valid groups of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

DEBIAS_MODES = ("space", "none")
DISTANCES = ("binary_kl", "binary_ce", "binarised", "abs")
_LOG_FLOOR = -1e30  # -inf log-probs become this, so that 0 * log(0) stays 0, not NaN


def _floor(x: Tensor) -> Tensor:
    """x with -inf replaced by -1e30; finite entries (and their gradients) are unchanged."""
    return torch.where(torch.isneginf(x), torch.full_like(x, _LOG_FLOOR), x)


# --------------------------------------------------------------------------- log-probs


def scored_positions(mask: Tensor) -> Tensor:
    """Bool [B, T]: positions whose token is scored: t >= 1 and tokens t-1 and t are both real.

    `mask` [B, T] is the attention mask (1/True for real tokens); this handles left and right
    padding alike (the first real token of a left-padded row is not scored).
    """
    mask = mask.bool()
    scored = torch.zeros_like(mask)
    scored[:, 1:] = mask[:, 1:] & mask[:, :-1]
    return scored


def log_normalizer(logits: Tensor) -> Tensor:
    """Float32 [B, T]: logsumexp of the logits over the vocabulary (the log-softmax denominator)."""
    return vocab_stats(logits)[0]


#: Elements of one float32 block of rows in `vocab_stats` (32 MB; 256 MB on an accelerator,
#: where fewer, larger kernels pay): bounds its temporary memory.
STATS_BLOCK = 1 << 23
STATS_BLOCK_ACCELERATOR = 1 << 26


class _VocabStats(torch.autograd.Function):
    """Per row of [N, V] logits: logsumexp, the logit of a target id, logsumexp over a subset.

    Computed block by block in float32 without keeping float32 or softmax copies of the logits;
    the backward recomputes each block's softmax (weights exp(x - lse), exp(x - lse_subset) on
    the subset, plus the one-hot of the target) and writes the gradient in the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, subset: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        n, vocab = logits.shape
        block = STATS_BLOCK if logits.device.type == "cpu" else STATS_BLOCK_ACCELERATOR
        rows = max(1, block // max(vocab, 1))
        lse = logits.new_empty(n, dtype=torch.float32)
        picked = torch.zeros(n, dtype=torch.float32, device=logits.device)
        sub = torch.full((n,), float("-inf"), dtype=torch.float32, device=logits.device)
        valid = targets >= 0
        index = targets.clamp(min=0)[:, None]
        for a in range(0, n, rows):
            x = logits[a : a + rows].float()
            lse[a : a + rows] = torch.logsumexp(x, dim=-1)
            picked[a : a + rows] = x.gather(1, index[a : a + rows]).squeeze(1)
            if subset is not None and subset.numel():
                # -inf logits floored (see `_floor`): a row whose subset is all -inf stays finite
                sub[a : a + rows] = torch.logsumexp(_floor(x.index_select(1, subset)), dim=-1)
        picked = torch.where(valid, picked, torch.zeros_like(picked))
        ctx.save_for_backward(logits, index, valid, subset, lse, sub)
        ctx.rows = rows
        return lse, picked, sub

    @staticmethod
    def backward(ctx, g_lse: Tensor | None, g_picked: Tensor | None, g_sub: Tensor | None):
        logits, index, valid, subset, lse, sub = ctx.saved_tensors
        if g_lse is None and g_picked is None and g_sub is None:
            return None, None, None
        rows = ctx.rows
        grad = torch.empty_like(logits)
        if g_picked is not None:
            g_picked = torch.where(valid, g_picked, torch.zeros_like(g_picked))
        for a in range(0, logits.shape[0], rows):
            b = min(a + rows, logits.shape[0])
            x = logits[a:b].float()
            if g_lse is not None:
                g = torch.exp(x - lse[a:b, None]).mul_(g_lse[a:b, None])
            else:
                g = torch.zeros_like(x, dtype=torch.float32)
            if g_sub is not None and subset is not None and subset.numel():
                w = torch.exp(x.index_select(1, subset) - sub[a:b, None]).mul_(g_sub[a:b, None])
                g.index_add_(1, subset, torch.nan_to_num(w, nan=0.0))
            if g_picked is not None:
                g.scatter_add_(1, index[a:b], g_picked[a:b, None])
            grad[a:b] = g
        return grad, None, None


def vocab_stats(
    logits: Tensor, targets: Tensor | None = None, subset_mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Float32 [B, T] each: (logsumexp over the vocabulary, logit of ``targets`` [B, T] (0 where
    a target is negative), logsumexp over the ids where ``subset_mask`` [V' <= V] is True (-inf
    without a mask)), in one blockwise pass over ``logits`` [B, T, V] of any float dtype.

    Differentiable w.r.t. ``logits``; memory beyond the inputs is one block of float32 rows
    (and, in the backward, the gradient in the logits' dtype), never a float32 or softmax copy
    of the whole logits tensor.
    """
    batch, length, vocab = logits.shape
    if targets is None:
        targets = torch.full((batch, length), -1, dtype=torch.long, device=logits.device)
    subset = None
    if subset_mask is not None:
        if subset_mask.shape[0] > vocab:
            raise ValueError(f"space_mask has {subset_mask.shape[0]} entries but the logits only {vocab}")
        subset = subset_mask.to(device=logits.device, dtype=torch.bool).nonzero().squeeze(-1)
    lse, picked, sub = _VocabStats.apply(logits.reshape(batch * length, vocab), targets.reshape(-1).long(), subset)
    shape = (batch, length)
    return lse.view(shape), picked.view(shape), sub.view(shape)


def token_logprobs(
    logits: Tensor, ids: Tensor, mask: Tensor | None = None, lse: Tensor | None = None
) -> Tensor:
    """Float32 [B, T]: out[:, t] = log p(ids[:, t] | ids[:, <t]) from logits[:, t-1].

    logits [B, T, V] (any float dtype; the log-softmax is taken in float32), ids [B, T] long.
    out[:, 0] = 0 (never scored); where `mask` [B, T] (the attention mask) makes a position
    unscored (`scored_positions`) the value is 0 too. `lse` [B, T]: `log_normalizer(logits)`
    if already computed.
    """
    if logits.shape[:2] != ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ids {tuple(ids.shape)} disagree on [B, T]")
    batch, length = ids.shape
    out = logits.new_zeros((batch, length), dtype=torch.float32)
    if length < 2:
        return out
    if lse is None:
        lse, picked, _ = vocab_stats(logits, next_token_targets(ids))
        picked = picked[:, :-1]
    else:
        picked = logits[:, :-1].gather(-1, ids[:, 1:, None].long()).squeeze(-1).float()
    return _shifted_logprobs(picked, lse, ids, mask)


def next_token_targets(ids: Tensor) -> Tensor:
    """Long [B, T]: the id each position predicts (``ids[:, t + 1]``; -1 at the last position)."""
    return torch.cat([ids[:, 1:].long(), ids.new_full((ids.shape[0], 1), -1, dtype=torch.long)], dim=1)


def _shifted_logprobs(picked: Tensor, lse: Tensor, ids: Tensor, mask: Tensor | None) -> Tensor:
    """Token log-probs [B, T] from the picked logits of positions 0..T-2 and the normalizers."""
    lp = picked - lse[:, :-1]
    out = torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)
    scored = scored_positions(mask) if mask is not None else _all_but_first(ids)
    return torch.where(scored, out, torch.zeros_like(out))


def _all_but_first(ids: Tensor) -> Tensor:
    scored = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    scored[:, 0] = False
    return scored


def chunk_logprobs(token_lp: Tensor, matrix: Tensor, scored: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(log P(chunk) [B, K], has_scored [B, K] bool) from token log-probs and a chunk matrix.

    token_lp [B, T] (from `token_logprobs`), matrix [B, T, K] 0/1 (tokens x chunks). log P is
    min(0, sum of the chunk's token log-probs); has_scored says whether the chunk holds at least
    one scored token (`scored` [B, T] bool, default: every position but 0).
    """
    matrix = matrix.to(token_lp.dtype)
    if scored is None:
        scored = torch.ones(token_lp.shape, dtype=torch.bool, device=token_lp.device)
        scored[:, 0] = False
    # -inf log-probs (a -inf logit) are floored so that 0 * lp stays 0 in the product.
    chunk_lp = torch.einsum("bt,btk->bk", _floor(token_lp), matrix).clamp(max=0.0)
    has_scored = torch.einsum("bt,btk->bk", scored.to(matrix.dtype), matrix) > 0
    return chunk_lp, has_scored


def space_prob(logits: Tensor, space_mask: Tensor, lse: Tensor | None = None) -> Tensor:
    """Float32 [B, T]: log p_sp, the log-probability that the token after position t opens a word.

    logits [B, T, V]; space_mask bool [V'] with V' <= V (from `tokens.space_token_mask`;
    missing trailing ids, e.g. an embedding padded past the vocabulary, count as False).
    `lse` [B, T]: `log_normalizer(logits)` if already computed. A mask with no True gives -inf.
    """
    own_lse, _, sub = vocab_stats(logits, subset_mask=space_mask)
    if not bool(space_mask.any()):
        return torch.full_like(own_lse, float("-inf"))
    return sub - (own_lse if lse is None else lse)


# --------------------------------------------------------------------------- distances


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends, with finite gradients (safe branches)."""
    cut = -math.log(2.0)
    near = x > cut
    x_near = torch.where(near, x, torch.full_like(x, cut))
    x_far = torch.where(near, torch.full_like(x, cut - 1.0), x)
    return torch.where(near, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def binarised_divergence(lp_teacher: Tensor, lp_student: Tensor, tau: float = 100.0) -> Tensor:
    """Elementwise binary cross-entropy between the tempered probabilities of two events.

    u = exp(lpT / tau - 1e-6), w = exp(lpS / tau - 1e-6);
    loss = -[u log w + (1 - u) log(1 - w)], all in log space (log(1 - w) = log1mexp(log w)).
    At lpS == lpT this is the binary entropy H(u) > 0 (its minimum over lpS, not zero) and its
    gradient w.r.t. lpS is 0. Inputs are clamped to at most 0 and -inf becomes -1e30, so
    values and gradients stay finite from log-probs of 0 down to -inf.
    """
    lt = _floor(lp_teacher.float()).clamp(max=0.0)
    ls = _floor(lp_student.float()).clamp(max=0.0)
    log_u = lt / tau - 1e-6
    log_w = ls / tau - 1e-6
    u = torch.exp(log_u)
    one_minus_u = -torch.expm1(log_u)
    return -(u * log_w + one_minus_u * log1mexp(log_w))


def binary_kl_divergence(lp_teacher: Tensor, lp_student: Tensor, tau: float = 100.0) -> Tensor:
    """Elementwise KL(Bern(u) || Bern(w)) = `binarised_divergence` - `binary_entropy` of the teacher.

    The same gradient w.r.t. lpS as the binarised divergence (the subtracted floor depends on the
    teacher only), but 0 where the two sides agree, so a logged ALM loss shows the remaining gap
    instead of the teacher's own uncertainty.
    """
    return binarised_divergence(lp_teacher, lp_student, tau) - binary_entropy(lp_teacher, tau)


def abs_divergence(lp_teacher: Tensor, lp_student: Tensor) -> Tensor:
    """Elementwise |lpT - lpS| (the design's alternative distance)."""
    return (_floor(lp_teacher.float()).clamp(max=0.0) - _floor(lp_student.float()).clamp(max=0.0)).abs()


def binary_entropy(lp: Tensor, tau: float = 100.0) -> Tensor:
    """H(u) for u = exp(lp / tau - 1e-6): the binarised divergence's value when both sides agree."""
    log_u = _floor(lp.float()).clamp(max=0.0) / tau - 1e-6
    return -(torch.exp(log_u) * log_u + (-torch.expm1(log_u)) * log1mexp(log_u))


# --------------------------------------------------------------------------- ALM


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


def _chunk_ends(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """(index of each chunk's last token [B, K] long, chunk has tokens [B, K] bool)."""
    length = matrix.shape[1]
    pos = torch.arange(1, length + 1, device=matrix.device, dtype=torch.float32)
    last = ((matrix.float() > 0) * pos[None, :, None]).amax(dim=1)
    return (last - 1).clamp(min=0).long(), last > 0


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
    debias="space": groups as in the module docstring; debias="none": every valid chunk is
    its own group, scored by its log-prob alone.
    """
    if debias not in DEBIAS_MODES:
        raise ValueError(f"debias must be one of {DEBIAS_MODES}, got {debias!r}")
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be in (0, 1), got {gamma}")
    if student_matrix.shape[-1] != teacher_matrix.shape[-1]:
        raise ValueError(
            f"student matrix has {student_matrix.shape[-1]} chunks, teacher matrix {teacher_matrix.shape[-1]}"
        )
    teacher_logits = teacher_logits.detach()
    s_mask = torch.ones_like(student_ids, dtype=torch.bool) if student_mask is None else student_mask.bool()
    t_mask = torch.ones_like(teacher_ids, dtype=torch.bool) if teacher_mask is None else teacher_mask.bool()
    s_scored, t_scored = scored_positions(s_mask), scored_positions(t_mask)
    # One blockwise pass per side gives the normalizers, the next-token logits and (debias
    # "space") the word-boundary logsumexp, without float32 copies of the logits.
    spaced = debias == "space"
    if spaced and (student_space_mask is None or teacher_space_mask is None):
        raise ValueError('debias="space" needs student_space_mask and teacher_space_mask')
    s_lse, s_pick, s_sub = vocab_stats(student_logits, next_token_targets(student_ids),
                                       student_space_mask if spaced else None)
    with torch.no_grad():
        t_lse, t_pick, t_sub = vocab_stats(teacher_logits, next_token_targets(teacher_ids),
                                           teacher_space_mask if spaced else None)
    s_tok = _shifted_logprobs(s_pick[:, :-1], s_lse, student_ids, s_mask)
    t_tok = _shifted_logprobs(t_pick[:, :-1], t_lse, teacher_ids, t_mask)
    s_lp, s_has = chunk_logprobs(s_tok, student_matrix, s_scored)
    t_lp, t_has = chunk_logprobs(t_tok, teacher_matrix, t_scored)
    s_end, s_exists = _chunk_ends(student_matrix)
    t_end, t_exists = _chunk_ends(teacher_matrix)
    exists = s_exists & t_exists
    ok = exists & s_has & t_has
    if chunk_mask is not None:
        ok = ok & chunk_mask.bool()
    batch, k = exists.shape
    if debias == "none":
        group = torch.where(exists, torch.arange(k, device=exists.device).expand(batch, k), -1)
        zero = torch.zeros_like(t_lp)
        return GroupScores(torch.where(ok, t_lp, zero), torch.where(ok, s_lp, zero), ok, group)
    t_sp = (t_sub - t_lse).gather(1, t_end)  # log p_sp; -inf if no token opens a word
    s_sp = (s_sub - s_lse).gather(1, s_end)
    marks = exists & (t_sp > math.log(gamma))  # the teacher decides where groups end
    marks_l = marks.long()
    before = marks_l.cumsum(dim=1) - marks_l  # group index = marks strictly before the chunk
    member = exists & (before < marks_l.sum(dim=1, keepdim=True))
    onehot = ((before.unsqueeze(-1) == torch.arange(k, device=marks.device)) & member.unsqueeze(-1)).float()
    zero = torch.zeros_like(t_lp)
    t_chunk = _floor(t_lp + torch.where(marks, t_sp, zero))
    s_chunk = _floor(s_lp + torch.where(marks, s_sp, zero))
    t_group = torch.einsum("bk,bkg->bg", t_chunk, onehot)
    s_group = torch.einsum("bk,bkg->bg", s_chunk, onehot)
    bad = torch.einsum("bk,bkg->bg", (member & ~ok).float(), onehot)
    valid = (onehot.sum(dim=1) > 0) & (bad == 0)
    group = torch.where(member, before, -1)
    zero_g = torch.zeros_like(t_group)
    return GroupScores(torch.where(valid, t_group, zero_g), torch.where(valid, s_group, zero_g), valid, group)


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


# --------------------------------------------------------------------------- other terms


def sft_loss(
    logits: Tensor, ids: Tensor, loss_mask: Tensor | None = None, attention_mask: Tensor | None = None
) -> Tensor:
    """Scalar next-token cross-entropy of the student on its own tokens (mean over scored tokens).

    logits [B, T, V], ids [B, T]; a token t >= 1 is scored when it and token t-1 are real
    (`attention_mask`, default all) and `loss_mask[:, t]` is set (default all; e.g. response
    tokens only). Returns 0 when nothing is scored.
    """
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    scored = scored_positions(mask)
    if loss_mask is not None:
        scored = scored & loss_mask.bool()
    lp = token_logprobs(logits, ids, mask)
    return -(torch.where(scored, lp, torch.zeros_like(lp))).sum() / scored.sum().clamp(min=1)


def latents_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    student_matrix: Tensor,
    teacher_matrix: Tensor,
    chunk_mask: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Scalar MSE between last hidden states at chunk ends, per channel over the teacher's mean square.

    student_hidden [B, Ts, D], teacher_hidden [B, Tt, D] (self-distillation: same D);
    matrices [B, Ts, K] / [B, Tt, K]; chunk_mask [B, K] bool optional. For the chunks present
    on both sides: mean over chunks and channels of (h_S - h_T)^2 / (mean over chunks of h_T^2
    per channel + eps). Teacher detached.
    """
    if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"latents need the same hidden size, got student {student_hidden.shape[-1]} and teacher "
            f"{teacher_hidden.shape[-1]}"
        )
    s_end, s_exists = _chunk_ends(student_matrix)
    t_end, t_exists = _chunk_ends(teacher_matrix)
    keep = s_exists & t_exists
    if chunk_mask is not None:
        keep = keep & chunk_mask.bool()
    dim = student_hidden.shape[-1]
    hs = student_hidden.float().gather(1, s_end.unsqueeze(-1).expand(-1, -1, dim))[keep]  # [N, D]
    ht = teacher_hidden.detach().float().gather(1, t_end.unsqueeze(-1).expand(-1, -1, dim))[keep]
    if hs.shape[0] == 0:
        return student_hidden.sum() * 0.0
    scale = ht.pow(2).mean(dim=0) + eps
    return ((hs - ht).pow(2) / scale).mean()


def balance_weights(
    losses: Mapping[str, Tensor], params: Sequence[Tensor], eps: float = 1e-12
) -> dict[str, float]:
    """1 / ||grad L_i|| over `params` (e.g. the last layer's trainable parameters), per term.

    tokenkit's "approx_gradmag" balance: multiplying term i by this weight gives it a gradient of
    norm 1 on `params`, so no term drowns the others whatever its scale. A term with no (or no
    finite) gradient there gets weight 0. Computed with `torch.autograd.grad(..., retain_graph=True)`,
    so the caller can still call `backward()` on the losses; each term costs one backward pass from
    the loss to `params`, which is why training can refresh these weights only every few steps.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("balance_params holds no parameter that requires grad")
    out: dict[str, float] = {}
    for name, loss in losses.items():
        norm = 0.0
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            norm = math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads if g is not None))
        out[name] = 1.0 / (norm + eps) if norm > 0 and math.isfinite(norm) else 0.0
    return out


def combine_losses(
    losses: Mapping[str, Tensor],
    weights: Mapping[str, float] | None = None,
    balance: Mapping[str, float] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """(total loss, the weight used per term): total = sum_i w_i b_i L_i.

    w_i are the fixed weights (missing ones are 1); b_i the balancing factors of
    `balance_weights` (missing ones, or no `balance` at all, are 1).
    """
    if not losses:
        raise ValueError("combine_losses needs at least one loss term")
    weights = dict(weights or {})
    unknown = (set(weights) | set(balance or {})) - set(losses)
    if unknown:
        raise ValueError(f"weights given for unknown loss terms: {sorted(unknown)}")
    used: dict[str, float] = {}
    total: Tensor | None = None
    for name, loss in losses.items():
        weight = float(weights.get(name, 1.0)) * float((balance or {}).get(name, 1.0))
        used[name] = weight
        term = loss * weight
        total = term if total is None else total + term
    assert total is not None
    return total, used
