"""Every zoo tokenizer loads offline and reproduces llama.cpp's golden token ids."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from transfer import zoo

SIZES = {"llama3": 128_256, "qwen2": 151_665, "gemma3": 262_144, "gpt2": 50_257}
SEPARATOR = "\n__ggml_vocab_test__\n"


def golden_cases(name: str) -> list[tuple[str, list[int]]]:
    """Parse llama.cpp's `.inp` (texts joined by a marker line) and `.out` (ids per line)."""
    folder = zoo.golden_dir()
    raw = (folder / f"{name}.inp").read_text(encoding="utf-8")
    texts = raw.removesuffix(SEPARATOR).split(SEPARATOR)  # some files end with the marker, some not
    ids = [[int(x) for x in line.split()] for line in (folder / f"{name}.out").read_text().splitlines()]
    assert len(texts) == len(ids), f"{name}: {len(texts)} texts vs {len(ids)} id lines"
    return list(zip(texts, ids))


@pytest.fixture(scope="module", params=sorted(SIZES))
def tokenizer(request):
    name = request.param
    return name, AutoTokenizer.from_pretrained(zoo.tokenizer_dir(name))


def test_loads_offline_with_expected_size(tokenizer):
    name, tok = tokenizer
    assert len(tok) == SIZES[name]
    assert Path(tok.name_or_path).is_relative_to(zoo.zoo_dir())


def test_reproduces_llama_cpp_golden_ids(tokenizer):
    name, tok = tokenizer
    cases = golden_cases(name)
    assert len(cases) >= 40
    wrong = [(text, tok.encode(text, add_special_tokens=False), ids) for text, ids in cases
             if tok.encode(text, add_special_tokens=False) != ids]
    assert not wrong, f"{name}: {len(wrong)} of {len(cases)} golden cases differ, first: {wrong[0]!r}"


def test_round_trips_text(tokenizer):
    name, tok = tokenizer
    text = "Hello wörld! 你好 🦙 \n\n  def f(x):\n\treturn x ** 2"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("name", ["qwen2", "gemma3"])
def test_chat_templates_render(name):
    tok = AutoTokenizer.from_pretrained(zoo.tokenizer_dir(name))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "Be brief." in text and "Hi" in text
    assert text.endswith("<|im_start|>assistant\n" if name == "qwen2" else "<start_of_turn>model\n")
