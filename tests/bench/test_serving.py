"""bench/serving.py's arithmetic and choices, without servers (the full run is documented in
bench/RESULTS.md; a tiny ensemble run of it is tests/server/test_serving_bench.py, marked slow)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench.serving import bound_row, markdown, median_rows, plot, prompts_for, ratios, served_folder, systems


def _row(tok_s: float, tpot: float, ttft: float = 10.0) -> dict[str, float]:
    return {"output_throughput": tok_s, "median_tpot_ms": tpot, "p99_tpot_ms": 2 * tpot,
            "median_ttft_ms": ttft, "p99_ttft_ms": 2 * ttft}


def test_prompts_are_two_waves_and_at_least_the_minimum() -> None:
    assert [prompts_for(c, 16) for c in (1, 4, 16, 64)] == [16, 16, 32, 128]


def test_bound_runs_the_members_one_after_another() -> None:
    bound = bound_row([_row(20.0, 50.0), _row(5.0, 200.0)])
    assert bound["output_throughput"] == pytest.approx(4.0)  # 1 / (1/20 + 1/5)
    assert bound["median_tpot_ms"] == 250.0 and bound["p99_tpot_ms"] == 500.0 and bound["median_ttft_ms"] == 20.0


def test_rounds_report_the_median_of_each_metric() -> None:
    rounds = [{"1": {**_row(8.0, 120.0), "pooling_share": 0.02}, "16": _row(40.0, 300.0)},
              {"1": {**_row(10.0, 100.0), "pooling_share": 0.04}, "16": _row(50.0, 200.0)},
              {"1": _row(9.0, 90.0)}]  # a round that stopped before 16, and measured no pooling
    rows = median_rows(rounds)
    assert list(rows) == ["1", "16"]
    assert rows["1"]["output_throughput"] == 9.0 and rows["1"]["median_tpot_ms"] == 100.0
    assert rows["1"]["pooling_share"] == pytest.approx(0.03)
    assert rows["16"]["output_throughput"] == 45.0 and rows["16"]["median_tpot_ms"] == 250.0


def test_ratios_are_taken_only_where_both_sides_were_measured() -> None:
    results = {
        "ensemble": {"1": {**_row(8.0, 120.0), "pooling_share": 0.02}, "64": _row(40.0, 300.0)},
        "bound": {"1": _row(4.0, 250.0), "64": _row(20.0, 600.0)},
        "naive": {"1": _row(2.0, 400.0)},
        "drafted": {"1": _row(12.0, 60.0)},
        "ngram": {"1": {**_row(16.0, 50.0), "acceptance": 0.75}},
        "ngram up to 4": {"64": _row(38.0, 330.0)},
        "one core reserved": {"64": _row(32.0, 350.0)},
        "a alone": {"64": _row(30.0, 100.0)},
        "a by name": {"64": _row(27.0, 110.0)},
    }
    r = ratios(results)
    assert r["1"] == {"ensemble / bound tok/s": 2.0, "ensemble / naive tok/s": 4.0, "drafted / bound TPOT": 0.24,
                      "drafted / ensemble TPOT": 0.5, "ngram / bound TPOT": 0.2, "ngram / ensemble TPOT": 50 / 120,
                      "pooling share of wall time": 0.02, "ngram: draft tokens accepted": 0.75}
    assert r["64"] == {"ensemble / bound tok/s": 2.0, "ensemble / one core reserved tok/s": 1.25,
                       "ngram up to 4 / bound TPOT": 0.55, "ngram up to 4 / ensemble TPOT": 1.1,
                       "a by name / alone tok/s": 0.9}
    text = markdown({"results": results, "ratios": r})
    assert "| ensemble | 1 | 8.0 | 10 / 20 | 120.0 / 240.0 |" in text and "| 1 | drafted / bound TPOT | 0.240 |" in text


def test_the_load_generator_call_pickles_for_its_child_process() -> None:
    """`measure` runs `load` in a spawned child per system: the function and the parsed
    arguments (paths among them) must survive pickling."""
    import pickle

    from bench.serving import load

    args = argparse.Namespace(input_len=64, output_len=32, min_prompts=16, logs=Path("/tmp/logs"), preload=None)
    fn, back = pickle.loads(pickle.dumps((load, args)))
    assert fn is load and back == args


def test_every_server_runs_the_same_openmp(tmp_path: Path, monkeypatch) -> None:
    """auto: serve preloads Intel OpenMP itself and the members' servers get the same library;
    none: nobody preloads; a path: every server's LD_PRELOAD, serve told to add nothing."""
    from bench.serving import Preloads, preloads
    from ensemble.vllm_engine_args import intel_openmp_library

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    library = intel_openmp_library()
    auto = preloads("auto", on_cpu=True)
    assert (auto.members, auto.serve, auto.serve_args) == (str(library) if library else None, None, ())
    assert preloads("auto", on_cpu=False) == Preloads(None, None, ())  # serve preloads nothing on a GPU
    assert preloads("none", on_cpu=True).serve_args == ("--no-intel-openmp",)
    lib = str(tmp_path / "libx.so")
    assert (preloads(lib, on_cpu=True).members, preloads(lib, on_cpu=True).serve) == (lib, lib)
    assert preloads(lib, on_cpu=True).serve_args == ("--no-intel-openmp",)
    monkeypatch.setenv("LD_PRELOAD", "/x/libtcmalloc.so")  # kept in front, as serve keeps it
    assert preloads(lib, on_cpu=True).members == f"/x/libtcmalloc.so:{lib}"
    if library is not None:
        assert preloads("auto", on_cpu=True).members == f"/x/libtcmalloc.so:{library}"


