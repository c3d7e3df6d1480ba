"""bench/engine_steps.py end to end on the tiny pair: the ensemble and each member in plain vLLM,
offline engines in this process, one round; the medians, the bound and the ratio it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import engine_steps

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_engine_steps_bench_measures_the_ensemble_and_its_members(server_ensemble: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    out = tmp_path / "engine_steps.json"
    code = engine_steps.main([str(server_ensemble), "--rounds", "1", "--concurrency", "1", "2", "--waves", "1",
                              "--input-len", "8", "--output-len", "4", "--out", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    assert record["logits_form"] in ("scaled_heads", "raw_geometric", "log_probs")
    med = record["median_tok_s"]
    assert set(med) == {"ensemble", "alpha alone", "beta alone", "bound", "ensemble / bound"}
    for c in ("1", "2"):
        assert all(med[name][c] > 0 for name in med)
        assert med["bound"][c] == pytest.approx(1 / (1 / med["alpha alone"][c] + 1 / med["beta alone"][c]))


def test_step_profile_shows_the_ensembles_products(server_ensemble: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """bench/step_profile.py on the tiny pair's ensemble and one member: the unprofiled speed, the
    oneDNN products by shape (on a CPU) and the operator table; an unknown system is refused."""
    from vllm.platforms import current_platform

    from bench import step_profile

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    for system in ("ensemble", "alpha"):
        assert step_profile.main([str(server_ensemble), system, "--input-len", "8", "--output-len", "4"]) == 0
        out = capsys.readouterr().out
        assert f"{system}, concurrency 1: " in out and "tok/s unprofiled" in out and "Self CPU" in out
        if current_platform.is_cpu():
            assert "oneDNN products by shape" in out and " calls " in out
    with pytest.raises(SystemExit, match="no served member 'nobody'"):
        step_profile.main([str(server_ensemble), "nobody"])


def test_step_profile_runs_the_ensemble_with_a_speculative_config(server_ensemble: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """--speculative-config: the ensemble drafts with vLLM's n-gram proposer under the profiler, and
    the step phases are listed; a member, which runs with plain vLLM's defaults, refuses it."""
    from bench import step_profile

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    ngram = '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1, "prompt_lookup_max": 2}'
    assert step_profile.main([str(server_ensemble), "ensemble", "--concurrency", "2", "--input-len", "8",
                              "--output-len", "4", "--speculative-config", ngram]) == 0
    out = capsys.readouterr().out
    assert "ensemble, concurrency 2: " in out and "vLLM's step phases" in out
    with pytest.raises(SystemExit, match="engine arguments are for the ensemble"):
        step_profile.main([str(server_ensemble), "alpha", "--speculative-config", ngram])
