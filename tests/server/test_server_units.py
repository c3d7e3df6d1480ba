"""Pure parts of the server: request models, error shapes, admission, auth, logprob shapes,
sampling options, config and CLI parsing. No engine, no sockets."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from ensemble.protocol import CompletionOutput, EngineStats, RequestOutput, SamplingOptions, TokenLogprob
from server.auth import is_protected, key_matches
from server.cli import banner, build_parser, config_from_args
from server.config import ConfigError, ServerConfig
from server.errors import APIError, describe_validation_error, error_body
from server.generation import GenerationCall
from server.limits import Admission, QueueFullError
from server.logprobs import MIN_LOGPROB, TokenNamer, chat_logprobs, completion_logprobs, member_logprobs
from server.metrics import ServerMetrics, ensemble_families
from server.openapi import without_validation_422
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    CompletionResponseChoice,
    DeltaMessage,
)
from server.protocol_misc import ModelCard
from server.sampling import build_options, check_context, member_weights, stop_strings
from server.sse import DONE, sse_data
from server.structured import answer_shape

MEMBERS = ["llama", "qwen", "gemma"]


# ----------------------------------------------------------------------------- request models


def test_request_fields_follow_openai_order_with_extras_last() -> None:
    fields = list(CompletionRequest.model_fields)
    assert fields[:3] == ["model", "prompt", "best_of"]
    assert fields[-3:] == ["pooling", "member_weights", "return_member_logprobs"]
    chat = list(ChatCompletionRequest.model_fields)
    assert chat[:2] == ["messages", "model"] and chat[-3:] == fields[-3:]


@pytest.mark.parametrize("prompt", ["hi", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_completion_prompt_forms(prompt) -> None:
    assert CompletionRequest.model_validate({"prompt": prompt}).prompt == prompt


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "x", "temperature": "0.5"}, "temperature"),  # no string coercion
        ({"prompt": "x", "n": 1.5}, "n"),
        ({"prompt": "x", "n": True}, "n"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),  # 0 is the route's to judge (echo)
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "temperature": float("nan")}, "temperature"),
        ({"prompt": "x", "seed": 2**64}, "seed"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": "x", "pooling": "median"}, "pooling"),
        ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, "stream_options"),
    ],
)
def test_completion_request_rejects(body, field) -> None:
    with pytest.raises(ValidationError) as err:
        CompletionRequest.model_validate(body)
    assert err.value.errors()[0]["loc"][0] == field


def test_unknown_fields_are_accepted() -> None:
    assert CompletionRequest.model_validate({"prompt": "x", "some_future_field": 1}).prompt == "x"


def test_response_extras_are_omitted_when_unset() -> None:
    plain = CompletionResponseChoice(index=0, text="a").model_dump()
    assert "member_logprobs" not in plain and plain["logprobs"] is None and plain["finish_reason"] is None
    extra = CompletionResponseChoice(index=0, text="a", member_logprobs=[{"a": -1.0}]).model_dump()
    assert extra["member_logprobs"] == [{"a": -1.0}]
    assert DeltaMessage(content="").model_dump() == {"content": ""}
    assert "ensemble" not in ModelCard(id="m").model_dump()


# ----------------------------------------------------------------------------- errors


def test_error_body_shape() -> None:
    body = error_body(400, "bad", param="n", code="x")
    assert body == {"error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": "x"}}
    assert APIError(429, "full").body()["error"]["type"] == "rate_limit_error"


def test_validation_errors_name_the_parameter() -> None:
    try:
        CompletionRequest.model_validate({"prompt": "x", "temperature": "hot"})
    except ValidationError as err:
        exc = RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in err.errors()])
    message, param = describe_validation_error(exc)
    assert param == "temperature" and "'temperature'" in message and "number" in message


def test_validation_error_for_union_drops_type_tags() -> None:
    try:
        CompletionRequest.model_validate({"prompt": [1, "a"]})
    except ValidationError as err:
        exc = RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in err.errors()])
    _, param = describe_validation_error(exc)
    assert param is not None and param.startswith("prompt")


# ----------------------------------------------------------------------------- OpenAPI document


def test_openapi_documents_400_not_fastapis_422(tmp_path) -> None:
    from server.app import create_app

    schema = create_app(ServerConfig(ensemble=str(tmp_path), engine="torch", port=0)).openapi()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    completions = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert "422" not in completions and "400" in completions and "429" in completions
    assert set(completions["200"]["content"]) == {"application/json", "text/event-stream"}
    event = completions["200"]["content"]["text/event-stream"]["schema"]
    chunk = event["properties"]["data"]["anyOf"][1]["contentSchema"]["anyOf"][0]["$ref"]
    assert chunk == "#/components/schemas/CompletionStreamResponse"
    stream_choice = schema["components"]["schemas"]["ChatCompletionResponseStreamChoice"]
    assert list(stream_choice["properties"])[:4] == ["index", "delta", "logprobs", "finish_reason"]
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "content" not in schema["paths"]["/health"]["get"]["responses"]["200"]  # an empty 200
    for path in ("/tokenize", "/detokenize", "/v1/chat/completions"):
        assert "422" not in schema["paths"][path]["post"]["responses"]


def test_without_validation_422_keeps_schemas_still_referenced() -> None:
    schema = {
        "paths": {"/a": {"post": {"responses": {"422": {"$ref": "#/components/schemas/HTTPValidationError"},
                                                "200": {"$ref": "#/components/schemas/ValidationError"}}}}},
        "components": {"schemas": {"HTTPValidationError": {}, "ValidationError": {}}},
    }
    out = without_validation_422(schema)
    assert out["paths"]["/a"]["post"]["responses"] == {"200": {"$ref": "#/components/schemas/ValidationError"}}
    assert out["components"]["schemas"] == {"ValidationError": {}}


# ----------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class _EnsembleCounters:
    """`EngineStats` plus the optional ensemble counters that server.metrics documents."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    pooled_tokens: int = 10
    agreement_rows: int = 8  # agreement counted on 8 of the 10 rows
    member_agreement: dict = field(default_factory=lambda: {"llama": 6, "qwen": 2})
    pooling_seconds: float = 0.5
    pooling_steps: int = 4


