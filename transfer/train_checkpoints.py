"""Checkpoints of a training run: the run folder's layout, accelerate hooks that save and load only
the trainable weights, atomic saves (a temporary folder renamed into place, the oldest pruned),
and the check that refuses to overwrite a run or to resume one with a different config.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from .config import RunConfig
from .errors import ConfigError, UserInputError
from .train_setup import trainable_parameters

CHECKPOINTS = "checkpoints"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
MODEL_DIR = "model"


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file())


def _install_checkpoint_hooks(accelerator: Any) -> None:
    """Checkpoints hold only trainable weights (frozen ones are rebuilt identically at resume)."""
    from accelerate.utils import DistributedType
    from safetensors.torch import load_file, save_file

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return  # sharded states: accelerate's own format

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                names = {name for name, _ in trainable_parameters(model)}
                tensors = {k: v.detach().contiguous().cpu() for k, v in weights[i].items() if k in names}
                save_file(tensors, os.path.join(output_dir, f"{i}.{TRAINABLE_FILE}"))
        weights.clear()

    def load_hook(models: list, input_dir: str) -> None:
        for i, model in enumerate(models):
            tensors = load_file(os.path.join(input_dir, f"{i}.{TRAINABLE_FILE}"))
            expected = {name for name, _ in trainable_parameters(model)}
            if set(tensors) != expected:
                raise UserInputError(f"checkpoint {input_dir} does not match this run's trainable weights; resume with the same config")
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in tensors.items():
                    params[name].copy_(value)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator: Any, out: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` into a temporary folder and rename it into place."""
    root = out / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _check_output(out: Path, cfg: RunConfig, resume: bool) -> Optional[Path]:
    """Refuse to overwrite a run; on resume return the newest checkpoint (None: start over)."""
    existing = checkpoint_dirs(out)
    saved_cfg = out / CONFIG_FILE
    if not resume:
        if existing or (out / MODEL_DIR).exists() or saved_cfg.exists():
            raise UserInputError(f"output dir {out} already holds a run; pass --resume to continue it or set output.dir elsewhere")
        return None
    if not saved_cfg.exists():
        raise UserInputError(f"nothing to resume in {out}: no {CONFIG_FILE} there")
    before = yaml.safe_load(saved_cfg.read_text(encoding="utf-8"))
    now = cfg.to_dict()
    diff = [f"{sec}.{k}" for sec in now for k in now[sec]
            if sec != "output" and (sec, k) != ("train", "stop_after") and before.get(sec, {}).get(k) != now[sec][k]]
    if diff:
        raise ConfigError(f"--resume with a config that differs from the run's in {', '.join(diff)}")
    return existing[-1] if existing else None
