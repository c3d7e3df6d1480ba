"""The reference engine's model work: prefill (optionally scoring the prompt in bounded chunks),
pooling of the members' rows per request rule and weights, per-token log-probs, and one decode
step that samples, checks the stop rules and feeds the token back to every member.

`DecodeMixin` is a base of `ensemble.reference.ReferenceEngine`, which provides the attributes
annotated on it; its methods run on the engine's worker thread only.
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ensemble.manifest import EnsembleManifest
from ensemble.pooling import member_logprobs, pool_logprobs
from ensemble.pooling_stats import PoolingCounters
from ensemble.protocol import ALONE, TokenLogprob
from ensemble.reference_members import Member
from ensemble.reference_requests import _Request, _Sequence
from ensemble.sampling import sample_token, top_logprobs
from ensemble.stopping import StopChecker

# Echo with logprobs scores the prompt in chunks whose full-vocabulary rows take at most this much
# memory (a 8k-token prompt at a 262k vocabulary would otherwise need 8 GiB per member).
PROMPT_LOGPROBS_BYTES = 256 << 20


class DecodeMixin:
    """Prefill, pooling and decode steps of `ReferenceEngine` (see the module docstring)."""

    members: list[Member]
    manifest: EnsembleManifest
    tokenizer: Any
    max_model_len: int
    _counters: PoolingCounters

    def _prefill(self, request: _Request) -> None:
        """Run the prompt through every member and set up the request's `n` completions."""
        options = request.options
        if options.prompt_logprobs is not None:
            caches, rows = self._prefill_with_prompt_logprobs(request)
        else:
            caches, rows = [], []
            for member in self.members:
                logits, cache = member.forward(request.prompt, None)
                caches.append(cache)
                rows.append(logits[-1])
        special = self.manifest.special_tokens
        max_new = min(options.max_tokens, max(1, self.max_model_len - len(request.prompt)))
        base_seed = options.seed if options.seed is not None else secrets.randbits(62)
        for i in range(options.n):
            request.sequences.append(
                _Sequence(
                    index=i,
                    caches=caches if i == options.n - 1 else [copy.deepcopy(c) for c in caches],
                    generator=torch.Generator().manual_seed(base_seed + i),
                    checker=StopChecker(self.tokenizer, options, special.eos, special.eot, max_new),
                    rows=list(rows),
                    logprobs=[] if options.logprobs is not None or options.member_logprobs else None,
                )
            )

    def _pool(self, member_rows: list[Tensor], requests: Sequence[_Request]) -> Tensor:
        """Pool ``[N, V]`` rows per member, row i belonging to requests[i] (its rule and weights)."""
        device = member_rows[0].device
        out = torch.empty(member_rows[0].shape, dtype=torch.float32, device=device)
        for i, r in enumerate(requests):
            if r.rule == ALONE:  # a member alone: its own distribution, temperature 1
                out[i] = member_logprobs(member_rows[r.weights.index(1.0)][i], 1.0)
        for rule in sorted({r.rule for r in requests} - {ALONE}):
            idx = [i for i, r in enumerate(requests) if r.rule == rule]
            index = torch.tensor(idx, dtype=torch.long, device=device)
            weights = torch.tensor([requests[i].weights for i in idx], dtype=torch.float32, device=device)
            out[index] = pool_logprobs(
                [rows[index] for rows in member_rows], weights, rule,  # type: ignore[arg-type]
                temperatures=self.manifest.temperatures, alpha=self.manifest.contrastive_alpha,
                gate=self.manifest.entropy_gate,
            )
        return out.cpu()

    def _token_logprob(self, pooled: Tensor, token: int, k: int | None, member_rows: list[Tensor] | None) -> TokenLogprob:
        members = None
        if member_rows is not None:
            members = {
                m.spec.name: float(member_logprobs(row, m.spec.temperature)[token])
                for m, row in zip(self.members, member_rows)
            }
        return TokenLogprob(token, float(pooled[token]), top_logprobs(pooled, k or 0), members)

    def prompt_chunk_tokens(self) -> int:
        """Prompt positions whose full-vocabulary rows (every member's) fit `PROMPT_LOGPROBS_BYTES`."""
        row_bytes = 4 * self.manifest.vocab_size * (len(self.members) + 1)  # members' rows and the pooled one
        return max(1, PROMPT_LOGPROBS_BYTES // row_bytes)

    def _prefill_with_prompt_logprobs(self, request: _Request) -> tuple[list[Any], list[Tensor]]:
        """Prefill `request`'s prompt chunk by chunk, scoring each chunk's positions as it goes (echo
        with logprobs): memory stays at one chunk's rows, not ``[prompt length, vocabulary]`` per
        member. Returns the members' caches and last rows; sets ``request.prompt_logprobs``."""
        prompt = request.prompt
        chunk = self.prompt_chunk_tokens()
        want_members = request.options.member_logprobs
        caches: list[Any] = [None] * len(self.members)
        rows: list[Tensor] = []
        result: list[TokenLogprob | None] = [None]
        for start in range(0, len(prompt), chunk):
            piece = prompt[start:start + chunk]
            logits = []
            for k, member in enumerate(self.members):
                out, caches[k] = member.forward(piece, caches[k], all_positions=True)
                logits.append(out)
            scored = min(len(piece), len(prompt) - 1 - start)  # rows that predict a prompt token
            if scored > 0:
                pooled = self._pool([x[:scored] for x in logits], [request] * scored)
                for pos in range(scored):
                    member_rows = [x[pos] for x in logits] if want_members else None
                    result.append(self._token_logprob(pooled[pos], prompt[start + pos + 1],
                                                      request.options.prompt_logprobs, member_rows))
            rows = [x[-1] for x in logits]
        request.prompt_logprobs = result
        return caches, rows

    def _step(self, requests: Sequence[_Request]) -> None:
        """Advance every unfinished completion of `requests` by one token."""
        seqs = [(r, s) for r in requests for s in r.sequences if not s.finished]
        if not seqs:
            return
        member_rows = [torch.stack([s.rows[k] for _, s in seqs]) for k in range(len(self.members))]
        pooled = self._counters.timed_pool(member_rows, lambda: self._pool(member_rows, [r for r, _ in seqs]))
        for i, (request, seq) in enumerate(seqs):
            options = request.options
            token = sample_token(pooled[i], options, seq.token_ids, seq.generator)
            if seq.logprobs is not None:
                rows = [m[i] for m in member_rows] if options.member_logprobs else None
                seq.logprobs.append(self._token_logprob(pooled[i], token, options.logprobs, rows))
            seq.token_ids.append(token)
            decision = seq.checker.check(seq.token_ids)
            seq.text = decision.text
            if decision.finished:
                seq.finish_reason, seq.stop_reason = decision.finish_reason, decision.stop_reason
                seq.caches, seq.rows = [], []
                continue
            for k, member in enumerate(self.members):
                logits, seq.caches[k] = member.forward([token], seq.caches[k])
                seq.rows[k] = logits[-1]
