"""Shared by the vLLM parity tests: run the same greedy batch on vLLM and on the reference engine.

Every vLLM start costs 15-60 s on a CPU, so a test starts one engine per ensemble, sends all its
requests at once (prompts of different lengths, so vLLM batches them), shuts it down and keeps what
it saw in an `EngineRun`. `compare` then demands identical greedy tokens and every log-prob (chosen
token, top alternatives with the same ids in the same order, prompt tokens) within `TOL`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from ensemble.protocol import RequestOutput, SamplingOptions

TOL = 1e-4
MAX_TOKENS = 10
TOP = 3  # top log-probs per generated token
PROMPT_TOP = 2  # top log-probs per prompt token
MAX_MODEL_LEN = 96

Probe = Callable[[object, list[list[int]]], Awaitable[dict[str, object]]]


@dataclass
class EngineRun:
    """What one vLLM engine did: the greedy outputs, plus whatever a probe recorded."""

    folder: Path
    outputs: list[RequestOutput]
    startup_s: float
    probes: dict[str, object] = field(default_factory=dict)
    after_shutdown: str | None = None  # the error a request got after shutdown (None: no error)


def counter_deltas(before, after) -> tuple[int, dict[str, int], float, int]:
    """What an engine's ensemble counters (`EngineStats`) gained between two `stats()` calls:
    (rows pooled, agreement per member, pooling seconds, pooling steps). Also used by the
    reference engine's tests."""
    agreement = {m: after.member_agreement[m] - before.member_agreement.get(m, 0) for m in after.member_agreement}
    return (after.pooled_tokens - before.pooled_tokens, agreement,
            after.pooling_seconds - before.pooling_seconds, after.pooling_steps - before.pooling_steps)


def greedy() -> SamplingOptions:
    """The parity request: MAX_TOKENS greedy tokens with generated and prompt log-probs."""
    return SamplingOptions(
        max_tokens=MAX_TOKENS, temperature=0.0, logprobs=TOP, prompt_logprobs=PROMPT_TOP, ignore_eos=True
    )


async def collect(engine, prompt: list[int], options: SamplingOptions, request_id: str) -> list[RequestOutput]:
    """Every cumulative output of one request."""
    return [out async for out in engine.generate(prompt, options, request_id)]


async def _greedy_batch(engine, prompts: list[list[int]], tag: str) -> list[RequestOutput]:
    runs = await asyncio.gather(*(collect(engine, p, greedy(), f"{tag}-{i}") for i, p in enumerate(prompts)))
    return [r[-1] for r in runs]


def run_engine(
    folder: Path,
    prompts: list[list[int]],
    probe: Probe | None = None,
    tensor_parallel_size: int = 1,
    max_model_len: int = MAX_MODEL_LEN,
    engine_args: dict[str, object] | None = None,
    draft_member: str | None = None,
    draft_max_batch: int | None = None,
) -> EngineRun:
    """Start a float32 VLLMEngine on `folder`, run the greedy batch (then `probe`), shut it down.

    `engine_args` are further vLLM engine arguments; `draft_member` turns on speculative decoding
    (in steps of at most `draft_max_batch` requests, if given). On the CPU the KV cache is
    VLLM_CPU_KVCACHE_SPACE GiB (tests/conftest.py sets 1), which overrides ``kv_cache_memory_bytes``.
    """
    from ensemble.vllm_engine import VLLMEngine

    async def main() -> EngineRun:
        t0 = time.perf_counter()
        engine = VLLMEngine.from_folder(folder, max_model_len=max_model_len, dtype="float32",
                                        tensor_parallel_size=tensor_parallel_size,
                                        engine_args=dict(engine_args or {}), draft_member=draft_member,
                                        draft_max_batch=draft_max_batch)
        run = EngineRun(folder, [], time.perf_counter() - t0)
        try:
            run.outputs = await _greedy_batch(engine, prompts, "parity")
            if probe is not None:
                run.probes = await probe(engine, prompts)
        finally:
            await engine.shutdown()
        try:
            await collect(engine, prompts[0], SamplingOptions(max_tokens=1), "after-shutdown")
        except RuntimeError as err:
            run.after_shutdown = str(err)
        return run

    return asyncio.run(main())


