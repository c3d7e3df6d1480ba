"""Fixtures for the server tests: one tiny ensemble per session and a reference-engine server.

The tiny models come from the ensemble helper's builders (tests/ensemble/conftest.py, loaded by
path). The server tests use one session-wide pair of tiny Qwen2-architecture members (different
seeds, weights 1:2): head size 32 is one that vLLM's CPU attention supports, so the same folder
serves both engines, and two small members keep the CPU cost of every request low.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server_harness import API_KEY, ServerThread, start_server


def _load_ensemble_conftest():
    path = Path(__file__).resolve().parents[1] / "ensemble" / "conftest.py"
    spec = importlib.util.spec_from_file_location("chorus_tests_ensemble_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


_fixtures = _load_ensemble_conftest()
MEMBERS = ("alpha", "beta")
WEIGHTS = (1.0, 2.0)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run the reference engine's torch ops on one thread while the server tests run.

    On a small shared machine, torch's default of one OpenMP thread per core makes every thread
    spin-wait on cores that other processes hold: decoding the tiny ensemble went from about 65 to
    about 4 tokens/s under load. One thread keeps the server tests' timings steady.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def server_ensemble(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ensemble folder of two tiny random Qwen2 models on the real Qwen2 tokenizer."""
    root = tmp_path_factory.mktemp("server_ensemble")
    tok = _fixtures.shared_tokenizer_dir()
    members = [
        (name, _fixtures.build_tiny_model("qwen2", root / name, seed=11 + i, tokenizer_dir=tok), weight)
        for i, (name, weight) in enumerate(zip(MEMBERS, WEIGHTS))
    ]
    return _fixtures.build_tiny_ensemble(root / "pair", members, rule="prob_mean", tokenizer_from="alpha")


@pytest.fixture(scope="session")
def torch_server(server_ensemble: Path) -> Iterator[ServerThread]:
    """The reference engine on the tiny pair, with an API key."""
    yield from start_server(server_ensemble, engine="torch", api_key=API_KEY, max_queue=8, request_timeout=120.0,
                            max_refusals=0)  # many tests send bad requests on purpose (throttling: test_server_refusals)


@pytest.fixture()
def client(torch_server: ServerThread):
    """An `openai.OpenAI` client for the torch server."""
    import openai

    with openai.OpenAI(base_url=f"{torch_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture()
def http(torch_server: ServerThread) -> Iterator[httpx.Client]:
    """A raw HTTP client for the torch server, with the API key."""
    with httpx.Client(base_url=torch_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c
