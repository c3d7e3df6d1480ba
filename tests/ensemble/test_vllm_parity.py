"""The vLLM ensemble engine against the reference engine, on tiny random members.

Each ensemble gets exactly one vLLM engine (`vllm_harness.run_engine`, module-scoped fixtures):
a batch of prompts of different lengths, greedy, with generated and prompt log-probs. The same
requests go to `ensemble.reference.ReferenceEngine` (transformers members, float32): the tokens
must be identical and every log-prob within 1e-4. The Llama + Qwen2 engine also answers probes
of the adapter's own behaviour (abort, stats, seeds, stop ids, request errors), and serves one batch
of concurrent requests that each pool their own way (per-request rule and weights, a negative
weight, a one-hot weight), checked against the reference engine token for token.

Timing on 2 CPU cores: 35-50 s per vLLM start (two spawned processes importing vLLM, and a 5 s
shutdown), a few seconds of decoding; the default part (four vLLM starts) takes about 3-4 minutes.
The tensor-parallel test (slow mark) adds one start with two workers, about 40-55 s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import pytest
from vllm_harness import (
    MAX_MODEL_LEN,
    MAX_TOKENS,
    TOL,
    TOP,
    EngineRun,
    collect,
    compare,
    counter_deltas,
    greedy,
    run_engine,
    run_plain_vllm,
    run_reference,
)

from ensemble.protocol import EngineRequestError, RequestOutput, SamplingOptions

pytestmark = pytest.mark.vllm

TEXTS = (
    "Hello",
    "The quick brown fox jumps over the lazy dog, and then",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the "
    "slings and arrows of outrageous fortune",
)


async def _probe(engine, prompts: list[list[int]]) -> dict[str, object]:
    """Exercise abort, stats, sampling options and request errors on a running engine."""
    probes: dict[str, object] = {}
    # Abort mid-generation: the stream ends with finish_reason 'abort' and frees the KV cache.
    seen: list[RequestOutput] = []
    running = None
    async for out in engine.generate(prompts[1], SamplingOptions(max_tokens=60, ignore_eos=True), "abort-me"):
        seen.append(out)
        if len(out.outputs[0].token_ids) >= 2 and running is None:
            running = engine.stats()
            await engine.abort("abort-me")
    probes["abort_outputs"] = seen
    probes["stats_running"] = running
    await asyncio.sleep(0.2)
    probes["stats_idle"] = engine.stats()
    # n > 1 with a seed: n completions, reproducible.
    sampled = SamplingOptions(n=3, max_tokens=6, temperature=1.0, seed=1234, ignore_eos=True)
    a = (await collect(engine, prompts[2], sampled, "seed-a"))[-1]
    b = (await collect(engine, prompts[2], sampled, "seed-b"))[-1]
    probes["seeded"] = (a, b)
    # Two seeded prompts that do not fit one step's token budget together (96 tokens, pair_run's):
    # vLLM 0.32 would split one across steps and kill the engine rewinding its CPU generator.
    long_prompt = (prompts[2] * 8)[:60]
    runs = await asyncio.gather(*(
        collect(engine, long_prompt, SamplingOptions(max_tokens=3, temperature=1.0, seed=s, ignore_eos=True),
                f"seeded-long-{s}") for s in (1, 2)))
    probes["seeded_long"] = [r[-1].outputs[0].token_ids for r in runs]
    # Stop at a token id: the third greedy token of prompt 0 ends the completion where it first appears.
    greedy = (await collect(engine, prompts[0], SamplingOptions(max_tokens=8, temperature=0.0), "greedy"))[-1]
    stop = greedy.outputs[0].token_ids[2]
    stopped = (await collect(engine, prompts[0], SamplingOptions(max_tokens=8, temperature=0.0,
                                                                 stop_token_ids=(stop,)), "stop"))[-1]
    probes["stopped"] = (greedy.outputs[0].token_ids, stop, stopped)
    # logit_bias on the pooled logits: -100 bans the greedy tokens, +100 forces one.
    banned = SamplingOptions(max_tokens=8, temperature=0.0, ignore_eos=True,
                             logit_bias=tuple(sorted((t, -100.0) for t in set(greedy.outputs[0].token_ids[:4]))))
    forced = SamplingOptions(max_tokens=3, temperature=0.0, ignore_eos=True, logit_bias=((7, 100.0),))
    probes["biased"] = [(options, (await collect(engine, prompts[0], options, f"bias-{i}"))[-1])
                        for i, options in enumerate((banned, forced))]
    probes["per_request"] = await _per_request_batch(engine, prompts)
    probes["alone"] = await _alone_batches(engine, prompts)
    errors = {}
    bad = {
        "idle_weight": SamplingOptions(weights=tuple(range(1, len(engine.manifest.members) + 1))[::-1]),
        "echo_pooling": SamplingOptions(pooling="prob_mean", prompt_logprobs=1),
        "negative_prob_mean": SamplingOptions(pooling="prob_mean", weights=(1.0, -0.5, 0.0)),
        "member_logprobs": SamplingOptions(member_logprobs=True),
        "too_long": SamplingOptions(max_tokens=1),
        "top_p": SamplingOptions(top_p=1.5),
    }
    for name, options in bad.items():
        prompt = list(range(1, MAX_MODEL_LEN + 5)) if name == "too_long" else prompts[0]
        try:
            await collect(engine, prompt, options, f"bad-{name}")
            errors[name] = None
        except EngineRequestError as err:
            errors[name] = str(err)
    # A request id already in flight is refused.
    first = engine.generate(prompts[0], SamplingOptions(max_tokens=30, ignore_eos=True), "twice")
    await first.__anext__()
    try:
        await collect(engine, prompts[0], SamplingOptions(max_tokens=1), "twice")
        errors["duplicate_id"] = None
    except EngineRequestError as err:
        errors["duplicate_id"] = str(err)
    await first.aclose()
    probes["errors"] = errors
    same = SamplingOptions(max_tokens=2, temperature=0.0, pooling=engine.manifest.rule,
                           weights=tuple(2 * w for w in engine.manifest.weights))
    probes["same_pooling"] = (await collect(engine, prompts[0], same, "same"))[-1]
    probes["info"] = dict(engine.info)
    probes["counters"] = await _counted_request(engine, prompts[2])
    return probes


COUNTED = SamplingOptions(max_tokens=6, temperature=0.0, ignore_eos=True)  # no prompt log-probs


def _own(pooling: str | None = None, weights: tuple[float, ...] | None = None) -> SamplingOptions:
    """A greedy request with generated log-probs (no prompt log-probs) and its own pooling."""
    return SamplingOptions(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=TOP, ignore_eos=True,
                           pooling=pooling, weights=weights)


# One batch on pair_run's engine (members llama, qwen and the idle gemma3 of weight 0; the ensemble
# pools logprob_mean 0.7 : 0.3 with an entropy gate): (name, prompt index, options). The first asks
# for prompt log-probs with the ensemble's own pooling, whose rows vLLM scores in extra
# compute_logits calls in the same steps as the others' own pooling.
PER_REQUEST = (
    ("default_echo", 2, greedy()),
    ("default", 1, _own()),
    ("prob_mean", 1, _own("prob_mean", (1.0, 3.0, 0.0))),
    ("contrastive", 1, _own("logprob_mean", (1.5, -0.5, 0.0))),  # Qwen2 subtracted from Llama
    ("qwen_alone", 1, _own("prob_mean", (0.0, 1.0, 0.0))),  # one-hot: Qwen2 alone, at its temperature
)


async def _run_batch(engine, prompts: list[list[int]], batch, tag: str) -> tuple[list[RequestOutput], int]:
    """The requests of `batch` all at once; their last outputs and the most requests vLLM (or the
    reference engine) ran at once meanwhile."""
    peak = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, engine.stats().num_running)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        runs = await asyncio.gather(*(collect(engine, prompts[i], options, f"{tag}-{name}")
                                      for name, i, options in batch))
    finally:
        done.set()
        await watcher
    return [r[-1] for r in runs], peak


# The trio (llama, qwen, gemma; prob_mean 1:2:1), at TP=2.
TRIO_OWN = (
    ("default", 2, _own()),
    ("logprob_mean", 1, _own("logprob_mean")),
    ("contrastive", 1, _own("logprob_mean", (2.0, 0.0, -1.0))),
    ("gemma_alone", 1, _own("prob_mean", (0.0, 0.0, 1.0))),
)


async def _trio_own_batch(engine, prompts: list[list[int]]) -> dict[str, object]:
    return {"own": await _run_batch(engine, prompts, TRIO_OWN, "own")}


async def _per_request_batch(engine, prompts: list[list[int]]) -> tuple[list[RequestOutput], int]:
    return await _run_batch(engine, prompts, PER_REQUEST, "own")


def _alone(member: str) -> SamplingOptions:
    """A greedy request for `member` alone (as a request naming it as its model)."""
    return SamplingOptions(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=TOP, ignore_eos=True, member=member)


# On pair_run's engine: a batch of members alone only (just Llama runs), then one beside the
# ensemble's own pooling (everyone runs).
ALONE_ONLY = (("llama_a", 1, _alone("llama")), ("llama_b", 2, _alone("llama")))
ALONE_MIXED = (("default", 1, _own()), ("qwen", 2, _alone("qwen")), ("llama", 0, _alone("llama")))


def fresh_prompt(prompts: list[list[int]]) -> list[int]:
    """A prompt no other probe sends (so its KV blocks are not in the prefix cache yet), of at least
    one whole 32-token block."""
    fresh = prompts[2][::-1] + prompts[1]
    assert 32 < len(fresh) <= MAX_MODEL_LEN - MAX_TOKENS
    return fresh


async def _alone_batches(engine, prompts: list[list[int]]) -> dict[str, object]:
    """The two batches above; then, on a fresh prompt, Llama alone followed by the ensemble's own
    pooling: the second must not reuse the first's blocks, which hold no Qwen2 KV."""
    only = await _run_batch(engine, prompts, ALONE_ONLY, "alone")
    mixed = await _run_batch(engine, prompts, ALONE_MIXED, "mixed")
    fresh = fresh_prompt(prompts)
    first = (await collect(engine, fresh, _alone("llama"), "fresh-llama"))[-1]
    after = (await collect(engine, fresh, _own(), "fresh-ensemble"))[-1]
    return {"only": only, "mixed": mixed, "fresh": (first, after)}


