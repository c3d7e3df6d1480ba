"""``ensemble fit``: choose an ensemble's pooling rule, member weights and temperatures on a dev text.

The members score the dev texts once, in float32, on the ensemble's shared tokenizer (one start
token in front of each ~1 KB window, as ``transfer eval`` and ``bench/ensemble_quality.py`` score
held-out text). Their logits are kept (float16, half the memory) and, for each pooling rule, the
member weights (positive, summing to one) and temperatures that minimise the pooled bits per byte
are found: under ``prob_mean`` the temperatures come from a grid (each member's log-probability
of every target is tabulated once per grid temperature) and the weights, for each choice, by EM;
under ``logprob_mean`` by Newton's method on the K products weight / temperature, the only
quantities that pool depends on (a convex problem), then, on top of that, an entropy gate that
lets each weight follow the members' uncertainty token by token (`fit_maths.fit_entropy_gate`,
also convex); that maths is `ensemble.fit_maths`. The rule with the fewest bits wins; the manifest is rewritten with it, and ``fit.json`` beside it
records the dev texts (path, sha256, bytes) and the bits per byte before and after, per rule.

The dev texts must be disjoint from the members' training text and from every held-out text that
is reported: by default the zoo's ``dev`` split (a play kept out of both) and ``treebank_dev``
(the Penn Treebank's validation text; its test text is held out), so that the fit sees verse and
news and does not tune the temperatures to one register (see `transfer.zoo`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from ensemble.fit_maths import RuleFit, bits_per_byte, fit_entropy_gate, fit_rule, gated_bits_per_byte, window_entropies
from ensemble.manifest import MANIFEST_FILE, EnsembleManifest, ManifestError
from ensemble.pooling import POOLING_RULES, check_rule

FIT_FILE = "fit.json"


@dataclass(frozen=True)
class FitConfig:
    """What `fit_ensemble` fits and on which text.

    Attributes:
        texts: the dev texts (UTF-8 files or ``zoo:SPLIT``), scored together.
        max_bytes: bytes scored per dev text (its first ones, in whole windows).
        window_bytes: bytes per scored window (each starts with one start token).
        rules: the pooling rules tried; the one with the fewest bits per byte is kept.
        temperatures: fit per-member temperatures too (else they stay as they are).
        max_iter: Newton iterations for ``logprob_mean`` (each one pass over the dev logits).
        entropy_gate: also try ``logprob_mean`` with an entropy gate (`fit_maths.fit_entropy_gate`;
            needs ``logprob_mean`` among `rules` and free temperatures). Off by default: on the
            default ensemble it gained 0.07% on the dev text and -0.09% / -0.02% / +0.06% on the
            held-out texts (ensemble/RESULTS.md), not worth its pooling cost.
    """

    texts: tuple[str, ...] = ("zoo:dev", "zoo:treebank_dev")
    max_bytes: int = 4_000
    window_bytes: int = 1024
    rules: tuple[str, ...] = POOLING_RULES
    temperatures: bool = True
    max_iter: int = 25
    entropy_gate: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        object.__setattr__(self, "texts", tuple(self.texts))
        if not self.texts:
            raise ManifestError("fit needs at least one dev text")
        if not self.rules:
            raise ManifestError("fit needs at least one pooling rule")
        for rule in self.rules:
            try:
                check_rule(rule)
            except ValueError as err:
                raise ManifestError(str(err)) from None
        if self.max_bytes < self.window_bytes or self.window_bytes < 16:
            raise ManifestError(
                f"fit needs max_bytes >= window_bytes >= 16, got {self.max_bytes} and {self.window_bytes}"
            )
        if self.max_iter < 1:
            raise ManifestError(f"max_iter must be >= 1, got {self.max_iter}")


@dataclass(frozen=True)
class FitReport:
    """What `fit_ensemble` did: the dev texts, the manifest's own score, and every rule's fit."""

    texts: tuple[str, ...]
    sha256: tuple[str, ...]
    bytes: int
    tokens: int
    before: RuleFit
    fits: tuple[RuleFit, ...]
    chosen: RuleFit = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "chosen", min(self.fits, key=lambda f: f.bits_per_byte))

    def to_dict(self) -> dict:
        """JSON-ready form (the content of ``fit.json``)."""
        return asdict(self)


# ----------------------------------------------------------------------------- the command


@torch.inference_mode()
def score_windows(manifest: EnsembleManifest, texts: Sequence[str], tokenizer) -> list[tuple[Tensor, Tensor]]:
    """Every member's float32 logits on each window (kept as float16 ``[K, R, V]``) and the targets."""
    from tqdm.auto import tqdm

    from ensemble.reference import load_members
    from transfer.tokens import encode_text, start_token_id

    start = start_token_id(tokenizer)
    members = load_members(manifest, "cpu", torch.float32)
    out = []
    for text in tqdm(texts, desc="scoring the dev text", unit="window"):
        ids = torch.tensor([start] + encode_text(tokenizer, text))
        logits = [m.shared_logits(m.model(input_ids=ids[None]).logits[0].float())[:-1] for m in members]
        out.append((torch.stack(logits).to(torch.float16), ids[1:]))
    return out


