"""Tiny random models with real tokenizers, for fast training / CLI / evaluation tests.

    python tests/transfer/helpers.py OUT [--tokenizer zoo:gpt2] [--arch llama|qwen2]

writes an HF model folder (random weights, a few hundred thousand parameters, plus the
tokenizer) that ``transfer run transfer/configs/tiny_test.yaml model.teacher=OUT`` can train.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

#: Architectures by name: (config class, model class, extra config).
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
}
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=1024)


def load_tokenizer(spec: str) -> Any:
    """A tokenizer from a folder or ``zoo:NAME`` (a zoo tokenizer, or a zoo model's)."""
    if spec.startswith("zoo:"):
        from transfer import zoo

        name = spec[4:]
        folder = zoo.tokenizer_dir(name) if name in zoo.TOKENIZERS else zoo.model_dir(name)
        return AutoTokenizer.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(spec)


def make_tiny_model(out: str | Path, tokenizer: str | Any = "zoo:gpt2", arch: str = "llama", seed: int = 0,
                    **overrides: Any) -> Path:
    """Write a tiny random ``arch`` model sized for ``tokenizer`` (plus the tokenizer) to ``out``."""
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    ids = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(tok, k) is not None}
    config = config_cls(vocab_size=len(tok), **{**SMALL, **extra, **ids, **overrides})
    model = model_cls(config)
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--tokenizer", default="zoo:gpt2", help="tokenizer folder or zoo:NAME")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="llama")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_tiny_model(args.out, args.tokenizer, args.arch, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
