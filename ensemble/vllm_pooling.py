"""Per-request pooling on vLLM: which logits row asks for which pooling rule and weights.

`EnsembleForCausalLM.compute_logits` receives a batch of hidden-state rows and no request ids,
yet each request may ask for its own pooling rule and member weights (`SamplingOptions.pooling`
and ``.weights``). This module carries that choice from the request to the row:

1. `VLLMEngine` (the front end) checks the request and, when it asks for pooling other than the
   ensemble's own, puts ``{"chorus_pooling": {"rule": ..., "weights": [...]}}`` into vLLM's
   ``SamplingParams.extra_args`` (`pooling_extra_args`; weights over the *served* members, in
   pooling order). A request that asks for nothing, or for exactly the ensemble's own pooling,
   carries nothing and costs nothing.
2. `RequestPoolingTracker` is a vLLM V1 logits processor, installed by `VLLMEngine` through
   ``model_config.logits_processors``; it changes no logits. vLLM's logits-processor interface is
   its documented way from a request's ``SamplingParams`` to its row in the worker: before every
   forward pass the V1 model runner calls ``update_state`` with the requests added to, removed
   from and moved within its persistent batch, by batch index (`process_dict_updates`, as vLLM's
   own processors do). The tracker keeps ``{batch index: RowPooling}`` for the requests that asked
   for their own pooling, and nothing for the others.
3. In the same worker process, `EnsembleForCausalLM.compute_logits` asks `active_tracker()` for
   `RequestPoolingTracker.rows_to_pool`: the custom rows of this step's sampling call, or None.
   The V1 runner computes the sampling logits from ``hidden_states[logits_indices]``, one row per
   scheduled request in batch order (partial prefills included), right after ``update_state``:
   the row order every V1 logits processor relies on. So the first ``compute_logits`` after
   ``update_state`` is the sampling call and its row *i* is batch index *i*; the tracker checks
   the row count against the batch size and raises if they ever differ. The model pools the rows
   of each distinct (rule, weights) with `ensemble.pooling.pool_logprobs`, the default rows with
   the manifest's own, so a request's result never depends on who shares its batch.

Pooling happens in ``compute_logits`` and not in the processor's ``apply`` because vLLM's sampler
computes the log-probs it reports from the logits *before* any processor runs (the V1 ``Sampler``
and the V2 one alike), and applies logit bias (V1 and V2) and penalties (V2) before custom
processors: a processor that re-pooled rows would report the default pool's log-probs and apply
the bias to the wrong pool. Here the re-pooled rows are the logits vLLM sees, so logit bias,
penalties, temperature, top-k/p, grammars and reported log-probs follow exactly as for the
ensemble's own pooling, in the reference engine's order.

Not served per request (`VLLMEngine` answers 400 with the reason):

* prompt log-probs (``echo`` with ``logprobs``): vLLM computes them with further
  ``compute_logits`` calls, one per request, that say nothing about which request they score.
  Those calls pool with the ensemble's own rule, which is right for every request that did not
  ask for its own pooling, whatever shares its batch;
* speculative decoding: a drafting step scores several rows per request, and vLLM refuses custom
  logits processors beside a draft (so the tracker is not installed);
* vLLM's V2 model runner (the default on GPUs with Triton in vLLM 0.32; ``VLLM_USE_V2_MODEL_RUNNER=0``
  selects V1): it loads logits processors of another interface, reorders rows every step and
  tells processors the order only after ``compute_logits``. Its model-state hook
  (``get_model_state_cls``: ``add_request`` with the request's sampling params, ``prepare_inputs``
  with the step's ``idx_mapping``) is where a V2 version would go;
* a member the manifest weights 0: the vLLM engine does not load it (`EnsembleManifest.without_idle_members`).

Cost when no request asks for its own pooling: one Python call per step (``update_state`` with
no batch change) and one attribute test in ``compute_logits``; nothing on the device, nothing
inside CUDA graphs (``compute_logits`` runs outside them). Installing any custom logits
processor makes vLLM's V1 runner keep the requests' output token ids current every step
(``logitsprocs_need_output_token_ids``), which under async scheduling (GPUs; vLLM's CPU platform
turns it off) is a small per-step host sync, as for a request with penalties.

Tensor parallelism: every rank's worker has its own tracker and model; ranks without gathered
logits pool nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from ensemble.protocol import ALONE, POOLING_RULES

EXTRA_ARGS_KEY = "chorus_pooling"  # the key in SamplingParams.extra_args
TRACKER_QUALNAME = "ensemble.vllm_pooling:RequestPoolingTracker"  # vLLM's <module>:<class> form


@dataclass(frozen=True)
class RowPooling:
    """One request's own pooling: a rule and one weight per served member (pooling order); or,
    with `alone` set, no pooling: served member number `alone`'s own distribution at temperature 1
    (a request for that member by name; `rule` is then ``ALONE`` and `weights` empty)."""

    rule: str
    weights: tuple[float, ...]
    alone: int | None = None


def pooling_extra_args(rule: str, weights: Sequence[float]) -> dict[str, Any]:
    """``SamplingParams.extra_args`` asking for `rule` and `weights` (served members, in order)."""
    return {EXTRA_ARGS_KEY: {"rule": rule, "weights": [float(w) for w in weights]}}


def alone_extra_args(member: int) -> dict[str, Any]:
    """``SamplingParams.extra_args`` asking for served member number `member` alone."""
    return {EXTRA_ARGS_KEY: {"member": int(member)}}


def parse_row_pooling(extra_args: Mapping[str, Any] | None) -> RowPooling | None:
    """The `RowPooling` a request's ``extra_args`` ask for (None: the ensemble's own).

    ValueError if the entry is malformed. The weights' count and signs, and a member number's
    range, are checked by the front end (`ensemble.vllm_translate.request_pooling`), which knows
    the members.
    """
    if not extra_args or EXTRA_ARGS_KEY not in extra_args:
        return None
    entry = extra_args[EXTRA_ARGS_KEY]
    if isinstance(entry, Mapping) and set(entry) == {"member"}:
        member = entry["member"]
        if not isinstance(member, int) or isinstance(member, bool) or member < 0:
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}]: 'member' must be a member number, got {member!r}")
        return RowPooling(ALONE, (), alone=member)
    if not isinstance(entry, Mapping) or set(entry) != {"rule", "weights"}:
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] must be an object with 'rule' and 'weights', got {entry!r}")
    rule, weights = entry["rule"], entry["weights"]
    if rule not in POOLING_RULES:
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}]: unknown pooling rule {rule!r}")
    if not isinstance(weights, (list, tuple)) or not weights or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights
    ):
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}]: 'weights' must be a list of finite numbers, got {weights!r}")
    return RowPooling(str(rule), tuple(float(w) for w in weights))


_active: RequestPoolingTracker | None = None  # this worker process's tracker (one model runner per process)


def active_tracker() -> RequestPoolingTracker | None:
    """The tracker of this process's model runner; None where the engine installed none."""
    return _active


