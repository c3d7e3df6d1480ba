"""The reference engine: a pooled ensemble in plain PyTorch + transformers.

Every member is an ordinary `AutoModelForCausalLM` loaded from its own folder, with its own
KV cache (a `DynamicCache` per member per completion). A request is prefilled once per member;
then, step by step, every member's next-token logits are fitted to the shared vocabulary, pooled
with `ensemble.pooling.pool_logprobs` (the request's own rule and weights), one token is sampled
(`ensemble.sampling`), checked against the stop rules (`ensemble.stopping`) and fed back to
every member. All maths is float32 by default, so this engine is the oracle the vLLM engine is
tested against: greedy tokens and log-probs must agree.

Serving: `ReferenceEngine` implements `ensemble.protocol.Engine`. A worker thread runs a FIFO
scheduler (admit waiting requests while sequence slots are free, then advance every running
completion by one token per step), so the asyncio event loop never waits on torch. Correctness
and clarity come before speed: members run one completion at a time; only the pooling and the
bookkeeping are batched.

Ensemble counters (`EngineStats` optional fields, cumulative since start, kept by
`ensemble.pooling_stats.PoolingCounters` as in the vLLM engine): every decode step times its
pooling call, and every pooled row counts, per member, whether the member's own most likely token
was the ensemble's (the pooled argmax: the chosen token under greedy decoding).
"""

from __future__ import annotations

import asyncio
import copy
import secrets
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ensemble.manifest import EnsembleManifest, MemberSpec
from ensemble.pooling import fit_vocab, mask_padded_vocab, member_logprobs, normalise_weights, pool_logprobs
from ensemble.pooling_stats import PoolingCounters
from ensemble.protocol import (
    CompletionOutput,
    EngineRequestError,
    EngineStats,
    RequestOutput,
    SamplingOptions,
    TokenLogprob,
)
from ensemble.sampling import check_options, sample_token, top_logprobs
from ensemble.stopping import StopChecker

# Echo with logprobs scores the prompt in chunks whose full-vocabulary rows take at most this much
# memory (a 8k-token prompt at a 262k vocabulary would otherwise need 8 GiB per member).
PROMPT_LOGPROBS_BYTES = 256 << 20


# ----------------------------------------------------------------------------- members


class Member:
    """One member model and how its logits map onto the shared vocabulary."""

    def __init__(self, spec: MemberSpec, vocab_size: int, model: Any, device: str | torch.device) -> None:
        self.spec = spec
        self.vocab_size = vocab_size
        self.model = model
        self.device = torch.device(device)

    @staticmethod
    def load_model(path: str, device: str | torch.device, dtype: torch.dtype) -> Any:
        """A member's Hugging Face causal LM, in eval mode on `device`."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()

    def shared_logits(self, logits: Tensor) -> Tensor:
        """Fit ``[T, V_member]`` logits to the shared vocabulary, masking ids the member lacks."""
        x = fit_vocab(logits, self.vocab_size)
        if self.spec.vocab_size is not None and self.spec.vocab_size < self.vocab_size:
            x = mask_padded_vocab(x, self.spec.vocab_size)
        return x

    @torch.inference_mode()
    def forward(self, token_ids: Sequence[int], cache: Any | None, all_positions: bool = False) -> tuple[Tensor, Any]:
        """Run `token_ids` after `cache` (None: a fresh sequence); return (logits, cache).

        The logits are ``[T, vocab]`` over the shared vocabulary for every position when
        `all_positions`, else ``[1, vocab]`` for the last one.
        """
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=0 if all_positions else 1
        )
        return self.shared_logits(out.logits[0]), out.past_key_values


def load_members(manifest: EnsembleManifest, device: str | torch.device, dtype: torch.dtype) -> list[Member]:
    """The manifest's members in order; members reading the same folder share one set of weights
    (each keeps its own caches)."""
    models: dict[str, Any] = {}
    for spec in manifest.members:
        if spec.path not in models:
            models[spec.path] = Member.load_model(spec.path, device, dtype)
    return [Member(spec, manifest.vocab_size, models[spec.path], device) for spec in manifest.members]


# ----------------------------------------------------------------------------- request state


@dataclass
class _Sequence:
    """One of a request's `n` completions."""

    index: int
    caches: list[Any]
    generator: torch.Generator
    checker: StopChecker
    rows: list[Tensor]  # each member's logits [V] for the next token
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=list(self.token_ids),
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason,  # type: ignore[arg-type]
            stop_reason=self.stop_reason,
        )


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    options: SamplingOptions
    rule: str
    weights: tuple[float, ...]
    sink: Callable[[RequestOutput | BaseException], None]
    sequences: list[_Sequence] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    aborted: bool = False

    @property
    def finished(self) -> bool:
        return self.aborted or (bool(self.sequences) and all(s.finished for s in self.sequences))

    def output(self) -> RequestOutput:
        if self.sequences:
            outputs = [s.output() for s in self.sequences]
        else:  # not prefilled yet (aborted while waiting)
            reason = "abort" if self.aborted else None
            outputs = [CompletionOutput(i, "", [], finish_reason=reason) for i in range(self.options.n)]
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=list(self.prompt),
            outputs=outputs,
            finished=self.finished,
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
        )


# ----------------------------------------------------------------------------- the engine


