"""Write a held-out text sampled from the teacher itself, to measure how faithfully a transferred
student reproduces its teacher (bits per byte on what the teacher would write).

    python bench/teacher_text.py OUT.txt [--model zoo:smollm2] [--prompts zoo:prose]
                                 [--samples 24] [--new-tokens 200] [--seed 0]
                                 [--skip 0] [--spread] [--batch-size 4]

An OUT ending in .jsonl is written as training data instead, one {"text": ...} per sample
(`transfer`'s jsonl format): distillation data drawn from the teacher's own distribution.

Each sample opens with the first sentence of a paragraph of the prompt text and continues with
``--new-tokens`` tokens drawn from the model's own distribution (temperature 1, no top-p/top-k
truncation, seeded), so the file's likelihood under the teacher is its own entropy rate. Samples
are separated by blank lines. Progress goes to stderr; the file is written atomically at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from transfer.config import resolve_model, resolve_text


def paragraph_openings(text: str, count: int, min_chars: int = 40, skip: int = 0, spread: bool = False) -> list[str]:
    """The first sentence of `count` paragraphs of at least `min_chars` characters.

    The first `count` such paragraphs after the first `skip`; with `spread`, `count` openings
    evenly spaced over all of them (cycling through them again when there are fewer than `count`).
    """
    openings = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if len(para) < min_chars:
            continue
        openings.append(re.split(r"(?<=[.!?])\s", para, maxsplit=1)[0][:300])
    openings = openings[skip:]
    if not spread or not openings:
        return openings[:count]
    n = len(openings)
    return [openings[i * n // count] if count <= n else openings[i % n] for i in range(count)]


def sample(model_dir: Path, prompts: list[str], new_tokens: int, seed: int, batch_size: int = 4) -> list[str]:
    """Prompt + sampled continuation, one string per prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    out: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="teacher samples", unit="batch", file=sys.stderr):
        batch = prompts[start : start + batch_size]
        enc = tok(batch, return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=tok.pad_token_id)
        for prompt, row in zip(batch, ids[:, enc["input_ids"].shape[1]:]):
            out.append(prompt + tok.decode(row, skip_special_tokens=True))
    return out


def write_samples(out: Path, texts: list[str]) -> Path:
    """Write the samples atomically: a .jsonl file gets one ``{"text": ...}`` per sample
    (transfer's jsonl data format), any other file the samples separated by blank lines."""
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".jsonl":
        tmp.write_text("".join(json.dumps({"text": t.strip()}) + "\n" for t in texts), encoding="utf-8")
    else:
        tmp.write_text("\n\n".join(t.strip() for t in texts) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the text file to write")
    p.add_argument("--model", default="zoo:smollm2")
    p.add_argument("--prompts", default="zoo:prose", help="text whose paragraph openings prompt the samples")
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", type=int, default=0, help="leave out the first SKIP paragraph openings")
    p.add_argument("--spread", action="store_true",
                   help="openings evenly spaced over the whole prompt text (cycled if too few)")
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args(argv)
    if args.samples < 1 or args.new_tokens < 1 or args.batch_size < 1 or args.skip < 0:
        p.error("--samples, --new-tokens and --batch-size must be at least 1, --skip at least 0")
    prompts = paragraph_openings(resolve_text(args.prompts).read_text(encoding="utf-8"), args.samples,
                                 skip=args.skip, spread=args.spread)
    if len(prompts) < args.samples:
        p.error(f"{args.prompts} has only {len(prompts)} paragraphs of 40+ characters after --skip {args.skip}")
    texts = sample(resolve_model(args.model), prompts, args.new_tokens, args.seed, args.batch_size)
    out = write_samples(Path(args.out), texts)
    print(f"wrote {out}: {len(texts)} samples, {out.stat().st_size} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
