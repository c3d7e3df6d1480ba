"""bench/serving.py end to end on the tiny pair: real servers (chorus `serve` on vLLM, each member on
plain vLLM's API server, the ensemble drafting with vLLM's n-gram proposer) driven by vLLM's own
load generator at concurrency 1; the record, the bound, the ratios and the plots it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import serving

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_serving_bench_runs_every_system_it_is_asked_for(server_ensemble: Path, tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    code = serving.main([str(server_ensemble), "--only", "ensemble", "alpha alone", "beta alone", "ngram",
                         "--concurrency", "1", "--input-len", "8", "--output-len", "4", "--min-prompts", "2",
                         "--out", str(out), "--logs", str(tmp_path / "logs")])
    assert code == 0
    record = json.loads(out.read_text())
    results = record["results"]
    assert set(results) == {"ensemble", "alpha alone", "beta alone", "ngram", "bound"}
    for name, rows in results.items():
        assert rows["1"]["output_throughput"] > 0 and rows["1"]["median_tpot_ms"] > 0, name
    assert results["bound"]["1"]["median_tpot_ms"] == pytest.approx(
        results["alpha alone"]["1"]["median_tpot_ms"] + results["beta alone"]["1"]["median_tpot_ms"])
    ratios = record["ratios"]["1"]
    assert ratios["ensemble / bound tok/s"] > 0 and ratios["ngram / bound TPOT"] > 0
    assert 0 <= ratios["pooling share of wall time"] < 1
    assert (tmp_path / "serving_throughput.png").stat().st_size > 1000
