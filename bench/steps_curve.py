"""Bits per byte of the default ensemble against the ALM steps of its transferred member.

The default ensemble (scripts/build_default.sh, pivot gemma3) is Gemma-3 270M exactly, SmolLM2-135M
moved onto Gemma-3's tokenizer by FVT and CHORUS_ALM_STEPS ALM steps, and Qwen2.5 by FVT only,
pooled by `ensemble fit`'s choice. Its goal is 3% fewer bits per byte than the best original
model on every held-out text. This script draws where that is reached: one ensemble per step
count, each built in its own folder and scored by bench/ensemble_quality.py, then plotted:

    CHORUS_DEFAULT_DIR=/work/runs/steps_0 CHORUS_ALM_STEPS=0 bash scripts/build_default.sh
    CHORUS_DEFAULT_DIR=/work/runs/steps_120 CHORUS_ALM_STEPS=120 bash scripts/build_default.sh
    python bench/ensemble_quality.py /work/runs/steps_0/ensemble-gemma3 \
        --text zoo:heldout --text zoo:prose --text zoo:treebank --max-bytes 20000 \
        --out /work/runs/steps_0/quality.json        # and the same for steps_120
    python bench/steps_curve.py \
        --point 0=/work/runs/steps_0/quality.json \
        --point 40=bench/results/ensemble_quality_gemma3.json \
        --point 120=/work/runs/steps_120/quality.json \
        --log 40=$HOME/.cache/chorus/default/smollm2-gemma3/log.jsonl \
        --log 120=/work/runs/steps_120/smollm2-gemma3/log.jsonl \
        --originals bench/results/ensemble_quality_gemma3.json \
        --out bench/results/steps_curve.json

(A step count of 0 is FVT only: the script runs `transfer init` instead of `transfer run`.)

The ensemble's number at each point is the row of its manifest's own rule, weights and
temperatures: the first ``ensemble ...`` row of ensemble_quality's JSON, the row its summary line
compares. The best original per text, and the goal 3% below it, come from the ``original NAME (own
tokenizer)`` rows of ``--originals`` (default: the first point's JSON that has such rows). Where a
point's JSON has the transferred member's own row (``--member``, default ``smollm``) its bits per
byte are drawn too, beside the original it was moved from (``--member-original``, default
``smollm2``). ``--log N=PATH`` adds the ALM run's log.jsonl: its wall time and its held-out bits per
byte at the first and last evaluation. ``fit.json`` in each ensemble folder, where it still exists,
adds the fitted rule, weights and temperatures.

Writes the JSON (``--out``) and a PNG beside it (``--png`` to put it elsewhere): one panel per text
with the ensemble's bits per byte over the steps and dashed lines at the best original and 3% below
it, and a last panel with the member's own bits per byte per text.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ORIGINAL_PREFIX = "original "
ORIGINAL_SUFFIX = " (own tokenizer)"
ENSEMBLE_PREFIX = "ensemble "


class CurveError(ValueError):
    """A one-line error about the input: a bad --point, a JSON without the rows needed."""


def parse_point(spec: str) -> tuple[int, Path]:
    """``"N=PATH"`` -> ``(N, PATH)``; N is a step count, 0 or more."""
    steps, sep, path = spec.partition("=")
    if not sep or not path:
        raise CurveError(f"{spec!r}: expected STEPS=PATH")
    try:
        n = int(steps)
    except ValueError:
        raise CurveError(f"{spec!r}: the step count {steps!r} is not a whole number") from None
    if n < 0:
        raise CurveError(f"{spec!r}: the step count must be 0 or more")
    return n, Path(path)


def load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CurveError(f"cannot read {path}: {err}") from None


def manifest_row(record: Mapping[str, Any]) -> str:
    """Name of the row of the ensemble's own rule, weights and temperatures: ensemble_quality
    writes it first among the ``ensemble ...`` rows."""
    for name in record.get("bits_per_byte", {}):
        if name.startswith(ENSEMBLE_PREFIX):
            return name
    raise CurveError(f"{record.get('ensemble', 'a point')}: no 'ensemble ...' row in bits_per_byte")


def originals(record: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{model name: {text: bits per byte}}`` of the ``original NAME (own tokenizer)`` rows."""
    out = {}
    for name, row in record.get("bits_per_byte", {}).items():
        if name.startswith(ORIGINAL_PREFIX) and name.endswith(ORIGINAL_SUFFIX):
            out[name[len(ORIGINAL_PREFIX):-len(ORIGINAL_SUFFIX)]] = dict(row)
    return out


