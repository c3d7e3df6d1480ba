"""Checkpoints a user can trust (issue 17, item 5): no pickles in a checkpoint and none loaded at
resume (an old pickled one is refused), generator states as JSON, every file fsynced before the
folder is renamed into place, checkpoints ordered by their step number (past step 999,999 too).
The final model folder's swap: `test_final_export.py`."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import yaml
from safetensors.torch import load_file

from transfer.config import config_from_dict
from transfer.train import CHECKPOINTS, CONFIG_FILE, MODEL_DIR, STATE_FILE, _check_output, checkpoint_dirs, train


def _is_pickle(path) -> bool:
    """A torch.save zip (``PK``) or a raw pickle (protocol 2+ starts with 0x80)."""
    head = path.read_bytes()[:2]
    return head == b"PK" or head[:1] == b"\x80"


def test_checkpoints_hold_no_pickles_and_resume_unpickles_nothing(reference_run, tiny_dir, corpus, tiny_config,
                                                                   losses_by_step, tmp_path, monkeypatch):
    """The scheduler, data position and RNG states are JSON, weights and optimizer tensors
    safetensors; a run stopped at step 4 resumes with torch.load and pickle disabled and matches
    the uninterrupted run exactly."""
    out = tmp_path / "run"
    raw = tiny_config(tiny_dir("llama-gpt2"), corpus, out)
    train(config_from_dict({**raw, "train": {**raw["train"], "stop_after": 4}}))
    for ckpt in checkpoint_dirs(out):
        files = sorted(p for p in ckpt.rglob("*") if p.is_file())
        assert files and not [p.name for p in files if _is_pickle(p)], ckpt
        assert all(p.suffix in (".json", ".safetensors") for p in files), [p.name for p in files]
    latest = checkpoint_dirs(out)[-1]
    scheduler = json.loads((latest / "scheduler.json").read_text())
    assert scheduler["last_epoch"] == 4
    rng = json.loads((latest / "rng-0.json").read_text())
    assert all(isinstance(x, int) for x in rng["torch"]) and len(rng["torch"]) > 100
    assert json.loads((latest / STATE_FILE).read_text())["data"]["offset"] > 0

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled at resume")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    train(config_from_dict(raw), resume=True)
    monkeypatch.undo()
    want, got = losses_by_step(reference_run), losses_by_step(out)
    assert sorted(got) == list(range(1, 7))
    for step in want:
        for key, value in want[step].items():
            assert got[step][key] == pytest.approx(value, abs=1e-6), (step, key)
    a = load_file(reference_run / MODEL_DIR / "model.safetensors")
    b = load_file(out / MODEL_DIR / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_files_and_folders_are_fsynced_around_the_rename(tiny_dir, corpus, tiny_config, tmp_path, monkeypatch):
    """Every file of a checkpoint and its temporary folder are fsynced before the folder is
    renamed into place, the checkpoints folder after; the final model folder's files and the run
    folder are fsynced too."""
    out = tmp_path / "synced"
    raw = tiny_config(tiny_dir("llama-gpt2"), corpus, out, train={"steps": 2, "warmup_steps": 1},
                      output={"eval_bytes": 0})
    events: list[tuple[str, str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
        real_fsync(fd)

    def replace(src, dst, **kwargs) -> None:
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    train(config_from_dict(raw))
    monkeypatch.undo()

    root = os.path.realpath(out / CHECKPOINTS)
    final = os.path.join(root, "step-000002")
    (at,) = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == final]
    tmp = events[at][1]
    synced_before = {e[1] for e in events[:at] if e[0] == "fsync"}
    names = [os.path.relpath(p, final) for p in map(str, (out / CHECKPOINTS / "step-000002").rglob("*"))]
    assert names and all(os.path.join(tmp, n) in synced_before for n in names), (names, synced_before)
    assert tmp in synced_before
    assert ("fsync", root, "") in events[at + 1 :]
    model = out / MODEL_DIR
    synced = [e[1] for e in events if e[0] == "fsync"]
    files = [p.name for p in model.iterdir() if p.is_file()]
    assert files and all(any(s.endswith(os.sep + f) for s in synced) for f in files), files
    last_file = max(i for i, e in enumerate(events) if e[0] == "fsync" and os.path.basename(e[1]) in files)
    assert ("fsync", os.path.realpath(out), "") in events[last_file + 1 :]


def test_checkpoints_sort_by_step_number_past_999999(tiny_dir, corpus, tiny_config, tmp_path):
    """``step-1000000`` is newer than ``step-999999`` (a name sort puts it first): listing,
    resume and pruning go by the parsed step; short names are accepted too."""
    out = tmp_path / "long"
    cfg = config_from_dict(tiny_config(tiny_dir("llama-gpt2"), corpus, out))
    for name in ("step-1000000", "step-000998", "step-999999", "step-12"):
        (out / CHECKPOINTS / name).mkdir(parents=True)
        (out / CHECKPOINTS / name / STATE_FILE).write_text("{}")
    (out / CHECKPOINTS / "step-notanumber").mkdir()
    (out / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert [p.name for p in checkpoint_dirs(out)] == ["step-12", "step-000998", "step-999999", "step-1000000"]
    assert _check_output(out, cfg, resume=True).name == "step-1000000"
    from transfer.train_checkpoints import prune_checkpoints

    prune_checkpoints(out, keep=2)
    assert [p.name for p in checkpoint_dirs(out)] == ["step-999999", "step-1000000"]


def test_rng_states_round_trip_through_json(tmp_path):
    """Python's, NumPy's and torch's generators continue exactly after a JSON round trip."""
    import random

    import numpy as np

    from transfer.train_state import read_json, rng_states, set_rng_states, write_json

    def draw():
        return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4).tolist()

    draw()
    write_json(tmp_path / "rng.json", rng_states(torch.device("cpu")))
    want = draw()
    draw()
    set_rng_states(read_json(tmp_path / "rng.json"), torch.device("cpu"))
    assert draw() == want


def test_a_pickled_checkpoint_is_refused_not_unpickled(tmp_path):
    """A checkpoint written before the JSON format (accelerate's pickles) is a one-line error."""
    from transfer.errors import UserInputError
    from transfer.train_checkpoints import Resumable, load_checkpoint

    old = tmp_path / CHECKPOINTS / "step-000002"
    old.mkdir(parents=True)
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        (old / name).write_bytes(b"\x80\x04N.")
    (old / STATE_FILE).write_text("{}")
    with pytest.raises(UserInputError, match="earlier version"):
        load_checkpoint(Resumable(accelerator=None, model=None, optimizer=None, scheduler=None), old)
