"""The run log of a transfer run: JSON lines on disk, a CSV copy and a PNG plot of the loss curves.

Every record is one JSON object per line with at least ``step``; training records carry
``loss`` and ``loss_<term>``, evaluation records ``eval_bpb``. A resumed run first drops the
records written after the checkpoint it resumes from, so the log reads as one run.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any


class RunLog:
    """Append-only JSON-lines log at ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (flushed immediately, so a killed run keeps what it logged)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()

    def records(self) -> list[dict[str, Any]]:
        """All records; a torn last line (the run was killed mid-write) is skipped."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def truncate_after(self, step: int) -> None:
        """Keep only the records of steps <= ``step`` (rewritten atomically)."""
        keep = [r for r in self.records() if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, self.path)


def write_csv(records: list[dict[str, Any]], out: str | Path) -> Path:
    """Write ``records`` as CSV (atomically): one row per record, ``step`` first, then every key
    any record has in sorted order; missing values are empty."""
    keys = sorted({k for r in records for k in r} - {"step"})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", *keys], restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, out)
    return out


def plot_losses(records: list[dict[str, Any]], out: str | Path, title: str = "") -> Path | None:
    """Write a PNG with the training losses (total and per term) and, if present, the
    evaluation bits per byte; returns the path, or None when there is nothing to plot."""
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_bpb" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0][0]
    keys = ["loss"] + sorted({k for r in train for k in r if k.startswith("loss_")})
    for key in keys:
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key, linewidth=1.5 if key == "loss" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    if train:
        ax.legend()
    if evals:
        ax2 = axes[0][1]
        ax2.plot([r["step"] for r in evals], [r["eval_bpb"] for r in evals], marker="o")
        ax2.set_xlabel("step")
        ax2.set_ylabel("bits per byte (held-out)")
        ax2.set_title("evaluation")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out
