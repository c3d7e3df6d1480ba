"""Elementwise distances between teacher and student log-probabilities of the same events.

The binarised divergence (binary cross-entropy between tempered probabilities), its KL form
(minus the teacher's binary entropy: 0 at a match, same gradient) and the absolute difference;
all finite in value and gradient for log-probs from 0 down to -inf. Used by `transfer.losses_alm`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .losses_logprobs import _floor


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
