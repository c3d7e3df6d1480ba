"""vLLM's engine arguments on `serve`'s command line, parsed by vLLM's own parser.

`serve` reads its own flags first; whatever is left (e.g. ``--max-num-seqs 8
--enable-prefix-caching --scheduling-policy priority``) goes through a parser that
``vllm.AsyncEngineArgs.add_cli_args`` builds, exactly as ``vllm serve`` parses it, and the flags
the user set become ``AsyncEngineArgs`` fields for `ensemble.vllm_engine.VLLMEngineConfig`'s
``engine_args``. Flags `serve` has under the same name (``--tensor-parallel-size``, ``--dtype``,
``--max-model-len``, ``--distributed-executor-backend``, ``--served-model-name``) are `serve`'s
own and never reach vLLM's parser; the ones that cannot apply to an ensemble are refused with the
reason (`NOT_FOR_AN_ENSEMBLE`).

vLLM is imported only when there is something to parse (it takes seconds), so `serve --help` and
the torch engine stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Sequence
from typing import Any

# AsyncEngineArgs fields a user may not set on `serve`, and why (the message of the error).
NOT_FOR_AN_ENSEMBLE: dict[str, str] = {
    "model": "the model is the ensemble folder (--ensemble)",
    "tokenizer": "the tokenizer is the ensemble's own, in its folder",
    "hf_config_path": "the model config is the ensemble folder's config.json",
    "hf_overrides": "chorus passes the ensemble's manifest to vLLM through hf_overrides",
    "skip_tokenizer_init": "the server tokenizes prompts with the ensemble's tokenizer",
    "worker_extension_cls": "chorus's worker extension reads the ensemble counters back",
    "pipeline_parallel_size": "the ensemble model does not split members across pipeline stages "
                              "(docs/architecture.md, 'Parallelism'); use --tensor-parallel-size",
    "enable_lora": "LoRA adapters belong to one model; an ensemble member cannot take a vLLM LoRA request",
    "kv_cache_memory_bytes": "use --kv-cache-gib",
    "logprobs_mode": "chorus reports the pooled distribution's own log-probs (vLLM's raw_logprobs), "
                     "as the reference engine does",
    "data_parallel_size": "run one server per replica behind a load balancer (docker/README.md, "
                          "'Data parallelism')",
}
# The one value of a refused flag that changes nothing (``-pp 1``): accepted.
NEUTRAL: dict[str, Any] = {"pipeline_parallel_size": 1, "data_parallel_size": 1, "logprobs_mode": "raw_logprobs",
                           "enable_lora": False}
# Fields serve sets from its own flags: reachable through vLLM's parser only by an alias (-tp),
# an underscore spelling (--max_model_len) or CHORUS_VLLM_ARGS, and refused there.
SERVE_OWNS = {
    "tensor_parallel_size": "--tensor-parallel-size",
    "max_model_len": "--max-model-len",
    "dtype": "--dtype",
    "served_model_name": "--served-model-name",
    "distributed_executor_backend": "--distributed-executor-backend",
}


class VLLMArgsError(ValueError):
    """A vLLM engine argument `serve` cannot take; the message names it."""


def _vllm_parser() -> argparse.ArgumentParser:
    from vllm.engine.arg_utils import AsyncEngineArgs

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # older vLLM
        from vllm.utils import FlexibleArgumentParser
    parser = FlexibleArgumentParser(prog="serve", add_help=False, allow_abbrev=False)
    return AsyncEngineArgs.add_cli_args(parser)


def _given_only(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parser` with every default suppressed, so parsing returns exactly the flags given (even
    one whose value equals vLLM's default, which may not be chorus's: ``--no-enforce-eager``)."""
    for action in parser._actions:  # noqa: SLF001 - argparse keeps its actions here, no public API
        action.default = argparse.SUPPRESS
    return parser


def _one_line(stderr: str) -> str:
    """argparse's error (`serve: error: ...`) on one line: a config flag's value error spans several
    (pydantic's text, ending with a link to its docs, which is dropped)."""
    at = stderr.rfind("serve: error: ")
    if at < 0:
        return ""
    lines = stderr[at:].removeprefix("serve: error: ").splitlines()
    return " ".join(line.strip() for line in lines if line.strip() and "errors.pydantic.dev" not in line)


def vllm_help() -> str:
    """vLLM's own help for its engine arguments (what `serve --help-vllm` prints)."""
    try:
        return _vllm_parser().format_help()
    except ImportError as err:
        raise VLLMArgsError(f"vLLM is not installed ({err}): install chorus with the cpu or gpu extra") from None


def parse_vllm_args(argv: Sequence[str]) -> dict[str, Any]:
    """The ``AsyncEngineArgs`` fields that `argv` (vLLM engine flags) sets.

    Only the flags given are returned, so vLLM keeps deciding everything else. Raises
    `VLLMArgsError` for an unknown flag, a bad value, a flag in `NOT_FOR_AN_ENSEMBLE` or one of
    `SERVE_OWNS` spelled so that it reached vLLM's parser.
    """
    argv = list(argv)
    if not argv:
        return {}
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    parser = _given_only(_vllm_parser())
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parsed = parser.parse_args(argv)
    except SystemExit:
        message = _one_line(errors.getvalue()) or f"cannot parse {argv}"
        if message.startswith("unrecognized"):
            message += " (neither serve's nor vLLM's: see serve --help and serve --help-vllm)"
        raise VLLMArgsError(f"vLLM engine {message}") from None
    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    chosen = {k: v for k, v in vars(parsed).items() if k in fields}
    for name in chosen:
        flag = "--" + name.replace("_", "-")
        if name in SERVE_OWNS:
            raise VLLMArgsError(f"{flag} reached vLLM's parser (an alias, an underscore spelling or "
                                f"CHORUS_VLLM_ARGS): set it with serve's own {SERVE_OWNS[name]}")
        if name in NOT_FOR_AN_ENSEMBLE and chosen[name] != NEUTRAL.get(name, object()):
            raise VLLMArgsError(f"{flag} cannot be used with an ensemble: {NOT_FOR_AN_ENSEMBLE[name]}")
    return chosen
