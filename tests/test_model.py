"""The model against a second implementation (transformers' GPT-2) and against itself under padding and caching."""

import pytest
import torch

from nanoalign.logprobs import token_logps
from nanoalign.model import GPT, GPTConfig, KVCache
from tolerances import norm_close

CFG = GPTConfig(block_size=32, vocab_size=61, n_layer=2, n_head=4, n_embd=64)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = GPT(CFG).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a mis-mapped tensor cannot hide
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def random_hf_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    hf_cfg = transformers.GPT2Config(vocab_size=61, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    return hf


def test_hf_gpt2_parity(tmp_path):
    hf = random_hf_gpt2(tmp_path)
    ours = GPT.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 61, (3, 20))
    with torch.no_grad():
        # fp32, other kernels (HF's Conv1D addmm, eager attention): sums of <= 64 terms, <= 64u = 4e-6 relative
        assert norm_close(ours(idx), hf(idx).logits, 1e-5)
        # with a left-padded attention mask too: HF derives no positions from the mask, so pass them
        mask = torch.ones_like(idx)
        mask[0, :5] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = hf(idx, attention_mask=mask, position_ids=pos).logits
        assert norm_close(ours(idx, attention_mask=mask)[mask.bool()], ref[mask.bool()], 1e-5)


def test_save_hf_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model()
    model.save_hf(tmp_path / "export")
    idx = torch.randint(0, 61, (2, 16))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    back = GPT.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert norm_close(hf(idx).logits, model(idx), 1e-5)  # fp32, other kernels: as in the parity test
        assert torch.equal(back(idx), model(idx))


def test_left_padding_invariance():
    """A left-padded row gives the same per-token log-probs on its real tokens as the row alone (N detail 2)."""
    model = tiny_model()
    lengths = [12, 7, 3]
    seqs = [torch.randint(0, 61, (n,)) for n in lengths]
    T = max(lengths)
    idx = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, s in enumerate(seqs):
        idx[b, T - len(s):], mask[b, T - len(s):] = s, 1
    with torch.no_grad():
        batched = token_logps(model(idx, attention_mask=mask)[:, :-1], idx[:, 1:])
        for b, s in enumerate(seqs):
            alone = token_logps(model(s[None])[:, :-1], s[None, 1:])[0]
            # fp32: padded and unpadded attention sum different numbers of terms (<= 12): a few u relative
            assert norm_close(batched[b, T - len(s):], alone, 1e-5)


def test_right_padding_leaves_real_tokens_unchanged():
    model = tiny_model()
    idx = torch.randint(0, 61, (1, 10))
    padded = torch.cat([idx, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 5)], 1).long()
    with torch.no_grad():
        assert norm_close(model(padded, attention_mask=mask)[:, :10], model(idx), 1e-5)  # fp32, as above
        assert torch.isfinite(model(padded, attention_mask=mask)).all()


def test_kv_cache_decoding_equals_full_forward():
    """Prefill a left-padded batch, then feed one token at a time: logits equal the full forward (fp32: attention
    sums over the cache in another order, a few u relative; 1e-5 norm-wise)."""
    model = tiny_model()
    idx = torch.randint(0, 61, (3, 20))
    mask = torch.ones_like(idx)
    mask[1, :4] = 0
    mask[2, :9] = 0
    with torch.no_grad():
        full = model(idx, attention_mask=mask)
        cache = KVCache(CFG, 3, 20, "cpu")
        steps = [model(idx[:, :8], attention_mask=mask[:, :8], kv_cache=cache)]
        for t in range(8, 20):
            steps.append(model(idx[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache))
    incremental = torch.cat(steps, 1)
    real = mask.bool()
    assert cache.length == 20
    assert norm_close(incremental[real], full[real], 1e-5)


def test_hidden_states_feed_the_lm_head():
    model = tiny_model()
    idx = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        hidden = model(idx, output="hidden")
        assert hidden.shape == (2, 9, 64)
        assert torch.allclose(model.lm_head(hidden), model(idx))  # the same ops: a few ulps at most (rtol 1e-5)


def test_scalar_head_init_and_loading(tmp_path):
    """Reward head ~ N(0, 1/sqrt(D+1)), bias 0 (N detail 8); an SFT checkpoint gains a head on request,
    a checkpoint with a head keeps it, and the head reads the same hidden states as the LM head."""
    from dataclasses import asdict
    from nanoalign.checkpoint import write_checkpoint
    from nanoalign.tokenizer import Tokenizer
    torch.manual_seed(0)
    wide = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=1024, scalar_head=True))
    assert abs(wide.scalar_head.weight.std().item() - 1 / 1025 ** 0.5) < 0.003  # 4 standard errors σ/√2048
    assert (wide.scalar_head.bias == 0).all()
    tok = Tokenizer.train(["a b c"] * 5, vocab_size=270)
    sft = tiny_model()
    sft.resize_vocab(len(tok))
    write_checkpoint(tmp_path / "sft", sft.state_dict(), {"model": asdict(sft.config)}, tok)
    rm = GPT.from_pretrained(tmp_path / "sft", scalar_head=True)
    idx = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        logits, scores = rm(idx, output="both")
        assert torch.allclose(logits, sft(idx))  # the same weights and ops: a few ulps (rtol 1e-5)
        assert torch.allclose(scores, rm.scalar_head(rm(idx, output="hidden"))[..., 0])
    write_checkpoint(tmp_path / "rm", rm.state_dict(), {"model": asdict(rm.config)}, tok)
    back = GPT.from_pretrained(tmp_path / "rm")
    assert back.config.scalar_head and torch.equal(back.scalar_head.weight, rm.scalar_head.weight)
    assert not hasattr(GPT.from_pretrained(tmp_path / "rm", scalar_head=False), "scalar_head")


def test_no_dropout_train_mode_equals_eval_mode():
    """No dropout (RLHF detail: dropout would make PPO's first ratio differ from 1): the model has no dropout
    module, and its train-mode forward equals its eval-mode forward."""
    model = tiny_model()
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    idx = torch.randint(0, 61, (2, 9))
    assert torch.equal(model.train()(idx), model.eval()(idx))


def test_resize_vocab_keeps_old_rows_and_ties():
    model = tiny_model()
    idx = torch.randint(0, 61, (1, 6))
    before = model(idx).detach()
    model.resize_vocab(64)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert norm_close(model(idx)[..., :61], before, 1e-6)  # the same rows; a wider matmul may block its sums apart
