"""Pooling the next-token distributions of K ensemble members into one distribution.

Pure functions over tensors; both engines (the PyTorch reference and the vLLM model) call
`pool_logprobs`, so they pool bit-for-bit alike.

Two rules, each over member log-probabilities `l_k = log_softmax(x_k / T_k)` and weights `w_k`
normalised to sum to 1:

* ``prob_mean`` (linear pool): ``log sum_k w_k exp(l_k)``. Weights must be >= 0.
* ``logprob_mean`` (geometric pool): ``log_softmax(sum_k w_k l_k)``. Weights may be negative
  (contrastive decoding, e.g. ``(1.5, -0.5)``) as long as they sum to a positive number.

Weights are *relative*: both rules divide them by their sum, which must be positive.

A member *abstains* on a token it cannot score (log-prob ``-inf``: an id its tokenizer lacks,
such as another tokenizer version's end-of-turn token, masked by the engines). The token is
pooled over the members that can score it, their weights renormalised to sum to 1, and the row is
renormalised; a token no weighted member can score (a padding row) stays ``-inf``. Without this,
the geometric pool would make such a token unreachable: EOS could never be sampled.

Contrastive pooling (a negative weight, ``logprob_mean`` only) keeps the *adaptive plausibility
constraint* of contrastive decoding (Li et al. 2023, arXiv 2210.15097): only tokens whose
probability under the positive members' own pool is at least ``alpha`` times the largest one
may win; the rest get ``-inf``, so a token the positive members find implausible cannot win
because a negative member dislikes it even more. ``alpha=0`` turns the constraint off.

All arithmetic is float32, whatever the members' dtype. The work is chunked over rows (tokens) so
the float32 ``K x rows x V`` buffer stays bounded; a row is never split, since ``log_softmax``
needs the whole vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
import torch
from torch import Tensor

from ensemble.pooling_gate import EntropyGate, gated_coefficients, member_entropies
from ensemble.protocol import POOLING_RULES, PoolingRule

__all__ = ["DEFAULT_ALPHA", "POOLING_RULES", "EntropyGate", "PoolingRule", "Scratch", "check_alpha", "check_rule",
           "fit_vocab", "gated_coefficients", "mask_padded_vocab", "member_entropies", "member_logprobs",
           "normalise_weights", "pool_logprobs"]

# Contrastive decoding's plausibility threshold (Li et al. 2023 use 0.1).
DEFAULT_ALPHA = 0.1


def check_alpha(alpha: float) -> float:
    """`alpha` as a float; ValueError unless it is in [0, 1)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) < 1.0:
        raise ValueError(f"the contrastive plausibility alpha must be a number in [0, 1), got {alpha!r}")
    return float(alpha)


def check_rule(rule: str) -> None:
    """Raise ValueError unless `rule` is a known pooling rule."""
    if rule not in POOLING_RULES:
        raise ValueError(f"unknown pooling rule {rule!r}; expected one of {', '.join(POOLING_RULES)}")


def normalise_weights(
    weights: Sequence[float] | Tensor, num_members: int, rule: str, num_rows: int | None = None
) -> Tensor:
    """Validate member weights and return them float32, divided by their sum.

    `weights` is a sequence or 1-D tensor of K weights, or a 2-D tensor ``[N, K]`` of per-row
    weights (one set per token, e.g. per request in a batch). Raises ValueError with a clear
    message on a wrong length, a non-finite weight, a negative weight under ``prob_mean``, or a
    sum that is not positive. Returns a ``[K]`` or ``[N, K]`` float32 tensor on the CPU unless the
    input was already a tensor (then on its device).
    """
    check_rule(rule)
    w = weights.detach().to(torch.float32) if isinstance(weights, Tensor) else torch.tensor(
        [float(x) for x in weights], dtype=torch.float32
    )
    if w.dim() not in (1, 2) or w.shape[-1] != num_members:
        raise ValueError(
            f"weights must have shape [{num_members}] or [N, {num_members}] (one per member), "
            f"got {list(w.shape)}"
        )
    if w.dim() == 2 and num_rows is not None and w.shape[0] != num_rows:
        raise ValueError(f"per-row weights have {w.shape[0]} rows but the logits have {num_rows}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"weights must be finite numbers, got {w.tolist()}")
    if rule == "prob_mean" and bool((w < 0).any()):
        raise ValueError(
            "negative weights are only allowed with pooling 'logprob_mean' (contrastive decoding), "
            f"got {w.tolist()} with 'prob_mean'"
        )
    total = w.sum(dim=-1, keepdim=True)
    if not bool((total > 0).all()):
        raise ValueError(f"weights must sum to a positive number, got {w.tolist()}")
    return w / total


def _check_temperatures(temperatures: Sequence[float] | None, num_members: int) -> list[float]:
    if temperatures is None:
        return [1.0] * num_members
    temps = [float(t) for t in temperatures]
    if len(temps) != num_members:
        raise ValueError(f"got {len(temps)} member temperatures for {num_members} members")
    for t in temps:
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"member temperatures must be finite and > 0, got {temps}")
    return temps


