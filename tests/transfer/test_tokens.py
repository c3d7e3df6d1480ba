"""transfer.tokens on the real zoo tokenizers (Llama 3, Qwen2, Gemma 3, GPT-2) and a byte tokenizer."""

from __future__ import annotations

import random
from functools import lru_cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

from transfer import tokens, zoo

NAMES = ("llama3", "qwen2", "gemma3", "gpt2")


@lru_cache(maxsize=None)
def load(name: str):
    return AutoTokenizer.from_pretrained(zoo.tokenizer_dir(name))


@lru_cache(maxsize=None)
def byte_tokenizer():
    return tokens.ByteTokenizer.like(load("qwen2"))


def _tokenizer(name: str):
    return byte_tokenizer() if name == "bytes" else load(name)


# Text that exercises byte-level splits, SentencePiece spaces, normalisers, specials and code.
FRAGMENTS = [" ", "\n", "\t", "  ", "\r\n", "    ", "\n\n", "日本語", "中文", "한국어", "👍🏽", "👨\u200d👩\u200d👧", "é",
             "e\u0301", "def f(x):\n", "    return x", "{}", "'s", "<|im_start|>", "<|eot_id|>", "<start_of_turn>",
             "<s>", "</s>", "<0x41>", "▁", " the", "Hello", "123456"]
TEXT = st.lists(
    st.one_of(st.text(st.characters(codec="utf-8"), max_size=8), st.sampled_from(FRAGMENTS)), max_size=12
).map("".join)


def test_kind_is_read_from_the_backend():
    assert tokens.tokenizer_kind(load("llama3"))[0] == tokens.BYTE_LEVEL
    assert tokens.tokenizer_kind(load("qwen2"))[0] == tokens.BYTE_LEVEL
    assert tokens.tokenizer_kind(load("gpt2"))[0] == tokens.BYTE_LEVEL
    assert tokens.tokenizer_kind(load("gemma3")) == (tokens.SENTENCEPIECE, "▁")
    assert tokens.tokenizer_kind(byte_tokenizer())[0] == tokens.BYTE_LEVEL


@pytest.mark.parametrize("name", NAMES)
def test_token_bytes_agree_with_the_decoder(name):
    tok = load(name)
    table = tokens.token_bytes(tok)
    assert len(table) == len(tok)
    assert tokens.token_bytes(tok) is table  # cached
    for idx in tok.all_special_ids:
        assert table[idx] is None
    rng = random.Random(0)
    checked = 0
    for idx in rng.sample(range(len(tok)), 3000):
        piece = table[idx]
        if piece is None:
            continue
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError:
            continue  # part of a multi-byte character: the decoder shows U+FFFD
        assert tok.decode([idx]) == text, (name, idx, piece)
        checked += 1
    assert checked > 1000


def test_byte_fallback_tokens_are_bytes():
    tok = load("gemma3")
    table = tokens.token_bytes(tok)
    vocab = tok.get_vocab()
    for b in (0x00, 0x0A, 0x41, 0xC3, 0xFF):
        assert table[vocab[f"<0x{b:02X}>"]] == bytes([b])
    assert table[vocab["▁the"]] == b" the"
    assert table[vocab["<start_of_turn>"]] is None
    assert table[vocab["<s>"]] == b"<s>"  # Gemma's <s> is an ordinary HTML tag, not bos


def test_byte_level_tokens_use_the_gpt2_alphabet():
    tok = load("llama3")
    table = tokens.token_bytes(tok)
    vocab = tok.get_vocab()
    assert table[vocab["Ġthe"]] == b" the"
    assert table[vocab["Ċ"]] == b"\n"
    assert table[vocab["ĉ"]] == b"\t"
    assert table[vocab["<|eot_id|>"]] is None


@pytest.mark.parametrize("name", NAMES + ("bytes",))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_tokenize_bytes_covers_the_text(name, text):
    tok = _tokenizer(name)
    ids, pieces = tokens.tokenize_bytes(tok, text)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert len(pieces) == len(ids)
    assert b"".join(pieces) == text.encode("utf-8")


@pytest.mark.parametrize("name", ("llama3", "gemma3", "gpt2", "bytes"))
def test_lossless_tokenizers_use_their_own_token_bytes(name):
    tok = _tokenizer(name)
    text = "Hello  wörld!\n\n\tdef f(x):\n    return x  # 👍🏽 日本語 e\u0301"
    ids, pieces = tokens.tokenize_bytes(tok, text)
    table = tokens.token_bytes(tok)
    assert pieces == [table[i] for i in ids]