def test_plots_are_written(tmp_path: Path) -> None:
    record = {"ensemble": "e", "machine": {"device": "cpu"},
              "results": {"ensemble": {"1": _row(8.0, 120.0), "4": _row(20.0, 150.0)}, "bound": {"1": _row(4.0, 250.0)}}}
    paths = plot(record, tmp_path)
    assert [p.name for p in paths] == ["serving_throughput.png", "serving_tpot.png"]
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_systems_measure_only_the_members_the_ensemble_runs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    members = []
    for name, weight in (("a", 1.0), ("b", 2.0), ("idle", 0.0)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"vocab_size": 10}))
        members.append({"name": name, "path": str(folder), "weight": weight, "vocab_size": 10})
    ens = tmp_path / "ens"
    ens.mkdir()
    (ens / "chorus_ensemble.json").write_text(json.dumps({"name": "e", "vocab_size": 10, "max_model_len": 64,
                                                          "rule": "prob_mean", "format_version": 1, "members": members}))
    args = argparse.Namespace(draft_member="a", draft_tokens=2, naive_max_concurrency=16, ngram_tokens=4,
                              ngram_min=2, ngram_max=3, draft_max_batch=None)
    todo, bound_of = systems(ens, args, on_cpu=True)
    assert [s.name for s in todo] == ["ensemble", "a alone", "b alone", "a by name", "b by name", "drafted",
                                      "ngram", "one core reserved", "naive"]
    assert bound_of == ["a alone", "b alone"]
    assert (todo[3].model, todo[3].member_path) == ("a", None)  # the ensemble's server, asked for member a
    assert todo[5].args == ("--draft-member", "a", "--draft-tokens", "2")
    assert todo[1].env == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}  # the members get the ensemble's cores
    assert json.loads(todo[6].args[1]) == {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
                                           "prompt_lookup_max": 3} and todo[6].args[0] == "--speculative-config"
    assert todo[7].env == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"} and todo[8].max_concurrency == 16
    assert todo[8].voting_only and not any(s.voting_only for s in todo[:8])  # naive: the voting members only
    args.draft_max_batch = 4  # each drafting system again, drafting only in steps of at most 4 requests
    todo = systems(ens, args, on_cpu=True)[0]
    assert [s.name for s in todo][5:9] == ["drafted", "drafted up to 4", "ngram", "ngram up to 4"]
    assert todo[6].args == ("--draft-member", "a", "--draft-tokens", "2", "--draft-max-batch", "4")
    assert json.loads(todo[8].args[1])["num_speculative_tokens_per_batch_size"] == [[1, 4, 4], [5, 1 << 30, 0]]
    args.draft_member, args.ngram_tokens = None, 0
    assert [s.name for s in systems(ens, args, on_cpu=False)[0]] == ["ensemble", "a alone", "b alone", "a by name",
                                                                      "b by name", "naive"]


def test_the_naive_ensemble_serves_only_the_voting_members(tmp_path: Path) -> None:
    """served_folder: a copy of the ensemble's files whose manifest and vLLM config name only the
    members of nonzero weight (the transformers engine runs every member its manifest lists); an
    ensemble without idle members is served as it is."""
    from transformers import LlamaConfig

    from ensemble.manifest import EnsembleManifest

    members = []
    for name, weight in (("a", 1.0), ("idle", 0.0), ("b", 2.0)):
        folder = tmp_path / name
        LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                    num_attention_heads=2).save_pretrained(folder)
        members.append({"name": name, "path": str(folder), "weight": weight, "vocab_size": 10})
    ens = tmp_path / "ens"
    ens.mkdir()
    manifest = {"name": "e", "vocab_size": 10, "max_model_len": 64, "rule": "prob_mean", "format_version": 1,
                "members": members}
    (ens / "chorus_ensemble.json").write_text(json.dumps(manifest))
    (ens / "tokenizer.json").write_text("{}")
    served = served_folder(ens, tmp_path / "logs" / "naive-ensemble")
    assert served == tmp_path / "logs" / "naive-ensemble" and (served / "tokenizer.json").read_text() == "{}"
    assert [m.name for m in EnsembleManifest.load(served).members] == ["a", "b"]
    assert [m["name"] for m in json.loads((served / "config.json").read_text())["chorus"]["members"]] == ["a", "b"]
    assert EnsembleManifest.load(ens).members[1].name == "idle"  # the ensemble's own folder is untouched
    assert served_folder(served, tmp_path / "again") == served and not (tmp_path / "again").exists()
