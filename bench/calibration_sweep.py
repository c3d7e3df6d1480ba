"""Accuracy and calibration along the weight between the base member and the instruct members.

    python bench/calibration_sweep.py ~/.cache/chorus/default/ensemble-gemma3 --base gemma \
        --points 5 --limit 20 --out bench/results/calibration_sweep.json

Gemma-3 270M is a base model; SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct are
instruction-tuned, which tends to make them overconfident. One server (`serve` on the reference
engine: vLLM's pooling weights are fixed when it loads, see `ensemble.vllm_engine`) serves the
ensemble, and lm-eval's `local-completions` runs the multiple-choice tasks of
`bench/downstream.py` once per point of the sweep: the base member at weight ``a`` for ``a`` in
``linspace(0, 1, points)``, the other members sharing ``1 - a`` equally, sent with every request
as chorus's per-request ``member_weights`` (lm-eval model `chorus-completions`). The pooling rule
and temperatures stay the ensemble's own. The JSON holds every point's per-task accuracy, standard
error and expected calibration error (ECE); the PNG beside it plots mean accuracy (with its
standard error) and mean ECE over ``a``, with the ensemble's own weight for the base member marked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.downstream import (
    MULTIPLE_CHOICE,
    TASKS,
    DownstreamError,
    check_tasks,
    mean_accuracy,
    render_tasks,
    run_lm_eval,
    served,
    start_token_tokenizer,
    summarise,
)


def sweep_weights(members: Sequence[str], base: str, points: int) -> list[tuple[float, list[float]]]:
    """``(a, weights in member order)`` for ``a`` evenly from 0 to 1: `base` at ``a``, the others
    sharing ``1 - a`` equally."""
    if base not in members:
        raise DownstreamError(f"--base {base!r} is not a member of the ensemble ({', '.join(members)})")
    if len(members) < 2:
        raise DownstreamError("a sweep needs at least two members")
    if points < 2:
        raise DownstreamError(f"--points must be at least 2, got {points}")
    out = []
    for i in range(points):
        a = i / (points - 1)
        rest = (1 - a) / (len(members) - 1)
        out.append((round(a, 6), [a if m == base else rest for m in members]))
    return out


def mean_ece(summary: dict[str, dict[str, Any]]) -> float:
    """Mean expected calibration error over the multiple-choice tasks of `summary`."""
    values = [row["ece"] for task, row in summary.items() if task in MULTIPLE_CHOICE and "ece" in row]
    if not values:
        raise DownstreamError("no multiple-choice task in the summary")
    return sum(values) / len(values)


def plot(record: dict[str, Any], path: Path) -> None:
    """Mean accuracy (± standard error) and mean ECE over the base member's weight, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = record["points"]
    a = [p["base_weight"] for p in points]
    acc = [p["mean_acc"] for p in points]
    err = [p["mean_acc_stderr"] for p in points]
    ece = [p["mean_ece"] for p in points]
    fig, left = plt.subplots(figsize=(6.4, 4.0))
    left.errorbar(a, acc, yerr=err, marker="o", color="tab:blue", capsize=3, label="mean accuracy")
    left.set_xlabel(f"weight of the base member ({record['base']}); the others share the rest")
    left.set_ylabel("mean accuracy", color="tab:blue")
    right = left.twinx()
    right.plot(a, ece, marker="s", color="tab:red", label="mean ECE")
    right.set_ylabel("mean expected calibration error", color="tab:red")
    if record.get("own_base_weight") is not None:
        left.axvline(record["own_base_weight"], color="grey", linestyle=":", label="the ensemble's own weight")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles=handles, loc="lower center", fontsize="small")
    left.set_title(f"{', '.join(record['tasks'])}: first {record['limit']} documents each", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ensemble", type=Path, help="an ensemble folder (ensemble build)")
    p.add_argument("--base", required=True, help="the base member's name (its weight is swept)")
    p.add_argument("--points", type=int, default=5, help="weights from 0 to 1 (default 5)")
    mc = ",".join(t for t in TASKS if t in MULTIPLE_CHOICE)
    p.add_argument("--tasks", default=mc, help=f"multiple-choice tasks, comma-separated (default: {mc})")
    p.add_argument("--limit", type=int, default=20, help="documents per task, the first ones (default 20)")
    p.add_argument("--concurrency", type=int, default=1, help="requests lm-eval keeps in flight (default 1)")
    p.add_argument("--work-dir", type=Path, help="task files and the server log (default: a temporary folder)")
    p.add_argument("--out", type=Path, required=True, help="the JSON; the plot goes beside it (.png)")
    args = p.parse_args(argv)
    try:
        tasks = check_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
        if not_mc := [t for t in tasks if t not in MULTIPLE_CHOICE]:
            raise DownstreamError(f"calibration needs multiple-choice tasks; not one: {', '.join(not_mc)}")
        work = args.work_dir or Path(tempfile.mkdtemp(prefix="chorus-sweep-"))
        work.mkdir(parents=True, exist_ok=True)
        task_dir = render_tasks(work / "tasks", tasks)
        tokenizer, _ = start_token_tokenizer(args.ensemble, work / "tokenizer")
        record: dict[str, Any] = {"ensemble": str(args.ensemble), "base": args.base, "tasks": tasks,
                                  "limit": args.limit, "engine": "torch", "points": []}
        with served(args.ensemble, "torch", work / "serve.log") as (url, card):
            own = card["ensemble"]["members"]
            members = [m["name"] for m in own]
            total = sum(m["weight"] for m in own)
            record["own_base_weight"] = next(m["weight"] for m in own if m["name"] == args.base) / total
            record["rule"] = card["ensemble"].get("rule")
            for a, weights in sweep_weights(members, args.base, args.points):
                start = time.monotonic()
                results = run_lm_eval(url, card["id"], tokenizer, tasks, task_dir, args.limit,
                                      api_key=os.environ.get("CHORUS_API_KEY"), max_length=card.get("max_model_len"),
                                      concurrency=args.concurrency, member_weights=weights)
                summary = summarise(results, tasks)
                acc, err = mean_accuracy(summary)
                record["points"].append({"base_weight": a, "member_weights": dict(zip(members, weights, strict=True)),
                                         "mean_acc": acc, "mean_acc_stderr": err, "mean_ece": mean_ece(summary),
                                         "tasks": summary, "seconds": round(time.monotonic() - start, 1)})
                print(f"[sweep] {args.base} at {a:.2f}: mean accuracy {acc:.3f} ± {err:.3f}, "
                      f"mean ECE {record['points'][-1]['mean_ece']:.3f} ({record['points'][-1]['seconds']:.0f} s)",
                      flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    except DownstreamError as err:
        print(f"calibration_sweep: error: {err}", file=sys.stderr)
        return 1
    png = args.out.with_suffix(".png")
    plot(record, png)
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
