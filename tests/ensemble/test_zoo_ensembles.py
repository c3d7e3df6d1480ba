"""Slow: ensembles of the real zoo models (skipped when the zoo models are not built).

* Every zoo model ensembled with itself must decode exactly like the model alone (float32).
* Every pair of zoo models goes through the builder: a pair sharing a vocabulary must decode, a
  pair that does not must be refused with the first differing token named (SmolLM2, Gemma 3 and
  Qwen2.5 use three different tokenizers, and Gemma's is SentencePiece-style).
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ensemble.builder import build_ensemble
from ensemble.manifest import ManifestError, MemberSpec
from ensemble.pooling import fit_vocab
from ensemble.protocol import SamplingOptions
from ensemble.reference import ReferenceEngine

pytestmark = pytest.mark.slow

ZOO_MODELS = ("smollm2", "gemma3", "qwen2.5")


def _zoo_model(name: str) -> Path:
    from transfer import zoo

    path = zoo.model_dir(name, build=False)
    if not zoo.is_built(path):
        pytest.skip(f"zoo model {name} is not built (run the zoo build first)")
    return path


def _member_name(model: str) -> str:
    return "".join(ch for ch in model if ch.isalpha())  # digit-free: smollm, gemma, qwen


@pytest.mark.parametrize("model", ZOO_MODELS)
def test_zoo_model_with_itself_equals_the_model(model: str, tmp_path: Path) -> None:
    path = _zoo_model(model)
    folder = build_ensemble(
        tmp_path / "self", [MemberSpec("member_a", str(path), 1.0), MemberSpec("member_b", str(path), 2.0)]
    )
    engine = ReferenceEngine(folder)
    try:
        tok = engine.tokenizer
        messages = [{"role": "user", "content": "Name three colours."}]
        prompt = (tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
                  if tok.chat_template else tok("Name three colours:")["input_ids"])
        options = SamplingOptions(max_tokens=8, temperature=0.0, logprobs=1, ignore_eos=True)

        async def run():
            return [o async for o in engine.generate(list(prompt), options, "zoo")][-1]

        out = asyncio.run(run()).outputs[0]
        hf_model = engine.members[0].model  # the same float32 weights, used plainly
        with torch.no_grad():
            ids = torch.tensor([prompt])
            # An explicit mask: otherwise generate() masks prompt tokens equal to the pad id
            # (SmolLM2's pad is its <|im_end|>, which a chat prompt contains).
            hf = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True, eos_token_id=None)
        hf_tokens = hf.sequences[0, len(prompt):].tolist()
        assert out.token_ids == hf_tokens
        for entry, logits in zip(out.logprobs, hf.logits):
            expected = torch.log_softmax(fit_vocab(logits[0].float(), engine.manifest.vocab_size), -1)
            assert abs(entry.logprob - float(expected[entry.token_id])) < 1e-4
    finally:
        asyncio.run(engine.shutdown())


@pytest.mark.parametrize(("first", "second"), list(itertools.combinations(ZOO_MODELS, 2)))
def test_zoo_pairs_are_built_or_refused_clearly(first: str, second: str, tmp_path: Path) -> None:
    a, b = _zoo_model(first), _zoo_model(second)
    members = [MemberSpec(_member_name(first), str(a)), MemberSpec(_member_name(second), str(b))]
    try:
        folder = build_ensemble(tmp_path / "pair", members)
    except ManifestError as err:
        assert f"member {_member_name(second)!r} does not share the vocabulary" in str(err) or "lacks token id" in str(err)
        assert not (tmp_path / "pair").exists()
        return
    engine = ReferenceEngine(folder)
    try:
        async def run():
            opts = SamplingOptions(max_tokens=4, temperature=0.0)
            return [o async for o in engine.generate(engine.tokenizer("Hello")["input_ids"], opts, "p")][-1]

        assert asyncio.run(run()).outputs[0].token_ids
    finally:
        asyncio.run(engine.shutdown())


def test_real_qwen_with_a_tiny_qwen_shares_the_vocabulary(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """The zoo's Qwen2.5 (a GGUF export whose tokenizer pads to 151,936 with [PADnnn] fillers)
    and a tiny model on the plain Qwen2 tokenizer (151,665 tokens) share a vocabulary."""
    path = _zoo_model("qwen2.5")
    folder = build_ensemble(tmp_path / "mixed", [MemberSpec("qwen", str(path), 3.0),
                                                 MemberSpec("tiny", str(tiny_models["qwen2"]), 1.0)])
    engine = ReferenceEngine(folder)
    try:
        assert engine.manifest.vocab_size == 151_665
        assert engine.manifest.special_tokens.eos == 151645

        async def run():
            opts = SamplingOptions(max_tokens=4, temperature=0.0, logprobs=1)
            return [o async for o in engine.generate(engine.tokenizer("def add(a, b):")["input_ids"], opts, "m")][-1]

        out = asyncio.run(run()).outputs[0]
        assert len(out.token_ids) >= 1 and all(t < 151_665 for t in out.token_ids)
    finally:
        asyncio.run(engine.shutdown())
