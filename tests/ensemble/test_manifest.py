"""The ensemble folder format: manifest validation, the builder's checks, the CLI."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ensemble.builder import build_ensemble
from ensemble.cli import main as cli_main
from ensemble.cli import parse_member
from ensemble.manifest import (
    MANIFEST_FILE,
    EnsembleManifest,
    ManifestError,
    MemberSpec,
    SpecialTokens,
    hf_config,
)
from ensemble.pooling import EntropyGate


def _model_with_tokenizer(src_model: Path, tokenizer_dir: Path, out: Path) -> Path:
    """A member folder: `src_model`'s config and weights (linked) with another tokenizer."""
    out.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (out / name).symlink_to(src_model / name)
    for path in tokenizer_dir.iterdir():
        if path.is_file() and not path.name.startswith("."):
            shutil.copy2(path, out / path.name)
    return out


@pytest.fixture(scope="module")
def swapped_tokenizer(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """The Qwen2 tokenizer with the ids of two regular tokens (1000 and 2000) swapped."""
    out = tmp_path_factory.mktemp("swapped_tok")
    for path in tokenizer_dir.iterdir():
        if path.is_file() and not path.name.startswith("."):
            shutil.copy2(path, out / path.name)
    data = json.loads((out / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    vocab[by_id[1000]], vocab[by_id[2000]] = 2000, 1000
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    return out


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- round trip


def test_built_folder_round_trips(tiny_ensemble: Path, tiny_models: dict[str, Path]) -> None:
    manifest = EnsembleManifest.load(tiny_ensemble)
    assert manifest.name == "trio"
    assert manifest.member_names == ("llama", "qwen", "gemma")
    assert manifest.weights == (1.0, 2.0, 1.0)
    assert [Path(m.path) for m in manifest.members] == [
        tiny_models["llama"].resolve(), tiny_models["qwen2"].resolve(), tiny_models["gemma3"].resolve()
    ]
    tokenizer = AutoTokenizer.from_pretrained(tiny_ensemble)
    assert manifest.vocab_size == len(tokenizer) == 151_665
    assert tokenizer.model_max_length == 512
    # Llama 512, Qwen2 1024, Gemma 768 positions: the minimum wins.
    assert manifest.max_model_len == 512
    assert manifest.special_tokens == SpecialTokens(bos=None, eos=151645, eot=151645, pad=151643)
    assert tokenizer.convert_ids_to_tokens(151645) == "<|im_end|>"
    assert manifest.tokenizer_from == "qwen" and manifest.chat_template_from == "qwen"
    assert all(m.vocab_size == 151_665 for m in manifest.members)
    assert EnsembleManifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    # The shared tokenizer carries the chat template, in tokenizer_config.json too.
    assert "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "chat_template" in json.loads((tiny_ensemble / "tokenizer_config.json").read_text())
    config = json.loads((tiny_ensemble / "config.json").read_text())
    assert config == json.loads(json.dumps(hf_config(manifest)))
    assert config["architectures"] == ["EnsembleForCausalLM"]
    assert config["model_type"] == "chorus_ensemble"
    assert config["vocab_size"] == 151_665 and config["max_position_embeddings"] == 512
    assert config["chorus"]["members"][1]["name"] == "qwen"
    generation = json.loads((tiny_ensemble / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645]
    # No temporary folders left beside it.
    assert not [p for p in tiny_ensemble.parent.iterdir() if p.name.startswith(".")]


def test_relative_member_paths_resolve_against_the_folder(tiny_ensemble: Path, tmp_path: Path,
                                                          tiny_models: dict[str, Path]) -> None:
    data = json.loads((tiny_ensemble / MANIFEST_FILE).read_text())
    folder = tmp_path / "portable"
    folder.mkdir()
    (tmp_path / "llama_link").symlink_to(tiny_models["llama"])
    data["members"] = [{"name": "solo", "path": "../llama_link"}]
    data["tokenizer_from"] = data["chat_template_from"] = "solo"
    (folder / MANIFEST_FILE).write_text(json.dumps(data))
    manifest = EnsembleManifest.load(folder)
    assert manifest.members[0].path == str(tiny_models["llama"].resolve())
    assert manifest.members[0].weight == 1.0 and manifest.members[0].temperature == 1.0


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("name", ["member0", "m1x", "smollm-2", "", "a.b", "2a"])
def test_member_names_must_be_digit_free_identifiers(name: str) -> None:
    with pytest.raises(ManifestError, match="without digits"):
        MemberSpec(name=name, path="/x")


def test_member_field_validation() -> None:
    assert MemberSpec("member_a", "/x", weight=2).weight == 2.0
    with pytest.raises(ManifestError, match="weight must be a finite number"):
        MemberSpec("a", "/x", weight=float("nan"))
    with pytest.raises(ManifestError, match="temperature must be > 0"):
        MemberSpec("a", "/x", temperature=0.0)


def _manifest(**overrides) -> EnsembleManifest:
    fields = dict(
        name="e", members=(MemberSpec("a", "/a"), MemberSpec("b", "/b")), rule="prob_mean",
        vocab_size=100, max_model_len=64, special_tokens=SpecialTokens(eos=5),
    )
    fields.update(overrides)
    return EnsembleManifest(**fields)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"members": ()}, "at least one member"),
        ({"members": (MemberSpec("a", "/a"), MemberSpec("a", "/b"))}, "unique; repeated: a"),
        ({"rule": "max"}, "unknown pooling rule 'max'"),
        ({"members": (MemberSpec("a", "/a", weight=-1.0), MemberSpec("b", "/b", weight=2.0))},
         "member weights (a=-1.0, b=2.0): negative weights are only allowed with pooling 'logprob_mean'"),
        ({"members": (MemberSpec("a", "/a", weight=0.0),)}, "sum to a positive"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer"),
        ({"special_tokens": SpecialTokens(eos=100)}, "outside the shared vocabulary"),
        ({"tokenizer_from": "c"}, "tokenizer_from 'c' is not a member"),
        ({"name": " "}, "non-empty name"),
        ({"contrastive_alpha": 1.0}, "plausibility alpha must be a number in [0, 1), got 1.0"),
        ({"rule": "logprob_mean", "entropy_gate": EntropyGate((1.0,), ((0.1,),))},
         "entropy_gate is for 1 members, the ensemble has 2"),
        ({"entropy_gate": EntropyGate((1.0, 2.0), ((0.1, 0), (0, 0)))},
         "applies to rule 'logprob_mean' only, not 'prob_mean'"),
        ({"rule": "logprob_mean", "entropy_gate": EntropyGate((1.0, 2.0), ((0, 0.1), (0, 0))),
          "members": (MemberSpec("a", "/a"), MemberSpec("b", "/b", weight=0.0))},
         "reads the entropy of member 'b', whose weight is 0"),
    ],
)
def test_manifest_validation_messages(overrides: dict, message: str) -> None:
    with pytest.raises(ManifestError, match=re.escape(message)):
        _manifest(**overrides)


def test_negative_weights_allowed_for_logprob_mean() -> None:
    m = _manifest(rule="logprob_mean",
                  members=(MemberSpec("expert", "/a", weight=1.5), MemberSpec("amateur", "/b", weight=-0.5)))
    assert m.weights == (1.5, -0.5)


def test_without_idle_members() -> None:
    m = _manifest(rule="logprob_mean", tokenizer_from="b", chat_template_from="a",
                  members=(MemberSpec("a", "/a", weight=0.0), MemberSpec("b", "/b", weight=2.0)))
    served = m.without_idle_members()
    assert served.member_names == ("b",) and served.tokenizer_from == "b" and served.chat_template_from is None
    assert served.without_idle_members() is served and _manifest().without_idle_members() == _manifest()


def test_entropy_gate_round_trips_and_follows_the_served_members() -> None:
    gate = EntropyGate((2.0, 3.0, 4.0), ((0.1, -0.2, 0.0), (0.05, 0.0, 0.0), (0.3, 0.1, 0.0)))
    members = (MemberSpec("a", "/a"), MemberSpec("b", "/b"), MemberSpec("idle", "/c", weight=0.0))
    m = _manifest(rule="logprob_mean", members=members, entropy_gate=gate)
    data = json.loads(json.dumps(m.to_dict()))
    assert data["entropy_gate"]["centre"] == [2.0, 3.0, 4.0]
    assert EnsembleManifest.from_dict(data) == m and m.entropy_gate == gate
    # The idle member's centre, row and column leave with it.
    assert m.without_idle_members().entropy_gate == EntropyGate((2.0, 3.0), ((0.1, -0.2), (0.05, 0.0)))
    # All slopes zero is no gate; a malformed gate is a one-line error.
    assert _manifest(rule="logprob_mean", entropy_gate=EntropyGate((1, 1), ((0, 0), (0, 0)))).entropy_gate is None
    data["entropy_gate"]["slopes"] = [[0.1, math.nan, 0], [0, 0, 0], [0, 0, 0]]
    with pytest.raises(ManifestError, match="entropy_gate: entropy gate entries must be finite numbers"):
        EnsembleManifest.from_dict(data)
    data["entropy_gate"] = [[0.1]]
    with pytest.raises(ManifestError, match="entropy_gate must be an object with 'centre' and 'slopes'"):
        EnsembleManifest.from_dict(data)


def test_from_dict_rejects_unknown_fields() -> None:
    data = _manifest().to_dict()
    data["colour"] = "blue"
    with pytest.raises(ManifestError, match="unknown manifest field"):
        EnsembleManifest.from_dict(data)


def test_load_of_a_non_ensemble_folder(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="is not an ensemble folder"):
        EnsembleManifest.load(tmp_path)


# ----------------------------------------------------------------------------- the builder's checks


def test_gpt2_tokenizer_member_is_rejected_naming_the_first_difference(
    tmp_path: Path, tiny_models: dict[str, Path], qwen_tokenizer
) -> None:
    from transfer import zoo

    gpt2_dir = zoo.tokenizer_dir("gpt2")
    impostor = _model_with_tokenizer(tiny_models["llama"], gpt2_dir, tmp_path / "impostor")
    qwen, gpt2 = qwen_tokenizer, AutoTokenizer.from_pretrained(gpt2_dir)
    # Both are byte-level BPE, so their raw pieces are comparable: find the first difference.
    expected = next(i for i in range(len(gpt2)) if qwen.convert_ids_to_tokens(i) != gpt2.convert_ids_to_tokens(i))
    out = tmp_path / "bad"
    with pytest.raises(ManifestError) as err:
        build_ensemble(out, [MemberSpec("qwen", str(tiny_models["qwen2"])), MemberSpec("gpt", str(impostor))])
    message = str(err.value)
    assert "member 'gpt' does not share the vocabulary of 'qwen'" in message
    assert f"first difference at token id {expected}:" in message
    assert repr(qwen.convert_ids_to_tokens(expected)) in message
    assert repr(gpt2.convert_ids_to_tokens(expected)) in message
    assert not out.exists()
    assert _listing(tmp_path) == ["impostor"]  # nothing written, no temp folder left


def test_one_swapped_token_is_found(tmp_path: Path, tiny_models: dict[str, Path], swapped_tokenizer: Path,
                                    qwen_tokenizer) -> None:
    odd = _model_with_tokenizer(tiny_models["gemma3"], swapped_tokenizer, tmp_path / "odd")
    qwen = qwen_tokenizer
    with pytest.raises(ManifestError) as err:
        build_ensemble(tmp_path / "bad", [MemberSpec("base", str(tiny_models["llama"])), MemberSpec("odd", str(odd))])
    message = str(err.value)
    assert "member 'odd'" in message and "first difference at token id 1000:" in message
    assert f"'base' has {qwen.convert_ids_to_tokens(1000)!r}" in message
    assert f"'odd' has {qwen.convert_ids_to_tokens(2000)!r}" in message
    assert not (tmp_path / "bad").exists()


def test_too_few_embedding_rows_is_rejected(tmp_path: Path, tiny_models: dict[str, Path], tokenizer_dir: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    config = json.loads((tiny_models["llama"] / "config.json").read_text())
    config["vocab_size"] = 151_000
    (small / "config.json").write_text(json.dumps(config))
    for path in tokenizer_dir.iterdir():
        if path.is_file() and not path.name.startswith("."):
            shutil.copy2(path, small / path.name)
    with pytest.raises(ManifestError, match="member 'small' has 151000 embedding rows but the shared vocabulary has 151665"):
        build_ensemble(tmp_path / "bad", [MemberSpec("big", str(tiny_models["llama"])), MemberSpec("small", str(small))])


def test_builder_input_errors_write_nothing(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    llama = str(tiny_models["llama"])
    cases = [
        ([MemberSpec("a", llama), MemberSpec("b", str(tmp_path / "missing"))], {}, "is not a folder"),
        ([MemberSpec("a", llama, weight=-1.0), MemberSpec("b", llama)], {}, "negative weight"),
        ([MemberSpec("a", llama), MemberSpec("a", llama)], {}, "repeated: a"),
        ([MemberSpec("a", llama)], {"rule": "median"}, "unknown pooling rule"),
        ([MemberSpec("a", llama)], {"tokenizer_from": "zed"}, "tokenizer_from 'zed' is not a member"),
        ([MemberSpec("a", str(tmp_path))], {}, "has no config.json"),
    ]
    for members, kwargs, message in cases:
        with pytest.raises(ManifestError, match=message):
            build_ensemble(tmp_path / "out", members, **kwargs)
        assert not (tmp_path / "out").exists()
    assert _listing(tmp_path) == []


def test_existing_folder_needs_overwrite(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    out = tmp_path / "ens"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    members = [MemberSpec("solo", str(tiny_models["qwen2"]))]
    with pytest.raises(ManifestError, match="already exists"):
        build_ensemble(out, members)
    assert _listing(out) == ["keep.txt"]
    build_ensemble(out, members, overwrite=True, name="solo-ensemble")
    assert "keep.txt" not in _listing(out)
    assert EnsembleManifest.load(out).name == "solo-ensemble"
    assert _listing(tmp_path) == ["ens"]


# ----------------------------------------------------------------------------- the CLI


def test_parse_member() -> None:
    assert parse_member("a=/m/x:2.5") == MemberSpec("a", "/m/x", 2.5)
    assert parse_member("a=/m/x") == MemberSpec("a", "/m/x", 1.0)
    assert parse_member("a=/m/x:-0.5").weight == -0.5
    assert parse_member("a=c:/odd:path") == MemberSpec("a", "c:/odd:path", 1.0)
    with pytest.raises(ManifestError, match="NAME=PATH"):
        parse_member("just-a-path")


def test_cli_build_and_show(tmp_path: Path, tiny_models: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli_ens"
    status = cli_main([
        "build", str(out), "--member", f"expert={tiny_models['qwen2']}:1.5",
        "--member", f"amateur={tiny_models['gemma3']}:-0.5", "--rule", "logprob_mean",
        "--tokenizer-from", "expert", "--temperature", "amateur=2", "--contrastive-alpha", "0.25",
    ])
    assert status == 0
    assert f"wrote {out}" in capsys.readouterr().out
    manifest = EnsembleManifest.load(out)
    assert manifest.rule == "logprob_mean" and manifest.weights == (1.5, -0.5)
    assert manifest.temperatures == (1.0, 2.0) and manifest.contrastive_alpha == 0.25
    assert cli_main(["show", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["members"][0]["name"] == "expert"


def test_cli_errors_are_one_line(tmp_path: Path, tiny_models: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    status = cli_main(["build", str(tmp_path / "x"), "--member", f"member1={tiny_models['qwen2']}"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("ensemble: error: member name 'member1'") and err.count("\n") == 1
    status = cli_main(["build", str(tmp_path / "x"), "--member", f"a={tiny_models['qwen2']}:-1"])
    assert status == 2 and "negative weight" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- vocabulary sizes


def test_placeholders_and_specials_in_token_tables() -> None:
    from ensemble.vocab import TokenTable

    pieces = ("a", "b", "<|im_end|>", "[PAD3]", "[PAD4]")
    table = TokenTable("plain", tuple(p.encode() for p in pieces), pieces, 2, frozenset({2}))
    assert table.useful_size() == 3
    assert [table.is_text_token(i) for i in range(6)] == [True, True, False, False, False, False]


def test_member_without_special_tokens_is_masked_not_refused(
    tmp_path: Path, tiny_models: dict[str, Path], tokenizer_dir: Path
) -> None:
    """A member whose tokenizer stops before the shared special tokens may join; the ids it lacks
    get -inf from it. One lacking regular text tokens may not."""
    plain_tok = tmp_path / "plain_tok"
    plain_tok.mkdir()
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    data["added_tokens"] = []
    (plain_tok / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    (plain_tok / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    assert len(AutoTokenizer.from_pretrained(plain_tok)) == 151_643
    plain = _model_with_tokenizer(tiny_models["gemma3"], plain_tok, tmp_path / "plain")
    folder = build_ensemble(tmp_path / "ens", [MemberSpec("full", str(tiny_models["llama"])),
                                               MemberSpec("plain", str(plain))])
    manifest = EnsembleManifest.load(folder)
    assert manifest.vocab_size == 151_665
    assert [m.vocab_size for m in manifest.members] == [151_665, 151_643]

    import torch

    from ensemble.reference import Member

    member = Member(manifest.members[1], manifest.vocab_size, model=None, device="cpu")
    fitted = member.shared_logits(torch.zeros(1, 151_665))
    assert torch.isneginf(fitted[0, 151_643:]).all() and torch.isfinite(fitted[0, :151_643]).all()

    # The ids the plain member lacks (<|im_end|> among them) are pooled over the full member
    # alone: under logprob_mean the ensemble can still end a turn.
    from ensemble.pooling import member_logprobs, pool_logprobs
    from ensemble.reference import load_members

    eot = AutoTokenizer.from_pretrained(tiny_models["llama"]).convert_tokens_to_ids("<|im_end|>")
    assert eot >= 151_643
    members = load_members(manifest, "cpu", torch.float32)
    ids = torch.tensor([[9707, 11, 1879, 0]])
    rows = [m.shared_logits(m.model(input_ids=ids).logits[0]) for m in members]
    pooled = pool_logprobs(rows, [1.0, 1.0], "logprob_mean")
    assert torch.isfinite(pooled[:, :151_665]).all()
    # Within the ids only the full member has, the pool keeps the full member's own odds.
    full = member_logprobs(rows[0])
    torch.testing.assert_close(pooled[:, eot] - pooled[:, eot + 1], full[:, eot] - full[:, eot + 1], rtol=0, atol=1e-4)

    # The plain tokenizer as the reference: the other member's extra specials lie beyond it.
    folder = build_ensemble(tmp_path / "ens2", [MemberSpec("plain", str(plain)), MemberSpec("full", str(tiny_models["llama"]))])
    assert EnsembleManifest.load(folder).vocab_size == 151_643
