"""Gradient accumulation normalises like one big batch (issue 17, item 4): the ALM and SFT terms are
means over their units (valid groups, scored tokens) of the whole step, not means of
per-micro-batch means. (The latents term's per-channel scale is a statistic of each micro-batch,
so it cannot match one big batch: see `transfer.train_units`.)"""

from __future__ import annotations

import json

import pytest
import torch

from transfer.config import config_from_dict
from transfer.train import _accumulate, _load_data, _setup

_SHORT = ["To be.", "Ay, sir."]
_LONG = ["Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds "
         "that loured upon our house in the deep bosom of the ocean buried.",
         "But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. Arise, "
         "fair sun, and kill the envious moon, who is already sick and pale with grief."]


def _step(raw: dict, grad_accum: int, out) -> tuple[dict[str, torch.Tensor], dict[str, float], list[int]]:
    """Gradients, logged losses and the student tokens per micro-batch of one step over the four
    examples, shorts first."""
    cfg = config_from_dict({**raw, "train": {**raw["train"], "grad_accum": grad_accum}})
    examples, _ = _load_data(cfg)
    run = _setup(cfg, out, examples, [])
    run.student.train()
    sums, _, _ = _accumulate(run, [0, 1, 2, 3])
    grads = {n: p.grad.detach().clone() for n, p in run.student.named_parameters() if p.grad is not None}
    micro = 4 // grad_accum
    tokens = [int(run.collator(examples[j : j + micro])["student_attention_mask"].sum()) for j in range(0, 4, micro)]
    return grads, sums, tokens


def test_uneven_micro_batches_give_the_one_batch_gradients(tiny_dir, corpus, tiny_config, tmp_path):
    data = tmp_path / "uneven.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in _SHORT + _LONG), encoding="utf-8")
    raw = tiny_config(tiny_dir("llama-gpt2"), corpus, tmp_path / "out",
                      data={"train": str(data), "eval": None, "seq_len": 64},
                      train={"batch_size": 4, "full_finetune": True},
                      loss={"terms": ["alm", "sft"]}, output={"eval_bytes": 0})
    one, one_sums, one_tokens = _step(raw, 1, tmp_path / "one")
    two, two_sums, two_tokens = _step(raw, 2, tmp_path / "two")
    assert sum(two_tokens) == one_tokens[0] and two_tokens[1] > 4 * two_tokens[0]  # uneven micro-batches
    assert one.keys() == two.keys() and len(one) > 0
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-7), (
            name, float((one[name] - two[name]).abs().max()), float(one[name].abs().max()))
    assert two_sums.keys() == one_sums.keys()
    for key in one_sums:
        assert two_sums[key] == pytest.approx(one_sums[key], rel=1e-5), key


@pytest.mark.slow
def test_two_processes_train_like_one(tiny_dir, corpus, tiny_config, losses_by_step, tmp_path):
    """Two CPU processes (DDP, 2 micro-batches of 1 example each) log the same losses step for
    step as one process with the same batches: the step's units are counted over the processes."""
    import os
    import subprocess
    import sys

    import yaml

    data = tmp_path / "uneven.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in (_SHORT + _LONG) * 2), encoding="utf-8")

    def launch(name: str, *launcher: str):
        out = tmp_path / name
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(tiny_config(tiny_dir("llama-gpt2"), corpus, out,
                                                     data={"train": str(data), "seq_len": 64},
                                                     train={"steps": 3}, output={"eval_bytes": 0})))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
        proc = subprocess.run([sys.executable, *launcher, "-m", "transfer.cli", "run", str(config)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return losses_by_step(out)

    one = launch("one")
    two = launch("two", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
