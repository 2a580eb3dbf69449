"""Tokenizer: special tokens, the one chat template, hashes."""

import json

import pytest

from nanoalign.checkpoint import write_checkpoint
from nanoalign.data import encode_example
from nanoalign.tokenizer import EOS, PAD, ROLES, Tokenizer, check_tokenizer_hash, render_prompt

TEXTS = ["Where is my order #4821?", "Your order #4821 shipped yesterday.", "Thanks for reaching out!"] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=300)


def test_special_tokens_are_single_distinct_ids(tok):
    assert tok.pad_id != tok.eos_id
    for special in (EOS, PAD, *ROLES.values()):
        assert len(tok.encode(special)) == 1
    assert tok.decode(tok.encode("Where is my order #4821?")) == "Where is my order #4821?"


def test_render_prompt_string_and_messages_agree():
    assert render_prompt("hi") == render_prompt([{"role": "user", "content": "hi"}]) == "<|user|>hi<|assistant|>"
    multi = render_prompt([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "a"},
                           {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])
    assert multi == "<|system|>Be kind.<|user|>a<|assistant|>b<|endoftext|><|user|>c<|assistant|>"
    with pytest.raises(ValueError, match="unknown role"):
        render_prompt([{"role": "bot", "content": "x"}])


def test_prompt_then_response_tokenizes_as_one_string(tok):
    """Every stage builds prompt + response + EOS through encode_example; tokenizing the prompt and the response
    apart gives the same ids as the whole rendered conversation (the role marker is a hard boundary)."""
    ids, n_prompt = encode_example(tok, "Where is my order #4821?", "Your order #4821 shipped yesterday.", 128)
    whole = tok.encode(render_prompt("Where is my order #4821?") + "Your order #4821 shipped yesterday." + EOS)
    assert ids == whole
    assert ids[-1] == tok.eos_id and ids[n_prompt - 1] == tok.encode(ROLES["assistant"])[0]


def test_gpt2_style_tokenizer_gets_missing_specials(tmp_path, tok):
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers
    bare = HF(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel()
    bare.add_special_tokens([EOS])  # like GPT-2: EOS only
    bare.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.load(tmp_path)
    assert loaded.pad_id is not None and loaded.pad_id != loaded.eos_id


def test_hash_mismatch_is_a_clear_error(tmp_path, tok):
    write_checkpoint(tmp_path / "ckpt", {}, {"step": 0}, tok)
    check_tokenizer_hash(tok, tmp_path / "ckpt")  # same tokenizer: fine
    other = Tokenizer.train(TEXTS + ["something else entirely"] * 5, vocab_size=310)
    assert other.hash != tok.hash
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        check_tokenizer_hash(other, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["tokenizer_hash"] == tok.hash
