"""Checkpoints of a training run: the run folder's layout, what a checkpoint holds, atomic and
durable saves (a temporary folder, every file and the folder fsynced, renamed into place, the
parent fsynced, the oldest pruned), loading without unpickling anything, and the check that
refuses to overwrite a run or to resume one with a different config.

A checkpoint ``checkpoints/step-<step>`` (at least six digits; ordered by the parsed step, so
``step-1000000`` follows ``step-999999``) holds:

* ``trainable.safetensors``: the trainable weights (frozen ones are rebuilt identically at resume);
* ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensors and the rest of its state;
* ``scheduler.json``: the learning-rate schedule; ``rng-<process>.json``: each process's random
  number generators (lists of ints);
* ``trainer_state.json``, written last (a checkpoint without it is incomplete): step, tokens,
  elapsed time, the data order's position and the gradient-balancing factors.

Under FSDP or DeepSpeed the sharded weights and optimizer are accelerate's own format (its
``save_state`` / ``load_state``; it also writes a ``random_states_<process>.pkl``, which its
``load_state`` reads with ``weights_only=True`` and which the JSON generator states then
override); that path is not tested.
"""

from __future__ import annotations

import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from safetensors.torch import load_file, save_file

from .config import RunConfig
from .durable import fsync_path, fsync_tree, replace_durably
from .errors import ConfigError, UserInputError
from .train_setup import trainable_parameters
from .train_state import (SCHEDULER_FILE, load_optimizer, load_scheduler, read_json, rng_file, rng_states,
                          save_optimizer, save_scheduler, set_rng_states, write_json)

CHECKPOINTS = "checkpoints"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
MODEL_DIR = "model"

_NAME = re.compile(r"step-(\d+)")


@dataclass
class Resumable:
    """What a checkpoint restores besides the trainer state: the prepared (possibly wrapped)
    model, its optimizer and schedule, and the accelerator that prepared them."""

    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any


def checkpoint_step(path: Path) -> Optional[int]:
    """The step of a checkpoint folder named ``step-<digits>`` (any width); None otherwise."""
    match = _NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (by step number, not by name)."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and checkpoint_step(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: (checkpoint_step(p), p.name))


def prune_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints."""
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _sharded(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _save_trainable(model: Any, folder: Path) -> None:
    tensors = {name: p.detach().cpu().contiguous() for name, p in trainable_parameters(model)}
    save_file(tensors, str(folder / TRAINABLE_FILE))


def _load_trainable(model: Any, folder: Path) -> None:
    tensors = load_file(str(folder / TRAINABLE_FILE))
    params = dict(trainable_parameters(model))
    if set(tensors) != set(params):
        raise UserInputError(f"checkpoint {folder} does not match this run's trainable weights; "
                             "resume with the same config")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def save_checkpoint(parts: Resumable, out: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` (``state``: the JSON trainer state) into a temporary folder,
    fsync it, rename it into place, fsync the checkpoints folder and prune the oldest."""
    accelerator = parts.accelerator
    root = out / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if _sharded(accelerator):
        accelerator.save_state(str(tmp))
    elif accelerator.is_main_process:
        _save_trainable(accelerator.unwrap_model(parts.model), tmp)
        save_optimizer(parts.optimizer, tmp)
    own_rng = tmp / rng_file(accelerator.process_index)
    write_json(own_rng, rng_states(accelerator.device))
    fsync_path(own_rng)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_scheduler(parts.scheduler, tmp)
        write_json(tmp / STATE_FILE, state)
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        replace_durably(tmp, final)
        prune_checkpoints(out, keep)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(parts: Resumable, folder: Path) -> dict[str, Any]:
    """Restore weights, optimizer, schedule and this process's generators from ``folder``;
    return its trainer state. Nothing is unpickled (but see the module docstring on FSDP)."""
    accelerator = parts.accelerator
    if not (folder / SCHEDULER_FILE).is_file():
        raise UserInputError(
            f"checkpoint {folder} was written by an earlier version (pickled states, no {SCHEDULER_FILE}); this "
            "version does not unpickle checkpoints: finish the run with the version that wrote it, or start it again")
    if _sharded(accelerator):
        accelerator.load_state(str(folder))
    else:
        _load_trainable(accelerator.unwrap_model(parts.model), folder)
        load_optimizer(parts.optimizer, folder)
    load_scheduler(parts.scheduler, folder)
    rng = folder / rng_file(accelerator.process_index)
    if rng.is_file():
        set_rng_states(read_json(rng), accelerator.device)
    else:
        warnings.warn(f"checkpoint {folder} has no random states for process {accelerator.process_index} (written by "
                      "fewer processes?): they are not restored", stacklevel=2)
    return read_json(folder / STATE_FILE)


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
