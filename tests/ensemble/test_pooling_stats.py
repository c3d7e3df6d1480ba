"""PoolingCounters: rows, per-member agreement with the pooled top-1, steps, time, reset."""

from __future__ import annotations

import threading

import pytest
import torch

from ensemble.pooling import pool_logprobs
from ensemble.pooling_stats import PoolingCounters, driver_snapshot, row_argmax


def _logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_agreement_is_with_the_pooled_top_token() -> None:
    a = _logits([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])  # top-1: 0, 1, 2
    b = _logits([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])  # top-1: 1, 1, 0
    pooled = pool_logprobs([a, b], [1.0, 3.0])  # b dominates: pooled top-1 is b's on every row
    assert pooled.argmax(dim=-1).tolist() == [1, 1, 0]
    counters = PoolingCounters(["a", "b"])
    counters.record([a, b], pooled, seconds=0.25)
    counters.record([a[:1], b[:1]], pooled[:1], seconds=0.5)
    assert counters.snapshot() == {
        "pooled_tokens": 4,
        "agreement_rows": 4,
        "member_agreement": {"a": 1, "b": 4},  # a agrees only on row 1
        "pooling_seconds": 0.75,
        "pooling_steps": 2,
    }


@pytest.mark.parametrize("vocab", [5, 2048, 3000, 152064])
def test_row_argmax_is_torch_argmax(vocab: int) -> None:
    """Whole blocks, a tail, too few ids for blocks; ties (the first maximum), infinities, NaN."""
    g = torch.Generator().manual_seed(vocab)
    for x in (torch.randn(6, vocab, generator=g), torch.randint(0, 3, (6, vocab), generator=g).float(),
              torch.zeros(0, vocab)):
        assert torch.equal(row_argmax(x), x.argmax(dim=-1))
    x = torch.randn(5, vocab, generator=g)
    x[0, vocab - 1] = float("nan")  # NaN in the tail (or the last block)
    x[1, 1] = float("nan")
    x[1, vocab - 1] = float("nan")  # NaN in a block and in the tail: the first
    x[2] = float("-inf")
    x[3, vocab // 2] = float("inf")
    x[4, vocab - 1] = x[4].max() + 1  # the maximum in the tail
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))
    with pytest.raises(ValueError, match="2-D"):
        row_argmax(torch.zeros(3))


def test_timed_pool_counts_the_members_before_the_pool_writes_over_them() -> None:
    """The vLLM model's scaled heads sum the members' logits into the first member's tensor."""
    a, b = torch.zeros(3, 6), torch.zeros(3, 6)
    a[:, 1] = 5.0  # member a: id 1 everywhere
    b[:, 4] = 9.0  # member b: id 4 everywhere, and the sum's top
    counters = PoolingCounters(["a", "b"])
    pooled = counters.timed_pool([a, b], lambda: a.add_(b))
    assert pooled.data_ptr() == a.data_ptr()
    assert counters.snapshot()["member_agreement"] == {"a": 0, "b": 3}


def test_rows_pooled_inside_the_heads_count_rows_only() -> None:
    """The vLLM model's fused head computes no member's logits and no pool of its own: its rows
    count; agreement and pooling time come from the other steps."""
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    counters = PoolingCounters(["a", "b"])
    counters.timed_pool([a, b], lambda: a + b)
    counters.count_rows(3)
    snap = counters.snapshot()
    assert snap["pooled_tokens"] == 7 and snap["agreement_rows"] == 4 and snap["pooling_steps"] == 1
    assert all(0 <= n <= 4 for n in snap["member_agreement"].values())


def test_timed_pool_returns_the_pool_and_measures_it() -> None:
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    counters = PoolingCounters(["a", "b"])
    pooled = counters.timed_pool([a, b], lambda: pool_logprobs([a, b], [1.0, 1.0]))
    torch.testing.assert_close(pooled, pool_logprobs([a, b], [1.0, 1.0]))
    snap = counters.snapshot()
    assert snap["pooled_tokens"] == 5 and snap["pooling_steps"] == 1 and snap["pooling_seconds"] > 0.0


def test_reset_and_empty_calls() -> None:
    counters = PoolingCounters(["x"])
    assert counters.snapshot() == {"pooled_tokens": 0, "agreement_rows": 0, "member_agreement": {"x": 0},
                                   "pooling_seconds": 0.0, "pooling_steps": 0}
    x = torch.randn(3, 4)
    counters.record([x], torch.log_softmax(x, dim=-1), seconds=1.0)
    counters.record([x[:0]], x[:0], seconds=9.0)  # no rows: not a pooling step
    assert counters.snapshot(reset=True)["member_agreement"] == {"x": 3}
    assert counters.snapshot()["pooled_tokens"] == 0 and counters.snapshot()["pooling_steps"] == 0


def test_wrong_member_count_is_refused() -> None:
    with pytest.raises(ValueError, match="expected 2 members"):
        PoolingCounters(["a", "b"]).record([torch.zeros(1, 2)], torch.zeros(1, 2))


def test_concurrent_records_are_all_counted() -> None:
    counters = PoolingCounters(["a"])
    x = torch.randn(2, 3)
    pooled = torch.log_softmax(x, dim=-1)

    def work() -> None:
        for _ in range(200):
            counters.record([x], pooled, seconds=0.001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = counters.snapshot()
    assert snap["pooled_tokens"] == 1600 and snap["pooling_steps"] == 800 and snap["member_agreement"] == {"a": 1600}


def test_driver_snapshot_takes_the_first_worker_that_pools() -> None:
    one = {"pooled_tokens": 3, "member_agreement": {"a": 2}, "pooling_seconds": 0.1, "pooling_steps": 1}
    assert driver_snapshot([None, one, dict(one, pooled_tokens=9)]) is one
    assert driver_snapshot([None, None]) is None and driver_snapshot([]) is None