def test_normaliser_rewrites_get_the_original_bytes():
    tok = load("qwen2")  # NFC normaliser: "e" + U+0301 becomes "é"
    text = "cafe\u0301 ok"
    ids, pieces = tokens.tokenize_bytes(tok, text)
    assert b"".join(pieces) == text.encode()
    assert pieces[-1] == b" ok"
    table = tokens.token_bytes(tok)
    rewritten = [i for i, (idx, piece) in enumerate(zip(ids, pieces)) if table[idx] != piece]
    assert len(rewritten) == 1  # only the token holding the composed "é" differs
    assert "é".encode() in table[ids[rewritten[0]]] and "e\u0301".encode() in pieces[rewritten[0]]


def test_special_tokens_in_text_keep_their_literal_bytes():
    tok = load("qwen2")
    ids, pieces = tokens.tokenize_bytes(tok, "<|im_start|>user\nhi<|im_end|>")
    roles = tokens.special_roles(tok)
    assert ids[0] == roles["start_header"] and ids[-1] == roles["eot"]
    assert pieces == [b"<|im_start|>", b"user", b"\n", b"hi", b"<|im_end|>"]


def _llama2_style_tokenizer():
    """A Llama-2/Mistral-style SentencePiece BPE (dummy prefix, byte fallback), built locally."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "H", "e", "l", "o", "w", "r", "d", "ll", "▁w", "He", "llo", "Hello", "▁Hello", "or", "▁wor",
                  "ld", "▁world"]:
        vocab[piece] = len(vocab)
    merges = [("l", "l"), ("▁", "w"), ("H", "e"), ("ll", "o"), ("He", "llo"), ("▁", "Hello"), ("o", "r"),
              ("▁w", "or"), ("l", "d"), ("▁wor", "ld")]
    return LlamaTokenizer(vocab=vocab, merges=merges)


def test_sentencepiece_dummy_prefix_is_not_in_the_pieces():
    tok = _llama2_style_tokenizer()
    assert tokens.tokenizer_kind(tok) == (tokens.SENTENCEPIECE, "▁")
    ids, pieces = tokens.tokenize_bytes(tok, "Hello world")
    assert tok.convert_ids_to_tokens(ids) == ["▁Hello", "▁world"]
    assert pieces == [b"Hello", b" world"]
    ids, pieces = tokens.tokenize_bytes(tok, "\nHello")  # the prefix becomes its own token
    assert tok.convert_ids_to_tokens(ids)[:2] == ["▁", "<0x0A>"]
    assert pieces[:2] == [b"", b"\n"] and b"".join(pieces) == b"\nHello"
    ids, pieces = tokens.tokenize_bytes(tok, "é")
    assert b"".join(pieces) == "é".encode()


def test_special_roles_per_family():
    llama = tokens.special_roles(load("llama3"))
    vocab = load("llama3").get_vocab()
    assert llama == {
        "bos": vocab["<|begin_of_text|>"], "eos": vocab["<|end_of_text|>"], "pad": vocab["<|finetune_right_pad_id|>"],
        "start_header": vocab["<|start_header_id|>"], "end_header": vocab["<|end_header_id|>"],
        "eot": vocab["<|eot_id|>"], "end_of_text": vocab["<|end_of_text|>"],
    }
    qwen = tokens.special_roles(load("qwen2"))
    vocab = load("qwen2").get_vocab()
    assert "bos" not in qwen and "end_header" not in qwen  # "<s>" is plain text in Qwen's BPE vocab
    assert qwen["start_header"] == vocab["<|im_start|>"] and qwen["eot"] == vocab["<|im_end|>"]
    assert qwen["end_of_text"] == vocab["<|endoftext|>"]
    gemma = tokens.special_roles(load("gemma3"))
    vocab = load("gemma3").get_vocab()
    assert gemma["bos"] == vocab["<bos>"] and gemma["eos"] == vocab["<eos>"] and gemma["pad"] == vocab["<pad>"]
    assert gemma["start_header"] == vocab["<start_of_turn>"] and gemma["eot"] == vocab["<end_of_turn>"]
    gpt2 = tokens.special_roles(load("gpt2"))
    assert gpt2 == {"bos": 50256, "eos": 50256, "end_of_text": 50256}


def test_chatml_roles_on_a_llama_vocabulary():
    """SmolLM2 is a Llama-architecture model with ChatML markers: roles come from strings, not names."""
    backend = tokens.ByteTokenizer.build(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos_token="<|im_start|>",
                                         eos_token="<|im_end|>", pad_token="<|im_end|>")
    roles = tokens.special_roles(backend)
    assert roles["start_header"] == 257 and roles["eot"] == 258 and roles["end_of_text"] == 256
    assert tokens.start_token_id(backend) == 256  # not the chat marker declared as bos


@pytest.mark.slow
def test_smollm2_roles():
    tok = AutoTokenizer.from_pretrained(zoo.model_dir("smollm2"))
    vocab = tok.get_vocab()
    roles = tokens.special_roles(tok)
    assert roles["start_header"] == vocab["<|im_start|>"] and roles["eot"] == vocab["<|im_end|>"]
    assert roles["end_of_text"] == vocab["<|endoftext|>"]
    assert tokens.start_token_id(tok) == vocab["<|endoftext|>"]  # its declared bos is <|im_start|>


def test_start_token_id():
    vocab = {name: load(name).get_vocab() for name in NAMES}
    assert tokens.start_token_id(load("llama3")) == vocab["llama3"]["<|begin_of_text|>"]
    assert tokens.start_token_id(load("gemma3")) == vocab["gemma3"]["<bos>"]
    assert tokens.start_token_id(load("qwen2")) == vocab["qwen2"]["<|endoftext|>"]
    assert tokens.start_token_id(load("gpt2")) == vocab["gpt2"]["<|endoftext|>"]
    assert tokens.token_bytes(load("qwen2"))[tokens.start_token_id(load("qwen2"))] is None


def test_special_map_by_role():
    qwen, llama, gemma = load("qwen2"), load("llama3"), load("gemma3")
    q, ll, g = (tokens.special_roles(t) for t in (qwen, llama, gemma))
    mapping = tokens.special_map(qwen, llama)
    assert mapping == {q["eot"]: ll["eot"], q["start_header"]: ll["start_header"], q["end_of_text"]: ll["end_of_text"]}
    back = tokens.special_map(llama, gemma)
    assert back[ll["bos"]] == g["bos"] and back[ll["eot"]] == g["eot"] and back[ll["start_header"]] == g["start_header"]
    assert ll["end_header"] not in back  # Gemma has no end-of-header token


@pytest.mark.parametrize("name", NAMES)
def test_space_token_mask(name):
    tok = load(name)
    mask = tokens.space_token_mask(tok)
    assert mask.dtype == torch.bool and mask.shape == (len(tok),)
    table = tokens.token_bytes(tok)
    ids = tok(" the\nx\ty", add_special_tokens=False)["input_ids"]
    assert mask[ids[0]]  # " the"
    for idx in tok.all_special_ids:
        assert mask[idx]
    starts = [table[i][:1] for i in range(len(tok)) if mask[i] and table[i] is not None]
    assert set(starts) <= {b" ", b"\n", b"\t"}
    padded = tokens.space_token_mask(tok, vocab_size=len(tok) + 64)
    assert padded.shape == (len(tok) + 64,) and not padded[len(tok):].any()
    with pytest.raises(ValueError, match="smaller"):
        tokens.space_token_mask(tok, vocab_size=10)


def test_byte_tokenizer_is_a_real_fast_tokenizer(tmp_path):
    qwen = load("qwen2")
    tok = tokens.ByteTokenizer.like(qwen)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 256 + 3
    text = "héllo 👍\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode())
    assert tok.decode(ids) == text
    assert tokens.token_bytes(tok)[:256] == [bytes([b]) for b in range(256)]
    chat = [{"role": "user", "content": "hi"}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == qwen.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    chat_ids = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    chat_ids = chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids
    roles = tokens.special_roles(tok)
    assert chat_ids[0] == roles["start_header"] and roles["eot"] in chat_ids
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is not tokens.ByteTokenizer and isinstance(loaded, PreTrainedTokenizerFast)
    assert loaded(text + "<|im_end|>", add_special_tokens=False)["input_ids"] == ids + [roles["eot"]]
    assert loaded.eos_token == "<|im_end|>" and loaded.chat_template == tok.chat_template
    assert tokens.special_roles(loaded) == roles
    again = tokens.ByteTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids


def test_byte_tokenizer_rejects_unknown_role_tokens():
    with pytest.raises(ValueError, match="bos_token"):
        tokens.ByteTokenizer.build(("<a>",), bos_token="<b>", eos_token=None, pad_token=None)


def test_non_fast_tokenizers_are_refused():
    with pytest.raises(TypeError, match="fast"):
        tokens.token_bytes(object())


def test_load_tokenizer_keeps_the_saved_tokenizer_whatever_the_model_type(tmp_path) -> None:
    # A Qwen2 model moved onto Gemma-3's tokenizer: transformers 5's AutoTokenizer would load a
    # Qwen2Tokenizer (byte-level BPE) over Gemma's vocabulary because of the folder's model type.
    import json
    import shutil

    gemma = zoo.tokenizer_dir("gemma3")
    for f in gemma.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    text = "Hello  world, to be or not"
    want = AutoTokenizer.from_pretrained(gemma)(text)["input_ids"]
    assert tokens.load_tokenizer(tmp_path)(text)["input_ids"] == want
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] != want  # the trap itself
