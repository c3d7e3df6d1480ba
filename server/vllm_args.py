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
    "speculative_config": "vLLM's speculative decoding verifies with one target model, not a pooled ensemble",
    "enable_lora": "LoRA adapters belong to one model; an ensemble member cannot take a vLLM LoRA request",
    "kv_cache_memory_bytes": "use --kv-cache-gib",
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


def vllm_help() -> str:
    """vLLM's own help for its engine arguments (what `serve --help-vllm` prints)."""
    return _vllm_parser().format_help()


def parse_vllm_args(argv: Sequence[str]) -> dict[str, Any]:
    """The ``AsyncEngineArgs`` fields that `argv` (vLLM engine flags) sets.

    Only flags given with a value other than vLLM's default are returned, so vLLM keeps deciding
    everything else. Raises `VLLMArgsError` for an unknown flag, a bad value or a flag in
    `NOT_FOR_AN_ENSEMBLE`.
    """
    argv = list(argv)
    if not argv:
        return {}
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    parser = _vllm_parser()
    defaults = vars(parser.parse_args([]))
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parsed = parser.parse_args(argv)
    except SystemExit:
        lines = errors.getvalue().strip().splitlines()
        message = lines[-1].removeprefix("serve: error: ") if lines else f"cannot parse {argv}"
        if message.startswith("unrecognized"):
            message += " (neither serve's nor vLLM's: see serve --help and serve --help-vllm)"
        raise VLLMArgsError(f"vLLM engine {message}") from None
    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    chosen = {k: v for k, v in vars(parsed).items() if k in fields and v != defaults.get(k)}
    for name in chosen:
        if name in NOT_FOR_AN_ENSEMBLE:
            flag = "--" + name.replace("_", "-")
            raise VLLMArgsError(f"{flag} cannot be used with an ensemble: {NOT_FOR_AN_ENSEMBLE[name]}")
    return chosen
