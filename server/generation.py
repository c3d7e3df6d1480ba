"""One HTTP generation request's life in the engine: admission, the engine requests (one per
prompt), the merged stream of their outputs, the deadline, metrics, and a cleanup that always
aborts what is unfinished.

`GenerationCall.close(reason)` is idempotent and safe to call from any exit path (normal end,
client disconnect, timeout, server shutdown, error): it aborts every unfinished engine request
(`engine.abort`, which frees its KV cache), stops the producer tasks and gives the admission slot
back. Routes call it in `finally` blocks under a shielded cancel scope.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ensemble.protocol import Engine, RequestOutput, SamplingOptions
from server.errors import APIError, engine_dead_error
from server.limits import Admission, QueueFullError
from server.metrics import ServerMetrics

log = logging.getLogger("chorus.server")

_END = object()
_ABORT_GRACE_S = 2.0  # how long aborted engine requests get to end on their own before being cancelled


class DeadlineExceeded(Exception):
    """The request ran past `--request-timeout`."""


@dataclass
class _Track:
    """Per engine request bookkeeping for metrics."""

    started: bool = False  # first output seen (prefill done)
    tokens: int = 0
    last_token_at: float | None = None
    finished: bool = False
    logprobs_seen: list[int] = field(default_factory=list)


class GenerationCall:
    """The engine side of one HTTP request: `len(prompts)` engine requests run together."""

    def __init__(
        self,
        engine: Engine,
        admission: Admission,
        metrics: ServerMetrics,
        request_id: str,
        prompts: list[list[int]],
        options: SamplingOptions,
        timeout: float | None,
        registry: dict[str, GenerationCall],
        client_admission: Admission | None = None,
    ) -> None:
        self.engine = engine
        self.admission = admission
        self.client_admission = client_admission  # the client's own budget, taken first (server.clients)
        self._client_admitted = False
        self.metrics = metrics
        self.request_id = request_id
        self.prompts = prompts
        self.options = options
        self.arrival = time.monotonic()
        self.deadline = None if timeout is None else self.arrival + timeout
        self.engine_ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        self.tracks = [_Track(logprobs_seen=[0] * options.n) for _ in prompts]
        self.sequences = len(prompts) * options.n  # what admission counts
        self.closed_reason: str | None = None  # why unfinished engine requests were aborted
        self._stop_hint: str | None = None  # why the call is being stopped, if known early
        self.owned_by_response = False  # a streaming response closes the call when it ends
        self._registry = registry
        self._admitted = False
        self._closed = False
        # Outputs are cumulative, so only the newest of each engine request matters: a client that
        # reads slowly finds one output per prompt waiting, never a backlog (memory O(n·T), not
        # O(n·T²)). Ends and errors queue behind them, in order.
        self._latest: dict[int, RequestOutput] = {}
        self._ends: collections.deque[tuple[int, object]] = collections.deque()
        self._wake = asyncio.Event()
        self._producers: list[asyncio.Task] = []

    # ------------------------------------------------------------------ lifecycle

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    async def admit(self) -> None:
        """Wait for an admission slot (bounded queue, bounded by the deadline), then start the
        engine requests. Raises QueueFullError or DeadlineExceeded."""
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation (the
            # client's disconnect) that arrives just as the awaited result does.
            async with asyncio.timeout(self.remaining()):
                if self.client_admission is not None:  # waits in its client's queue, holding up no one else
                    await self.client_admission.acquire(self.sequences, self.options.priority)
                    self._client_admitted = True
                await self.admission.acquire(self.sequences, self.options.priority)
        except BaseException as err:
            self._release_client()
            if isinstance(err, QueueFullError):
                self.metrics.queue_rejections.inc()
                raise
            if isinstance(err, TimeoutError):
                raise DeadlineExceeded(
                    f"request timed out after {time.monotonic() - self.arrival:.1f} s waiting in the queue"
                ) from None
            raise
        self._admitted = True
        self._registry[self.request_id] = self
        for i, ids in enumerate(self.prompts):
            self._producers.append(asyncio.create_task(self._produce(i, ids), name=self.engine_ids[i]))

    def _release_client(self) -> None:
        """Give the client's budget back (once), if this call took it."""
        if self._client_admitted:
            self._client_admitted = False
            self.client_admission.release(self.sequences)  # type: ignore[union-attr]

    async def _produce(self, index: int, prompt: list[int]) -> None:
        try:
            async for out in self.engine.generate(prompt, self.options, self.engine_ids[index]):
                self._observe(index, out)  # timed as the engine delivers, however slow the client reads
                self._latest[index] = out  # replaces an output the consumer has not taken yet
                self._wake.set()
            self._end(index, _END)
        except asyncio.CancelledError:
            # Cancelled by close() when the engine did not end an aborted request itself (a dead
            # engine): the consumer must still see this request end.
            self._end(index, _END)
            raise
        except BaseException as err:  # noqa: BLE001 - delivered to the consumer, re-raised there
            self._end(index, err)

    def _end(self, index: int, item: object) -> None:
        self._ends.append((index, item))
        self._wake.set()

    @property
    def buffered(self) -> int:
        """Outputs waiting for the consumer (at most one per prompt)."""
        return len(self._latest)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative output) as the engine produces them, until every engine
        request has finished. Raises DeadlineExceeded past the deadline, and the engine's own
        exception (e.g. EngineRequestError) if an engine request fails."""
        pending = len(self._producers)
        while pending:
            if not (self._latest or self._ends):
                self._wake.clear()
                try:
                    async with asyncio.timeout(self.remaining()):  # not wait_for: see admit()
                        await self._wake.wait()
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"request timed out after {time.monotonic() - self.arrival:.1f} s (--request-timeout)"
                    ) from None
                continue
            if self._latest:  # outputs first: an engine request's last output precedes its end
                latest, self._latest = self._latest, {}
                for index in sorted(latest):
                    yield index, latest[index]
                continue
            index, item = self._ends.popleft()
            if item is _END:
                pending -= 1
                continue
            self.tracks[index].finished = True
            raise item  # type: ignore[misc]

    # ------------------------------------------------------------------ metrics

    def _observe(self, index: int, out: RequestOutput) -> None:
        now = time.monotonic()
        track = self.tracks[index]
        m = self.metrics
        if not track.started:
            track.started = True
            m.prompt_tokens.inc(len(out.prompt_token_ids))
        tokens = sum(len(c.token_ids) for c in out.outputs)
        new = tokens - track.tokens
        if new > 0:
            if track.last_token_at is None:
                m.ttft.observe(now - self.arrival)
            else:
                m.itl.observe(now - track.last_token_at)
            track.last_token_at = now
            track.tokens = tokens
            m.generation_tokens.inc(new)
        for c in out.outputs:
            if c.logprobs is not None and c.index < len(track.logprobs_seen):
                for entry in c.logprobs[track.logprobs_seen[c.index]:]:
                    if entry.member_logprobs:
                        m.record_member_logprobs(entry.member_logprobs)
                track.logprobs_seen[c.index] = len(c.logprobs)
        if out.finished and not track.finished:
            track.finished = True
            m.e2e.observe(now - self.arrival)
            for c in out.outputs:
                m.record_finish(c.finish_reason)

    # ------------------------------------------------------------------ cleanup

    @property
    def unfinished_ids(self) -> list[str]:
        """Engine request ids started and not yet finished (as far as the consumer has seen)."""
        return [rid for rid, t in zip(self.engine_ids, self.tracks) if not t.finished]

    def _mark_all_finished(self) -> None:
        for track in self.tracks:
            track.finished = True

    async def close(self, reason: str | None = None) -> None:
        """Abort what is unfinished (counted under `reason`), stop the producers, free the slot."""
        if self._closed:
            return
        self._closed = True
        if self._admitted:
            unfinished = self.unfinished_ids
            if unfinished:
                self.closed_reason = reason if reason == "timeout" else (self._stop_hint or reason or "error")
                # Marked first: the producers still observe the engine's final "abort" outputs,
                # which must not count a second time.
                self._mark_all_finished()
                for rid in unfinished:
                    self.metrics.aborted[self.closed_reason].inc()
                    for _ in range(self.options.n):
                        self.metrics.record_finish("abort")
                for rid in unfinished:
                    try:
                        await self.engine.abort(rid)
                    except Exception:  # noqa: BLE001 - keep cleaning up
                        log.exception("engine.abort(%s) failed", rid)
            pending = [task for task in self._producers if not task.done()]
            if pending:  # let the engine end the aborted generators itself: 2 s for all of them
                _, late = await asyncio.wait(pending, timeout=_ABORT_GRACE_S)
                for task in late:
                    task.cancel()
            self._registry.pop(self.request_id, None)
            self.admission.release(self.sequences)
        self._release_client()

    def raise_if_stopped(self) -> None:
        """After the outputs end: 503 if the server shut the call down, 504 if it timed out."""
        if self.closed_reason == "shutdown":
            raise APIError(503, "the server is shutting down; the request was aborted", code="shutting_down")
        if self.closed_reason == "engine_dead":
            raise engine_dead_error()
        if self.closed_reason == "timeout":
            raise APIError(504, "request timed out (--request-timeout)", code="request_timeout")

    def mark_closing(self, reason: str) -> None:
        """Record why the call may soon be stopped (e.g. "shutdown"); used by `close` if it then
        has to abort anything. First reason wins."""
        if self._stop_hint is None:
            self._stop_hint = reason
