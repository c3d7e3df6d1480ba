"""Log-probabilities from logits, for the loss terms of `transfer.losses`.

Blockwise vocabulary statistics (`vocab_stats`: logsumexp, a target's logit and a subset's
logsumexp per position, with its own autograd function so that no float32 or softmax copy of the
logits is ever kept), per-token log-probs, chunk log-probs from a chunk matrix, the position of
each chunk's last token, and the word-boundary probability p_sp. Shapes as in `transfer.losses`:
B batch, T positions, V vocabulary, K chunks. Log-probabilities are float32 whatever the logits'
dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

_LOG_FLOOR = -1e30  # -inf log-probs become this, so that 0 * log(0) stays 0, not NaN


def _floor(x: Tensor) -> Tensor:
    """x with -inf replaced by -1e30; finite entries (and their gradients) are unchanged."""
    return torch.where(torch.isneginf(x), torch.full_like(x, _LOG_FLOOR), x)


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


def _chunk_ends(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """(index of each chunk's last token [B, K] long, chunk has tokens [B, K] bool)."""
    length = matrix.shape[1]
    pos = torch.arange(1, length + 1, device=matrix.device, dtype=torch.float32)
    last = ((matrix.float() > 0) * pos[None, :, None]).amax(dim=1)
    return (last - 1).clamp(min=0).long(), last > 0
