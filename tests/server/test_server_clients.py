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
from server_harness import API_KEY, ServerThread, start_server

from server.auth import matching_client
from server.client_budgets import ClientId
from server.client_budgets import PRUNE_ABOVE, ClientBudgets
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
            quotas.wait_until(lambda: ready.client_budgets.get(ClientId("key", "heavy")).waiting == 1, what="heavy's second request queued")
            assert ready.admission.waiting == 0  # it waits in heavy's queue, not the server's
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                           headers={"Authorization": f"Bearer {LIGHT}"}, timeout=60)
            assert r.status_code == 200, r.text  # light runs beside heavy's stream
            assert "r" not in waited and ready.client_budgets.get(ClientId("key", "heavy")).running == 1
            assert httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                              headers={"Authorization": "Bearer sk-nobody"}).status_code == 401
            third = heavy.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
            assert third.status_code == 429  # heavy's own queue (--max-queue 1) is full
            assert "client 'heavy' is at capacity: 1 of 1 sequences running" in third.json()["error"]["message"]

        second.join(60)  # the stream closed: heavy's slot goes to its second request
    assert waited["r"].status_code == 200, waited["r"].text
    quotas.wait_until(lambda: ready.client_budgets.get(ClientId("key", "heavy")).running == 0 and ready.admission.running == 0,
                      what="every slot given back")


def test_budgets_per_client_key_and_per_address() -> None:
    keys = (ClientKey("heavy", "sk-h", max_running=1), ClientKey("open", "sk-o"))
    assert ClientBudgets(keys, max_queue=2).get(ClientId("key", "open")) is None  # no default: only the server's limit
    budgets = ClientBudgets(keys, max_queue=2, per_client=3)
    heavy = budgets.get(ClientId("key", "heavy"))
    assert heavy is not None and heavy.max_running == 1 and heavy.owner == "client 'heavy'"  # its own max_running wins
    here = budgets.get(ClientId("address", "10.0.0.1"))
    assert here is not None and here.max_running == 3 and here.owner == "address 10.0.0.1"
    assert budgets.get(ClientId("address", "10.0.0.1")) is here  # one budget per client
    assert budgets.get(ClientId("key", "open")).max_running == 3 and budgets.get(None) is None
    here.try_acquire(1)  # a running address is kept; idle ones are dropped past PRUNE_ABOVE
    for i in range(PRUNE_ABOVE):
        budgets.get(ClientId("address", f"10.1.{i // 256}.{i % 256}"))
    assert budgets.get(ClientId("address", "10.0.0.1")) is here and len(budgets) < PRUNE_ABOVE // 2


@pytest.fixture(scope="module")
def per_address(server_ensemble: Path) -> Iterator[ServerThread]:
    """The reference engine with the server's key only: every address may run one sequence."""
    yield from start_server(server_ensemble, engine="torch", api_key=API_KEY, max_running=2, max_queue=1,
                            max_running_per_client=1, request_timeout=120.0)


def test_an_address_at_its_budget_waits_while_another_address_runs(per_address: ServerThread) -> None:
    url, ready = per_address.url, per_address.state.ready
    auth = {"Authorization": f"Bearer {API_KEY}"}
    short = {"prompt": "Hi", "max_tokens": 1}
    home = ready.client_budgets.get(ClientId("address", "127.0.0.1"))

    async def hold() -> None:  # 127.0.0.1's one sequence, held on the server's loop for as long as the test needs
        await home.acquire(1)

    async def give_back() -> None:
        home.release(1)

    per_address.run(hold())
    waited: dict[str, httpx.Response] = {}
    second = threading.Thread(target=lambda: waited.setdefault(
        "r", httpx.post(f"{url}/v1/completions", json=short, headers=auth, timeout=60)))
    second.start()
    per_address.wait_until(lambda: home.waiting == 1, what="127.0.0.1's request queued")
    assert ready.admission.waiting == 0 and ready.admission.running == 0  # it waits in its address's queue
    elsewhere = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=url, timeout=60, headers=auth, transport=elsewhere) as there:
        assert there.post("/v1/completions", json=short).status_code == 200  # another address runs at once
        there_budget = ready.client_budgets.get(ClientId("address", "127.0.0.2"))

        async def hold_there() -> None:
            await there_budget.acquire(1)

        async def free_there() -> None:
            there_budget.release(1)

        per_address.run(hold_there())  # 127.0.0.2 is busy too: its request would wait, beside 127.0.0.1's
        full = there.post("/v1/completions", json=short)
        assert full.status_code == 429 and "1 requests of all clients wait (--max-queue 1)" in full.json()["error"]["message"]
        per_address.run(free_there())
    assert "r" not in waited
    third = httpx.post(f"{url}/v1/completions", json=short, headers=auth, timeout=60)
    assert third.status_code == 429  # 127.0.0.1's own queue (--max-queue 1) is full
    assert "address 127.0.0.1 is at capacity: 1 of 1 sequences running" in third.json()["error"]["message"]
    per_address.run(give_back())
    second.join(60)
    assert waited["r"].status_code == 200, waited["r"].text
    per_address.wait_until(lambda: home.running == 0 and ready.admission.running == 0, what="every slot given back")
    with pytest.raises(ConfigError, match="max_running_per_client must be an integer >= 1"):
        ServerConfig(ensemble=str(per_address.config.ensemble), max_running_per_client=0)