def member_logprobs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """float32 ``log_softmax(logits / temperature)`` over the last dimension."""
    x = logits.to(torch.float32)
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1)


def _pool_rows(logprobs: Tensor, w: Tensor, rule: str, alpha: float = DEFAULT_ALPHA) -> Tensor:
    """Pool stacked member log-probs ``[K, R, V]`` with weights ``[K]`` or ``[R, K]``."""
    # Weights broadcast to [K, R, 1].
    wk = w[:, None, None] if w.dim() == 1 else w.t()[:, :, None]
    active = wk != 0
    holes = ~torch.isfinite(logprobs) & active  # [K, R, V]: a weighted member cannot score the token
    abstains = bool(holes.any())  # rare (masked ids): otherwise nothing below looks at `holes`
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    if abstains:
        voters = active & ~holes
        # Tokens some weighted member abstains on while another scores them; every other token is
        # pooled exactly as if no member could abstain.
        split = voters.any(dim=0) & holes.any(dim=0)
        share = torch.where(voters, wk, zero).sum(dim=0)  # the weight of the members scoring each token
    if rule == "prob_mean":
        # log(0) = -inf makes a zero-weight member vanish from the logsumexp.
        pooled = torch.logsumexp(logprobs + torch.log(wk), dim=0)
        if not abstains or not bool(split.any()):
            return pooled
        # Divide each split token by the weight of the members that score it, renormalise its row.
        pooled = torch.where(split, pooled - torch.log(share), pooled)
        rows = split.any(dim=-1)
        return torch.where(rows[:, None], torch.log_softmax(pooled, dim=-1), pooled)
    # Geometric pool: members that do not vote contribute nothing (avoids 0 * -inf = nan).
    if not abstains:
        scores = torch.where(active, wk * logprobs, zero).sum(dim=0)
    else:
        scores = torch.where(voters, wk * logprobs, zero).sum(dim=0)
        # Split tokens: the weighted mean over the members that score them; none with positive
        # weight (only a contrastive member scores it): ruled out.
        scores = torch.where(split, torch.where(share > 0, scores / share.clamp_min(1e-30), -math.inf), scores)
        scores = scores.masked_fill(~voters.any(dim=0), float("-inf"))
    negative = (wk < 0).any(dim=0)[:, 0]  # [R]: contrastive rows
    if alpha > 0 and bool(negative.any()):
        scores = torch.where(negative[:, None], _plausible(scores, logprobs, wk, holes, alpha), scores)
    return torch.log_softmax(scores, dim=-1)


def _plausible(scores: Tensor, logprobs: Tensor, wk: Tensor, holes: Tensor, alpha: float) -> Tensor:
    """`scores` ``[R, V]`` with ``-inf`` wherever the positive members' geometric pool gives a
    token less than `alpha` times its most likely token's probability (`holes`: where a weighted
    member cannot score a token)."""
    positive = wk.clamp_min(0)
    voters = (positive > 0) & ~holes
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    share = torch.where(voters, positive, zero).sum(dim=0)
    pos = torch.where(voters, positive * logprobs, zero).sum(dim=0) / share.clamp_min(1e-30)
    pos = pos.masked_fill(share <= 0, float("-inf"))
    implausible = pos < pos.max(dim=-1, keepdim=True).values + math.log(alpha)
    return scores.masked_fill(implausible, float("-inf"))


