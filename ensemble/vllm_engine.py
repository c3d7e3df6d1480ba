"""`VLLMEngine`: the `ensemble.protocol.Engine` contract on top of vLLM's `AsyncLLM`.

vLLM loads the ensemble folder as one model (`ensemble.vllm_model.EnsembleForCausalLM`, found
through the ``vllm.general_plugins`` entry point), so this file only starts vLLM (with the arguments
`ensemble.vllm_engine_args` builds) and relays:
requests (translated by `ensemble.vllm_translate`: our `SamplingOptions` to vLLM's
`SamplingParams`, vLLM's delta outputs to our cumulative `RequestOutput`), aborts, load
statistics (from a stat logger that keeps vLLM's latest `SchedulerStats` and sums its
prefix-cache counters) and shutdown.

Ensemble counters (rows pooled, member agreement, pooling time) are kept by the model in the
worker process; a `ensemble.vllm_worker` extension reads them back with ``collective_rpc``: once
before the first request (resetting what start-up's dummy runs counted), then every
`COUNTERS_POLL_S` seconds in the background, so `stats()` (synchronous) reports the latest.

Per-request pooling (a request's own rule and member weights, negative ones included): vLLM's
``compute_logits`` sees a batch of rows, not requests, so the engine installs
`ensemble.vllm_pooling.RequestPoolingTracker`, a V1 logits processor that tells the model which
row asked for what (see that module); requests carry their pooling in ``SamplingParams.extra_args``
(`ensemble.vllm_translate.request_pooling`) and share batches with every other request. It is
not installed with speculative decoding or vLLM's V2 model runner; such an engine, like every
engine for prompt log-probs with per-request pooling, answers those requests with
`EngineRequestError` (400) saying why. A member of weight 0 in the manifest (one `ensemble fit`
dropped) is neither loaded nor run, so a request that weights it gets a 400 naming it.
Per-member log-probs are not reported (400).

Start-up takes 15-40 s on a CPU (vLLM starts an engine-core and a worker process), so scripts
using this engine need an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ensemble.manifest import EnsembleManifest
from ensemble.pooling_stats import driver_snapshot
from ensemble.protocol import EngineRequestError, EngineStats, RequestOutput, SamplingOptions, engine_info
from ensemble.sampling import check_options, is_greedy
from ensemble.vllm_engine_args import (  # noqa: F401 (re-exported)
    SMALL_CPU_CORES,
    VLLMEngineConfig,
    build_engine_args,
    engine_dtype,
    engine_process_openmp,
    reserved_cpu_cores,
    whole_prefills_on_cpu,
)
from ensemble.vllm_pooling import TRACKER_QUALNAME
from ensemble.vllm_translate import OutputTranslator, request_pooling, sampling_params

COUNTERS_POLL_S = 1.0  # how often the ensemble counters are read back from the workers

log = logging.getLogger(__name__)


def _stats_logger_factory(box: dict[str, Any]):
    """A vLLM stat-logger factory whose loggers keep the latest `SchedulerStats` in `box`, and
    the prefix-cache queries and hits (tokens) and the speculative drafts summed over all of them."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LatestSchedulerStats(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                box["latest"] = scheduler_stats
                prefix = scheduler_stats.prefix_cache_stats  # this interval's tokens, as vLLM counts them
                if prefix is not None:
                    box["prefix_cache_queries"] = box.get("prefix_cache_queries", 0) + int(prefix.queries)
                    box["prefix_cache_hits"] = box.get("prefix_cache_hits", 0) + int(prefix.hits)
                spec = scheduler_stats.spec_decoding_stats  # this interval's drafts, when drafting
                if spec is not None:
                    for key, value in (("spec_decode_drafts", spec.num_drafts),
                                       ("spec_decode_draft_tokens", spec.num_draft_tokens),
                                       ("spec_decode_accepted_tokens", spec.num_accepted_tokens)):
                        box[key] = box.get(key, 0) + int(value)

        def log_engine_initialized(self) -> None:
            pass

    return LatestSchedulerStats


def request_pooling_unavailable(vllm_config: Any) -> str | None:
    """Why an engine of `vllm_config` cannot pool per request (None: it can, once the tracker is
    installed): see `ensemble.vllm_pooling`."""
    if vllm_config.speculative_config is not None:
        return ("it decodes speculatively (a drafting step scores several rows per request, and vLLM runs no "
                "custom logits processor beside a draft)")
    if vllm_config.use_v2_model_runner:
        return ("it runs vLLM's V2 model runner, which the request-pooling tracker does not support yet "
                "(VLLM_USE_V2_MODEL_RUNNER=0 selects the V1 runner)")
    return None


