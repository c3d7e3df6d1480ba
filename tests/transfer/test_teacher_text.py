"""bench/teacher_text.py: prompts are the first sentences of real paragraphs."""

from __future__ import annotations

import pytest

from bench.teacher_text import main, paragraph_openings


def test_paragraph_openings_take_first_sentences_of_long_paragraphs() -> None:
    text = ("Short.\n\nThe first long paragraph starts here. Then it goes on and on.\n\n"
            "   \n\nSecond   long paragraph,\nwrapped over lines! It continues.\n\nThe third paragraph is long enough as well")
    assert paragraph_openings(text, 2) == ["The first long paragraph starts here.",
                                           "Second long paragraph, wrapped over lines!"]
    assert paragraph_openings(text, 5)[-1] == "The third paragraph is long enough as well"


def test_cli_refuses_bad_counts(tmp_path) -> None:
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path / "out.txt"), "--samples", "0"])
    assert err.value.code == 2 and not (tmp_path / "out.txt").exists()
