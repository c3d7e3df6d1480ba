"""What a downstream run leaves behind: the JSON record (written after every scorer, so an
interrupted run keeps what it measured) and the Markdown table printed at the end."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.downstream_metrics import ECE_BINS, mean_accuracy


def new_record(tasks: Sequence[str], limit: int | None, engine: str) -> dict[str, Any]:
    """The JSON record of a run before any scorer: its settings, then per scorer `scorers` (path,
    start token, per-task summary) and `seconds`."""
    return {"tasks": tasks, "limit": limit, "engine": engine, "ece_bins": ECE_BINS, "scorers": {}, "seconds": {}}


def write_record(out: Path, record: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def markdown_table(scores: dict[str, dict[str, dict[str, Any]]], tasks: Sequence[str]) -> str:
    """Rows: scorers; columns: `acc ± stderr` per task (ECE beside it for multiple choice), the mean."""
    lines = ["| scorer | " + " | ".join(tasks) + " | mean acc |", "|---" * (len(tasks) + 2) + "|"]
    for name, summary in scores.items():
        cells = []
        for task in tasks:
            row = summary[task]
            err = "n/a" if row["acc_stderr"] is None else f"{row['acc_stderr']:.3f}"
            cell = f"{row['acc']:.3f} ± {err}"
            if "ece" in row:
                cell += f" (ECE {row['ece']:.3f})"
            cells.append(cell)
        mean, err = mean_accuracy(summary)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.3f} ± {err:.3f} |")
    return "\n".join(lines)


def print_report(scores: dict[str, dict[str, dict[str, Any]]], tasks: Sequence[str], limit: int | None,
                 out: Path | None) -> None:
    """The table of every scorer, under a line saying what its numbers are."""
    print(f"\naccuracy ± standard error (ECE, {ECE_BINS} bins), first {limit or 'all'} documents per task\n")
    print(markdown_table(scores, tasks))
    if out:
        print(f"\nwrote {out}")