async def _counted_request(engine, prompt: list[int]) -> tuple[object, object]:
    """The engine's stats just before and just after one greedy COUNTED request (alone)."""
    await asyncio.sleep(0.2)  # the aborted request and the closed 'twice' stream are gone
    await engine.refresh_counters()
    before = engine.stats()
    await collect(engine, prompt, COUNTED, "counted")
    await engine.refresh_counters()
    return before, engine.stats()


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def prompts(tokenizer_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert len({len(i) for i in ids}) == len(ids) and max(len(i) for i in ids) > 8  # > Gemma's window
    return ids


@pytest.fixture(scope="module")
def pair_run(tiny_models, make_ensemble, prompts) -> EngineRun:
    """Llama + Qwen2 (different head sizes, QKV bias, tied and untied heads) and an idle Gemma3
    (weight 0, which vLLM neither loads nor runs): one engine, whose steps hold at most
    MAX_MODEL_LEN tokens (so two long prompts cannot be prefilled in one step).

    Its manifest is rewritten after the build, as an older `ensemble fit` did, leaving the copy in
    config.json as built: the engine must pool by the manifest (logprob_mean, the new weights and
    temperatures, and an entropy gate whose slopes move the weights by tens of percent per nat), as
    the reference engine does.
    """
    import json

    folder = make_ensemble([("llama", tiny_models["llama"], 1.0), ("qwen", tiny_models["qwen2"], 2.0),
                            ("idle", tiny_models["gemma3"], 1.0)], tokenizer_from="qwen")
    path = folder / "chorus_ensemble.json"
    stored = json.loads(path.read_text())
    stored["rule"] = "logprob_mean"
    for member, weight, temperature in zip(stored["members"], (0.7, 0.3, 0.0), (1.0, 1.3, 1.0)):
        member["weight"], member["temperature"] = weight, temperature
    stored["entropy_gate"] = {"centre": [11.0, 11.0, 11.0],
                              "slopes": [[-0.4, 0.3, 0.0], [0.5, -0.2, 0.0], [0.0, 0.0, 0.0]]}
    path.write_text(json.dumps(stored))
    assert json.loads((folder / "config.json").read_text())["chorus"]["rule"] == "prob_mean"
    # Blocks of 32 tokens (vLLM's CPU default, 128, exceeds MAX_MODEL_LEN): prompts fill whole blocks,
    # so the prefix cache is used (test_members_alone_match_the_reference_engine needs it).
    return run_engine(folder, prompts, probe=_probe,
                      engine_args={"max_num_batched_tokens": MAX_MODEL_LEN, "block_size": 32})


@pytest.fixture(scope="module")
def trio_run(tiny_ensemble, prompts) -> EngineRun:
    """Llama + Qwen2 + sliding-window, soft-capped Gemma3 (vLLM's hybrid KV-cache path)."""
    return run_engine(tiny_ensemble, prompts)


@pytest.fixture(scope="module")
def self_runs(tiny_models, make_ensemble, prompts) -> tuple[EngineRun, list[RequestOutput]]:
    """Gemma3 pooled with itself (weights 1:3), and Gemma3 alone, both in vLLM.

    Gemma3 is the tiny member whose head has exactly the shared vocabulary's rows: the Llama and
    Qwen2 heads have padding rows the ensemble masks but the model alone normalises over (their
    mass moves a model-alone log-prob by up to ~3e-3), so only Gemma3 can match exactly.
    """
    folder = make_ensemble([("first", tiny_models["gemma3"], 1.0), ("second", tiny_models["gemma3"], 3.0)])
    ensemble = run_engine(folder, prompts)
    return ensemble, run_plain_vllm(tiny_models["gemma3"], prompts)


@pytest.fixture(scope="module", params=["linear heads", "raw_geometric"])
def geometric_run(request, tiny_models, tiny_model_builder, tokenizer_dir, make_ensemble, prompts,
                  tmp_path_factory) -> EngineRun:
    """Two different Gemma3 members (heads of exactly the shared vocabulary, so neither abstains)
    pooled logprob_mean 0.7 : 0.3: the manifest's rows reach vLLM's sampler as raw geometric logits
    (`ensemble.vllm_model.raw_geometric_ok`), which vLLM normalises itself. Without soft-capping
    both heads are linear and score the members' scaled hidden states ("scaled_heads"); the tiny
    Gemma3's soft-capped head makes the model scale and sum the members' logits ("raw_geometric").
    With linear heads on a CPU, vLLM's oneDNN product computes both heads at once ("fused_heads",
    `ensemble.vllm_fused_head`), except on the steps that count member agreement. The run's
    ``probes["logits_form"]`` is what the worker's model reports, ``probes["stats"]`` its counters."""
    from ensemble.manifest import EnsembleManifest
    from ensemble.vllm_model import raw_geometric_ok

    linear = request.param == "linear heads"
    root = tmp_path_factory.mktemp(f"gemma_{request.param}")
    first = (tiny_model_builder("gemma3", root / "first", seed=2, tokenizer_dir=tokenizer_dir,
                                final_logit_softcapping=None) if linear else tiny_models["gemma3"])
    other = tiny_model_builder("gemma3", root / "second", seed=7, tokenizer_dir=tokenizer_dir,
                               **({"final_logit_softcapping": None} if linear else {}))
    folder = make_ensemble([("first", first, 0.7), ("second", other, 0.3)], rule="logprob_mean")
    assert raw_geometric_ok(EnsembleManifest.load(folder))

    async def logits_form(engine, _prompts) -> dict[str, object]:
        await engine.refresh_counters()
        return {"logits_form": await engine._llm.collective_rpc("chorus_logits_form"), "stats": engine.stats()}

    return run_engine(folder, prompts, probe=logits_form)


# ---------------------------------------------------------------------------- parity


def test_pair_matches_reference(pair_run: EngineRun, prompts) -> None:
    worst = compare(pair_run.outputs, run_reference(pair_run.folder, prompts))
    print(f"llama+qwen2: max |logprob diff| {worst:.2e}, vLLM start-up {pair_run.startup_s:.1f} s")


def test_raw_geometric_logits_match_reference(geometric_run: EngineRun, prompts, request) -> None:
    """Greedy tokens and the reported log-probs (vLLM's log_softmax of the raw logits) equal the
    reference engine's normalised geometric pool."""
    from ensemble.vllm_fused_head import FusedHead

    form = request.node.callspec.params["geometric_run"]
    if form == "linear heads":
        form = "fused_heads" if FusedHead.available() else "scaled_heads"
    assert geometric_run.probes["logits_form"] == [form]
    stats = geometric_run.probes["stats"]
    assert 0 <= stats.agreement_rows <= stats.pooled_tokens and stats.pooled_tokens > 0
    if form != "fused_heads":
        assert stats.agreement_rows == stats.pooled_tokens
    worst = compare(geometric_run.outputs, run_reference(geometric_run.folder, prompts))
    print(f"gemma3+gemma3 logprob_mean, raw logits ({form}): max |logprob diff| {worst:.2e}")


def test_idle_members_are_not_served(pair_run: EngineRun) -> None:
    info = pair_run.probes["info"]
    assert info["served_members"] == ["llama", "qwen"]
    assert [m["name"] for m in info["members"]] == ["llama", "qwen", "idle"]


def test_trio_with_sliding_window_matches_reference(trio_run: EngineRun, prompts) -> None:
    worst = compare(trio_run.outputs, run_reference(trio_run.folder, prompts))
    print(f"llama+qwen2+gemma3: max |logprob diff| {worst:.2e}, vLLM start-up {trio_run.startup_s:.1f} s")


def test_self_ensemble_equals_member_alone(self_runs) -> None:
    ensemble, plain = self_runs
    worst = compare(ensemble.outputs, plain)
    print(f"gemma3+gemma3 vs gemma3 alone in vLLM: max |logprob diff| {worst:.2e}")


# ---------------------------------------------------------------------------- engine behaviour


def test_outputs_are_cumulative_and_finished(pair_run: EngineRun, prompts) -> None:
    for out, prompt in zip(pair_run.outputs, prompts):
        assert out.finished and out.prompt_token_ids == prompt
        (completion,) = out.outputs
        assert completion.finish_reason == "length" and len(completion.token_ids) == MAX_TOKENS
        assert isinstance(completion.text, str) and completion.text


def test_abort_ends_stream_and_frees_cache(pair_run: EngineRun) -> None:
    seen = pair_run.probes["abort_outputs"]
    last = seen[-1]
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert 2 <= len(last.outputs[0].token_ids) < 60
    running, idle = pair_run.probes["stats_running"], pair_run.probes["stats_idle"]
    assert running.num_running == 1 and running.kv_cache_usage > 0
    assert idle.num_running == 0 and idle.num_waiting == 0 and idle.kv_cache_usage == 0


def test_ensemble_counters_match_the_reference_engine(pair_run: EngineRun, prompts) -> None:
    """The vLLM workers' counters, read back through collective_rpc, count one pooled row per
    generated token (prefill's row included) and the same member agreement as the reference."""
    from ensemble.reference import ReferenceEngine

    before, after = pair_run.probes["counters"]
    rows, agreement, seconds, steps = counter_deltas(before, after)

    async def reference():
        engine = ReferenceEngine(pair_run.folder)
        try:
            start = engine.stats()
            await collect(engine, prompts[2], COUNTED, "counted")
            return start, engine.stats()
        finally:
            await engine.shutdown()

    ref_rows, ref_agreement, _, _ = counter_deltas(*asyncio.run(reference()))
    assert rows == ref_rows == COUNTED.max_tokens and steps == COUNTED.max_tokens and seconds > 0.0
    # The reference engine also runs (and counts) the idle member; vLLM does not run it.
    assert set(ref_agreement) == {"llama", "qwen", "idle"}
    assert agreement == {k: v for k, v in ref_agreement.items() if k != "idle"} and set(agreement) == {"llama", "qwen"}


def test_seeded_sampling_gives_n_reproducible_completions(pair_run: EngineRun) -> None:
    a, b = pair_run.probes["seeded"]
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in a.outputs)
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


