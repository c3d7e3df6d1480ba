"""EleutherAI's lm-eval, unchanged, against the server: its `local-completions` model (one
/v1/completions request per answer choice, token-id prompts, `echo`, `logprobs: 1`,
`max_tokens: 1`) on the task files of bench/downstream.py and the zoo's data, scored by the tiny
pair on the reference engine. Keeps the client path of the downstream benchmark from rotting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import downstream
from server_harness import API_KEY, ServerThread

LIMIT = 4
TASKS = ["piqa", "lambada_openai"]
REQUESTS_PER_DOC = {"piqa": 2, "lambada_openai": 1}  # answer choices per document


@pytest.fixture()
def seen_prompts(torch_server: ServerThread, monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[int], object]]:
    """(prompt token ids, SamplingOptions) of every engine request the server makes meanwhile."""
    engine = torch_server.engine
    seen: list[tuple[list[int], object]] = []
    generate = engine.generate

    def spy(prompt, options, request_id):
        seen.append((list(prompt), options))
        return generate(prompt, options, request_id)

    monkeypatch.setattr(engine, "generate", spy)
    return seen


def test_lm_eval_local_completions_scores_tasks_through_the_server(
    torch_server: ServerThread, server_ensemble: Path, tmp_path: Path, seen_prompts: list
) -> None:
    task_dir = downstream.render_tasks(tmp_path / "tasks", TASKS)
    tokenizer, start = downstream.start_token_tokenizer(server_ensemble, tmp_path / "tokenizer")
    assert start == 151_643  # Qwen2's <|endoftext|>
    results = downstream.run_lm_eval(torch_server.url, "pair", tokenizer, TASKS, task_dir, LIMIT,
                                     api_key=API_KEY, max_length=torch_server.state.ready.max_model_len)
    for task in TASKS:
        values = results["results"][task]
        assert 0.0 <= values["acc,none"] <= 1.0
        assert values["acc_stderr,none"] >= 0.0 and math.isfinite(values["acc_stderr,none"])
        assert len(results["samples"][task]) == LIMIT
    assert math.isfinite(results["results"]["lambada_openai"]["perplexity,none"])

    # The server saw exactly lm-eval's requests: one per choice, scoring the prompt.
    assert len(seen_prompts) == sum(LIMIT * REQUESTS_PER_DOC[t] for t in TASKS)
    for prompt, options in seen_prompts:
        assert options.prompt_logprobs == 1 and options.max_tokens == 1 and options.temperature == 0.0
        assert prompt[0] == start and start not in prompt[1:]
    # Each log-likelihood lm-eval reports is a sum of the server's (finite, negative) log-probs.
    for task in TASKS:
        for sample in results["samples"][task]:
            for loglikelihood, is_greedy in sample["filtered_resps"]:
                assert math.isfinite(float(loglikelihood)) and float(loglikelihood) < 0.0
                assert isinstance(is_greedy, bool)

    summary = downstream.summarise(results, TASKS)
    assert 0.0 <= summary["piqa"]["ece"] <= 1.0 and "ece" not in summary["lambada_openai"]
    json.dumps(summary)  # JSON-ready


def test_downstream_bench_serves_and_tabulates(server_ensemble: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """bench/downstream.py end to end: `serve` (torch engine) in a subprocess on a free port, lm-eval
    against it, the JSON and the Markdown table."""
    out = tmp_path / "downstream.json"
    code = downstream.main(["--scorer", f"pair={server_ensemble}", "--tasks", "winogrande", "--limit", "2",
                            "--engine", "torch", "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    row = record["scorers"]["pair"]["tasks"]["winogrande"]
    assert row["n"] == 2 and 0.0 <= row["acc"] <= 1.0 and "acc_stderr" in row and 0.0 <= row["ece"] <= 1.0
    table = capsys.readouterr().out
    assert "| scorer | winogrande | mean acc |" in table and "| pair | " in table


def test_chorus_completions_sends_the_member_weights(
    torch_server: ServerThread, server_ensemble: Path, tmp_path: Path, seen_prompts: list
) -> None:
    """lm-eval's local-completions plus `member_weights` in every body: the engine sees them, and the
    log-likelihoods move with them (all weight on alpha, then all on beta)."""
    task_dir = downstream.render_tasks(tmp_path / "tasks", ["piqa"])
    tokenizer, _ = downstream.start_token_tokenizer(server_ensemble, tmp_path / "tokenizer")
    scored = {}
    for weights in ([1.0, 0.0], [0.0, 1.0]):
        seen_prompts.clear()
        results = downstream.run_lm_eval(torch_server.url, "pair", tokenizer, ["piqa"], task_dir, 2, api_key=API_KEY,
                                         max_length=torch_server.state.ready.max_model_len, member_weights=weights)
        assert len(seen_prompts) == 4 and all(options.weights == tuple(weights) for _, options in seen_prompts)
        scored[tuple(weights)] = [float(ll) for s in results["samples"]["piqa"] for ll, _ in s["filtered_resps"]]
    assert scored[(1.0, 0.0)] != scored[(0.0, 1.0)]


def test_calibration_sweep_serves_once_and_plots(server_ensemble: Path, tmp_path: Path) -> None:
    """bench/calibration_sweep.py end to end on the tiny pair: one `serve` (reference engine), lm-eval
    at each weight of the base member, the JSON and the PNG."""
    from bench import calibration_sweep

    out = tmp_path / "sweep.json"
    code = calibration_sweep.main([str(server_ensemble), "--base", "alpha", "--points", "3", "--tasks", "winogrande",
                                   "--limit", "2", "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    assert [p["base_weight"] for p in record["points"]] == [0.0, 0.5, 1.0]
    assert record["points"][1]["member_weights"] == {"alpha": 0.5, "beta": 0.5}
    assert record["own_base_weight"] == pytest.approx(1 / 3)  # the pair's own weights are 1 and 2
    for point in record["points"]:
        assert 0.0 <= point["mean_acc"] <= 1.0 and 0.0 <= point["mean_ece"] <= 1.0
        assert point["tasks"]["winogrande"]["n"] == 2
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
