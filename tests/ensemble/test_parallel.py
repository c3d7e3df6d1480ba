"""Tensor-parallel sizes a member allows, and the engine's check before vLLM starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ensemble.parallel import MemberShape, check_tensor_parallel


def shape(heads: int, kv: int, inter: int | tuple[int, ...], name: str = "m") -> MemberShape:
    return MemberShape(name, heads, kv, inter if isinstance(inter, tuple) else (inter,))


def test_sizes_follow_vllms_three_rules() -> None:
    assert shape(32, 8, 14336).tp_sizes() == [1, 2, 4, 8, 16, 32]  # KV heads replicated past 8
    assert shape(14, 2, 4864).tp_sizes() == [1, 2]  # 7 splits the 14 heads but not the 2 KV heads
    assert shape(9, 3, 1536).tp_sizes() == [1, 3]  # 9 would split the heads but not 1536
    assert shape(4, 1, 2048).tp_sizes() == [1, 2, 4]
    assert shape(4, 4, (128, 130)).tp_sizes() == [1, 2]  # every layer's MLP must split


def test_shape_from_config_reads_text_config_and_defaults() -> None:
    nested = {"text_config": {"num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 64}}
    assert MemberShape.from_config("a", nested) == shape(8, 2, 64, name="a")
    no_kv = {"num_attention_heads": 6, "intermediate_size": [12, 24]}
    assert MemberShape.from_config("b", no_kv) == shape(6, 6, (12, 24), name="b")
    with pytest.raises(ValueError, match="member 'c': config.json lacks"):
        MemberShape.from_config("c", {"hidden_size": 8})
    with pytest.raises(ValueError, match="positive integers"):
        MemberShape.from_config("d", {"num_attention_heads": 0, "intermediate_size": 8})


def test_shape_from_folder_names_an_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="member 'x': cannot read"):
        MemberShape.from_folder("x", tmp_path)


def test_check_names_the_member_and_what_it_allows() -> None:
    members = [shape(4, 1, 2048, name="gemma"), shape(14, 2, 4864, name="qwen")]
    check_tensor_parallel(2, members)
    with pytest.raises(ValueError) as err:
        check_tensor_parallel(4, members)
    assert str(err.value) == (
        "tensor_parallel_size 4 does not fit member 'qwen' (14 attention heads, 2 KV heads, "
        "intermediate size 4864); it allows 1, 2"
    )
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            check_tensor_parallel(bad, members)


@pytest.mark.vllm
def test_engine_refuses_a_size_vllm_would_only_fail_on_mid_load(tiny_models, make_ensemble, tmp_path: Path) -> None:
    """vLLM's start-up check passes TP=4 (4 heads), but a 130-wide MLP cannot be split in four:
    the engine refuses it with one line before any vLLM process starts."""
    from vllm import EngineArgs

    from ensemble.vllm_engine import VLLMEngine

    odd = tmp_path / "odd"
    shutil.copytree(tiny_models["llama"], odd)
    config = json.loads((odd / "config.json").read_text())
    config["intermediate_size"] = 130
    (odd / "config.json").write_text(json.dumps(config))
    folder = make_ensemble([("odd", odd, 1.0)])

    args = EngineArgs(model=str(folder), tensor_parallel_size=4, max_model_len=96, enforce_eager=True, dtype="float32")
    assert args.create_engine_config().parallel_config.tensor_parallel_size == 4
    with pytest.raises(ValueError, match="tensor_parallel_size 4 does not fit member 'odd'.*allows 1, 2$"):
        VLLMEngine.from_folder(folder, tensor_parallel_size=4)


@pytest.mark.vllm
def test_vllm_start_check_agrees_on_the_tiny_trio(tiny_ensemble: Path) -> None:
    """The ensemble config's head count (the members' gcd) makes vLLM's own start-up check agree
    with ours on the tiny Llama + Qwen2 + Gemma3 ensemble, for N = 1..4."""
    from vllm import EngineArgs

    from ensemble.manifest import EnsembleManifest

    members = [MemberShape.from_folder(m.name, m.path) for m in EnsembleManifest.load(tiny_ensemble).members]
    verdicts = {}
    for n in range(1, 5):
        try:
            EngineArgs(model=str(tiny_ensemble), tensor_parallel_size=n, max_model_len=96, enforce_eager=True,
                       dtype="float32").create_engine_config()
            vllm_ok = True
        except ValueError as err:  # pydantic's ValidationError is a ValueError
            assert f"must be divisible by tensor parallel size ({n})" in str(err)
            vllm_ok = False
        verdicts[n] = (vllm_ok, all(m.fits(n) for m in members))
    assert verdicts == {1: (True, True), 2: (True, True), 3: (False, False), 4: (False, False)}
