"""Client keys with quotas (server/clients.py): the keys file's checks, the key check naming the
client, and a real server where a client at its `max_running` waits in its own queue while
another client's request runs at once."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_harness import ServerThread, start_server

from server.auth import matching_client
from server.clients import ClientKey, ClientKeysError, load_client_keys, parse_client_keys
from server.config import ConfigError, ServerConfig

HEAVY, LIGHT = "sk-heavy-client", "sk-light-client"
LONG = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "temperature": 0}


def test_keys_file_is_checked_at_the_edge(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([{"name": "a", "key": " sk-a ", "max_running": 2}, {"name": "b", "key": "sk-b"}]))
    assert load_client_keys(path) == (ClientKey("a", "sk-a", 2), ClientKey("b", "sk-b"))
    bad = [
        ({"name": "a", "key": "k"}, "expected a non-empty JSON list"),
        ([], "expected a non-empty JSON list"),
        (["sk"], r"\[0\]: expected an object"),
        ([{"name": "a", "key": "  "}], r"\[0\]: client 'a' has an empty key"),
        ([{"name": "a", "key": "k", "max_running": 0}], "max_running must be a positive integer"),
        ([{"name": "a", "key": "k", "quota": 1}], "unknown field"),
        ([{"name": "a", "key": "k"}, {"name": "b", "key": "k"}], "two clients share a key"),
        ([{"name": "a", "key": "k"}, {"name": "a", "key": "j"}], "two clients share a name"),
    ]
    for data, message in bad:
        with pytest.raises(ClientKeysError, match=message):
            parse_client_keys(data)
    path.write_text("{")
    with pytest.raises(ClientKeysError, match="not valid JSON"):
        load_client_keys(path)
    with pytest.raises(ClientKeysError, match="cannot read"):
        load_client_keys(tmp_path / "missing.json")


def test_the_key_names_its_client(server_ensemble: Path) -> None:
    keys = {"sk-a": "a", "sk-main": None}
    assert matching_client("Bearer sk-a", keys) == (True, "a")
    assert matching_client("bearer  sk-main ", keys) == (True, None)
    assert matching_client("Bearer sk-b", keys) == (False, None)
    assert matching_client("Basic sk-a", keys) == (False, None) and matching_client(None, keys) == (False, None)
    with pytest.raises(ConfigError, match="also a client's key"):
        ServerConfig(ensemble=str(server_ensemble), api_key="sk-a", client_keys=(ClientKey("a", "sk-a"),))


@pytest.fixture(scope="module")
def quotas(server_ensemble: Path) -> Iterator[ServerThread]:
    """The reference engine; client 'heavy' may run one sequence at a time, 'light' is bounded only
    by the server (two); one request may wait in each queue."""
    clients = (ClientKey("heavy", HEAVY, max_running=1), ClientKey("light", LIGHT))
    yield from start_server(server_ensemble, engine="torch", max_running=2, max_queue=1, request_timeout=120.0,
                            client_keys=clients)


def test_a_client_at_its_quota_waits_while_another_runs(quotas: ServerThread) -> None:
    url = quotas.url
    ready = quotas.state.ready
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {HEAVY}"}) as heavy:
        with heavy.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as running:
            assert running.status_code == 200
            lines = running.iter_lines()
            next(line for line in lines if line.startswith("data:"))  # heavy's one sequence runs
            waited: dict[str, httpx.Response] = {}
            second = threading.Thread(target=lambda: waited.setdefault("r", httpx.post(
                f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                headers={"Authorization": f"Bearer {HEAVY}"}, timeout=60)))
            second.start()
            quotas.wait_until(lambda: ready.client_admissions["heavy"].waiting == 1, what="heavy's second request queued")
            assert ready.admission.waiting == 0  # it waits in heavy's queue, not the server's
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                           headers={"Authorization": f"Bearer {LIGHT}"}, timeout=60)
            assert r.status_code == 200, r.text  # light runs beside heavy's stream
            assert "r" not in waited and ready.client_admissions["heavy"].running == 1
            assert httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                              headers={"Authorization": "Bearer sk-nobody"}).status_code == 401
            third = heavy.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
            assert third.status_code == 429  # heavy's own queue (--max-queue 1) is full
            assert "client 'heavy' is at capacity: 1 of 1 sequences running" in third.json()["error"]["message"]

        second.join(60)  # the stream closed: heavy's slot goes to its second request
    assert waited["r"].status_code == 200, waited["r"].text
    quotas.wait_until(lambda: ready.client_admissions["heavy"].running == 0 and ready.admission.running == 0,
                      what="every slot given back")
