"""Bounded admission: at most `max_running` sequences in the engine, at most `max_queue` requests
waiting.

A request weighs as many sequences as it asks the engine for (prompts × `n`), so one request with
64 prompts and `n` 32 cannot pass for one. A request heavier than `max_running` waits until the
engine is empty and then takes every slot. A request that finds no room and the queue full is
refused at once (`QueueFullError`, answered 429 with `Retry-After`) instead of waiting without
bound. Waiters are served in order of (priority, arrival): lower priority values first (vLLM's
convention; every request has priority 0 unless the engine schedules by priority), first come,
first served among equals. Freed slots go to the head of that order, and a newcomer cannot
overtake a waiter that is ahead of it even when it would fit. A waiter that gives up (timeout,
client gone) leaves the queue cleanly.

Everything runs on one asyncio loop, so plain counters suffice (no awaits between check and take).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass


class QueueFullError(Exception):
    """No room in the engine and the waiting queue is full."""


@dataclass
class _Waiter:
    weight: int
    future: asyncio.Future[None]
    order: tuple[int, int]  # (priority, arrival number): the queue's sort key


class Admission:
    """A weighted semaphore with a bounded queue, served by (priority, arrival)."""

    def __init__(self, max_running: int, max_queue: int, owner: str = "server") -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_running = max_running
        self.max_queue = max_queue
        self.owner = owner  # whose budget this is, in refusals: "server" or "client 'name'"
        self._running = 0
        self._waiters: list[_Waiter] = []  # sorted by `order`
        self._arrivals = itertools.count()

    @property
    def running(self) -> int:
        """Sequences holding a slot."""
        return self._running

    @property
    def waiting(self) -> int:
        """Requests queued for room."""
        return sum(1 for w in self._waiters if not w.future.done())

    def weight_of(self, sequences: int) -> int:
        """The slots a request of `sequences` sequences takes (at least 1, at most all)."""
        return max(1, min(int(sequences), self.max_running))

    def check(self, sequences: int = 1, priority: int = 0) -> None:
        """Raise QueueFullError now if `try_acquire(sequences, priority)` would: lets a route refuse
        a request before it spends work (tokenizing) on it. A full queue refuses every newcomer
        that must wait, whatever its priority (waiters are never evicted)."""
        weight = self.weight_of(sequences)
        if (self._running + weight > self.max_running or self._ahead(priority)) and self.waiting >= self.max_queue:
            raise QueueFullError(
                f"{self.owner} is at capacity: {self._running} of {self.max_running} sequences running and "
                f"{self.waiting} requests waiting (--max-queue {self.max_queue}); retry later"
            )

    def try_acquire(self, sequences: int = 1, priority: int = 0) -> asyncio.Future[None] | None:
        """Take room for `sequences` now (returns None) or join the queue (returns a future that
        resolves when the room is handed over). Raises QueueFullError when the queue is full."""
        weight = self.weight_of(sequences)
        if self._running + weight <= self.max_running and not self._ahead(priority):
            self._running += weight
            return None
        self.check(sequences, priority)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        bisect.insort(self._waiters, _Waiter(weight, fut, (priority, next(self._arrivals))), key=lambda w: w.order)
        return fut

    def _ahead(self, priority: int) -> bool:
        """Whether a waiter would be served before a newcomer of `priority` (same or lower value)."""
        return any(not w.future.done() and w.order[0] <= priority for w in self._waiters)

    async def acquire(self, sequences: int = 1, priority: int = 0) -> None:
        """Take room for `sequences`, waiting in the queue if needed (ahead of every waiter with
        a higher `priority` value). Raises QueueFullError when the queue is full.

        Cancellation while queued leaves the queue; cancellation just after the room was handed
        over gives it back.
        """
        fut = self.try_acquire(sequences, priority)
        if fut is None:
            return
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(sequences)  # the room was handed to us just as we gave up
            else:
                fut.cancel()
                self._discard(fut)
                self._hand_over()  # a heavy waiter leaving may let lighter ones behind it in
            raise

    def release(self, sequences: int = 1) -> None:
        """Give the room of `sequences` back, and hand it to the oldest waiters that fit."""
        weight = self.weight_of(sequences)
        if self._running < weight:
            raise RuntimeError("Admission.release() without a matching acquire()")
        self._running -= weight
        self._hand_over()

    def _hand_over(self) -> None:
        while self._waiters:
            head = self._waiters[0]
            if head.future.done():
                self._waiters.pop(0)
                continue
            if self._running + head.weight > self.max_running:
                return  # nobody overtakes the head of the queue
            self._waiters.pop(0)
            self._running += head.weight
            head.future.set_result(None)

    @asynccontextmanager
    async def slot(self, sequences: int = 1) -> AsyncIterator[None]:
        """`async with admission.slot(n):` holds room for `n` sequences for the block."""
        await self.acquire(sequences)
        try:
            yield
        finally:
            self.release(sequences)

    def _discard(self, fut: asyncio.Future[None]) -> None:
        for waiter in self._waiters:
            if waiter.future is fut:
                self._waiters.remove(waiter)
                return
