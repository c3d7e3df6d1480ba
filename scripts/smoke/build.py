"""The image build, replayed in the scratch root: the image's absolute paths mapped under it
(`Rooted`), each stage's WORKDIR and COPY lines, and the builder stage's RUN lines run verbatim
under `sh` with the stage's ARG/ENV values (so `docker/install.sh` makes the venv)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from smoke.dockerfile import Instruction, global_args, stage_environment
from smoke.errors import SmokeError
from smoke.report import Timings

REPO = Path(__file__).resolve().parents[2]  # the build context


class Rooted:
    """Maps the image's absolute paths into the scratch root."""

    PREFIXES = ("/opt/venv", "/src", "/data", "/cache", "/usr/local/bin", "/home/chorus")

    def __init__(self, root: Path):
        self.root = root

    def path(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")

    def rewrite(self, text: str) -> str:
        """Prefix every image path of PREFIXES found in `text` (commands, ENV values)."""
        pattern = r"(?<![\w./-])(" + "|".join(re.escape(p) for p in self.PREFIXES) + r")(?=$|[/\s:;\"'])"
        return re.sub(pattern, lambda m: str(self.root) + m.group(1), text)


def base_environment() -> dict[str, str]:
    """This machine's environment less anything that would leak the repository's venv in."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    venv_bin = str(REPO / ".venv" / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return env


def build_builder_stage(instructions: list[Instruction], rooted: Rooted, reuse_venv: bool, timings: Timings) -> None:
    """The builder stage from scratch (its files removed first), or nothing if `reuse_venv` and a
    previous run finished it."""
    stamp = rooted.path("/opt/venv") / ".smoke-installed"
    if reuse_venv and stamp.is_file():
        print(f"[smoke] reusing {rooted.path('/opt/venv')} (--reuse-venv)", flush=True)
        return
    for sub in ("opt", "src", "usr"):
        shutil.rmtree(rooted.root / sub, ignore_errors=True)
    env = builder_environment(instructions, rooted)
    replay_stage(instructions, "builder", rooted, env, timings, run=True)
    stamp.write_text("ok\n")


def builder_environment(instructions: list[Instruction], rooted: Rooted) -> dict[str, str]:
    """What the builder's RUN lines see: the stage's ARG/ENV (paths rooted) over this machine's
    environment, the rooted /usr/local/bin first on PATH, this machine's Python 3.11, pip's cache."""
    python = shutil.which("python3.11") or sys.executable
    build_args = {"TORCH_INDEX_URL": os.environ.get("TORCH_INDEX_URL", "")}
    stage_env = stage_environment(instructions, "builder", base=global_args(instructions), build_args=build_args)
    env = base_environment()
    env.update({k: rooted.rewrite(v) for k, v in stage_env.items()})
    env["PATH"] = f"{rooted.path('/usr/local/bin')}{os.pathsep}{base_environment()['PATH']}"
    env["PYTHON"] = python  # the image's `python` is its own 3.11; here, this machine's
    env.pop("PIP_NO_CACHE_DIR", None)  # keep pip's cache between smoke runs
    if not build_args["TORCH_INDEX_URL"]:
        env["TORCH_INDEX_REQUIRED"] = "0"
        print("[smoke] TORCH_INDEX_URL unset: torch comes from pip's configuration here "
              "(the image takes it from PyTorch's CPU wheel index)", flush=True)
    return env


def replay_stage(instructions: list[Instruction], stage: str, rooted: Rooted, env: dict[str, str],
                 timings: Timings, run: bool) -> None:
    """Replay a stage's WORKDIR and COPY lines, and (if `run`) its RUN lines, in the scratch root.

    A ``COPY --from=builder`` must copy a path onto itself (the venv keeps its absolute path);
    RUN lines of the runtime stage (apt, users) are skipped: they need a root file system.
    """
    workdir = "/"
    for ins in instructions:
        if ins.stage != stage:
            continue
        if ins.keyword == "WORKDIR":
            workdir = ins.text
            rooted.path(workdir).mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY" and "--from" in ins.text:
            _check_copy_from(ins)
        elif ins.keyword == "COPY":
            replay_copy(ins, workdir, rooted)
        elif ins.keyword == "RUN" and run:
            _replay_run(ins, workdir, rooted, env, timings)
        elif ins.keyword == "RUN":
            print(f"[smoke] skipped (needs a root file system): RUN {ins.text[:80]}", flush=True)


def _check_copy_from(ins: Instruction) -> None:
    """A COPY from another stage is replayed by nothing at all, so it must copy a path onto itself."""
    words = [w for w in shlex.split(ins.text) if not w.startswith("--")]
    if len(words) != 2 or words[0].rstrip("/") != words[1].rstrip("/"):
        raise SmokeError(f"line {ins.line}: cannot replay {ins.text!r} (expected COPY --from=X PATH PATH)")


def _replay_run(ins: Instruction, workdir: str, rooted: Rooted, env: dict[str, str], timings: Timings) -> None:
    command = rooted.rewrite(ins.text)
    print(f"[smoke] RUN (Dockerfile.cpu line {ins.line}): {command}", flush=True)
    start = time.monotonic()
    proc = subprocess.run(["sh", "-c", command], cwd=rooted.path(workdir), env=env)
    if proc.returncode != 0:
        raise SmokeError(f"Dockerfile.cpu line {ins.line}: RUN failed with status {proc.returncode}")
    timings.add(f"RUN line {ins.line}", time.monotonic() - start, ins.text[:70])


def replay_copy(ins: Instruction, workdir: str, rooted: Rooted) -> None:
    """Run a COPY of the build context (not --from) into the scratch root."""
    words = [w for w in shlex.split(ins.text) if not w.startswith("--")]
    *sources, dest = words
    target = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
    for source in sources:
        src = REPO / source
        if not src.exists():
            raise SmokeError(f"Dockerfile line {ins.line}: COPY source {source} does not exist")
        if src.is_dir():
            _copy(src, rooted.path(target))
        elif dest.endswith("/") or len(sources) > 1:
            _copy(src, rooted.path(target) / src.name)
        else:
            _copy(src, rooted.path(target))


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