def test_seeded_prompts_that_overflow_a_step_do_not_kill_the_engine(pair_run: EngineRun) -> None:
    """Both complete (and every later probe ran on the same engine): prefills are whole on a CPU."""
    assert [len(t) for t in pair_run.probes["seeded_long"]] == [3, 3]


def test_stop_token_ids(pair_run: EngineRun) -> None:
    greedy, stop, stopped = pair_run.probes["stopped"]
    completion = stopped.outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert completion.token_ids == greedy[: greedy.index(stop) + 1]


def test_logit_bias_matches_reference(pair_run: EngineRun, prompts) -> None:
    """logit_bias is added to the pooled logits before sampling, on vLLM as on the reference."""
    from ensemble.reference import ReferenceEngine

    (banned, vllm_banned), (forced, vllm_forced) = pair_run.probes["biased"]
    greedy, _, _ = pair_run.probes["stopped"]
    assert not {t for t, _ in banned.logit_bias} & set(vllm_banned.outputs[0].token_ids)
    assert vllm_forced.outputs[0].token_ids == [7, 7, 7]

    async def reference() -> list[list[int]]:
        engine = ReferenceEngine(pair_run.folder)
        try:
            return [(await collect(engine, prompts[0], options, f"ref-{i}"))[-1].outputs[0].token_ids
                    for i, options in enumerate((banned, forced))]
        finally:
            await engine.shutdown()

    assert asyncio.run(reference()) == [vllm_banned.outputs[0].token_ids, [7, 7, 7]]
    assert vllm_banned.outputs[0].token_ids[:4] != greedy[:4]


