"""Hostile input, oversized requests, a dead engine and exposure: each case here crashed the server
(500), was accepted when it must not be, or leaked server details before the hardening fixes.

Most run against the session's reference-engine server (`torch_server`, with an API key); the
dead-engine tests start their own server, since they kill its engine.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.config import ServerConfig
from server.protocol import MAX_SEQUENCES, MAX_STOP, MAX_STOP_TOKEN_IDS
from server_harness import API_KEY, ServerThread

SURROGATE = "\ud800"  # a lone surrogate: json.dumps writes it as the escape "\ud800"


def _post(http: httpx.Client, path: str, body: dict) -> httpx.Response:
    """POST `body` as JSON text exactly as `json.dumps` writes it (lone surrogates as escapes)."""
    return http.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# ----------------------------------------------------------------------------- invalid Unicode

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
SURROGATE_CASES = [
    ("/v1/completions", {"prompt": f"a{SURROGATE}b", "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": [f"ok", SURROGATE], "max_tokens": 1}, "prompt[1]"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "model": SURROGATE}, "model"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "stop": SURROGATE}, "stop"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "stop": ["x", f"y{SURROGATE}"]}, "stop[1]"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "user": SURROGATE}, "user"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "an_unknown_extra": {SURROGATE: 1}}, "an_unknown_extra"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": SURROGATE}]}, "messages[0].content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
     "messages[0].content[0].text"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x", "name": SURROGATE}]},
     "messages[0].name"),
    ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"a": [SURROGATE]}}, "chat_template_kwargs.a[0]"),
    ("/tokenize", {"prompt": SURROGATE}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": SURROGATE}]}, "messages[0].content"),
    ("/detokenize", {"tokens": [1], "model": SURROGATE}, "model"),
]


@pytest.mark.parametrize("path, body, param", SURROGATE_CASES, ids=[c[2] + "@" + c[0] for c in SURROGATE_CASES])
def test_strings_that_are_not_unicode_text_are_a_400_naming_the_field(http: httpx.Client, path: str, body: dict,
                                                                      param: str) -> None:
    error = _error(_post(http, path, body), 400)
    assert error["param"] == param and "not valid Unicode" in error["message"]


def test_valid_non_ascii_text_still_passes(http: httpx.Client) -> None:
    r = _post(http, "/v1/completions", {"prompt": "naïve 日本 🎵", "max_tokens": 1, "stop": ["é"]})
    assert r.status_code == 200, r.text


# ----------------------------------------------------------------------------- messages and sizes


@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "system", "content": None}, {"role": "assistant"}])
def test_a_chat_message_without_content_is_a_400(http: httpx.Client, message: dict) -> None:
    error = _error(_post(http, "/v1/chat/completions", {**CHAT, "messages": [message]}), 400)
    assert error["param"] == "messages[0]" and "needs 'content'" in error["message"]


def test_lists_a_client_controls_are_capped(http: httpx.Client) -> None:
    too_many_stops = {"prompt": "a", "max_tokens": 1, "stop": ["x"] * (MAX_STOP + 1)}
    error = _error(_post(http, "/v1/completions", too_many_stops), 400)
    assert error["param"] == "stop" and f"has {MAX_STOP + 1} items; at most {MAX_STOP}" in error["message"]
    long_stop = {"prompt": "a", "max_tokens": 1, "stop": "x" * 5000}
    assert _error(_post(http, "/v1/completions", long_stop), 400)["param"] == "stop"
    ids = {"prompt": "a", "max_tokens": 1, "stop_token_ids": [1] * (MAX_STOP_TOKEN_IDS + 1)}
    assert _error(_post(http, "/v1/completions", ids), 400)["param"] == "stop_token_ids"
    chat_stops = {**CHAT, "stop": ["x"] * 100_000}
    error = _error(_post(http, "/v1/chat/completions", chat_stops), 400)
    assert error["param"] == "stop" and "has 100000 items" in error["message"]


def test_prompts_times_n_is_capped_before_tokenizing(http: httpx.Client) -> None:
    body = {"prompt": ["a"] * 64, "n": MAX_SEQUENCES // 64 + 1, "max_tokens": 1}
    error = _error(_post(http, "/v1/completions", body), 400)
    assert error["param"] == "n" and f"at most {MAX_SEQUENCES}" in error["message"]
    ok = {"prompt": ["a"] * 2, "n": 2, "max_tokens": 1, "temperature": 0}
    assert len(_post(http, "/v1/completions", ok).json()["choices"]) == 4


def test_a_huge_body_is_refused_from_its_length_before_parsing(torch_server: ServerThread) -> None:
    limit = torch_server.config.max_body_bytes
    body = b'{"prompt": "' + b"a" * limit + b'"}'
    started = time.monotonic()
    r = httpx.post(f"{torch_server.url}/v1/completions", content=body, timeout=60,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert time.monotonic() - started < 10
    assert _error(r, 413)["code"] == "request_too_large"


def test_a_chunked_body_is_cut_off_at_the_limit(torch_server: ServerThread) -> None:
    limit = torch_server.config.max_body_bytes
    sent = 0

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must count the bytes
        nonlocal sent
        yield b'{"prompt": "'
        while sent < 4 * limit:
            sent += 1 << 20
            yield b"a" * (1 << 20)
        yield b'"}'

    try:
        r = httpx.post(f"{torch_server.url}/v1/completions", content=chunks(), timeout=60,
                       headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    except httpx.HTTPError:  # the server may close the connection while the client still sends
        r = None
    if r is not None:
        assert _error(r, 413)["code"] == "request_too_large"
    assert sent < 4 * limit, "the server read the whole body"
    # and the server goes on serving
    ok = httpx.post(f"{torch_server.url}/v1/completions", json={"prompt": "a", "max_tokens": 1},
                    headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert ok.status_code == 200


# ----------------------------------------------------------------------------- what errors reveal


def test_a_500_names_an_error_id_not_the_exception(http: httpx.Client, torch_server: ServerThread,
                                                   monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    async def broken(*args, **kwargs):
        raise RuntimeError("secret detail at /srv/private/path")
        yield  # pragma: no cover

    monkeypatch.setattr(torch_server.engine, "generate", broken)
    with caplog.at_level("ERROR", logger="chorus.server"):
        error = _error(_post(http, "/v1/completions", {"prompt": "a", "max_tokens": 1}), 500)
    assert "secret" not in error["message"] and "RuntimeError" not in error["message"]
    assert error["code"].startswith("err-") and error["code"] in error["message"]
    assert any(error["code"] in r.getMessage() and r.exc_info for r in caplog.records)


def test_models_shows_no_filesystem_paths(http: httpx.Client, server_ensemble: Path) -> None:
    text = http.get("/v1/models").text
    assert str(server_ensemble) not in text and str(server_ensemble.parent) not in text
    card = http.get("/v1/models").json()["data"][0]
    assert card["root"] == card["id"] and [m["path"] for m in card["ensemble"]["members"]] == ["alpha", "beta"]


# ----------------------------------------------------------------------------- authentication


@pytest.mark.parametrize("path", ["/v1%2Fmodels", "//v1/models", "/v1/../v1/models", "/V1/models", "/tokenize/",
                                  "/openapi.json/../v1/models"])
def test_odd_paths_cannot_skip_the_key(torch_server: ServerThread, path: str) -> None:
    r = httpx.get(f"{torch_server.url}{path}")
    assert r.status_code in (401, 404) and r.status_code != 200
    if r.status_code == 404:  # httpx normalises some paths; then the route must not have served it
        assert "data" not in r.text


def test_a_root_path_prefix_cannot_skip_the_key(server_ensemble: Path) -> None:
    """Behind a proxy that mounts the app under a prefix (ASGI root_path), protected routes still
    need the key; the open ones stay open."""
    from fastapi.testclient import TestClient

    from server.app import create_app

    config = ServerConfig(ensemble=str(server_ensemble), api_key=API_KEY)
    app = create_app(config, engine_loader=_fails_to_load)
    with TestClient(app, root_path="/api") as tc:
        assert tc.get("/api/v1/models").status_code == 401
        assert tc.get("/v1/models").status_code == 401
        assert tc.get("/api/health").status_code == 503  # open (no engine loads here)
        assert tc.get("/api/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 503


async def _fails_to_load():
    raise RuntimeError("no engine in this test")


def test_keys_are_stripped_and_a_blank_key_is_refused(server_ensemble: Path) -> None:
    from server.config import ConfigError

    assert ServerConfig(ensemble=str(server_ensemble), api_key="  sk-1\n").api_key == "sk-1"
    for blank in ("", "   ", "\t\n"):
        with pytest.raises(ConfigError, match="api_key is empty"):
            ServerConfig(ensemble=str(server_ensemble), api_key=blank)
    assert ServerConfig(ensemble=str(server_ensemble), host="0.0.0.0").exposed
    assert not ServerConfig(ensemble=str(server_ensemble)).exposed


# ----------------------------------------------------------------------------- a dead engine


@pytest.fixture()
def doomed_server(server_ensemble: Path) -> Iterator[tuple[ServerThread, list[str]]]:
    """A server of its own (its engine gets killed), recording the engine-dead callback."""
    died: list[str] = []
    config = ServerConfig(ensemble=str(server_ensemble), host="127.0.0.1", port=0, engine="torch",
                          api_key=API_KEY, request_timeout=60.0)
    server = ServerThread(config, on_engine_dead=died.append).start()
    try:
        yield server, died
    finally:
        server.stop()


def _kill_worker(engine) -> None:
    """End the reference engine's worker thread as a crash would (an error outside its guards)."""
    def crash(*args, **kwargs):
        raise SystemExit("simulated crash of the engine's worker")

    engine._retire = crash
    with engine._cond:
        engine._cond.notify()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the simulated crash
