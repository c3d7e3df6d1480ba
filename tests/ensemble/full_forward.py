"""Pooling computed apart from the engines, for tests that check an engine's cached, step-by-step
decoding: each member's full forward pass over the whole sequence, its logits cut to the shared
vocabulary and masked from its own `vocab_size` on (where it abstains), pooled by `pool_logprobs`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ensemble.manifest import EnsembleManifest
from ensemble.pooling import fit_vocab, mask_padded_vocab, pool_logprobs
from ensemble.protocol import RequestOutput


def pooled_full_forward(manifest: EnsembleManifest, models: Sequence, sequence: list[int], rule: str,
                        weights: Sequence[float]) -> torch.Tensor:
    """The pooled log-probs [len(sequence), vocab] after each position of `sequence`."""
    with torch.no_grad():
        logits = [fit_vocab(m(torch.tensor([sequence])).logits[0].float(), manifest.vocab_size) for m in models]
    logits = [mask_padded_vocab(x, m.vocab_size or manifest.vocab_size) for x, m in zip(logits, manifest.members)]
    return pool_logprobs(logits, list(weights), rule)  # type: ignore[arg-type]


def worst_gap_to_pooled(out: RequestOutput, pooled: torch.Tensor) -> float:
    """The largest |log-prob difference| between a greedy answer `out` (its generated and prompt
    log-probs) and `pooled` over its prompt + tokens; asserts every generated token is the argmax."""
    prompt_len = len(out.prompt_token_ids)
    worst = 0.0
    for step, entry in enumerate(out.outputs[0].logprobs):
        row = pooled[prompt_len - 1 + step]
        assert float(row[entry.token_id]) >= float(row.max()) - 1e-4  # greedy: the argmax
        worst = max(worst, abs(entry.logprob - float(row[entry.token_id])))
    for pos, entry in enumerate(out.prompt_logprobs[1:]):
        worst = max(worst, abs(entry.logprob - float(pooled[pos, entry.token_id])))
    return worst
