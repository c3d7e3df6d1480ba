"""Valid traffic's latency, quiet and under abuse, side by side in one run, and the server's memory.

    python bench/abuse.py ~/.cache/chorus/default/ensemble-gemma3 --engine vllm \
        --out bench/results/abuse.json

Starts `serve` (a subprocess on a free loopback port, as `bench/downstream.py` does), then runs
the same valid traffic twice: `--clients` clients each sending `--requests` short completions
(`--max-tokens` tokens, greedy) one after another,

1. *quiet*: alone (after an unmeasured warm-up: a few valid requests, and one request of the
   kind the slow readers send, read to its end: the engine's first streamed `n` 4 request with
   log-probs costs seconds once, which would otherwise land on the first valid requests of the
   abuse phase and be counted as abuse);
2. *abuse*: while abusers run in loops on loopback until the valid traffic is done:
   - slow readers: streaming requests for long answers whose sockets are never read (the server
     cuts them off after `--stream-stall-timeout`);
   - a disconnect storm: streaming requests closed right after their first bytes;
   - huge bodies: `--huge-mb` MiB posts (refused with 413 from their Content-Length, and chunked
     ones cut off at the limit);
   - hostile JSON: lone surrogates, 100,000-element stop lists, deep nesting (400s).
   The abusers connect from `--abuser-address` (127.0.0.2), the valid clients from 127.0.0.1; once
   an address (or, with `--abuser-quota`, the abusers' own client key) has been refused
   `--max-refusals` times in a minute (serve's default 60), its requests get 429s from their
   headers, before any body is read (`server.refusals`). With `--abuser-address 127.0.0.1` and no
   quota, abusers and valid clients share one key and one address and cannot be told apart, so
   that run turns the refusal budget off.

The abusers run in a process of their own, so that their client-side work does not delay the
valid client's event loop (and with it the measured latencies); on a small machine they still
share its cores with the server, which makes the comparison harsher, not kinder.

With `--each`, one more phase per abuser kind alone shows what each costs. It prints valid
requests' p50 / p99 latency in every phase and the all-abusers ratio, every abuser's count of
answers by status, and the server process's peak resident memory (sampled every 0.2 s) in each
phase. No 5xx may appear; the issue's target is a p99 under abuse within 2x the quiet one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.abusers import KINDS, abusers_process
from bench.downstream import served

API_KEY = "sk-abuse-bench"  # the server's own key: the valid clients' (and, without --abuser-quota, the abusers')
ABUSER_KEY = "sk-abuse-bench-abusers"  # with --abuser-quota: the abusers' own client key
HEADERS = {"Authorization": f"Bearer {API_KEY}"}  # the valid clients'


def percentile(values: list[float], q: float) -> float:
    """The `q`-quantile (0..1) of `values`, linearly interpolated."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def valid_traffic(url: str, clients: int, requests: int, max_tokens: int,
                        timeline: list[tuple[float, float]] | None = None) -> tuple[list[float], Counter]:
    """`clients` clients each sending `requests` completions in turn: latencies (s) and statuses;
    (start, latency) of each success appended to `timeline` (seconds from the first start)."""
    latencies: list[float] = []
    origin = time.perf_counter()
    statuses: Counter = Counter()
    body = {"prompt": "The history of the city begins", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}

    async def client(http: httpx.AsyncClient) -> None:
        for _ in range(requests):
            started = time.perf_counter()
            r = await http.post(f"{url}/v1/completions", json=body)
            statuses[r.status_code] += 1
            if r.status_code == 200:
                latencies.append(time.perf_counter() - started)
                if timeline is not None:
                    timeline.append((round(started - origin, 3), round(latencies[-1], 3)))

    async with httpx.AsyncClient(headers=HEADERS, timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return latencies, statuses


async def peak_memory(pid: int, stop: asyncio.Event) -> float:
    """Peak resident memory (MiB) of the server process and its children until `stop`."""
    proc = psutil.Process(pid)
    peak = 0
    while not stop.is_set():
        with contextlib.suppress(psutil.Error):
            total = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            peak = max(peak, total)
        await asyncio.sleep(0.2)
    return peak / (1 << 20)


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the server process and, together, its children
    (vLLM's engine core)."""
    proc = psutil.Process(pid)
    own = sum(proc.cpu_times()[:2])
    children = 0.0
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            children += sum(child.cpu_times()[:2])
    return {"server": own, "engine": children}


async def phase(url: str, pid: int, args: argparse.Namespace, kinds: tuple[str, ...]) -> dict[str, Any]:
    """One run of the valid traffic, with the abusers of `kinds` (none: quiet) in their own process."""
    stop = asyncio.Event()
    cpu_before = cpu_seconds(pid)
    memory = asyncio.create_task(peak_memory(pid, stop))
    ctx = multiprocessing.get_context("spawn")
    started, stop_abuse, queue = ctx.Event(), ctx.Event(), ctx.Queue()
    process = None
    if kinds:
        process = ctx.Process(target=abusers_process, args=(url, args.huge_mb, args.abusers, kinds,
                                                              args.abuser_nice,
                                                              ABUSER_KEY if args.abuser_quota else API_KEY,
                                                              args.abuser_address,
                                                              started, stop_abuse, queue),
                              daemon=True)
        process.start()
        await asyncio.get_running_loop().run_in_executor(None, started.wait)
        await asyncio.sleep(1.0)  # let the abuse start first
    begun = time.perf_counter()
    timeline: list[tuple[float, float]] = []
    latencies, statuses = await valid_traffic(url, args.clients, args.requests, args.max_tokens, timeline)
    wall = time.perf_counter() - begun
    abusers: dict[str, dict[str, int]] = {}
    failures: list[str] = []
    abuser_cpu = 0.0
    cpu = {k: v - cpu_before[k] for k, v in cpu_seconds(pid).items()}  # while the valid traffic ran
    if process is not None:
        stop_abuse.set()
        abusers, failures, abuser_cpu = await asyncio.get_running_loop().run_in_executor(None, queue.get)
        process.join()
    stop.set()
    return {
        "valid_ok": len(latencies), "valid_statuses": dict(statuses), "wall_s": wall,
        "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
        "mean_s": statistics.fmean(latencies), "peak_rss_mib": await memory,
        "abusers": abusers, "abuser_failures": failures,
        "cpu_s": {"server": cpu["server"], "engine": cpu["engine"], "abusers": abuser_cpu},
        "timeline": sorted(timeline),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ensemble", type=Path, help="ensemble folder")
    p.add_argument("--engine", choices=("vllm", "torch"), default="vllm")
    p.add_argument("--clients", type=int, default=4, help="valid clients at once (default 4)")
    p.add_argument("--requests", type=int, default=25, help="requests per valid client (default 25)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per valid request (default 8)")
    p.add_argument("--abusers", type=int, default=2, help="tasks of each abuser kind (default 2)")
    p.add_argument("--huge-mb", type=float, default=40.0, help="size of the huge bodies (default 40 MiB)")
    p.add_argument("--stream-stall-timeout", type=float, default=5.0, help="serve's setting (default 5 s)")
    p.add_argument("--abuser-nice", type=int, default=0, metavar="N",
                   help="run the abusers' process at this niceness (0: like the server; 19: their own CPU "
                        "work barely competes with the server's, as when attackers are other machines)")
    p.add_argument("--abuser-quota", type=int, metavar="N",
                   help="give the abusers a client key of their own with max_running N (serve --client-keys); "
                        "the valid clients keep the server's key; default: everyone shares that key")
    p.add_argument("--abuser-address", default="127.0.0.2",
                   help="loopback address the abusers connect from (default 127.0.0.2: attackers are not the "
                        "valid clients' address; 127.0.0.1 shares it, and without --abuser-quota nothing then "
                        "tells them apart)")
    p.add_argument("--each", action="store_true",
                   help="also run one abuse phase per abuser kind alone (which abuse costs what)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG", help="passed on to serve")
    p.add_argument("--log", type=Path, default=Path("abuse_serve.log"), help="serve's log file")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if not (args.ensemble / "chorus_ensemble.json").is_file():
        p.error(f"{args.ensemble} is not an ensemble folder (no chorus_ensemble.json)")

    serve_args = ["--stream-stall-timeout", str(args.stream_stall_timeout), *args.serve_arg]
    os.environ["CHORUS_API_KEY"] = API_KEY  # the server's own key (no quota): the valid clients'
    if args.abuser_quota:
        keys = args.log.with_suffix(".keys.json")
        keys.write_text(json.dumps([{"name": "abusers", "key": ABUSER_KEY, "max_running": args.abuser_quota}]))
        serve_args += ["--client-keys", str(keys)]
    elif args.abuser_address == "127.0.0.1" and not any(a.startswith("--max-refusals") for a in args.serve_arg):
        # One key and one address for everyone: throttling the refused client (server.refusals)
        # would throttle the valid clients with it. The refusal budget needs a key or an address of their own.
        serve_args = ["--max-refusals", "0", *serve_args]
    with served(args.ensemble, args.engine, args.log, serve_args) as (url, card):
        pid = _server_pid(int(url.rsplit(":", 1)[1]))
        asyncio.run(valid_traffic(url, args.clients, 2, args.max_tokens))  # warm-up, not measured
        warm_up_first_use(url)
        quiet = asyncio.run(phase(url, pid, args, ()))
        abuse = asyncio.run(phase(url, pid, args, KINDS))
        alone = {kind: asyncio.run(phase(url, pid, args, (kind,))) for kind in (KINDS if args.each else ())}
        health = httpx.get(f"{url}/health", timeout=30).status_code
    record = {"ensemble": str(args.ensemble), "engine": args.engine, "model": card["id"],
              "settings": {k: v for k, v in vars(args).items() if k in ("clients", "requests", "max_tokens",
                                                                           "abusers", "huge_mb",
                                                                           "stream_stall_timeout", "abuser_nice",
                                                                           "abuser_quota", "abuser_address", "serve_arg")},
              "quiet": quiet, "abuse": abuse, "p99_ratio": abuse["p99_s"] / quiet["p99_s"],
              "p50_ratio": abuse["p50_s"] / quiet["p50_s"], "alone": alone, "health_after": health}
    print(render(record))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    server_errors = sum(v for ph in (quiet, abuse) for k, v in ph["valid_statuses"].items() if int(k) >= 500)
    server_errors += sum(v for c in abuse["abusers"].values() for k, v in c.items()
                         if k.split()[-1].isdigit() and int(k.split()[-1]) >= 500)
    server_errors += len(abuse["abuser_failures"])
    for ph in alone.values():
        server_errors += sum(v for k, v in ph["valid_statuses"].items() if int(k) >= 500)
    return 1 if server_errors or health != 200 else 0


def warm_up_first_use(url: str) -> None:
    """One streamed request shaped like the slow readers' (n 4, log-probs 5), read to its end."""
    body = {"prompt": "Tell a long story", "max_tokens": 8, "n": 4, "ignore_eos": True, "stream": True, "logprobs": 5}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=HEADERS, timeout=600) as r:
        for _ in r.iter_bytes():
            pass


def _server_pid(port: int) -> int:
    """The pid of the process listening on `port`."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return conn.pid
    raise RuntimeError(f"no process listens on port {port}")


def render(record: dict[str, Any]) -> str:
    """The results as a Markdown table plus the abusers' answers."""
    q, a = record["quiet"], record["abuse"]
    lines = [
        "| phase | valid ok | p50 (s) | p99 (s) | peak RSS (MiB) | CPU s: server / engine / abusers |",
        "|---|---|---|---|---|---|",
    ]
    phases = [("quiet", q), ("abuse", a), *((f"{kind} alone", ph) for kind, ph in record.get("alone", {}).items())]
    for name, ph in phases:
        cpu = ph.get("cpu_s", {})
        lines.append(f"| {name} | {ph['valid_ok']} | {ph['p50_s']:.3f} | {ph['p99_s']:.3f} | {ph['peak_rss_mib']:.0f} | "
                     f"{cpu.get('server', 0):.1f} / {cpu.get('engine', 0):.1f} / {cpu.get('abusers', 0):.1f} |")
    lines += [
        "",
        f"p50 ratio {record['p50_ratio']:.2f}x, p99 ratio {record['p99_ratio']:.2f}x (target: p99 within 2x)",
        "abusers' answers: " + "; ".join(f"{name} {dict(sorted(c.items()))}" for name, c in a["abusers"].items()),
        f"/health after: {record['health_after']}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
