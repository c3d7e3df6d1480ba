"""Config loading: YAML + dotted overrides, defaults, one-line validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from transfer.config import RunConfig, apply_overrides, config_from_dict, load_config
from transfer.errors import ConfigError

BASE = """
model:
  teacher: zoo:smollm2
  tokenizer: zoo:qwen2
data:
  train: zoo:train
  seq_len: 64
train:
  steps: 10
  warmup_steps: 2
  batch_size: 4
"""


def write(tmp_path: Path, text: str = BASE) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_follow_the_paper(tmp_path):
    cfg = load_config(write(tmp_path))
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == 1e-5 and cfg.train.betas == (0.9, 0.95)
    assert cfg.train.weight_decay == 0.01 and cfg.train.clip == 1.0
    assert cfg.train.lora.r == 64 and cfg.train.lora.alpha == 64
    assert "gate_proj" in cfg.train.lora.targets and "q_proj" in cfg.train.lora.targets
    assert cfg.loss.terms == ("alm",) and cfg.loss.gamma == 0.1 and cfg.loss.tau == 100.0
    assert cfg.train.dtype == "auto" and cfg.self_transfer and cfg.data.train == ("zoo:train",)
    assert cfg.loss_weight("alm") == 1.0


def test_dotted_overrides_are_parsed_as_yaml(tmp_path):
    cfg = load_config(
        write(tmp_path),
        ["train.lr=2e-5", "loss.terms=[alm, sft]", "loss.weights.sft=0.5", "train.lora.r=8",
         "train.betas=[0.8, 0.9]", "train.dtype=fp32", "output.dir=/tmp/x",
         "data.train=[zoo:train, zoo:treebank_train]"],
    )
    assert cfg.data.train == ("zoo:train", "zoo:treebank_train")
    assert cfg.train.lr == 2e-5
    assert cfg.loss.terms == ("alm", "sft") and cfg.loss_weight("sft") == 0.5
    assert cfg.train.lora.r == 8 and cfg.train.betas == (0.8, 0.9)
    assert cfg.train.dtype == "fp32" and cfg.output.dir == "/tmp/x"


def test_config_is_frozen(tmp_path):
    cfg = load_config(write(tmp_path))
    with pytest.raises(Exception):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_to_dict_round_trips(tmp_path):
    cfg = load_config(write(tmp_path), ["loss.terms=[alm, sft]"])
    assert config_from_dict(cfg.to_dict()) == cfg


def test_overrides_do_not_touch_the_input():
    raw = {"train": {"lr": 1.0}}
    out = apply_overrides(raw, ["train.lr=2"])
    assert raw == {"train": {"lr": 1.0}} and out == {"train": {"lr": 2}}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1"], "unknown config key train.lrr (did you mean train.lr?)"),
        (["train.lr=abc"], "train.lr must be a number"),
        (["train.lr=-1"], "train.lr must be > 0"),
        (["train.steps=1.5"], "train.steps must be an integer"),
        (["train.dtype=fp8"], "train.dtype must be one of ['auto', 'bf16', 'fp32']"),
        (["loss.terms=[alm, kl]"], "unknown term 'kl'"),
        (["loss.weights.sft=2"], "'sft' is not in loss.terms"),
        (["train.batch_size=6", "train.grad_accum=4"], "must be a multiple of train.grad_accum"),
        (["train.warmup_steps=-1"], "train.warmup_steps must be >= 0"),
        (["model.student=/some/other", "loss.terms=[alm, latents]"], "needs self-transfer"),
        (["train.betas=[0.9]"], "train.betas must have 2 items"),
        (["train.stop_after=11"], "train.stop_after must be in 1..train.steps"),
        (["nonsense"], "must look like section.key=value"),
        (["data.train=[]"], "data.train is empty"),
        (["loss.gamma=0"], "loss.gamma must be in (0, 1)"),
        (["train.lr.x=1"], "train.lr must be a number"),
        (["train.warmup_steps=1", "train.warmup_steps.x=1"], "train.warmup_steps.x: warmup_steps is not a section"),
        (["train.lora.rr=1"], "unknown config key train.lora.rr (did you mean train.lora.r?)"),
        (["foo=1"], "unknown config key foo (known: model, data, train, loss, output)"),
        (["train.steps=true"], "train.steps must be an integer, got True"),
        (["train.steps='5'"], "train.steps must be an integer, got '5'"),
        (["train.steps=0"], "train.steps must be > 0, got 0"),
        (["train.full_finetune=1"], "train.full_finetune must be true or false, got 1"),
        (["model.teacher="], "model.teacher must not be empty"),
        (["model.teacher=[a]"], "model.teacher must be a string, got ['a']"),
        (["data.train=[zoo:train, null]"], "data.train[1] must not be empty"),
        (["data.train=5"], "data.train must be a list, got 5"),
        (["train=5"], "train must be a mapping, got 5"),
        (["data.seq_len=1"], "data.seq_len must be >= 2, got 1"),
        (["train.lora.dropout=1"], "train.lora.dropout must be in [0, 1), got 1"),
        (["train.clip=-1"], "train.clip must be >= 0, got -1 (0 disables clipping)"),
        (["loss.weights.alm=-1"], "loss.weights.alm must be >= 0, got -1"),
        (["loss.weights=3"], "loss.weights must be a mapping, got 3"),
        (["train.betas=[0.9, 1.0]"], "train.betas must be two numbers in [0, 1), got [0.9, 1.0]"),
        (["train.betas=[a, 0.9]"], "train.betas[0] must be a number, got 'a'"),
        (["loss.terms=[alm, alm]"], "loss.terms lists a term twice"),
        (["loss.balance=true"], "loss.balance needs at least two loss terms"),
        (["loss.balance_every=5"], "loss.balance_every is 5 but loss.balance is false"),
        (["loss.terms=[alm, sft]", "loss.balance=true", "loss.balance_every=0"], "loss.balance_every must be > 0"),
        (["train.lora.targets=[]"], "train.lora.targets is empty"),
    ],
)
def test_bad_values_give_one_line_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path), overrides)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_missing_required_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="missing required config key model.teacher"):
        load_config(write(tmp_path, "data:\n  train: x.txt\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


def test_unknown_keys_are_reported_first(tmp_path):
    """A misspelt key is named even when the key it was meant to be is then missing."""
    with pytest.raises(ConfigError, match=r"unknown config key model.teachr \(did you mean model.teacher\?\)"):
        load_config(write(tmp_path, "model:\n  teachr: x\ndata:\n  train: x.txt\n"))


def test_yaml_values_keep_their_types_with_the_few_conversions(tmp_path):
    """Strict types, except: whole float -> int, int or numeric string -> float, scalar -> string,
    one string -> list of one, an empty section -> its defaults."""
    cfg = config_from_dict(apply_overrides(
        {"model": {"teacher": 123}, "data": {"train": "a.txt"}, "train": {"steps": 5.0, "lr": "1e-5", "clip": 2},
         "loss": {"terms": "sft"}, "output": None},
        []))
    assert cfg.model.teacher == "123" and cfg.data.train == ("a.txt",) and cfg.loss.terms == ("sft",)
    assert cfg.train.steps == 5 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.clip, float) and cfg.output.dir == "runs/transfer"


CONFIGS = sorted((Path(__file__).resolve().parents[2] / "transfer" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path):
    """Every transfer/configs/*.yaml loads as written (tiny_test.yaml's REPLACE_ME teacher is only
    resolved when a run starts) and survives a round trip through to_dict()."""
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig) and config_from_dict(cfg.to_dict()) == cfg


def test_shipped_configs_are_all_found():
    assert len(CONFIGS) >= 5 and any(p.name == "tiny_test.yaml" for p in CONFIGS)
