"""`ensemble.vllm_fused_head`: the members' linear heads as one oneDNN product (vLLM's CPU kernels)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ensemble.vllm_fused_head import FusedHead, fused_head_weights


def _member(rows: int, hidden: int, seed: int, scale: float = 1.0, tp_size: int = 1, dtype=torch.float32):
    weight = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return SimpleNamespace(lm_head=SimpleNamespace(weight=weight, tp_size=tp_size),
                           logits_processor=SimpleNamespace(scale=scale))


@pytest.mark.skipif(not FusedHead.available(), reason="this vLLM build has no oneDNN products")
def test_fused_head_is_the_sum_of_the_scaled_heads() -> None:
    members = [_member(60, 8, 0, scale=0.5), _member(52, 6, 1)]  # the first head has padding rows
    weights = fused_head_weights(members, vocab_size=52)
    assert [tuple(w.shape) for w in weights] == [(52, 8), (52, 6)]
    head = FusedHead(weights, limit=4 * 52)
    gen = torch.Generator().manual_seed(2)
    h = [torch.randn(3, 8, generator=gen), torch.randn(3, 6, generator=gen)]
    c = (0.6, 0.25)
    expected = (c[0] * 0.5 * h[0] @ members[0].lm_head.weight[:52].t()
                + c[1] * h[1] @ members[1].lm_head.weight.t())
    got = head([h[0] * c[0], h[1] * c[1]])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    again = head([h[0][:2] * c[0], h[1][:2] * c[1]])
    assert again.data_ptr() == got.data_ptr()  # the kept buffer, not a fresh [rows, V] tensor
    assert head([x.repeat(2, 1) for x in h]).shape == (6, 52)  # past the limit: a fresh tensor


def test_only_plain_whole_heads_are_fused() -> None:
    assert fused_head_weights([_member(52, 8, 0)], vocab_size=60) is None  # fewer rows than the vocabulary
    assert fused_head_weights([_member(52, 8, 0, tp_size=2)], vocab_size=52) is None  # split over ranks
    assert fused_head_weights([_member(52, 8, 0, dtype=torch.bfloat16)], vocab_size=52) is None
    assert fused_head_weights([SimpleNamespace(lm_head=None, logits_processor=None)], vocab_size=52) is None
