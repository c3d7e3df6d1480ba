"""bench/downstream.py without a server: the calibration error, the summary and table, the task
files (stock lm-eval prompts on the zoo's data) and the one-line errors for bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import downstream
from bench.downstream import (
    DownstreamError,
    choice_probabilities,
    expected_calibration_error,
    markdown_table,
    mean_accuracy,
    sample_calibration,
    summarise,
)
from transfer import zoo

# --------------------------------------------------------------------------- ECE


def test_choice_probabilities_are_the_softmax_of_the_loglikelihoods() -> None:
    probs = choice_probabilities([math.log(0.2), math.log(0.6), math.log(0.2)])
    assert probs == pytest.approx([0.2, 0.6, 0.2])
    assert choice_probabilities([-1000.0, -1001.0]) == pytest.approx([1 / (1 + math.exp(-1)), 1 / (1 + math.e)])
    with pytest.raises(ValueError):
        choice_probabilities([])


def test_ece_is_zero_when_confidence_matches_accuracy() -> None:
    # Eight predictions at 0.75 confidence, 6 of them right: perfectly calibrated.
    conf = [0.75] * 8
    correct = [True, True, True, False] * 2
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0)


def test_ece_by_hand() -> None:
    # Bin [0.9, 1.0]: confidences 0.95, 1.0 (mean 0.975), one right -> |0.5 - 0.975| * 2/4.
    # Bin [0.5, 0.6): confidences 0.55, 0.55, both right -> |1 - 0.55| * 2/4.
    conf = [0.95, 1.0, 0.55, 0.55]
    correct = [True, False, True, True]
    assert expected_calibration_error(conf, correct) == pytest.approx(0.5 * 0.475 + 0.5 * 0.45)
    # One bin: |accuracy - mean confidence|.
    assert expected_calibration_error(conf, correct, bins=1) == pytest.approx(abs(0.75 - 0.7625))


def test_ece_of_an_overconfident_model() -> None:
    assert expected_calibration_error([0.99] * 10, [True] * 5 + [False] * 5) == pytest.approx(0.49)


@pytest.mark.parametrize("conf, correct, bins", [([0.5], [True, False], 10), ([], [], 10), ([1.5], [True], 10),
                                                 ([0.5], [True], 0)])
def test_ece_rejects_bad_input(conf, correct, bins) -> None:
    with pytest.raises(ValueError):
        expected_calibration_error(conf, correct, bins)


def _sample(lls: list[float], acc: float) -> dict:
    return {"filtered_resps": [[ll, False] for ll in lls], "acc": acc}


def test_summary_and_table_from_lm_eval_results() -> None:
    samples = [_sample([math.log(0.85), math.log(0.15)], 1.0), _sample([math.log(0.35), math.log(0.65)], 0.0)]
    assert sample_calibration(samples) == (pytest.approx([0.85, 0.65]), [True, False])
    results = {
        "results": {
            "piqa": {"alias": "piqa", "acc,none": 0.5, "acc_stderr,none": 0.5, "acc_norm,none": 0.5,
                     "acc_norm_stderr,none": 0.5},
            "lambada_openai": {"acc,none": 0.25, "acc_stderr,none": 0.2, "perplexity,none": 1234.5,
                               "perplexity_stderr,none": "N/A"},
        },
        "samples": {"piqa": samples, "lambada_openai": [{"acc": 1.0}] * 2},
    }
    summary = summarise(results, ["piqa", "lambada_openai"])
    assert summary["piqa"] == {"n": 2, "acc": 0.5, "acc_stderr": 0.5, "acc_norm": 0.5, "acc_norm_stderr": 0.5,
                               "ece": pytest.approx(0.5 * 0.15 + 0.5 * 0.65)}
    assert summary["lambada_openai"] == {"n": 2, "acc": 0.25, "acc_stderr": 0.2, "perplexity": 1234.5}
    mean, err = mean_accuracy(summary)
    assert mean == pytest.approx(0.375) and err == pytest.approx(math.sqrt(0.25 + 0.04) / 2)
    table = markdown_table({"ens": summary}, ["piqa", "lambada_openai"])
    assert table.splitlines()[0] == "| scorer | piqa | lambada_openai | mean acc |"
    assert "| ens | 0.500 ± 0.500 (ECE 0.400) | 0.250 ± 0.200 | 0.375 ± 0.269 |" in table


# --------------------------------------------------------------------------- task files and errors


def test_unknown_task_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DownstreamError, match="unknown task 'mmlu'; choose from piqa, arc_easy"):
        downstream.check_tasks(["piqa", "mmlu"])
    assert downstream.main(["--scorer", "x=/nowhere", "--tasks", "mmlu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("downstream: error: unknown task 'mmlu'") and "\n" not in err


@pytest.fixture()
def fake_evals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A zoo whose evals item is marked built but holds only what each test writes into it."""
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    evals = zoo.zoo_dir() / "evals"
    (evals / "piqa").mkdir(parents=True)
    (evals / ".zoo-complete.json").write_text("{}")
    return evals


