"""Data: loaders, resumable order, chat rendering, two-sided budget cut, collated batches."""

from __future__ import annotations

import json
from functools import lru_cache

import pytest
import torch
from transformers import AutoTokenizer

from transfer import zoo
from transfer.data import Example, PairCollator, ShuffledOrder, Side, load_examples, render, split_text
from transfer.errors import DataError
from transfer.fvt import transfer_chat_template
from transfer.tokens import ByteTokenizer, encode_text, start_token_id, tokenize_bytes


@lru_cache(maxsize=None)
def tok(name: str):
    if name == "smollm2":
        return AutoTokenizer.from_pretrained(zoo.model_dir("smollm2"))
    return AutoTokenizer.from_pretrained(zoo.tokenizer_dir(name))


TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 3


def test_split_text_cuts_at_lines_and_loses_nothing():
    text = zoo.corpus_path("heldout").read_text(encoding="utf-8")[:20_000] + "déjà vu 日本語 " * 50
    pieces = split_text(text, 300)
    assert all(len(p.encode()) <= 300 for p in pieces)
    assert sum(p.endswith("\n") for p in pieces) > len(pieces) * 0.8
    # whitespace-only pieces are dropped; everything else is kept in order
    assert "".join(pieces).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")


def test_load_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    assert [e.text for e in load_examples(tmp_path / "a.txt", chunk_bytes=100)] == split_text(TEXT, 100)
    lines = [{"text": "hello"}, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    ex = load_examples(tmp_path / "b.jsonl")
    assert ex[0] == Example(text="hello") and ex[1].messages[1] == {"role": "assistant", "content": "yo"}


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json}\n", "line 1 is not valid JSON"),
        ('{"foo": 1}\n', "neither a 'text' string nor a non-empty 'messages' list"),
        ('{"messages": [{"role": "user"}]}\n', "every message needs string 'role' and 'content'"),
        ("\n\n", "holds no examples"),
    ],
)
def test_bad_jsonl_gives_one_line_errors(tmp_path, content, message):
    (tmp_path / "x.jsonl").write_text(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_examples(tmp_path / "x.jsonl")
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="not found"):
        load_examples(tmp_path / "missing.txt")


def test_shuffled_order_is_deterministic_and_resumable():
    a = ShuffledOrder(7, seed=3)
    first = a.take(5) + a.take(5) + a.take(6)
    assert sorted(first[:7]) == list(range(7)) and sorted(first[7:14]) == list(range(7))
    b = ShuffledOrder(7, seed=3)
    b.take(5)
    state = b.state_dict()
    c = ShuffledOrder(7, seed=3)
    c.load_state_dict(state)
    assert c.take(11) == first[5:]
    assert ShuffledOrder(7, seed=4).take(7) != first[:7]
    with pytest.raises(DataError, match="resume with the same data"):
        ShuffledOrder(8, seed=3).load_state_dict(state)


def test_chat_without_a_template_is_a_clear_error():
    ex = Example(messages=({"role": "user", "content": "hi"},))
    with pytest.raises(DataError, match="needs a chat template but tokenizer .* has none"):
        render(ex, tok("llama3"))  # this Llama 3.2 export carries no chat template


def test_collator_aligns_and_cuts_both_sides():
    teacher, student = tok("smollm2"), tok("qwen2")
    collator = PairCollator(Side(teacher), Side(student), seq_len=16)
    t_ids, s_ids, chunks, n_bytes = collator.encode(Example(text=TEXT))
    assert len(t_ids) <= 16 and len(s_ids) <= 16
    assert t_ids[0] == start_token_id(teacher) and s_ids[0] == start_token_id(student)
    # both sides cover exactly the same prefix of the text
    t_text = teacher.decode(t_ids[1:])
    assert t_text == student.decode(s_ids[1:]) and TEXT.startswith(t_text) and len(t_text.encode()) == n_bytes
    assert chunks[0][0][0] == 0 and chunks[-1] == ((chunks[-1][0][0], len(t_ids)), (chunks[-1][1][0], len(s_ids)))
    # the cut is the longest chunk prefix that fits: the next chunk would overflow one side
    full = PairCollator(Side(teacher), Side(student), seq_len=10_000).encode(Example(text=TEXT))[2]
    nxt = full[len(chunks)]
    assert nxt[0][1] > 16 or nxt[1][1] > 16