def pool_logprobs(
    member_logits: Sequence[Tensor],
    weights: Sequence[float] | Tensor,
    rule: PoolingRule = "prob_mean",
    temperatures: Sequence[float] | None = None,
    chunk_size: int = 8192,
    alpha: float = DEFAULT_ALPHA,
    gate: EntropyGate | None = None,
    scratch: Scratch | None = None,
) -> Tensor:
    """Pool K members' next-token logits into one float32 log-probability tensor.

    Args:
        member_logits: K tensors of shape ``[N, V]`` (any float dtype, same device), one per
            member, over the shared vocabulary.
        weights: K relative member weights, or a ``[N, K]`` tensor of per-row weights. They are
            divided by their (positive) sum; negative ones only under ``logprob_mean``.
        rule: ``"prob_mean"`` (linear pool) or ``"logprob_mean"`` (geometric pool).
        temperatures: per-member temperatures ``T_k > 0`` applied before each member's softmax
            (default all 1).
        chunk_size: the most rows pooled at once; bounds the ``K x rows x V`` float32 buffer.
        alpha: the plausibility threshold of rows with a negative weight (see the module
            docstring); 0 turns it off.
        gate: an `EntropyGate` for the geometric pool, applied when the rule is
            ``logprob_mean`` to the rows whose weights are all non-negative (ignored for
            ``prob_mean`` and for contrastive rows; with per-row weights each row is gated or not
            on its own weights, whatever the other rows hold).
        scratch: a `Scratch` the geometric pool sums the members' logits and writes its result
            into (its caller's, reused call after call) instead of fresh ``[N, V]`` tensors; the
            result is then valid until the next call with this scratch.

    Returns:
        ``[N, V]`` float32 normalised log-probabilities on the members' device.
    """
    check_rule(rule)
    first = _check_logits(member_logits)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    k = len(member_logits)
    w = normalise_weights(weights, k, rule, num_rows=first.shape[0]).to(first.device)
    temps = _check_temperatures(temperatures, k)
    alpha = check_alpha(alpha)
    if gate is not None and not gate.is_off and rule == "logprob_mean":
        pooled = _pool_gated(member_logits, w, temps, chunk_size, alpha, gate, scratch)
        if pooled is not None:
            return pooled
    return _pool_chunks(member_logits, w, rule, temps, chunk_size, alpha, scratch)


def _check_logits(member_logits: Sequence[Tensor]) -> Tensor:
    """The first member's logits, once all K are ``[N, V]`` floating-point tensors of one shape;
    ValueError otherwise."""
    if len(member_logits) == 0:
        raise ValueError("pool_logprobs needs at least one member's logits")
    first = member_logits[0]
    if first.dim() != 2:
        raise ValueError(f"member logits must be 2-D [N, V], got shape {list(first.shape)}")
    for i, x in enumerate(member_logits):
        if x.shape != first.shape:
            raise ValueError(
                f"member {i} logits have shape {list(x.shape)} but member 0 has {list(first.shape)}; "
                "fit every member to the shared vocabulary first (see fit_vocab)"
            )
        if not x.is_floating_point():
            raise ValueError(f"member {i} logits must be floating point, got {x.dtype}")
    return first


def _pool_gated(member_logits: Sequence[Tensor], w: Tensor, temps: list[float], chunk_size: int, alpha: float,
                gate: EntropyGate, scratch: Scratch | None) -> Tensor | None:
    """The geometric pool under an entropy gate that is on: every row gated (`_gated_pool`) when no
    weight is negative; with per-row weights, gated rows and contrastive rows pooled apart; None
    when no row can be gated (all contrastive: the plain pool)."""
    k = len(member_logits)
    if len(gate.centre) != k:
        raise ValueError(f"the entropy gate is for {len(gate.centre)} members, the logits come from {k}")
    gated = (w >= 0).all(dim=-1)  # [] or [N]: rows without a contrastive (negative) weight
    if bool(gated.all()):
        return _gated_pool(member_logits, w, temps, gate, chunk_size, scratch)
    if w.dim() != 2 or not bool(gated.any()):
        return None
    # Per-row weights, some contrastive: the gate applies row by row, as if pooled alone.
    first = member_logits[0]
    out = torch.empty(first.shape, dtype=torch.float32, device=first.device)
    for rows, row_gate in ((gated.nonzero()[:, 0], gate), ((~gated).nonzero()[:, 0], None)):
        out[rows] = pool_logprobs([x[rows] for x in member_logits], w[rows], "logprob_mean", temps, chunk_size,
                                  alpha, row_gate, scratch)
    return out


