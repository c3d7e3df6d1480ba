"""Run log: JSON lines that survive a torn last line, truncation at resume, CSV and the plot."""

from __future__ import annotations

import csv

from transfer.runlog import RunLog, plot_losses, write_csv


def test_log_truncates_and_skips_a_torn_line(tmp_path):
    log = RunLog(tmp_path / "log.jsonl")
    for step in range(1, 5):
        log.write({"step": step, "loss": 1.0 / step, "loss_alm": 0.5 / step})
    log.write({"step": 4, "eval_bpb": 3.5})
    with open(log.path, "a") as f:
        f.write('{"step": 5, "lo')  # killed mid-write
    assert [r["step"] for r in log.records()] == [1, 2, 3, 4, 4]
    log.truncate_after(2)
    assert log.records() == [{"step": 1, "loss": 1.0, "loss_alm": 0.5}, {"step": 2, "loss": 0.5, "loss_alm": 0.25}]


def test_csv_and_plot(tmp_path):
    records = [{"step": 1, "loss": 2.0, "loss_sft": 1.5}, {"step": 1, "eval_bpb": 4.0}, {"step": 2, "loss": 1.0}]
    write_csv(records, tmp_path / "log.csv")
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "eval_bpb", "loss", "loss_sft"]
    assert rows[1] == {"step": "1", "eval_bpb": "4.0", "loss": "", "loss_sft": ""}
    png = plot_losses(records, tmp_path / "loss.png", title="t")
    assert png.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob(".*"))
    assert plot_losses([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
