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
   with its own p_sp. The chunks after the last marked one form the row's last group, closed by
   the p_sp at the row's last chunk (as tokenkit does). A group is valid when all its chunks are
   valid (and inside `chunk_mask`, if given);
4. distance per valid group (binarised divergence at temperature tau, by default minus its
   floor, the teacher's binary entropy, which leaves the gradient unchanged and makes a perfect
   match score 0; or |lpT - lpS|), averaged over all valid groups of the batch.

Modules: `transfer.losses_logprobs` (blockwise vocabulary statistics, token and chunk log-probs,
p_sp), `transfer.losses_distances` (the elementwise distances), `transfer.losses_alm` (steps 3
and 4: groups and their distance) and this one (SFT, latents, gradient balancing and the weighted
sum of the terms). Every public name of those modules is importable from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

# Re-exported: callers and tests use these as `transfer.losses.<name>`. STATS_BLOCK is read where
# `vocab_stats` lives: set `transfer.losses_logprobs.STATS_BLOCK` to change the block size.
from .losses_alm import (  # noqa: F401
    DEBIAS_MODES,
    DISTANCES,
    GroupScores,
    alm_group_scores,
    alm_loss,
    group_distance,
)
from .losses_distances import (  # noqa: F401
    abs_divergence,
    binarised_divergence,
    binary_entropy,
    binary_kl_divergence,
    log1mexp,
)
from .losses_logprobs import (  # noqa: F401
    _LOG_FLOOR,
    STATS_BLOCK,
    STATS_BLOCK_ACCELERATOR,
    _chunk_ends,
    _floor,
    chunk_logprobs,
    log_normalizer,
    next_token_targets,
    scored_positions,
    space_prob,
    token_logprobs,
    vocab_stats,
)


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
    losses: Mapping[str, Tensor],
    params: Sequence[Tensor],
    reduce: Callable[[Tensor], Tensor] | None = None,
    previous: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """1 / ||grad L_i|| over `params` (e.g. the last layer's trainable parameters), per term.

    tokenkit's "approx_gradmag" balance: multiplying term i by this weight gives it a gradient of
    norm 1 on `params`, so no term drowns the others whatever its scale. Computed with
    `torch.autograd.grad(..., retain_graph=True)`, so the caller can still call `backward()` on
    the losses; each term costs one backward pass from the loss to `params`, which is why
    training can refresh these weights only every few steps (`loss.balance_every`).

    `reduce` averages a 1-D tensor over the processes of a distributed run (e.g.
    ``lambda t: accelerator.reduce(t, "mean")``): the squared norms are averaged before they are
    inverted, so every process gets the same factors. A term whose gradient there is zero or not
    finite keeps its `previous` factor (0 when there is none).
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("balance_weights needs at least one parameter that requires grad")
    squares = []
    for loss in losses.values():
        square = 0.0
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            square = sum(float(g.float().pow(2).sum()) for g in grads if g is not None)
        squares.append(square)
    if reduce is not None:
        squares = reduce(torch.tensor(squares, dtype=torch.float32, device=params[0].device)).tolist()
    out: dict[str, float] = {}
    for name, square in zip(losses, squares):
        norm = math.sqrt(square) if square >= 0 else math.nan
        fallback = float((previous or {}).get(name, 0.0))
        out[name] = 1.0 / norm if norm > 0 and math.isfinite(norm) else fallback
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
