"""Start-up and shutdown: /health is 503 until the engine is ready, shutdown aborts what is in
flight and shuts the engine down, and the `serve` CLI works from environment variables."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from ensemble.protocol import SamplingOptions
from server.config import ServerConfig
from server.engines import load_engine
from server_harness import ServerThread

LONG = {"prompt": "Tell me a long story", "max_tokens": 1000, "ignore_eos": True, "stream": True}


def test_health_503_while_loading_then_graceful_shutdown(server_ensemble: Path) -> None:
    config = ServerConfig(ensemble=str(server_ensemble), engine="torch", host="127.0.0.1", port=0,
                          shutdown_timeout=1.0)
    gate = threading.Event()

    async def gated_loader():  # the real engine, held back until the test has looked at /health
        await asyncio.to_thread(gate.wait, 120)
        return await load_engine(config)

    server = ServerThread(config, engine_loader=gated_loader)
    server.thread.start()
    assert server._listening_event.wait(60)
    try:
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_loading"
        busy = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
        assert httpx.get(f"{server.url}/metrics").status_code == 200
        gate.set()
        server.wait_until(lambda: httpx.get(f"{server.url}/health").status_code == 200, timeout=120,
                          what="the engine to load")
        engine = server.engine
        metrics = server.state.ready.metrics

        # A stream in flight when the server is told to stop: after the grace period it is aborted,
        # its client gets an error event and [DONE], and the engine is shut down.
        events: list[str] = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=LONG, timeout=60) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
                    break
            stopper = threading.Thread(target=server.stop)
            stopper.start()
            events += [line[6:] for line in lines if line.startswith("data: ")]
        stopper.join(60)
    finally:
        gate.set()
        if server.thread.is_alive():
            server.stop()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "shutting_down"
    assert metrics.registry.get_sample_value(
        "chorus:requests_aborted_total", {"model_name": "pair", "reason": "shutdown"}) == 1.0
    assert server.state.draining and server.state.calls == {}

    async def try_generate():
        async for _ in engine.generate([1, 2], SamplingOptions(max_tokens=1), "after-shutdown"):
            pass

    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(try_generate())


def _serve(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        # One OpenMP thread: see conftest.one_torch_thread.
        [sys.executable, "-m", "server.cli", *args], env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).resolve().parents[2],
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_cli_from_environment(server_ensemble: Path) -> None:
    port = _free_port()
    env = {"CHORUS_ENSEMBLE": str(server_ensemble), "CHORUS_ENGINE": "torch", "CHORUS_PORT": str(port),
           "CHORUS_API_KEY": "sk-cli", "CHORUS_LOG_LEVEL": "info", "HF_HUB_OFFLINE": "1"}
    proc = _serve(env)
    url = f"http://127.0.0.1:{port}"
    try:
        seen: list[int] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and 200 not in seen:
            assert proc.poll() is None, proc.stdout.read()
            try:
                seen.append(httpx.get(f"{url}/health").status_code)
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert seen and seen[0] == 503 and seen[-1] == 200  # 503 while the engine loads
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                       headers={"Authorization": "Bearer sk-cli"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "Hi"}).status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    # uvicorn re-raises the signal after its graceful shutdown, so the exit is "killed by SIGTERM".
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "engine shut down" in out and "Application shutdown complete" in out
    assert f"chorus is listening on http://localhost:{port}" in out and "curl" in out and "Bearer" in out


def test_serve_cli_exits_when_the_engine_cannot_load(tmp_path: Path) -> None:
    proc = _serve({"HF_HUB_OFFLINE": "1"}, "--ensemble", str(tmp_path), "--engine", "torch",
                  "--port", str(_free_port()), "--log-level", "warning")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "the engine failed to load" in out


def test_serve_cli_rejects_bad_settings(tmp_path: Path) -> None:
    proc = _serve({}, "--ensemble", str(tmp_path / "missing"), "--engine", "torch")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "does not exist" in out and len(out.strip().splitlines()) == 1
