"""The probes of a ready server, as a client of the container would make them: the image's
HEALTHCHECK command, a request without the API key (401), /v1/models, a greedy completion, and
vLLM's generation counter on /metrics."""

from __future__ import annotations

import json
import subprocess
import time

from smoke.container import SMOKE_API_KEY, Container, http
from smoke.errors import SmokeError
from smoke.report import Timings


def run_checks(container: Container, timings: Timings) -> None:
    check_healthcheck_command(container)
    check_api_key_required(container)
    model = check_models(container)
    tokens = check_completion(container, model, timings)
    check_metrics(container, tokens)


def check_healthcheck_command(container: Container) -> None:
    check = subprocess.run(container.healthcheck, env=container.env, cwd=container.home, capture_output=True,
                           text=True)
    if check.returncode != 0:
        raise SmokeError(f"the HEALTHCHECK command failed on a ready server: {check.stdout}{check.stderr}")
    print("[smoke] HEALTHCHECK command: exit 0", flush=True)


def check_api_key_required(container: Container) -> None:
    status, body = http("POST", f"{container.url}/v1/completions", {"prompt": "Hello", "max_tokens": 4})
    if status != 401:
        raise SmokeError(f"a completion without the API key got {status}, expected 401: {body[:200]}")


def check_models(container: Container) -> str:
    """The served model's id, from /v1/models."""
    status, body = http("GET", f"{container.url}/v1/models", key=SMOKE_API_KEY)
    if status != 200:
        raise SmokeError(f"/v1/models answered {status}: {body[:300]}")
    return json.loads(body)["data"][0]["id"]


def check_completion(container: Container, model: str, timings: Timings) -> int:
    """A greedy 16-token completion that says something; return its completion tokens."""
    t0 = time.monotonic()
    status, body = http("POST", f"{container.url}/v1/completions", {
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
    return tokens


def check_metrics(container: Container, tokens: int) -> None:
    """/metrics counts at least the completion's `tokens` generated tokens."""
    status, metrics = http("GET", f"{container.url}/metrics")
    if status != 200:
        raise SmokeError(f"/metrics answered {status}")
    generated = _metric(metrics, "vllm:generation_tokens_total")
    if generated is None or generated < tokens:
        raise SmokeError(f"/metrics: vllm:generation_tokens_total is {generated}, expected >= {tokens}")
    print(f"[smoke] /metrics: vllm:generation_tokens_total {generated:g}", flush=True)


def _metric(text: str, name: str) -> float | None:
    """Sum of a Prometheus metric's samples (all label sets) in exposition text."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None