def best_originals(rows: Mapping[str, Mapping[str, float]], texts: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{text: {"name", "bpb"}}``: the original with the fewest bits per byte on each text."""
    out = {}
    for t in texts:
        scored = [(row[t], name) for name, row in rows.items() if t in row]
        if not scored:
            raise CurveError(f"no original model was scored on {t}")
        bpb, name = min(scored)
        out[t] = {"name": name, "bpb": bpb}
    return out


def run_log(path: Path) -> dict[str, Any]:
    """Wall time and held-out bits per byte of one ALM run, from its log.jsonl."""
    steps, evals = [], []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise CurveError(f"cannot read {path}: {err}") from None
    for line in lines:
        if not line.strip():
            continue
        entry = json.loads(line)
        if "eval_bpb" in entry:
            evals.append(entry)
        elif "step_s" in entry:
            steps.append(entry)
    out: dict[str, Any] = {"log": str(path), "steps_logged": len(steps)}
    if steps:
        out["wall_s"] = round(steps[-1]["elapsed"], 1)
        out["mean_step_s"] = round(sum(s["step_s"] for s in steps) / len(steps), 2)
    if evals:
        out["eval_bpb_start"] = {"step": evals[0]["step"], "bpb": evals[0]["eval_bpb"]}
        out["eval_bpb_end"] = {"step": evals[-1]["step"], "bpb": evals[-1]["eval_bpb"]}
    return out


def fitted(ensemble: str | None) -> dict[str, Any] | None:
    """The rule, weights, temperatures and dev bits per byte `ensemble fit` chose, where the
    ensemble folder's fit.json still exists."""
    if not ensemble:
        return None
    path = Path(ensemble) / "fit.json"
    if not path.is_file():
        return None
    chosen = load_json(path).get("chosen")
    return dict(chosen) if chosen else None


def crossing(xs: Sequence[float], ys: Sequence[float], level: float) -> float | None:
    """The first x at which the piecewise-linear curve through (xs, ys) reaches `level` or goes
    below it (xs ascending); None if no measured segment gets there. No extrapolation."""
    if not xs:
        return None
    if ys[0] <= level:
        return float(xs[0])
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y1 <= level < y0:
            return float(x0 + (x1 - x0) * (y0 - level) / (y0 - y1))
    return None


def curve(points: Mapping[int, Mapping[str, Any]], original_rows: Mapping[str, Mapping[str, float]], *,
          member: str = "smollm", member_original: str = "smollm2", target_pct: float = 3.0,
          sources: Mapping[int, str] | None = None, logs: Mapping[int, Mapping[str, Any]] | None = None,
          fits: Mapping[int, Mapping[str, Any] | None] | None = None) -> dict[str, Any]:
    """The record written as JSON: the texts every point was scored on, the best original and the
    goal per text, and per step count the ensemble's bits per byte (its manifest row), the change
    against the best original in %, the member's own bits per byte, weights and the run's log."""
    if not points:
        raise CurveError("no --point given")
    rows = {n: manifest_row(rec) for n, rec in points.items()}
    texts = [t for t in points[min(points)]["bits_per_byte"][rows[min(points)]]
             if all(t in rec["bits_per_byte"][rows[n]] for n, rec in points.items())
             and any(t in row for row in original_rows.values())]
    if not texts:
        raise CurveError("no text is scored by every point and by an original")
    best = best_originals(original_rows, texts)
    goal = {t: best[t]["bpb"] * (1 - target_pct / 100) for t in texts}
    out: dict[str, Any] = {
        "texts": texts, "target_pct": target_pct, "member": member, "best_original": best,
        "target_bpb": goal, "member_original": None, "points": [],
    }
    if member_original in original_rows:
        out["member_original"] = {"name": member_original,
                                  "bpb": {t: original_rows[member_original][t] for t in texts
                                          if t in original_rows[member_original]}}
    for n in sorted(points):
        rec = points[n]
        ens = rec["bits_per_byte"][rows[n]]
        point: dict[str, Any] = {
            "steps": n, "source": (sources or {}).get(n), "ensemble": rec.get("ensemble"), "row": rows[n],
            "weights": {m["name"]: m["weight"] for m in rec.get("members", [])},
            "ensemble_bpb": {t: ens[t] for t in texts},
            "change_pct": {t: 100 * (ens[t] / best[t]["bpb"] - 1) for t in texts},
            "goal_met": {t: ens[t] <= goal[t] for t in texts},
        }
        own = rec["bits_per_byte"].get(member)
        if own is not None:
            point["member_bpb"] = {t: own[t] for t in texts if t in own}
        if fits and fits.get(n):
            point["fit"] = dict(fits[n])
        if logs and n in logs:
            point["alm"] = dict(logs[n])
        out["points"].append(point)
    steps = [p["steps"] for p in out["points"]]
    out["goal_reached_at_steps"] = {
        t: crossing(steps, [p["ensemble_bpb"][t] for p in out["points"]], goal[t]) for t in texts}
    return out


def plot(record: Mapping[str, Any], path: Path) -> None:
    """One panel per text (the ensemble over the steps, the best original and the goal dashed) and
    one with the transferred member's own bits per byte, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    texts = record["texts"]
    points = record["points"]
    steps = [p["steps"] for p in points]
    has_member = any("member_bpb" in p for p in points)
    panels = len(texts) + int(has_member)
    fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 4.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, t in enumerate(texts):
        ax = axes[0][i]
        colour = colours[i % len(colours)]
        best = record["best_original"][t]
        ax.plot(steps, [p["ensemble_bpb"][t] for p in points], marker="o", color=colour)
        for s, p in zip(steps, points):
            ax.annotate(f"{p['change_pct'][t]:+.1f}%", (s, p["ensemble_bpb"][t]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize="x-small")
        ax.axhline(best["bpb"], color="grey", linestyle="--")
        ax.axhline(record["target_bpb"][t], color="tab:red", linestyle="--")
        ax.margins(x=0.08, y=0.12)
        ax.set_title(f"{t} (best original: {best['name']})", fontsize="small")
        ax.set_xlabel(f"ALM steps of the {record['member']} member")
        if i == 0:
            ax.set_ylabel("ensemble bits per byte (its own rule)")
    handles = [Line2D([], [], color="black", marker="o", label="ensemble (the text's colour; % vs best original)"),
               Line2D([], [], color="grey", linestyle="--", label="best original on its own tokenizer"),
               Line2D([], [], color="tab:red", linestyle="--",
                      label=f"{record['target_pct']:g}% below it (the goal)")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize="small", frameon=False)
    if has_member:
        ax = axes[0][-1]
        for i, t in enumerate(texts):
            colour = colours[i % len(colours)]
            xs = [p["steps"] for p in points if t in p.get("member_bpb", {})]
            ax.plot(xs, [p["member_bpb"][t] for p in points if t in p.get("member_bpb", {})], marker="o",
                    color=colour, label=t)
            if record.get("member_original") and t in record["member_original"]["bpb"]:
                ax.axhline(record["member_original"]["bpb"][t], color=colour, linestyle="--", linewidth=0.8)
        name = record["member_original"]["name"] if record.get("member_original") else "original"
        ax.set_title(f"the {record['member']} member alone\n(dashed: {name} on its own tokenizer)", fontsize="small")
        ax.set_xlabel(f"ALM steps of the {record['member']} member")
        ax.set_ylabel("bits per byte")
        ax.margins(x=0.08)
        ax.legend(fontsize="x-small")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_lines(record: Mapping[str, Any]) -> list[str]:
    """A Markdown table of the points, then where the goal is reached."""
    texts = record["texts"]
    lines = ["| steps | " + " | ".join(f"{t} bpb (vs best)" for t in texts) + " | member bpb | weights |",
             "|---|" + "---|" * (len(texts) + 2)]
    for p in record["points"]:
        cells = [f"{p['ensemble_bpb'][t]:.4f} ({p['change_pct'][t]:+.1f}%)" for t in texts]
        member = " / ".join(f"{p['member_bpb'][t]:.4f}" for t in texts if t in p.get("member_bpb", {})) or "-"
        weights = ", ".join(f"{k} {v:g}" for k, v in p["weights"].items()) or "-"
        lines.append(f"| {p['steps']} | " + " | ".join(cells) + f" | {member} | {weights} |")
    for t in texts:
        at = record["goal_reached_at_steps"][t]
        where = f"at about {at:.0f} steps" if at is not None else "not within the measured steps"
        lines.append(f"{t}: goal {record['target_bpb'][t]:.4f} ({record['target_pct']:g}% below "
                     f"{record['best_original'][t]['name']} {record['best_original'][t]['bpb']:.4f}) reached {where}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--point", action="append", default=[], metavar="STEPS=JSON", required=True,
                   help="a step count and the JSON bench/ensemble_quality.py wrote for it (repeatable)")
    p.add_argument("--log", action="append", default=[], metavar="STEPS=LOG",
                   help="the ALM run's log.jsonl for a step count (optional, repeatable)")
    p.add_argument("--originals", type=Path,
                   help="JSON with the 'original NAME (own tokenizer)' rows (default: the first point that has them)")
    p.add_argument("--member", default="smollm", help="the transferred member's name (default smollm)")
    p.add_argument("--member-original", default="smollm2", help="the original it came from (default smollm2)")
    p.add_argument("--target-pct", type=float, default=3.0, help="the goal, %% below the best original (default 3)")
    p.add_argument("--out", type=Path, default=Path("bench/results/steps_curve.json"), help="the JSON")
    p.add_argument("--png", type=Path, help="the plot (default: beside --out, .png)")
    args = p.parse_args(argv)
    try:
        specs = [parse_point(s) for s in args.point]
        if len({n for n, _ in specs}) != len(specs):
            raise CurveError("a step count is given twice")
        points = {n: load_json(path) for n, path in specs}
        logs = {n: run_log(path) for n, path in map(parse_point, args.log)}
        if args.originals:
            original_rows = originals(load_json(args.originals))
        else:
            original_rows = next((o for n in sorted(points) if (o := originals(points[n]))), {})
        if not original_rows:
            raise CurveError("no 'original NAME (own tokenizer)' rows: give --originals")
        record = curve(points, original_rows, member=args.member, member_original=args.member_original,
                       target_pct=args.target_pct, sources={n: str(path) for n, path in specs}, logs=logs,
                       fits={n: fitted(rec.get("ensemble")) for n, rec in points.items()})
    except CurveError as err:
        print(f"steps_curve: error: {err}", file=sys.stderr)
        return 1
    png = args.png or args.out.with_suffix(".png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    plot(record, png)
    print("\n".join(summary_lines(record)))
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
