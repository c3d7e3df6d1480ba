"""bench/alm_fidelity.py on tiny models with real tokenizers: a model against itself has no gap;
against a model on another tokenizer the gap is positive and the binary KL non-negative."""

from __future__ import annotations

import json

from bench.alm_fidelity import main


def test_fidelity_of_self_and_of_another_tokenizer(tiny_dir, corpus, capsys) -> None:
    teacher = tiny_dir("llama-gpt2")
    other = tiny_dir("qwen2-qwen2")
    assert main([f"self={teacher}", f"other={other}", "--teacher", str(teacher), "--text", str(corpus["heldout"]),
                 "--examples", "3", "--seq-len", "48"]) == 0
    rows = {r["student"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["self"]["groups"] > 0 and rows["other"]["groups"] > 0
    assert rows["self"]["mean_abs_dlogp"] < 1e-4 and abs(rows["self"]["mean_binary_kl"]) < 1e-6
    assert rows["other"]["mean_abs_dlogp"] > 0.01 and rows["other"]["mean_binary_kl"] >= 0.0