def test_ensemble_counters_are_exported_when_reported() -> None:
    metrics = ServerMetrics("m")
    metrics.set_load_source(lambda: (_EnsembleCounters(), 3))
    sample = metrics.registry.get_sample_value
    assert sample("vllm:num_requests_waiting", {"model_name": "m", "engine": "0"}) == 3
    assert sample("chorus:pooled_tokens_total", {"model_name": "m"}) == 10
    assert sample("chorus:agreement_rows_total", {"model_name": "m"}) == 8
    assert sample("chorus:member_agreement_total", {"model_name": "m", "member": "llama"}) == 6
    assert sample("chorus:member_agreement_ratio", {"model_name": "m", "member": "qwen"}) == 0.25  # 2 / 8
    assert sample("chorus:pooling_time_seconds_sum", {"model_name": "m"}) == 0.5
    assert sample("chorus:pooling_time_seconds_count", {"model_name": "m"}) == 4


def test_plain_engine_stats_export_no_ensemble_counters() -> None:
    metrics = ServerMetrics("m")
    metrics.set_load_source(lambda: (EngineStats(1, 0, 0.5), 0))
    assert ensemble_families("m", EngineStats(1, 0, 0.5)) == []
    text = metrics.render().decode()
    assert 'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5' in text and "chorus:pooled_tokens" not in text


def test_metrics_survive_a_failing_stats_source() -> None:
    metrics = ServerMetrics("m")

    def broken():
        raise RuntimeError("engine gone")

    metrics.set_load_source(broken)
    assert metrics.registry.get_sample_value("vllm:num_requests_running", {"model_name": "m", "engine": "0"}) == 0


# ----------------------------------------------------------------------------- admission


def test_admission_bounds_the_queue_and_is_fifo() -> None:
    async def scenario() -> list[str]:
        adm = Admission(max_running=1, max_queue=2)
        order: list[str] = []
        await adm.acquire()  # running
        waiters = []
        for name in ("b", "c"):
            async def wait(name=name):
                await adm.acquire()
                order.append(name)
            waiters.append(asyncio.create_task(wait()))
        await asyncio.sleep(0)
        assert adm.running == 1 and adm.waiting == 2
        with pytest.raises(QueueFullError):
            await adm.acquire()
        adm.release()
        await asyncio.sleep(0)
        adm.release()
        await asyncio.gather(*waiters)
        adm.release()
        assert adm.running == 0 and adm.waiting == 0
        return order

    assert asyncio.run(scenario()) == ["b", "c"]


def test_admission_cancelled_waiter_leaves_the_queue() -> None:
    async def scenario() -> None:
        adm = Admission(max_running=1, max_queue=1)
        await adm.acquire()
        task = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        assert adm.waiting == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert adm.waiting == 0
        adm.release()
        assert adm.running == 0
        async with adm.slot():
            assert adm.running == 1
        assert adm.running == 0

    asyncio.run(scenario())


