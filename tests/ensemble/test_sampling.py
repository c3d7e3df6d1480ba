"""Unit tests for ensemble.sampling (pure functions over one pooled row)."""

from __future__ import annotations

import math

import pytest
import torch

from ensemble.protocol import EngineRequestError, SamplingOptions
from ensemble.sampling import (
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    check_options,
    sample_token,
    top_logprobs,
)


def _row(probs: list[float]) -> torch.Tensor:
    return torch.log(torch.tensor(probs, dtype=torch.float32))


def test_greedy_is_argmax_and_ignores_the_generator() -> None:
    row = _row([0.1, 0.5, 0.4])
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        assert sample_token(row, SamplingOptions(temperature=0.0), (), g) == 1


def test_penalties_follow_vllm_formula() -> None:
    scores = torch.zeros(4)
    out = apply_penalties(scores, [1, 1, 3], presence=0.5, frequency=0.25)
    torch.testing.assert_close(out, torch.tensor([0.0, -1.0, 0.0, -0.75]))
    assert apply_penalties(scores, [], 1.0, 1.0) is scores
    # A frequency penalty can turn greedy decoding away from a repeated token.
    row = _row([0.3, 0.7])
    assert sample_token(row, SamplingOptions(temperature=0.0), [1, 1]) == 1
    assert sample_token(row, SamplingOptions(temperature=0.0, frequency_penalty=1.0), [1, 1]) == 0


def test_top_k_keeps_the_k_best() -> None:
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0])
    out = apply_top_k(logits, 2)
    assert torch.isfinite(out).tolist() == [False, True, True, False]
    assert apply_top_k(logits, 0) is logits and apply_top_k(logits, -1) is logits


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = _row([0.5, 0.3, 0.15, 0.05])
    assert torch.isfinite(apply_top_p(logits, 0.7)).tolist() == [True, True, False, False]
    assert torch.isfinite(apply_top_p(logits, 0.81)).tolist() == [True, True, True, False]
    assert torch.isfinite(apply_top_p(logits, 0.01)).tolist() == [True, False, False, False]


def test_min_p_drops_unlikely_tokens() -> None:
    logits = _row([0.6, 0.3, 0.1])
    assert torch.isfinite(apply_min_p(logits, 0.4)).tolist() == [True, True, False]
    assert apply_min_p(logits, 0.0) is logits


def test_seeded_sampling_is_reproducible_and_follows_the_distribution() -> None:
    row = _row([0.2, 0.5, 0.3])
    options = SamplingOptions(temperature=1.0)

    def draws(seed: int, count: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [sample_token(row, options, (), g) for _ in range(count)]

    assert draws(7, 50) == draws(7, 50)
    assert draws(7, 50) != draws(8, 50)
    counts = torch.bincount(torch.tensor(draws(0, 3000)), minlength=3).float() / 3000
    torch.testing.assert_close(counts, torch.tensor([0.2, 0.5, 0.3]), rtol=0, atol=0.04)


def test_filters_restrict_what_is_sampled() -> None:
    row = _row([0.05, 0.6, 0.3, 0.05])
    g = torch.Generator().manual_seed(0)
    assert {sample_token(row, SamplingOptions(top_k=1), (), g) for _ in range(50)} == {1}
    assert {sample_token(row, SamplingOptions(top_p=0.85), (), g) for _ in range(200)} == {1, 2}
    assert {sample_token(row, SamplingOptions(min_p=0.4), (), g) for _ in range(200)} == {1, 2}
    # Low temperature sharpens: almost always the mode.
    picks = [sample_token(row, SamplingOptions(temperature=0.05), (), g) for _ in range(100)]
    assert picks.count(1) >= 99


def test_logit_bias_comes_before_the_penalties() -> None:
    """vLLM's order: the bias is added to the pooled scores, then the penalties apply."""
    scores = torch.log_softmax(torch.tensor([3.0, 2.0, 1.0, 0.0]), -1)
    assert sample_token(scores, SamplingOptions(temperature=0.0)) == 0
    assert sample_token(scores, SamplingOptions(temperature=0.0, logit_bias=((3, 100.0),))) == 3
    assert sample_token(scores, SamplingOptions(temperature=0.0, logit_bias=((0, -100.0), (1, -100.0)))) == 2
    # +1.5 makes token 1 win, unless a frequency penalty of 2 for having said it already takes it back
    biased = SamplingOptions(temperature=0.0, logit_bias=((1, 1.5),), frequency_penalty=2.0)
    assert sample_token(scores, biased) == 1
    assert sample_token(scores, biased, output_token_ids=[1]) == 0
    with pytest.raises(EngineRequestError, match="logit_bias holds token id 4"):
        check_options(SamplingOptions(logit_bias=((4, 1.0),)), vocab_size=4)
    with pytest.raises(EngineRequestError, match="twice"):
        check_options(SamplingOptions(logit_bias=((1, 1.0), (1, 2.0))), vocab_size=4)
    # the bias is added before the division by the temperature: 20,000 seeded draws at T=2 follow
    # softmax((scores + bias) / 2) within 1.5 points (bias after the division would give token 3
    # about twice the odds)
    gen = torch.Generator().manual_seed(0)
    hot = [sample_token(scores, SamplingOptions(temperature=2.0, logit_bias=((3, 2.0),)), generator=gen)
           for _ in range(20_000)]
    want = torch.softmax((scores + torch.tensor([0.0, 0.0, 0.0, 2.0])) / 2.0, -1)
    for token in range(4):
        assert hot.count(token) / len(hot) == pytest.approx(float(want[token]), abs=0.015)


def test_top_logprobs() -> None:
    row = _row([0.1, 0.6, 0.3])
    top = top_logprobs(row, 2)
    assert [i for i, _ in top] == [1, 2]
    assert math.isclose(top[0][1], math.log(0.6), rel_tol=1e-6)
    assert top_logprobs(row, 0) == []
    assert len(top_logprobs(row, 10)) == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (SamplingOptions(n=0), "n must be at least 1"),
        (SamplingOptions(max_tokens=0), "max_tokens"),
        (SamplingOptions(temperature=-1.0), "temperature"),
        (SamplingOptions(top_p=0.0), "top_p"),
        (SamplingOptions(top_k=-2), "top_k"),
        (SamplingOptions(min_p=1.5), "min_p"),
        (SamplingOptions(presence_penalty=3.0), "presence_penalty"),
        (SamplingOptions(logprobs=21), "logprobs"),
        (SamplingOptions(prompt_logprobs=-1), "prompt_logprobs"),
        (SamplingOptions(stop_token_ids=(100,)), "outside the vocabulary"),
        (SamplingOptions(stop=("",)), "non-empty"),
    ],
)
def test_check_options_messages(options: SamplingOptions, message: str) -> None:
    with pytest.raises(EngineRequestError, match=message):
        check_options(options, vocab_size=100)
    check_options(SamplingOptions(top_k=-1, logprobs=20, stop=("x",), stop_token_ids=(99,)), vocab_size=100)
