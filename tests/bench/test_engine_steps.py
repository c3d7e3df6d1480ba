"""bench/engine_steps.py's arithmetic and choices, without engines (a tiny ensemble run of it is
tests/server/test_engine_steps_bench.py, marked slow)."""

from __future__ import annotations

import pytest

from bench.engine_steps import batches, plain_args, summarise


def test_bound_and_ratio_from_the_median_round() -> None:
    runs = {"ensemble": {1: [9.0, 10.0, 30.0]}, "a alone": {1: [20.0, 18.0, 19.0]}, "b alone": {1: [19.0, 21.0, 20.0]}}
    med = summarise(runs)
    assert med["ensemble"][1] == 10.0 and med["a alone"][1] == 19.0 and med["b alone"][1] == 20.0
    assert med["bound"][1] == pytest.approx(1 / (1 / 19 + 1 / 20))
    assert med["ensemble / bound"][1] == pytest.approx(10.0 / med["bound"][1])


def test_batches_are_waves_of_random_prompts_past_the_special_ids() -> None:
    waves = batches(4, 2, 8, vocab=1200, seed=3)
    assert [len(w) for w in waves] == [4, 4]
    ids = [i for w in waves for p in w for i in p["prompt_token_ids"]]
    assert len(ids) == 64 and all(1000 <= i < 1200 for i in ids)
    assert batches(4, 2, 8, vocab=1200, seed=3) == waves  # the same prompts for every system


def test_plain_args_keep_what_chorus_chose(tmp_path) -> None:
    """The ensemble's offline engine gets exactly what differs from vLLM's defaults."""
    from vllm import AsyncEngineArgs

    args = AsyncEngineArgs(model=str(tmp_path), dtype="float32", enable_chunked_prefill=False,
                           max_num_batched_tokens=2048, enable_log_requests=True)
    kept = plain_args(args)
    assert kept == {"model": str(tmp_path), "dtype": "float32", "enable_chunked_prefill": False,
                    "max_num_batched_tokens": 2048}  # enable_log_requests: the async server's, not LLM's