def test_admission_counts_sequences_not_requests() -> None:
    """A request weighs its prompts × n; the heaviest waits for room and then takes it all; FIFO
    holds even when a lighter newcomer would fit; a heavy waiter that leaves lets the next in."""
    async def scenario() -> None:
        adm = Admission(max_running=8, max_queue=4)
        await adm.acquire(6)
        assert adm.running == 6
        heavy = asyncio.create_task(adm.acquire(1000))  # more than all slots: weighs 8
        await asyncio.sleep(0)
        light = asyncio.create_task(adm.acquire(1))  # would fit, but must not overtake
        await asyncio.sleep(0)
        assert adm.waiting == 2 and adm.running == 6
        adm.release(6)
        await heavy
        assert adm.running == 8 and not light.done()
        adm.release(1000)
        await light
        assert adm.running == 1
        # a heavy waiter that gives up lets the lighter one behind it in at once
        blocker = asyncio.create_task(adm.acquire(8))
        await asyncio.sleep(0)
        behind = asyncio.create_task(adm.acquire(2))
        await asyncio.sleep(0)
        assert not behind.done()
        blocker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocker
        await behind
        assert adm.running == 3 and adm.waiting == 0

    asyncio.run(scenario())


def test_admission_serves_lower_priority_values_first() -> None:
    """Waiters are served by (priority, arrival); a newcomer goes straight in only when it fits and
    no waiter is ahead of it (same or lower priority value)."""
    async def scenario() -> list[str]:
        adm = Admission(max_running=2, max_queue=8)
        order: list[str] = []
        await adm.acquire(2)

        async def wait(name: str, priority: int, sequences: int = 1) -> None:
            await adm.acquire(sequences, priority)
            order.append(name)

        tasks = []
        for name, priority in (("late-a", 5), ("urgent", -3), ("normal-a", 0), ("normal-b", 0), ("late-b", 5)):
            tasks.append(asyncio.create_task(wait(name, priority)))
            await asyncio.sleep(0)
        assert adm.waiting == 5
        adm.release(2)  # two slots: the two at the head
        await asyncio.sleep(0)
        assert order == ["urgent", "normal-a"]
        adm.release(1)
        await asyncio.sleep(0)
        # a newcomer of priority 0 fits into no room; one of priority -9 would jump every waiter
        adm.release(1)
        await asyncio.sleep(0)
        assert order == ["urgent", "normal-a", "normal-b", "late-a"]
        jumper = asyncio.create_task(wait("jumper", -9))
        await asyncio.sleep(0)
        assert not jumper.done() and adm.waiting == 2  # no room yet: it queues at the head
        adm.release(1)
        await asyncio.sleep(0)
        assert order[-1] == "jumper"
        adm.release(1)
        await asyncio.gather(*tasks, jumper)
        assert order == ["urgent", "normal-a", "normal-b", "late-a", "jumper", "late-b"]
        # a full queue: the early check lets in a newcomer that goes straight in, refuses one that must wait
        tight = Admission(max_running=2, max_queue=1)
        await tight.acquire(1)
        late = asyncio.create_task(tight.acquire(2, priority=5))  # cannot fit: queued
        await asyncio.sleep(0)
        tight.check(1, priority=0)  # room, and nobody ahead of it
        with pytest.raises(QueueFullError):
            tight.check(1, priority=5)  # the late waiter is ahead of it, and the queue is full
        assert tight.try_acquire(1, priority=0) is None
        tight.release(1)
        tight.release(1)
        await late
        # with room and only later-priority waiters ahead, a more urgent newcomer goes straight in
        adm.release(2)
        await adm.acquire(1)
        blocker = asyncio.create_task(wait("heavy-late", 5, sequences=2))
        await asyncio.sleep(0)
        assert adm.try_acquire(1, priority=0) is None and adm.running == 2
        adm.release(1)
        adm.release(1)
        await blocker
        return order

    assert asyncio.run(scenario())[-1] == "heavy-late"


def test_invalid_text_is_found_anywhere_in_a_body() -> None:
    from server.protocol import invalid_text_path, prompt_count

    assert invalid_text_path({"a": ["ok", {"b": "é"}]}) is None
    assert invalid_text_path({"a": ["ok", {"b": "x\udfff"}]}) == "a[1].b"
    assert invalid_text_path({"\ud800": 1}) == "request body"
    assert invalid_text_path({"a": {"\ud800": 1}}) == "a"
    deep: object = "\ud800"
    for _ in range(5000):  # no recursion: deep nesting cannot overflow the stack
        deep = [deep]
    assert invalid_text_path({"p": deep}).startswith("p[0][0]")
    assert [prompt_count(p) for p in ("a", ["a", "b"], [1, 2, 3], [[1], [2]])] == [1, 2, 1, 2]


