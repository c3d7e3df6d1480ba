"""Summarise a bench/transfer_experiment.sh folder as a Markdown table.

    python bench/transfer_report.py runs/experiment

Reads ``eval.jsonl`` (bits per byte of teacher / FVT / each trained run on each held-out text),
``timings.jsonl`` and each run's ``log.jsonl``; prints bits per byte, the share of the FVT-to-teacher
gap each trained student closed, and the training cost (steps, wall time, tokens per second).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LABELS = {
    "teacher": "teacher, its own tokenizer",
    "fvt": "student before training (FVT initialisation on a new tokenizer)",
    "alm": "student after ALM",
    "sft": "student after SFT only (baseline)",
    "alm_sft": "student after ALM + SFT (balanced)",
    "alm_latents": "student after ALM + latents (balanced)",
    "alm1_sft3": "student after ALM + SFT (balanced 1:3)",
    "alm_abs": "student after ALM, distance |lpT - lpS|",
    "alm_emblr": "student after ALM, embeddings at lr 1e-3",
    "alm_scaled": "student after ALM, loss x 10,000 (clipped like SFT)",
}
TRAINED = tuple(m for m in LABELS if m not in ("teacher", "fvt"))  # the runs of the experiment


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file (missing file: none)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def gap_closed(fvt: float, trained: float, teacher: float) -> float:
    """Share of the FVT-to-teacher bits-per-byte gap a trained student closed (1.0 = all of it)."""
    return (fvt - trained) / (fvt - teacher)


def report(folder: Path) -> str:
    """The Markdown summary of one experiment folder."""
    evals = {(r["model"], r["text"]): r["result"]["bits_per_byte"] for r in read_jsonl(folder / "eval.jsonl")}
    texts = sorted({t for _, t in evals}, key=["heldout", "prose", "teacher_text"].index)
    lines = ["| model | " + " | ".join(f"{t} bits/byte" for t in texts) + " |", "|---|" + "---|" * len(texts)]
    for model, label in LABELS.items():
        if not any((model, t) in evals for t in texts):
            continue
        cells = [f"{evals[(model, t)]:.4f}" if (model, t) in evals else "n/a" for t in texts]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for t in texts:
        if ("fvt", t) in evals and ("teacher", t) in evals:
            fvt, teacher = evals[("fvt", t)], evals[("teacher", t)]
            parts = [f"{m.upper().replace('_', '+')} closed {100 * gap_closed(fvt, evals[(m, t)], teacher):.1f}%"
                     for m in TRAINED if (m, t) in evals]
            lines.append(f"- {t}: FVT-to-teacher gap {fvt - teacher:.4f} bits/byte; " + ", ".join(parts) + ".")
    timings = {r["run"]: r["wall_s"] for r in read_jsonl(folder / "timings.jsonl")}
    for run in TRAINED:
        log = [r for r in read_jsonl(folder / run / "log.jsonl") if "loss" in r]
        if log:
            last = log[-1]
            tps = sum(r["tokens_per_s"] for r in log) / len(log)
            lines.append(f"- {run}: {last['step']} steps, {last['tokens']} student tokens, training time "
                         f"{last['elapsed']:.0f} s ({last['elapsed'] / last['step']:.1f} s/step, mean {tps:.0f} tokens/s)"
                         + (f", wall time with evaluations {timings[run]} s" if run in timings else "")
                         + f", final loss {last['loss']:.4f}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python bench/transfer_report.py EXPERIMENT_DIR", file=sys.stderr)
        return 2
    print(report(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