def _pool_chunks(member_logits: Sequence[Tensor], w: Tensor, rule: str, temps: list[float], chunk_size: int,
                 alpha: float, scratch: Scratch | None) -> Tensor:
    """The pool without a gate, `chunk_size` rows at a time: the fast geometric pool
    (`_geometric_pool`) where it applies, else `_pool_rows` over the members' log-probs."""
    first = member_logits[0]
    n, v = first.shape
    geometric = rule == "logprob_mean" and w.dim() == 1 and bool((w >= 0).all())
    coefficients = _coefficients(w, temps) if geometric else None
    if geometric and n <= chunk_size:
        pooled = _geometric_pool(member_logits, coefficients, scratch)
        if pooled is not None:
            return pooled
        geometric = False  # the one chunk has abstentions: the general path below, without re-checking
    out = torch.empty((n, v), dtype=torch.float32, device=first.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        pooled = _geometric_pool([x[start:stop] for x in member_logits], coefficients, scratch) if geometric else None
        if pooled is not None:
            out[start:stop] = pooled
            continue
        stacked = torch.stack(
            [member_logprobs(x[start:stop], t) for x, t in zip(member_logits, temps)], dim=0
        )
        wr = w if w.dim() == 1 else w[start:stop]
        out[start:stop] = _pool_rows(stacked, wr, rule, alpha)
    return out


def geometric_logits(member_logits: Sequence[Tensor], weights: Sequence[float], temperatures: Sequence[float] | None = None,
                     scratch: Scratch | None = None) -> Tensor:
    """The geometric pool's logits: ``sum_k (w_k / T_k) x_k`` ``[N, V]`` float32, unnormalised.

    Its ``log_softmax`` is ``pool_logprobs(member_logits, weights, "logprob_mean", temperatures)``
    on rows where no weighted member abstains (has a non-finite logit), without the final
    normalisation pass (see `_geometric_pool`). For a consumer that normalises itself, such as
    vLLM's sampler; with `scratch` the result is its ``"sum"`` buffer, valid until its next use.
    Weights are relative and must be non-negative.
    """
    first = _check_logits(member_logits)
    c = torch.tensor(geometric_coefficients(weights, temperatures, len(member_logits)), device=first.device)
    return _weighted_sum(member_logits, c, scratch)


def geometric_coefficients(weights: Sequence[float], temperatures: Sequence[float] | None = None,
                           num_members: int | None = None) -> list[float]:
    """The geometric pool's coefficients ``w_k / T_k`` (weights normalised to sum 1), checked:
    weights must be non-negative (`geometric_logits`' scores are a plain weighted sum)."""
    k = len(weights) if num_members is None else num_members
    w = normalise_weights(weights, k, "logprob_mean")
    if bool((w < 0).any()):
        raise ValueError(f"geometric_logits takes non-negative weights, got {list(weights)}; contrastive "
                         "(negative) weights need pool_logprobs and its plausibility mask")
    return _coefficients(w, _check_temperatures(temperatures, k)).tolist()


def _coefficients(w: Tensor, temps: Sequence[float]) -> Tensor:
    """The geometric pool's per-member coefficients ``w_k / T_k``."""
    return w / torch.tensor(temps, dtype=torch.float32, device=w.device)


def _weighted_sum(member_logits: Sequence[Tensor], c: Tensor, scratch: Scratch | None) -> Tensor:
    """``sum_k c_k x_k`` over the members with a non-zero ``c_k`` (``[K]``, or ``[R, K]`` per row),
    into `scratch`'s ``"sum"`` buffer when given."""
    per_row = c.dim() == 2
    weighted = (c != 0).any(dim=0) if per_row else c != 0
    terms = [(x, c[:, k:k + 1] if per_row else float(c[k])) for k, x in enumerate(member_logits) if weighted[k]]
    (x0, c0), *rest = terms
    out = None if scratch is None else scratch.take(x0.shape, x0.device)
    scores = torch.mul(x0.to(torch.float32), c0, out=out)
    for x, ck in rest:
        if per_row:
            scores.addcmul_(x.to(torch.float32), ck)
        else:
            scores.add_(x.to(torch.float32), alpha=ck)
    return scores


def _geometric_pool(member_logits: Sequence[Tensor], c: Tensor, scratch: Scratch | None = None) -> Tensor | None:
    """``log_softmax(sum_k c_k x_k)``: the geometric pool of rows no weighted member abstains on,
    with ``c`` the members' ``w_k / T_k`` (``[K]``, or ``[R, K]`` per row); None when some weighted
    member has a non-finite logit in them (then `_pool_rows` handles the abstentions).

    With non-negative weights, sum_k w_k log_softmax(x_k / T_k) differs from
    sum_k (w_k / T_k) x_k by a constant per row (the members' log-normalisers), which the final
    log_softmax removes: one multiply-add per member and one softmax instead of K softmaxes, a
    stacked copy and `_pool_rows`' masks. At a 262k vocabulary and 64 rows on one CPU core that
    halved the pooling time (bench/RESULTS.md). Abstentions are found with one sum over the
    weighted sum: it is finite exactly when every weighted member's logits are (a weight is
    positive, ``-inf`` stays ``-inf``, ``-inf`` beside ``+inf`` or times 0 is NaN, and logits are far
    from float32's range), one pass over the rows instead of one per member.
    """
    scores = _weighted_sum(member_logits, c, scratch)
    if not bool(torch.isfinite(scores.sum())):
        return None
    pooled = None if scratch is None else scratch.take(scores.shape, scores.device, "pooled")
    return torch.log_softmax(scores, dim=-1, out=pooled)


class Scratch:
    """Float32 work buffers that one caller reuses across `pool_logprobs` calls (one thread).

    On a CPU a fresh ``[rows, V]`` float32 tensor per decoding step is a fresh mapping of pages
    (tens of MB at a 262k vocabulary), and faulting them in cost more than the arithmetic: the
    geometric pool of 2 members took 1.09 / 13.2 / 58.6 ms for 1 / 16 / 64 rows with fresh
    tensors and 0.30 / 3.7 / 35.6 ms summing into a reused one (2 cores, bench/RESULTS.md). The
    geometric pool sums into the ``"sum"`` buffer and writes its result into the ``"pooled"`` one,
    so what `pool_logprobs` returns with a scratch is valid until its next call with that scratch
    (the vLLM model's logits are consumed within the step that made them). A buffer never grows
    past `limit` elements: a larger request (prompt log-probs score thousands of rows) gets a fresh
    tensor, so one such call does not keep gigabytes for the rest of the process.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self._flat: dict[str, Tensor] = {}

    def take(self, shape: tuple[int, ...] | torch.Size, device: torch.device | str, name: str = "sum") -> Tensor:
        """A float32 view of `shape` on `device` of the buffer `name` (contents undefined),
        grown when needed; a fresh tensor when `shape` has more than `limit` elements."""
        n = math.prod(shape)
        if self.limit is not None and n > self.limit:
            return torch.empty(tuple(shape), dtype=torch.float32, device=device)
        flat = self._flat.get(name)
        if flat is None or flat.numel() < n or flat.device != torch.device(device):
            flat = self._flat[name] = torch.empty(n, dtype=torch.float32, device=device)
        return flat[:n].view(tuple(shape))


def _gated_pool(member_logits: Sequence[Tensor], w: Tensor, temps: Sequence[float], gate: EntropyGate,
                chunk_size: int, scratch: Scratch | None = None) -> Tensor:
    """The entropy-gated geometric pool, chunk by chunk (`gated_coefficients`)."""
    first = member_logits[0]
    n, v = first.shape
    inv_t = torch.tensor([1.0 / t for t in temps], dtype=torch.float32, device=first.device)
    out = torch.empty((n, v), dtype=torch.float32, device=first.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        xs = [x[start:stop] for x in member_logits]
        base = (w if w.dim() == 1 else w[start:stop]) * inv_t
        c = gated_coefficients(base, gate, member_entropies(xs))
        pooled = _geometric_pool(xs, c, scratch)
        if pooled is None:  # abstentions: the general path, with weights c_k T_k on log_softmax(x_k / T_k)
            stacked = torch.stack([member_logprobs(x, t) for x, t in zip(xs, temps)], dim=0)
            pooled = _pool_rows(stacked, c / inv_t, "logprob_mean")
        out[start:stop] = pooled
    return out


def mask_padded_vocab(logits: Tensor, true_vocab: int) -> Tensor:
    """Return a copy of ``logits [..., V]`` whose columns at ids >= `true_vocab` are ``-inf``.

    Members often pad their embedding/head rows (e.g. to a multiple of 64); those rows are not
    tokens of the shared vocabulary and must never be sampled.
    """
    if true_vocab < 1:
        raise ValueError(f"true_vocab must be >= 1, got {true_vocab}")
    if true_vocab >= logits.shape[-1]:
        return logits.clone()
    out = logits.clone()
    out[..., true_vocab:] = float("-inf")
    return out


def fit_vocab(logits: Tensor, vocab_size: int) -> Tensor:
    """Make a member's logits ``[..., V_m]`` exactly `vocab_size` wide.

    Extra columns (padding rows of the member's head) are dropped; missing columns (a member
    whose head is smaller than the shared vocabulary) are filled with ``-inf`` so the member
    gives those tokens no probability.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    width = logits.shape[-1]
    if width == vocab_size:
        return logits
    if width > vocab_size:
        return logits[..., :vocab_size]
    pad = logits.new_full((*logits.shape[:-1], vocab_size - width), float("-inf"))
    return torch.cat([logits, pad], dim=-1)