def test_oversized_lists_are_refused_before_their_items_are_looked_at() -> None:
    """A hostile body's cost must not grow with the list it smuggles in: the cap is checked on the
    raw list, before any item is validated."""
    from server.protocol import MAX_MESSAGES, MAX_STOP, ChatCompletionRequest, CompletionRequest
    from server.protocol_base import list_caps

    assert list_caps(CompletionRequest)["stop"] == MAX_STOP
    assert "prompt" not in list_caps(CompletionRequest)  # token-id prompts have no item cap
    assert list_caps(ChatCompletionRequest)["messages"] == MAX_MESSAGES

    with pytest.raises(ValidationError) as err:  # pydantic's own check ("too_long") runs after the items
        CompletionRequest.model_validate({"prompt": "a", "stop": [1] * 100_000})  # items of the wrong type
    assert [e["type"] for e in err.value.errors()] == ["too_many_items"]
    assert err.value.errors()[0]["ctx"] == {"param": "stop", "count": 100_000, "cap": MAX_STOP}


def test_admission_timeout_while_queued() -> None:
    async def scenario() -> None:
        adm = Admission(max_running=1, max_queue=1)
        await adm.acquire()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(adm.acquire(), 0.01)
        assert adm.waiting == 0 and adm.running == 1

    asyncio.run(scenario())


class _FedEngine:
    """Engine requests that yield exactly what the test feeds them (to time a race exactly)."""

    def __init__(self) -> None:
        self.feed: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.aborted: list[str] = []
        self.info: dict = {}

    async def generate(self, prompt_token_ids, options, request_id):
        while True:
            out = await self.feed.get()
            yield out
            if out.finished:
                return

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.feed.put_nowait(RequestOutput(request_id, [1], [CompletionOutput(0, "", [], finish_reason="abort")], True))


def test_call_keeps_a_cancellation_that_arrives_with_an_output() -> None:
    """A client's disconnect (the handler task cancelled) that lands in the same loop turn as the
    engine's next output must still stop the call. Python 3.11's asyncio.wait_for dropped it here:
    the request then ran to its end and was never counted as aborted."""

    async def scenario() -> None:
        engine = _FedEngine()
        metrics = ServerMetrics("m")
        call = GenerationCall(engine, Admission(max_running=1, max_queue=0), metrics, "cmpl-1", [[1, 2]],
                              SamplingOptions(max_tokens=100), timeout=60.0, registry={})
        await call.admit()
        seen: list[int] = []

        async def handler() -> None:
            try:
                async for _, out in call.outputs():
                    seen.append(len(out.outputs[0].token_ids))
            finally:
                await call.close("client_disconnect")

        task = asyncio.create_task(handler())
        engine.feed.put_nowait(RequestOutput("cmpl-1-0", [1, 2], [CompletionOutput(0, "a", [5])], False))
        await asyncio.sleep(0.05)
        assert seen == [1]  # the handler is waiting for the next output
        engine.feed.put_nowait(RequestOutput("cmpl-1-0", [1, 2], [CompletionOutput(0, "ab", [5, 6])], False))
        await asyncio.sleep(0)  # the producer hands that output over; the handler is now due to wake
        task.cancel()  # ... and the client's disconnect arrives in the same turn
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(5):
                await task
        assert engine.aborted == ["cmpl-1-0"]
        assert metrics.registry.get_sample_value(
            "chorus:requests_aborted_total", {"model_name": "m", "reason": "client_disconnect"}) == 1

    asyncio.run(scenario())


def test_a_slow_consumer_finds_only_the_newest_output() -> None:
    """Outputs are cumulative: while the consumer does not read, each engine request keeps only its
    newest output (no backlog growing with the square of the length), and nothing is lost: the
    consumer then sees the final output, and the end."""

    async def scenario() -> None:
        engine = _FedEngine()
        call = GenerationCall(engine, Admission(max_running=1, max_queue=0), ServerMetrics("m"), "cmpl-1",
                              [[1, 2]], SamplingOptions(max_tokens=500), timeout=60.0, registry={})
        await call.admit()
        for t in range(1, 501):
            engine.feed.put_nowait(RequestOutput("cmpl-1-0", [1, 2], [CompletionOutput(
                0, "a" * t, list(range(t)), finish_reason="length" if t == 500 else None)], t == 500))
        for _ in range(20):
            await asyncio.sleep(0)
        assert engine.feed.empty() and call.buffered == 1  # 500 outputs produced, one held
        seen = [len(out.outputs[0].token_ids) async for _, out in call.outputs()]
        assert seen == [500]
        await call.close(None)

    asyncio.run(scenario())


def _qwen_tokenizer():
    from transformers import AutoTokenizer

    from transfer import zoo

    return AutoTokenizer.from_pretrained(zoo.tokenizer_dir("qwen2"))


