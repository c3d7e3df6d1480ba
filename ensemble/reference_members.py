"""The reference engine's members: one Hugging Face causal LM each, run with its own KV cache,
its logits fitted to the ensemble's shared vocabulary (ids a member lacks are masked).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ensemble.manifest import EnsembleManifest, MemberSpec
from ensemble.pooling import fit_vocab, mask_padded_vocab


class Member:
    """One member model and how its logits map onto the shared vocabulary."""

    def __init__(self, spec: MemberSpec, vocab_size: int, model: Any, device: str | torch.device) -> None:
        self.spec = spec
        self.vocab_size = vocab_size
        self.model = model
        self.device = torch.device(device)

    @staticmethod
    def load_model(path: str, device: str | torch.device, dtype: torch.dtype) -> Any:
        """A member's Hugging Face causal LM, in eval mode on `device`."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()

    def shared_logits(self, logits: Tensor) -> Tensor:
        """Fit ``[T, V_member]`` logits to the shared vocabulary, masking ids the member lacks."""
        x = fit_vocab(logits, self.vocab_size)
        if self.spec.vocab_size is not None and self.spec.vocab_size < self.vocab_size:
            x = mask_padded_vocab(x, self.spec.vocab_size)
        return x

    @torch.inference_mode()
    def forward(self, token_ids: Sequence[int], cache: Any | None, all_positions: bool = False) -> tuple[Tensor, Any]:
        """Run `token_ids` after `cache` (None: a fresh sequence); return (logits, cache).

        The logits are ``[T, vocab]`` over the shared vocabulary for every position when
        `all_positions`, else ``[1, vocab]`` for the last one.
        """
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=0 if all_positions else 1
        )
        return self.shared_logits(out.logits[0]), out.past_key_values


def load_members(manifest: EnsembleManifest, device: str | torch.device, dtype: torch.dtype) -> list[Member]:
    """The manifest's members in order; members reading the same folder share one set of weights
    (each keeps its own caches)."""
    models: dict[str, Any] = {}
    for spec in manifest.members:
        if spec.path not in models:
            models[spec.path] = Member.load_model(spec.path, device, dtype)
    return [Member(spec, manifest.vocab_size, models[spec.path], device) for spec in manifest.members]