def test_a_dead_engine_turns_health_and_requests_into_503s(doomed_server) -> None:
    server, died = doomed_server
    headers = {"Authorization": f"Bearer {API_KEY}"}
    long_request: dict = {}

    def run_long() -> None:  # in flight when the engine dies
        long_request["response"] = httpx.post(
            f"{server.url}/v1/completions", headers=headers, timeout=60,
            json={"prompt": "a", "max_tokens": 400, "ignore_eos": True, "temperature": 0})

    thread = threading.Thread(target=run_long)
    thread.start()
    server.wait_until(lambda: server.state.calls, what="the long request to start")
    _kill_worker(server.engine)
    server.wait_until(lambda: httpx.get(f"{server.url}/health").status_code == 503, what="/health 503")
    assert _error(httpx.get(f"{server.url}/health"), 503)["code"] in ("engine_dead",)
    thread.join(30)
    assert _error(long_request["response"], 503)["code"] == "engine_dead"
    r = httpx.post(f"{server.url}/v1/completions", headers=headers, json={"prompt": "a", "max_tokens": 1})
    error = _error(r, 503)
    assert error["code"] == "engine_dead" and "restart" in error["message"]
    server.wait_until(lambda: bool(died), what="the engine-dead callback")
    assert "worker thread" in died[0]


