"""`transfer.precision`: ``auto`` means bf16 only where the hardware runs it natively, and every
entry point that defaults to ``auto`` (transfer training, the vLLM engine) follows that decision."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig

from transfer import precision
from transfer.config import config_from_dict, load_config
from transfer.train import MODEL_DIR, _accelerator, train


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_auto_is_bf16_only_where_native(native, expected, device):
    assert precision.choose_dtype("auto", device, native=native) == expected


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("spelling, expected", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                                ("fp32", torch.float32), ("float32", torch.float32),
                                                ("float16", torch.float16), ("FP32", torch.float32)])
def test_an_explicit_dtype_always_wins(native, spelling, expected):
    assert precision.choose_dtype(spelling, "cpu", native=native) == expected


def test_unknown_dtype_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown dtype 'fp8': use one of auto, bf16"):
        precision.choose_dtype("fp8")


def test_the_decision_is_one_log_line_with_its_reason(caplog):
    with caplog.at_level(logging.INFO, logger="chorus.precision"):
        precision.choose_dtype("auto", "cpu", native=False, what="training")
        precision.choose_dtype("auto", "cpu", native=True, what="training")
        precision.choose_dtype("bf16", "cpu", native=False, what="training")
    lines = [r.getMessage() for r in caplog.records if r.name == "chorus.precision"]
    assert lines == [
        "precision for training: float32 (auto: this cpu has no native bf16: emulated bf16 would be tens "
        "of times slower than fp32)",
        "precision for training: bfloat16 (auto: this cpu has native bf16)",
        "precision for training: bfloat16 (set explicitly)",
    ]


def test_native_bf16_is_what_torch_reports():
    assert precision.native_bf16("cpu") == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert precision.native_bf16("meta") is False  # devices nobody measured: fp32


def test_a_cpu_limited_to_avx2_has_no_native_bf16():
    """oneDNN capped at AVX2 (what an AVX2-only laptop has) reports no bf16, whatever this CPU is:
    the real capability probe, not an injected one."""
    code = "from transfer.precision import native_bf16, choose_dtype; print(native_bf16('cpu'), choose_dtype('auto'))"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "torch.float32"]


def test_shipped_configs_default_to_auto():
    for name in ("default_member", "smollm2_to_qwen2", "gemma3_to_qwen2", "paper_defaults"):
        assert load_config(f"transfer/configs/{name}.yaml", ["model.teacher=zoo:smollm2"]).train.dtype == "auto", name


@pytest.mark.parametrize("native, mixed, dtype", [(False, "no", torch.float32), (True, "bf16", torch.bfloat16)])
def test_training_accelerator_follows_the_hardware(tiny_dir, corpus, tiny_config, tmp_path, monkeypatch,
                                                   native, mixed, dtype):
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": native)
    raw = tiny_config(tiny_dir("llama-gpt2"), corpus, tmp_path / "run", train={"dtype": "auto"})
    accelerator, chosen, why = _accelerator(config_from_dict(raw))
    assert chosen == dtype and accelerator.mixed_precision == mixed
    assert why.startswith("auto: this cpu has")


def test_a_run_left_at_auto_trains_and_exports_fp32_without_native_bf16(tiny_dir, corpus, tiny_config, tmp_path,
                                                                        monkeypatch, caplog):
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": False)
    out = tmp_path / "auto"
    raw = tiny_config(tiny_dir("llama-gpt2"), corpus, out, train={"dtype": "auto", "steps": 1, "warmup_steps": 0},
                      output={"eval_bytes": 0})
    with caplog.at_level(logging.INFO, logger="chorus.precision"):
        train(config_from_dict(raw))
    assert any("training on cpu: float32 (auto" in r.getMessage() for r in caplog.records)
    config = json.loads((out / MODEL_DIR / "config.json").read_text())
    assert AutoConfig.from_pretrained(out / MODEL_DIR).dtype == torch.float32, config.get("dtype")