def test_missing_data_file_is_a_one_line_error(fake_evals: Path, tmp_path: Path) -> None:
    with pytest.raises(DownstreamError, match=r"missing data file .*piqa/validation.arrow .*build --evals"):
        downstream.render_tasks(tmp_path / "tasks", ["piqa"])


def test_checksum_mismatch_is_a_one_line_error(fake_evals: Path, tmp_path: Path) -> None:
    (fake_evals / "piqa" / "validation.arrow").write_bytes(b"not the pinned file")
    with pytest.raises(DownstreamError, match=r"checksum mismatch for .*piqa/validation.arrow: sha256 [0-9a-f]{64}, "
                                              r"expected 6e14731c"):
        downstream.render_tasks(tmp_path / "tasks", ["piqa"])


def test_scorer_that_is_no_model_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DownstreamError, match="scorer x: .* is neither an ensemble folder nor a model folder"):
        downstream.scorer_ensemble("x", str(tmp_path / "nothing"), tmp_path)


def test_task_files_give_lm_evals_stock_prompts_on_the_zoo_data(tmp_path: Path) -> None:
    """The rendered files load in lm-eval with the stock prompt formats and the full local splits."""
    from lm_eval.tasks import TaskManager, get_task_dict

    task_dir = downstream.render_tasks(tmp_path / "tasks")
    assert sorted(p.name for p in task_dir.iterdir()) == sorted(f"{t}.yaml" for t in downstream.TASKS)
    assert "${" not in "".join(p.read_text() for p in task_dir.iterdir())
    tasks = get_task_dict(list(downstream.TASKS), TaskManager(include_path=str(task_dir), include_defaults=False))
    sizes = {name: len(list(task.eval_docs)) for name, task in tasks.items()}
    assert sizes == {"piqa": 1838, "arc_easy": 570, "hellaswag": 10042, "winogrande": 1267, "lambada_openai": 5153}

    def first(name: str) -> tuple:
        task = tasks[name]
        doc = next(iter(task.eval_docs))
        return doc, task.doc_to_text(doc), task.doc_to_target(doc), task.doc_to_choice(doc) \
            if task.OUTPUT_TYPE == "multiple_choice" else None

    doc, text, target, choices = first("piqa")
    assert text == f"Question: {doc['goal']}\nAnswer:" and choices == [doc["sol1"], doc["sol2"]]
    assert target == doc["label"]
    doc, text, target, choices = first("arc_easy")
    assert text == f"Question: {doc['question']}\nAnswer:" and choices == doc["choices"]["text"]
    assert choices[target] == doc["choices"]["text"][doc["choices"]["label"].index(doc["answerKey"])]
    doc, text, target, choices = first("hellaswag")
    assert text == doc["query"] and text.startswith(doc["activity_label"] + ": ") and len(choices) == 4
    assert "[" not in text and int(target) == int(doc["label"])
    doc, text, target, choices = first("winogrande")
    blank = doc["sentence"].index("_")
    assert choices == [doc["sentence"][:blank] + doc["option1"], doc["sentence"][:blank] + doc["option2"]]
    assert target == doc["sentence"][blank + 1:].strip()
    doc, text, target, _ = first("lambada_openai")
    assert text + target == doc["text"] and target == " signs"


def test_sweep_weights_share_the_rest_equally() -> None:
    from bench.calibration_sweep import sweep_weights

    points = sweep_weights(["gemma", "smollm", "qwen"], "gemma", 3)
    assert points == [(0.0, [0.0, 0.5, 0.5]), (0.5, [0.5, 0.25, 0.25]), (1.0, [1.0, 0.0, 0.0])]
    with pytest.raises(DownstreamError, match="'llama' is not a member of the ensemble \\(gemma, smollm\\)"):
        sweep_weights(["gemma", "smollm"], "llama", 3)
    with pytest.raises(DownstreamError, match="--points must be at least 2"):
        sweep_weights(["gemma", "smollm"], "gemma", 1)


def test_mean_ece_averages_the_multiple_choice_tasks_only() -> None:
    from bench.calibration_sweep import mean_ece

    summary = {"piqa": {"ece": 0.1}, "hellaswag": {"ece": 0.3}, "lambada_openai": {"acc": 0.5}}
    assert mean_ece(summary) == pytest.approx(0.2)
    with pytest.raises(DownstreamError, match="no multiple-choice task"):
        mean_ece({"lambada_openai": {"acc": 0.5}})
