"""Held-out bits per byte of each ensemble member alone and of the pooled ensemble, per rule.

    python bench/ensemble_quality.py ~/.cache/chorus/default/ensemble-gemma3 \
        --text zoo:heldout --text zoo:prose --max-bytes 20000 --out bench/results/ensemble_quality.json

Every member scores the same token ids (the ensemble's shared tokenizer, one start token in front
of each window, as in ``transfer eval``), so the numbers are comparable: the pooled distribution of
a rule is scored on exactly the bytes and tokens each member is scored on. Rules measured:
the manifest's entropy-gated ``logprob_mean`` when it has a gate, ``prob_mean`` and
``logprob_mean`` with the manifest's weights, and ``prob_mean`` with the weight
of each member doubled in turn (a cheap look at whether weighting towards one member helps).

``--original NAME=MODEL`` (repeatable; a folder or ``zoo:NAME``) adds a model scored with its *own*
tokenizer on the same bytes (``transfer eval``'s measure): the originals the members were moved
from, the baseline a user could serve instead. The summary line then compares the ensemble (its
manifest's own rule, weights and temperatures) with the best original on each text.

Prints a Markdown table (rows: originals, members, then the ensemble rules; columns: one per text)
and writes the same numbers as JSON when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ensemble.fit_maths import RuleFit, bits_per_byte, gated_bits_per_byte, target_logprob_table, window_entropies
from ensemble.manifest import EnsembleManifest
from ensemble.reference import Member, load_members


@dataclass
class Tally:
    """Bits and bytes accumulated for one scorer (a member or a pooling setting)."""

    bits: float = 0.0
    bytes: int = 0
    per_text: dict[str, tuple[float, int]] = field(default_factory=dict)

    def add(self, text: str, bits: float, n_bytes: int) -> None:
        b, n = self.per_text.get(text, (0.0, 0))
        self.per_text[text] = (b + bits, n + n_bytes)

    def bpb(self, text: str) -> float:
        b, n = self.per_text[text]
        return b / max(n, 1)


def scorers(manifest: EnsembleManifest) -> dict[str, tuple[str, list[float]]]:
    """Pooling settings to score: name -> (rule, weights); the manifest's own setting first."""
    names = [m.name for m in manifest.members]
    weights = list(manifest.weights)
    rules = [manifest.rule] + [r for r in ("prob_mean", "logprob_mean") if r != manifest.rule]
    out = {}
    if manifest.entropy_gate is not None:  # the manifest's own setting first
        out[f"ensemble {manifest.rule} {fmt(weights)} + entropy gate"] = (GATED, weights)
    out |= {f"ensemble {rule} {fmt(weights)}": (rule, weights) for rule in rules}
    for i, name in enumerate(names):
        w = [2.0 * x if j == i else x for j, x in enumerate(weights)]
        out[f"ensemble prob_mean, {name} x2 {fmt(w)}"] = ("prob_mean", w)
    return out


GATED = "logprob_mean + entropy gate"  # the manifest's logprob_mean with its `EntropyGate`


def fmt(weights: list[float]) -> str:
    return "(" + ", ".join(f"{w:g}" for w in weights) + ")"


@torch.inference_mode()
def member_logits(member: Member, ids: torch.Tensor) -> torch.Tensor:
    """``[T, vocab]`` float32 logits of one window over the shared vocabulary."""
    return member.shared_logits(member.model(input_ids=ids[None]).logits[0].float())


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from transfer.config import resolve_text
    from transfer.evaluate import read_windows

    torch.manual_seed(0)
    manifest = EnsembleManifest.load(args.ensemble)
    tokenizer = AutoTokenizer.from_pretrained(args.ensemble)
    texts = args.text or ["zoo:heldout"]
    windows = {t: read_windows(resolve_text(t), args.window_bytes, args.max_bytes) for t in texts}
    members = load_members(manifest, "cpu", torch.float32)
    originals = _score_originals(p, args, texts)
    settings = scorers(manifest)
    tallies = _score_windows(manifest, members, tokenizer, windows, settings)
    rows = originals | {name: {t: tally.bpb(t) for t in texts} for name, tally in tallies.items()}
    _report(args, manifest, texts, rows, originals, own=next(iter(settings)))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"ensemble": str(args.ensemble), "max_bytes": args.max_bytes, "originals": args.original,
                  "members": [{"name": m.name, "path": m.path, "weight": m.weight} for m in manifest.members],
                  "bits_per_byte": rows}
        out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ensemble", help="ensemble folder (from `ensemble build`)")
    p.add_argument("--text", action="append", help="text file or zoo:NAME (repeatable; default zoo:heldout)")
    p.add_argument("--max-bytes", type=int, default=20_000, help="bytes scored per text (default 20000)")
    p.add_argument("--window-bytes", type=int, default=1024)
    p.add_argument("--original", action="append", default=[], metavar="NAME=MODEL",
                   help="also score MODEL (folder or zoo:NAME) with its own tokenizer (repeatable)")
    p.add_argument("--out", help="write the results as JSON here")
    return p


