"""The reference engine: a pooled ensemble in plain PyTorch + transformers.

Every member is an ordinary `AutoModelForCausalLM` loaded from its own folder, with its own
KV cache (a `DynamicCache` per member per completion). A request is prefilled once per member;
then, step by step, every member's next-token logits are fitted to the shared vocabulary, pooled
with `ensemble.pooling.pool_logprobs` (the request's own rule and weights), one token is sampled
(`ensemble.sampling`), checked against the stop rules (`ensemble.stopping`) and fed back to
every member. All maths is float32 by default, so this engine is the oracle the vLLM engine is
tested against: greedy tokens and log-probs must agree.

Serving: `ReferenceEngine` implements `ensemble.protocol.Engine`. A worker thread runs a priority
scheduler (admit waiting requests in order of (priority, arrival), lower priority values first
as in vLLM's priority policy, never preempting a running one, while sequence slots are free; then advance every running
completion by one token per step), so the asyncio event loop never waits on torch. Correctness
and clarity come before speed: members run one completion at a time; only the pooling and the
bookkeeping are batched.

Ensemble counters (`EngineStats` optional fields, cumulative since start, kept by
`ensemble.pooling_stats.PoolingCounters` as in the vLLM engine): every decode step times its
pooling call, and every pooled row counts, per member, whether the member's own most likely token
was the ensemble's (the pooled argmax: the chosen token under greedy decoding).

Modules: `ensemble.reference_members` (`Member`, `load_members`), `ensemble.reference_requests`
(a request and its completions), `ensemble.reference_decode` (prefill, pooling and decode steps,
a base class of the engine) and this one (the engine: the Engine API, validation and the worker
thread's scheduler). Every public name of those modules is importable from here.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import torch

from ensemble.manifest import EnsembleManifest
from ensemble.pooling import normalise_weights
from ensemble.pooling_stats import PoolingCounters
from ensemble.protocol import ALONE, EngineRequestError, EngineStats, RequestOutput, SamplingOptions, engine_info
from ensemble.reference_decode import PROMPT_LOGPROBS_BYTES, DecodeMixin  # noqa: F401 (re-exported)
from ensemble.reference_members import Member, load_members  # noqa: F401 (Member: re-exported)
from ensemble.reference_requests import _Request, _Sequence  # noqa: F401 (_Sequence: re-exported)
from ensemble.sampling import check_options


class ReferenceEngine(DecodeMixin):
    """A pooled ensemble over Hugging Face models; implements `ensemble.protocol.Engine`.

    Args:
        folder: an ensemble folder (see `ensemble.manifest`).
        device: where the members run.
        dtype: the members' parameter dtype (float32 for exact comparisons).
        max_num_seqs: completions decoded together; more requests wait (FIFO).
    """

    def __init__(
        self,
        folder: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_num_seqs: int = 16,
    ) -> None:
        from transformers import AutoTokenizer

        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}")
        self.folder = Path(folder)
        self.manifest = EnsembleManifest.load(self.folder)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.model_name = self.manifest.name
        self.max_model_len = self.manifest.max_model_len
        self.max_num_seqs = max_num_seqs
        self.members = load_members(self.manifest, device, dtype)
        self.info = engine_info(
            "reference", self.manifest, self.tokenizer, max_model_len=self.max_model_len, dtype=dtype,
            scheduling_policy="priority",
            servable_members=[m.spec.name for m in self.members],  # each one alone, by name
            structured_outputs=None,  # no grammar backend: constrained requests need the vLLM engine
        )
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._ids: set[str] = set()
        self._aborts: set[str] = set()
        self._closed = False
        # Ensemble counters: written by the worker thread (decode steps), read by stats().
        self._counters = PoolingCounters([m.spec.name for m in self.members])
        self._thread = threading.Thread(target=self._loop, name="reference-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ Engine API

    async def generate(
        self, prompt_token_ids: list[int], options: SamplingOptions, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Start a request and yield its cumulative state until `finished` is True."""
        rule, weights = self._validate(prompt_token_ids, options)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

        def sink(item: RequestOutput | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        request = _Request(request_id, list(prompt_token_ids), options, rule, weights, sink)
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine has been shut down")
            if request_id in self._ids:
                raise EngineRequestError(f"request id {request_id!r} is already in flight")
            self._ids.add(request_id)
            # behind every waiter of the same or a lower priority value: (priority, arrival) order
            at = next((i for i, r in enumerate(self._waiting) if r.options.priority > options.priority),
                      len(self._waiting))
            self._waiting.insert(at, request)
            self._cond.notify()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:  # the caller stopped listening: free the request
                self._request_abort(request_id)

    async def check_health(self) -> None:
        """Raise when the engine cannot serve: shut down, or its worker thread has died."""
        if self._closed:
            raise RuntimeError("the engine has been shut down")
        if not self._thread.is_alive():
            raise RuntimeError("the reference engine's worker thread has stopped")

    async def abort(self, request_id: str) -> None:
        """Stop a request; its generator ends with finish_reason 'abort'."""
        self._request_abort(request_id)

    def stats(self) -> EngineStats:
        """Requests running / waiting, cached tokens over `max_num_seqs * max_model_len`, and the
        ensemble counters: pooled tokens, per-member agreement, pooling time and steps."""
        with self._cond:
            running = list(self._running)
            waiting = len(self._waiting)
        cached = sum(len(r.prompt) + len(s.token_ids) for r in running for s in r.sequences if not s.finished)
        usage = min(1.0, cached / (self.max_num_seqs * self.max_model_len))
        return EngineStats(num_running=len(running), num_waiting=waiting, kv_cache_usage=usage,
                           **self._counters.snapshot())

    async def shutdown(self) -> None:
        """Abort everything in flight and stop the worker thread."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._aborts.update(self._ids)
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)

    # ------------------------------------------------------------------ validation

    def _validate(self, prompt: list[int], options: SamplingOptions) -> tuple[str, tuple[float, ...]]:
        vocab = self.manifest.vocab_size
        if not prompt:
            raise EngineRequestError("the prompt is empty")
        bad = [t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise EngineRequestError(f"prompt token id {bad[0]} is outside the vocabulary of {vocab}")
        if len(prompt) > self.max_model_len:
            raise EngineRequestError(
                f"the prompt has {len(prompt)} tokens but the ensemble's maximum context length is {self.max_model_len}"
            )
        check_options(options, vocab)
        if options.structured_outputs is not None:
            raise EngineRequestError(
                f"structured output ({options.structured_outputs.kind}) needs the vLLM engine: the reference "
                "engine samples without a grammar backend")
        names = [m.spec.name for m in self.members]
        if options.member is not None:
            if options.member not in names:
                raise EngineRequestError(f"unknown member {options.member!r}; the members are {', '.join(names)}")
            return ALONE, tuple(1.0 if name == options.member else 0.0 for name in names)
        rule = options.pooling or self.manifest.rule
        weights = tuple(options.weights) if options.weights is not None else self.manifest.weights
        try:
            normalise_weights(weights, len(self.members), rule)
        except ValueError as err:
            raise EngineRequestError(f"pooling: {err}") from None
        return rule, weights

    # ------------------------------------------------------------------ the worker

    def _request_abort(self, request_id: str) -> None:
        with self._cond:
            if request_id in self._ids:
                self._aborts.add(request_id)
                self._cond.notify()

    def _loop(self) -> None:
        """The worker: abort, admit, prefill, one decode step; repeat until shut down."""
        while True:
            with self._cond:
                while not (self._waiting or self._running or self._aborts or self._closed):
                    self._cond.wait()
                aborts, self._aborts = self._aborts, set()
                aborted = [r for r in (*self._waiting, *self._running) if r.request_id in aborts]
                self._waiting = deque(r for r in self._waiting if r.request_id not in aborts)
                admitted = self._admit()
                active = [r for r in self._running if r.request_id not in aborts]
                closing = self._closed and not self._waiting and not active
            for request in aborted:
                self._finish_abort(request)
            for request in admitted:
                try:
                    self._prefill(request)
                except Exception as err:  # noqa: BLE001 - a failed request must not kill the engine
                    self._fail(request, err)
                    active.remove(request)
            try:
                self._step(active)
            except Exception as err:  # noqa: BLE001
                for request in active:
                    self._fail(request, err)
                active = []
            self._retire([r for r in active if r.finished])  # before emitting: stats() stay exact
            for request in active:
                self._emit(request, request.output())
            if closing:
                return

    def _admit(self) -> list[_Request]:
        """Move waiting requests to running, in queue order, while completion slots are free (lock held)."""
        admitted: list[_Request] = []
        if self._closed:
            return admitted
        used = sum(r.options.n for r in self._running)
        while self._waiting and (used + self._waiting[0].options.n <= self.max_num_seqs or not self._running):
            request = self._waiting.popleft()
            used += request.options.n
            self._running.append(request)
            admitted.append(request)
        return admitted

    def _retire(self, requests: Sequence[_Request]) -> None:
        if not requests:
            return
        with self._cond:
            for request in requests:
                if request in self._running:
                    self._running.remove(request)
                self._ids.discard(request.request_id)

    def _emit(self, request: _Request, item: RequestOutput | BaseException) -> None:
        try:
            request.sink(item)
        except RuntimeError:  # the caller's event loop is gone; nobody is listening
            pass

    def _fail(self, request: _Request, err: BaseException) -> None:
        """End a request whose model work raised: its generator re-raises the error."""
        request.aborted = True
        self._retire([request])
        self._emit(request, err)

    def _finish_abort(self, request: _Request) -> None:
        request.aborted = True
        for seq in request.sequences:
            if not seq.finished:
                seq.finish_reason = "abort"
                seq.caches, seq.rows = [], []
        self._retire([request])
        self._emit(request, request.output())
