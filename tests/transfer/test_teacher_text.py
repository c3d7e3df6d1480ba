"""bench/teacher_text.py: prompts are the first sentences of real paragraphs."""

from __future__ import annotations

import pytest

from bench.teacher_text import main, paragraph_openings, write_samples
from transfer.data import load_examples


def test_paragraph_openings_take_first_sentences_of_long_paragraphs() -> None:
    text = ("Short.\n\nThe first long paragraph starts here. Then it goes on and on.\n\n"
            "   \n\nSecond   long paragraph,\nwrapped over lines! It continues.\n\nThe third paragraph is long enough as well")
    assert paragraph_openings(text, 2) == ["The first long paragraph starts here.",
                                           "Second long paragraph, wrapped over lines!"]
    assert paragraph_openings(text, 5)[-1] == "The third paragraph is long enough as well"


def test_paragraph_openings_skip_and_spread() -> None:
    text = "\n\n".join(f"Paragraph number {i} is long enough to count. More." for i in range(10))
    first = [f"Paragraph number {i} is long enough to count." for i in range(10)]
    assert paragraph_openings(text, 3, skip=4) == first[4:7]
    assert paragraph_openings(text, 5, spread=True) == first[0::2]
    assert paragraph_openings(text, 4, skip=8, spread=True) == [first[8], first[9], first[8], first[9]]
    assert paragraph_openings(text, 3, skip=10, spread=True) == []


def test_samples_written_as_text_or_as_jsonl_training_data(tmp_path) -> None:
    texts = ["First sample.\n", "Second sample,\nwith a \"quote\"."]
    plain = write_samples(tmp_path / "out.txt", texts)
    assert plain.read_text(encoding="utf-8") == "First sample.\n\nSecond sample,\nwith a \"quote\".\n"
    data = write_samples(tmp_path / "out.jsonl", texts)
    assert [e.text for e in load_examples(data)] == ["First sample.", "Second sample,\nwith a \"quote\"."]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.txt"]


def test_cli_refuses_bad_counts(tmp_path) -> None:
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path / "out.txt"), "--samples", "0"])
    assert err.value.code == 2 and not (tmp_path / "out.txt").exists()
