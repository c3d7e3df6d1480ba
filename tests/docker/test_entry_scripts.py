"""The images' HEALTHCHECK script and entry point, run for real (loopback HTTP, real console scripts)."""

from __future__ import annotations

import http.server
import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from dockertools import DOCKER

HEALTHCHECK = DOCKER / "healthcheck.py"
ENTRYPOINT = DOCKER / "entrypoint.sh"


def _healthcheck_module():
    spec = importlib.util.spec_from_file_location("chorus_healthcheck", HEALTHCHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("env", "url"), [
    ({}, "http://127.0.0.1:8000/health"),
    ({"CHORUS_HOST": "0.0.0.0", "CHORUS_PORT": "9001"}, "http://127.0.0.1:9001/health"),
    ({"CHORUS_HOST": "::"}, "http://127.0.0.1:8000/health"),
    ({"CHORUS_HOST": "10.0.0.5", "CHORUS_PORT": ""}, "http://10.0.0.5:8000/health"),
    ({"CHORUS_HOST": "::1"}, "http://[::1]:8000/health"),
])
def test_health_url_follows_the_server_settings(env, url):
    assert _healthcheck_module().health_url(env) == url


class _Health(http.server.BaseHTTPRequestHandler):
    status = 503

    def do_GET(self):  # noqa: N802 (http.server's name)
        code = type(self).status if self.path == "/health" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture()
def health_server():
    handler = type("Handler", (_Health,), {"status": 503})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def _probe(port: int | str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CHORUS_HOST": "0.0.0.0", "CHORUS_PORT": str(port), "CHORUS_HEALTH_TIMEOUT": "3"}
    return subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30)


def test_healthcheck_exit_status_follows_health(health_server):
    server, handler = health_server
    port = server.server_address[1]
    loading = _probe(port)
    assert loading.returncode == 1 and "answered 503" in loading.stdout
    handler.status = 200
    assert _probe(port).returncode == 0


def test_healthcheck_fails_when_nothing_listens(health_server):
    server, _ = health_server
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    down = _probe(port)
    assert down.returncode == 1 and "unhealthy" in down.stdout


def _entry(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the entry point with this venv's console scripts first on PATH (as /opt/venv/bin is)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run([str(ENTRYPOINT), *args], env={**os.environ, "PATH": path, **env},
                          capture_output=True, text=True, timeout=120)


def test_entrypoint_serves_by_default_and_explains_a_missing_ensemble(tmp_path):
    missing = tmp_path / "data" / "ensemble"
    proc = _entry(env={"CHORUS_ENSEMBLE": str(missing), "CHORUS_HOST": "127.0.0.1", "CHORUS_PORT": "0"})
    assert proc.returncode == 2
    assert f"no ensemble folder at {missing}" in proc.stderr  # the entry point's hint
    assert "serve: error:" in proc.stderr and "does not exist" in proc.stderr  # then serve's own error
    flags = _entry("--engine", "nope", env={"CHORUS_ENSEMBLE": str(missing)})
    assert flags.returncode == 2 and "invalid choice: 'nope'" in flags.stderr  # flags reach serve


def test_entrypoint_runs_the_zoo_and_other_commands(tmp_path):
    proc = _entry("zoo", "path", env={"CHORUS_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == tmp_path / "cache" / "zoo"
    proc = _entry("ensemble", "build", "--help", env={})
    assert proc.returncode == 0 and "--member" in proc.stdout
    proc = _entry("python", "-c", "import sys; print(sys.argv[1:])", "a b", env={})
    assert proc.stdout.strip() == "['a b']"
