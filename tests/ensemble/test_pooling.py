"""Unit and property tests for ensemble.pooling."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble.pooling import (
    EntropyGate, fit_vocab, gated_coefficients, mask_padded_vocab, member_entropies, normalise_weights, pool_logprobs,
)


def _logits(*shape: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@pytest.mark.parametrize("rule", ["prob_mean", "logprob_mean"])
def test_single_member_is_its_log_softmax(rule: str) -> None:
    x = _logits(5, 37)
    pooled = pool_logprobs([x], [2.5], rule)
    torch.testing.assert_close(pooled, torch.log_softmax(x, -1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rule", ["prob_mean", "logprob_mean"])
def test_model_pooled_with_itself_equals_model(rule: str) -> None:
    x = _logits(4, 50)
    pooled = pool_logprobs([x, x.clone(), x.clone()], [0.2, 0.3, 0.5], rule)
    torch.testing.assert_close(pooled, torch.log_softmax(x, -1), rtol=0, atol=1e-6)


def test_prob_mean_is_the_weighted_mixture() -> None:
    a, b = _logits(3, 20, seed=1), _logits(3, 20, seed=2)
    pooled = pool_logprobs([a, b], [3.0, 1.0], "prob_mean")
    expected = torch.log(0.75 * torch.softmax(a, -1) + 0.25 * torch.softmax(b, -1))
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-6)


def test_logprob_mean_is_the_normalised_geometric_mean() -> None:
    a, b = _logits(3, 20, seed=1), _logits(3, 20, seed=2)
    pooled = pool_logprobs([a, b], [1.0, 3.0], "logprob_mean")
    expected = torch.log_softmax(0.25 * torch.log_softmax(a, -1) + 0.75 * torch.log_softmax(b, -1), -1)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-6)


def test_negative_weights_contrastive_logprob_mean() -> None:
    expert, amateur = _logits(2, 30, seed=3), _logits(2, 30, seed=4)
    pooled = pool_logprobs([expert, amateur], [1.5, -0.5], "logprob_mean", alpha=0.0)
    expected = torch.log_softmax(
        1.5 * torch.log_softmax(expert, -1) - 0.5 * torch.log_softmax(amateur, -1), -1
    )
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-5)


def test_contrastive_pooling_keeps_only_tokens_the_positive_members_find_plausible() -> None:
    """Li et al.'s adaptive plausibility constraint: without it, a token the expert finds
    implausible wins because the amateur dislikes it even more."""
    expert = torch.tensor([[-6.0, 4.0, 3.5, 0.0, -1.0]])
    amateur = torch.tensor([[-30.0, 4.0, 3.0, 0.0, -1.0]])
    unmasked = pool_logprobs([expert, amateur], [1.5, -0.5], "logprob_mean", alpha=0.0)
    assert int(unmasked.argmax()) == 0  # the implausible token wins
    pooled = pool_logprobs([expert, amateur], [1.5, -0.5], "logprob_mean")  # default alpha 0.1
    p_expert = torch.softmax(expert, -1)
    plausible = p_expert >= 0.1 * p_expert.max()
    assert plausible.tolist() == [[False, True, True, False, False]]
    assert torch.isneginf(pooled[~plausible]).all()
    expected = torch.log_softmax(unmasked.masked_fill(~plausible, float("-inf")), -1)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-6)
    assert int(pooled.argmax()) == 1
    # Rows without a negative weight are not masked, whatever alpha is.
    rows = torch.tensor([[1.5, -0.5], [0.5, 0.5]])
    both = pool_logprobs([expert.repeat(2, 1), amateur.repeat(2, 1)], rows, "logprob_mean", alpha=0.5)
    assert torch.isfinite(both[1]).all() and torch.isneginf(both[0]).sum() == 3
    for bad in (-0.1, 1.0, float("nan"), True):
        with pytest.raises(ValueError, match="alpha must be a number in"):
            pool_logprobs([expert, amateur], [1.5, -0.5], "logprob_mean", alpha=bad)


@pytest.mark.parametrize("rule", ["prob_mean", "logprob_mean"])
def test_a_member_that_cannot_score_a_token_abstains_on_it(rule: str) -> None:
    """Member b's tokenizer lacks id 3 (say an end-of-turn token): it is pooled over member a
    alone, so the ensemble can still produce it; ids no member has stay -inf."""
    a, b = _logits(4, 12, seed=21), _logits(4, 12, seed=22)
    b[:, 3] = float("-inf")
    a[:, 11], b[:, 11] = float("-inf"), float("-inf")
    pooled = pool_logprobs([a, b], [1.0, 3.0], rule)  # type: ignore[arg-type]
    assert torch.isfinite(pooled[:, :11]).all() and torch.isneginf(pooled[:, 11]).all()
    torch.testing.assert_close(pooled.exp().sum(-1), torch.ones(4), rtol=0, atol=1e-5)
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    if rule == "prob_mean":
        unnormalised = torch.log(0.25 * la.exp() + 0.75 * lb.exp())
    else:
        unnormalised = 0.25 * la + 0.75 * lb
    unnormalised[:, 3] = la[:, 3]  # pooled over the one member that scores it, at its full weight
    torch.testing.assert_close(pooled, torch.log_softmax(unnormalised, -1), rtol=0, atol=1e-5)
    # A token only a negative-weight member could score has no positive evidence: ruled out.
    if rule == "logprob_mean":
        c = _logits(4, 12, seed=23)
        c[:, 5] = float("-inf")
        pooled = pool_logprobs([c, a], [1.5, -0.5], rule, alpha=0.0)
        assert torch.isneginf(pooled[:, 5]).all() and torch.isfinite(pooled[:, [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]]).all()


def test_negative_weights_rejected_for_prob_mean() -> None:
    x = _logits(2, 10)
    with pytest.raises(ValueError, match="negative weights are only allowed with pooling 'logprob_mean'"):
        pool_logprobs([x, x], [1.5, -0.5], "prob_mean")


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0], "shape"),
        ([1.0, float("nan")], "finite"),
        ([1.0, float("inf")], "finite"),
        ([0.0, 0.0], "sum to a positive"),
        ([1.0, -1.0], "sum to a positive"),
    ],
)
def test_bad_weights_have_clear_errors(weights: list[float], message: str) -> None:
    x = _logits(2, 10)
    with pytest.raises(ValueError, match=message):
        pool_logprobs([x, x], weights, "logprob_mean")


def test_bad_rule_shapes_and_temperatures() -> None:
    x = _logits(2, 10)
    with pytest.raises(ValueError, match="unknown pooling rule"):
        pool_logprobs([x], [1.0], "max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fit every member"):
        pool_logprobs([x, _logits(2, 11)], [1.0, 1.0])
    with pytest.raises(ValueError, match="at least one"):
        pool_logprobs([], [])
    with pytest.raises(ValueError, match="temperatures"):
        pool_logprobs([x], [1.0], temperatures=[0.0])


def test_zero_weight_member_is_ignored() -> None:
    a, b = _logits(3, 16, seed=5), _logits(3, 16, seed=6)
    b[:, 3] = float("-inf")  # would veto token 3 if b counted
    for rule in ("prob_mean", "logprob_mean"):
        pooled = pool_logprobs([a, b], [1.0, 0.0], rule)  # type: ignore[arg-type]
        torch.testing.assert_close(pooled, torch.log_softmax(a, -1), rtol=0, atol=1e-6)


def test_member_temperatures() -> None:
    a, b = _logits(3, 16, seed=7), _logits(3, 16, seed=8)
    pooled = pool_logprobs([a, b], [1.0, 1.0], "prob_mean", temperatures=[0.5, 2.0])
    expected = pool_logprobs([a / 0.5, b / 2.0], [1.0, 1.0], "prob_mean")
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-6)


def test_per_row_weights_match_rowwise_pooling() -> None:
    a, b = _logits(4, 25, seed=9), _logits(4, 25, seed=10)
    rows = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.1, 0.9], [2.0, 6.0]])
    for rule in ("prob_mean", "logprob_mean"):
        pooled = pool_logprobs([a, b], rows, rule, chunk_size=3)  # type: ignore[arg-type]
        for i in range(4):
            one = pool_logprobs([a[i : i + 1], b[i : i + 1]], rows[i].tolist(), rule)  # type: ignore[arg-type]
            # One set of non-negative logprob_mean weights takes the one-softmax path, per-row
            # weights the member-by-member one: equal up to float32 rounding.
            torch.testing.assert_close(pooled[i : i + 1], one, rtol=0, atol=0 if rule == "prob_mean" else 2e-6)
    with pytest.raises(ValueError, match="rows"):
        pool_logprobs([a, b], rows[:3], "prob_mean")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["prob_mean", "logprob_mean"])
def test_half_precision_input_matches_float32(dtype: torch.dtype, rule: str) -> None:
    a, b = _logits(6, 300, seed=11).to(dtype), _logits(6, 300, seed=12).to(dtype)
    pooled = pool_logprobs([a, b], [0.3, 0.7], rule)  # type: ignore[arg-type]
    assert pooled.dtype == torch.float32
    # Same values upcast first: the half inputs are exact in float32, so this is tight.
    reference = pool_logprobs([a.float(), b.float()], [0.3, 0.7], rule)  # type: ignore[arg-type]
    torch.testing.assert_close(pooled, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rule", ["prob_mean", "logprob_mean"])
def test_chunked_equals_unchunked(rule: str) -> None:
    members = [_logits(23, 40, seed=s) for s in range(3)]
    whole = pool_logprobs(members, [1.0, 2.0, 3.0], rule, chunk_size=1000)  # type: ignore[arg-type]
    for chunk in (1, 4, 7, 23):
        chunked = pool_logprobs(members, [1.0, 2.0, 3.0], rule, chunk_size=chunk)  # type: ignore[arg-type]
        torch.testing.assert_close(chunked, whole, rtol=0, atol=0)


def test_masked_padding_never_gets_mass() -> None:
    a = mask_padded_vocab(_logits(3, 12, seed=13), 10)
    b = mask_padded_vocab(_logits(3, 12, seed=14), 10)
    assert torch.isneginf(a[:, 10:]).all() and torch.isfinite(a[:, :10]).all()
    for rule in ("prob_mean", "logprob_mean"):
        pooled = pool_logprobs([a, b], [1.0, 1.0], rule)  # type: ignore[arg-type]
        assert torch.isneginf(pooled[:, 10:]).all()
        torch.testing.assert_close(pooled.exp().sum(-1), torch.ones(3), rtol=0, atol=1e-5)


def test_fit_vocab_slices_and_pads() -> None:
    x = _logits(2, 8)
    assert fit_vocab(x, 8) is x
    torch.testing.assert_close(fit_vocab(x, 5), x[:, :5])
    padded = fit_vocab(x, 11)
    assert padded.shape == (2, 11)
    torch.testing.assert_close(padded[:, :8], x)
    assert torch.isneginf(padded[:, 8:]).all()


def test_normalise_weights_sums_to_one() -> None:
    w = normalise_weights([2.0, 6.0], 2, "prob_mean")
    torch.testing.assert_close(w, torch.tensor([0.25, 0.75]))


# ----------------------------------------------------------------------------- properties

_members = st.integers(1, 4)
_rows = st.integers(1, 5)
_vocab = st.integers(2, 40)


@st.composite
def _pool_case(draw: st.DrawFn) -> tuple[list[torch.Tensor], list[float]]:
    k, n, v = draw(_members), draw(_rows), draw(_vocab)
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(0.1, 20.0))
    logits = [_logits(n, v, seed=seed + i, scale=scale) for i in range(k)]
    weights = draw(st.lists(st.floats(0.01, 10.0), min_size=k, max_size=k))
    return logits, weights


@settings(max_examples=60, deadline=None)
@given(_pool_case(), st.sampled_from(["prob_mean", "logprob_mean"]))
def test_property_rows_are_normalised(case: tuple[list[torch.Tensor], list[float]], rule: str) -> None:
    logits, weights = case
    pooled = pool_logprobs(logits, weights, rule)  # type: ignore[arg-type]
    assert pooled.dtype == torch.float32 and pooled.shape == logits[0].shape
    assert torch.isfinite(pooled).all()
    total = torch.logsumexp(pooled, dim=-1)
    assert total.abs().max().item() < 1e-5


@settings(max_examples=60, deadline=None)
@given(_pool_case())
def test_property_prob_mean_between_member_min_and_max(case: tuple[list[torch.Tensor], list[float]]) -> None:
    logits, weights = case
    pooled = pool_logprobs(logits, weights, "prob_mean").exp()
    probs = torch.stack([torch.softmax(x, -1) for x in logits])
    assert (pooled >= probs.min(0).values - 1e-6).all()
    assert (pooled <= probs.max(0).values + 1e-6).all()


@settings(max_examples=60, deadline=None)
@given(_pool_case(), st.sampled_from(["prob_mean", "logprob_mean"]), st.floats(0.1, 100.0))
def test_property_weights_are_relative(
    case: tuple[list[torch.Tensor], list[float]], rule: str, factor: float
) -> None:
    logits, weights = case
    base = pool_logprobs(logits, weights, rule)  # type: ignore[arg-type]
    scaled = pool_logprobs(logits, [w * factor for w in weights], rule)  # type: ignore[arg-type]
    torch.testing.assert_close(scaled, base, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(_pool_case(), st.sampled_from(["prob_mean", "logprob_mean"]), st.data())
def test_property_member_order_does_not_matter(
    case: tuple[list[torch.Tensor], list[float]], rule: str, data: st.DataObject
) -> None:
    logits, weights = case
    order = data.draw(st.permutations(range(len(logits))))
    base = pool_logprobs(logits, weights, rule)  # type: ignore[arg-type]
    permuted = pool_logprobs([logits[i] for i in order], [weights[i] for i in order], rule)  # type: ignore[arg-type]
    torch.testing.assert_close(permuted, base, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(_pool_case())
def test_property_geometric_pool_is_below_linear_pool_normaliser(
    case: tuple[list[torch.Tensor], list[float]]
) -> None:
    # Weighted AM-GM: sum_v prod_k p_k(v)^w_k <= sum_v sum_k w_k p_k(v) = 1, so the unnormalised
    # geometric scores never exceed the (normalised) linear pool's total mass.
    logits, weights = case
    w = normalise_weights(weights, len(logits), "logprob_mean")
    scores = sum(wk * torch.log_softmax(x, -1) for wk, x in zip(w.tolist(), logits))
    assert torch.logsumexp(scores, -1).max().item() <= 1e-5
    assert math.isfinite(float(pool_logprobs(logits, weights, "logprob_mean").max()))


def test_geometric_fast_path_equals_the_general_pool() -> None:
    """logprob_mean with non-negative weights pools raw logits once (the members' normalisers
    cancel in the final log_softmax): equal to the member-by-member pool, zero-weight members
    skipped, chunked or not; a member that abstains on a token falls back to the general path."""
    from ensemble.pooling import _pool_rows, member_logprobs, normalise_weights

    torch.manual_seed(3)
    logits = [torch.randn(9, 500) * 4 for _ in range(3)]
    temps = [1.0, 1.3, 0.7]
    for weights in ([0.5, 0.3, 0.2], [2.0, 0.0, 1.0]):
        stacked = torch.stack([member_logprobs(x, t) for x, t in zip(logits, temps)])
        general = _pool_rows(stacked, normalise_weights(weights, 3, "logprob_mean"), "logprob_mean")
        for chunk in (8192, 4):
            fast = pool_logprobs(logits, weights, "logprob_mean", temps, chunk_size=chunk)
            assert torch.allclose(fast, general, atol=1e-5)
    holed = [x.clone() for x in logits]
    holed[1][2, 7] = float("-inf")  # member 1 cannot score token 7 in row 2: it abstains there
    pooled = pool_logprobs(holed, [0.5, 0.3, 0.2], "logprob_mean", temps)
    assert torch.isfinite(pooled).all()
    stacked = torch.stack([member_logprobs(x, t) for x, t in zip(holed, temps)])
    assert torch.allclose(pooled, _pool_rows(stacked, normalise_weights([0.5, 0.3, 0.2], 3, "logprob_mean"),
                                             "logprob_mean"), atol=1e-5)


def test_member_entropies_ignore_masked_ids() -> None:
    x = _logits(3, 40)
    masked = x.clone()
    masked[:, 30:] = -math.inf
    for logits in (x, masked):
        lp = torch.log_softmax(logits[:, :30] if logits is masked else logits, -1)
        torch.testing.assert_close(member_entropies([logits])[:, 0], -(lp.exp() * lp).sum(-1), rtol=0, atol=1e-5)


def test_entropy_gate_scales_each_weight_by_the_members_entropies() -> None:
    """The gated pool is log_softmax(sum_k c_rk x_k) with c_rk = (w_k / T_k)(1 + sum_j S_kj (H_rj - h_j)),
    floored at 0; zero slopes are the plain pool, and prob_mean ignores the gate."""
    xs = [_logits(6, 50, seed=1), _logits(6, 50, seed=2, scale=1.0)]
    w, temps = [0.7, 0.3], [1.2, 0.8]
    gate = EntropyGate((1.0, 3.4), ((0.05, -8.0), (0.2, 0.0)))
    h = member_entropies(xs)
    c = (torch.tensor(w) / torch.tensor(temps)) * (1 + (h - torch.tensor([1.0, 3.4])) @ torch.tensor(gate.slopes).t())
    assert (c < 0).any() and (c > 0).any()
    expected = torch.log_softmax(c[:, :1].clamp_min(0) * xs[0] + c[:, 1:].clamp_min(0) * xs[1], -1)
    pooled = pool_logprobs(xs, w, "logprob_mean", temps, gate=gate)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=2e-6)
    assert not torch.allclose(pooled, pool_logprobs(xs, w, "logprob_mean", temps), atol=1e-3)
    zero = pool_logprobs(xs, w, "logprob_mean", temps, gate=EntropyGate((1.0, 1.0), ((0.0, 0.0), (0.0, 0.0))))
    torch.testing.assert_close(zero, pool_logprobs(xs, w, "logprob_mean", temps), rtol=0, atol=2e-6)
    assert torch.equal(pool_logprobs(xs, w, "prob_mean", temps, gate=gate), pool_logprobs(xs, w, "prob_mean", temps))
    # Chunked rows, per-row weights and an abstaining member take the same path's numbers.
    torch.testing.assert_close(pool_logprobs(xs, w, "logprob_mean", temps, chunk_size=4, gate=gate), pooled,
                               rtol=0, atol=2e-6)
    rows = torch.tensor([w] * 6)
    torch.testing.assert_close(pool_logprobs(xs, rows, "logprob_mean", temps, gate=gate), pooled, rtol=0, atol=2e-6)


def test_entropy_gate_applies_row_by_row_beside_contrastive_rows() -> None:
    """Per-row weights with some rows contrastive (one batch of requests with their own weights):
    every row is pooled as if alone, gated unless its own weights hold a negative one."""
    xs = [_logits(6, 50, seed=5), _logits(6, 50, seed=6, scale=1.0)]
    temps, gate = [1.2, 0.8], EntropyGate((1.0, 3.4), ((0.05, -8.0), (0.2, 0.0)))
    own, contrastive = [0.7, 0.3], [1.5, -0.5]
    rows = torch.tensor([own, contrastive, own, own, contrastive, own])
    pooled = pool_logprobs(xs, rows, "logprob_mean", temps, gate=gate)
    for r, w in enumerate(rows.tolist()):
        alone = pool_logprobs([x[r:r + 1] for x in xs], w, "logprob_mean", temps, gate=gate)
        torch.testing.assert_close(pooled[r:r + 1], alone, rtol=0, atol=2e-6)
    ungated = pool_logprobs(xs, rows, "logprob_mean", temps)
    assert not torch.allclose(pooled[0], ungated[0], atol=1e-3)  # the gate still acts on the plain rows
    torch.testing.assert_close(pooled[1], ungated[1], rtol=0, atol=2e-6)


def test_entropy_gate_with_an_abstaining_member_pools_over_the_voters() -> None:
    xs = [_logits(4, 30, seed=3), _logits(4, 30, seed=4)]
    xs[1][:, 29] = -math.inf  # member 1 cannot score id 29
    w, temps, gate = [0.5, 0.5], [1.0, 1.5], EntropyGate((2.0, 2.0), ((0.1, 0.0), (0.0, -0.05)))
    pooled = pool_logprobs(xs, w, "logprob_mean", temps, gate=gate)
    assert torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled.exp().sum(-1), torch.ones(4), rtol=0, atol=1e-5)
    # Off the abstained id the tokens keep the gated geometric pool's ratios.
    c = gated_coefficients(torch.tensor(w) / torch.tensor(temps), gate, member_entropies(xs))
    scores = c[:, :1] * xs[0][:, :29] + c[:, 1:] * xs[1][:, :29]
    torch.testing.assert_close(pooled[:, :29] - pooled[:, :1], scores - scores[:, :1], rtol=0, atol=1e-4)


def test_gated_coefficients_floor_at_zero_and_keep_a_dead_row() -> None:
    base = torch.tensor([0.6, 0.4])
    h = torch.tensor([[1.0, 1.0], [10.0, 10.0]])
    c = gated_coefficients(base, EntropyGate((0.0, 0.0), ((-0.5, 0.0), (0.0, 0.0))), h)
    torch.testing.assert_close(c[0], torch.tensor([0.3, 0.4]))
    assert c[1].tolist() == pytest.approx([0.0, 0.4])
    dead = gated_coefficients(base, EntropyGate((0.0, 0.0), ((-1.0, 0.0), (-1.0, 0.0))), h)
    torch.testing.assert_close(dead[1], base)


def test_entropy_gate_validation() -> None:
    with pytest.raises(ValueError, match="K centres and K x K slopes"):
        EntropyGate((1.0, 2.0), ((0.0,),))
    with pytest.raises(ValueError, match="finite numbers"):
        EntropyGate((math.inf,), ((0.0,),))
    with pytest.raises(ValueError, match="the entropy gate is for 1 members, the logits come from 2"):
        pool_logprobs([_logits(2, 5), _logits(2, 5)], [1, 1], "logprob_mean", gate=EntropyGate((1.0,), ((0.5,),)))


def test_a_reused_scratch_changes_nothing_and_its_result_lasts_until_the_next_call() -> None:
    from ensemble.pooling import Scratch

    scratch = Scratch()
    xs = [_logits(3, 40, seed=5), _logits(3, 40, seed=6)]
    first = pool_logprobs(xs, [0.6, 0.4], "logprob_mean", [1.1, 0.9], scratch=scratch)
    torch.testing.assert_close(first, pool_logprobs(xs, [0.6, 0.4], "logprob_mean", [1.1, 0.9]), rtol=0, atol=0)
    # A larger and a smaller call reuse (and grow) the buffers, each result equal to a fresh pool's.
    for rows, seed in ((5, 7), (1, 9)):
        ys = [_logits(rows, 40, seed=seed), _logits(rows, 40, seed=seed + 1)]
        torch.testing.assert_close(pool_logprobs(ys, [1, 1], "logprob_mean", scratch=scratch),
                                   pool_logprobs(ys, [1, 1], "logprob_mean"), rtol=0, atol=0)
    # The result is the scratch's own buffer (no fresh [N, V] tensor per call), not its sum buffer.
    again = pool_logprobs(xs, [0.6, 0.4], "logprob_mean", [1.1, 0.9], scratch=scratch)
    assert again.data_ptr() == scratch.take((3, 40), "cpu", "pooled").data_ptr()
    assert again.data_ptr() != scratch.take((3, 40), "cpu").data_ptr()
    # Past its limit a scratch hands out fresh tensors and keeps its buffers as they were.
    bounded = Scratch(limit=3 * 40)
    kept = bounded.take((3, 40), "cpu")
    assert bounded.take((3, 40), "cpu").data_ptr() == kept.data_ptr()
    assert bounded.take((4, 40), "cpu").data_ptr() != kept.data_ptr()
    assert bounded.take((2, 40), "cpu").data_ptr() == kept.data_ptr()

def test_geometric_logits_normalise_to_the_geometric_pool() -> None:
    """Unnormalised, their log_softmax is the geometric pool; with a scratch they are its sum buffer."""
    from ensemble.pooling import Scratch, geometric_logits

    xs = [_logits(4, 50, seed=21), _logits(4, 50, seed=22), _logits(4, 50, seed=23)]
    weights, temps = [0.5, 0.2, 0.3], [1.1, 0.9, 1.0]
    scratch = Scratch()
    raw = geometric_logits(xs, weights, temps, scratch=scratch)
    expected = pool_logprobs(xs, weights, "logprob_mean", temps)
    torch.testing.assert_close(torch.log_softmax(raw, dim=-1), expected, rtol=0, atol=1e-5)
    assert raw.data_ptr() == scratch.take((4, 50), "cpu").data_ptr()
    assert not torch.allclose(torch.logsumexp(raw, dim=-1), torch.zeros(4))  # not normalised
    # A weight of 0 drops its member (even one that abstains); negative weights are refused.
    holed = xs[2].clone()
    holed[:, 7] = float("-inf")
    torch.testing.assert_close(torch.log_softmax(geometric_logits([xs[0], xs[1], holed], [1, 1, 0]), dim=-1),
                               pool_logprobs(xs[:2], [1, 1], "logprob_mean"), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="non-negative weights"):
        geometric_logits(xs[:2], [1.5, -0.5])


def test_geometric_coefficients_are_normalised_weights_over_temperatures() -> None:
    """What the vLLM model's scaled heads multiply each member's hidden state by."""
    from ensemble.pooling import geometric_coefficients

    assert geometric_coefficients([3.0, 1.0], [1.5, 0.5]) == pytest.approx([0.5, 0.5])
    assert geometric_coefficients([1.0, 1.0, 0.0]) == pytest.approx([0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="non-negative weights"):
        geometric_coefficients([1.5, -0.5])
    with pytest.raises(ValueError, match="temperatures"):
        geometric_coefficients([1.0, 1.0], [1.0, 0.0])