def test_requests_pool_their_own_way_in_one_batch(pair_run: EngineRun, prompts) -> None:
    """Five concurrent requests in one vLLM batch: the ensemble's own pooling (one with prompt
    log-probs), prob_mean with other weights, contrastive logprob_mean with a negative weight, and a
    one-hot weight. Each matches the reference engine (which ran the same batch) token for token and
    every log-prob within TOL; the one-hot one is Qwen2's own distribution (the reference engine's
    per-member log-prob), and the default one equals the same request alone in the parity batch."""
    from ensemble.reference import ReferenceEngine

    outputs, peak = pair_run.probes["per_request"]
    assert peak == len(PER_REQUEST), f"the requests did not share vLLM's batch (at most {peak} ran at once)"
    member_view = [(n, i, o if n != "qwen_alone" else dataclasses.replace(o, member_logprobs=True))
                   for n, i, o in PER_REQUEST]

    async def reference():
        engine = ReferenceEngine(pair_run.folder, max_num_seqs=len(PER_REQUEST))
        try:
            return await _run_batch(engine, prompts, member_view, "ref")
        finally:
            await engine.shutdown()

    expected, ref_peak = asyncio.run(reference())
    assert ref_peak == len(PER_REQUEST)
    worst = compare(outputs, expected)
    print(f"per-request pooling in one batch vs reference: max |logprob diff| {worst:.2e}")
    by_name = dict(zip((n for n, _, _ in PER_REQUEST), outputs))
    # Each pooled its own way: the same prompt's first-token distributions all differ.
    same_prompt = ("default", "prob_mean", "contrastive", "qwen_alone")
    firsts = {n: by_name[n].outputs[0].logprobs[0].top for n in same_prompt}
    for a in firsts:
        for b in firsts:
            if a < b:
                assert firsts[a] != firsts[b], f"{a} and {b} pooled alike"
    qwen = dict(zip((n for n, _, _ in PER_REQUEST), expected))["qwen_alone"].outputs[0].logprobs
    for got, member in zip(by_name["qwen_alone"].outputs[0].logprobs, qwen, strict=True):
        assert abs(got.logprob - member.member_logprobs["qwen"]) < TOL
    alone = pair_run.outputs[1]  # prompt 1 with the ensemble's own pooling, in the parity batch
    assert by_name["default"].outputs[0].token_ids == alone.outputs[0].token_ids
    for got, before in zip(by_name["default"].outputs[0].logprobs, alone.outputs[0].logprobs, strict=True):
        assert abs(got.logprob - before.logprob) < TOL


