"""Overload and failure paths on a real server: a full queue gets 429, a slow request gets 504,
and a client that goes away (mid-stream, or before a non-stream answer) has its engine request
aborted and its KV cache freed, as the engine's own stats show."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server_harness import ServerThread, start_server

TIMEOUT_S = 2.0  # the hasty server's --request-timeout: far less than LONG takes (~1000 tokens)
LONG = {"prompt": "Tell me a long story", "max_tokens": 1000, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def limited(server_ensemble: Path) -> Iterator[ServerThread]:
    """One request at a time and one more may wait (a timeout far beyond any test)."""
    yield from start_server(server_ensemble, engine="torch", max_running=1, max_queue=1, request_timeout=120.0)


@pytest.fixture(scope="module")
def hasty(server_ensemble: Path) -> Iterator[ServerThread]:
    """Requests end after TIMEOUT_S seconds."""
    yield from start_server(server_ensemble, engine="torch", max_running=1, max_queue=4, request_timeout=TIMEOUT_S)


def _engine_idle(server: ServerThread) -> bool:
    stats = server.engine.stats()
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0


def _events(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if line.startswith("data: "):
            yield line[len("data: "):]


def test_queue_full_gets_429(limited: ServerThread) -> None:
    url = limited.url
    rejections = limited.metric("vllm:admission_rejections_total", reason="max_num_queued_reqs")
    with httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as running:
            assert running.status_code == 200
            # Keep the iterator: a dropped one closes its connection (httpcore closes a stream
            # abandoned half read), which the server rightly takes for a client that went away.
            events = _events(running.iter_lines())
            next(events)  # the first request is in the engine
            waited: dict[str, httpx.Response] = {}
            waiter = threading.Thread(target=lambda: waited.setdefault(
                "r", httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=30)))
            waiter.start()
            limited.wait_until(lambda: limited.state.ready.admission.waiting == 1, what="a queued request")
            assert limited.metric("vllm:num_requests_waiting") >= 1

            jobs = limited.state.ready.tokenization.jobs
            r = http.post("/v1/completions", json={"prompt": "Hi " * 100_000, "max_tokens": 1})
            assert r.status_code == 429
            assert r.headers["retry-after"] == "1"
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
            assert "--max-queue 1" in err["message"]
            chat = {"messages": [{"role": "user", "content": "Hi " * 100_000}], "max_tokens": 1}
            assert http.post("/v1/chat/completions", json=chat).status_code == 429
            # refused before any tokenizing: a request that cannot run costs the server nothing
            assert limited.state.ready.tokenization.jobs == jobs
        # closing the first stream frees its slot: the queued request runs and succeeds
        waiter.join(30)
    assert waited["r"].status_code == 200, waited["r"].text
    assert limited.metric("vllm:admission_rejections_total", reason="max_num_queued_reqs") == rejections + 2
    limited.wait_until(lambda: _engine_idle(limited), what="an idle engine")


def test_disconnect_mid_stream_aborts_and_frees_the_cache(limited: ServerThread) -> None:
    aborted = limited.metric("chorus:requests_aborted_total", reason="client_disconnect")
    ended = limited.metric("vllm:request_success_total", finished_reason="abort")
    with httpx.Client(base_url=limited.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            events = _events(r.iter_lines())
            first = json.loads(next(events))
            json.loads(next(events))
            assert first["choices"][0]["finish_reason"] is None
            stats = limited.engine.stats()
            assert stats.num_running == 1 and stats.kv_cache_usage > 0
        # leaving the block closes the connection mid-stream
    limited.wait_until(lambda: _engine_idle(limited), what="the engine to free the request")
    assert limited.metric("chorus:requests_aborted_total", reason="client_disconnect") == aborted + 1
    assert limited.metric("chorus:requests_aborted_total", reason="timeout") == 0
    assert limited.state.calls == {} and limited.state.ready.admission.running == 0
    # counted once, although the engine still delivers the aborted request's last output
    assert limited.metric("vllm:request_success_total", finished_reason="abort") == ended + 1


def test_disconnect_before_a_non_stream_answer_aborts(limited: ServerThread) -> None:
    aborted = limited.metric("chorus:requests_aborted_total", reason="client_disconnect")
    # Hang up well before LONG can finish (its 1000 tokens take seconds even on a quiet machine).
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{limited.url}/v1/completions", json=LONG, timeout=0.5)
    limited.wait_until(
        lambda: limited.metric("chorus:requests_aborted_total", reason="client_disconnect") == aborted + 1,
        timeout=60.0, what="the abort")
    limited.wait_until(lambda: _engine_idle(limited), what="an idle engine")
    assert limited.state.ready.admission.running == 0


def test_slow_request_times_out_with_504(hasty: ServerThread) -> None:
    aborted = hasty.metric("chorus:requests_aborted_total", reason="timeout")
    r = httpx.post(f"{hasty.url}/v1/completions", json=LONG, timeout=30)
    assert r.status_code == 504
    err = r.json()["error"]
    assert err["code"] == "request_timeout" and err["type"] == "timeout_error"
    assert hasty.metric("chorus:requests_aborted_total", reason="timeout") == aborted + 1
    hasty.wait_until(lambda: _engine_idle(hasty), what="an idle engine")


def test_slow_stream_ends_with_an_error_event(hasty: ServerThread) -> None:
    with httpx.stream("POST", f"{hasty.url}/v1/completions", json={**LONG, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        events = list(_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert len(events) > 3  # tokens were streamed before the deadline
    hasty.wait_until(lambda: _engine_idle(hasty), what="an idle engine")