# ----------------------------------------------------------------------------- slow readers


@pytest.fixture()
def impatient_server(server_ensemble: Path) -> Iterator[ServerThread]:
    """A server that cuts off a stream whose client reads nothing for 1 s."""
    config = ServerConfig(ensemble=str(server_ensemble), host="127.0.0.1", port=0, engine="torch",
                          api_key=API_KEY, request_timeout=120.0, stream_stall_timeout=1.0)
    server = ServerThread(config).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow  # about 100 s: the socket buffers take megabytes to fill (the unit test below is fast)
def test_a_stream_whose_client_never_reads_is_cut_off(impatient_server: ServerThread) -> None:
    """The client sends a streaming request with a big answer (32 choices, 20 logprobs each) and
    never reads: once the socket buffers are full the server's send waits, and after the stall
    timeout the stream ends and its sequences are aborted, instead of running to the end for
    nobody while the server holds what it made."""
    import socket

    server = impatient_server
    before = server.metric("chorus:requests_aborted_total", reason="slow_client")
    body = json.dumps({"prompt": "a", "max_tokens": 400, "n": 32, "ignore_eos": True, "stream": True,
                       "logprobs": 20}).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: chorus\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        server.wait_until(lambda: server.metric("chorus:requests_aborted_total", reason="slow_client") == before + 1,
                          timeout=90, what="the stalled stream to be cut off")
        server.wait_until(lambda: not server.state.calls, what="the call to close")
        assert server.engine.stats().num_running == 0
    finally:
        sock.close()
    ok = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 1},
                    headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert ok.status_code == 200


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_sse_response_ends_a_stalled_stream_as_slow_client(spec_version: str) -> None:
    """The HTTP server's `send` blocks while the client reads nothing: past the stall timeout the
    response ends, the body generator is closed, and `on_close` hears `slow_client`."""
    import asyncio

    from server.sse import SSEResponse

    async def scenario() -> tuple[list[str], int, bool]:
        closed: list[str] = []
        made = 0
        generator_closed = False

        async def events():
            nonlocal made, generator_closed
            try:
                while True:
                    made += 1
                    yield b"data: {}\n\n"
            finally:
                generator_closed = True

        async def on_close(reason: str) -> None:
            closed.append(reason)

        sent = 0

        async def send(message) -> None:  # takes the headers and one event, then never again
            nonlocal sent
            sent += 1
            if sent > 2:
                await asyncio.Event().wait()

        async def receive():
            await asyncio.Event().wait()

        scope = {"type": "http", "asgi": {"spec_version": spec_version}}
        response = SSEResponse(events(), on_close, stall_timeout=0.2)
        async with asyncio.timeout(10):
            await response(scope, receive, send)
        return closed, made, generator_closed

    closed, made, generator_closed = asyncio.run(scenario())
    assert closed == ["slow_client"] and generator_closed
    assert made <= 3  # events are made as the client takes them, not piled up
