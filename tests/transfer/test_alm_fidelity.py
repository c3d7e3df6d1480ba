"""bench/alm_fidelity.py on tiny models with real tokenizers: a model against itself has no gap;
against a model on another tokenizer the gap is positive and the binary KL non-negative."""

from __future__ import annotations

import json

import torch

from bench.alm_fidelity import chunk_kinds, main
from transfer.align import chunk_matrices


def test_fidelity_of_self_and_of_another_tokenizer(tiny_dir, corpus, capsys) -> None:
    teacher = tiny_dir("llama-gpt2")
    other = tiny_dir("qwen2-qwen2")
    assert main([f"self={teacher}", f"other={other}", "--teacher", str(teacher), "--text", str(corpus["heldout"]),
                 "--examples", "3", "--seq-len", "48"]) == 0
    rows = {r["student"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["self"]["groups"] > 0 and rows["other"]["groups"] > 0
    assert rows["self"]["mean_abs_dlogp"] < 1e-4 and abs(rows["self"]["mean_binary_kl"]) < 1e-6
    assert rows["other"]["mean_abs_dlogp"] > 0.01 and rows["other"]["mean_binary_kl"] >= 0.0


def test_single_chunks_split_the_gap_by_kind(tiny_dir, corpus, capsys) -> None:
    """--debias none: every chunk lands in exactly one kind, and the kinds' gaps add up."""
    teacher, other = tiny_dir("llama-gpt2"), tiny_dir("qwen2-qwen2")
    assert main([f"other={other}", "--teacher", str(teacher), "--text", str(corpus["heldout"]),
                 "--examples", "3", "--seq-len", "48", "--debias", "none"]) == 0
    (row,) = map(json.loads, capsys.readouterr().out.splitlines())
    kinds = row["by_kind"]
    assert set(kinds) == {"same_token", "one_student_token", "several_student_tokens"}
    assert sum(k["chunks"] for k in kinds.values()) == row["groups"] > 0
    assert abs(sum(k["sum_dlogp"] for k in kinds.values()) - row["mean_dlogp"] * row["groups"]) < 1e-3 * row["groups"]


def test_chunk_kinds_count_scored_tokens_per_side() -> None:
    # Teacher tokens: start, "a", "b", "c", "de". Student tokens: start, "ab", "c", "d", "e".
    # Chunks: (start + "a" + "b" | start + "ab"), ("c" | "c"), ("de" | "d" + "e").
    chunks = [((0, 3), (0, 2)), ((3, 4), (2, 3)), ((4, 5), (3, 5))]
    s_matrix, t_matrix = chunk_matrices(chunks, 5, 5)
    mask = torch.ones(1, 5, dtype=torch.long)
    kinds = chunk_kinds(s_matrix[None], t_matrix[None], mask, mask)
    assert kinds.tolist() == [[1, 0, 2]]
