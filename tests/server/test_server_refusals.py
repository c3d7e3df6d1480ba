"""The refusal budget (server/refusals.py): a client whose requests keep being refused gets 429s
from its headers alone, before its body is read; other clients, and the open paths, are untouched."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_harness import API_KEY, ServerThread, start_server

from server.clients import ClientKey
from server.config import ConfigError, ServerConfig
from server.refusals import RefusalBudget, charged

HEAVY, LIGHT, SPRAY = "sk-refused-heavy", "sk-refused-light", "sk-refused-spray"
BURST = 3  # refills one refusal every 20 s: the test's requests all fall inside one refill


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_empties_with_refusals_and_refills_over_a_minute() -> None:
    clock = Clock()
    budget = RefusalBudget(3, clock=clock)
    for _ in range(3):
        assert budget.retry_after("a") is None
        budget.charge("a")
    assert budget.retry_after("a") == pytest.approx(20.0)  # 3 a minute: one every 20 s
    assert budget.retry_after("b") is None  # every client has its own bucket
    clock.now += 15
    assert budget.retry_after("a") == pytest.approx(5.0)
    clock.now += 5
    assert budget.retry_after("a") is None
    budget.charge("a")
    assert budget.retry_after("a") == pytest.approx(20.0)
    clock.now += 3600  # a long quiet spell fills the bucket, never above `burst`
    for _ in range(3):
        budget.charge("a")
    assert budget.retry_after("a") is not None


def test_a_refused_client_reserves_a_token_per_request_in_flight() -> None:
    clock = Clock()
    budget = RefusalBudget(3, clock=clock)
    assert budget.reserve("a") is False  # never refused: nothing to reserve, nothing held
    budget.charge("a")  # 2 tokens left
    assert budget.reserve("a") and budget.reserve("a")
    assert budget.retry_after("a") == pytest.approx(20.0)  # both tokens held by requests in flight
    budget.settle("a", reserved=True, refused=False)  # one ended well: its token is free again
    assert budget.retry_after("a") is None
    budget.settle("a", reserved=True, refused=True)
    for _ in range(5):
        budget.charge("a")  # overspending goes below zero, down to -burst
    assert budget.retry_after("a") == pytest.approx(80.0)  # from -3 back to 1 at 3 a minute
    clock.now += 3600
    assert budget.retry_after("a") is None and budget.tracked() == 0  # refilled and idle: forgotten


def test_memory_holds_a_bounded_number_of_clients() -> None:
    budget = RefusalBudget(1, clock=Clock(), max_tracked=2)
    for client in ("a", "b", "c"):
        budget.charge(client)
    assert budget.tracked() == 2
    assert budget.retry_after("a") is None and budget.retry_after("c") is not None  # the oldest went first


def test_what_counts_as_a_refusal() -> None:
    assert [charged(s) for s in (200, 400, 401, 404, 413, 422, 429, 500, 503)] == [
        False, True, True, True, True, True, False, False, False]
    with pytest.raises(ValueError, match="positive integer"):
        RefusalBudget(0)


def test_the_setting_is_checked(server_ensemble: Path) -> None:
    with pytest.raises(ConfigError, match="max_refusals must be an integer >= 0"):
        ServerConfig(ensemble=str(server_ensemble), max_refusals=-1)
    assert ServerConfig(ensemble=str(server_ensemble)).max_refusals == 60


@pytest.fixture(scope="module")
def strict(server_ensemble: Path) -> Iterator[ServerThread]:
    clients = (ClientKey("heavy", HEAVY), ClientKey("light", LIGHT), ClientKey("spray", SPRAY))
    yield from start_server(server_ensemble, engine="torch", api_key=API_KEY, client_keys=clients,
                            max_refusals=BURST, request_timeout=120.0)


def _headers_only(url: str, key: str, content_length: int) -> bytes:
    """Send a POST's headers announcing `content_length` bytes, send no body, and return what the
    server answers within 10 s (a server that waited for the body would answer nothing)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: chorus\r\nContent-Type: application/json\r\n"
                     f"Authorization: Bearer {key}\r\nContent-Length: {content_length}\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def _rejections(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("vllm:admission_rejections_total") and 'reason="too_many_refusals"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_refused_too_often_is_throttled_before_its_body_is_read(strict: ServerThread) -> None:
    url = strict.url
    valid = {"prompt": "Hello", "max_tokens": 2}
    hostile = {"prompt": "Hello", "max_tokens": 2, "stop": ["x"] * 100_000}
    before = _rejections(url)
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {HEAVY}"}) as heavy, \
         httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {LIGHT}"}) as light:
        assert heavy.post("/v1/completions", json=valid).status_code == 200  # successes cost nothing
        for _ in range(BURST):
            r = heavy.post("/v1/completions", json=hostile)
            assert r.status_code == 400 and "stop" in r.json()["error"]["message"]
        r = heavy.post("/v1/completions", json=hostile)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "too_many_refusals" and "--max-refusals" in r.json()["error"]["message"]
        assert 1 <= int(r.headers["retry-after"]) <= 20
        assert heavy.post("/v1/completions", json=valid).status_code == 429  # throttled whole, valid or not
        # The 429 comes from the headers: the announced 10 MB body is never sent, never awaited.
        answer = _headers_only(url, HEAVY, 10_000_000)
        assert answer.startswith(b"HTTP/1.1 429") and b"retry-after" in answer.lower()
        # Other clients, and the open paths, are untouched.
        assert light.post("/v1/completions", json=valid).status_code == 200
        assert heavy.get("/health").status_code == 200
    assert _rejections(url) - before == 3


def test_an_address_guessing_keys_is_throttled_but_not_the_clients_with_keys(strict: ServerThread) -> None:
    url = strict.url
    with httpx.Client(base_url=url, timeout=60) as anyone:
        for _ in range(BURST):
            assert anyone.get("/v1/models", headers={"Authorization": "Bearer sk-guess"}).status_code == 401
        r = anyone.get("/v1/models", headers={"Authorization": "Bearer sk-guess-again"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_refusals"
        # The server's own key names no client: its requests from this address share the address's budget.
        assert anyone.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 429
        assert anyone.get("/v1/models", headers={"Authorization": f"Bearer {LIGHT}"}).status_code == 200


def test_hostile_bodies_sent_side_by_side_share_the_budget(strict: ServerThread) -> None:
    """Once refused, a client's requests in flight each hold a token: ten hostile bodies sent at
    once get at most the two refusals its bucket has left, and 429s for the rest."""
    import threading

    hostile = {"prompt": "Hello", "max_tokens": 2, "stop": ["x"] * 100_000}
    auth = {"Authorization": f"Bearer {SPRAY}"}
    assert httpx.post(f"{strict.url}/v1/completions", json=hostile, headers=auth, timeout=60).status_code == 400
    statuses: list[int] = []
    barrier = threading.Barrier(10)

    def send() -> None:
        barrier.wait()
        statuses.append(httpx.post(f"{strict.url}/v1/completions", json=hostile, headers=auth, timeout=60).status_code)

    threads = [threading.Thread(target=send) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(statuses) == 10 and set(statuses) <= {400, 429}
    assert statuses.count(400) <= BURST - 1, statuses
