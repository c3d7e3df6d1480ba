"""The loss of one micro-batch: the frozen teacher's forward (only when a term needs it) and the
configured terms (ALM, SFT, latents), each a mean over its own units (:mod:`transfer.train_units`
weighs them into the step's)."""

from __future__ import annotations

from typing import Any

import torch

from . import losses
from .config import RunConfig
from .train_setup import Models


def teacher_outputs(batch: dict[str, torch.Tensor], teacher: Any, cfg: RunConfig) -> Any:
    """The frozen teacher's forward on a micro-batch (hidden states too for ``latents``); None
    when no configured term needs the teacher."""
    terms = cfg.loss.terms
    if "alm" not in terms and "latents" not in terms:
        return None
    with torch.no_grad():
        return teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                       output_hidden_states="latents" in terms)


def compute_losses(batch: dict[str, torch.Tensor], student: Any, teacher: Any, models: Models,
                   cfg: RunConfig, t_out: Any = None) -> dict[str, torch.Tensor]:
    """The configured loss terms of one micro-batch, each a mean over its units (the teacher runs
    only when needed; ``t_out``: its outputs when already computed)."""
    terms = cfg.loss.terms
    hidden = "latents" in terms
    s_ids, s_mask = batch["student_input_ids"], batch["student_attention_mask"]
    t_ids, t_mask = batch["teacher_input_ids"], batch["teacher_attention_mask"]
    if t_out is None:
        t_out = teacher_outputs(batch, teacher, cfg)
    s_out = student(input_ids=s_ids, attention_mask=s_mask, output_hidden_states=hidden)
    out: dict[str, torch.Tensor] = {}
    for term in terms:
        if term == "alm":
            out["alm"] = losses.alm_loss(
                s_out.logits, t_out.logits, s_ids, t_ids, batch["student_chunks"], batch["teacher_chunks"],
                s_mask, t_mask, models.student_space, models.teacher_space, batch["chunk_mask"],
                gamma=cfg.loss.gamma, distance=cfg.loss.distance, tau=cfg.loss.tau,
            )
        elif term == "sft":
            out["sft"] = losses.sft_loss(s_out.logits, s_ids, attention_mask=s_mask)
        elif term == "latents":
            out["latents"] = losses.latents_loss(
                s_out.hidden_states[-1], t_out.hidden_states[-1], batch["student_chunks"],
                batch["teacher_chunks"], batch["chunk_mask"],
            )
    return out
