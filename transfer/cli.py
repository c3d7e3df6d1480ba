"""The ``transfer`` console script.

    transfer run CONFIG.yaml [section.key=value ...] [--resume]
    transfer eval --model DIR [--tokenizer DIR] --text FILE [--max-bytes N]
    transfer init --model DIR --tokenizer DIR|bytes --out DIR
    transfer zoo [build|status|path] ...       (transfer.zoo's own command line)

Subcommands live in :data:`COMMANDS` (name -> (help, add_arguments, run)); other modules add
theirs with :func:`register`. A pass-through subcommand (``transfer zoo``) hands its arguments
untouched to the delegate's own parser. Bad input (missing files,
invalid or incompatible config, chat data without a template) prints one line
``transfer: error: ...`` and exits with status 2, without a traceback and without overwriting
anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from .errors import UserInputError

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

#: Subcommand registry: name -> (help, add_arguments, run).
COMMANDS: dict[str, tuple[str, AddArguments, Run]] = {}
#: Subcommands whose arguments go untouched to ``run(argparse.Namespace(args=[...]))``.
PASSTHROUGH: set[str] = set()


def register(name: str, help: str, add_arguments: AddArguments, run: Run, passthrough: bool = False) -> None:
    """Add a subcommand to ``transfer`` (``passthrough``: it parses its own arguments)."""
    COMMANDS[name] = (help, add_arguments, run)
    if passthrough:
        PASSTHROUGH.add(name)


# --------------------------------------------------------------------------------------------
# transfer run


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config (see transfer/configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-5 loss.terms=[alm,sft]")
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir from its newest checkpoint")


def _run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config, args.overrides)
    out = train(cfg, resume=args.resume)
    print(f"run folder: {out}")
    return 0


# --------------------------------------------------------------------------------------------
# transfer eval


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model folder (or zoo:NAME)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's own)")
    p.add_argument("--text", required=True, help="UTF-8 text file (or zoo:heldout)")
    p.add_argument("--max-bytes", type=int, default=100_000, help="evaluate at most this many bytes (default 100000)")
    p.add_argument("--window-bytes", type=int, default=1024, help="bytes per scored window (default 1024)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")


def _eval(args: argparse.Namespace) -> int:
    from .config import resolve_model, resolve_text, resolve_tokenizer
    from .evaluate import evaluate_folder

    if args.max_bytes <= 0 or args.window_bytes <= 0 or args.batch_size <= 0:
        raise UserInputError("--max-bytes, --window-bytes and --batch-size must be positive")
    model = resolve_model(args.model)
    tokenizer = resolve_tokenizer(args.tokenizer) if args.tokenizer else None
    if tokenizer == "bytes":
        raise UserInputError("--tokenizer bytes: give the folder of a saved byte-level student instead")
    result = evaluate_folder(model, resolve_text(args.text), tokenizer, args.max_bytes, args.window_bytes,
                             args.batch_size, args.dtype)
    print(json.dumps({"model": str(model), "tokenizer": str(tokenizer or model), **result.as_dict()}))
    return 0


# --------------------------------------------------------------------------------------------
# transfer init


def _init_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model folder (or zoo:NAME)")
    p.add_argument("--tokenizer", required=True, help="new tokenizer folder, zoo:NAME, or 'bytes'")
    p.add_argument("--out", required=True, help="new folder for the FVT-initialised student")
    p.add_argument("--dtype", choices=["fp32", "bf16", "auto"], default="auto",
                   help="weights dtype of the written model (default: as the input model)")


def _init(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from .config import resolve_model, resolve_tokenizer
    from .fvt import init_student, load_target_tokenizer, save_model_folder
    from .tokens import load_tokenizer

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"output folder {out} exists and is not empty; choose a new --out")
    model_dir = resolve_model(args.model)
    tok_spec = resolve_tokenizer(args.tokenizer)
    old_tok = load_tokenizer(model_dir)
    new_tok = load_target_tokenizer(tok_spec, old_tok)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "auto": "auto"}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model, new_tok = init_student(model, old_tok, new_tok)
    save_model_folder(model, new_tok, out)
    print(f"FVT student ({len(new_tok)} tokens) written to {out}")
    return 0


# --------------------------------------------------------------------------------------------
# transfer zoo


def _zoo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs=argparse.REMAINDER, help="build (default), status or path; see transfer zoo --help")


def _zoo(args: argparse.Namespace) -> int:
    from . import zoo

    return zoo.main(list(args.args))


register("run", "train (ALM / SFT / latents) from a YAML config", _run_args, _run)
register("eval", "bits per byte of a model on a text file", _eval_args, _eval)
register("init", "FVT-initialise a model for a new tokenizer", _init_args, _init)
register("zoo", "build or inspect the model zoo (real models, tokenizers, corpus)", _zoo_args, _zoo, passthrough=True)


# --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own convention)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``transfer`` argument parser with every registered subcommand."""
    parser = _Parser(prog="transfer", description="ALM tokenizer transfer for chorus")
    subs = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(subs.add_parser(name, help=help_text, description=help_text))
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides of ``run`` may also follow its options
    (``transfer run c.yaml --resume train.lr=2e-5``)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command == "run" and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted (not the stream of
    the first call: tests and notebooks swap it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _quiet_libraries() -> None:
    """Only our own progress bar and messages (``chorus.*`` loggers, INFO, on stderr): no per-tensor loading bars or info logs from
    transformers (a bad input then prints exactly one line)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # Our own decisions (e.g. the precision `train.dtype: auto` chose) as one line each.
    ours = logging.getLogger("chorus")
    if not ours.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``transfer`` console script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # OpenMP threads that sleep at barriers instead of spinning: on a CPU shared with other
    # processes, spinning threads made SmolLM2's forward 4x slower (0.85 s -> 3.5 s); alone,
    # the two policies run at the same speed. Only effective before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        args = argparse.Namespace(command=argv[0], args=argv[1:])
    else:
        args = _parse(build_parser(), argv)
        _quiet_libraries()
    try:
        return COMMANDS[args.command][2](args)
    except UserInputError as err:
        print(f"transfer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("transfer: interrupted (rerun with --resume to continue a training run)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
