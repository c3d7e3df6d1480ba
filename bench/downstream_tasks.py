"""The downstream tasks and their lm-eval task files: which tasks there are, and the stock task
files of bench/lm_eval_tasks/ rendered with this machine's paths, their data checked first."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from string import Template

from bench.errors import DownstreamError

TASKS = ("piqa", "arc_easy", "hellaswag", "winogrande", "lambada_openai")
MULTIPLE_CHOICE = frozenset({"piqa", "arc_easy", "hellaswag", "winogrande"})
ZOO_TASK = {"lambada_openai": "lambada"}  # task -> its folder under the zoo's evals/
TEMPLATES = Path(__file__).resolve().parent / "lm_eval_tasks"
DEFAULT_LIMIT = 50


def _lm_eval_tasks_dir() -> Path:
    try:
        import lm_eval
    except ImportError:
        raise DownstreamError("lm-eval is not installed: pip install -e '.[eval]'") from None
    return Path(lm_eval.__file__).resolve().parent / "tasks"


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """`tasks` if every one is known; else DownstreamError naming the unknown one."""
    for task in tasks:
        if task not in TASKS:
            raise DownstreamError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return list(tasks)


def render_tasks(out: Path, tasks: Sequence[str] = TASKS, build: bool = True) -> Path:
    """Write the task files of `tasks` into `out`, with the data paths of this machine; return `out`.

    Each data file is checked first (`transfer.zoo.eval_file`: built on first use when `build`,
    then verified against its pinned sha256).
    """
    from transfer import zoo

    check_tasks(tasks)
    try:
        for task in tasks:
            zoo.eval_file(ZOO_TASK.get(task, task), build=build)
    except zoo.ZooError as err:
        raise DownstreamError(str(err)) from None
    values = {"LM_EVAL_TASKS": str(_lm_eval_tasks_dir()), "CHORUS_EVALS": str(zoo.eval_dir(build=False))}
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        text = Template((TEMPLATES / f"{task}.yaml").read_text(encoding="utf-8")).substitute(values)
        (out / f"{task}.yaml").write_text(text, encoding="utf-8")
    return out