class ReferenceEngine:
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
        self.info: dict[str, Any] = {
            "engine": "reference",
            "members": [
                {"name": m.name, "path": m.path, "weight": m.weight, "temperature": m.temperature}
                for m in self.manifest.members
            ],
            "rule": self.manifest.rule,
            "weights": list(self.manifest.weights),
            "vocab_size": self.manifest.vocab_size,
            "max_model_len": self.max_model_len,
            "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
            "dtype": str(dtype).removeprefix("torch."),
        }
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
            self._waiting.append(request)
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
        """Move waiting requests to running, FIFO, while completion slots are free (lock held)."""
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

    # ------------------------------------------------------------------ model work

    def _prefill(self, request: _Request) -> None:
        """Run the prompt through every member and set up the request's `n` completions."""
        options = request.options
        if options.prompt_logprobs is not None:
            caches, rows = self._prefill_with_prompt_logprobs(request)
        else:
            caches, rows = [], []
            for member in self.members:
                logits, cache = member.forward(request.prompt, None)
                caches.append(cache)
                rows.append(logits[-1])
        special = self.manifest.special_tokens
        max_new = min(options.max_tokens, max(1, self.max_model_len - len(request.prompt)))
        base_seed = options.seed if options.seed is not None else secrets.randbits(62)
        for i in range(options.n):
            request.sequences.append(
                _Sequence(
                    index=i,
                    caches=caches if i == options.n - 1 else [copy.deepcopy(c) for c in caches],
                    generator=torch.Generator().manual_seed(base_seed + i),
                    checker=StopChecker(self.tokenizer, options, special.eos, special.eot, max_new),
                    rows=list(rows),
                    logprobs=[] if options.logprobs is not None or options.member_logprobs else None,
                )
            )

    def _pool(self, member_rows: list[Tensor], requests: Sequence[_Request]) -> Tensor:
        """Pool ``[N, V]`` rows per member, row i belonging to requests[i] (its rule and weights)."""
        device = member_rows[0].device
        out = torch.empty(member_rows[0].shape, dtype=torch.float32, device=device)
        for rule in sorted({r.rule for r in requests}):
            idx = [i for i, r in enumerate(requests) if r.rule == rule]
            index = torch.tensor(idx, dtype=torch.long, device=device)
            weights = torch.tensor([requests[i].weights for i in idx], dtype=torch.float32, device=device)
            out[index] = pool_logprobs(
                [rows[index] for rows in member_rows], weights, rule,  # type: ignore[arg-type]
                temperatures=self.manifest.temperatures, alpha=self.manifest.contrastive_alpha,
            )
        return out.cpu()

    def _token_logprob(self, pooled: Tensor, token: int, k: int | None, member_rows: list[Tensor] | None) -> TokenLogprob:
        members = None
        if member_rows is not None:
            members = {
                m.spec.name: float(member_logprobs(row, m.spec.temperature)[token])
                for m, row in zip(self.members, member_rows)
            }
        return TokenLogprob(token, float(pooled[token]), top_logprobs(pooled, k or 0), members)

    def prompt_chunk_tokens(self) -> int:
        """Prompt positions whose full-vocabulary rows (every member's) fit `PROMPT_LOGPROBS_BYTES`."""
        row_bytes = 4 * self.manifest.vocab_size * (len(self.members) + 1)  # members' rows and the pooled one
        return max(1, PROMPT_LOGPROBS_BYTES // row_bytes)

    def _prefill_with_prompt_logprobs(self, request: _Request) -> tuple[list[Any], list[Tensor]]:
        """Prefill `request`'s prompt chunk by chunk, scoring each chunk's positions as it goes (echo
        with logprobs): memory stays at one chunk's rows, not ``[prompt length, vocabulary]`` per
        member. Returns the members' caches and last rows; sets ``request.prompt_logprobs``."""
        prompt = request.prompt
        chunk = self.prompt_chunk_tokens()
        want_members = request.options.member_logprobs
        caches: list[Any] = [None] * len(self.members)
        rows: list[Tensor] = []
        result: list[TokenLogprob | None] = [None]
        for start in range(0, len(prompt), chunk):
            piece = prompt[start:start + chunk]
            logits = []
            for k, member in enumerate(self.members):
                out, caches[k] = member.forward(piece, caches[k], all_positions=True)
                logits.append(out)
            scored = min(len(piece), len(prompt) - 1 - start)  # rows that predict a prompt token
            if scored > 0:
                pooled = self._pool([x[:scored] for x in logits], [request] * scored)
                for pos in range(scored):
                    member_rows = [x[pos] for x in logits] if want_members else None
                    result.append(self._token_logprob(pooled[pos], prompt[start + pos + 1],
                                                      request.options.prompt_logprobs, member_rows))
            rows = [x[-1] for x in logits]
        request.prompt_logprobs = result
        return caches, rows

    def _step(self, requests: Sequence[_Request]) -> None:
        """Advance every unfinished completion of `requests` by one token."""
        seqs = [(r, s) for r in requests for s in r.sequences if not s.finished]
        if not seqs:
            return
        member_rows = [torch.stack([s.rows[k] for _, s in seqs]) for k in range(len(self.members))]
        pooled = self._counters.timed_pool(member_rows, lambda: self._pool(member_rows, [r for r, _ in seqs]))
        for i, (request, seq) in enumerate(seqs):
            options = request.options
            token = sample_token(pooled[i], options, seq.token_ids, seq.generator)
            if seq.logprobs is not None:
                rows = [m[i] for m in member_rows] if options.member_logprobs else None
                seq.logprobs.append(self._token_logprob(pooled[i], token, options.logprobs, rows))
            seq.token_ids.append(token)
            decision = seq.checker.check(seq.token_ids)
            seq.text = decision.text
            if decision.finished:
                seq.finish_reason, seq.stop_reason = decision.finish_reason, decision.stop_reason
                seq.caches, seq.rows = [], []
                continue
            for k, member in enumerate(self.members):
                logits, seq.caches[k] = member.forward([token], seq.caches[k])
                seq.rows[k] = logits[-1]
