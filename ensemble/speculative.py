"""Speculative decoding for an ensemble, by vLLM's own machinery.

The ensemble is one vLLM model whose ``compute_logits`` returns the pooled next-token
log-probabilities (`ensemble.vllm_model`). vLLM's speculative decoding verifies proposed tokens
against whatever the target model's logits are, so with the ensemble as the target it verifies
against the *pooled* distribution: greedy decoding keeps exactly the ensemble's tokens, and
vLLM's rejection sampler (Leviathan et al. 2023, accept with min(1, p/q), resample from the
residual) keeps the ensemble's sampling distribution. Nothing here re-implements that; this module
only chooses and checks what vLLM is given (the Speculative Ensemble idea, arXiv 2502.01662: draft
with the cheapest member, which already shares the vocabulary).

Proposers that work on an ensemble target are the ones that need nothing from the target's
hidden states: a separate draft model (``draft_model``) and lookup in the tokens so far
(``ngram``, ``ngram_gpu``, ``suffix``). EAGLE,
MTP and Medusa heads read the target's last hidden states, which for an ensemble are its members'
states side by side: no head was trained on those.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ensemble.manifest import EnsembleManifest

# vLLM speculative methods that need nothing from the target model but its logits.
TARGET_FREE_METHODS = ("draft_model", "ngram", "ngram_gpu", "suffix")
# The end of the last batch-size range in a drafting schedule: past any engine's max_num_seqs.
_ANY_BATCH = 1 << 30


class SpeculativeError(ValueError):
    """A speculative-decoding setting that cannot work on this ensemble; the message says why."""


def batch_schedule(num_tokens: int, max_batch: int) -> list[tuple[int, int, int]]:
    """vLLM's ``num_speculative_tokens_per_batch_size`` (dynamic speculative decoding) that drafts
    `num_tokens` tokens per step while at most `max_batch` requests are scheduled in the step, and
    none in a larger step.

    Drafting pays where a step is bound by reading the weights (few requests: verifying k + 1
    tokens costs about what one costs) and loses where it is bound by compute (many requests: the
    rejected drafts are paid for in full); `bench/serving.py` measures where that turns.
    """
    for name, value in (("num_tokens", num_tokens), ("max_batch", max_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpeculativeError(f"{name} must be a positive integer, got {value!r}")
    return [(1, max_batch, num_tokens), (max_batch + 1, _ANY_BATCH, 0)]


def draft_member_config(manifest: EnsembleManifest, member: str, num_tokens: int,
                        max_batch: int | None = None) -> dict[str, Any]:
    """vLLM's ``speculative_config`` that drafts `num_tokens` tokens per step with `member`, in
    every step (`max_batch` None) or only in steps of at most `max_batch` requests
    (`batch_schedule`).

    The member must be one of the ensemble's (its weight may be 0: a draft need not vote), score
    exactly the ensemble's vocabulary (vLLM verifies draft ids against the target's rows), and
    have one kind of attention layer (vLLM keeps a draft's KV cache in one group, so a model that
    mixes sliding-window and full layers, such as Gemma 3, cannot draft).
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise SpeculativeError(f"the number of draft tokens must be a positive integer, got {num_tokens!r}")
    names = [m.name for m in manifest.members]
    if member not in names:
        raise SpeculativeError(f"draft member {member!r} is not in the ensemble (members: {', '.join(names)})")
    path = Path(manifest.members[names.index(member)].path)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SpeculativeError(f"draft member {member!r}: cannot read {path / 'config.json'}: {err}") from None
    config = config.get("text_config", config)
    rows = config.get("vocab_size")
    if rows != manifest.vocab_size:
        raise SpeculativeError(
            f"draft member {member!r} has {rows} vocabulary rows, the ensemble {manifest.vocab_size}: "
            "vLLM drafts only with a model of exactly the target's vocabulary size")
    kinds = sorted(set(config.get("layer_types") or ()))
    if len(kinds) > 1:
        raise SpeculativeError(
            f"draft member {member!r} mixes attention kinds ({', '.join(kinds)}); vLLM keeps a draft's "
            "KV cache in one group: draft with a member whose layers are all alike")
    spec: dict[str, Any] = {"method": "draft_model", "model": str(path), "num_speculative_tokens": num_tokens}
    if max_batch is not None:
        spec["num_speculative_tokens_per_batch_size"] = batch_schedule(num_tokens, max_batch)
    return spec


def speculative_method(config: Mapping[str, Any]) -> str | None:
    """The proposer a vLLM ``speculative_config`` names, inferred from its model as vLLM does
    ("ngram" names the proposer, any other model drafts) when no method is given."""
    method = config.get("method")
    if method is None and config.get("model"):
        method = "ngram" if config["model"] in ("ngram", "[ngram]") else "draft_model"
    return method


def check_speculative_config(config: Mapping[str, Any]) -> None:
    """Refuse a vLLM ``speculative_config`` whose proposer needs the target's hidden states."""
    method = speculative_method(config)
    if method not in TARGET_FREE_METHODS:
        raise SpeculativeError(
            f"speculative method {method!r} does not work on an ensemble: its proposer reads the "
            "target's hidden states, which are the members' side by side; use one of "
            f"{', '.join(TARGET_FREE_METHODS)} (e.g. serve --draft-member NAME)")
