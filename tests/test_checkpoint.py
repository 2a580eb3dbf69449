"""Checkpoints: safetensors + JSON round trip, atomic swap, optimizer state."""

from dataclasses import asdict

import pytest
import torch

import nanoalign.checkpoint as ckpt
from nanoalign.checkpoint import cut_trunk, load_model, read_meta, read_resume_state, write_checkpoint
from nanoalign.model import GPT, GPTConfig
from nanoalign.scaffold import full_state, load_optimizer_state, make_optimizer
from nanoalign.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["hello world, where is my order?"] * 10, vocab_size=280)


def trained_model(tok, steps=2):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32))
    opt = make_optimizer(model, 1e-2, 0.1)
    for _ in range(steps):
        model(torch.randint(0, len(tok), (2, 8))).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_round_trip_with_optimizer_state(tmp_path, tok):
    model, opt = trained_model(tok)
    model_state, optim_state = full_state(model, opt)
    rng_saved = torch.get_rng_state()
    write_checkpoint(tmp_path / "c", model_state, {"model": asdict(model.config), "step": 2}, tok,
                     (optim_state, {"torch": rng_saved}))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "config.json", "model.safetensors", "resume.safetensors", "tokenizer.json"]
    loaded, tok2 = load_model(tmp_path / "c")
    idx = torch.randint(0, len(tok), (2, 8))
    assert torch.equal(loaded(idx), model(idx)) and tok2.hash == tok.hash
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    # the optimizer comes back exactly: one more step from either gives the same weights
    opt2 = make_optimizer(loaded, 1e-2, 0.1)
    optim_back, rng = read_resume_state(tmp_path / "c")
    load_optimizer_state(loaded, opt2, optim_back)
    assert torch.equal(rng["torch"], rng_saved)
    for m, o in ((model, opt), (loaded, opt2)):
        m(idx).logsumexp(-1).mean().backward()
        o.step()
    for (n, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), n
    assert read_meta(tmp_path / "c")["step"] == 2


def test_kill_mid_save_leaves_previous_checkpoint(tmp_path, tok, monkeypatch):
    model, _ = trained_model(tok, steps=1)
    meta = {"model": asdict(model.config), "step": 1}
    write_checkpoint(tmp_path / "c", full_state(model), meta, tok)
    before = (tmp_path / "c" / "model.safetensors").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    newer, _ = trained_model(tok, steps=3)
    monkeypatch.setattr(ckpt.Tokenizer, "save", killed)  # dies after the weights were written to the temp dir
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "c", full_state(newer), {**meta, "step": 3}, tok)
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == before
    assert read_meta(tmp_path / "c")["step"] == 1
    load_model(tmp_path / "c", tok)  # still complete and loadable


def test_cut_trunk_keeps_the_first_blocks(tmp_path, tok):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=len(tok), n_layer=2, n_head=2, n_embd=32))
    write_checkpoint(tmp_path / "init", model.state_dict(), {"model": asdict(model.config), "step": 0}, tok)
    path, params = cut_trunk(tmp_path / "init", 1, tmp_path / "cut")
    cut, _ = load_model(path)
    assert cut.config.n_layer == 1 and params == cut.num_params() < model.num_params()
    kept = model.state_dict()
    assert all(torch.equal(v, kept[k]) for k, v in cut.state_dict().items())  # the same weights, block 2 gone
    assert not any(k.startswith("transformer.h.1.") for k in cut.state_dict())
    assert cut_trunk(tmp_path / "init", 2, tmp_path / "same") == (str(tmp_path / "init"), model.num_params())
    assert not (tmp_path / "same").exists()
