"""Where one system's decode time goes: torch's profiler over greedy batches of vLLM in this process.

`bench/engine_steps.py` says how fast each system is; this says why. It starts one system, the
ensemble as chorus's server configures it or one of its members in plain vLLM
(`bench.engine_steps.start_system`), alone in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), warms it up, times one batch unprofiled, then profiles the
same batch and prints the wall time, the oneDNN products grouped by shape (the linear layers and
heads on a CPU), the time in each phase of vLLM's steps (its profiling scopes: schedule, forward,
sample, draft, bookkeeping) and the operators with the most self time. Run it once per system and
compare:

    python -m bench.step_profile ~/.cache/chorus/default/ensemble-gemma3 ensemble
    python -m bench.step_profile ~/.cache/chorus/default/ensemble-gemma3 gemma
    python -m bench.step_profile ~/.cache/chorus/default/ensemble-gemma3 ensemble --concurrency 16 \
        --speculative-config '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
        "prompt_lookup_max": 4}'
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# vLLM's profiling scopes (VLLM_CUSTOM_SCOPES_FOR_PROFILING): "gpu_model_runner: forward", "schedule: ..."
_PHASE = re.compile(r"^(gpu_model_runner|schedule|llm_engine step|ngram_proposer\w*): ")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ensemble", type=Path, help="ensemble folder (ensemble build / make serve's)")
    p.add_argument("system", help="'ensemble' or the name of one of its served members")
    p.add_argument("--concurrency", type=int, default=1, help="prompts in the batch")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--rows", type=int, default=25, help="rows of each table")
    p.add_argument("--speculative-config", type=json.loads, default=None,
                   help="vLLM's speculative_config (JSON) for the ensemble, as serve's --speculative-config")
    args = p.parse_args(argv)
    if min(args.concurrency, args.input_len, args.output_len, args.rows) < 1:
        p.error("--concurrency, --input-len, --output-len and --rows must be at least 1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CUSTOM_SCOPES_FOR_PROFILING", "1")  # vLLM's step phases in the profile
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch
    from vllm import SamplingParams

    from bench.engine_steps import batches, start_system

    try:
        spec = {"speculative_config": args.speculative_config} if args.speculative_config is not None else None
        llm = start_system(args.ensemble.expanduser().resolve(), args.system, 2 * (args.input_len + args.output_len) + 64,
                           engine_args=spec)
    except ValueError as err:
        raise SystemExit(f"step_profile: {err}") from None
    vocab = llm.llm_engine.model_config.get_vocab_size()
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for seed in (0, 1):  # warm-up: first-call allocations and kernels
        llm.generate(batches(args.concurrency, 1, args.input_len, vocab, seed)[0], params, use_tqdm=False)
    prompts = batches(args.concurrency, 1, args.input_len, vocab, 7)[0]
    began = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    plain = time.perf_counter() - began
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        began = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        profiled = time.perf_counter() - began
    tokens = args.concurrency * args.output_len
    print(f"\n{args.system}, concurrency {args.concurrency}: {tokens / plain:.2f} tok/s unprofiled "
          f"({plain * 1e3:.0f} ms), {profiled * 1e3:.0f} ms profiled")
    products = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.key == "_C::onednn_mm"),
                      key=lambda e: -e.self_cpu_time_total)
    print(f"\noneDNN products by shape ([rows, out], [rows, in]): {sum(e.self_cpu_time_total for e in products) / 1e3:.0f} ms")
    for e in products[:args.rows]:
        print(f"{e.self_cpu_time_total / 1e3:9.1f} ms {e.count:6d} calls {e.self_cpu_time_total / e.count / 1e3:8.2f} ms/call"
              f"  {e.input_shapes[:2]}")
    phases = sorted((e for e in prof.key_averages() if _PHASE.match(e.key)), key=lambda e: -e.cpu_time_total)
    print("\nvLLM's step phases (total time, calls):")
    for e in phases:
        print(f"{e.cpu_time_total / 1e3:9.1f} ms {e.count:6d} calls  {e.key}")
    if not phases:  # vLLM reads VLLM_CUSTOM_SCOPES_FOR_PROFILING once per process
        print("  none recorded: an engine started earlier in this process ran without vLLM's profiling "
              "scopes (run step_profile in a process of its own)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=50))
    return 0


if __name__ == "__main__":
    sys.exit(main())
