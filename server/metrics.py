"""Prometheus metrics under vLLM's names (so vLLM dashboards work) plus chorus' own.

Everything lives in one registry owned by the app (never the global default registry, so several
apps in one process, as in tests, do not collide). Labels follow vLLM: `model_name` and `engine`
(always "0": one engine per server).

vLLM names exported (all measured by the server around the engine):
  vllm:num_requests_running, vllm:num_requests_waiting, vllm:kv_cache_usage_perc  (engine.stats()
      at scrape time; "waiting" adds requests queued by the server's admission control),
  vllm:prompt_tokens_total, vllm:generation_tokens_total, vllm:request_success_total{finished_reason},
  vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds, vllm:e2e_request_latency_seconds,
  vllm:admission_rejections_total{reason}  (max_num_queued_reqs; too_many_refusals: server.refusals),
  vllm:prefix_cache_queries_total, vllm:prefix_cache_hits_total  (tokens; from vLLM's scheduler
      stats, exported when the engine reports them: the vllm engine does),
  vllm:spec_decode_num_drafts_total, vllm:spec_decode_num_draft_tokens_total,
  vllm:spec_decode_num_accepted_tokens_total  (the same, only while the engine drafts).
chorus names:
  chorus:requests_aborted_total{reason}  (client_disconnect, slow_client, timeout, shutdown, engine_dead,
  error),
  chorus:member_chosen_logprob{member}  (histogram of each member's log-prob of the pooled choice,
      when a request asked for member log-probs),
  chorus:pooled_tokens_total, chorus:agreement_rows_total, chorus:member_agreement_total{member},
      chorus:member_agreement_ratio{member}  (next-token distributions pooled; of those, the ones
      member agreement was counted on (all, except on vLLM with a fused head: one step in 16,
      `ensemble.pooling_stats`); and on how many of those each member's own most likely token was
      the ensemble's), chorus:pooling_time_seconds (summary: _sum, _count)  -- read at
      scrape time from the optional `EngineStats` fields below (both engines report them; see
      `ensemble.pooling_stats`), exported only when the engine reports them.

Optional ensemble counters an engine may add to its `EngineStats` (all cumulative since start):
  pooled_tokens: int, agreement_rows: int, member_agreement: dict[member name, int], pooling_seconds: float,
  pooling_steps: int, prefix_cache_queries: int, prefix_cache_hits: int, spec_decode_drafts: int,
  spec_decode_draft_tokens: int, spec_decode_accepted_tokens: int.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from ensemble.protocol import EngineStats

log = logging.getLogger("chorus.server")

# vLLM's bucket boundaries (vllm/v1/metrics/buckets.py, vLLM 0.32).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
LOGPROB_BUCKETS = (-20.0, -10.0, -5.0, -3.0, -2.0, -1.0, -0.5, -0.25, -0.1, -0.01, 0.0)
FINISH_REASONS = ("stop", "length", "abort")
ABORT_REASONS = ("client_disconnect", "slow_client", "timeout", "shutdown", "engine_dead", "error")


class _EngineLoadCollector(Collector):
    """Gauges read from the engine (and the admission queue) at scrape time."""

    def __init__(self, model_name: str, load: Callable[[], tuple[EngineStats, int] | None]) -> None:
        self.labels = [model_name, "0"]
        self.load = load

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            current = self.load()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the engine is going away
            log.warning("cannot read the engine's stats for /metrics", exc_info=True)
            current = None
        stats, queued = current if current is not None else (EngineStats(0, 0, 0.0), 0)
        names = ["model_name", "engine"]
        running = GaugeMetricFamily("vllm:num_requests_running",
                                    "Number of requests in model execution batches.", labels=names)
        running.add_metric(self.labels, stats.num_running)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting",
                                    "Number of requests waiting to be processed (engine queue plus "
                                    "the server's admission queue).", labels=names)
        waiting.add_metric(self.labels, stats.num_waiting + queued)
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                               labels=names)
        kv.add_metric(self.labels, stats.kv_cache_usage)
        return [running, waiting, kv, *ensemble_families(self.labels[0], stats)]


def ensemble_families(model_name: str, stats: object) -> list:
    """Metric families for the optional counters of `stats` (ensemble and prefix cache; none when it has none)."""
    families: list = []
    pooled = getattr(stats, "pooled_tokens", None)
    agreement = getattr(stats, "member_agreement", None)
    if isinstance(pooled, int):
        total = CounterMetricFamily(
            "chorus:pooled_tokens",
            "Next-token distributions pooled (one per sampled token; on vLLM also prompt-logprob rows).",
            labels=["model_name"])
        total.add_metric([model_name], pooled)
        families.append(total)
        counted = getattr(stats, "agreement_rows", None)
        counted = counted if isinstance(counted, int) else pooled  # an engine that counts every row
        rows = CounterMetricFamily("chorus:agreement_rows", "Pooled distributions member agreement was counted on.",
                                   labels=["model_name"])
        rows.add_metric([model_name], counted)
        families.append(rows)
        if isinstance(agreement, dict) and agreement:
            agree = CounterMetricFamily(
                "chorus:member_agreement",
                "Pooled distributions whose most likely token was also the member's own.",
                labels=["model_name", "member"])
            ratio = GaugeMetricFamily(
                "chorus:member_agreement_ratio",
                "Share of the distributions agreement was counted on whose most likely token was the "
                "member's own (0 before any).",
                labels=["model_name", "member"])
            for member, count in agreement.items():
                agree.add_metric([model_name, str(member)], count)
                ratio.add_metric([model_name, str(member)], count / counted if counted else 0.0)
            families += [agree, ratio]
    for name, text in (("prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."),
                       ("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")):
        value = getattr(stats, name, None)
        if isinstance(value, int):
            family = CounterMetricFamily(f"vllm:{name}", text, labels=["model_name", "engine"])
            family.add_metric([model_name, "0"], value)
            families.append(family)
    for name, text in (("spec_decode_num_drafts", "Number of spec decoding drafts."),
                       ("spec_decode_num_draft_tokens", "Number of draft tokens."),
                       ("spec_decode_num_accepted_tokens", "Number of accepted tokens.")):
        value = getattr(stats, name.replace("_num_", "_"), None)
        if isinstance(value, int):
            family = CounterMetricFamily(f"vllm:{name}", text, labels=["model_name", "engine"])
            family.add_metric([model_name, "0"], value)
            families.append(family)
    seconds = getattr(stats, "pooling_seconds", None)
    steps = getattr(stats, "pooling_steps", None)
    if isinstance(seconds, (int, float)) and isinstance(steps, int):
        timing = SummaryMetricFamily("chorus:pooling_time_seconds",
                                     "Time spent pooling member distributions, per engine step.",
                                     labels=["model_name"])
        timing.add_metric([model_name], count_value=steps, sum_value=float(seconds))
        families.append(timing)
    return families


class ServerMetrics:
    """All metrics of one server, in their own registry."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self._load: Callable[[], tuple[EngineStats, int] | None] = lambda: None
        self.registry.register(_EngineLoadCollector(model_name, lambda: self._load()))
        names = ["model_name", "engine"]
        lv = (model_name, "0")
        reg = self.registry
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                                     names, registry=reg).labels(*lv)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                         names, registry=reg).labels(*lv)
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          names + ["finished_reason"], registry=reg)
        self.request_success = {r: success.labels(*lv, r) for r in FINISH_REASONS}
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              names, buckets=TTFT_BUCKETS, registry=reg).labels(*lv)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             names, buckets=ITL_BUCKETS, registry=reg).labels(*lv)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.",
                             names, buckets=REQUEST_LATENCY_BUCKETS, registry=reg).labels(*lv)
        rejections = Counter("vllm:admission_rejections",
                             "Number of admission attempts rejected by a queue limit, by reason.",
                             ["model_name", "reason"], registry=reg)
        self.queue_rejections = rejections.labels(model_name, "max_num_queued_reqs")
        self.refusal_rejections = rejections.labels(model_name, "too_many_refusals")  # server.refusals
        aborted = Counter("chorus:requests_aborted", "Engine requests aborted by the server, by reason.",
                          ["model_name", "reason"], registry=reg)
        self.aborted = {r: aborted.labels(model_name, r) for r in ABORT_REASONS}
        self._member_logprob = Histogram("chorus:member_chosen_logprob",
                                         "Each member's log-prob of the token the ensemble chose.",
                                         ["model_name", "member"], buckets=LOGPROB_BUCKETS, registry=reg)

    def set_load_source(self, load: Callable[[], tuple[EngineStats, int] | None]) -> None:
        """Where the gauges read (engine stats, server queue length) from at scrape time."""
        self._load = load

    def record_finish(self, reason: str | None) -> None:
        """Count one finished completion by its finish reason."""
        counter = self.request_success.get(reason or "abort")
        if counter is not None:
            counter.inc()

    def record_member_logprobs(self, member_logprobs: dict[str, float]) -> None:
        """Observe each member's log-prob of one pooled choice."""
        for member, lp in member_logprobs.items():
            self._member_logprob.labels(self.model_name, member).observe(lp)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
