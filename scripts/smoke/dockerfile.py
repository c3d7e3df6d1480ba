"""Reading a Dockerfile as the smoke replays it: its instructions by stage, the ARG/ENV values a
stage sees, the ENV a container of it starts with, the exec form of ENTRYPOINT / HEALTHCHECK."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: keyword (upper case), its raw argument text, its stage name."""

    keyword: str
    text: str
    stage: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Split a Dockerfile into instructions (comments dropped, `\\` continuations joined).

    Instructions before the first FROM belong to stage ``""`` (global ARGs); a stage is named by
    ``FROM image AS name``, else by its index.
    """
    instructions: list[Instruction] = []
    stage, pending, start = "", "", 0
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        text = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            stage = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(
                sum(1 for i in instructions if i.keyword == "FROM"))
        instructions.append(Instruction(keyword, rest.strip(), stage, start))
    if pending:
        raise ValueError(f"{path}: the last instruction ends with a line continuation")
    return instructions


def _assignments(text: str) -> dict[str, str]:
    """`K=V K2="v 2"` (ENV/ARG/LABEL syntax) or the legacy `ENV K V` form, as a dict."""
    words = shlex.split(text)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) if "=" in word else (word, "") for word in words)


def _substitute(value: str, scope: dict[str, str]) -> str:
    """Expand ``$NAME`` and ``${NAME}`` from `scope` (unknown names: empty), as Docker does."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: scope.get(m.group(1) or m.group(2), ""), value)


def stage_names(instructions: list[Instruction]) -> list[str]:
    """The stages in order."""
    return [i.stage for i in instructions if i.keyword == "FROM"]


def stage_environment(instructions: list[Instruction], stage: str, base: dict[str, str] | None = None,
                      build_args: dict[str, str] | None = None) -> dict[str, str]:
    """The variables a RUN at the end of `stage` sees: its ARG defaults (or `build_args`) and ENV.

    `base` is the starting environment (e.g. the PATH of the base image); build args that the
    Dockerfile declares with ARG override their defaults, as `--build-arg` does.
    """
    scope = dict(base or {})
    build_args = build_args or {}
    for ins in instructions:
        if ins.stage != stage or ins.keyword not in ("ARG", "ENV"):
            continue
        for name, value in _assignments(ins.text).items():
            if ins.keyword == "ARG":
                scope[name] = build_args.get(name, _substitute(value, scope))
            else:
                scope[name] = _substitute(value, scope)
    return scope


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    """ARG defaults declared before the first FROM."""
    return stage_environment(instructions, "")


def stage_image_env(instructions: list[Instruction], stage: str) -> dict[str, str]:
    """Only the ENV variables a stage sets (what `docker run` would see from that stage)."""
    scope: dict[str, str] = {"PATH": "$PATH"}
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.stage == stage and ins.keyword == "ENV":
            for name, value in _assignments(ins.text).items():
                env[name] = scope[name] = _substitute(value, {**scope, "PATH": "$PATH"})
    return env


def exec_form(ins: Instruction) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT / CMD / HEALTHCHECK CMD; ValueError if shell form."""
    text = ins.text
    if ins.keyword == "HEALTHCHECK":
        _, _, text = text.partition("CMD")
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError as err:
        raise ValueError(f"line {ins.line}: {ins.keyword} is not in exec (JSON) form: {ins.text!r}") from err
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        raise ValueError(f"line {ins.line}: {ins.keyword} must be a JSON list of strings")
    return value


def one(instructions: list[Instruction], keyword: str, stage: str) -> Instruction:
    """The last `keyword` instruction of `stage` (Docker keeps the last one)."""
    found = [i for i in instructions if i.keyword == keyword and i.stage == stage]
    if not found:
        raise ValueError(f"stage {stage!r} has no {keyword}")
    return found[-1]
