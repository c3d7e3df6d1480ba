"""The final ``model/`` folder is written beside the old one and swapped in: a run killed (SIGKILL,
in a subprocess) while it exports keeps a loadable model folder, and resuming it finishes the
export (issue 17, item 5)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from transfer.config import config_from_dict
from transfer.train import CONFIG_FILE, MODEL_DIR, train

# Runs in a subprocess: resume the run in argv[1] (complete, so it only re-exports its model)
# with a kill planted by `PLANT`, which kills the process with SIGKILL at the chosen moment.
_SCRIPT = """
import os, signal, sys
import yaml
from transfer.config import config_from_dict
from transfer.train import train

def die():
    os.kill(os.getpid(), signal.SIGKILL)

{plant}
raw = yaml.safe_load(open(os.path.join(sys.argv[1], "config.yaml")))
raw["output"]["dir"] = sys.argv[1]
train(config_from_dict(raw), resume=True)
"""

# SIGKILL while the export is half written: the weights are saved, the tokenizer is not.
_MID_WRITE = """
from transformers import PreTrainedTokenizerBase
PreTrainedTokenizerBase.save_pretrained = lambda *a, **k: die()
"""

# SIGKILL between the two renames of the portable swap (the atomic exchange switched off): the
# old folder is aside, the new one not yet in place.
_MID_SWAP = """
try:
    import transfer.durable as durable
    durable._exchange = lambda a, b: False
except ImportError:
    pass
real_replace = os.replace
def replace(src, dst, **kw):
    real_replace(src, dst, **kw)
    if os.path.basename(os.fspath(src)) == "model":
        die()
os.replace = replace
"""


def _copy_run(reference_run: Path, to: Path) -> Path:
    shutil.copytree(reference_run, to)
    return to


def _kill_during_export(run: Path, plant: str) -> None:
    script = _SCRIPT.format(plant=textwrap.dedent(plant))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(run)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _resume(run: Path) -> None:
    raw = yaml.safe_load((run / CONFIG_FILE).read_text())
    raw["output"]["dir"] = str(run)
    train(config_from_dict(raw), resume=True)


def test_kill_while_writing_the_export_keeps_the_previous_model(reference_run, tmp_path):
    run = _copy_run(reference_run, tmp_path / "run")
    _kill_during_export(run, _MID_WRITE)
    AutoModelForCausalLM.from_pretrained(run / MODEL_DIR)  # the previous folder, whole
    assert _same_weights(run / MODEL_DIR, reference_run / MODEL_DIR)
    _resume(run)
    assert _same_weights(run / MODEL_DIR, reference_run / MODEL_DIR)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_kill_between_the_renames_of_the_swap_is_recovered(reference_run, tmp_path):
    run = _copy_run(reference_run, tmp_path / "run")
    _kill_during_export(run, _MID_SWAP)
    assert not (run / MODEL_DIR).exists()  # the window the exchange closes where it is available
    from transfer.durable import recover_swap

    recover_swap(run / MODEL_DIR)  # what the next start of the run does first
    AutoModelForCausalLM.from_pretrained(run / MODEL_DIR)
    assert _same_weights(run / MODEL_DIR, reference_run / MODEL_DIR)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    _resume(run)
    assert _same_weights(run / MODEL_DIR, reference_run / MODEL_DIR)
