"""vLLM engine speed in bfloat16 vs float32 on this machine, and how far each is from the reference.

    python bench/vllm_dtype.py ~/.cache/chorus/default/ensemble --requests 8 --max-tokens 32

For each dtype the ensemble's `VLLMEngine` is started, warmed up with one request, then sent
`--requests` greedy requests at once (prompts cut from held-out text, `--max-tokens` generated
tokens each, EOS ignored); generated tokens per second are measured over that batch. The same
prompts then run on the reference engine (float32 transformers members, the oracle the vLLM tests
compare against) with the generated tokens forced, so every log-prob is compared on the same
tokens: the table gives the largest |log-prob difference| of the chosen tokens and how many greedy
tokens agree, next to the vLLM tests' tolerance (``TOL``). Prints one Markdown table with the ratio
of each dtype's speed to float32's, all measured in this one run, and what ``--dtype auto`` would
choose here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import time
from pathlib import Path

TOL = 1e-4  # tests/ensemble/vllm_harness.py: vLLM vs reference, float32


def cpu_model() -> str:
    """`lscpu`'s model name and whether the CPU flags list avx512_bf16 / amx_bf16."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{fields.get('Model name', '?').strip()} ({', '.join(bf16) or 'no bf16 flags'})"


def prompts_from_text(tokenizer, text: str, n: int, length: int) -> list[list[int]]:
    """`n` prompts of `length` tokens, consecutive slices of `text` tokenized once."""
    from transfer.tokens import encode_text

    ids = encode_text(tokenizer, text)
    if len(ids) < n * length:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {n} x {length}")
    return [ids[i * length:(i + 1) * length] for i in range(n)]


async def run_vllm(folder: Path, dtype: str, prompts: list[list[int]], max_tokens: int, max_model_len: int):
    """Start the engine in `dtype`, warm it up, time the batch; (outputs, tok/s, startup s, dtype)."""
    from ensemble.protocol import SamplingOptions
    from ensemble.vllm_engine import VLLMEngine

    options = SamplingOptions(max_tokens=max_tokens, temperature=0.0, logprobs=1, ignore_eos=True)
    t0 = time.perf_counter()
    engine = VLLMEngine.from_folder(folder, dtype=dtype, max_model_len=max_model_len,
                                    engine_args={"max_num_seqs": len(prompts)})
    startup = time.perf_counter() - t0
    try:
        async def one(i: int, p: list[int]):
            last = None
            async for last in engine.generate(p, options, f"{dtype}-{i}"):
                pass
            return last

        await one(-1, prompts[0])
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        elapsed = time.perf_counter() - t0
        chosen = engine.info["dtype"]
    finally:
        await engine.shutdown()
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return outs, generated / elapsed, startup, chosen


def reference_logprobs(folder: Path, prompts: list[list[int]], outs) -> list[list[float]]:
    """The float32 reference's pooled log-prob of each token vLLM generated (forced, not sampled)."""
    from ensemble.protocol import SamplingOptions
    from ensemble.reference import ReferenceEngine

    async def main() -> list[list[float]]:
        engine = ReferenceEngine(folder, max_num_seqs=len(prompts))
        try:
            result = []
            for p, o in zip(prompts, outs):
                full = p + list(o.outputs[0].token_ids)
                opts = SamplingOptions(max_tokens=1, prompt_logprobs=0)
                last = None
                async for last in engine.generate(full, opts, f"ref-{len(result)}"):
                    pass
                result.append([lp.logprob for lp in last.prompt_logprobs[len(p):]])
            return result
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ensemble", type=Path, help="an ensemble folder (ensemble build)")
    parser.add_argument("--text", default="zoo:heldout", help="where the prompts are cut from")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from transfer.config import resolve_text
    from transfer.precision import choose_dtype

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    tokenizer = AutoTokenizer.from_pretrained(args.ensemble)
    text = resolve_text(args.text).read_text(encoding="utf-8")
    prompts = prompts_from_text(tokenizer, text, args.requests, args.prompt_tokens)
    max_model_len = args.prompt_tokens + args.max_tokens + 8

    rows = []
    for dtype in args.dtypes:
        outs, tps, startup, chosen = asyncio.run(run_vllm(args.ensemble, dtype, prompts, args.max_tokens, max_model_len))
        rows.append((dtype, chosen, outs, tps, startup))
    reference_out = rows[0][2]  # greedy tokens of the first dtype are forced on the reference
    ref = reference_logprobs(args.ensemble, prompts, reference_out)

    auto = choose_dtype("auto", "cpu", what="the vLLM engine (--dtype auto)")
    base = dict((r[0], r[3]) for r in rows).get("float32")
    print(f"\nCPU: {cpu_model()}; {os.cpu_count()} cores; {args.requests} requests x "
          f"{args.prompt_tokens} prompt + {args.max_tokens} generated tokens; `--dtype auto` here: {auto}")
    print(f"\n| dtype (engine) | generated tok/s | vs float32 | startup s | max abs log-prob diff vs reference "
          f"(TOL {TOL:g}) | greedy tokens equal to {rows[0][0]}'s (common prefix) |")
    print("|---|---|---|---|---|---|")
    first_tokens = [o.outputs[0].token_ids for o in reference_out]
    for dtype, chosen, outs, tps, startup in rows:
        diffs, same, total = [], 0, 0
        for o, ref_lps, want in zip(outs, ref, first_tokens):
            got = o.outputs[0]
            total += len(got.token_ids)
            for i, (tok, lp) in enumerate(zip(got.token_ids, got.logprobs)):
                if tok == want[i]:
                    same += 1
                    diffs.append(abs(lp.logprob - ref_lps[i]))
                else:
                    break  # after the first different token the contexts differ
        ratio = f"{tps / base:.2f}x" if base else "-"
        print(f"| {dtype} ({chosen}) | {tps:.1f} | {ratio} | {startup:.0f} | {max(diffs):.2e} | {same}/{total} |")


if __name__ == "__main__":
    main()
