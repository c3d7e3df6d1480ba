"""Ensemble counters, shared by both engines: rows pooled, member agreement, pooling time.

`PoolingCounters.record` is called once per pooling call with the members' logits over the
shared vocabulary and the pooled log-probabilities. A member *agrees* on a row when its own most
likely token (argmax of its logits) is the ensemble's most likely token (argmax of the pooled
distribution): the same as the token chosen under greedy decoding, and, unlike the sampled token,
independent of temperature and seeds, so the ratio measures how often the members disagree.

On an accelerator nothing here synchronises the device: agreement counts stay on the device
until `snapshot`, and pooling time is measured with device events (folded in at `snapshot`, or
once many are pending). On a CPU, the timings are plain wall time of the pooling call.

Agreement is counted on ``agreement_rows`` rows: every pooled row, except where the vLLM model
pools with one fused head product (`ensemble.vllm_fused_head`), which computes no member's own
logits; there it is counted on one pooled step in `ensemble.vllm_model.AGREEMENT_EVERY` (`count_rows`
counts the others' rows only: their pool is inside the heads' product and has no time of its
own), so the agreement ratio is agreement over ``agreement_rows``, and pooling time and steps
cover the steps that pool as an operation of their own.

The argmaxes use `row_argmax`: on a CPU ``torch.argmax`` over a 262,144-id row is about ten
times slower than a max, and three of them per step were 4.4% of an ensemble step at 16 rows
(more than the pooling itself; bench/RESULTS.md).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

# Ids per block in `row_argmax`: the row's blocks' maxima first, then the argmax inside one block.
ARGMAX_BLOCK = 1024

# Pending device-event pairs folded into the total once this many accumulate (bounds memory when
# nobody reads the counters).
_MAX_PENDING_EVENTS = 256


def row_argmax(x: Tensor, block: int = ARGMAX_BLOCK) -> Tensor:
    """``x.argmax(dim=-1)`` of a 2-D tensor (the first maximum of each row), computed as the
    maximum of each `block` of ids, the first block holding the row's maximum, and the argmax inside
    that block (and the tail past the last whole block, if any). The result equals ``argmax``'s
    for finite values, infinities and NaN (a NaN row's first NaN, as ``argmax``)."""
    if x.dim() != 2:
        raise ValueError(f"row_argmax takes a 2-D tensor, got shape {list(x.shape)}")
    n, v = x.shape
    whole = v // block
    if n == 0 or whole < 2:
        return x.argmax(dim=-1)
    head = x[:, : whole * block].reshape(n, whole, block)
    maxima = head.amax(dim=-1)  # [n, whole]
    first = maxima.argmax(dim=-1)  # the first block holding the row's maximum (a NaN one if any)
    inside = head[torch.arange(n, device=x.device), first].argmax(dim=-1)
    top = first * block + inside
    if whole * block == v:
        return top
    tail_value, tail_index = x[:, whole * block:].max(dim=-1)
    best = maxima.gather(1, first[:, None])[:, 0]
    # The tail wins only with a strictly larger value (or a NaN where the head has none).
    wins = (tail_value > best) | (tail_value.isnan() & ~best.isnan())
    return torch.where(wins, whole * block + tail_index, top)


class PoolingCounters:
    """Cumulative ensemble counters of one engine (thread-safe)."""

    def __init__(self, member_names: Sequence[str]) -> None:
        self.member_names = tuple(member_names)
        self._lock = threading.Lock()
        self._rows = 0
        self._agreement_rows = 0  # rows on which agreement was counted
        self._agree: Tensor | None = None  # int64 [K], on the logits' device
        self._seconds = 0.0
        self._steps = 0
        self._events: list[tuple[Any, Any]] = []  # (start, end) device events not yet folded

    def timed_pool(self, member_logits: Sequence[Tensor], pool: Callable[[], Tensor]) -> Tensor:
        """Run `pool()` (which pools `member_logits`), time it, record it, return its result. The
        members' argmaxes are taken before the pool runs, so the pool may write over their logits
        (the vLLM model's raw geometric sum adds into the first member's)."""
        tops = self._member_tops(member_logits)
        if member_logits[0].device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            pooled = pool()
            end.record()
            self._count(tops, pooled, events=(start, end))
        else:
            began = time.perf_counter()
            pooled = pool()
            self._count(tops, pooled, seconds=time.perf_counter() - began)
        return pooled

    def count_rows(self, rows: int) -> None:
        """Count `rows` pooled inside one product with the members' heads (the vLLM model's fused
        head): no member logits, so no agreement, and no pooling time or step of their own (the
        pool is not a separate operation there)."""
        with self._lock:
            self._rows += int(rows)

    def record(
        self, member_logits: Sequence[Tensor], pooled: Tensor, seconds: float = 0.0,
        events: tuple[Any, Any] | None = None,
    ) -> None:
        """Count one pooling call: ``pooled`` [N, V], ``member_logits`` K tensors [N, V]."""
        self._count(self._member_tops(member_logits), pooled, seconds, events)

    def _member_tops(self, member_logits: Sequence[Tensor]) -> list[Tensor]:
        """Each member's most likely id per row."""
        if len(member_logits) != len(self.member_names):
            raise ValueError(f"expected {len(self.member_names)} members' logits, got {len(member_logits)}")
        with torch.no_grad():
            return [row_argmax(m) for m in member_logits]

    def _count(self, member_tops: Sequence[Tensor], pooled: Tensor, seconds: float = 0.0,
               events: tuple[Any, Any] | None = None) -> None:
        """Count one pooling call from the members' argmaxes and the pooled rows."""
        rows = int(pooled.shape[0])
        if rows == 0:
            return
        with torch.no_grad():
            top = row_argmax(pooled)
            agree = torch.stack([(t == top).sum() for t in member_tops]).to(torch.int64)
        with self._lock:
            self._rows += rows
            self._agreement_rows += rows
            self._agree = agree if self._agree is None else self._agree + agree.to(self._agree.device)
            self._steps += 1
            if events is None:
                self._seconds += seconds
            else:
                self._events.append(events)
                if len(self._events) >= _MAX_PENDING_EVENTS:
                    self._fold_events(block=False)

    def _fold_events(self, block: bool) -> None:
        """Add finished device-event pairs to the pooling time (all of them if `block`)."""
        left = []
        for start, end in self._events:
            if block:
                end.synchronize()
            elif not end.query():
                left.append((start, end))
                continue
            self._seconds += start.elapsed_time(end) / 1000.0
        self._events = left

    def snapshot(self, reset: bool = False) -> dict[str, Any]:
        """The counters as `EngineStats` fields (``pooled_tokens``, ``agreement_rows``,
        ``member_agreement``, ``pooling_seconds``, ``pooling_steps``); `reset` zeroes them afterwards."""
        with self._lock:
            self._fold_events(block=True)
            agree = [0] * len(self.member_names) if self._agree is None else self._agree.tolist()
            out = {
                "pooled_tokens": self._rows,
                "agreement_rows": self._agreement_rows,
                "member_agreement": dict(zip(self.member_names, (int(a) for a in agree))),
                "pooling_seconds": self._seconds,
                "pooling_steps": self._steps,
            }
            if reset:
                self._rows, self._agreement_rows, self._agree, self._seconds, self._steps = 0, 0, None, 0.0, 0
        return out


def driver_snapshot(snapshots: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The counters of the first worker that has any (vLLM's ``collective_rpc`` answers per worker,
    rank 0 first). Only ranks that receive the gathered logits pool; with vLLM's all-gather they
    all do, each the same rows, so adding the workers' counters up would count rows twice."""
    return next((s for s in snapshots if s is not None), None)
