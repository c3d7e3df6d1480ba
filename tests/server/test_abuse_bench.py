"""bench/abuse.py end to end on the tiny pair (reference engine, a few requests): the valid
traffic is served in both phases, every abuser gets its 4xx, nothing answers 5xx, and the server
is healthy after."""

from __future__ import annotations

import json
from pathlib import Path

from bench import abuse


def test_percentile() -> None:
    assert abuse.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert abuse.percentile([1.0, 2.0], 0.99) == 1.99
    assert abuse.percentile([5.0], 0.99) == 5.0


def test_abuse_bench_runs_and_reports(server_ensemble: Path, tmp_path: Path) -> None:
    out = tmp_path / "abuse.json"
    code = abuse.main([str(server_ensemble), "--engine", "torch", "--clients", "2", "--requests", "4",
                       "--max-tokens", "2", "--abusers", "1", "--huge-mb", "20", "--stream-stall-timeout", "2",
                       "--log", str(tmp_path / "serve.log"), "--out", str(out)])
    record = json.loads(out.read_text())
    assert code == 0, record
    assert record["quiet"]["valid_ok"] == record["abuse"]["valid_ok"] == 8
    abusers = record["abuse"]["abusers"]
    assert abusers["huge_bodies"].get("413", 0) + abusers["huge_bodies"].get("closed", 0) >= 1
    # 429: the abusers' address ran out of refusals (server.refusals), answered from the headers
    assert set(abusers["huge_bodies"]) <= {"413", "429", "closed", "chunked 413", "chunked 429", "chunked closed"}
    assert record["abuse"]["abuser_failures"] == []
    assert "400" in abusers["hostile_json"] and set(abusers["hostile_json"]) <= {"400", "429", "closed"}
    assert abusers["slow_readers"]["opened"] >= 1
    assert record["health_after"] == 200 and record["p99_ratio"] > 0


def test_abusers_with_their_own_key_are_throttled_and_valid_clients_are_not(server_ensemble: Path,
                                                                              tmp_path: Path) -> None:
    out = tmp_path / "abuse.json"
    code = abuse.main([str(server_ensemble), "--engine", "torch", "--clients", "2", "--requests", "4",
                       "--max-tokens", "2", "--abusers", "1", "--huge-mb", "20", "--stream-stall-timeout", "2",
                       "--abuser-quota", "2", "--serve-arg=--max-refusals=4",
                       "--log", str(tmp_path / "serve.log"), "--out", str(out)])
    record = json.loads(out.read_text())
    assert code == 0, record
    assert record["quiet"]["valid_ok"] == record["abuse"]["valid_ok"] == 8  # the valid clients' budget is untouched
    hostile = record["abuse"]["abusers"]["hostile_json"]
    assert hostile.get("400", 0) <= 4 + 1  # refilled at 4 a minute
    assert hostile.get("429", 0) + hostile.get("closed", 0) >= 1, hostile
