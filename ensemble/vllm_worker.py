"""`EnsembleWorkerExtension`: what the vLLM engine asks its workers about the ensemble.

vLLM mixes this class into its worker class (``worker_extension_cls``); `VLLMEngine` calls its
methods on every worker with ``AsyncLLM.collective_rpc``. The ensemble counters live in the
worker process, in ``EnsembleForCausalLM.pooling_counters``; this is their way out.
"""

from __future__ import annotations

from typing import Any

QUALNAME = "ensemble.vllm_worker.EnsembleWorkerExtension"


class EnsembleWorkerExtension:
    """Methods added to vLLM's worker (``self`` is the worker)."""

    def chorus_pooling_counters(self, reset: bool = False) -> dict[str, Any] | None:
        """This worker's ensemble counters (`PoolingCounters.snapshot`), None if its model keeps
        none; `reset` zeroes them (used once, after start-up's dummy runs)."""
        counters = getattr(self.get_model(), "pooling_counters", None)  # type: ignore[attr-defined]
        return None if counters is None else counters.snapshot(reset=reset)

    def chorus_logits_form(self) -> str | None:
        """How the worker's ensemble hands its pooled rows to vLLM
        (`ensemble.vllm_model.EnsembleForCausalLM.logits_form`), None if its model is no ensemble."""
        return getattr(self.get_model(), "logits_form", None)  # type: ignore[attr-defined]
