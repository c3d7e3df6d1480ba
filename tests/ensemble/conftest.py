"""Tiny random Hugging Face models sharing the real Qwen2 tokenizer, and ensembles of them.

Three architectures that stress what an ensemble must reconcile:

* ``llama``: LlamaForCausalLM, head_dim 64, untied head, vocabulary padded to 151,680 rows.
* ``qwen2``: Qwen2ForCausalLM, head_dim 32, QKV bias, tied embeddings, 151,936 rows (Qwen's own
  padding).
* ``gemma3``: Gemma3ForCausalLM (text only), head_dim 80, a sliding window of 8 tokens on one of
  its two layers, final-logit soft-capping, exactly 151,665 rows.

The head sizes are ones vLLM's CPU attention kernels support (32, 64, 80, ...; not 16 or 24).

Weights come from a fixed torch seed and a large init scale (so the next-token distributions are
peaked and greedy decoding is not decided by rounding). Each model is saved as a float32
safetensors folder with the tokenizer files copied in. Everything is session-scoped and built once
per test session under pytest's tmp dir; the vLLM tests reuse these fixtures.

Plain functions (`build_tiny_model`, `build_tiny_ensemble`) are importable for scripts too.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import pytest
import torch

TINY_ARCHS = ("llama", "qwen2", "gemma3")
_INIT_STD = 0.3  # ~N(0, 0.3^2) weights: next-token logits spread over several nats


def shared_tokenizer_dir() -> Path:
    """The real Qwen2 tokenizer folder from the zoo (built on first use)."""
    from transfer import zoo

    return zoo.tokenizer_dir("qwen2")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy a tokenizer folder's files (not zoo markers) into `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            shutil.copy2(path, dst / path.name)


@lru_cache(maxsize=4)
def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _tiny_config(arch: str, tokenizer, vocab_size: int | None = None):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=512,
        initializer_range=_INIT_STD,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size or 151_680, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            tie_word_embeddings=False, **common,
        )
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size or 151_936, num_attention_heads=2, num_key_value_heads=1,
            tie_word_embeddings=True, use_sliding_window=False, **{**common, "max_position_embeddings": 1024},
        )
    if arch == "gemma3":
        return Gemma3TextConfig(
            vocab_size=vocab_size or 151_665, num_attention_heads=2, num_key_value_heads=1, head_dim=80,
            query_pre_attn_scalar=80, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
            final_logit_softcapping=30.0, attn_logit_softcapping=None, tie_word_embeddings=True,
            **{**common, "max_position_embeddings": 768},
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(TINY_ARCHS)}")


def build_tiny_model(arch: str, out: Path, seed: int = 0, tokenizer_dir: Path | None = None,
                     vocab_size: int | None = None, **overrides: object) -> Path:
    """Build a tiny random `arch` causal LM sharing the Qwen2 tokenizer and save it at `out`.

    `vocab_size` overrides the row count (a speculative-decoding draft must have exactly the
    ensemble's vocabulary size; a byte-level member has one row per byte and special token);
    `overrides` set further config fields (``final_logit_softcapping=None``: a linear Gemma3 head)."""
    from transformers import AutoModelForCausalLM

    tok_dir = tokenizer_dir or shared_tokenizer_dir()
    tokenizer = _load_tokenizer(str(tok_dir))
    config = _tiny_config(arch, tokenizer, vocab_size)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"tiny {arch} config has no field {key!r}")
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Biases and norm gains start at 0 / 1: randomise them too, so QKV bias and the norms
        # actually matter when an engine reimplements the architecture.
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, _INIT_STD)
            elif "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.config.dtype = torch.float32
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer_files(Path(tok_dir), out)
    return out


def build_tiny_ensemble(
    out: Path,
    members: Sequence[tuple[str, Path, float]],
    rule: str = "prob_mean",
    tokenizer_from: str | None = None,
) -> Path:
    """Build an ensemble folder at `out` from (name, model folder, weight) triples."""
    from ensemble.builder import build_ensemble
    from ensemble.manifest import MemberSpec

    return build_ensemble(
        out,
        [MemberSpec(name, str(path), weight) for name, path, weight in members],
        rule=rule,
        tokenizer_from=tokenizer_from,
    )


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The real Qwen2 tokenizer folder shared by every tiny model."""
    return shared_tokenizer_dir()


@pytest.fixture(scope="session")
def qwen_tokenizer(tokenizer_dir: Path):
    """The loaded Qwen2 tokenizer (treat as read-only)."""
    return _load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_model_builder() -> Callable[..., Path]:
    """`build_tiny_model` itself, for tests (a test module importing `conftest` by name would get
    whichever conftest module was imported first when several test folders are collected)."""
    return build_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    """{"llama": folder, "qwen2": folder, "gemma3": folder}: tiny models on the Qwen2 tokenizer."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        arch: build_tiny_model(arch, root / arch, seed=i, tokenizer_dir=tokenizer_dir)
        for i, arch in enumerate(TINY_ARCHS)
    }


@pytest.fixture(scope="session")
def tiny_ensemble(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    """An ensemble folder of the three tiny models (prob_mean, weights 1:2:1)."""
    out = tmp_path_factory.mktemp("ensembles") / "trio"
    return build_tiny_ensemble(
        out,
        [("llama", tiny_models["llama"], 1.0), ("qwen", tiny_models["qwen2"], 2.0),
         ("gemma", tiny_models["gemma3"], 1.0)],
        rule="prob_mean",
        tokenizer_from="qwen",
    )


@pytest.fixture(scope="session")
def tiny_self_ensemble(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    """The tiny Llama ensembled with itself: must behave exactly like the Llama alone."""
    out = tmp_path_factory.mktemp("ensembles") / "llama_twice"
    return build_tiny_ensemble(
        out,
        [("member_a", tiny_models["llama"], 1.0), ("member_b", tiny_models["llama"], 3.0)],
        rule="prob_mean",
    )


@pytest.fixture(scope="session")
def make_ensemble(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: make_ensemble([(name, folder, weight), ...], rule=..., tokenizer_from=...)."""
    counter = iter(range(10**6))

    def make(members: Sequence[tuple[str, Path, float]], rule: str = "prob_mean",
             tokenizer_from: str | None = None) -> Path:
        out = tmp_path_factory.mktemp("ensembles") / f"custom{next(counter)}"
        return build_tiny_ensemble(out, members, rule=rule, tokenizer_from=tokenizer_from)

    return make