def test_members_alone_match_the_reference_engine(pair_run: EngineRun, prompts) -> None:
    """Requests for one member alone (a member served by name): a batch of them only, where vLLM
    runs that member alone, and a batch beside the ensemble's own pooling, each token for token
    against the reference engine (which runs every member and takes the named one's distribution
    at temperature 1). Then the prefix cache: the ensemble's request on a prompt whose blocks a
    member alone filled first must not reuse them (they hold only that member's KV)."""
    from ensemble.reference import ReferenceEngine

    probes = pair_run.probes["alone"]
    fresh = fresh_prompt(prompts)

    async def reference():
        engine = ReferenceEngine(pair_run.folder, max_num_seqs=len(ALONE_MIXED))
        try:
            only = await _run_batch(engine, prompts, ALONE_ONLY, "ref-only")
            mixed = await _run_batch(engine, prompts, ALONE_MIXED, "ref-mixed")
            pair = [(await collect(engine, fresh, options, f"ref-{tag}"))[-1]
                    for tag, options in (("llama", _alone("llama")), ("ensemble", _own()))]
            return only, mixed, pair
        finally:
            await engine.shutdown()

    (only, _), (mixed, _), pair = asyncio.run(reference())
    (got_only, only_peak), (got_mixed, mixed_peak) = probes["only"], probes["mixed"]
    assert only_peak == len(ALONE_ONLY) and mixed_peak == len(ALONE_MIXED), "the requests did not share a batch"
    worst = max(compare(got_only, only), compare(got_mixed, mixed), compare(list(probes["fresh"]), pair))
    print(f"members alone vs reference: max |logprob diff| {worst:.2e}")
    assert pair_run.probes["info"]["prefix_caching"], "the check below needs vLLM's prefix cache on"
    assert pair_run.probes["info"]["servable_members"] == ["llama", "qwen"]
    # A member alone is not the ensemble: their first-token distributions differ.
    assert got_only[0].outputs[0].logprobs[0].top != got_mixed[0].outputs[0].logprobs[0].top


