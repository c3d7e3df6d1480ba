"""The ``transfer`` command line: run / --resume, bad input as one-line errors (exit 2, no
traceback, nothing overwritten), the zoo pass-through."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from transfer import cli, zoo
from transfer.train import MODEL_DIR

REPO = Path(__file__).resolve().parents[2]


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (to prove nothing was touched)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("transfer: error: ") and "Traceback" not in err, err
    return lines[0]


def test_stop_after_then_resume_matches_the_uninterrupted_run(reference_run, tiny_dir, corpus, tiny_config,
                                                              losses_by_step, tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(tiny_dir("llama-gpt2"), corpus, out))
    assert cli.main(["run", str(config), "train.stop_after=3"]) == 0
    assert not (out / MODEL_DIR).exists() and sorted(losses_by_step(out)) == [1, 2, 3]
    assert cli.main(["run", str(config), "--resume"]) == 0
    want, got = losses_by_step(reference_run), losses_by_step(out)
    assert got.keys() == want.keys()
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    assert f"run folder: {out}" in capsys.readouterr().out


def test_tiny_test_config_runs(tiny_dir, corpus, tmp_path):
    """transfer/configs/tiny_test.yaml as documented, with the data swapped for the small corpus
    (two training files, pooled)."""
    out = tmp_path / "tiny"
    rc = cli.main(["run", str(REPO / "transfer/configs/tiny_test.yaml"), f"model.teacher={tiny_dir('llama-gpt2')}",
                   f"data.train=[{corpus['train']}, {corpus['heldout']}]", f"output.dir={out}", "train.steps=2",
                   "train.warmup_steps=1"])
    assert rc == 0 and (out / MODEL_DIR / "config.json").is_file()


def test_bad_input_in_a_subprocess_is_one_line_without_traceback(tmp_path):
    config = write_config(tmp_path / "c.yaml", {"model": {"teacher": str(tmp_path / "nowhere")},
                                                "data": {"train": str(tmp_path / "t.txt")},
                                                "output": {"dir": str(tmp_path / "out")}})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "transfer.cli", "run", str(config)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"transfer: error: data file {tmp_path / 't.txt'} not found"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.teacher=/no/such/model"], "model folder /no/such/model not found"),
        (["data.train=/no/such/file.txt"], "data file /no/such/file.txt not found"),
        (["data.train=[CHAT, /no/such/second.txt]"], "data file /no/such/second.txt not found"),
        (["train.lrr=1"], "unknown config key train.lrr (did you mean train.lr?)"),
        (["train.batch_size=5"], "train.batch_size (5) must be a multiple of train.grad_accum (2)"),
        (["loss.terms=[latents]", "model.student=OTHER"], "loss term 'latents' needs self-transfer"),
        (["train.lora.targets=[w_q]"], "train.lora.targets ['w_q'] are not linear layers of the student"),
        (["data.train=CHAT"], "the data holds chat messages but the teacher tokenizer has no chat template"),
        (["model.student=QWEN", "model.tokenizer=null", "loss.terms=[alm,latents]"], "needs self-transfer"),
    ],
)
def test_bad_input_is_a_one_line_error_and_writes_nothing(overrides, message, tiny_dir, corpus, tiny_config,
                                                          tmp_path, capsys):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_config(tiny_dir("llama-gpt2"), corpus, out))
    subst = {"OTHER": str(tiny_dir("qwen2-qwen2")), "QWEN": str(tiny_dir("qwen2-qwen2")), "CHAT": str(corpus["chat"])}
    for name, path in subst.items():
        overrides = [o.replace(name, path) for o in overrides]
    line = one_line_error(capsys, cli.main(["run", str(config), *overrides]))
    assert message in line
    assert not out.exists()


def test_existing_run_is_never_overwritten(reference_run, tmp_path, capsys):
    before = snapshot(reference_run)
    saved = yaml.safe_load((reference_run / "config.yaml").read_text())
    config = write_config(tmp_path / "c.yaml", saved)
    assert "already holds a run; pass --resume" in one_line_error(capsys, cli.main(["run", str(config)]))
    line = one_line_error(capsys, cli.main(["run", str(config), "--resume", "train.lr=0.5"]))
    assert "--resume with a config that differs from the run's in train.lr" in line
    assert snapshot(reference_run) == before


def test_usage_errors_and_missing_config(tmp_path, capsys):
    assert "config file not found" in one_line_error(capsys, cli.main(["run", str(tmp_path / "none.yaml")]))
    with pytest.raises(SystemExit) as info:
        cli.main(["run"])
    assert info.value.code == 2 and capsys.readouterr().err.startswith("transfer run: error:")
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code == 2


def test_zoo_subcommand_delegates_to_the_zoo(capsys):
    assert cli.main(["zoo", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(zoo.zoo_dir())
    assert cli.main(["zoo", "status"]) == 0
    assert "built    corpus" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main(["zoo", "--help"])
    assert info.value.code == 0 and "usage: transfer zoo" in capsys.readouterr().out


def test_eval_command_prints_bits_per_byte(tiny_dir, corpus, capsys):
    model = tiny_dir("llama-gpt2")
    assert cli.main(["eval", "--model", str(model), "--text", str(corpus["heldout"]), "--max-bytes", "1500"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == str(model) and 0 < result["bytes"] <= 1500
    assert 8 < result["bits_per_byte"] * result["bytes_per_token"] < 20  # ~log2(50257) bits a token, random model
    line = one_line_error(capsys, cli.main(["eval", "--model", str(model), "--tokenizer", str(zoo.tokenizer_dir("qwen2")),
                                            "--text", str(corpus["heldout"])]))
    assert "wrong tokenizer for this model" in line
    assert "not found" in one_line_error(capsys, cli.main(["eval", "--model", str(model), "--text", "/no/file"]))
