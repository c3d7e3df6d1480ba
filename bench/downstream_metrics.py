"""From lm-eval's results to numbers: per task accuracy, its standard error and the other metrics
lm-eval reports, the expected calibration error of the multiple-choice tasks, the mean accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bench.downstream_tasks import MULTIPLE_CHOICE

ECE_BINS = 10


def choice_probabilities(loglikelihoods: Sequence[float]) -> list[float]:
    """The normalised choice probabilities: softmax over the choices' summed log-likelihoods."""
    if not loglikelihoods:
        raise ValueError("no choices")
    top = max(loglikelihoods)
    weights = [math.exp(ll - top) for ll in loglikelihoods]
    total = sum(weights)
    return [w / total for w in weights]


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> float:
    """Expected calibration error with `bins` equal-width confidence bins.

    ECE = sum over bins b of |b| / n * |accuracy(b) - mean confidence(b)|, where a prediction with
    confidence c falls in bin min(floor(c * bins), bins - 1) (so 1.0 is in the last bin).
    """
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} outcomes")
    if not confidences:
        raise ValueError("no predictions")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    count = [0] * bins
    conf_sum = [0.0] * bins
    right = [0] * bins
    for c, ok in zip(confidences, correct):
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"confidence {c} is not a probability")
        b = min(int(c * bins), bins - 1)
        count[b] += 1
        conf_sum[b] += c
        right[b] += bool(ok)
    n = len(confidences)
    return sum(abs(right[b] - conf_sum[b]) / n for b in range(bins) if count[b])


def sample_calibration(samples: Sequence[dict[str, Any]]) -> tuple[list[float], list[bool]]:
    """(top choice probability, whether lm-eval counted it correct) per multiple-choice sample.

    Each sample of lm-eval's log (`log_samples`) holds `filtered_resps`, one (log-likelihood,
    is-greedy) pair per choice, and `acc`, 1.0 when the most likely choice is the gold one.
    """
    confidences, correct = [], []
    for sample in samples:
        probs = choice_probabilities([float(resp[0]) for resp in sample["filtered_resps"]])
        confidences.append(max(probs))
        correct.append(bool(sample["acc"]))
    return confidences, correct


def _metric(values: dict[str, Any], name: str) -> float | None:
    value = values.get(f"{name},none")
    return None if value is None or value == "N/A" else float(value)


def summarise(results: dict[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per task: n, acc, acc_stderr, and ece (multiple choice), acc_norm, perplexity where lm-eval has them."""
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        values = results["results"][task]
        samples = results.get("samples", {}).get(task, [])
        row: dict[str, Any] = {"n": len(samples), "acc": _metric(values, "acc"),
                               "acc_stderr": _metric(values, "acc_stderr")}
        for extra in ("acc_norm", "acc_norm_stderr", "perplexity", "perplexity_stderr"):
            if (value := _metric(values, extra)) is not None:
                row[extra] = value
        if task in MULTIPLE_CHOICE and samples:
            row["ece"] = expected_calibration_error(*sample_calibration(samples))
        out[task] = row
    return out


def mean_accuracy(summary: dict[str, dict[str, Any]]) -> tuple[float, float]:
    """Mean accuracy over the tasks, and its standard error (the tasks' errors, independent)."""
    accs = [row["acc"] for row in summary.values()]
    errs = [row["acc_stderr"] or 0.0 for row in summary.values()]
    k = len(accs)
    return sum(accs) / k, math.sqrt(sum(e * e for e in errs)) / k