def test_a_huge_prompt_does_not_hold_up_a_small_one() -> None:
    """Two tokenizer threads, each with its own tokenizer copy: a short prompt sent while a huge one
    is being tokenized is done first, and both come out right."""
    from server.prompts import Tokenization

    tok = _qwen_tokenizer()
    tokenization = Tokenization(tok, workers=2)
    huge = "word " * 400_000

    async def scenario() -> list[str]:
        done: list[str] = []

        async def run(name: str, text: str) -> list[int]:
            ids = await tokenization.encode(text, False)
            done.append(name)
            return ids

        big = asyncio.create_task(run("huge", huge))
        await asyncio.sleep(0.05)
        small = await run("small", "hello there")
        assert small == tok.encode("hello there", add_special_tokens=False)
        assert len(await big) == len(tok.encode(huge, add_special_tokens=False))
        return done

    try:
        assert asyncio.run(scenario()) == ["small", "huge"]
    finally:
        tokenization.close()


def test_the_tokenizer_backlog_is_bounded() -> None:
    from server.prompts import Tokenization

    tokenization = Tokenization(_qwen_tokenizer(), workers=1, max_pending=1)

    async def scenario() -> None:
        busy = asyncio.create_task(tokenization.encode("word " * 200_000, False))
        await asyncio.sleep(0)
        with pytest.raises(APIError) as err:
            await tokenization.encode("hi", False)
        assert err.value.status == 429 and err.value.code == "tokenizer_busy"
        await busy
        assert await tokenization.encode("hi", False)  # room again

    try:
        asyncio.run(scenario())
    finally:
        tokenization.close()


# ----------------------------------------------------------------------------- auth


def test_auth_checks() -> None:
    assert key_matches("Bearer sk-1", "sk-1") and key_matches("bearer  sk-1", "sk-1")
    assert not key_matches("Bearer sk-2", "sk-1") and not key_matches(None, "sk-1")
    assert not key_matches("Basic sk-1", "sk-1")
    assert is_protected("/v1/completions") and is_protected("/tokenize")
    assert not is_protected("/health") and not is_protected("/metrics")


# ----------------------------------------------------------------------------- logprobs


def _namer(as_ids: bool = False) -> TokenNamer:
    texts = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "é"}
    return TokenNamer(lambda t: texts[t], lambda t: texts[t].encode(), as_ids)


def test_completion_logprobs_shape() -> None:
    entries = [None, TokenLogprob(2, -0.5, [(2, -0.5), (3, -1.0)]), TokenLogprob(3, -2.0, [(4, -0.1)])]
    out = completion_logprobs(entries, [1, 2, 3], _namer())
    assert out.tokens == ["Hel", "lo", " wor"]
    assert out.text_offset == [0, 3, 5]
    assert out.token_logprobs == [None, -0.5, -2.0]
    assert out.top_logprobs[0] is None
    assert out.top_logprobs[1] == {"lo": -0.5, " wor": -1.0}
    assert out.top_logprobs[2] == {"ld": -0.1, " wor": -2.0}  # the chosen token is always included
    assert completion_logprobs(entries[1:], [2, 3], _namer(), initial_offset=10).text_offset == [10, 12]
    assert completion_logprobs(entries[1:], [2, 3], _namer(True)).tokens == ["token_id:2", "token_id:3"]


def test_chat_logprobs_shape_and_infinities() -> None:
    entries = [TokenLogprob(5, float("-inf"), [(1, -0.1), (2, -0.2)])]
    content = chat_logprobs(entries, [5], _namer(), top_n=1).content
    assert content[0].token == "é" and content[0].bytes == [0xC3, 0xA9]
    assert content[0].logprob == MIN_LOGPROB
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [("Hel", -0.1)]
    json.dumps(content[0].model_dump())  # finite: JSON-serialisable


def test_member_logprobs() -> None:
    assert member_logprobs([TokenLogprob(1, -1.0)]) is None
    got = member_logprobs([TokenLogprob(1, -1.0, [], {"a": -0.5, "b": float("-inf")})])
    assert got == [{"a": -0.5, "b": MIN_LOGPROB}]


# ----------------------------------------------------------------------------- sampling options


def test_build_options_for_completions() -> None:
    body = CompletionRequest.model_validate({
        "prompt": "x", "temperature": 0.000001, "top_k": -1, "stop": "\n", "echo": True, "logprobs": 2,
        "seed": 7, "n": 2, "pooling": "logprob_mean", "member_weights": {"qwen": 2, "llama": 1, "gemma": 0.5},
        "return_member_logprobs": True,
    })
    opts = build_options(body, max_tokens=5, vocab_size=100, members=MEMBERS)
    assert opts.temperature == 0.0 and opts.top_k == 0 and opts.stop == ("\n",)
    assert opts.logprobs == 2 and opts.prompt_logprobs == 2 and opts.seed == 7 and opts.n == 2
    assert opts.pooling == "logprob_mean" and opts.weights == (1.0, 2.0, 0.5) and opts.member_logprobs


