"""`EnsembleForCausalLM`: a per-step pooled ensemble as one vLLM model.

Each member is built as *its own* vLLM model class (resolved from the member's ``config.json``
``architectures`` through vLLM's registry) under the digit-free prefix of its name, so every
member keeps its own layers, its own attention backend and its own KV cache (vLLM allocates KV
cache per attention layer name; members with sliding windows put vLLM's KV manager on its hybrid
path). One engine step runs every member over the same tokens and positions; `compute_logits`
asks every member for its logits (its own head, soft-capping, tensor-parallel gather), fits
them to the shared vocabulary and pools them with `ensemble.pooling.pool_logprobs`. The pooled
log-probabilities are returned as the logits: vLLM's sampler takes ``log_softmax`` of them,
which leaves normalised log-probabilities unchanged, so vLLM's sampling, its reported logprobs
and prompt logprobs are the pooled ones.

Raw geometric logits: when the manifest pools geometrically (``logprob_mean``, no negative
weight, no entropy gate) and no member can abstain (every member scores the whole shared
vocabulary), the rows pooled by the manifest are returned as the geometric pool's logits
``sum_k (w_k / T_k) x_k`` (`ensemble.pooling.geometric_logits`), whose ``log_softmax`` is the pooled
distribution, and the normalisation pass is left to vLLM's sampler. Where every member's head is
linear (`linear_head`) and the engine runs in float32, ``w_k / T_k`` scales member k's hidden state
before its head and the members' logits are summed in place (`logits_form`: ``"scaled_heads"``). Every operation chorus asks
of vLLM's sampler is invariant to adding a constant to a row: log-probs, temperature, top-k/p,
min-p, logit bias, presence and frequency penalties, grammars. vLLM's repetition penalty (which
scales a logit by its sign) is not, and chorus never sets it (`ensemble.vllm_translate`).

The ensemble's hidden state is the members' final hidden states side by side (the ensemble
``config.json`` sets ``hidden_size`` to their sum), so vLLM's buffers and index arithmetic on
hidden states keep working unchanged.

Weights are read from each member's own folder (the ensemble folder holds none) through vLLM's
own weight iterators, and handed to each member's ``load_weights``.

Ensemble counters (`ensemble.pooling_stats`) are kept per ``compute_logits`` call: every row it
pools counts, which beyond one row per sampled token includes prompt-logprob rows and the rows of
partial-prefill steps whose sample vLLM discards.

Per-request pooling: ``compute_logits`` sees rows, not request ids. When `VLLMEngine` installed
`ensemble.vllm_pooling.RequestPoolingTracker` (vLLM's V1 runner, no speculative decoding), the
tracker says which rows of a step's sampling call asked for their own rule and weights; those rows
are pooled by theirs, every other row (and every prompt-logprob row) by the manifest's. See
`ensemble.vllm_pooling` for how a row is matched to its request and what is not served.

Limits: no pipeline parallelism; members must be unquantized text-only causal LMs.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ensemble.manifest import EnsembleManifest, MemberSpec
from ensemble.pooling import Scratch, fit_vocab, geometric_coefficients, geometric_logits, pool_logprobs
from ensemble.pooling_stats import PoolingCounters
from ensemble.vllm_fused_head import FusedHead, fused_head_weights
from ensemble.vllm_pooling import RowPooling, active_tracker

log = logging.getLogger(__name__)

# The float32 K x rows x V pooling buffer is bounded to about this many bytes: on a GPU with a 150k
# vocabulary and many rows, e.g. prompt logprobs, it would otherwise be gigabytes
# (docs/architecture.md, "Pooling memory on a GPU").
POOL_BUFFER_BYTES = 256 * 2**20

# With a fused head (`ensemble.vllm_fused_head`), member agreement is counted on one pooled step in
# this many (those steps run the members' own heads); the others pool with the fused product.
AGREEMENT_EVERY = 16


@dataclass(frozen=True)
class _MemberPlan:
    """What the ensemble knows about one member before and after building it."""

    spec: MemberSpec
    prefix: str  # module name and vLLM layer-name prefix
    hidden_size: int


def pool_chunk_rows(num_members: int, vocab_size: int, budget_bytes: int = POOL_BUFFER_BYTES) -> int:
    """Rows pooled at once so the float32 ``K x rows x V`` buffer stays within `budget_bytes`."""
    return max(1, budget_bytes // (4 * num_members * vocab_size))


def member_vllm_config(vllm_config, hf_config, model_path: str):
    """A copy of `vllm_config` whose model config describes one member.

    Like vLLM's ``VllmConfig.with_hf_config`` (used for the text stacks of multimodal models),
    but it also replaces ``hf_text_config`` (with_hf_config keeps the parent's, which here is the
    ensemble's) and points ``model`` at the member's folder, so the member's weights load from
    there. Everything else (dtype, max_model_len, cache, parallel and compilation configs) is
    shared with the ensemble; in particular the compilation config holds the one forward context
    where every member's attention layers register.
    """
    from vllm.config.utils import replace
    from vllm.transformers_utils.config import get_hf_text_config

    model_config = copy.deepcopy(vllm_config.model_config)
    model_config.hf_config = hf_config
    model_config.hf_text_config = get_hf_text_config(hf_config)
    model_config.model = model_path
    model_config.revision = None
    model_config.model_arch_config = model_config.get_model_arch_config()
    model_config.is_submodel_config = True
    return replace(vllm_config, model_config=model_config)


def _load_member_hf_config(spec: MemberSpec, trust_remote_code: bool):
    from vllm.transformers_utils.config import get_config

    path = Path(spec.path)
    if not (path / "config.json").is_file():
        raise ValueError(f"ensemble member {spec.name!r}: {path} has no config.json")
    config = get_config(str(path), trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(
            f"ensemble member {spec.name!r} at {path} is quantized; the vLLM ensemble loads "
            "unquantized members only"
        )
    if config.get_text_config() is not config:
        raise ValueError(
            f"ensemble member {spec.name!r} at {path} is a multimodal model "
            f"({', '.join(config.architectures or [])}); use a text-only causal LM"
        )
    return config


def _chorus_manifest(hf_config, folder: str) -> EnsembleManifest:
    """The manifest in an ensemble folder's config.json (its ``chorus`` entry), member paths
    resolved against `folder`."""
    chorus = getattr(hf_config, "chorus", None)
    if not isinstance(chorus, dict):
        raise ValueError(f"{folder}: config.json has no 'chorus' manifest; build the folder with `ensemble build`")
    return EnsembleManifest.from_dict(chorus).resolved(folder)


def raw_geometric_ok(manifest: EnsembleManifest) -> bool:
    """Whether the manifest's own pooling can be returned to vLLM as raw geometric logits (module
    docstring): geometric pooling without negative weights or an entropy gate, and every member
    scoring the whole shared vocabulary (so none abstains on an id)."""
    gate = manifest.entropy_gate
    return (manifest.rule == "logprob_mean" and all(w >= 0 for w in manifest.weights)
            and (gate is None or gate.is_off)
            and all(m.vocab_size is None or m.vocab_size >= manifest.vocab_size for m in manifest.members))


def linear_head(member: nn.Module) -> bool:
    """Whether the member's head looks linear, ``compute_logits(c * h) == c * compute_logits(h)``:
    vLLM's ``LogitsProcessor`` without soft-capping (a constant logit scale is linear) over an
    ``lm_head`` without bias. A model's ``compute_logits`` can do more than call its processor
    (MiMo's normalises the hidden state first), which `scales_with_hidden` checks."""
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    processor = getattr(member, "logits_processor", None)
    head = getattr(member, "lm_head", None)
    return (isinstance(processor, LogitsProcessor) and processor.soft_cap is None
            and not processor.logits_as_input and head is not None and getattr(head, "bias", None) is None)


def scales_with_hidden(member: nn.Module, hidden_size: int, c: float, dtype: torch.dtype,
                       device: torch.device | str) -> bool:
    """Whether ``member.compute_logits(c * h)`` equals ``c * member.compute_logits(h)`` on one
    random row of large norm (so that logits reach where a soft-cap bends them); True for a rank
    that receives no logits. Once per engine, after the weights are loaded (vLLM's start-up runs)."""
    with torch.no_grad():
        h = 100.0 * torch.randn(1, hidden_size, dtype=dtype, device=device)
        plain, scaled = member.compute_logits(h), member.compute_logits(h * c)
        if plain is None or scaled is None:
            return True
        expected = plain * c
        return bool(torch.allclose(scaled, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max())))


