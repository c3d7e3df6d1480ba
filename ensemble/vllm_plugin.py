"""vLLM plugin: teaches vLLM the ensemble folder format (``model_type: chorus_ensemble``).

vLLM calls `register` in every process it starts (front end, engine core, workers) through the
``vllm.general_plugins`` entry point declared in ``pyproject.toml``. It registers

* `EnsembleConfig` with transformers' ``AutoConfig``, so ``config.json`` of an ensemble folder
  loads (vLLM has no config class of its own for an unknown ``model_type``);
* the model class ``EnsembleForCausalLM`` with vLLM's ``ModelRegistry``, lazily (a
  ``module:class`` string), so importing the plugin does not import the model code.

After that ``vllm serve <ensemble folder>`` / ``LLM(<ensemble folder>)`` work like for any model.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

MODEL_TYPE = "chorus_ensemble"
ARCHITECTURE = "EnsembleForCausalLM"
MODEL_CLASS_PATH = "ensemble.vllm_model:EnsembleForCausalLM"


@strict
class EnsembleConfig(PreTrainedConfig):
    """The Hugging Face config of an ensemble folder (written by `ensemble.manifest.hf_config`).

    ``chorus`` holds the manifest (members, weights, rule, vocabulary); the sizes describe the
    ensemble as vLLM sees it: ``hidden_size`` is the sum of the members' hidden sizes (the
    ensemble's hidden state is the members' hidden states side by side), ``num_hidden_layers``
    the total layer count, ``num_attention_heads`` / ``num_key_value_heads`` the greatest
    common divisors of the members' (so a tensor-parallel size divides them exactly when it
    divides every member's), ``max_position_embeddings`` the minimum over members.
    """

    model_type = MODEL_TYPE

    chorus: dict[str, Any] | None = None
    vocab_size: int = 0
    max_position_embeddings: int = 0
    hidden_size: int = 0  # 0: unknown; the model class then asks for a rebuild
    num_hidden_layers: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    tie_word_embeddings: bool = False


def register() -> None:
    """Register the ensemble's config class and model class (idempotent, any process)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    AutoConfig.register(MODEL_TYPE, EnsembleConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS_PATH)
