"""Driving EleutherAI's lm-evaluation-harness against a served ensemble: the tokenizer copy it
reads token ids with (the start token in front of every text) and its `simple_evaluate` with the
`local-completions` model (or `chorus-completions`, which adds per-request member weights)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.errors import DownstreamError

BOOTSTRAP_ITERS = 1000  # lm-eval's bootstrap for LAMBADA's perplexity error (its default, 100,000, takes minutes)


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

    model_args = _model_args(base_url, model, tokenizer, add_start_token, api_key, max_length, concurrency)
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


def _model_args(base_url: str, model: str, tokenizer: Path, add_start_token: bool, api_key: str | None,
                max_length: int | None, concurrency: int) -> dict[str, Any]:
    """`local-completions`'s arguments: token-id requests to `/v1/completions`, one retry."""
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
    return model_args


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
