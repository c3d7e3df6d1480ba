"""Bounded admission: at most `max_running` requests in the engine, at most `max_queue` waiting.

A request that finds every running slot taken and the queue full is refused at once
(`QueueFullError`, answered 429 with `Retry-After`) instead of waiting without bound. Waiters are
served first come, first served; a freed slot passes straight to the oldest waiter, so a newcomer
cannot overtake the queue. A waiter that gives up (timeout, client gone) leaves the queue cleanly.

Everything runs on one asyncio loop, so plain counters suffice (no awaits between check and take).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class QueueFullError(Exception):
    """Every running slot is busy and the waiting queue is full."""


class Admission:
    """A FIFO semaphore with a bounded queue."""

    def __init__(self, max_running: int, max_queue: int) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_running = max_running
        self.max_queue = max_queue
        self._running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def running(self) -> int:
        """Requests holding a slot."""
        return self._running

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return sum(1 for w in self._waiters if not w.done())

    def try_acquire(self) -> asyncio.Future[None] | None:
        """Take a slot now (returns None) or join the queue (returns a future that resolves when
        the slot is handed over). Raises QueueFullError when the queue is full."""
        if self._running < self.max_running and not self.waiting:
            self._running += 1
            return None
        if self.waiting >= self.max_queue:
            raise QueueFullError(
                f"server is at capacity: {self._running} requests running and {self.waiting} waiting "
                f"(--max-queue {self.max_queue}); retry later"
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return fut

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if needed. Raises QueueFullError when it is full.

        Cancellation while queued leaves the queue; cancellation just after the slot was handed
        over gives the slot back.
        """
        fut = self.try_acquire()
        if fut is None:
            return
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed to us just as we gave up
            else:
                fut.cancel()
                self._discard(fut)
            raise

    def release(self) -> None:
        """Give a slot back: to the oldest waiter if any, else to the pool."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes on; the running count is unchanged
                return
        if self._running <= 0:
            raise RuntimeError("Admission.release() without a matching acquire()")
        self._running -= 1

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """`async with admission.slot():` holds one running slot for the block."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    def _discard(self, fut: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(fut)
        except ValueError:
            pass
