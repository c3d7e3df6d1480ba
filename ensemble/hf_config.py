"""The ``config.json`` of an ensemble folder: what vLLM reads to load it (`hf_config`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ensemble.manifest_parts import ManifestError

if TYPE_CHECKING:
    from ensemble.manifest import EnsembleManifest


def _transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "5.0.0"


def hf_config(manifest: EnsembleManifest) -> dict[str, Any]:
    """The ``config.json`` that makes an ensemble folder loadable by vLLM.

    vLLM reads the architecture and sizes from here; the vLLM model class finds its members in
    the ``chorus`` entry (the manifest as a dict). Callers may extend the dict.
    """
    special = manifest.special_tokens
    config: dict[str, Any] = {
        "architectures": ["EnsembleForCausalLM"],
        "model_type": "chorus_ensemble",
        "chorus": manifest.to_dict(),
        "vocab_size": manifest.vocab_size,
        "max_position_embeddings": manifest.max_model_len,
        "torch_dtype": "float32",
        # Marks the folder as written for transformers 5 (which also silences a tokenizer check
        # that otherwise treats unknown local configs as old Mistral checkpoints).
        "transformers_version": _transformers_version(),
    }
    for role in ("bos", "eos", "pad"):
        value = getattr(special, role)
        if value is not None:
            config[f"{role}_token_id"] = value
    # Sizes vLLM derives its buffers and checks from (read from the members' own config.json,
    # so member paths must resolve, as they do after plan_ensemble / EnsembleManifest.load).
    # The ensemble's hidden state is the members' hidden states side by side, so hidden_size is
    # their sum; head counts are gcds, so a tensor-parallel size divides them exactly when it
    # divides every member's; the ensemble owns no embedding, so nothing is tied.
    from transformers import AutoConfig

    texts = []
    for member in manifest.members:
        try:
            texts.append(AutoConfig.from_pretrained(member.path).get_text_config())
        except (OSError, ValueError) as err:
            raise ManifestError(f"member {member.name!r}: cannot read the config.json in {member.path}: {err}") from None
    heads = [int(t.num_attention_heads) for t in texts]
    config.update(
        hidden_size=sum(int(t.hidden_size) for t in texts),
        num_hidden_layers=sum(int(t.num_hidden_layers) for t in texts),
        num_attention_heads=math.gcd(*heads),
        num_key_value_heads=math.gcd(*(int(getattr(t, "num_key_value_heads", None) or h)
                                        for t, h in zip(texts, heads))),
        head_dim=max(int(getattr(t, "head_dim", None) or t.hidden_size // h) for t, h in zip(texts, heads)),
        tie_word_embeddings=False,
    )
    return config


def write_manifest(manifest: EnsembleManifest, folder: str | Path) -> None:
    """Write `manifest` into `folder` (which must exist) as ``chorus_ensemble.json`` and the
    ``config.json`` that carries it for vLLM (`hf_config`), so that the two agree."""
    manifest.save(folder)
    (Path(folder) / "config.json").write_text(json.dumps(hf_config(manifest), indent=2) + "\n")