def test_special_token_strings_in_plain_text_are_text():
    """The Treebank writes rare words as a literal "<unk>": Gemma's tokenizer would read it as its
    unknown-token special (no bytes) while SmolLM2's spells it out, and the two sides could not be
    aligned. In plain text it is text, on both sides and when scoring."""
    teacher, student = tok("smollm2"), tok("gemma3")
    text = "the <unk> in august was N million <start_of_turn>\n"
    t_ids, s_ids, _, n_bytes = PairCollator(Side(teacher), Side(student), seq_len=64).encode(Example(text=text))
    assert n_bytes == len(text.encode()) and student.unk_token_id not in s_ids
    assert student.decode(s_ids[1:]) == text
    assert encode_text(student, text) == s_ids[1:] and student.unk_token_id in student(text)["input_ids"]
    ids, pieces = tokenize_bytes(student, "a <unk>", parse_specials=False)
    assert b"".join(pieces) == b"a <unk>" and student.unk_token_id not in ids


def test_batch_tensors():
    teacher, student = tok("smollm2"), ByteTokenizer.like(tok("smollm2"))
    collator = PairCollator(Side(teacher), Side(student), seq_len=40)
    batch = collator([Example(text="Hello world, again."), Example(text=TEXT)])
    b, lt = batch["teacher_input_ids"].shape
    _, ls = batch["student_input_ids"].shape
    k = batch["chunk_mask"].shape[1]
    assert b == 2 and ls <= 40 and batch["teacher_chunks"].shape == (2, lt, k) and batch["student_chunks"].shape == (2, ls, k)
    # row 1 is cut at a chunk boundary: one byte token per covered byte after the start token
    assert int(batch["student_attention_mask"][1].sum()) == 1 + int(batch["text_bytes"][1]) == ls
    # every real token is in exactly one chunk, padding in none
    for side in ("teacher", "student"):
        per_token = batch[f"{side}_chunks"].sum(-1)
        assert torch.equal(per_token, batch[f"{side}_attention_mask"].float())
    # row 0: byte tokens after the start token spell the text
    n = int(batch["student_attention_mask"][0].sum())
    assert bytes(batch["student_input_ids"][0, 1:n].tolist()) == b"Hello world, again."
    assert batch["text_bytes"][0] == len(b"Hello world, again.")
    assert batch["chunk_mask"][0].sum() < batch["chunk_mask"][1].sum()


def test_chat_examples_align_special_tokens_by_role():
    """Gemma-3 teacher (its own chat markers), Qwen2 student with Gemma's format in Qwen2 tokens."""
    teacher, student = tok("gemma3"), tok("qwen2")
    template = transfer_chat_template(teacher, student)
    collator = PairCollator(Side(teacher), Side(student, template), seq_len=64)
    ex = Example(messages=({"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello."}))
    t_ids, s_ids, chunks, _ = collator.encode(ex)
    t_tok, s_tok = teacher.convert_ids_to_tokens(t_ids), student.convert_ids_to_tokens(s_ids)
    assert t_tok.count("<start_of_turn>") == 2 and s_tok.count("<|im_start|>") == 2
    for (t0, t1), (s0, s1) in chunks:  # each turn marker is a chunk of its own, matched by role
        if t_tok[t0:t1] == ["<start_of_turn>"]:
            assert s_tok[s0:s1] == ["<|im_start|>"]
        if t_tok[t0:t1] == ["<end_of_turn>"]:
            assert s_tok[s0:s1] == ["<|im_end|>"]
    assert t_ids.count(teacher.bos_token_id) == 1  # the template's own <bos> is the start token


def test_rendered_chat_uses_each_sides_template():
    teacher, student = tok("smollm2"), tok("qwen2")
    ex = Example(messages=({"role": "user", "content": "Hi"},))
    assert render(ex, teacher).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert render(ex, student).startswith("<|im_start|>system\nYou are Qwen")
    assert render(ex, student, transfer_chat_template(teacher, student)) == render(ex, teacher)
    ids, pieces = tokenize_bytes(student, render(ex, student))
    assert ids[0] == student.convert_tokens_to_ids("<|im_start|>")
