"""Shared fixtures of the transfer tests: tiny random models on real tokenizers, a small corpus,
and one reference training run that several tests inspect."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

from transfer import zoo

# As the `transfer` CLI does: OpenMP threads sleep rather than spin at barriers (a third less CPU
# time for this directory on a shared 2-core machine). Effective only if torch is not imported yet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# tests/transfer/helpers.py under a unique module name (other test areas may have a `helpers`).
_spec = importlib.util.spec_from_file_location("transfer_test_helpers", Path(__file__).with_name("helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Folder of tiny models: ``llama-gpt2`` (Llama, GPT-2 tokenizer, no chat template) and
    ``qwen2-qwen2`` (Qwen2 architecture, Qwen2 tokenizer with its chat template), built on demand."""
    root = tmp_path_factory.mktemp("tiny")

    def get(name: str) -> Path:
        arch, tok = name.split("-")
        out = root / name
        if not out.exists():
            helpers.make_tiny_model(out, f"zoo:{tok}", arch=arch)
        return out

    return get


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Small train / held-out text files cut from the zoo corpus, and a chat jsonl file."""
    root = tmp_path_factory.mktemp("corpus")
    train_text = zoo.corpus_path("train").read_text(encoding="utf-8")[200_000:212_000]
    heldout_text = zoo.corpus_path("heldout").read_text(encoding="utf-8")[50_000:53_000]
    (root / "train.txt").write_text(train_text, encoding="utf-8")
    (root / "heldout.txt").write_text(heldout_text, encoding="utf-8")
    lines = train_text.splitlines()
    chat = []
    for i in range(0, 120, 6):
        q, a = " ".join(lines[i : i + 3]).strip() or "Speak.", " ".join(lines[i + 3 : i + 6]).strip() or "I will."
        chat.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    chat.append({"text": lines[200] + "\n" + lines[201]})
    (root / "chat.jsonl").write_text("".join(json.dumps(x) + "\n" for x in chat), encoding="utf-8")
    return {"train": root / "train.txt", "heldout": root / "heldout.txt", "chat": root / "chat.jsonl"}


def _tiny_config(teacher: Path, corpus: dict[str, Path], out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """The raw config of a seconds-long run (tiny_test.yaml's shape): ``sections`` update it."""
    raw: dict[str, Any] = {
        "model": {"teacher": str(teacher), "tokenizer": "bytes"},
        "data": {"train": str(corpus["train"]), "eval": str(corpus["heldout"]), "seq_len": 48, "chunk_bytes": 200},
        "train": {"steps": 6, "lr": 1e-3, "warmup_steps": 2, "batch_size": 4, "grad_accum": 2, "dtype": "fp32",
                  "lora": {"r": 4, "alpha": 8}},
        "loss": {"terms": ["alm", "sft"]},
        "output": {"dir": str(out), "checkpoint_every": 2, "keep_checkpoints": 2, "eval_every": 3,
                   "eval_bytes": 2000},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


@pytest.fixture(scope="session")
def reference_run(tiny_dir, corpus, tmp_path_factory) -> Path:
    """An uninterrupted 6-step run of the tiny Llama moved onto bytes (LoRA, ALM + SFT, fp32)."""
    from transfer.config import config_from_dict
    from transfer.train import train

    out = tmp_path_factory.mktemp("runs") / "reference"
    return train(config_from_dict(_tiny_config(tiny_dir("llama-gpt2"), corpus, out)))


def _losses_by_step(run: Path) -> dict[int, dict[str, float]]:
    """{step: {loss key: value}} of a run's training records."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss")} for r in records if "loss" in r}


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(teacher, corpus, out, train={...}, ...)``: a tiny run's raw config dict."""
    return _tiny_config


@pytest.fixture(scope="session")
def losses_by_step():
    """``losses_by_step(run_dir)``: {step: {loss key: value}} from the run's log."""
    return _losses_by_step