def test_request_errors(pair_run: EngineRun) -> None:
    errors = pair_run.probes["errors"]
    assert "member(s) 'idle' (1)" in errors["idle_weight"] and "neither loads nor runs" in errors["idle_weight"]
    assert "prompt log-probs (echo with logprobs) with per-request pooling" in errors["echo_pooling"]
    assert "negative weights are only allowed with pooling 'logprob_mean'" in errors["negative_prob_mean"]
    assert "member_logprobs" in errors["member_logprobs"]
    assert errors["too_long"] and errors["top_p"]
    assert "already in flight" in errors["duplicate_id"]
    assert "shut down" in pair_run.after_shutdown
    # Asking for exactly the ensemble's own pooling (weights in any scale) is fine.
    assert len(pair_run.probes["same_pooling"].outputs[0].token_ids) == 2
    assert pair_run.probes["info"]["per_request_pooling"] is True


# ---------------------------------------------------------------------------- tensor parallel


@pytest.mark.slow
def test_tensor_parallel_two_ranks_equals_one(trio_run: EngineRun, tiny_ensemble: Path, prompts, monkeypatch) -> None:
    """TP=2 on the CPU (gloo): every member split over two ranks gives TP=1's tokens and log-probs.

    About 40-55 s on 2 cores (one vLLM start with two worker processes), plus TP=1's engine when
    the default tests did not start it in the same session.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor parallelism on the CPU needs two cores")
    # vLLM's automatic OpenMP binding wants one NUMA node per rank; bind one core per rank.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}|{cpus[1]}")
    run = run_engine(tiny_ensemble, prompts, tensor_parallel_size=2, probe=_trio_own_batch)
    worst = compare(run.outputs, trio_run.outputs)
    print(f"trio at TP=2 vs TP=1: max |logprob diff| {worst:.2e}, vLLM start-up {run.startup_s:.1f} s")
    # Per-request pooling at TP=2: each rank tracks the batch, rank 0 pools; as the reference engine.
    from ensemble.reference import ReferenceEngine

    async def reference():
        engine = ReferenceEngine(tiny_ensemble, max_num_seqs=len(TRIO_OWN))
        try:
            return await _run_batch(engine, prompts, TRIO_OWN, "ref")
        finally:
            await engine.shutdown()

    (outputs, peak), (expected, _) = run.probes["own"], asyncio.run(reference())
    assert peak == len(TRIO_OWN)
    print(f"per-request pooling at TP=2 vs reference: max |logprob diff| {compare(outputs, expected):.2e}")
