"""The runtime stage run as `docker run` would run it, on this machine: its volumes (the host's
zoo linked in as /cache/zoo), its ENV with the image's defaults, the image's own commands, and the
ENTRYPOINT with no arguments as the server, from start until /health turns 200 to a SIGTERM."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from smoke.build import Rooted, base_environment
from smoke.dockerfile import Instruction, exec_form, one, stage_image_env
from smoke.errors import SmokeError
from smoke.report import Timings

SMOKE_API_KEY = "smoke-test-key"


@dataclass(frozen=True)
class Container:
    """The runtime stage's container as run here: environment, home folder, ENTRYPOINT and
    HEALTHCHECK commands (paths rooted), its loopback port and its rooted /cache."""

    env: dict[str, str]
    home: Path
    entrypoint: list[str]
    healthcheck: list[str]
    port: int
    cache: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class Server:
    """The ENTRYPOINT started as the server: its process (own session), log file and start time."""

    proc: subprocess.Popen
    log_path: Path
    started: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, key: str | None = None,
         timeout: float = 120.0) -> tuple[int, str]:
    """One loopback request: (status, body text); HTTP errors are returned, not raised."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def run_step(argv: list[str], env: dict[str, str], name: str, timings: Timings, cwd: Path) -> None:
    print(f"[smoke] $ {shlex.join(argv)}", flush=True)
    start = time.monotonic()
    proc = subprocess.run(argv, env=env, cwd=cwd)
    if proc.returncode != 0:
        raise SmokeError(f"{name} failed with status {proc.returncode}: {shlex.join(argv)}")
    timings.add(name, time.monotonic() - start)


def host_zoo() -> Path:
    return Path(os.environ.get("CHORUS_CACHE") or Path.home() / ".cache" / "chorus").expanduser() / "zoo"


# ---------------------------------------------------------------- the container's setup


def prepare_container(instructions: list[Instruction], rooted: Rooted) -> Container:
    """The volumes, environment, home folder and commands of a container of the runtime stage."""
    cache = mount_volumes(rooted)
    port = free_port()
    env = runtime_environment(instructions, rooted, port)
    home = rooted.path("/home/chorus")
    home.mkdir(parents=True, exist_ok=True)
    entrypoint = [rooted.rewrite(a) for a in exec_form(one(instructions, "ENTRYPOINT", "runtime"))]
    healthcheck = [rooted.rewrite(a) for a in exec_form(one(instructions, "HEALTHCHECK", "runtime"))]
    return Container(env, home, entrypoint, healthcheck, port, cache)


def mount_volumes(rooted: Rooted) -> Path:
    """The rooted /data and /cache, with this machine's zoo linked in as /cache/zoo; return /cache."""
    data, cache = rooted.path("/data"), rooted.path("/cache")
    data.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    zoo_link = cache / "zoo"
    zoo = host_zoo()
    zoo.mkdir(parents=True, exist_ok=True)
    if zoo_link.is_symlink() or zoo_link.exists():
        zoo_link.unlink()
    zoo_link.symlink_to(zoo, target_is_directory=True)
    return cache


def runtime_environment(instructions: list[Instruction], rooted: Rooted, port: int) -> dict[str, str]:
    """The runtime stage's ENV (paths rooted) over this machine's environment, then what differs
    here: loopback on `port`, an API key, a short context, a small KV cache, the rooted home."""
    image_env = {k: rooted.rewrite(v) for k, v in stage_image_env(instructions, "runtime").items()}
    env = base_environment()
    env.update(image_env)
    env["PATH"] = image_env["PATH"].replace("$PATH", base_environment()["PATH"])
    env.update({
        "CHORUS_HOST": "127.0.0.1",  # loopback only on this machine; the image binds 0.0.0.0
        "CHORUS_PORT": str(port),
        "CHORUS_API_KEY": SMOKE_API_KEY,
        "CHORUS_MAX_MODEL_LEN": "512",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HOME": str(rooted.path("/home/chorus")),
    })
    return env


def build_zoo_and_ensemble(container: Container, timings: Timings) -> None:
    """The zoo's SmolLM2 and a two-member ensemble of it in CHORUS_ENSEMBLE, with the image's own commands."""
    run_step(container.entrypoint + ["zoo", "build", "--no-optional", "--models", "smollm2"], container.env,
             "zoo build (smollm2)", timings, container.home)
    smol = f"{container.cache}/zoo/models/smollm2"
    run_step(container.entrypoint + ["ensemble", "build", container.env["CHORUS_ENSEMBLE"],
                                     "--member", f"smol={smol}:1", "--member", f"echo={smol}:2",
                                     "--name", "smoke", "--overwrite"],
             container.env, "ensemble build", timings, container.home)


# ---------------------------------------------------------------- the server's life


def start_server(container: Container, log_path: Path) -> Server:
    """The ENTRYPOINT with no arguments, as the image starts it, in a session of its own."""
    print(f"[smoke] starting {shlex.join(container.entrypoint)} on 127.0.0.1:{container.port} "
          f"(log: {log_path})", flush=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(container.entrypoint, env=container.env, cwd=container.home, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Server(proc, log_path, start)


def wait_until_healthy(server: Server, container: Container, timeout: float, timings: Timings) -> None:
    """Poll /health every second until 200, printing each change of status (503 while loading)."""
    seen: list[int] = []
    while True:
        if server.proc.poll() is not None:
            raise SmokeError(f"the server exited with status {server.proc.returncode} before /health "
                             f"turned 200; last log lines:\n{_tail(server.log_path)}")
        if time.monotonic() - server.started > timeout:
            raise SmokeError(f"/health not 200 after {timeout:.0f}s; last log lines:\n{_tail(server.log_path)}")
        try:
            status, _ = http("GET", f"{container.url}/health", timeout=5)
        except OSError:
            status = 0  # not listening yet
        if not seen or seen[-1] != status:
            seen.append(status)
            print(f"[smoke] /health -> {status or 'no answer'} at {time.monotonic() - server.started:.1f}s",
                  flush=True)
        if status == 200:
            break
        time.sleep(1.0)
    timings.add("server ready (/health 200)", time.monotonic() - server.started,
                "statuses seen: " + " -> ".join(str(s or "none") for s in seen))


def stop_server(server: Server) -> None:
    """SIGTERM, as `docker stop` sends; SmokeError (after a SIGKILL) if it is still there after 60 s."""
    proc = server.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise SmokeError("the server ignored SIGTERM for 60s and was killed") from None


def check_clean_shutdown(server: Server, stopping: float, timings: Timings) -> None:
    """The server exited with status 0 or -SIGTERM after logging uvicorn's graceful shutdown."""
    # uvicorn re-raises the signal after a graceful shutdown, so -SIGTERM (Docker: 143) is clean too.
    graceful = "Application shutdown complete" in server.log_path.read_text(errors="replace")
    if server.proc.returncode not in (0, -signal.SIGTERM) or not graceful:
        raise SmokeError(f"the server did not shut down cleanly (status {server.proc.returncode}):\n"
                         f"{_tail(server.log_path)}")
    timings.add("shutdown (SIGTERM)", time.monotonic() - stopping, f"graceful, status {server.proc.returncode}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
