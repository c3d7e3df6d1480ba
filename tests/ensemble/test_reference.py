"""The reference engine against plain Hugging Face models, and its serving behaviour."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ensemble.manifest import EnsembleManifest
from ensemble.pooling import fit_vocab
from ensemble.protocol import Engine, EngineRequestError, RequestOutput, SamplingOptions, StructuredOutput
from ensemble.reference import ReferenceEngine
from full_forward import pooled_full_forward, worst_gap_to_pooled
from vllm_harness import counter_deltas

VOCAB = 151_665
PROMPTS = ("The quick brown fox", "Once upon a time, in a land far away, there lived", "Hi")


def _generate(engine: ReferenceEngine, prompt: list[int], options: SamplingOptions, rid: str = "r") -> list[RequestOutput]:
    async def run() -> list[RequestOutput]:
        return [out async for out in engine.generate(prompt, options, rid)]

    return asyncio.run(run())


def _final(engine: ReferenceEngine, prompt: list[int], options: SamplingOptions, rid: str = "r") -> RequestOutput:
    outputs = _generate(engine, prompt, options, rid)
    assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    return outputs[-1]


def _shutdown(engine: ReferenceEngine) -> None:
    asyncio.run(engine.shutdown())


@pytest.fixture(scope="module")
def self_engine(tiny_self_ensemble: Path) -> Iterator[ReferenceEngine]:
    engine = ReferenceEngine(tiny_self_ensemble)
    yield engine
    _shutdown(engine)


@pytest.fixture(scope="module")
def trio_engine(tiny_ensemble: Path) -> Iterator[ReferenceEngine]:
    engine = ReferenceEngine(tiny_ensemble, max_num_seqs=4)
    yield engine
    _shutdown(engine)


@pytest.fixture(scope="module")
def llama(tiny_models: dict[str, Path]):
    return AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()


def _ids(engine: ReferenceEngine, text: str) -> list[int]:
    return engine.tokenizer(text)["input_ids"]


# ----------------------------------------------------------------------------- exactness


def test_implements_the_engine_protocol(self_engine: ReferenceEngine) -> None:
    assert isinstance(self_engine, Engine)
    assert self_engine.model_name == "llama_twice" and self_engine.max_model_len == 512
    assert self_engine.info["rule"] == "prob_mean" and self_engine.info["weights"] == [1.0, 3.0]
    assert self_engine.info["chat_template"] is True


def test_model_ensembled_with_itself_equals_hf_generate(self_engine: ReferenceEngine, llama) -> None:
    prompt = _ids(self_engine, PROMPTS[1])
    options = SamplingOptions(max_tokens=10, temperature=0.0, logprobs=5, prompt_logprobs=3, member_logprobs=True)
    out = _final(self_engine, prompt, options)
    completion = out.outputs[0]

    with torch.no_grad():
        hf = llama.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )
        full = llama(torch.tensor([prompt])).logits[0]
    hf_tokens = hf.sequences[0, len(prompt):].tolist()
    assert completion.token_ids == hf_tokens
    assert completion.finish_reason == "length"
    assert completion.text == self_engine.tokenizer.decode(hf_tokens, skip_special_tokens=True)

    # Log-probs of the chosen tokens and the top-5, against HF's raw logits over the shared vocabulary.
    worst = 0.0
    for step, (entry, logits) in enumerate(zip(completion.logprobs, hf.logits)):
        expected = torch.log_softmax(fit_vocab(logits[0], VOCAB).float(), -1)
        assert entry.token_id == hf_tokens[step]
        worst = max(worst, abs(entry.logprob - float(expected[entry.token_id])))
        top_values, top_ids = torch.topk(expected, 5)
        assert [i for i, _ in entry.top] == top_ids.tolist()
        worst = max(worst, max(abs(v - float(e)) for (_, v), e in zip(entry.top, top_values)))
        assert set(entry.member_logprobs) == {"member_a", "member_b"}
        for value in entry.member_logprobs.values():
            worst = max(worst, abs(value - float(expected[entry.token_id])))
    # Prompt log-probs against one full forward pass.
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    expected = torch.log_softmax(fit_vocab(full, VOCAB).float(), -1)
    for pos, entry in enumerate(out.prompt_logprobs[1:]):
        assert entry.token_id == prompt[pos + 1]
        worst = max(worst, abs(entry.logprob - float(expected[pos, entry.token_id])))
        assert len(entry.top) == 3
        assert entry.top[0][0] == int(expected[pos].argmax())
    assert worst < 1e-5, worst


@pytest.mark.parametrize(("rule", "weights"), [("prob_mean", None), ("logprob_mean", (1.5, -0.25, 0.5))])
def test_trio_matches_full_forward_pooling(trio_engine: ReferenceEngine, tiny_ensemble: Path, rule: str,
                                           weights) -> None:
    """Cached step-by-step decoding (Gemma's 8-token sliding window included) agrees with pooling
    full forward passes over prompt + completion, computed independently of the engine."""
    manifest = EnsembleManifest.load(tiny_ensemble)
    models = [AutoModelForCausalLM.from_pretrained(m.path, dtype=torch.float32).eval() for m in manifest.members]
    prompt = _ids(trio_engine, PROMPTS[1])
    assert len(prompt) > 8
    options = SamplingOptions(max_tokens=8, temperature=0.0, logprobs=2, prompt_logprobs=1, pooling=rule,
                              weights=weights, ignore_eos=True)
    out = _final(trio_engine, prompt, options)
    tokens = out.outputs[0].token_ids
    pooled = pooled_full_forward(manifest, models, prompt + tokens, rule, weights or manifest.weights)
    worst = worst_gap_to_pooled(out, pooled)
    assert worst < 1e-4, worst


def test_prompt_logprobs_are_scored_in_bounded_chunks(trio_engine: ReferenceEngine, tiny_ensemble: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Echo with logprobs on a long prompt: the prompt goes through the members a few positions at
    a time (chunks across Gemma's sliding window here), never as one ``[length, vocabulary]``
    block, and the scores equal one full forward pass."""
    import ensemble.reference_decode as reference_decode  # where prompt_chunk_tokens reads it

    row_bytes = 4 * trio_engine.manifest.vocab_size * (len(trio_engine.members) + 1)
    monkeypatch.setattr(reference_decode, "PROMPT_LOGPROBS_BYTES", 3 * row_bytes)
    assert trio_engine.prompt_chunk_tokens() == 3
    seen: list[int] = []
    for member in trio_engine.members:
        forward = member.forward

        def spy(token_ids, cache, all_positions=False, forward=forward):
            seen.append(len(token_ids))
            return forward(token_ids, cache, all_positions)

        monkeypatch.setattr(member, "forward", spy)
    manifest = EnsembleManifest.load(tiny_ensemble)
    models = [AutoModelForCausalLM.from_pretrained(m.path, dtype=torch.float32).eval() for m in manifest.members]
    prompt = _ids(trio_engine, PROMPTS[1] + " " + PROMPTS[0])
    assert len(prompt) > 12
    options = SamplingOptions(max_tokens=2, temperature=0.0, logprobs=1, prompt_logprobs=2, ignore_eos=True)
    out = _final(trio_engine, prompt, options)
    pooled = pooled_full_forward(manifest, models, prompt + out.outputs[0].token_ids, manifest.rule,
                                 manifest.weights)
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    worst = max(abs(e.logprob - float(pooled[pos, e.token_id])) for pos, e in enumerate(out.prompt_logprobs[1:]))
    assert worst < 1e-4, worst
    assert out.outputs[0].token_ids[0] == int(pooled[len(prompt) - 1].argmax())  # the cache carried on
    assert max(seen) <= 3


# ----------------------------------------------------------------------------- sampling behaviour


def test_same_seed_same_output(trio_engine: ReferenceEngine) -> None:
    prompt = _ids(trio_engine, PROMPTS[0])
    options = SamplingOptions(max_tokens=8, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    first = _final(trio_engine, prompt, options).outputs[0]
    second = _final(trio_engine, prompt, options).outputs[0]
    other = _final(trio_engine, prompt, SamplingOptions(max_tokens=8, temperature=1.0, seed=99, ignore_eos=True))
    assert first.token_ids == second.token_ids and first.text == second.text
    assert other.outputs[0].token_ids != first.token_ids


def test_n_completions_use_seed_plus_index(trio_engine: ReferenceEngine) -> None:
    prompt = _ids(trio_engine, PROMPTS[0])
    base = SamplingOptions(max_tokens=6, temperature=1.0, seed=42, ignore_eos=True, logprobs=1)
    out = _final(trio_engine, prompt, replace(base, n=3))
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for i, completion in enumerate(out.outputs):
        alone = _final(trio_engine, prompt, replace(base, seed=42 + i)).outputs[0]
        assert completion.token_ids == alone.token_ids
        assert [e.logprob for e in completion.logprobs] == [e.logprob for e in alone.logprobs]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    greedy = _final(trio_engine, prompt, SamplingOptions(n=2, max_tokens=4, temperature=0.0))
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_stop_strings_and_stop_ids(trio_engine: ReferenceEngine) -> None:
    prompt = _ids(trio_engine, PROMPTS[0])
    free = _final(trio_engine, prompt, SamplingOptions(max_tokens=8, temperature=0.0, ignore_eos=True)).outputs[0]
    tok = trio_engine.tokenizer
    # A stop string spanning the boundary between two generated tokens with visible text.
    for i in range(1, len(free.token_ids)):
        before, upto = tok.decode(free.token_ids[:i]), tok.decode(free.token_ids[: i + 1])
        if before and len(upto) > len(before) and "\ufffd" not in upto and free.text.startswith(upto):
            stop = upto[len(before) - 1 : len(before) + 1]
            break
    else:
        pytest.skip("the tiny ensemble produced no two visible tokens")
    out = _final(trio_engine, prompt, SamplingOptions(max_tokens=8, temperature=0.0, ignore_eos=True, stop=(stop,)))
    c = out.outputs[0]
    assert (c.finish_reason, c.stop_reason) == ("stop", stop)
    assert c.text == free.text[: free.text.index(stop)]
    assert c.token_ids == free.token_ids[: len(c.token_ids)] and len(c.token_ids) <= i + 1
    # A stop token: kept in token_ids, left out of the text.
    target = free.token_ids[2]
    out = _final(trio_engine, prompt, SamplingOptions(max_tokens=8, temperature=0.0, stop_token_ids=(target,)))
    c = out.outputs[0]
    cut = free.token_ids.index(target) + 1
    assert c.token_ids == free.token_ids[:cut]
    assert (c.finish_reason, c.stop_reason) == ("stop", target)
    assert c.text == tok.decode(free.token_ids[: cut - 1], skip_special_tokens=True)


def test_outputs_are_cumulative(trio_engine: ReferenceEngine) -> None:
    outputs = _generate(trio_engine, _ids(trio_engine, PROMPTS[2]), SamplingOptions(max_tokens=5, temperature=0.0,
                                                                                    ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1, 2, 3, 4, 5]
    for a, b in zip(outputs, outputs[1:]):
        assert b.outputs[0].token_ids[: len(a.outputs[0].token_ids)] == a.outputs[0].token_ids
        assert b.outputs[0].text.startswith(a.outputs[0].text)


def test_concurrent_requests_equal_each_alone(trio_engine: ReferenceEngine) -> None:
    """Different prompt lengths, rules, weights and sampling settings in one batch (and more
    completions than `max_num_seqs`, so some wait) give what each request gives alone."""
    cases = [
        (PROMPTS[0], SamplingOptions(max_tokens=6, temperature=0.0, ignore_eos=True)),
        (PROMPTS[1], SamplingOptions(max_tokens=4, temperature=0.8, seed=7, n=2, ignore_eos=True, logprobs=2)),
        (PROMPTS[2], SamplingOptions(max_tokens=5, temperature=0.0, pooling="logprob_mean", weights=(1.0, 0.0, 2.0),
                                     ignore_eos=True, frequency_penalty=0.5)),
        (PROMPTS[0] + " jumps", SamplingOptions(max_tokens=3, temperature=1.0, top_k=5, seed=3, ignore_eos=True)),
    ]
    alone = [_final(trio_engine, _ids(trio_engine, text), opts) for text, opts in cases]

    async def together() -> list[RequestOutput]:
        async def one(i: int) -> RequestOutput:
            text, opts = cases[i]
            return [o async for o in trio_engine.generate(_ids(trio_engine, text), opts, f"batch-{i}")][-1]

        return await asyncio.gather(*(one(i) for i in range(len(cases))))

    batched = asyncio.run(together())
    for a, b in zip(alone, batched):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert [c.text for c in a.outputs] == [c.text for c in b.outputs]
        if a.outputs[0].logprobs:
            assert [[e.logprob for e in c.logprobs] for c in a.outputs] == [[e.logprob for e in c.logprobs] for c in b.outputs]


def test_waiting_requests_are_admitted_by_priority(trio_engine: ReferenceEngine) -> None:
    """With every slot taken, waiting requests start in (priority, arrival) order, lower values
    first (vLLM's priority policy); equal priorities keep their arrival order."""
    prompt = _ids(trio_engine, PROMPTS[2])
    full = dict(n=4, max_tokens=2, temperature=0.0, ignore_eos=True)  # each fills all 4 slots
    started: list[str] = []

    async def run() -> None:
        async def one(name: str, options: SamplingOptions, first: asyncio.Event | None = None) -> None:
            async for _ in trio_engine.generate(prompt, options, name):
                if name not in started:
                    started.append(name)
                    if first is not None:
                        first.set()

        running = asyncio.Event()
        blocker = asyncio.create_task(one("blocker", SamplingOptions(n=4, max_tokens=40, ignore_eos=True), running))
        await running.wait()
        waiters = [asyncio.create_task(one(name, SamplingOptions(priority=p, **full)))
                   for name, p in (("late", 5), ("normal-a", 0), ("urgent", -1), ("normal-b", 0))]
        await asyncio.sleep(0.01)
        assert trio_engine.stats().num_waiting == 4
        await asyncio.gather(blocker, *waiters)

    asyncio.run(run())
    assert started == ["blocker", "urgent", "normal-a", "normal-b", "late"]
    assert trio_engine.info["scheduling_policy"] == "priority"


# ----------------------------------------------------------------------------- serving


def test_abort_ends_the_request(trio_engine: ReferenceEngine) -> None:
    prompt = _ids(trio_engine, PROMPTS[0])

    async def run() -> list[RequestOutput]:
        seen = []
        async for out in trio_engine.generate(prompt, SamplingOptions(max_tokens=400, ignore_eos=True), "long"):
            seen.append(out)
            if len(seen) == 2:
                await trio_engine.abort("long")
        return seen

    seen = asyncio.run(run())
    assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "abort"
    assert len(seen[-1].outputs[0].token_ids) < 20
    assert trio_engine.stats().num_running == 0 and trio_engine.stats().num_waiting == 0


def test_context_length_caps_generation(self_engine: ReferenceEngine) -> None:
    prompt = [self_engine.tokenizer.convert_tokens_to_ids("a")] * 509
    out = _final(self_engine, prompt, SamplingOptions(max_tokens=50, temperature=0.0, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].finish_reason == "length"
    with pytest.raises(EngineRequestError, match="maximum context length is 512"):
        _generate(self_engine, prompt * 2, SamplingOptions())


@pytest.mark.parametrize(
    ("prompt", "options", "message"),
    [
        ([], SamplingOptions(), "prompt is empty"),
        ([VOCAB], SamplingOptions(), "outside the vocabulary"),
        ([1, 2], SamplingOptions(weights=(1.0,)), "one per member"),
        ([1, 2], SamplingOptions(weights=(1.0, -0.5)), "negative weights are only allowed"),
        ([1, 2], SamplingOptions(pooling="max"), "unknown pooling rule"),  # type: ignore[arg-type]
        ([1, 2], SamplingOptions(top_p=2.0), "top_p"),
        ([1, 2], SamplingOptions(structured_outputs=StructuredOutput("json_object")), "needs the vLLM engine"),
    ],
)
def test_bad_requests_raise_engine_request_error(self_engine: ReferenceEngine, prompt, options, message) -> None:
    with pytest.raises(EngineRequestError, match=message):
        _generate(self_engine, prompt, options)


def test_contrastive_weights_on_a_self_pair_give_the_model_itself(
    self_engine: ReferenceEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-request contrastive weights (2, -1) on a model paired with itself give the model itself:
    with the plausibility constraint off, the same tokens and log-probs; with it on (the default
    alpha), the same tokens, each at least as likely (renormalised over the plausible tokens)."""
    prompt = _ids(self_engine, PROMPTS[0])
    contrastive = SamplingOptions(max_tokens=4, temperature=0.0, logprobs=1, pooling="logprob_mean",
                                  weights=(2.0, -1.0))
    plain = _final(self_engine, prompt, SamplingOptions(max_tokens=4, temperature=0.0, logprobs=1))
    masked = _final(self_engine, prompt, contrastive)
    monkeypatch.setattr(self_engine, "manifest", self_engine.manifest.model_copy(update={"contrastive_alpha": 0.0}))
    unmasked = _final(self_engine, prompt, contrastive)
    assert plain.outputs[0].token_ids == masked.outputs[0].token_ids == unmasked.outputs[0].token_ids
    for a, b, c in zip(plain.outputs[0].logprobs, masked.outputs[0].logprobs, unmasked.outputs[0].logprobs):
        assert abs(a.logprob - c.logprob) < 1e-4
        assert b.logprob >= a.logprob - 1e-5


# ----------------------------------------------------------------------------- ensemble counters


def test_model_ensembled_with_itself_agrees_on_every_token(self_engine: ReferenceEngine) -> None:
    before = self_engine.stats()
    out = _final(self_engine, _ids(self_engine, PROMPTS[1]), SamplingOptions(max_tokens=7, temperature=0.0,
                                                                             ignore_eos=True))
    tokens, agreement, seconds, steps = counter_deltas(before, self_engine.stats())
    assert len(out.outputs[0].token_ids) == 7
    assert tokens == 7 and steps == 7 and agreement == {"member_a": 7, "member_b": 7}
    assert seconds > 0.0


def test_agreement_counts_each_members_own_top_token(trio_engine: ReferenceEngine) -> None:
    """Weights (0, 1, 0) pool qwen alone: qwen agrees on every greedy token, the others on some."""
    before = trio_engine.stats()
    options = SamplingOptions(n=2, max_tokens=5, temperature=0.0, ignore_eos=True, weights=(0.0, 1.0, 0.0))
    out = _final(trio_engine, _ids(trio_engine, PROMPTS[0]), options)
    tokens, agreement, seconds, steps = counter_deltas(before, trio_engine.stats())
    assert sum(len(c.token_ids) for c in out.outputs) == tokens == 10
    assert steps == 5 and seconds > 0.0  # both completions pool in one step
    assert agreement["qwen"] == 10 and set(agreement) == {"llama", "qwen", "gemma"}
    assert all(0 <= agreement[m] <= 10 for m in ("llama", "gemma"))


def test_shutdown_aborts_in_flight_requests(tiny_self_ensemble: Path) -> None:
    engine = ReferenceEngine(tiny_self_ensemble)
    prompt = _ids(engine, PROMPTS[0])

    async def run() -> list[RequestOutput]:
        seen = []
        async for out in engine.generate(prompt, SamplingOptions(max_tokens=400, ignore_eos=True), "a"):
            seen.append(out)
            if len(seen) == 1:
                asyncio.get_running_loop().create_task(engine.shutdown())
        return seen

    seen = asyncio.run(run())
    assert seen[-1].outputs[0].finish_reason == "abort"
    with pytest.raises(RuntimeError, match="shut down"):
        _generate(engine, prompt, SamplingOptions())
