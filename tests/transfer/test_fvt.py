"""FVT: new-vocabulary initialisation on tiny random Llama / Gemma-3 / Qwen2 models with real tokenizers."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from transfer import zoo
from transfer.fvt import average_rows, fvt_plan, init_student, load_target_tokenizer, save_model_folder
from transfer.tokens import ByteTokenizer, special_roles, token_bytes

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1)


@lru_cache(maxsize=None)
def tok(name: str):
    if name == "smollm2":
        return AutoTokenizer.from_pretrained(zoo.model_dir("smollm2"))
    return AutoTokenizer.from_pretrained(zoo.tokenizer_dir(name))


def fresh(name: str):
    """A new tokenizer object (init_student sets its chat template)."""
    return AutoTokenizer.from_pretrained(zoo.model_dir("smollm2") if name == "smollm2" else zoo.tokenizer_dir(name))


def llama(vocab: int, tied: bool = False):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, tie_word_embeddings=tied, **SMALL)).eval()


def gemma(vocab: int):
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=vocab, head_dim=16, sliding_window=16, **SMALL)
    return Gemma3ForCausalLM(cfg).eval()


def qwen(vocab: int):
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, **SMALL)).eval()


def old_rows(model):
    return model.get_input_embeddings().weight.detach().clone(), model.get_output_embeddings().weight.detach().clone()


def test_average_rows():
    old = torch.arange(12, dtype=torch.float32).view(4, 3)
    new = average_rows(old, [[1], [0, 2], []])
    assert torch.equal(new[0], old[1])
    assert torch.equal(new[1], (old[0] + old[2]) / 2)
    assert torch.allclose(new[2], old.mean(0))


@pytest.fixture(scope="module")
def llama_to_qwen2():
    """SmolLM2's tokenizer on a tiny untied Llama, moved onto Qwen2's tokenizer."""
    old_tok, new_tok = tok("smollm2"), fresh("qwen2")
    model = llama(len(old_tok), tied=False)
    emb, head = old_rows(model)
    plan = fvt_plan(old_tok, new_tok)
    init_student(model, old_tok, new_tok)
    return model, old_tok, new_tok, emb, head, plan


def test_shared_tokens_are_copied_and_new_ones_averaged(llama_to_qwen2):
    model, old_tok, new_tok, emb, head, plan = llama_to_qwen2
    new_emb = model.get_input_embeddings().weight
    new_head = model.get_output_embeddings().weight
    assert new_emb.shape == (len(new_tok), 32) and new_head.shape == (len(new_tok), 32)
    old_bytes, new_bytes = token_bytes(old_tok), token_bytes(new_tok)
    old_index = {b: i for i, b in enumerate(old_bytes) if b}
    # a token both vocabularies have: copied, on both matrices
    j = new_tok.convert_tokens_to_ids("Ġworld")
    i = old_index[new_bytes[j]]
    assert torch.equal(new_emb[j], emb[i]) and torch.equal(new_head[j], head[i])
    # a token SmolLM2 lacks: mean of the rows of its SmolLM2 tokenization
    j = next(k for k in range(10_000, 150_000) if new_bytes[k] and new_bytes[k] not in old_index
             and new_bytes[k].isascii())
    ids = old_tok(new_bytes[j].decode(), add_special_tokens=False)["input_ids"]
    assert plan[j] == ids and len(ids) > 1
    assert torch.allclose(new_emb[j], emb[ids].mean(0), atol=1e-6)
    assert torch.allclose(new_head[j], head[ids].mean(0), atol=1e-6)
    # every plain token got old tokens, except single bytes SmolLM2's vocabulary lacks (mean row)
    empty = [b for k, b in enumerate(new_bytes) if b and not plan[k]]
    assert all(len(b) == 1 and b not in old_index for b in empty) and len(empty) < 30


def test_special_tokens_map_by_role(llama_to_qwen2):
    model, old_tok, new_tok, emb, _, _ = llama_to_qwen2
    old_roles, new_roles = special_roles(old_tok), special_roles(new_tok)
    new_emb = model.get_input_embeddings().weight
    for role in ("eot", "start_header", "end_of_text"):
        assert torch.equal(new_emb[new_roles[role]], emb[old_roles[role]]), role
    # a Qwen2 special with no SmolLM2 counterpart: the mean of all old rows
    j = new_tok.convert_tokens_to_ids("<|vision_start|>")
    assert torch.allclose(new_emb[j], emb.mean(0), atol=1e-6)


def test_config_and_chat_template_follow_the_new_tokenizer(llama_to_qwen2):
    model, old_tok, new_tok, *_ = llama_to_qwen2
    assert model.config.vocab_size == len(new_tok) == 151_665
    assert model.config.tie_word_embeddings is False
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    assert model.config.eos_token_id == new_tok.convert_tokens_to_ids("<|im_end|>")
    assert model.config.pad_token_id == new_tok.convert_tokens_to_ids("<|endoftext|>")
    assert model.config.bos_token_id is None  # Qwen2 has no bos
    # SmolLM2's own chat format (its system prompt), written with Qwen2's tokens
    assert "SmolLM" in new_tok.chat_template
    text = new_tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text == old_tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)


def test_saved_folder_reloads_with_the_same_outputs(llama_to_qwen2, tmp_path):
    model, _, new_tok, *_ = llama_to_qwen2
    out = save_model_folder(model, new_tok, tmp_path / "student")
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([new_tok("To be, or not to be")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-5)
    assert again.config.tie_word_embeddings is False
    assert len(tok2) == len(new_tok) and tok2.chat_template == new_tok.chat_template
    with pytest.raises(FileExistsError):
        save_model_folder(model, new_tok, out)


@pytest.mark.slow
def test_tied_gemma3_moves_to_qwen2_and_keeps_its_scaled_embedding():
    old_tok, new_tok = tok("gemma3"), fresh("qwen2")
    model = gemma(len(old_tok))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    emb, _ = old_rows(model)
    cls = type(model.get_input_embeddings())
    init_student(model, old_tok, new_tok)
    assert type(model.get_input_embeddings()) is cls  # Gemma scales embeddings by sqrt(hidden)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # same rule, same old rows
    roles_old, roles_new = special_roles(old_tok), special_roles(new_tok)
    assert torch.equal(model.model.embed_tokens.weight[roles_new["eot"]], emb[roles_old["eot"]])
    assert "<|im_start|>" in new_tok.chat_template and "<start_of_turn>" not in new_tok.chat_template
    ids = torch.tensor([[new_tok.convert_tokens_to_ids("<|endoftext|>")] + new_tok("Hello world")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 3, len(new_tok)) and torch.isfinite(logits).all()
    # training the head does not move the embeddings any more
    model.lm_head.weight.data[0] += 1.0
    assert not torch.equal(model.lm_head.weight[0], model.model.embed_tokens.weight[0])


@pytest.mark.slow
def test_qwen2_moves_to_llama3():
    old_tok, new_tok = tok("qwen2"), fresh("llama3")
    model = qwen(len(old_tok))
    emb, _ = old_rows(model)
    init_student(model, old_tok, new_tok)
    assert model.config.vocab_size == len(new_tok) == 128_256
    j = new_tok.convert_tokens_to_ids("Ġthe")
    assert torch.equal(model.model.embed_tokens.weight[j], emb[old_tok.convert_tokens_to_ids("Ġthe")])
    assert model.config.bos_token_id == new_tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert torch.equal(model.model.embed_tokens.weight[new_tok.convert_tokens_to_ids("<|eot_id|>")],
                       emb[old_tok.convert_tokens_to_ids("<|im_end|>")])


def test_byte_level_target(tmp_path):
    old_tok = tok("smollm2")
    new_tok = load_target_tokenizer("bytes", old_tok)
    assert isinstance(new_tok, ByteTokenizer)
    model = llama(len(old_tok), tied=True)
    emb, _ = old_rows(model)
    init_student(model, old_tok, new_tok)
    assert model.config.vocab_size == len(new_tok) == 256 + len(set(special_roles(old_tok).values()))
    a = ord("a")
    assert torch.equal(model.model.embed_tokens.weight[a], emb[old_tok.convert_tokens_to_ids("a")])
    assert torch.equal(model.model.embed_tokens.weight[new_tok.convert_tokens_to_ids("<|im_end|>")],
                       emb[old_tok.convert_tokens_to_ids("<|im_end|>")])
    out = save_model_folder(model, new_tok, tmp_path / "bytes")
    again = AutoTokenizer.from_pretrained(out)
    assert again("hé")["input_ids"] == list("hé".encode())
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == len(new_tok)


@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
def test_gemma_and_qwen_architectures_move_to_bytes(arch):
    old_tok = tok(arch)
    model = (gemma if arch == "gemma3" else qwen)(len(old_tok))
    emb, _ = old_rows(model)
    cls = type(model.get_input_embeddings())
    _, new_tok = init_student(model, old_tok, load_target_tokenizer("bytes", old_tok))
    assert type(model.get_input_embeddings()) is cls
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert model.config.vocab_size == len(new_tok) and not model.config.tie_word_embeddings
    space = old_tok.convert_tokens_to_ids("\u2581" if arch == "gemma3" else "\u0120")
    assert torch.equal(model.get_input_embeddings().weight[ord(" ")], emb[space])
    eot = special_roles(old_tok)["eot"]
    assert torch.equal(model.get_input_embeddings().weight[special_roles(new_tok)["eot"]], emb[eot])
    ids = torch.tensor([[new_tok.convert_tokens_to_ids(new_tok.eos_token)] + list(b"Hello")])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
