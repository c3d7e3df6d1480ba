"""The entropy gate of the geometric pool: member weights that follow the members' own
uncertainty token by token (`EntropyGate`, `member_entropies`, `gated_coefficients`).
`ensemble.pooling.pool_logprobs` applies it; ``ensemble fit`` fits it (`ensemble.fit_maths`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class EntropyGate:
    """Weights that follow the members' uncertainty token by token (``logprob_mean``).

    At a row where the members' entropies are ``H_j`` (`member_entropies`), member k pools with
    ``c_k = (w_k / T_k) * max(0, 1 + sum_j slopes[k][j] * (H_j - centre[j]))``: its manifest
    weight and temperature hold at the ``centre`` entropies (the dev text's means, as
    ``ensemble fit`` fits them) and the slopes move it from there: an unsure member usually counts
    for less, its partner for more; selective ensembling in the spirit of SAFE (arXiv
    2510.15346). The factor is relative, so a member of weight 0 stays out of every row.
    """

    centre: tuple[float, ...]
    slopes: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        k = len(self.centre)
        if len(self.slopes) != k or any(len(row) != k for row in self.slopes):
            raise ValueError(f"an entropy gate needs K centres and K x K slopes (member x member), "
                             f"got {k} centres and {[len(r) for r in self.slopes]} slopes")
        for v in (*self.centre, *(v for row in self.slopes for v in row)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"entropy gate entries must be finite numbers, got {v!r}")
        object.__setattr__(self, "centre", tuple(float(v) for v in self.centre))
        object.__setattr__(self, "slopes", tuple(tuple(float(v) for v in row) for row in self.slopes))

    @property
    def is_off(self) -> bool:
        """All slopes zero: the plain pool."""
        return not any(v for row in self.slopes for v in row)

    def tensors(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """``(centre [K], slopes [K, K])`` float32."""
        return (torch.tensor(self.centre, dtype=torch.float32, device=device),
                torch.tensor(self.slopes, dtype=torch.float32, device=device))


def member_entropies(member_logits: Sequence[Tensor]) -> Tensor:
    """``[N, K]`` float32: the entropy (nats) of each member's own distribution ``softmax(x_k)``
    (temperature 1) on each row; ids a member masks (``-inf``) take no part."""
    out = []
    for x in member_logits:
        x = x.to(torch.float32)
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        p = (x - lse).exp()
        out.append(lse[:, 0] - torch.where(p > 0, p * x, 0.0).sum(dim=-1))
    return torch.stack(out, dim=1)


def gated_coefficients(base: Tensor, gate: EntropyGate, entropies: Tensor) -> Tensor:
    """Per-row geometric-pool coefficients of `EntropyGate`, floored at 0; a row the gate would
    zero entirely keeps `base`.

    `base` (``[K]`` or ``[R, K]``) holds each member's ``w_k / T_k``, the coefficient of its logits
    in the geometric pool (`_geometric_pool`); `entropies` ``[R, K]`` (`member_entropies`).
    """
    centre, slopes = gate.tensors(entropies.device)
    c = (base * (1.0 + (entropies - centre) @ slopes.t())).clamp_min(0.0)
    dead = c.sum(dim=-1, keepdim=True) <= 0
    return torch.where(dead, base.expand_as(c), c)
