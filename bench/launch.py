"""Servers for the bench scripts: an OpenAI-compatible server command (`launched`: chorus's
`serve`, or vLLM's own server) on a free loopback port, ready once /health answers 200 and
terminated on exit; `served` is chorus's `serve` on an ensemble folder that way."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.errors import DownstreamError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served(ensemble: Path, engine: str, log_path: Path, extra_args: Sequence[str] = (),
           startup_timeout: float = 600.0, env: Mapping[str, str] | None = None,
           ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Run `serve` on `ensemble` on a free localhost port until /health is 200; yield (root URL,
    the /v1/models card); stop the server on exit. `env` adds environment variables."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "--ensemble", str(ensemble), "--engine", engine,
           "--host", "127.0.0.1", "--port", str(port), *extra_args]
    with launched(cmd, port, log_path, startup_timeout, env, what="serve") as ready:
        yield ready


@contextlib.contextmanager
def launched(cmd: Sequence[str], port: int, log_path: Path, startup_timeout: float = 600.0,
             env: Mapping[str, str] | None = None, what: str = "the server",
             ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Run an OpenAI-compatible server command listening on localhost `port` until /health is
    200 (chorus's `serve` and vLLM's own server both have it); yield (root URL, the first
    /v1/models card); terminate it on exit. Its output goes to `log_path`."""
    full_env = _server_env(env)
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=full_env)
        try:
            _wait_until_healthy(proc, url, log_path, startup_timeout, what)
            yield url, _first_card(url, full_env)
        finally:
            _stop(proc)


def _server_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """This process's environment plus `env`, offline, with a small vLLM CPU KV cache by default."""
    full = {**os.environ, **(env or {})}
    full.setdefault("HF_HUB_OFFLINE", "1")
    full.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # vLLM would otherwise reserve most of the RAM
    return full


def _wait_until_healthy(proc: subprocess.Popen, url: str, log_path: Path, startup_timeout: float,
                        what: str) -> None:
    """Poll `url`/health every second until 200; DownstreamError if the server exits or times out."""
    import httpx

    deadline = time.monotonic() + startup_timeout
    while True:
        if proc.poll() is not None:
            raise DownstreamError(f"{what} exited with code {proc.returncode} before it was ready: "
                                  f"{_last_line(log_path)} (log: {log_path})")
        if time.monotonic() > deadline:
            raise DownstreamError(f"{what} was not ready within {startup_timeout:.0f} s (log: {log_path})")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(1.0)


def _first_card(url: str, env: Mapping[str, str]) -> dict[str, Any]:
    """The first model card of /v1/models (with the API key of `env`'s CHORUS_API_KEY, if any)."""
    import httpx

    headers = {"Authorization": f"Bearer {env['CHORUS_API_KEY']}"} if env.get("CHORUS_API_KEY") else {}
    return httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]


def _stop(proc: subprocess.Popen) -> None:
    """Terminate; kill after 60 s."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"
