"""`FusedHead`: the geometric pool's logits of linear member heads as one matrix product, on a CPU.

With linear heads (`ensemble.vllm_model.linear_head`), ``sum_k c_k W_k h_k`` is one product of
the members' scaled hidden states side by side with their head weights side by side:
``[c_1 h_1 | ... | c_K h_K] @ [W_1 | ... | W_K]^T``. On a CPU that one oneDNN product (vLLM's own
``onednn_mm``, as its heads use) into a kept output buffer took 38.3 / 64.9 / 148.6 ms for 1 / 16 /
64 rows of the default ensemble's two heads (262,144 x 640 and x 576, float32) where the members'
two heads and the sum took 46.8 / 80.8 / 192.1 ms (bench/RESULTS.md): no fresh ``[rows, V]``
output per member to fault in, no summing pass.

Its cost is memory: oneDNN keeps its own packed copy of the concatenated weights (the size of the
members' heads: 1.2 GB in float32 for the default ensemble), besides the members' own heads, which
the steps that count member agreement, rows pooled per request and members alone still use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ensemble.pooling import Scratch


def fused_head_weights(members: Sequence[nn.Module], vocab_size: int) -> list[torch.Tensor] | None:
    """Each member's head weight ``[V, hidden]`` (its first `vocab_size` rows) and logit scale folded
    in, or None when one cannot go into a `FusedHead`: a head split over tensor-parallel ranks, no
    plain 2-D float32 weight on a CPU (vLLM keeps the weight of a head tied to its embedding), or
    fewer rows than the shared vocabulary."""
    out = []
    for member in members:
        head = getattr(member, "lm_head", None)
        weight = getattr(head, "weight", None)
        if (weight is None or getattr(head, "tp_size", 1) != 1 or weight.dim() != 2 or weight.device.type != "cpu"
                or weight.dtype != torch.float32 or weight.shape[0] < vocab_size):
            return None
        scale = float(getattr(member.logits_processor, "scale", 1.0))
        out.append(weight[:vocab_size] * scale if scale != 1.0 else weight[:vocab_size])
    return out


class FusedHead:
    """``sum_k c_k W_k h_k`` for K linear heads, as one oneDNN product into a kept buffer."""

    def __init__(self, weights: Sequence[torch.Tensor], limit: int | None = None) -> None:
        """`weights`: each member's ``[V, hidden_k]`` head weight (`fused_head_weights`); `limit`:
        the most output elements kept between calls (`Scratch`)."""
        from vllm import _custom_ops as ops

        joined = torch.cat(list(weights), dim=1)  # [V, sum of hidden sizes]; oneDNN packs its own copy
        self.handler = ops.create_onednn_mm(joined.t(), 32)
        self.vocab_size = int(joined.shape[0])
        self.scratch = Scratch(limit=limit)

    @staticmethod
    def available() -> bool:
        """Whether this vLLM build has oneDNN products (its CPU builds for x86 and Arm do)."""
        from vllm import _custom_ops as ops

        return bool(ops._supports_onednn)

    def __call__(self, scaled_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        """The logits ``[rows, V]`` float32 for the members' scaled hidden states ``c_k h_k``, in
        the weights' order; valid until the next call."""
        x = torch.cat(list(scaled_hidden), dim=-1).contiguous()
        out = self.scratch.take((x.shape[0], self.vocab_size), x.device)
        torch.ops._C.onednn_mm(out, x, None, self.handler.handler_tensor)
        return out
