"""An ensemble of byte-level members (transfer's `ByteTokenizer`, students moved to bytes by ALM).

Byte-level members need no vocabulary intersection: ids 0..255 are the bytes for every one of
them. Here a tiny Llama and a tiny sliding-window Gemma3, each with a byte tokenizer of its own
family's special tokens (Qwen2's and Gemma-3's role tokens, so ids from 256 on differ), are built
into one ensemble; the reference engine's greedy decoding and prompt log-probs must equal pooling
full forward passes of the two models computed here, and the vLLM engine must match the reference
engine (vllm mark).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ensemble.manifest import EnsembleManifest
from ensemble.protocol import SamplingOptions
from ensemble.reference import ReferenceEngine
from transfer.byte_tokenizer import ByteTokenizer
from full_forward import pooled_full_forward, worst_gap_to_pooled

TEXT = "Bytes need no shared vocabulary: é, ü and 東京 too."


def _byte_member(root: Path, name: str, family: str, arch: str, seed: int, builder) -> Path:
    from transfer import zoo

    tokenizer = ByteTokenizer.like(AutoTokenizer.from_pretrained(zoo.tokenizer_dir(family)))
    tok_dir = root / f"{name}-tokenizer"
    tokenizer.save_pretrained(tok_dir)
    return builder(arch, root / name, seed=seed, tokenizer_dir=tok_dir, vocab_size=len(tokenizer))


@pytest.fixture(scope="module")
def byte_ensemble(tmp_path_factory: pytest.TempPathFactory, tiny_model_builder, make_ensemble) -> Path:
    root = tmp_path_factory.mktemp("byte_members")
    llama = _byte_member(root, "llama-bytes", "qwen2", "llama", 3, tiny_model_builder)
    gemma = _byte_member(root, "gemma-bytes", "gemma3", "gemma3", 4, tiny_model_builder)
    return make_ensemble([("llama", llama, 1.0), ("gemma", gemma, 2.0)], rule="prob_mean", tokenizer_from="llama")


def _prompt(folder: Path) -> list[int]:
    ids = AutoTokenizer.from_pretrained(folder)(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == list(TEXT.encode("utf-8"))  # one id per byte
    return ids


def test_byte_members_build_one_ensemble(byte_ensemble: Path) -> None:
    manifest = EnsembleManifest.load(byte_ensemble)
    own = len(AutoTokenizer.from_pretrained(manifest.members[0].path))
    assert 256 < manifest.vocab_size <= own  # the bytes, then (some of) the reference's specials


def test_reference_engine_pools_byte_members(byte_ensemble: Path) -> None:
    import asyncio

    manifest = EnsembleManifest.load(byte_ensemble)
    prompt = _prompt(byte_ensemble)
    models = [AutoModelForCausalLM.from_pretrained(m.path, dtype=torch.float32).eval() for m in manifest.members]
    options = SamplingOptions(max_tokens=12, temperature=0.0, logprobs=1, prompt_logprobs=1, ignore_eos=True)

    async def run():
        engine = ReferenceEngine(byte_ensemble)
        try:
            return [o async for o in engine.generate(prompt, options, "bytes")][-1]
        finally:
            await engine.shutdown()

    out = asyncio.run(run())
    tokens = out.outputs[0].token_ids
    assert all(0 <= t < manifest.vocab_size for t in tokens)
    # Gemma's byte tokenizer has other special tokens from id 256 on: it abstains there (masked).
    assert [m.vocab_size for m in manifest.members] == [manifest.vocab_size, 256]
    pooled = pooled_full_forward(manifest, models, prompt + tokens, manifest.rule, manifest.weights)
    worst = worst_gap_to_pooled(out, pooled)
    assert worst < 1e-4, worst


@pytest.mark.vllm
def test_vllm_serves_byte_members_like_the_reference_engine(byte_ensemble: Path) -> None:
    from vllm_harness import compare, run_engine, run_reference

    prompts = [_prompt(byte_ensemble), list(b"Hello"), list("To be, or not to be".encode())]
    worst = compare(run_engine(byte_ensemble, prompts).outputs, run_reference(byte_ensemble, prompts))
    print(f"byte-level llama+gemma3: max |logprob diff| {worst:.2e}")
