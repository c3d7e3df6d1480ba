"""Write a held-out text sampled from the teacher itself, to measure how faithfully a transferred
student reproduces its teacher (bits per byte on what the teacher would write).

    python bench/teacher_text.py OUT.txt [--model zoo:smollm2] [--prompts zoo:prose]
                                 [--samples 24] [--new-tokens 200] [--seed 0]

Each sample opens with the first sentence of a paragraph of the prompt text and continues with
``--new-tokens`` tokens drawn from the model's own distribution (temperature 1, no top-p/top-k
truncation, seeded), so the file's likelihood under the teacher is its own entropy rate. Samples
are separated by blank lines. Progress goes to stderr; the file is written atomically at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from transfer.config import resolve_model, resolve_text


def paragraph_openings(text: str, count: int, min_chars: int = 40) -> list[str]:
    """The first sentence of the first `count` paragraphs of at least `min_chars` characters."""
    openings = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if len(para) < min_chars:
            continue
        sentence = re.split(r"(?<=[.!?])\s", para, maxsplit=1)[0]
        openings.append(sentence[:300])
        if len(openings) == count:
            break
    return openings


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the text file to write")
    p.add_argument("--model", default="zoo:smollm2")
    p.add_argument("--prompts", default="zoo:prose", help="text whose paragraph openings prompt the samples")
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.samples < 1 or args.new_tokens < 1:
        p.error("--samples and --new-tokens must be at least 1")
    prompts = paragraph_openings(resolve_text(args.prompts).read_text(encoding="utf-8"), args.samples)
    if len(prompts) < args.samples:
        p.error(f"{args.prompts} has only {len(prompts)} paragraphs of 40+ characters")
    texts = sample(resolve_model(args.model), prompts, args.new_tokens, args.seed)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n\n".join(t.strip() for t in texts) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    print(f"wrote {out}: {len(texts)} samples, {out.stat().st_size} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