def fit_ensemble(folder: str | Path, config: FitConfig = FitConfig(), write: bool = True) -> FitReport:
    """Fit `folder`'s pooling on `config.texts`; rewrite its manifest (when `write`) and ``fit.json``."""
    from transformers import AutoTokenizer

    from transfer.config import resolve_text
    from transfer.evaluate import byte_windows

    folder = Path(folder)
    manifest = EnsembleManifest.load(folder)
    paths, digests, texts = [], [], []
    for spec in config.texts:
        path = resolve_text(spec)
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ManifestError(f"dev text {path} is not UTF-8 (byte {err.start})") from None
        windows = byte_windows(text, config.window_bytes, config.max_bytes)
        if not windows:
            raise ManifestError(f"dev text {path} has no text to score")
        paths.append(str(path))
        digests.append(hashlib.sha256(raw).hexdigest())
        texts += windows
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    windows = score_windows(manifest, texts, AutoTokenizer.from_pretrained(folder))

    own_w = torch.tensor(manifest.weights) / sum(manifest.weights)
    own_t = torch.tensor(manifest.temperatures)
    gated = config.entropy_gate and config.temperatures and "logprob_mean" in config.rules
    entropies = window_entropies(windows) if gated or manifest.entropy_gate else None
    before = RuleFit(manifest.rule, tuple(manifest.weights), tuple(manifest.temperatures), math.nan,
                     manifest.entropy_gate)
    before = replace(before, bits_per_byte=gated_bits_per_byte(windows, entropies, n_bytes, before)
                     if manifest.entropy_gate else bits_per_byte(windows, n_bytes, own_w, own_t, manifest.rule))
    keep = None if config.temperatures else list(manifest.temperatures)
    fits = tuple(fit_rule(windows, n_bytes, rule, keep, config.max_iter) for rule in config.rules)
    if gated:
        plain = next(f for f in fits if f.rule == "logprob_mean")
        gate_fit = fit_entropy_gate(windows, entropies, n_bytes, plain, config.max_iter)
        if gate_fit is not plain:
            fits += (gate_fit,)
    report = FitReport(tuple(paths), tuple(digests), n_bytes,
                       sum(len(t) for _, t in windows), before, fits)
    if write:
        _write(folder, report.chosen, report)
    return report


def _write(folder: Path, best: RuleFit, report: FitReport) -> None:
    """Store `best` in the folder's manifest (member paths kept as written) and the report beside it."""
    path = folder / MANIFEST_FILE
    stored = json.loads(path.read_text())
    for member, w, t in zip(stored["members"], best.weights, best.temperatures, strict=True):
        member["weight"], member["temperature"] = w, t
    stored["rule"] = best.rule
    stored["entropy_gate"] = asdict(best.entropy_gate) if best.entropy_gate else None
    EnsembleManifest.from_dict(stored)  # validate before anything is replaced
    # config.json carries the manifest for vLLM too (`manifest.hf_config`): keep the two equal.
    config = json.loads((folder / "config.json").read_text())
    config["chorus"] = stored
    for target, content in ((path, stored), (folder / "config.json", config), (folder / FIT_FILE, report.to_dict())):
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(content, indent=2) + "\n")
        tmp.replace(target)