class EnsembleForCausalLM(nn.Module):
    """K member causal LMs decoding as one: per-step pooled next-token distributions."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__()
        model_config = vllm_config.model_config
        self.config = model_config.hf_config
        self.manifest = _chorus_manifest(self.config, model_config.model)
        self.load_config = vllm_config.load_config
        vocab_size = self.manifest.vocab_size
        hf_configs = self._member_hf_configs(model_config.trust_remote_code)
        self.hidden_sizes = [int(c.get_text_config().hidden_size) for c in hf_configs]
        expected = getattr(self.config, "hidden_size", None)
        if expected != sum(self.hidden_sizes):
            raise ValueError(
                f"{model_config.model}: config.json hidden_size is {expected} but the members' "
                f"hidden sizes sum to {sum(self.hidden_sizes)}; rebuild the folder with "
                "`ensemble build`"
            )
        self._plans = self._build_members(vllm_config, prefix, hf_configs)
        self.weights = self.manifest.weights
        self.temperatures = self.manifest.temperatures
        self.rule = self.manifest.rule
        self.vocab_size = vocab_size
        self.pool_chunk_rows = pool_chunk_rows(len(self._plans), vocab_size)
        # Read (and reset after start-up's dummy runs) by `ensemble.vllm_worker`, via collective_rpc.
        self.pooling_counters = PoolingCounters([p.spec.name for p in self._plans])
        # The pool's work buffers, reused step after step, each at most one chunk of rows.
        self.scratch = Scratch(limit=self.pool_chunk_rows * vocab_size)
        # The manifest's rows as raw geometric logits, unless vLLM is asked to report logits themselves.
        self.raw_geometric = raw_geometric_ok(self.manifest) and str(
            getattr(model_config, "logprobs_mode", "raw_logprobs")).endswith("logprobs")
        # Float32 raw rows with linear member heads: each member's w_k / T_k scales its hidden state
        # before its head, and the members' logits are summed in place (`_scaled_head_logits`).
        self.head_scales = (tuple(geometric_coefficients(self.weights, self.temperatures))
                            if self.raw_geometric and model_config.dtype == torch.float32
                            and all(linear_head(m) for m in self.members()) else None)
        self._heads_checked = False  # `scales_with_hidden`, at the first call that would use head_scales
        self.fused_head: FusedHead | None = None  # built with that check, where `_fused_head` can
        self._scaled_steps = 0  # steps pooled from scaled heads, fused or not (agreement: every AGREEMENT_EVERY)
        self._ran: frozenset[int] | None = None  # the members the last forward ran (None: all)

    @property
    def logits_form(self) -> str:
        """How the manifest's rows reach vLLM: ``"fused_heads"`` (raw geometric logits as one
        product of the members' scaled hidden states and heads, side by side: `FusedHead`),
        ``"scaled_heads"`` (raw geometric logits, each member's head applied to its scaled hidden
        state), ``"raw_geometric"`` (raw geometric logits, the members' logits scaled and summed)
        or ``"log_probs"`` (the normalised pool).
        Final once vLLM's start-up runs have pooled a step (`_scaled_heads_ok`)."""
        if self.fused_head is not None:
            return "fused_heads"
        if self.head_scales is not None:
            return "scaled_heads"
        return "raw_geometric" if self.raw_geometric else "log_probs"

    def _member_hf_configs(self, trust_remote_code: bool) -> list:
        """Every member's Hugging Face config, read and checked before anything is built."""
        vocab_size = self.manifest.vocab_size
        hf_configs = []
        for spec in self.manifest.members:
            if hasattr(self, spec.name):
                raise ValueError(
                    f"ensemble member name {spec.name!r} clashes with an attribute of the "
                    "ensemble module; rename the member"
                )
            hf_config = _load_member_hf_config(spec, trust_remote_code)
            rows = hf_config.get_text_config().vocab_size
            if rows < (spec.vocab_size or vocab_size):
                raise ValueError(
                    f"ensemble member {spec.name!r} has {rows} vocabulary rows, fewer than the "
                    f"{spec.vocab_size or vocab_size} ids it must score"
                )
            hf_configs.append(hf_config)
        return hf_configs

    def _build_members(self, vllm_config, prefix: str, hf_configs: list) -> tuple[_MemberPlan, ...]:
        """Build every member's vLLM model as a submodule named after it; their plans."""
        from vllm.compilation.backends import set_model_tag
        from vllm.model_executor.model_loader.utils import initialize_model
        from vllm.model_executor.models.utils import maybe_prefix

        plans: list[_MemberPlan] = []
        self._member_configs = {}
        for spec, hf_config, hidden in zip(self.manifest.members, hf_configs, self.hidden_sizes):
            member_config = member_vllm_config(vllm_config, hf_config, spec.path)
            # A tag per member keeps the members' torch.compile graphs and caches apart.
            with set_model_tag(spec.name):
                member = initialize_model(vllm_config=member_config, prefix=maybe_prefix(prefix, spec.name))
            self.add_module(spec.name, member)
            self._member_configs[spec.name] = member_config.model_config
            plans.append(_MemberPlan(spec, spec.name, hidden))
        return tuple(plans)

    # ------------------------------------------------------------------ members

    def members(self) -> list[nn.Module]:
        """The member models, in manifest order."""
        return [getattr(self, p.prefix) for p in self._plans]

    # ------------------------------------------------------------------ forward

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Every member's input embeddings, side by side (``[tokens, sum of hidden sizes]``)."""
        return torch.cat([m.embed_input_ids(input_ids) for m in self.members()], dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Run every member over the same tokens; return their final hidden states side by side.

        When every request of the step asked for members alone (by name), only those members run
        and the others' columns are zeros: their logits are never computed, and their KV cache
        for these requests is never read (such requests carry a prefix-cache salt of their own,
        `ensemble.vllm_engine`). Under a captured full CUDA graph the capture (all members) replays."""
        if intermediate_tensors is not None:
            raise NotImplementedError("the vLLM ensemble does not support pipeline parallelism")
        if inputs_embeds is not None:
            embeds = torch.split(inputs_embeds, self.hidden_sizes, dim=-1)
        else:
            embeds = (None,) * len(self._plans)
        tracker = active_tracker()
        needed = tracker.members_needed() if tracker is not None else None
        outputs = [
            member(input_ids=input_ids, positions=positions, inputs_embeds=e) if needed is None or k in needed else None
            for k, (member, e) in enumerate(zip(self.members(), embeds))
        ]
        if needed is not None:
            ran = next(o for o in outputs if o is not None)
            outputs = [ran.new_zeros(ran.shape[0], h) if o is None else o for o, h in zip(outputs, self.hidden_sizes)]
        self._ran = needed
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)

    def member_logits(self, hidden_states: torch.Tensor,
                      scales: tuple[float, ...] | None = None) -> list[torch.Tensor] | None:
        """Each member's logits over the shared vocabulary, ids it lacks masked to ``-inf``; with
        `scales`, member k's head scores its hidden state times ``scales[k]`` (unscaled where 0).

        None on tensor-parallel ranks that do not receive gathered logits (vLLM's convention).
        """
        parts = torch.split(hidden_states, self.hidden_sizes, dim=-1)
        out: list[torch.Tensor] = []
        ran = self._ran
        for k, (plan, member, h) in enumerate(zip(self._plans, self.members(), parts)):
            if ran is not None and k not in ran:
                out.append(None)  # type: ignore[arg-type] - not run this step: no row needs it
                continue
            if scales is not None and scales[k] > 0:
                h = h * scales[k]
            logits = member.compute_logits(h)
            if logits is None:
                return None
            logits = fit_vocab(logits, self.vocab_size)
            own = plan.spec.vocab_size
            if own is not None and own < self.vocab_size:
                # The member's logits are a fresh tensor (or a view of one): mask in place.
                logits[..., own:] = float("-inf")
            out.append(logits)
        return out

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Pooled next-token log-probabilities ``[rows, vocab]`` (float32), used as logits; or, where
        `raw_geometric_ok`, the geometric pool's logits (same ``log_softmax``: module docstring)."""
        tracker = active_tracker()
        asked = tracker.rows_to_pool(hidden_states.shape[0]) if tracker is not None else None
        if not asked and self._ran is None and self._scaled_heads_ok(hidden_states):
            fused = self.fused_head is not None and self._scaled_steps % AGREEMENT_EVERY != 0
            self._scaled_steps += 1
            if fused:
                return self._fused_head_logits(hidden_states)
            return self._scaled_head_logits(hidden_states)
        logits = self.member_logits(hidden_states)
        if logits is None:
            return None
        if asked and len(asked) == hidden_states.shape[0] and all(s.alone is not None for s in asked.values()):
            alone = {s.alone for s in asked.values()}
            if len(alone) == 1:  # one member alone: its logits are the step's, as in plain vLLM
                return logits[alone.pop()].float()
            return self.pool(logits, asked)  # members alone: nothing is pooled, nothing counted
        return self.pooling_counters.timed_pool(logits, lambda: self.pool(logits, asked))

    def _scaled_heads_ok(self, hidden_states: torch.Tensor) -> bool:
        """Whether `_scaled_head_logits` serves this step: `head_scales` set and, checked at the
        first such step, every weighted member's head scaling with its hidden state
        (`scales_with_hidden`; else the scaled sum of the members' logits serves, for good)."""
        if self.head_scales is not None and not self._heads_checked:
            self._heads_checked = True
            bent = [p.spec.name for p, m, size, c in zip(self._plans, self.members(), self.hidden_sizes, self.head_scales)
                    if c > 0 and not scales_with_hidden(m, size, c, hidden_states.dtype, hidden_states.device)]
            if bent:
                log.warning("ensemble members %s: compute_logits does not scale with the hidden state; "
                            "pooling their logits instead", ", ".join(bent))
                self.head_scales = None
            else:
                self.fused_head = self._fused_head()
        return self.head_scales is not None

    def _fused_head(self) -> FusedHead | None:
        """One oneDNN product for the weighted members' heads (`ensemble.vllm_fused_head`), on a
        CPU where vLLM has oneDNN and every such head is a plain float32 matrix; else None."""
        weighted = [m for m, c in zip(self.members(), self.head_scales) if c > 0]
        if not FusedHead.available():
            return None
        weights = fused_head_weights(weighted, self.vocab_size)
        return None if weights is None else FusedHead(weights, limit=self.pool_chunk_rows * self.vocab_size)

    def _fused_head_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The manifest's raw geometric logits from the fused head: no member's own logits and no
        pool of its own, so the counters count its rows only (`PoolingCounters.count_rows`)."""
        parts = torch.split(hidden_states, self.hidden_sizes, dim=-1)
        out = self.fused_head([h * c for h, c in zip(parts, self.head_scales) if c > 0])
        self.pooling_counters.count_rows(out.shape[0])
        return out

    def _scaled_head_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The manifest's raw geometric logits ``sum_k c_k x_k`` (``c_k = w_k / T_k``) as
        ``sum_k head_k(c_k h_k)``: the coefficients scale the members' hidden states (a few hundred
        numbers per row) instead of their logits (262,144 per row at Gemma's vocabulary), and the
        sum adds into the first weighted member's fresh logits, one pass per further member, no
        buffer. Members with ``c_k = 0`` are scored unscaled, for the agreement counters only."""
        logits = self.member_logits(hidden_states, self.head_scales)
        if logits is None:
            return None
        terms = [x for x, c in zip(logits, self.head_scales) if c > 0]

        def pool() -> torch.Tensor:
            out = terms[0]
            for x in terms[1:]:
                out.add_(x)
            return out

        return self.pooling_counters.timed_pool(logits, pool)

    def pool(self, logits: list[torch.Tensor], asked: dict[int, RowPooling] | None = None) -> torch.Tensor:
        """Pool the members' `logits` with the manifest's rule and weights, except the rows in
        `asked`, each pooled with its own (`ensemble.vllm_pooling`), or, for a request of a member
        alone, that member's own logits (unnormalised: vLLM's sampler and its reported log-probs
        normalise each row, so they equal the member's log-softmax, as in plain vLLM). Rows are
        pooled in groups of one (rule, weights) each, so a row's result does not depend on the rest
        of its batch. `logits` holds None for members that did not run (only when every row is a
        member alone)."""

        def pool(rows: list[torch.Tensor], spec: RowPooling | None) -> torch.Tensor:
            if spec is None and self.raw_geometric:
                return geometric_logits(rows, self.weights, self.temperatures, scratch=self.scratch)
            rule, weights = (self.rule, self.weights) if spec is None else (spec.rule, spec.weights)
            return pool_logprobs(rows, weights, rule, self.temperatures, chunk_size=self.pool_chunk_rows,
                                 alpha=self.manifest.contrastive_alpha, gate=self.manifest.entropy_gate,
                                 scratch=self.scratch)

        if not asked:
            return pool(logits, None)
        some = next(x for x in logits if x is not None)
        groups: dict[RowPooling | None, list[int]] = {}
        for row in range(some.shape[0]):
            groups.setdefault(asked.get(row), []).append(row)
        out = torch.empty(some.shape, dtype=torch.float32, device=some.device)
        for spec, rows in groups.items():
            index = torch.tensor(rows, dtype=torch.long, device=out.device)
            if spec is not None and spec.alone is not None:  # a member alone: its own logits, as vLLM
                out[index] = logits[spec.alone].index_select(0, index).float()  # normalises them itself
            else:
                out[index] = pool([x.index_select(0, index) for x in logits], spec)
        return out

    # ------------------------------------------------------------------ weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str] | None:
        """Load every member from its own folder; return the loaded parameter names.

        vLLM's loader hands over an iterator over the *ensemble* folder, which holds no weights
        (reading it would fail with "Cannot find any model weights"); it is closed unread, and
        each member's checkpoint is read through vLLM's own weight iterators instead, honouring
        the engine's load format (safetensors / pt, multithreaded, prefetch).
        """
        from vllm.model_executor.model_loader import get_model_loader
        from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

        close = getattr(weights, "close", None)
        if callable(close):
            close()
        loader = get_model_loader(self.load_config)
        if not isinstance(loader, DefaultModelLoader):
            raise ValueError(
                f"load format {self.load_config.load_format!r} is not supported for an ensemble; "
                "use 'auto', 'safetensors' or 'pt' (or 'dummy' for random weights)"
            )
        loaded: set[str] | None = set()
        for plan, member in zip(self._plans, self.members()):
            model_config = self._member_configs[plan.prefix]
            names = member.load_weights(loader.get_all_weights(model_config, member))
            if names is None or loaded is None:
                loaded = None
            else:
                loaded |= {f"{plan.prefix}.{name}" for name in names}
        return loaded