def _speculative_info(spec: Any, draft_member: str | None, sampling: bool) -> dict[str, Any] | None:
    """How the engine drafts (/v1/models `speculative`; `sampling`: whether it serves sampled
    requests while drafting), or None when it does not.

    ``num_speculative_tokens_per_batch_size`` is vLLM's batch-size schedule as
    ``[first, last, tokens]`` rows (both ends inclusive; `--draft-max-batch` or a
    `--speculative-config` that sets it), or None when every step drafts
    ``num_speculative_tokens``."""
    if spec is None:
        return None
    schedule = getattr(spec, "num_speculative_tokens_per_batch_size", None)
    return {"method": str(spec.method), "draft_member": draft_member,
            "num_speculative_tokens": int(spec.num_speculative_tokens),
            "num_speculative_tokens_per_batch_size": (None if schedule is None
                                                      else [[int(v) for v in row] for row in schedule]),
            "sampling": sampling}


class VLLMEngine:
    """An ensemble served by vLLM (continuous batching, paged KV cache, tensor parallelism)."""

    def __init__(self, config: VLLMEngineConfig) -> None:
        self.config = config
        self.manifest = EnsembleManifest.load(config.folder)
        # The weights are fixed here, so members of weight 0 are neither loaded nor run.
        self.served = self.manifest.without_idle_members()
        args = build_engine_args(config, self.manifest, self.served)
        self.dtype = args.dtype
        self._stats: dict[str, Any] = {}
        self._counters: dict[str, Any] | None = None  # the workers' latest ensemble counters
        self._counters_lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None
        self._llm = self._start(args)
        self._active: set[str] = set()
        self.model_name = self.manifest.name
        self.max_model_len = int(self._llm.model_config.max_model_len)
        self.max_num_seqs = int(self._llm.vllm_config.scheduler_config.max_num_seqs)  # the server's admission cap
        self.tokenizer = self._llm.get_tokenizer()
        self.info = self._describe()
        self._greedy_only_drafts = bool(self.info["speculative"]) and not self.info["speculative"]["sampling"]

    def _start(self, args: Any) -> Any:
        """``AsyncLLM.from_engine_args``, with the request-pooling tracker added where it can work
        (`pooling_unavailable` says why not) and a stat logger that fills `_stats`."""
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        with engine_process_openmp(self.config):  # LD_PRELOAD for the engine's processes only
            vllm_config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
            self.pooling_unavailable = request_pooling_unavailable(vllm_config)
            if self.pooling_unavailable is None:
                model_config = vllm_config.model_config
                model_config.logits_processors = [*(model_config.logits_processors or ()), TRACKER_QUALNAME]
            return AsyncLLM.from_vllm_config(
                vllm_config, stat_loggers=[_stats_logger_factory(self._stats)],
                enable_log_requests=args.enable_log_requests, disable_log_stats=args.disable_log_stats)

    def _describe(self) -> dict[str, Any]:
        """`info`: the members, the pooling and the vLLM settings that shape serving (/v1/models)."""
        from vllm.platforms import current_platform

        vllm_config = self._llm.vllm_config
        return engine_info(
            "vllm", self.manifest, self.tokenizer, max_model_len=self.max_model_len, dtype=self._llm.model_config.dtype,
            tensor_parallel_size=self.config.tensor_parallel_size,
            per_request_pooling=self.pooling_unavailable is None,
            served_members=[m.name for m in self.served.members],
            # each one alone, by name (through the request-pooling tracker)
            servable_members=[m.name for m in self.served.members] if self.pooling_unavailable is None else [],
            max_num_seqs=self.max_num_seqs,
            prefix_caching=bool(vllm_config.cache_config.enable_prefix_caching),
            scheduling_policy=str(vllm_config.scheduler_config.policy),
            # vLLM's grammar backend for structured outputs ("auto": xgrammar, guidance as fallback)
            structured_outputs=str(vllm_config.structured_outputs_config.backend),
            # vLLM 0.32's CPU kernels verify greedy drafts exactly but skew sampled ones toward the
            # draft (measured without chorus: tests/ensemble/test_speculative.py), so a CPU engine
            # that drafts serves greedy requests only.
            speculative=_speculative_info(vllm_config.speculative_config, self.config.draft_member,
                                          sampling=not current_platform.is_cpu()),
        )

    @classmethod
    def from_folder(cls, folder: str | Path, **kwargs: Any) -> VLLMEngine:
        """Start vLLM on `folder`; keyword arguments are `VLLMEngineConfig` fields."""
        return cls(VLLMEngineConfig(folder=str(folder), **kwargs))

    async def generate(
        self, prompt_token_ids: list[int], options: SamplingOptions, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Start a request and yield its cumulative state until `finished` is True."""
        from vllm.exceptions import VLLMClientError

        if self._llm is None:
            raise RuntimeError("the engine has been shut down")
        if request_id in self._active:
            raise EngineRequestError(f"request id {request_id!r} is already in flight")
        pooling = request_pooling(options, self.manifest, self.served, self.pooling_unavailable)
        check_options(options, self.manifest.vocab_size)  # the reference engine's checks, its messages
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise EngineRequestError("the prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.manifest.vocab_size]
        if bad:
            raise EngineRequestError(f"prompt token id {bad[0]} is outside the vocabulary of {self.manifest.vocab_size}")
        if self._greedy_only_drafts and not is_greedy(options):
            raise EngineRequestError(
                f"temperature {options.temperature}: this server drafts with a member (--draft-member), and on a "
                "CPU vLLM 0.32's speculative sampler does not keep the target distribution (docs/architecture.md, "
                "'Speculative decoding'); send temperature 0, or serve without --draft-member")
        params = sampling_params(options, extra_args=pooling)
        if options.priority and self.info["scheduling_policy"] != "priority":
            raise EngineRequestError(f"'priority' {options.priority} needs an engine started with "
                                     "--scheduling-policy priority (this one schedules first come, first served)")
        translator = OutputTranslator(request_id, prompt, options)
        await self._start_counters()
        inputs: dict[str, Any] = {"prompt_token_ids": prompt}
        if options.member is not None:
            # A step of member requests alone runs only those members (`ensemble.vllm_model`), so the
            # other members' KV of their blocks is never written: a salt of their own keeps those
            # blocks out of every other request's prefix-cache hits.
            inputs["cache_salt"] = f"chorus-member-{options.member}"
        stream = self._llm.generate(inputs, params, request_id, priority=options.priority)
        self._active.add(request_id)
        try:
            async for out in stream:
                yield translator.update(out)
        except (VLLMClientError, ValueError) as err:
            raise EngineRequestError(str(err)) from None
        finally:
            self._active.discard(request_id)
            await stream.aclose()

    async def check_health(self) -> None:
        """Raise when the engine cannot serve: shut down, or vLLM's engine core process has died
        (`AsyncLLM.check_health` raises vLLM's EngineDeadError)."""
        if self._llm is None:
            raise RuntimeError("the engine has been shut down")
        await self._llm.check_health()

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its KV cache; its generator ends with finish_reason 'abort'."""
        if self._llm is not None:
            await self._llm.abort(request_id)

    def stats(self) -> EngineStats:
        """Running / waiting requests and KV-cache usage from vLLM's latest scheduler stats, and
        the ensemble counters as last read from the workers (None before the first request).

        The counters are per pooled row of ``compute_logits`` (see `ensemble.vllm_model`): a
        member agrees on a row when its top-1 token is the pooled top-1.
        """
        counters = {**(self._counters or {}), "prefix_cache_queries": self._stats.get("prefix_cache_queries", 0),
                    "prefix_cache_hits": self._stats.get("prefix_cache_hits", 0)}
        if self.info.get("speculative"):
            for key in ("spec_decode_drafts", "spec_decode_draft_tokens", "spec_decode_accepted_tokens"):
                counters[key] = self._stats.get(key, 0)
        latest = self._stats.get("latest")
        if latest is None:
            return EngineStats(num_running=0, num_waiting=0, kv_cache_usage=0.0, **counters)
        return EngineStats(
            num_running=int(latest.num_running_reqs),
            num_waiting=int(latest.num_waiting_reqs + latest.num_skipped_waiting_reqs),
            kv_cache_usage=float(latest.kv_cache_usage),
            **counters,
        )

    async def _start_counters(self) -> None:
        """Before the first request: zero the counters of start-up's dummy runs, start polling."""
        if self._poller is not None:
            return
        async with self._counters_lock:
            if self._poller is not None or self._llm is None:
                return
            try:
                await self._llm.collective_rpc("chorus_pooling_counters", kwargs={"reset": True})
            except Exception:  # noqa: BLE001 - serving goes on without the counters
                log.warning("could not reset the ensemble counters in the vLLM workers", exc_info=True)
            self._poller = asyncio.get_running_loop().create_task(self._poll_counters(), name="chorus-counters")

    async def refresh_counters(self) -> None:
        """Read the ensemble counters back from the workers now (`stats()` then shows them)."""
        if self._llm is not None:
            self._counters = driver_snapshot(await self._llm.collective_rpc("chorus_pooling_counters"))

    async def _poll_counters(self) -> None:
        """Read the workers' ensemble counters every `COUNTERS_POLL_S` seconds until shutdown."""
        warned = False
        while self._llm is not None:
            try:
                await self.refresh_counters()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - metrics must never take serving down
                if not warned:
                    log.warning("could not read the ensemble counters from the vLLM workers", exc_info=True)
                    warned = True
            await asyncio.sleep(COUNTERS_POLL_S)

    async def shutdown(self) -> None:
        """Abort everything in flight and stop vLLM's processes (idempotent)."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        if self._poller is not None:
            self._poller.cancel()
        if self._active:
            await llm.abort(list(self._active))
        llm.shutdown()
        # Drop the last reference now: AsyncLLM.__del__ shuts down again, which at interpreter
        # exit (modules half torn down) only prints a TypeError.
        del llm
