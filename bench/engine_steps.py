"""Engine speed without a server: the vLLM ensemble against each member in plain vLLM, in one process.

`bench/serving.py` measures what a user gets over HTTP, and on a 2-core machine two runs of one
system there differ by 7-14% (servers, load generator and engine share the cores). This one takes
the servers away: vLLM's offline ``LLM`` in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so
no engine-core process spins beside the worker), the ensemble started with the engine arguments
chorus's server gives it (`ensemble.vllm_engine_args.build_engine_args`) and each served member
started as plain vLLM with its defaults, as `bench/serving.py` starts them (so on a CPU the
ensemble runs whole prefills, chorus's choice there, and the members vLLM's chunked prefill). All
of them stay loaded (on a GPU each gets an equal share of its memory), and every round measures
every system at every concurrency in turn, starting one system later each round. The record names
the form in which the ensemble hands its rows to vLLM's sampler
(`ensemble.vllm_model.EnsembleForCausalLM.logits_form`).

At concurrency c a round generates `--waves` batches of c random-token prompts (`--input-len`
tokens, `--output-len` greedy tokens, EOS ignored), one batch after the other; a system's
throughput is its output tokens over the batches' wall time, the median over the rounds. The
bound is the members one after another: 1 / sum(1 / member tok/s).

    python -m bench.engine_steps ~/.cache/chorus/default/ensemble-gemma3 --rounds 3 \\
        --out bench/results/engine_steps.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONCURRENCIES = (1, 4, 16, 64)


def plain_args(engine_args: Any) -> dict[str, Any]:
    """The fields of `engine_args` (``AsyncEngineArgs``) that ``vllm.LLM`` takes and that differ
    from vLLM's defaults: the ensemble's engine exactly as chorus's server configures it."""
    from vllm import EngineArgs

    def default(f: dataclasses.Field) -> Any:
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    return {f.name: getattr(engine_args, f.name) for f in dataclasses.fields(EngineArgs)
            if f.init and getattr(engine_args, f.name) != default(f)}


def start_system(folder: Path, system: str, max_model_len: int, memory: dict[str, float] | None = None,
                 engine_args: dict[str, Any] | None = None) -> Any:
    """``vllm.LLM`` for `system`: ``ensemble`` (the engine arguments chorus's server gives it, plus
    `engine_args`, e.g. a ``speculative_config``) or the name of a member it serves (plain vLLM
    with its defaults); `memory`: further ``LLM`` arguments (a GPU memory share). ValueError for
    any other name, or for `engine_args` given with a member."""
    from vllm import LLM
    from vllm.platforms import current_platform

    from ensemble.manifest import EnsembleManifest
    from ensemble.vllm_engine import VLLMEngineConfig, build_engine_args

    manifest = EnsembleManifest.load(folder)
    served = manifest.without_idle_members()
    paths = {m.name: m.path for m in served.members}
    if system != "ensemble":
        if system not in paths:
            raise ValueError(f"no served member {system!r} (ensemble, {', '.join(paths)})")
        if engine_args:
            raise ValueError("engine arguments are for the ensemble; a member runs with plain vLLM's defaults")
    config = VLLMEngineConfig(folder=str(folder), max_model_len=max_model_len, engine_args=engine_args or {})
    args = build_engine_args(config, manifest, served)
    if system == "ensemble":
        return LLM(**plain_args(args), **(memory or {}))
    return LLM(model=paths[system], dtype=args.dtype, max_model_len=max_model_len,
               enforce_eager=current_platform.is_cpu(), disable_log_stats=True, **(memory or {}))


