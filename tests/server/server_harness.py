"""The test harness for the server: a real chorus server (uvicorn on a free localhost port, in a
background thread) running exactly as `serve` runs it, plus ways to peek at its engine.

A plain module (not a conftest) so test files can import it: `from server_harness import ...`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx

from server.app import create_app
from server.config import ServerConfig
from server.serving import ChorusServer

API_KEY = "sk-chorus-test"


class ServerThread:
    """A ChorusServer on 127.0.0.1:<free port>, run on a daemon thread."""

    def __init__(self, config: ServerConfig, engine_loader: Callable | None = None,
                 on_engine_dead: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.app = create_app(config, engine_loader=engine_loader, on_engine_dead=on_engine_dead)
        self.server = ChorusServer(self.app, config, log_level="warning", on_listening=self._listening)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port: int | None = None
        self._listening_event = threading.Event()
        self.thread = threading.Thread(target=self.server.run, name="chorus-test-server", daemon=True)

    def _listening(self, server: ChorusServer) -> None:
        self.loop = asyncio.get_running_loop()
        self.port = server.bound_port
        self._listening_event.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self):
        return self.app.state.chorus

    @property
    def engine(self):
        return self.state.ready.engine

    def start(self, ready_timeout: float = 240.0) -> ServerThread:
        self.thread.start()
        if not self._listening_event.wait(60):
            raise RuntimeError("the test server did not start listening within 60 s")
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.state.load_error:
                raise RuntimeError(f"engine failed to load: {self.state.load_error}")
            if httpx.get(f"{self.url}/health").status_code == 200:
                return self
            time.sleep(0.2)
        raise RuntimeError(f"the engine was not ready within {ready_timeout} s")

    def run(self, coro, timeout: float = 120.0) -> Any:
        """Run `coro` on the server's event loop and return its result."""
        fut: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return fut.result(timeout)

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample from /metrics (0.0 if absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        if self.thread.is_alive():
            raise RuntimeError("the test server did not stop within 60 s")


def start_server(ensemble: Path, **settings: Any) -> Iterator[ServerThread]:
    """Start a server on `ensemble` (ServerConfig fields as keywords), yield it, stop it."""
    config = ServerConfig(ensemble=str(ensemble), host="127.0.0.1", port=0, **settings)
    server = ServerThread(config).start()
    try:
        yield server
    finally:
        server.stop()
