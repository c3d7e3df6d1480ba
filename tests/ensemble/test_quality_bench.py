"""bench/ensemble_quality.py on tiny ensembles: the numbers obey the pooling identities."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.ensemble_quality import main

TEXT = ("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
        "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n") * 6


def _run(ensemble: Path, tmp_path: Path) -> dict:
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "quality.json"
    assert main([str(ensemble), "--text", str(text), "--max-bytes", "600", "--window-bytes", "200",
                 "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    return {name: row[str(text)] for name, row in record["bits_per_byte"].items()}


def test_a_model_pooled_with_itself_scores_as_the_model(tiny_self_ensemble, tmp_path):
    bpb = _run(tiny_self_ensemble, tmp_path)
    alone = bpb["member_a"]
    assert alone == pytest.approx(bpb["member_b"], abs=1e-9)
    assert alone > 1.0  # a random tiny model is far from the text
    for name, value in bpb.items():
        assert value == pytest.approx(alone, rel=1e-5), name


def test_prob_mean_is_no_worse_than_the_weighted_member_average(tiny_ensemble, tmp_path):
    bpb = _run(tiny_ensemble, tmp_path)
    weights = {"llama": 1.0, "qwen": 2.0, "gemma": 1.0}
    average = sum(w * bpb[name] for name, w in weights.items()) / sum(weights.values())
    pooled = bpb["ensemble prob_mean (1, 2, 1)"]
    # Jensen: -log(sum_k w_k p_k) <= sum_k w_k (-log p_k), token by token.
    assert pooled <= average + 1e-6
    assert min(bpb[n] for n in weights) - 1.0 < pooled
