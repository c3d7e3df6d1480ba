"""The ``ensemble`` command line: build and inspect ensemble folders.

    ensemble build OUT_DIR --member NAME=PATH[:WEIGHT] [--member ...] [--rule prob_mean]
                   [--tokenizer-from NAME] [--chat-template-from NAME] [--name NAME]
                   [--temperature NAME=T] [--overwrite]
    ensemble show FOLDER
    ensemble fit FOLDER [--text zoo:dev --text zoo:treebank_dev] [--max-bytes 4000] [--rule R ...] [--keep-temperatures]
                 [--max-iter 25] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ensemble.manifest import EnsembleManifest, ManifestError, MemberSpec
from ensemble.pooling import DEFAULT_ALPHA, POOLING_RULES
from transfer.errors import UserInputError


def parse_member(text: str) -> MemberSpec:
    """Parse ``NAME=PATH[:WEIGHT]`` (the weight is the part after the last ``:`` if numeric)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ManifestError(f"--member {text!r}: expected NAME=PATH[:WEIGHT]")
    path, weight = rest, 1.0
    head, colon, tail = rest.rpartition(":")
    if colon and head:
        try:
            weight = float(tail)
            path = head
        except ValueError:
            pass  # a colon inside the path, no weight
    return MemberSpec(name=name, path=path, weight=weight)


def parse_temperature(text: str) -> tuple[str, float]:
    """Parse ``NAME=T``."""
    name, sep, value = text.partition("=")
    try:
        return name, float(value) if sep else float("nan")
    except ValueError:
        raise ManifestError(f"--temperature {text!r}: expected NAME=T with a number T") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ensemble", description="Build and inspect chorus ensemble folders.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="validate member models and write an ensemble folder")
    build.add_argument("out_dir", help="the ensemble folder to create")
    build.add_argument("--member", action="append", required=True, metavar="NAME=PATH[:WEIGHT]",
                       help="a member model folder; NAME is a digit-free identifier (repeat per member)")
    build.add_argument("--rule", default="prob_mean", choices=POOLING_RULES, help="default pooling rule")
    build.add_argument("--tokenizer-from", metavar="NAME", help="member whose tokenizer to use (default: first)")
    build.add_argument("--chat-template-from", metavar="NAME", help="member whose chat template to use")
    build.add_argument("--temperature", action="append", default=[], metavar="NAME=T",
                       help="a member's own softmax temperature before pooling")
    build.add_argument("--contrastive-alpha", type=float, default=DEFAULT_ALPHA, metavar="A",
                       help="with a negative weight, only tokens whose probability under the positive "
                            f"members is at least A times the top one's may win (default {DEFAULT_ALPHA}; 0: off)")
    build.add_argument("--name", help="served model name (default: the folder name)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    show = sub.add_parser("show", help="print an ensemble folder's manifest")
    show.add_argument("folder")
    fit = sub.add_parser("fit", help="choose the pooling rule, weights and temperatures on a dev text")
    fit.add_argument("folder", help="an ensemble folder (its manifest is rewritten; fit.json records the fit)")
    fit.add_argument("--text", action="append", metavar="TEXT",
                     help="a dev text, disjoint from training and held-out text (repeatable; "
                          "default zoo:dev and zoo:treebank_dev)")
    fit.add_argument("--max-bytes", type=int, default=4_000, help="bytes scored per dev text (4000)")
    fit.add_argument("--rule", action="append", choices=POOLING_RULES, help="rule(s) to try (default: all)")
    fit.add_argument("--keep-temperatures", action="store_true", help="fit the weights only")
    fit.add_argument("--max-iter", type=int, default=25, help="Newton iterations for logprob_mean (25)")
    fit.add_argument("--entropy-gate", action="store_true",
                     help="also try logprob_mean with weights that follow the members' entropies per token")
    fit.add_argument("--dry-run", action="store_true", help="print the fit, change nothing")
    return parser


def _build(args: argparse.Namespace) -> int:
    from ensemble.builder import build_ensemble

    members = [parse_member(text) for text in args.member]
    temps = dict(parse_temperature(text) for text in args.temperature)
    unknown = sorted(set(temps) - {m.name for m in members})
    if unknown:
        raise ManifestError(f"--temperature names unknown member(s): {', '.join(unknown)}")
    members = [m.updated(temperature=temps[m.name]) if m.name in temps else m for m in members]
    out = build_ensemble(
        args.out_dir, members, rule=args.rule, tokenizer_from=args.tokenizer_from,
        chat_template_from=args.chat_template_from, name=args.name, overwrite=args.overwrite,
        contrastive_alpha=args.contrastive_alpha,
    )
    manifest = EnsembleManifest.load(out)
    summary = ", ".join(f"{m.name} (weight {m.weight:g})" for m in manifest.members)
    print(f"wrote {out}: {summary}; rule {manifest.rule}; vocab {manifest.vocab_size}; "
          f"max_model_len {manifest.max_model_len}")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from ensemble.fit import FitConfig, fit_ensemble

    config = FitConfig(texts=tuple(args.text or FitConfig.texts), max_bytes=args.max_bytes, rules=tuple(args.rule or POOLING_RULES),
                       temperatures=not args.keep_temperatures, max_iter=args.max_iter,
                       entropy_gate=args.entropy_gate)
    report = fit_ensemble(args.folder, config, write=not args.dry_run)
    print(f"dev text {', '.join(report.texts)}: {report.bytes} bytes, {report.tokens} tokens")
    print(f"  as built  {report.before.rule:<13} weights {fmt(report.before.weights)} "
          f"temperatures {fmt(report.before.temperatures)}: {report.before.bits_per_byte:.4f} bits/byte")
    for f in report.fits:
        mark = "  <- chosen" if f is report.chosen else ""
        gate = (f" entropy gate: centre {fmt(f.entropy_gate.centre)}, slopes "
                f"{' '.join(fmt(row) for row in f.entropy_gate.slopes)}" if f.entropy_gate else "")
        print(f"  fitted    {f.rule:<13} weights {fmt(f.weights)} temperatures {fmt(f.temperatures)}{gate}: "
              f"{f.bits_per_byte:.4f} bits/byte{mark}")
    print("dry run: nothing written" if args.dry_run else f"wrote {args.folder}/chorus_ensemble.json and fit.json")
    return 0


def fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ensemble`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            return _build(args)
        if args.command == "fit":
            return _fit(args)
        print(json.dumps(EnsembleManifest.load(args.folder).to_dict(), indent=2))
        return 0
    except (ManifestError, UserInputError) as err:
        print(f"ensemble: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
