"""Normalising accumulated micro-batches like one big batch.

Each loss term is a mean over its own units: ALM over the valid groups, SFT over the scored
tokens, latents over the chunks present on both sides. A step split into micro-batches (and over
processes) must average over all the step's units, not average the micro-batches' means: the
term of micro-batch j is weighted by ``processes * n_j / N``, n_j its units and N the step's units
over every micro-batch of every process (DDP then averages the processes' gradients). With one
micro-batch on one process every weight is 1.

The counts need no student forward: ALM's valid groups depend on the teacher's word-boundary
probabilities and on both sides' masks and chunks, not on the student's logits.

ALM and SFT then equal one big batch's exactly (up to float rounding; tested). The latents term
is weighted by its chunks the same way, but it divides by the teacher's per-channel mean square
over the chunks of its own micro-batch (``losses.latents_loss``), a statistic no weighting can
make step-wide: with accumulation it does not equal one big batch's (that needs a step-wide
scale passed to ``latents_loss``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import losses
from .config import RunConfig


def _has_tokens(matrix: torch.Tensor) -> torch.Tensor:
    """Bool [B, K]: chunk k holds at least one token of the [B, T, K] chunk matrix."""
    return (matrix > 0).any(dim=1)


def alm_groups(batch: dict[str, torch.Tensor], teacher_logits: torch.Tensor, teacher_space: torch.Tensor,
               gamma: float) -> int:
    """Valid ALM groups of a micro-batch, as ``losses.alm_loss`` averages over them. The student's
    logits only enter the groups' scores, so a one-entry stand-in takes their place."""
    s_ids = batch["student_input_ids"]
    stand_in = teacher_logits.new_zeros((*s_ids.shape, 1))
    scores = losses.alm_group_scores(
        stand_in, teacher_logits, torch.zeros_like(s_ids), batch["teacher_input_ids"], batch["student_chunks"],
        batch["teacher_chunks"], batch["student_attention_mask"], batch["teacher_attention_mask"],
        torch.ones(1, dtype=torch.bool, device=s_ids.device), teacher_space, batch["chunk_mask"], gamma=gamma,
    )
    return int(scores.valid.sum())


def unit_counts(batch: dict[str, torch.Tensor], teacher_logits: Optional[torch.Tensor], teacher_space: torch.Tensor,
                cfg: RunConfig) -> dict[str, float]:
    """{term: units its mean runs over in this micro-batch} for the configured terms
    (``teacher_logits`` is needed when ALM is one of them)."""
    out: dict[str, float] = {}
    for term in cfg.loss.terms:
        if term == "alm":
            if teacher_logits is None:
                raise ValueError("counting ALM groups needs the teacher's logits")
            out[term] = float(alm_groups(batch, teacher_logits, teacher_space, cfg.loss.gamma))
        elif term == "sft":
            out[term] = float(losses.scored_positions(batch["student_attention_mask"]).sum())
        elif term == "latents":
            both = _has_tokens(batch["student_chunks"]) & _has_tokens(batch["teacher_chunks"])
            out[term] = float((both & batch["chunk_mask"].bool()).sum())
    return out


def micro_weights(counts: list[dict[str, float]], processes: int,
                  sum_over_processes: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                  device: Optional[torch.device] = None) -> list[dict[str, float]]:
    """Per micro-batch {term: weight of its mean}: ``processes * n_j / N`` (0 where the step has no
    unit of that term). ``sum_over_processes`` sums a tensor over the processes (None: one)."""
    terms = list(counts[0])
    local = torch.tensor([sum(c[t] for c in counts) for t in terms], dtype=torch.float64, device=device)
    totals = sum_over_processes(local) if sum_over_processes is not None else local
    total = dict(zip(terms, totals.tolist()))
    return [{t: processes * c[t] / total[t] if total[t] > 0 else 0.0 for t in terms} for c in counts]