class RequestPoolingTracker(LogitsProcessor):
    """vLLM V1 logits processor that leaves logits alone and tracks, by persistent-batch index, the
    requests that asked for their own pooling (see the module docstring)."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        global _active
        self._rows: dict[int, RowPooling] = {}
        self._batch_size = 0
        self._sampling_call_pending = False
        _active = self

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """vLLM calls this in the front end for every request: a malformed entry is a 400."""
        parse_row_pooling(sampling_params.extra_args)

    def is_argmax_invariant(self) -> bool:
        return True  # it never changes logits (vLLM then skips `apply` for greedy batches)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Called by the V1 runner before every forward pass, after it settled the batch order."""
        self._sampling_call_pending = True
        if batch_update is not None:
            process_dict_updates(self._rows, batch_update, lambda params, _prompt, _out: parse_row_pooling(
                params.extra_args))
            self._batch_size = batch_update.batch_size

    def members_needed(self) -> frozenset[int] | None:
        """For `EnsembleForCausalLM.forward`: the served members this step's requests need, when
        every request in the batch asked for a member alone; None (all of them) otherwise."""
        if not self._rows or len(self._rows) != self._batch_size:
            return None
        alone = {spec.alone for spec in self._rows.values()}
        return None if None in alone else frozenset(alone)  # type: ignore[arg-type]

    def rows_to_pool(self, num_rows: int) -> dict[int, RowPooling] | None:
        """For `EnsembleForCausalLM.compute_logits`: ``{row: RowPooling}`` for the rows of this
        step's sampling call that asked for their own pooling, None when there are none or when
        this is not the step's first ``compute_logits`` (prompt log-probs, dummy runs)."""
        sampling_call, self._sampling_call_pending = self._sampling_call_pending, False
        if not self._rows or not sampling_call:
            return None
        if num_rows != self._batch_size:
            raise RuntimeError(
                f"per-request pooling: vLLM asked for {num_rows} logits rows in a step of {self._batch_size} "
                "requests; chorus expects one row per request (vLLM's V1 runner without speculative decoding)")
        return self._rows
