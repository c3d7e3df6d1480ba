"""A training run's resumable state as JSON and safetensors, never pickles: the optimizer (its
tensors in safetensors, the rest JSON), the learning-rate schedule, the random number generators
(their states as lists of ints) and JSON files in general.

JSON writes floats with Python's shortest round-tripping repr, so every value comes back
bit-identical, and reading a file never runs code.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

OPTIMIZER_FILE = "optimizer.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.json"


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON (a TypeError names a value JSON cannot hold)."""
    Path(path).write_text(json.dumps(obj, indent=1), encoding="utf-8")


def read_json(path: Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def rng_file(process_index: int) -> str:
    """File name of one process's random number generator states."""
    return f"rng-{process_index}.json"


# --------------------------------------------------------------------------------------------
# Optimizer


def save_optimizer(optimizer: Any, folder: Path) -> None:
    """``optimizer.state_dict()``: per-parameter tensors to safetensors (``"<index>.<key>"``), the
    per-parameter scalars and the parameter groups to JSON."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    save_file(tensors, str(Path(folder) / OPTIMIZER_TENSORS))
    write_json(Path(folder) / OPTIMIZER_FILE, {"indices": sorted(state["state"]), "scalars": scalars,
                                               "param_groups": state["param_groups"]})


def load_optimizer(optimizer: Any, folder: Path) -> None:
    """Restore what :func:`save_optimizer` wrote (JSON lists become tuples where this optimizer's
    groups hold tuples, e.g. AdamW's ``betas``)."""
    meta = read_json(Path(folder) / OPTIMIZER_FILE)
    state: dict[int, dict[str, Any]] = {int(i): {} for i in meta["indices"]}
    for name, tensor in load_file(str(Path(folder) / OPTIMIZER_TENSORS)).items():
        index, key = name.split(".", 1)
        state[int(index)][key] = tensor
    for index, values in meta["scalars"].items():
        state[int(index)].update(values)
    saved = meta["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint's optimizer has {len(saved)} parameter groups, this run's "
                         f"{len(optimizer.param_groups)}")
    groups = [{k: tuple(v) if isinstance(live.get(k), tuple) and isinstance(v, list) else v for k, v in group.items()}
              for group, live in zip(saved, optimizer.param_groups)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --------------------------------------------------------------------------------------------
# Schedule


def save_scheduler(scheduler: Any, folder: Path) -> None:
    """The schedule's ``state_dict()`` as JSON (LambdaLR stores ``None`` for a plain function)."""
    write_json(Path(folder) / SCHEDULER_FILE, scheduler.state_dict())


def load_scheduler(scheduler: Any, folder: Path) -> None:
    """Restore what :func:`save_scheduler` wrote."""
    scheduler.load_state_dict(read_json(Path(folder) / SCHEDULER_FILE))


# --------------------------------------------------------------------------------------------
# Random number generators


def _device_module(device: torch.device) -> Any:
    """torch's module for an accelerator's generators (``torch.cuda``, ...); None for the CPU."""
    if device.type == "cpu":
        return None
    module = torch.get_device_module(device.type)
    return module if hasattr(module, "get_rng_state") else None


def rng_states(device: torch.device) -> dict[str, Any]:
    """This process's generator states as JSON values: Python's ``random``, NumPy's global
    generator, torch's CPU generator and the accelerator's (all its devices)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    module = _device_module(device)
    if module is not None:
        states = module.get_rng_state_all() if hasattr(module, "get_rng_state_all") else [module.get_rng_state()]
        out["device"] = {"type": device.type, "states": [s.tolist() for s in states]}
    return out


def set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_states` returned."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    saved, module = states.get("device"), _device_module(device)
    if saved is None or module is None:
        if saved is not None or module is not None:
            warnings.warn(f"checkpoint's accelerator generators ({(saved or {}).get('type')}) do not match this "
                          f"run's device ({device.type}); they are not restored", stacklevel=2)
        return
    tensors = [torch.tensor(s, dtype=torch.uint8) for s in saved["states"]]
    if hasattr(module, "set_rng_state_all"):
        module.set_rng_state_all(tensors)
    else:
        module.set_rng_state(tensors[0])
