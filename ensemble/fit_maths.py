"""The maths of `ensemble fit`: pooled dev bits per byte, and the best weights and temperatures
for each pooling rule.

Pure functions of the members' dev logits (``[K, R, V]`` float16 per window, as
`ensemble.fit.score_windows` keeps them) and targets: ``prob_mean`` weights by EM for each grid
temperature (`fit_prob_mean`), ``logprob_mean`` by Newton's method on the K products weight /
temperature (`fit_logprob_mean`, a convex problem), `fit_rule` choosing between them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ensemble.pooling import EntropyGate, check_rule

# Masked vocabulary entries are -inf; a finite floor keeps the gradients finite and still gives
# them zero probability after the softmax (exp(-1e4) underflows to 0 in float32).
_FLOOR = -1e4


@dataclass(frozen=True)
class RuleFit:
    """The best weights and temperatures found for one rule, and their dev bits per byte."""

    rule: str
    weights: tuple[float, ...]
    temperatures: tuple[float, ...]
    bits_per_byte: float
    entropy_gate: EntropyGate | None = None  # logprob_mean only (`fit_entropy_gate`)





def pooled_target_logprobs(
    logits: Tensor, targets: Tensor, weights: Tensor, temperatures: Tensor, rule: str
) -> Tensor:
    """Pooled log-probability of each row's target token, differentiable in weights and temperatures.

    Args:
        logits: ``[K, R, V]`` member logits over the shared vocabulary (-inf where masked).
        targets: ``[R]`` token ids.
        weights: ``[K]`` member weights, positive and summing to one.
        temperatures: ``[K]`` member temperatures, positive.
        rule: ``prob_mean`` (linear pool) or ``logprob_mean`` (geometric pool, renormalised).

    Returns:
        ``[R]`` float32 log-probabilities; the same numbers as
        ``pool_logprobs(...).gather(1, targets)`` of `ensemble.pooling`, up to the masked floor
        and to the ids some members lack: the engines pool those over the members that have
        them, the fit gives them nothing (a special token's mass in text: negligible).
    """
    check_rule(rule)
    x = logits.to(torch.float32).clamp_min(_FLOOR)
    lp = torch.log_softmax(x / temperatures[:, None, None], dim=-1)
    if rule == "prob_mean":
        picked = lp.gather(2, targets.expand(lp.shape[0], -1)[:, :, None])[:, :, 0]  # [K, R]
        return torch.logsumexp(picked + torch.log(weights)[:, None], dim=0)
    scores = (weights[:, None, None] * lp).sum(dim=0)  # [R, V]
    return scores.gather(1, targets[:, None])[:, 0] - torch.logsumexp(scores, dim=-1)


@torch.no_grad()
def bits_per_byte(
    windows: Sequence[tuple[Tensor, Tensor]], n_bytes: int, weights: Tensor, temperatures: Tensor, rule: str,
) -> float:
    """Pooled bits per byte over scored windows ``(logits [K, R, V], targets [R])`` (one pass)."""
    check_rule(rule)
    w = weights.to(torch.float64) / weights.sum()
    temps = temperatures.to(torch.float64)
    if rule == "logprob_mean":
        return _geometric_pass(windows, w / temps, hessian=False)[0] / (math.log(2) * n_bytes)
    table = target_logprob_table(windows, temps[:, None])[:, 0]  # [K, N]
    return _mixture_bits(table, w.to(torch.float32)) / n_bytes


# Temperatures tried per member under prob_mean (the mixture couples them; see `fit_prob_mean`).
TEMPERATURE_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6, 1.8, 2.0)


def _chunks(windows: Sequence[tuple[Tensor, Tensor]], buffer_bytes: int = 1 << 26,
            rows_of: Sequence[Tensor] | None = None):
    """``(float32 logits [rows, K, V] floored, targets [rows], rows_of[window][rows] or None)`` a
    few rows at a time (`rows_of`: per-window row features sliced alongside).

    Every chunk is a view of one reused buffer (valid until the next one is yielded): a fresh
    64 MB tensor per chunk costs more in page faults than the arithmetic done on it.
    """
    k, _, v = windows[0][0].shape
    rows = max(1, buffer_bytes // (4 * k * v))
    buffer = torch.empty(rows * k * v)
    for i, (logits, targets) in enumerate(windows):
        for start in range(0, logits.shape[1], rows):
            part = logits[:, start:start + rows]
            x = buffer[:part.numel()].view(part.shape[1], k, v)
            x.copy_(part.transpose(0, 1)).clamp_min_(_FLOOR)
            yield x, targets[start:start + rows], None if rows_of is None else rows_of[i][start:start + rows]


@torch.no_grad()
def target_logprob_table(windows: Sequence[tuple[Tensor, Tensor]], temperatures: Tensor | Sequence[float]) -> Tensor:
    """``[K, G, N]``: each member's log-probability of every target at each of its temperatures.

    `temperatures` is ``[G]`` (the same for every member, e.g. `TEMPERATURE_GRID`) or ``[K, G]``.
    """
    k = windows[0][0].shape[0]
    temps = torch.as_tensor(temperatures, dtype=torch.float32)
    temps = temps.expand(k, -1) if temps.dim() == 1 else temps
    parts, scratch = [], None
    for x, t, _ in _chunks(windows):
        rows = x.shape[0]
        if scratch is None or scratch.numel() < x[:, 0].numel():
            scratch = torch.empty(x[:, 0].numel())
        out = torch.empty(k, temps.shape[1], rows)
        for i in range(k):
            xi = x[:, i]  # [rows, V]
            top = xi.amax(dim=-1, keepdim=True)
            picked = xi.gather(1, t[:, None])[:, 0] - top[:, 0]
            shifted = scratch[:xi.numel()].view_as(xi)
            for g, temp in enumerate(temps[i].tolist()):
                torch.sub(xi, top, out=shifted).mul_(1.0 / temp).exp_()  # in place: no 20 MB allocations
                out[i, g] = picked / temp - shifted.sum(dim=-1).log()
        parts.append(out)
    return torch.cat(parts, dim=2)


def mixture_weights(logprobs: Tensor, iters: int = 200) -> Tensor:
    """Maximum-likelihood weights ``[K]`` of a mixture whose members give the targets `logprobs` ``[K, N]`` (EM)."""
    w = torch.full((logprobs.shape[0],), 1.0 / logprobs.shape[0], dtype=torch.float64)
    lp = logprobs.to(torch.float64)
    for _ in range(iters):
        post = torch.softmax(lp + w.log()[:, None], dim=0)
        w = post.mean(dim=1).clamp_min(1e-12)
    return (w / w.sum()).to(torch.float32)


def _mixture_bits(logprobs: Tensor, w: Tensor) -> float:
    return -float(torch.logsumexp(logprobs + w.log()[:, None], dim=0).sum()) / math.log(2)


def fit_prob_mean(table: Tensor, grid: Sequence[float], n_bytes: int, fixed: Sequence[int] | None = None) -> RuleFit:
    """Linear pool: temperatures from `grid` (coordinate descent from each member's own best, two
    rounds; or the `fixed` grid indices) and, for each choice, the maximum-likelihood weights."""
    k = table.shape[0]
    if fixed is not None:
        choice = list(fixed)
    else:
        choice = [int(table[i].sum(dim=1).argmax()) for i in range(k)]  # each member's own calibration
        for _ in range(2):
            for i in range(k):
                best = None
                for g in range(len(grid)):
                    trial = choice[:i] + [g] + choice[i + 1:]
                    rows = table[torch.arange(k), torch.tensor(trial)]
                    bits = _mixture_bits(rows, mixture_weights(rows))
                    if best is None or bits < best[0]:
                        best = (bits, g)
                choice[i] = best[1]
    rows = table[torch.arange(k), torch.tensor(choice)]
    w = mixture_weights(rows)
    return RuleFit("prob_mean", tuple(round(float(x), 4) for x in w),
                   tuple(float(grid[g]) for g in choice), _mixture_bits(rows, w) / n_bytes)


@torch.no_grad()
def _geometric_pass(
    windows: Sequence[tuple[Tensor, Tensor]], c: Tensor, hessian: bool = True,
    features: Sequence[Tensor] | None = None,
) -> tuple[float, Tensor, Tensor]:
    """The geometric pool's loss ``f(c) = sum_rows logsumexp(sum_k c_k x_k) - sum_k c_k x_k[target]``
    (nats) with its gradient ``sum E_p[x_k] - x_k[target]`` and Hessian ``sum Cov_p(x_k, x_l)``
    (``p`` the pooled distribution; float64 sums), in one pass over the logits.

    With `features` (one ``[R, J]`` tensor per window), `c` is a ``[K, J]`` matrix and row r pools
    with the coefficients ``c @ features[r]``; the gradient (``[K, J]``) and Hessian
    (``[K, J, K, J]``) are then with respect to that matrix. The loss stays convex: the
    coefficients are linear in it."""
    k = c.shape[0]
    shape = c.shape
    f, grad, hess = 0.0, torch.zeros(shape, dtype=torch.float64), torch.zeros(shape + shape, dtype=torch.float64)
    scores, scaled = None, None
    for x, t, phi in _chunks(windows, rows_of=features):
        rows, _, v = x.shape
        if scores is None or scores.numel() < rows * v:
            scores, scaled = torch.empty(rows * v), (torch.empty(x.numel()) if hessian else None)
        coef = (c.to(torch.float32).expand(rows, k) if phi is None else (phi.double() @ c.t()).to(torch.float32))
        s = scores[:rows * v].view(rows, 1, v)
        torch.bmm(coef[:, None, :], x, out=s)
        s = s[:, 0]
        top = s.amax(dim=-1, keepdim=True)
        picked = s.gather(1, t[:, None])[:, 0]
        z = s.sub_(top).exp_().sum(dim=-1)
        f += float((z.log() + top[:, 0] - picked).double().sum())
        if not hessian:
            continue
        p = s.div_(z[:, None])  # the pooled distribution, [rows, V]
        mean = torch.bmm(x, p[:, :, None])[:, :, 0]  # E_p[x_k], [rows, K]
        g = (mean - x.gather(2, t[:, None, None].expand(rows, k, 1))[:, :, 0]).double()
        y = torch.mul(x, p.sqrt_()[:, None, :], out=scaled[:x.numel()].view_as(x))
        second = torch.bmm(y, y.transpose(1, 2))  # E_p[x_k x_l], [rows, K, K]
        cov = (second - mean[:, :, None] * mean[:, None, :]).double()
        if phi is None:
            grad += g.sum(dim=0)
            hess += cov.sum(dim=0)
        else:
            phi = phi.double()
            grad += g.t() @ phi
            hess += torch.einsum("rkl,ri,rj->kilj", cov, phi, phi)
    return f, grad, hess


@torch.no_grad()
def window_entropies(windows: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """Per window, ``[R, K]``: each member's entropy (nats, temperature 1) at each row, the
    features of the entropy gate (`ensemble.pooling.member_entropies`, on the stored logits)."""
    from ensemble.pooling import member_entropies

    out: list[list[Tensor]] = [[] for _ in windows]
    index = [i for i, (logits, _) in enumerate(windows) for _ in range(0, logits.shape[1], _chunk_rows(windows))]
    for i, (x, _, _) in zip(index, _chunks(windows)):
        out[i].append(member_entropies(list(x.unbind(1))))
    return [torch.cat(parts) for parts in out]


def _chunk_rows(windows: Sequence[tuple[Tensor, Tensor]], buffer_bytes: int = 1 << 26) -> int:
    k, _, v = windows[0][0].shape
    return max(1, buffer_bytes // (4 * k * v))


def _newton_direction(c: Tensor, grad: Tensor, hess: Tensor, a: Tensor | None) -> Tensor:
    """Newton step for ``min f(c)`` over ``c >= 0`` (and ``a . c = 1`` when `a` is given), on an
    active set: members at 0 stay there unless the gradient (with the constraint's multiplier)
    pulls them up; members at 0 whose step would go negative are held."""
    k = c.shape[0]
    free = c > 0
    for _ in range(2 * k + 1):
        idx = free.nonzero()[:, 0]
        n = len(idx)
        h = hess[idx][:, idx] + 1e-9 * hess.diagonal().abs().max().clamp_min(1e-12) * torch.eye(n, dtype=hess.dtype)
        rhs = -grad[idx]
        if a is not None:  # KKT system [[H, a], [a^T, 0]] [d; nu] = [-g; 0]
            h = torch.cat([torch.cat([h, a[idx, None]], 1), torch.cat([a[idx], torch.zeros(1, dtype=a.dtype)])[None]])
            rhs = torch.cat([rhs, torch.zeros(1, dtype=rhs.dtype)])
        sol = torch.linalg.lstsq(h, rhs[:, None]).solution[:, 0]
        d = torch.zeros(k, dtype=c.dtype)
        d[idx] = sol[:n]
        nu = float(sol[n]) if a is not None else 0.0
        held = free & (c <= 0) & (d < 0)
        pull = (~free) & (grad + nu * (a if a is not None else 0) < 0)
        if held.any():
            free &= ~held
        elif pull.any():
            free[int(torch.where(pull, grad, torch.inf).argmin())] = True
        else:
            return d
    return d


def _backtrack(evaluate, x: Tensor, d: Tensor, f: float, decrement: float, step: float = 1.0, project=None):
    """Backtracking line search for a Newton step: the first of ``x + step d``, halving `step`,
    whose ``evaluate(...)[0]`` (the loss) falls by the Armijo fraction of the Newton `decrement`;
    returns ``(point, evaluate(point))``, or None when the step shrinks below 1e-4.
    `project` maps a trial point back into the feasible set (e.g. ``c >= 0``)."""
    while step > 1e-4:
        trial = x + step * d
        trial = project(trial) if project is not None else trial
        result = evaluate(trial)
        if result[0] <= f - 1e-4 * step * decrement:
            return trial, result
        step /= 2
    return None


def fit_logprob_mean(
    windows: Sequence[tuple[Tensor, Tensor]], n_bytes: int, temperatures: Sequence[float] | None, max_iter: int = 25,
) -> RuleFit:
    """Geometric pool by Newton's method. Renormalised, it is ``softmax(sum_k c_k x_k)`` with
    ``c_k = w_k / T_k`` (each member's log-normaliser cancels), so only the K products matter, and
    the loss is convex in them. Without fixed temperatures they are fitted freely (``c >= 0``) and
    reported as weights ``c / sum(c)`` with one shared temperature ``1 / sum(c)``; with fixed ones
    the weights alone are fitted (``sum_k T_k c_k = 1``). Each iteration is one pass over the logits
    (loss, gradient and Hessian together); a step that does not lower the loss is halved."""
    k = windows[0][0].shape[0]
    fixed = None if temperatures is None else torch.tensor(list(temperatures), dtype=torch.float64)
    c = torch.full((k,), 1.0 / k, dtype=torch.float64) / (1.0 if fixed is None else fixed)
    f, grad, hess = _geometric_pass(windows, c)
    tol = 1e-7 * math.log(2) * n_bytes  # stop when Newton promises < 1e-7 bits per byte
    for _ in range(max_iter):
        d = _newton_direction(c, grad, hess, fixed)
        decrement = -float(grad @ d)
        if decrement <= tol:
            break
        shrinking = d < 0
        step = min(1.0, float((c[shrinking] / -d[shrinking]).min())) if shrinking.any() else 1.0
        found = _backtrack(lambda x: _geometric_pass(windows, x), c, d, f, decrement, step,
                           lambda x: torch.where(x.abs() < 1e-12, 0.0, x).clamp_min(0.0))
        if found is None:
            break
        c, (f, grad, hess) = found
    if fixed is None:
        w, temps = c / c.sum(), torch.full((k,), float(1 / c.sum()))
    else:
        w, temps = c * fixed, fixed
    return RuleFit("logprob_mean", tuple(round(float(x), 4) for x in w), tuple(round(float(x), 4) for x in temps),
                   f / (math.log(2) * n_bytes))


def gated_bits_per_byte(
    windows: Sequence[tuple[Tensor, Tensor]], entropies: Sequence[Tensor], n_bytes: int, fit: RuleFit,
) -> float:
    """Dev bits per byte of a ``logprob_mean`` fit with its entropy gate, pooled exactly as the
    engines pool (`ensemble.pooling.gated_coefficients`, floored at 0)."""
    from ensemble.pooling import gated_coefficients

    w = torch.tensor(fit.weights, dtype=torch.float32)
    base = w / w.sum() / torch.tensor(fit.temperatures, dtype=torch.float32)
    coefs = [gated_coefficients(base, fit.entropy_gate, h) for h in entropies]
    eye = torch.eye(len(fit.weights), dtype=torch.float64)
    return _geometric_pass(windows, eye, hessian=False, features=coefs)[0] / (math.log(2) * n_bytes)


def fit_entropy_gate(
    windows: Sequence[tuple[Tensor, Tensor]], entropies: Sequence[Tensor], n_bytes: int, plain: RuleFit,
    max_iter: int = 25,
) -> RuleFit:
    """The geometric pool with weights that follow the members' entropies, from the plain
    ``logprob_mean`` fit `plain`: row r pools with ``c_k = theta[k] . (1, H_1(r) - h_1, ...,
    H_K(r) - h_K)`` (``h``: the mean entropies over the dev rows), ``theta`` ``[K, K + 1]`` fitted
    by Newton's method from ``theta[k, 0] = w_k / T_k`` (convex: the coefficients are linear in
    theta). Members at weight 0 in `plain` stay out (row and column zero). Reported as an
    `EntropyGate`: weights and a shared temperature from ``theta[:, 0]`` (the coefficients at the
    mean entropies), slopes ``theta[k, j + 1] / theta[k, 0]``; its bits per byte are measured as
    the engines pool (floored at 0). Returns `plain` when the gate does not beat it on the dev
    text or a live member's coefficient at the centre is not positive."""
    k = len(plain.weights)
    w = torch.tensor(plain.weights, dtype=torch.float64)
    base = w / w.sum() / torch.tensor(plain.temperatures, dtype=torch.float64)
    live = base > 0
    centre = torch.cat(list(entropies)).double().mean(dim=0)
    theta = torch.zeros(k, k + 1, dtype=torch.float64)
    theta[:, 0] = base
    free = live[:, None] & torch.cat([torch.ones(1, dtype=torch.bool), live])[None, :]  # [K, K + 1]
    features = [torch.cat([torch.ones(h.shape[0], 1, dtype=torch.float64), h.double() - centre], dim=1)
                for h in entropies]
    f, grad, hess = _geometric_pass(windows, theta, features=features)
    tol = 1e-7 * math.log(2) * n_bytes
    idx = free.flatten().nonzero()[:, 0]
    for _ in range(max_iter):
        n = theta.numel()
        h = hess.reshape(n, n)[idx][:, idx]
        h = h + 1e-9 * h.diagonal().abs().max().clamp_min(1e-12) * torch.eye(len(idx), dtype=h.dtype)
        d = torch.zeros(n, dtype=torch.float64)
        d[idx] = -torch.linalg.lstsq(h, grad.flatten()[idx][:, None]).solution[:, 0]
        d = d.view_as(theta)
        decrement = -float((grad * d).sum())
        if decrement <= tol:
            break
        found = _backtrack(lambda x: _geometric_pass(windows, x, features=features), theta, d, f, decrement)
        if found is None:
            break
        theta, (f, grad, hess) = found
    if not bool((theta[live, 0] > 0).all()):
        return plain
    total = float(theta[:, 0].sum())
    slopes = torch.where(live[:, None], theta[:, 1:] / theta[:, :1].clamp_min(1e-30), 0.0)
    gate = EntropyGate(tuple(round(float(v), 4) for v in centre),
                       tuple(tuple(round(float(v), 5) for v in row) for row in slopes))
    fit = RuleFit("logprob_mean", tuple(round(float(x) / total, 4) for x in theta[:, 0]),
                  (round(1 / total, 4),) * k, math.nan, gate)
    bits = gated_bits_per_byte(windows, entropies, n_bytes, fit)
    if bits >= plain.bits_per_byte:
        return plain
    return RuleFit(fit.rule, fit.weights, fit.temperatures, bits, gate)


def fit_rule(
    windows: Sequence[tuple[Tensor, Tensor]], n_bytes: int, rule: str, temperatures: Sequence[float] | None,
    max_iter: int = 25,
) -> RuleFit:
    """The weights (and temperatures, unless given) minimising the dev bits per byte under `rule`."""
    check_rule(rule)
    if rule == "logprob_mean":
        return fit_logprob_mean(windows, n_bytes, temperatures, max_iter)
    grid = sorted(set(TEMPERATURE_GRID) | set(temperatures or ()))
    table = target_logprob_table(windows, grid)
    fixed = None if temperatures is None else [grid.index(t) for t in temperatures]
    return fit_prob_mean(table, grid, n_bytes, fixed)