def _score_originals(p: argparse.ArgumentParser, args: argparse.Namespace, texts: list[str]) -> dict[str, dict]:
    """``--original`` models, each scored with its own tokenizer: row name -> text -> bits per byte."""
    from transfer.config import resolve_model, resolve_text
    from transfer.evaluate import evaluate_folder

    originals = {}
    for item in args.original:
        name, sep, model = item.partition("=")
        if not sep or not name or not model:
            p.error(f"--original {item!r}: expected NAME=MODEL")
        originals[f"original {name} (own tokenizer)"] = {
            t: evaluate_folder(resolve_model(model), resolve_text(t), max_bytes=args.max_bytes,
                               window_bytes=args.window_bytes).bits_per_byte for t in texts}
    return originals


def _score_windows(manifest: EnsembleManifest, members: list[Member], tokenizer, windows: dict[str, list[str]],
                   settings: dict[str, tuple[str, list[float]]]) -> dict[str, Tally]:
    """Every member alone and every pooling setting, scored window by window on the same ids."""
    from tqdm.auto import tqdm

    from transfer.tokens import encode_text, start_token_id

    start = start_token_id(tokenizer)
    tallies = {m.name: Tally() for m in manifest.members} | {name: Tally() for name in settings}
    total = sum(len(w) for w in windows.values())
    temps = torch.tensor([m.temperature for m in manifest.members])
    with tqdm(total=total, desc="windows", unit="win") as bar:
        for text, ws in windows.items():
            for w in ws:
                ids = torch.tensor([start] + encode_text(tokenizer, w))
                target = ids[1:]
                n_bytes = len(w.encode("utf-8"))
                # [K, R, V]; scored by ensemble.fit's one-pass functions (the engines' pooling maths)
                scored = [(torch.stack([member_logits(m, ids)[:-1] for m in members]), target)]
                alone = target_logprob_table(scored, temps[:, None])[:, 0]  # [K, R] at each member's temperature
                for spec, lp in zip(manifest.members, alone):
                    tallies[spec.name].add(text, -float(lp.sum()) / math.log(2), n_bytes)
                for name, (rule, weights) in settings.items():
                    if rule == GATED:
                        fit = RuleFit(rule, tuple(weights), tuple(temps.tolist()), math.nan, manifest.entropy_gate)
                        bpb = gated_bits_per_byte(scored, window_entropies(scored), n_bytes, fit)
                    else:
                        bpb = bits_per_byte(scored, n_bytes, torch.tensor(weights), temps, rule)
                    tallies[name].add(text, bpb * n_bytes, n_bytes)
                bar.update(1)
    return tallies


def _report(args: argparse.Namespace, manifest: EnsembleManifest, texts: list[str], rows: dict[str, dict],
            originals: dict[str, dict], own: str) -> None:
    """Print the Markdown table, the best member per text and, with originals, how the ensemble's
    own setting (`own`) compares with the best of them."""
    print(f"\nbits per byte (lower is better), {args.max_bytes} bytes per text, ensemble {args.ensemble}\n")
    print("| scorer | " + " | ".join(texts) + " |")
    print("|---|" + "---|" * len(texts))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[t]:.4f}" for t in texts) + " |")
    best = {t: min(rows[m.name][t] for m in manifest.members) for t in texts}
    print("\nbest member per text: " + ", ".join(f"{t} {best[t]:.4f}" for t in texts))
    if originals:  # own: the manifest's own rule, weights and temperatures
        for t in texts:
            name, value = min(((n, r[t]) for n, r in originals.items()), key=lambda x: x[1])
            change = 100 * (rows[own][t] / value - 1)
            print(f"{t}: {own} {rows[own][t]:.4f} vs best {name} {value:.4f}: {change:+.1f}% bits")

if __name__ == "__main__":
    sys.exit(main())