def start_systems(folder: Path, max_model_len: int) -> dict[str, Any]:
    """``{name: vllm.LLM}``: the ensemble, then each member it serves alone in plain vLLM."""
    from vllm.platforms import current_platform

    from ensemble.manifest import EnsembleManifest

    members = [m.name for m in EnsembleManifest.load(folder).without_idle_members().members]
    # On a GPU every engine would take vLLM's default 92% of its memory: share it out instead.
    memory = {} if current_platform.is_cpu() else {"gpu_memory_utilization": 0.85 / (1 + len(members))}
    systems = {"ensemble": start_system(folder, "ensemble", max_model_len, memory)}
    for name in members:
        systems[f"{name} alone"] = start_system(folder, name, max_model_len, memory)
    return systems


def batches(concurrency: int, waves: int, input_len: int, vocab: int, seed: int) -> list[list[dict[str, list[int]]]]:
    """`waves` batches of `concurrency` prompts of random token ids (ids 1000 up, past the specials)."""
    rng = random.Random(seed)
    return [[{"prompt_token_ids": [rng.randrange(1000, vocab) for _ in range(input_len)]}
             for _ in range(concurrency)] for _ in range(waves)]


def tokens_per_second(llm: Any, prompts: Sequence[Sequence[dict[str, list[int]]]], output_len: int) -> float:
    """Output tokens per second of `llm` generating greedily for each batch, one after the other."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    began, produced = time.perf_counter(), 0
    for batch in prompts:
        outs = llm.generate(list(batch), params, use_tqdm=False)
        produced += sum(len(o.outputs[0].token_ids) for o in outs)
    return produced / (time.perf_counter() - began)


def summarise(runs: dict[str, dict[int, list[float]]]) -> dict[str, dict[int, float]]:
    """Median tok/s per system and concurrency, plus the bound (members one after another) and the
    ensemble's ratio to it."""
    med = {name: {c: statistics.median(v) for c, v in rows.items()} for name, rows in runs.items()}
    members = [name for name in med if name.endswith(" alone")]
    med["bound"] = {c: 1.0 / sum(1.0 / med[m][c] for m in members) for c in med["ensemble"]}
    med["ensemble / bound"] = {c: med["ensemble"][c] / med["bound"][c] for c in med["ensemble"]}
    return med


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ensemble", type=Path, help="ensemble folder (ensemble build / make serve's)")
    p.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCIES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--waves", type=int, default=2, help="batches of `concurrency` prompts per measurement")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--out", type=Path, help="write the rounds and medians here (JSON)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.waves < 1 or min(args.concurrency) < 1:
        p.error("--rounds, --waves and every --concurrency must be at least 1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB per engine on a CPU, as bench.launch gives servers
    from bench.serving import _machine

    max_model_len = 2 * (args.input_len + args.output_len) + 64
    systems = start_systems(args.ensemble, max_model_len)
    vocab = min(llm.llm_engine.model_config.get_vocab_size() for llm in systems.values())
    runs: dict[str, dict[int, list[float]]] = {name: {c: [] for c in args.concurrency} for name in systems}
    for name, llm in systems.items():  # warm-up: first-call allocations and kernels
        tokens_per_second(llm, batches(2, 1, args.input_len, vocab, seed=0), 4)
    names = list(systems)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # each system goes first in turn
        for c in args.concurrency:
            prompts = batches(c, args.waves, args.input_len, vocab, seed=1000 * r + c)
            for name in order:
                llm = systems[name]
                runs[name][c].append(tokens_per_second(llm, prompts, args.output_len))
                print(f"[engine-steps] round {r + 1} c={c} {name}: {runs[name][c][-1]:.1f} tok/s", flush=True)
    med = summarise(runs)
    print(f"\n{'system':>18} " + " ".join(f"{'c=' + str(c):>9}" for c in args.concurrency))
    for name, rows in med.items():
        print(f"{name:>18} " + " ".join(f"{rows[c]:9.3f}" for c in args.concurrency))
    if args.out:
        record = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                  "machine": _machine(), "rounds": runs,
                  "logits_form": systems["ensemble"].collective_rpc("chorus_logits_form")[0],
                  "median_tok_s": med, "input_len": args.input_len, "output_len": args.output_len, "waves": args.waves}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
