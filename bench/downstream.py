"""Downstream accuracy and calibration of ensembles and original models, through the real client.

    python bench/downstream.py --scorer ensemble=~/.cache/chorus/default/ensemble-gemma3 \
        --scorer gemma3=zoo:gemma3 --scorer smollm2=zoo:smollm2 --scorer qwen25=zoo:qwen2.5 \
        --out bench/results/downstream.json

For each scorer the script starts `serve` on a free port (`--engine`, default vllm), waits for
/health and runs EleutherAI's lm-evaluation-harness against it, unchanged: the `local-completions`
model, which sends one `/v1/completions` request per answer choice (token-id prompts made with
the served ensemble's own tokenizer, `echo`, `logprobs: 1`, `max_tokens: 1`). The tasks are
lm-eval's stock PIQA, ARC-Easy, HellaSwag, Winogrande and LAMBADA (`lambada_openai`): the task
files in bench/lm_eval_tasks/ include the stock ones, so prompts and metrics are lm-eval's own,
and only point the data at the zoo's verified local copies (`python -m transfer.zoo build
--evals`, built on first use). ARC-Easy is scored on its validation split, the only one there.

A scorer is NAME=PATH: an ensemble folder (`ensemble build`), or a model folder or `zoo:MODEL`,
which is served as a one-member ensemble that `ensemble build` makes under --work-dir. Every
request starts with the served tokenizer's start token, as `transfer eval` scores texts
(`start_token_tokenizer`; lm-eval's `add_bos_token`).

Reported per task: accuracy +- its standard error (lm-eval's `acc` and `acc_stderr`: unnormalised
multiple-choice accuracy; greedy match of the last word for LAMBADA) and, for the multiple-choice
tasks, the expected calibration error (`expected_calibration_error`: 10 equal-width bins of the
top choice probability, the choice probabilities being the softmax over the choices' summed
log-likelihoods from lm-eval's per-sample log). The JSON also holds acc_norm and LAMBADA's
perplexity. A Markdown table is printed; the mean accuracy's error is the tasks' errors combined.

Cost: lm-eval sends 13 requests per document over the five tasks (2 PIQA choices, 4 for
HellaSwag, about 4 for ARC-Easy, 2 for Winogrande, 1 LAMBADA passage). Measured on 2 CPU cores
(one of them busy with other work), vLLM engine: 0.2 s per request for SmolLM2-135M, 0.5 s for
Qwen2.5-Coder-0.5B, 0.6 s for Gemma-3 270M, 1.3 s for the three-member default ensemble, plus
45-90 s of server start-up per scorer. The default `--limit 50` (650 requests per scorer;
standard error about 0.07 on an accuracy near one half, 0.03 on the mean of the five tasks) thus
takes about 2, 6, 7 and 14 minutes for those four: half an hour for the ensemble against its
three original models.

The code, one job a module (every name stays importable from here):

    bench/downstream_tasks.py    the tasks, their task files and data (TASKS, render_tasks)
    bench/downstream_scorers.py  what is served for NAME=PATH (scorer_ensemble)
    bench/launch.py              serve on a free port until /health is 200 (served, launched)
    bench/downstream_lm_eval.py  lm-eval against the server (start_token_tokenizer, run_lm_eval)
    bench/downstream_metrics.py  results to accuracy, ECE, mean (summarise, mean_accuracy)
    bench/downstream_report.py   the JSON record and the Markdown table
    bench/errors.py              DownstreamError
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.downstream_lm_eval import BOOTSTRAP_ITERS, _register_chorus_completions, run_lm_eval, start_token_tokenizer
from bench.downstream_metrics import (
    ECE_BINS,
    _metric,
    choice_probabilities,
    expected_calibration_error,
    mean_accuracy,
    sample_calibration,
    summarise,
)
from bench.downstream_report import markdown_table, new_record, print_report, write_record
from bench.downstream_scorers import scorer_ensemble
from bench.downstream_tasks import (
    DEFAULT_LIMIT,
    MULTIPLE_CHOICE,
    TASKS,
    TEMPLATES,
    ZOO_TASK,
    _lm_eval_tasks_dir,
    check_tasks,
    render_tasks,
)
from bench.errors import DownstreamError
from bench.launch import _last_line, launched, served
from bench.launch import free_port as _free_port  # bench/serving.py imports it from here

__all__ = [
    "BOOTSTRAP_ITERS", "DEFAULT_LIMIT", "ECE_BINS", "MULTIPLE_CHOICE", "TASKS", "TEMPLATES", "ZOO_TASK",
    "DownstreamError", "check_tasks", "choice_probabilities", "expected_calibration_error", "launched",
    "main", "markdown_table", "mean_accuracy", "render_tasks", "run_lm_eval", "sample_calibration",
    "scorer_ensemble", "served", "start_token_tokenizer", "summarise",
    # private, imported by other bench scripts or kept for old callers
    "_free_port", "_last_line", "_lm_eval_tasks_dir", "_metric", "_register_chorus_completions",
]


def _scorer_arg(text: str) -> tuple[str, str]:
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, spec


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scorer", action="append", type=_scorer_arg, required=True, metavar="NAME=PATH",
                   help="an ensemble folder, or a model folder / zoo:MODEL served alone (repeatable)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated (default: {','.join(TASKS)})")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                   help=f"documents per task, the first ones (default {DEFAULT_LIMIT}; 0 = all)")
    p.add_argument("--engine", choices=("vllm", "torch"), default="vllm", help="serve's engine (default vllm)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for serve, e.g. --serve-arg=--dtype=float32 (repeatable)")
    p.add_argument("--concurrency", type=int, default=1, help="requests lm-eval keeps in flight (default 1)")
    p.add_argument("--work-dir", type=Path, help="one-member ensembles, task files and server logs "
                                                  "(default: a new temporary folder)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p


def _score(name: str, spec: str, args: argparse.Namespace, work: Path, task_dir: Path,
           record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Serve scorer `name`, run lm-eval on the record's tasks against it, add it to `record`;
    return its per-task summary."""
    tasks, limit = record["tasks"], record["limit"]
    ensemble = scorer_ensemble(name, spec, work)
    start = time.monotonic()
    print(f"[downstream] {name}: serving {ensemble} ({args.engine})", flush=True)
    tokenizer, start_id = start_token_tokenizer(ensemble, work / f"tokenizer-{name}")
    with served(ensemble, args.engine, work / f"serve-{name}.log", args.serve_arg) as (url, card):
        results = run_lm_eval(url, card["id"], tokenizer, tasks, task_dir, limit,
                              api_key=os.environ.get("CHORUS_API_KEY"),
                              max_length=card.get("max_model_len"), concurrency=args.concurrency)
    summary = summarise(results, tasks)
    record["scorers"][name] = {"path": str(ensemble), "start_token": start_id, "tasks": summary}
    record["seconds"][name] = round(time.monotonic() - start, 1)
    print(f"[downstream] {name}: done in {record['seconds'][name]:.0f} s", flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        tasks = check_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
        work = args.work_dir or Path(tempfile.mkdtemp(prefix="chorus-downstream-"))
        work.mkdir(parents=True, exist_ok=True)
        task_dir = render_tasks(work / "tasks", tasks)
        limit = args.limit or None
        scores: dict[str, dict[str, dict[str, Any]]] = {}
        record = new_record(tasks, limit, args.engine)
        for name, spec in args.scorer:
            scores[name] = _score(name, spec, args, work, task_dir, record)
            if args.out:
                write_record(args.out, record)
    except DownstreamError as err:
        print(f"downstream: error: {err}", file=sys.stderr)
        return 1
    print_report(scores, tasks, limit, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
