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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from string import Template
from typing import Any

TASKS = ("piqa", "arc_easy", "hellaswag", "winogrande", "lambada_openai")
MULTIPLE_CHOICE = frozenset({"piqa", "arc_easy", "hellaswag", "winogrande"})
ZOO_TASK = {"lambada_openai": "lambada"}  # task -> its folder under the zoo's evals/
TEMPLATES = Path(__file__).resolve().parent / "lm_eval_tasks"
DEFAULT_LIMIT = 50
ECE_BINS = 10
BOOTSTRAP_ITERS = 1000  # lm-eval's bootstrap for LAMBADA's perplexity error (its default, 100,000, takes minutes)


class DownstreamError(RuntimeError):
    """A bench run that cannot go on; the message is one line naming the problem."""


# --------------------------------------------------------------------------- calibration


def choice_probabilities(loglikelihoods: Sequence[float]) -> list[float]:
    """The normalised choice probabilities: softmax over the choices' summed log-likelihoods."""
    if not loglikelihoods:
        raise ValueError("no choices")
    top = max(loglikelihoods)
    weights = [math.exp(ll - top) for ll in loglikelihoods]
    total = sum(weights)
    return [w / total for w in weights]


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> float:
    """Expected calibration error with `bins` equal-width confidence bins.

    ECE = sum over bins b of |b| / n * |accuracy(b) - mean confidence(b)|, where a prediction with
    confidence c falls in bin min(floor(c * bins), bins - 1) (so 1.0 is in the last bin).
    """
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} outcomes")
    if not confidences:
        raise ValueError("no predictions")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    count = [0] * bins
    conf_sum = [0.0] * bins
    right = [0] * bins
    for c, ok in zip(confidences, correct):
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"confidence {c} is not a probability")
        b = min(int(c * bins), bins - 1)
        count[b] += 1
        conf_sum[b] += c
        right[b] += bool(ok)
    n = len(confidences)
    return sum(abs(right[b] - conf_sum[b]) / n for b in range(bins) if count[b])


def sample_calibration(samples: Sequence[dict[str, Any]]) -> tuple[list[float], list[bool]]:
    """(top choice probability, whether lm-eval counted it correct) per multiple-choice sample.

    Each sample of lm-eval's log (`log_samples`) holds `filtered_resps`, one (log-likelihood,
    is-greedy) pair per choice, and `acc`, 1.0 when the most likely choice is the gold one.
    """
    confidences, correct = [], []
    for sample in samples:
        probs = choice_probabilities([float(resp[0]) for resp in sample["filtered_resps"]])
        confidences.append(max(probs))
        correct.append(bool(sample["acc"]))
    return confidences, correct


# --------------------------------------------------------------------------- lm-eval


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


def start_token_tokenizer(ensemble: Path, out: Path) -> tuple[Path, int]:
    """A copy of the ensemble's tokenizer at `out` that puts the start token in front of every text
    encoded with special tokens; return (its folder, the start token id).

    The start token is the one `transfer eval` scores texts after (`transfer.tokens.start_token_id`:
    Gemma's `<bos>`, `<|endoftext|>` for Qwen2 and SmolLM2). None of the zoo tokenizers adds it by
    itself, so lm-eval, given this copy and `add_bos_token`, starts each request as the
    bits-per-byte evaluation starts each window (Gemma models degrade badly without `<bos>`).
    """
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from transfer.tokens import start_token_id

    tok = AutoTokenizer.from_pretrained(ensemble)
    start = start_token_id(tok)
    piece = tok.convert_ids_to_tokens(start)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=[piece, "$A"], pair=[piece, "$A", "$B"], special_tokens=[(piece, start)])
    tok.save_pretrained(out)
    probe = "Question: To be, or not to be?\nAnswer: that is the question."
    ids = AutoTokenizer.from_pretrained(out)(probe, add_special_tokens=True)["input_ids"]
    if ids[:1] != [start] or ids[1:] != tok(probe, add_special_tokens=False)["input_ids"]:
        raise DownstreamError(f"could not make the tokenizer of {ensemble} start texts with token {start}")
    return out, start


