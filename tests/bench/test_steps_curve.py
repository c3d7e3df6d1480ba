"""bench/steps_curve.py on two tiny synthetic ensemble_quality JSON files: the manifest's row, the best
original and the goal per text, the crossing of the goal, the log, and the JSON and PNG it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import steps_curve
from bench.steps_curve import CurveError, crossing, curve, manifest_row, originals, parse_point, run_log

TEXTS = ["zoo:heldout", "zoo:treebank"]
ORIGINALS = {
    "original gemma3 (own tokenizer)": {"zoo:heldout": 1.6, "zoo:treebank": 1.6},
    "original smollm2 (own tokenizer)": {"zoo:heldout": 1.7, "zoo:treebank": 1.5},
}


def quality(ensemble: dict[str, float], member: dict[str, float], weights: tuple[float, float],
            with_originals: bool) -> dict:
    """Shaped like bench/ensemble_quality.py's --out: originals, members, then the ensemble rows with
    the manifest's own rule first."""
    rows = dict(ORIGINALS) if with_originals else {}
    rows |= {
        "gemma": {"zoo:heldout": 1.59, "zoo:treebank": 1.58},
        "smollm": member,
        f"ensemble logprob_mean ({weights[0]:g}, {weights[1]:g})": ensemble,
        f"ensemble prob_mean ({weights[0]:g}, {weights[1]:g})": {t: 9.0 for t in TEXTS},  # not the manifest's
    }
    return {"ensemble": "/nonexistent/ensemble-gemma3", "max_bytes": 20000,
            "originals": ["gemma3=zoo:gemma3", "smollm2=zoo:smollm2"] if with_originals else [],
            "members": [{"name": "gemma", "path": "/x/gemma3", "weight": weights[0]},
                        {"name": "smollm", "path": "/x/smollm2-gemma3/model", "weight": weights[1]}],
            "bits_per_byte": rows}


@pytest.fixture
def two_points(tmp_path: Path) -> tuple[Path, Path]:
    # Goal: 3% below 1.6 (heldout, gemma3) = 1.552 and below 1.5 (treebank, smollm2) = 1.455.
    p0 = tmp_path / "steps_0.json"
    p0.write_text(json.dumps(quality({"zoo:heldout": 1.584, "zoo:treebank": 1.485},
                                     {"zoo:heldout": 2.3, "zoo:treebank": 2.2}, (0.8, 0.2), False)))
    p100 = tmp_path / "steps_100.json"
    p100.write_text(json.dumps(quality({"zoo:heldout": 1.520, "zoo:treebank": 1.470},
                                       {"zoo:heldout": 1.9, "zoo:treebank": 1.8}, (0.7, 0.3), True)))
    return p0, p100


def test_parse_point() -> None:
    assert parse_point("120=/a/b.json") == (120, Path("/a/b.json"))
    for bad in ["120", "x=/a", "-1=/a", "5="]:
        with pytest.raises(CurveError):
            parse_point(bad)


def test_rows_and_crossing(two_points: tuple[Path, Path]) -> None:
    record = json.loads(two_points[1].read_text())
    assert manifest_row(record) == "ensemble logprob_mean (0.7, 0.3)"
    assert set(originals(record)) == {"gemma3", "smollm2"}
    assert originals(json.loads(two_points[0].read_text())) == {}
    with pytest.raises(CurveError):
        manifest_row({"bits_per_byte": {"gemma": {}}})
    # Linear between measured points only; reached at the first point; never reached.
    assert crossing([0, 100], [1.584, 1.520], 1.552) == pytest.approx(50.0)
    assert crossing([0, 40, 120], [1.0, 0.9, 0.8], 1.0) == 0.0
    assert crossing([0, 100], [1.485, 1.470], 1.455) is None


def test_curve_numbers(two_points: tuple[Path, Path]) -> None:
    points = {0: json.loads(two_points[0].read_text()), 100: json.loads(two_points[1].read_text())}
    rec = curve(points, originals(points[100]))
    assert rec["texts"] == TEXTS
    assert rec["best_original"] == {"zoo:heldout": {"name": "gemma3", "bpb": 1.6},
                                    "zoo:treebank": {"name": "smollm2", "bpb": 1.5}}
    assert rec["target_bpb"] == pytest.approx({"zoo:heldout": 1.552, "zoo:treebank": 1.455})
    assert [p["steps"] for p in rec["points"]] == [0, 100]
    first, last = rec["points"]
    assert first["ensemble_bpb"] == {"zoo:heldout": 1.584, "zoo:treebank": 1.485}
    assert first["change_pct"] == pytest.approx({"zoo:heldout": -1.0, "zoo:treebank": -1.0})
    assert last["change_pct"] == pytest.approx({"zoo:heldout": -5.0, "zoo:treebank": -2.0})
    assert last["goal_met"] == {"zoo:heldout": True, "zoo:treebank": False}
    assert last["member_bpb"] == {"zoo:heldout": 1.9, "zoo:treebank": 1.8}
    assert last["weights"] == {"gemma": 0.7, "smollm": 0.3}
    assert rec["goal_reached_at_steps"]["zoo:heldout"] == pytest.approx(50.0)
    assert rec["goal_reached_at_steps"]["zoo:treebank"] is None
    assert rec["member_original"]["bpb"] == {"zoo:heldout": 1.7, "zoo:treebank": 1.5}


def test_run_log(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(e) for e in [
        {"eval_bpb": 2.3, "eval_bytes": 7041, "step": 0},
        {"elapsed": 15.0, "loss": 0.01, "step": 1, "step_s": 15.0},
        {"elapsed": 35.0, "loss": 0.005, "step": 2, "step_s": 20.0},
        {"eval_bpb": 2.0, "eval_bytes": 7041, "step": 2},
    ]) + "\n")
    assert run_log(log) == {"log": str(log), "steps_logged": 2, "wall_s": 35.0, "mean_step_s": 17.5,
                            "eval_bpb_start": {"step": 0, "bpb": 2.3}, "eval_bpb_end": {"step": 2, "bpb": 2.0}}


def test_main_writes_json_and_png(two_points: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "results" / "steps_curve.json"
    # Originals from the first point that has them (the 100-step one); points given out of order.
    rc = steps_curve.main(["--point", f"100={two_points[1]}", "--point", f"0={two_points[0]}", "--out", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert [p["steps"] for p in rec["points"]] == [0, 100]
    assert rec["points"][1]["ensemble_bpb"]["zoo:heldout"] == 1.520
    assert rec["points"][0]["source"] == str(two_points[0])
    assert rec["goal_reached_at_steps"]["zoo:heldout"] == pytest.approx(50.0)
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "at about 50 steps" in capsys.readouterr().out


def test_main_one_line_errors(two_points: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "c.json"
    assert steps_curve.main(["--point", f"0={two_points[0]}", "--out", str(out)]) == 1  # no originals anywhere
    assert "give --originals" in capsys.readouterr().err
    assert steps_curve.main(["--point", f"0={two_points[0]}", "--point", f"0={two_points[1]}",
                             "--out", str(out)]) == 1
    assert steps_curve.main(["--point", f"0={tmp_path / 'missing.json'}", "--out", str(out)]) == 1
    assert not out.exists()