def test_build_options_for_chat() -> None:
    body = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 3, "top_k": 10**6,
    })
    opts = build_options(body, max_tokens=5, vocab_size=100, members=MEMBERS)
    assert opts.logprobs == 3 and opts.prompt_logprobs is None and opts.top_k == 0


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "logit_bias": {"one": 5}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"100": 5}}, "logit_bias"),
        ({"prompt": "x", "suffix": "end"}, "suffix"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "stop": ["ok", ""]}, "stop"),
        ({"prompt": "x", "stop_token_ids": [100]}, "stop_token_ids"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "x", "member_weights": [1, 2]}, "member_weights"),
        ({"prompt": "x", "member_weights": {"llama": 1, "qwen": 1, "other": 1}}, "member_weights"),
    ],
)
def test_build_options_rejects(body, param) -> None:
    with pytest.raises(APIError) as err:
        build_options(CompletionRequest.model_validate(body), max_tokens=5, vocab_size=100, members=MEMBERS)
    assert err.value.status == 400 and err.value.param == param


def test_chat_options_reject_unsupported() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(APIError) as err:
        build_options(ChatCompletionRequest.model_validate({"messages": msgs, "top_logprobs": 2}),
                      max_tokens=5, vocab_size=100, members=MEMBERS)
    assert err.value.param == "top_logprobs"
    # tools without tool_choice mean 'auto' (no tool-call parser); a format needs a grammar backend
    for extra, param in [({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
                         ({"response_format": {"type": "json_object"}}, "response_format")]:
        with pytest.raises(APIError) as err:
            answer_shape(ChatCompletionRequest.model_validate({"messages": msgs, **extra}), engine_supports=False)
        assert err.value.param == param


def test_context_check_message_has_the_numbers() -> None:
    check_context(10, 6, 16, "prompt")
    with pytest.raises(APIError) as err:
        check_context(10, 7, 16, "messages")
    assert err.value.code == "context_length_exceeded"
    assert "maximum context length is 16 tokens" in err.value.message and "17 tokens (10 in the messages, 7" in err.value.message


def test_helpers() -> None:
    assert stop_strings(None) == () and stop_strings("a") == ("a",) and stop_strings(["a", "b"]) == ("a", "b")
    assert member_weights(None, MEMBERS) is None and member_weights([1, 2, 3], MEMBERS) == (1.0, 2.0, 3.0)
    assert sse_data({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode() and DONE == b"data: [DONE]\n\n"


# ----------------------------------------------------------------------------- config and CLI


def test_config_validation(tmp_path) -> None:
    ok = ServerConfig(ensemble=str(tmp_path), engine="torch", port=0)
    assert ok.ensemble == str(tmp_path.resolve())
    for bad in [dict(ensemble=str(tmp_path / "missing")), dict(ensemble=str(tmp_path), engine="tpu"),
                dict(ensemble=str(tmp_path), max_queue=-1), dict(ensemble=str(tmp_path), request_timeout=0),
                dict(ensemble=str(tmp_path), port=70000), dict(ensemble=str(tmp_path), dtype="int8"),
                dict(ensemble=str(tmp_path), engine="torch", tensor_parallel_size=2)]:
        with pytest.raises(ConfigError):
            ServerConfig(**bad)


def test_cli_reads_env_and_flags_win(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CHORUS_ENSEMBLE", str(tmp_path))
    monkeypatch.setenv("CHORUS_PORT", "9123")
    monkeypatch.setenv("CHORUS_ENGINE", "torch")
    monkeypatch.setenv("CHORUS_API_KEY", "sk-env")
    monkeypatch.setenv("CHORUS_REQUEST_TIMEOUT", "none")
    config = config_from_args(build_parser().parse_args(["--port", "9200", "--max-queue", "3"]))
    assert config.ensemble == str(tmp_path.resolve()) and config.port == 9200 and config.engine == "torch"
    assert config.api_key == "sk-env" and config.max_queue == 3 and config.request_timeout is None
    text = banner(config, 9200)
    assert "http://localhost:9200" in text and "curl" in text and "Authorization: Bearer" in text


def test_every_container_variable_reaches_the_config(tmp_path, monkeypatch) -> None:
    """The CHORUS_* names docker/compose.yaml and the images set, each read by `serve`."""
    values = {
        "CHORUS_ENSEMBLE": str(tmp_path), "CHORUS_HOST": "0.0.0.0", "CHORUS_PORT": "8001",
        "CHORUS_ENGINE": "vllm", "CHORUS_TENSOR_PARALLEL_SIZE": "2", "CHORUS_MAX_MODEL_LEN": "256",
        "CHORUS_API_KEY": "sk-c", "CHORUS_MAX_QUEUE": "5", "CHORUS_REQUEST_TIMEOUT": "30",
        "CHORUS_MAX_RUNNING": "4", "CHORUS_DTYPE": "bfloat16", "CHORUS_SERVED_MODEL_NAME": "m",
        "CHORUS_SHUTDOWN_TIMEOUT": "2",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    config = config_from_args(build_parser().parse_args([]))
    assert (config.host, config.port, config.engine, config.tensor_parallel_size) == ("0.0.0.0", 8001, "vllm", 2)
    assert (config.max_model_len, config.api_key, config.max_queue, config.request_timeout) == (256, "sk-c", 5, 30.0)
    assert (config.max_running, config.dtype, config.served_model_name, config.shutdown_timeout) == (4, "bfloat16", "m", 2.0)
    # compose passes unset optional settings as empty strings: they mean "not set"
    monkeypatch.setenv("CHORUS_MAX_MODEL_LEN", "")
    monkeypatch.setenv("CHORUS_API_KEY", "")
    config = config_from_args(build_parser().parse_args([]))
    assert config.max_model_len is None and config.api_key is None


def test_vllm_only_settings_become_engine_arguments(tmp_path, monkeypatch) -> None:
    """--distributed-executor-backend and --kv-cache-gib reach vLLM's AsyncEngineArgs; bad ones are refused."""
    from server.engines import vllm_engine_args

    monkeypatch.setenv("CHORUS_ENSEMBLE", str(tmp_path))
    monkeypatch.setenv("CHORUS_KV_CACHE_GIB", "1.5")
    config = config_from_args(build_parser().parse_args(["--distributed-executor-backend", "mp"]))
    assert vllm_engine_args(config) == {"distributed_executor_backend": "mp", "kv_cache_memory_bytes": 3 << 29}
    from vllm.platforms import current_platform

    if current_platform.ray_device_key:  # a GPU: vLLM runs Ray workers
        assert ServerConfig(ensemble=str(tmp_path), distributed_executor_backend="ray").distributed_executor_backend == "ray"
    else:  # vLLM's CPU platform has no Ray device: one line at start-up, not a traceback from the engine core
        with pytest.raises(ConfigError, match="needs a platform vLLM runs Ray workers on .*: use 'mp' on one host"):
            ServerConfig(ensemble=str(tmp_path), distributed_executor_backend="ray")
    assert vllm_engine_args(ServerConfig(ensemble=str(tmp_path))) == {}
    for bad in [dict(kv_cache_gib=0), dict(kv_cache_gib=float("nan")), dict(distributed_executor_backend="slurm"),
                dict(engine="torch", kv_cache_gib=2.0), dict(engine="torch", distributed_executor_backend="mp")]:
        with pytest.raises(ConfigError):
            ServerConfig(ensemble=str(tmp_path), **bad)


def test_vllm_engine_flags_on_the_command_line(tmp_path, monkeypatch, capsys) -> None:
    """vLLM's own flags after serve's (and in CHORUS_VLLM_ARGS, which the command line overrides)
    become AsyncEngineArgs fields through vLLM's parser; --enforce-eager goes to VLLMEngineConfig's
    own field; flags that cannot apply to an ensemble, unknown flags and bad values are one-line errors."""
    from server.cli import main
    from server.engines import vllm_engine_args
    from server.vllm_args import parse_vllm_args

    monkeypatch.setenv("CHORUS_ENSEMBLE", str(tmp_path))
    monkeypatch.setenv("CHORUS_VLLM_ARGS", "--max-num-seqs 4 --scheduling-policy priority")
    args, rest = build_parser().parse_known_args(
        ["--port", "0", "--max-num-seqs", "8", "--no-enable-prefix-caching", "--enforce-eager", "--kv-cache-gib", "1"])
    config = config_from_args(args, rest)
    assert config.engine_args == {"max_num_seqs": 8, "scheduling_policy": "priority",
                                  "enable_prefix_caching": False, "enforce_eager": True}
    assert vllm_engine_args(config) == {**config.engine_args, "kv_cache_memory_bytes": 1 << 30}
    monkeypatch.delenv("CHORUS_VLLM_ARGS")
    for argv, message in [
        (["--engine", "torch", "--max-num-seqs", "8"], "unrecognized arguments: --max-num-seqs 8 (vLLM engine"),
        (["-tp", "2"], "set it with serve's own --tensor-parallel-size"),
        (["--max_model_len", "64"], "set it with serve's own --max-model-len"),
        (["--logprobs-mode", "processed_logprobs"], "--logprobs-mode cannot be used with an ensemble"),
        (["--pipeline-parallel-size", "2"], "--pipeline-parallel-size cannot be used with an ensemble"),
        (["--model", "x"], "--model cannot be used with an ensemble"),
        (["--kv-cache-memory-bytes", "1000"], "use --kv-cache-gib"),
        (["--max-num-seqs", "many"], "invalid int value: 'many'"),
        (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("serve: error: ") and message in err and err.count("\n") == 1, err
    assert parse_vllm_args(["--no-enforce-eager", "-pp", "1"]) == {"enforce_eager": False, "pipeline_parallel_size": 1}
    monkeypatch.setenv("CHORUS_VLLM_ARGS", "--max-num-seqs '8")
    with pytest.raises(ConfigError, match="CHORUS_VLLM_ARGS cannot be split"):
        config_from_args(*build_parser().parse_known_args([]))
    monkeypatch.setenv("CHORUS_VLLM_ARGS", "--served_model_name other")
    with pytest.raises(ValueError, match="serve's own --served-model-name"):
        config_from_args(*build_parser().parse_known_args([]))
    monkeypatch.delenv("CHORUS_VLLM_ARGS")
    assert main(["--help-vllm"]) == 0
    assert "--max-num-seqs" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="vllm engine"):
        ServerConfig(ensemble=str(tmp_path), engine="torch", engine_args={"max_num_seqs": 2})


def test_draft_member_flags(tmp_path, monkeypatch, capsys) -> None:
    """--draft-member/--draft-tokens reach the engine; a member that cannot draft, a hidden-state
    proposer, both ways at once and the torch engine are one-line errors before any engine starts."""
    from server.cli import main
    from server.engines import vllm_engine_args
    import json

    members = {}
    for name, rows, layers in (("small", 100, ["full_attention"] * 2), ("mixed", 100, ["sliding_attention", "full_attention"]),
                               ("wide", 128, None)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"vocab_size": rows, "layer_types": layers}))
        members[name] = folder
    ensemble = tmp_path / "ens"
    ensemble.mkdir()
    (ensemble / "chorus_ensemble.json").write_text(json.dumps({
        "name": "e", "vocab_size": 100, "max_model_len": 64, "rule": "prob_mean", "format_version": 1,
        "members": [{"name": n, "path": str(f), "weight": 1.0, "vocab_size": 100} for n, f in members.items()]}))
    monkeypatch.setenv("CHORUS_ENSEMBLE", str(ensemble))
    config = config_from_args(*build_parser().parse_known_args(["--draft-member", "small", "--draft-tokens", "5"]))
    assert (config.draft_member, config.draft_tokens) == ("small", 5) and vllm_engine_args(config) == {}
    assert config.draft_max_batch is None
    monkeypatch.setenv("CHORUS_DRAFT_MAX_BATCH", "4")
    assert config_from_args(*build_parser().parse_known_args(["--draft-member", "small"])).draft_max_batch == 4
    monkeypatch.delenv("CHORUS_DRAFT_MAX_BATCH")
    for argv, message in [
        (["--draft-member", "nobody"], "draft member 'nobody' is not in the ensemble (members: small, mixed, wide)"),
        (["--draft-member", "mixed"], "mixes attention kinds"),
        (["--draft-member", "wide"], "has 128 vocabulary rows, the ensemble 100"),
        (["--draft-member", "small", "--draft-tokens", "0"], "draft_tokens must be"),
        (["--draft-member", "small", "--engine", "torch"], "needs the vllm engine"),
        (["--draft-member", "small", "--draft-max-batch", "0"], "draft_max_batch must be an integer >= 1, got 0"),
        (["--draft-max-batch", "4"], "--draft-max-batch needs --draft-member"),
        (["--speculative-config", '{"method": "eagle3", "model": "x", "num_speculative_tokens": 2}'],
         "speculative method 'eagle3' does not work on an ensemble"),
        (["--draft-member", "small", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'],
         "either --draft-member or --speculative-config"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("serve: error: ") and message in err and err.count("\n") == 1, err
    ngram = config_from_args(*build_parser().parse_known_args(
        ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}']))
    assert ngram.engine_args["speculative_config"]["method"] == "ngram"


def test_intel_openmp_flag_and_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHORUS_ENSEMBLE", str(tmp_path))
    monkeypatch.delenv("CHORUS_INTEL_OPENMP", raising=False)
    assert config_from_args(*build_parser().parse_known_args([])).intel_openmp
    assert not config_from_args(*build_parser().parse_known_args(["--no-intel-openmp"])).intel_openmp
    for off in ("0", "false", "off"):
        monkeypatch.setenv("CHORUS_INTEL_OPENMP", off)
        assert not config_from_args(*build_parser().parse_known_args([])).intel_openmp


def test_logit_bias_becomes_sorted_clamped_pairs() -> None:
    body = CompletionRequest(prompt="x", logit_bias={"9": 250, "3": -1e9, "5": 0.5, "05": 7, "+9": 1})
    opts = build_options(body, max_tokens=5, vocab_size=100, members=MEMBERS)
    assert opts.logit_bias == ((3, -100.0), (5, 7.0), (9, 1.0))  # the last key naming an id wins
    assert build_options(CompletionRequest(prompt="x"), max_tokens=5, vocab_size=100, members=MEMBERS).logit_bias == ()