def run_lm_eval(
    base_url: str,
    model: str,
    tokenizer: Path,
    tasks: Sequence[str],
    task_dir: Path,
    limit: int | None,
    *,
    add_start_token: bool = True,
    api_key: str | None = None,
    max_length: int | None = None,
    concurrency: int = 1,
    member_weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` with `local-completions` on `base_url` (the server's root URL);
    return its results with the per-sample log.

    `tokenizer` is a folder with the tokenizer the server reads token ids with (the ensemble's,
    or its `start_token_tokenizer` copy with `add_start_token`, lm-eval's `add_bos_token`).
    With `member_weights`, every request carries them (chorus's per-request weights): the model is
    then `chorus-completions`, local-completions with that one field added to each body.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model_args: dict[str, Any] = {
        "model": model,
        "base_url": f"{base_url}/v1/completions",
        "tokenizer": str(tokenizer),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,
        "add_bos_token": add_start_token,
        "num_concurrent": concurrency,
        "max_retries": 1,
        "timeout": 600,
    }
    if api_key:
        model_args["header"] = {"Authorization": f"Bearer {api_key}"}
    if max_length is not None:
        model_args["max_length"] = max_length
    if member_weights is not None:
        _register_chorus_completions()
        model_args["member_weights"] = [float(w) for w in member_weights]
    results = simple_evaluate(
        model="local-completions" if member_weights is None else "chorus-completions",
        model_args=model_args,
        tasks=list(tasks),
        limit=limit,
        log_samples=True,
        bootstrap_iters=BOOTSTRAP_ITERS,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )
    if results is None:
        raise DownstreamError("lm-eval returned no results")
    return results


def _register_chorus_completions() -> None:
    """Register lm-eval model `chorus-completions`: `local-completions` whose request bodies also
    carry ``member_weights`` (its model argument), so a sweep needs one server, not one per weight."""
    from lm_eval.api.registry import MODEL_REGISTRY, register_model
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    if "chorus-completions" in MODEL_REGISTRY:
        return

    @register_model("chorus-completions")
    class ChorusCompletions(LocalCompletionsAPI):
        def __init__(self, member_weights: Sequence[float], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.member_weights = list(member_weights)

        def _create_payload(self, *args: Any, **kwargs: Any) -> dict:
            return {**super()._create_payload(*args, **kwargs), "member_weights": self.member_weights}


def _metric(values: dict[str, Any], name: str) -> float | None:
    value = values.get(f"{name},none")
    return None if value is None or value == "N/A" else float(value)


def summarise(results: dict[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per task: n, acc, acc_stderr, and ece (multiple choice), acc_norm, perplexity where lm-eval has them."""
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        values = results["results"][task]
        samples = results.get("samples", {}).get(task, [])
        row: dict[str, Any] = {"n": len(samples), "acc": _metric(values, "acc"),
                               "acc_stderr": _metric(values, "acc_stderr")}
        for extra in ("acc_norm", "acc_norm_stderr", "perplexity", "perplexity_stderr"):
            if (value := _metric(values, extra)) is not None:
                row[extra] = value
        if task in MULTIPLE_CHOICE and samples:
            row["ece"] = expected_calibration_error(*sample_calibration(samples))
        out[task] = row
    return out


def mean_accuracy(summary: dict[str, dict[str, Any]]) -> tuple[float, float]:
    """Mean accuracy over the tasks, and its standard error (the tasks' errors, independent)."""
    accs = [row["acc"] for row in summary.values()]
    errs = [row["acc_stderr"] or 0.0 for row in summary.values()]
    k = len(accs)
    return sum(accs) / k, math.sqrt(sum(e * e for e in errs)) / k


def markdown_table(scores: dict[str, dict[str, dict[str, Any]]], tasks: Sequence[str]) -> str:
    """Rows: scorers; columns: `acc ± stderr` per task (ECE beside it for multiple choice), the mean."""
    lines = ["| scorer | " + " | ".join(tasks) + " | mean acc |", "|---" * (len(tasks) + 2) + "|"]
    for name, summary in scores.items():
        cells = []
        for task in tasks:
            row = summary[task]
            err = "n/a" if row["acc_stderr"] is None else f"{row['acc_stderr']:.3f}"
            cell = f"{row['acc']:.3f} ± {err}"
            if "ece" in row:
                cell += f" (ECE {row['ece']:.3f})"
            cells.append(cell)
        mean, err = mean_accuracy(summary)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.3f} ± {err:.3f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- serving


def scorer_ensemble(name: str, spec: str, work_dir: Path) -> Path:
    """The ensemble folder to serve for scorer `name`: `spec` itself if it is an ensemble folder,
    else a one-member ensemble of the model folder (or `zoo:MODEL`) `spec`, built once in `work_dir`."""
    from ensemble.builder import build_ensemble
    from ensemble.manifest import MANIFEST_FILE, ManifestError, MemberSpec
    from transfer.config import resolve_model
    from transfer.errors import ConfigError

    path = Path(spec).expanduser()
    if (path / MANIFEST_FILE).is_file():
        return path
    try:
        model = resolve_model(spec)
    except (ConfigError, ValueError) as err:
        raise DownstreamError(
            f"scorer {name}: {spec} is neither an ensemble folder nor a model folder ({err})") from None
    out = work_dir / f"{name}-alone"
    if (out / MANIFEST_FILE).is_file():
        members = json.loads((out / MANIFEST_FILE).read_text()).get("members", [])
        if [(out / m.get("path", "")).resolve() for m in members] == [model.resolve()]:
            return out
    member = "".join(c for c in name if c.isascii() and (c.isalpha() or c == "_")) or "model"  # no digits
    try:
        return build_ensemble(out, [MemberSpec(member, str(model), 1.0)], name=name, overwrite=True)
    except ManifestError as err:
        raise DownstreamError(f"scorer {name}: ensemble build failed: {err}") from None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served(ensemble: Path, engine: str, log_path: Path, extra_args: Sequence[str] = (),
           startup_timeout: float = 600.0, env: Mapping[str, str] | None = None,
           ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Run `serve` on `ensemble` on a free localhost port until /health is 200; yield (root URL,
    the /v1/models card); stop the server on exit. `env` adds environment variables."""
    port = _free_port()
    cmd = [sys.executable, "-m", "server.cli", "--ensemble", str(ensemble), "--engine", engine,
           "--host", "127.0.0.1", "--port", str(port), *extra_args]
    with launched(cmd, port, log_path, startup_timeout, env, what="serve") as ready:
        yield ready


@contextlib.contextmanager
def launched(cmd: Sequence[str], port: int, log_path: Path, startup_timeout: float = 600.0,
             env: Mapping[str, str] | None = None, what: str = "the server",
             ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Run an OpenAI-compatible server command listening on localhost `port` until /health is
    200 (chorus's `serve` and vLLM's own server both have it); yield (root URL, the first
    /v1/models card); terminate it on exit. Its output goes to `log_path`."""
    import httpx

    env = {**os.environ, **(env or {})}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # vLLM would otherwise reserve most of the RAM
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if proc.poll() is not None:
                    raise DownstreamError(f"{what} exited with code {proc.returncode} before it was ready: "
                                          f"{_last_line(log_path)} (log: {log_path})")
                if time.monotonic() > deadline:
                    raise DownstreamError(f"{what} was not ready within {startup_timeout:.0f} s (log: {log_path})")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                time.sleep(1.0)
            headers = {"Authorization": f"Bearer {env['CHORUS_API_KEY']}"} if env.get("CHORUS_API_KEY") else {}
            card = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]
            yield url, card
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


# --------------------------------------------------------------------------- driver


def _scorer_arg(text: str) -> tuple[str, str]:
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, spec


def main(argv: Sequence[str] | None = None) -> int:
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
    args = p.parse_args(argv)
    try:
        tasks = check_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
        work = args.work_dir or Path(tempfile.mkdtemp(prefix="chorus-downstream-"))
        work.mkdir(parents=True, exist_ok=True)
        task_dir = render_tasks(work / "tasks", tasks)
        limit = args.limit or None
        scores: dict[str, dict[str, dict[str, Any]]] = {}
        record: dict[str, Any] = {"tasks": tasks, "limit": limit, "engine": args.engine, "ece_bins": ECE_BINS,
                                  "scorers": {}, "seconds": {}}
        for name, spec in args.scorer:
            ensemble = scorer_ensemble(name, spec, work)
            start = time.monotonic()
            print(f"[downstream] {name}: serving {ensemble} ({args.engine})", flush=True)
            tokenizer, start_id = start_token_tokenizer(ensemble, work / f"tokenizer-{name}")
            with served(ensemble, args.engine, work / f"serve-{name}.log", args.serve_arg) as (url, card):
                results = run_lm_eval(url, card["id"], tokenizer, tasks, task_dir, limit,
                                      api_key=os.environ.get("CHORUS_API_KEY"),
                                      max_length=card.get("max_model_len"), concurrency=args.concurrency)
            scores[name] = summarise(results, tasks)
            record["scorers"][name] = {"path": str(ensemble), "start_token": start_id, "tasks": scores[name]}
            record["seconds"][name] = round(time.monotonic() - start, 1)
            print(f"[downstream] {name}: done in {record['seconds'][name]:.0f} s", flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    except DownstreamError as err:
        print(f"downstream: error: {err}", file=sys.stderr)
        return 1
    print(f"\naccuracy ± standard error (ECE, {ECE_BINS} bins), first {limit or 'all'} documents per task\n")
    print(markdown_table(scores, tasks))
    if args.out:
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