def run_plain_vllm(model_folder: Path, prompts: list[list[int]], max_model_len: int = MAX_MODEL_LEN) -> list[RequestOutput]:
    """One model alone in vLLM (no ensemble, no plugin code), same greedy requests, in our form."""
    from vllm import LLM, TokensPrompt

    from ensemble.vllm_translate import OutputTranslator, sampling_params

    llm = LLM(model=str(model_folder), max_model_len=max_model_len, dtype="float32", enforce_eager=True)
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sampling_params(greedy()),
                            use_tqdm=False)
        return [OutputTranslator(f"plain-{i}", p, greedy()).update(o) for i, (p, o) in enumerate(zip(prompts, outs))]
    finally:
        llm.llm_engine.engine_core.shutdown()


def run_reference(folder: Path, prompts: list[list[int]]) -> list[RequestOutput]:
    """The same greedy requests on the reference engine (float32 transformers members)."""
    from ensemble.reference import ReferenceEngine

    async def main() -> list[RequestOutput]:
        engine = ReferenceEngine(folder, max_num_seqs=len(prompts))
        try:
            return await _greedy_batch(engine, prompts, "reference")
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def aligned_logprobs(ours: list[RequestOutput], theirs: list[RequestOutput]) -> list[tuple[str, list[tuple[int, float, float]]]]:
    """Per scored position, ``(where, [(token, our log-prob, their log-prob), ...])``.

    Asserts first that both greedy runs produced the same MAX_TOKENS tokens and the same top ids
    (same order) everywhere; a position lists the chosen token, then its top alternatives. Prompt
    positions count where the requests asked for prompt log-probs.
    """
    positions = []
    for r, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.prompt_token_ids == b.prompt_token_ids
        (ca,), (cb,) = a.outputs, b.outputs
        assert len(ca.token_ids) == MAX_TOKENS
        assert ca.token_ids == cb.token_ids, f"request {r}: greedy tokens differ: {ca.token_ids} vs {cb.token_ids}"
        pairs = [(f"request {r}, generated {i}", x, y) for i, (x, y) in enumerate(zip(ca.logprobs, cb.logprobs, strict=True))]
        if a.prompt_logprobs is not None or b.prompt_logprobs is not None:  # else neither asked for them
            assert a.prompt_logprobs[0] is None and b.prompt_logprobs[0] is None
            pairs += [(f"request {r}, prompt {i + 1}/{len(a.prompt_token_ids)}", x, y)
                      for i, (x, y) in enumerate(zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True))]
        for where, x, y in pairs:
            assert x.token_id == y.token_id
            assert [t for t, _ in x.top] == [t for t, _ in y.top], f"{where}: top ids differ: {x.top} vs {y.top}"
            values = [(x.token_id, x.logprob, y.logprob)] + [(t, p, q) for (t, p), (_, q) in zip(x.top, y.top)]
            positions.append((where, values))
    return positions


def compare(ours: list[RequestOutput], theirs: list[RequestOutput], tol: float = TOL) -> float:
    """Assert equal greedy tokens and log-probs within `tol`; return the max |log-prob diff|.

    On failure the message names the worst entries: request, prompt or generated position, token
    and both log-probs.
    """
    diffs = sorted(
        ((abs(p - q), f"{where}, token {tok}: {p:.6f} vs {q:.6f}")
         for where, values in aligned_logprobs(ours, theirs) for tok, p, q in values),
        key=lambda d: -d[0],
    )
    worst = diffs[0][0] if diffs else 0.0
    bad = [where for d, where in diffs if d >= tol]
    assert not bad, (f"{len(bad)} of {len(diffs)} log-probs differ by {tol} or more, worst {worst:.2e}: "
                     + "; ".join(bad[:6]))
    return worst
