"""Training loop on tiny random models with real tokenizers: exact resume, the final folder,
cross-model distillation, chat data, LoRA / full fine-tuning, schedule."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from transfer.config import ConfigError, config_from_dict
from transfer.evaluate import evaluate_folder
from transfer.train import (CHECKPOINTS, MODEL_DIR, add_adapters, build_models, checkpoint_dirs, lr_factor,
                            make_optimizer, make_scheduler, train)


class Killed(Exception):
    """Stands in for a kill in the middle of a run."""


def test_lr_factor_warms_up_then_decays_to_zero():
    factors = [lr_factor(i, warmup=4, steps=12) for i in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]  # the first step already trains
    assert factors[4] == 1.0 and factors[-1] == pytest.approx(1 / 8)
    assert all(a > b for a, b in zip(factors[4:], factors[5:]))
    assert lr_factor(12, 4, 12) == 0.0
    assert [lr_factor(i, 0, 5, "constant") for i in range(5)] == [1.0] * 5


def test_killed_run_resumes_exactly(reference_run, tiny_dir, corpus, tiny_config, losses_by_step, tmp_path):
    """Killed after step 5 (its checkpoint is at step 4), resumed: the same losses and weights
    as the uninterrupted run, step for step."""
    out = tmp_path / "killed"
    cfg = config_from_dict(tiny_config(tiny_dir("llama-gpt2"), corpus, out))

    def kill_at_5(step: int, record: dict) -> None:
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, on_step=kill_at_5)
    assert [p.name for p in checkpoint_dirs(out)] == ["step-000002", "step-000004"]
    assert not (out / MODEL_DIR).exists()
    (out / CHECKPOINTS / ".tmp-step-000006").mkdir()  # a checkpoint save the kill interrupted
    train(cfg, resume=True)

    want, got = losses_by_step(reference_run), losses_by_step(out)
    assert sorted(got) == list(range(1, 7))
    for step in want:
        for key, value in want[step].items():
            assert got[step][key] == pytest.approx(value, abs=1e-6), (step, key)
    assert not list((out / CHECKPOINTS).glob(".tmp-*"))
    a = load_file(reference_run / MODEL_DIR / "model.safetensors")
    b = load_file(out / MODEL_DIR / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_balance_refreshed_every_n_steps_and_resumed_exactly(tiny_dir, corpus, tiny_config, tmp_path):
    """loss.balance_every=3: the balancing weights change only at steps 1, 4, ...; a run killed
    after step 5 resumes with the weights of its checkpoint (not fresh ones) and matches the
    uninterrupted run."""
    def run(out, **kw):
        return config_from_dict(tiny_config(tiny_dir("llama-gpt2"), corpus, out,
                                            loss={"balance": True, "balance_every": 3}, **kw))

    def records(out):
        return {r["step"]: r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r}

    whole = train(run(tmp_path / "whole"))
    weights = {step: (r["weight_alm"], r["weight_sft"]) for step, r in records(whole).items()}
    assert weights[1] == weights[2] == weights[3] != weights[4] == weights[5] == weights[6]

    def kill_at_5(step: int, record: dict) -> None:
        if step == 5:
            raise Killed

    cfg = run(tmp_path / "killed")
    with pytest.raises(Killed):
        train(cfg, on_step=kill_at_5)
    train(cfg, resume=True)  # resumes from step 4, inside the window refreshed at step 4
    want, got = records(whole), records(tmp_path / "killed")
    for step in range(1, 7):
        for key in ("loss", "weight_alm", "weight_sft"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5), (step, key)
    with pytest.raises(ConfigError, match="balance_every"):
        config_from_dict(tiny_config(tiny_dir("llama-gpt2"), corpus, tmp_path, loss={"balance_every": 0}))


def test_reference_run_outputs(reference_run, corpus):
    """The final folder loads with from_pretrained (byte tokenizer included), and its held-out
    bits per byte equal the ones the run logged at its last step (same bytes, merged LoRA)."""
    model = AutoModelForCausalLM.from_pretrained(reference_run / MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(reference_run / MODEL_DIR)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == 256 + 1  # bytes + <|endoftext|>
    assert tok("hé", add_special_tokens=False)["input_ids"] == list("hé".encode())
    assert not any("lora" in name for name, _ in model.named_parameters())
    records = [json.loads(line) for line in (reference_run / "log.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_bpb"] for r in records if "eval_bpb" in r}
    assert sorted(evals) == [0, 3, 6] and evals[6] < evals[0]
    again = evaluate_folder(reference_run / MODEL_DIR, corpus["heldout"], max_bytes=2000, show_progress=False)
    assert again.bits_per_byte == pytest.approx(evals[6], abs=1e-4)
    train_records = [r for r in records if "loss" in r]
    assert train_records[0]["lr"] == pytest.approx(0.5e-3)  # warmup 2: step 1 at half the rate
    assert all(r["tokens_per_s"] > 0 and r["step_s"] > 0 for r in train_records)
    csv_lines = (reference_run / "log.csv").read_text().splitlines()
    assert csv_lines[0].startswith("step,") and len(csv_lines) == 1 + len(records)
    assert (reference_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_teacher_frozen_and_only_lora_and_embeddings_train(tiny_dir, corpus, tiny_config, tmp_path):
    cfg = config_from_dict(tiny_config(tiny_dir("llama-gpt2"), corpus, tmp_path / "x"))
    models = build_models(cfg)
    assert not any(p.requires_grad for p in models.teacher.parameters()) and not models.teacher.training
    student = add_adapters(models.student, cfg)
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "embed_tokens" in n or "lm_head" in n for n in trainable)
    assert any("embed_tokens" in n for n in trainable) and any("lm_head" in n for n in trainable)
    full = config_from_dict(tiny_config(tiny_dir("llama-gpt2"), corpus, tmp_path / "y", train={"full_finetune": True}))
    student = add_adapters(build_models(full).student, full)
    assert all(p.requires_grad for p in student.parameters())


def test_embedding_lr_puts_the_embeddings_in_their_own_group(tiny_dir, corpus, tiny_config, tmp_path):
    raw = tiny_config(tiny_dir("llama-gpt2"), corpus, tmp_path / "e", train={"embedding_lr": 5e-3})
    cfg = config_from_dict(raw)
    student = add_adapters(build_models(cfg).student, cfg)
    optimizer = make_optimizer(student, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    (emb,) = [g for g in optimizer.param_groups if any(p is student.get_input_embeddings().weight for p in g["params"])]
    assert any(p is student.get_output_embeddings().weight for p in emb["params"]) and len(emb["params"]) == 2
    others = [g for g in optimizer.param_groups if g is not emb]
    ratio = emb["initial_lr"] / others[0]["initial_lr"]
    assert emb["initial_lr"] == pytest.approx(5e-3) and others[0]["initial_lr"] == pytest.approx(cfg.train.lr)
    optimizer.step()
    scheduler.step()  # the schedule scales both alike
    assert emb["lr"] / others[0]["lr"] == pytest.approx(ratio)
    with pytest.raises(ConfigError, match="train.embedding_lr must be > 0"):
        config_from_dict(tiny_config(tiny_dir("llama-gpt2"), corpus, tmp_path / "f", train={"embedding_lr": 0}))


def test_cross_model_distillation(tiny_dir, corpus, tiny_config, losses_by_step, tmp_path):
    """Teacher: Llama with GPT-2's tokenizer; student: a different architecture (Qwen2) with its
    own Qwen2 tokenizer, fully fine-tuned by ALM."""
    student_dir = tiny_dir("qwen2-qwen2")
    out = tmp_path / "cross"
    raw = tiny_config(tiny_dir("llama-gpt2"), corpus, out, model={"student": str(student_dir), "tokenizer": None},
                      train={"steps": 2, "warmup_steps": 1, "full_finetune": True, "batch_size": 2, "grad_accum": 1},
                      loss={"terms": ["alm"]}, output={"eval_bytes": 0})
    train(config_from_dict(raw))
    steps = losses_by_step(out)
    assert sorted(steps) == [1, 2] and all(0 < s["loss_alm"] < 10 for s in steps.values())
    model = AutoModelForCausalLM.from_pretrained(out / MODEL_DIR)
    before = AutoModelForCausalLM.from_pretrained(student_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert len(AutoTokenizer.from_pretrained(out / MODEL_DIR)) == len(AutoTokenizer.from_pretrained(student_dir))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before.get_parameter(n))]
    assert any("layers.0.self_attn" in n for n in changed)  # full fine-tuning reached the body


def test_chat_jsonl_through_both_chat_templates(tiny_dir, corpus, tiny_config, losses_by_step, tmp_path):
    """Chat messages rendered through the teacher's (Qwen2) template and the byte student's copy
    of it; the final folder carries that chat template."""
    out = tmp_path / "chat"
    raw = tiny_config(tiny_dir("qwen2-qwen2"), corpus, out, data={"train": str(corpus["chat"]), "seq_len": 64},
                      train={"steps": 2, "warmup_steps": 1, "batch_size": 2, "grad_accum": 1},
                      output={"eval_bytes": 0})
    train(config_from_dict(raw))
    assert all(s["loss_alm"] > 0 for s in losses_by_step(out).values())
    tok = AutoTokenizer.from_pretrained(out / MODEL_DIR)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids and max(ids) < len(tok)


@pytest.mark.slow
def test_two_process_ddp_run_resumes_exactly(tiny_dir, corpus, tiny_config, losses_by_step, tmp_path):
    """Two CPU processes (`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2`,
    accelerate's torchrun launcher; `--cpu` would start one process): DDP over gloo, split
    batches, main-process checkpoints; stopped at step 4 and resumed, it matches an uninterrupted
    2-process run. The loss terms are balanced every 3 steps: the factors come from the gradient
    norms averaged over both processes, so the main process's checkpoint holds every process's
    factors (with per-process factors the resumed run differs)."""
    import os
    import subprocess
    import sys

    import yaml

    def launch(out, *extra):
        config = tmp_path / f"{out.name}.yaml"
        config.write_text(yaml.safe_dump(tiny_config(tiny_dir("llama-gpt2"), corpus, out,
                                                     loss={"balance": True, "balance_every": 3})))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "transfer.cli", "run", str(config), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    full, parts = tmp_path / "full", tmp_path / "parts"
    assert launch(full).stdout.count("final model:") == 1  # one main process writes
    records = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    assert {r["processes"] for r in records if "loss" in r} == {2}
    launch(parts, "train.stop_after=4")
    launch(parts, "--resume")
    want, got = losses_by_step(full), losses_by_step(parts)
    assert sorted(got) == list(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step


@pytest.mark.slow
def test_real_smollm2_to_qwen2_config_trains_and_saves(tmp_path):
    """The shipped SmolLM2 -> Qwen2 config on the real zoo model, shortened to 2 small steps (in
    the precision its `train.dtype: auto` picks on this machine)."""
    from transfer.config import load_config

    out = tmp_path / "smollm2"
    cfg = load_config("transfer/configs/smollm2_to_qwen2.yaml",
                      ["train.steps=2", "train.batch_size=2", "data.seq_len=64", f"output.dir={out}",
                       "output.eval_bytes=3000"])
    train(cfg)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r["eval_bpb"] for r in records if "eval_bpb" in r]
    losses = [r["loss_alm"] for r in records if "loss_alm" in r]
    assert len(evals) == 2 and all(1.0 < e < 4.0 for e in evals)  # FVT keeps SmolLM2 far from random (~17)
    assert len(losses) == 2 and all(0 < x < 1 for x in losses)
    tok = AutoTokenizer.from_pretrained(out / MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(out / MODEL_DIR)
    assert model.get_input_embeddings().weight.shape[0] >= len(tok) >= 151_643
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
