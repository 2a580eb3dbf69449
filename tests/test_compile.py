"""The fast paths against eager: torch.compile, activation checkpointing and the fused LM head give the same
logits, log-probs, gradients and samples."""

import copy

import pytest
import torch

from nanoalign.logprobs import token_logps
from nanoalign.model import GPT, GPTConfig, KVCache
from nanoalign.sampling import decode_step, model_logps, sample, static_decoder
from nanoalign.scaffold import Process, wrap_model
from tolerances import norm_close

pytestmark = pytest.mark.slow  # torch.compile of every block: the full suite only

CPU = Process(0, 1, torch.device("cpu"))


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=32))


def batch():
    idx = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(idx)
    mask[0, :6] = 0  # a left-padded row exercises the masked attention path
    return idx, mask


def logps_and_grads(model, logps_fn=token_logps):
    idx, mask = batch()
    logps = logps_fn(model(idx, attention_mask=mask)[:, :-1], idx[:, 1:])
    logps.sum().backward()
    return logps.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_same(a, b, rel):
    """Log-probs and each gradient within rel of the eager ones, norm-wise (fp32: kernels that fuse or recompute
    sum in their own order, a few FP32_EPS per op)."""
    (la, ga), (lb, gb) = a, b
    assert norm_close(la, lb, rel)
    for name in ga:
        assert norm_close(ga[name], gb[name], rel), name


def test_compiled_blocks_match_eager():
    eager = tiny_model()
    compiled = wrap_model(copy.deepcopy(eager), CPU, compile=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefixes
    # inductor fuses and reorders sums of <= 64 terms: <= 64u = 4e-6
    assert_same(logps_and_grads(compiled), logps_and_grads(eager), rel=1e-5)
    for n in range(2, 12):  # sampling runs the blocks eagerly: no recompile per prompt length and cache length
        sample(compiled, [list(range(1, n))], 8, eos_id=0, pad_id=0)


def test_compiled_logps_match_eager():
    """The chunked log-prob function compiled whole (one fused graph per chunk) against eager."""
    assert_same(logps_and_grads(tiny_model(), torch.compile(token_logps, fullgraph=True)),
                logps_and_grads(tiny_model()), rel=1e-5)


def test_activation_checkpointing_matches():
    """Recomputing each block in backward changes no log-prob and no gradient."""
    model = wrap_model(tiny_model(), CPU, activation_checkpointing=True)
    calls, mlp = [], model.transformer.h[0].mlp
    mlp.forward = lambda x, forward=mlp.forward: calls.append(1) or forward(x)
    assert_same(logps_and_grads(model), logps_and_grads(tiny_model()), rel=1e-6)  # same kernels recomputed
    assert len(calls) == 2  # the forward, and its recomputation in backward


def test_fused_head_matches_the_plain_head():
    """`model_logps` through the fused, recomputing LM head (`--fused_head`) gives the plain head's log-probs and
    every parameter's gradient, the tied embedding's included, on a batch with a left-padded row and a mask that
    scores part of each row, at temperature 0.7; compiled whole, the same again."""
    idx, mask = batch()
    scored = mask.clone()
    scored[:, :10] = 0  # the prompt: no log-prob there

    def run(model):
        logps = model_logps(model, idx, mask, scored, temperature=0.7)
        (logps * torch.linspace(-1, 2, logps.shape[-1])).sum().backward()  # a different weight per position
        return logps.detach(), {n: p.grad for n, p in model.named_parameters()}

    plain = run(wrap_model(tiny_model(), CPU))
    fused = wrap_model(tiny_model(), CPU, fused_head=True)
    calls = []
    fused.lm_head.forward = lambda x: calls.append(1)  # the fused path reads the weight, never the module
    assert_same(run(fused), plain, rel=1e-5)  # chunked sums of <= 64 terms: <= 64 u = 4e-6
    assert not calls and (plain[0] != 0).sum() == (scored[:, 1:] != 0).sum()
    whole = wrap_model(tiny_model(), CPU, fused_head=True)
    whole.compile()
    assert_same(run(whole), plain, rel=1e-5)


def test_compiled_static_decode_matches_eager_sampling():
    """The static-cache compiled decode step samples the same tokens as the eager dynamic cache (same seed),
    with left-padded prompts and rows that stop at EOS early, and its logits equal a full forward's."""
    model = GPT(GPTConfig(block_size=96, vocab_size=97, n_layer=2, n_head=2, n_embd=32)).eval()
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13]]
    runs = [sample(model, prompts, 40, eos_id=7, pad_id=0, generator=torch.Generator().manual_seed(3),
                   compile=compiled) for compiled in (False, True)]
    assert torch.equal(runs[0]["response_ids"], runs[1]["response_ids"])
    assert torch.equal(runs[0]["response_mask"], runs[1]["response_mask"])
    assert 0 < runs[0]["response_mask"][:, -1].sum() < 3  # some rows ended early, some ran to the limit

    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 20, 21]])
    cache = KVCache(model.config, 1, 64, "cpu")
    model(ids[:, :-1], kv_cache=cache)
    cache.make_static()
    mask = torch.zeros(1, 64, dtype=torch.long)
    mask[:, :8] = 1
    cache.slot.fill_(7)
    step = decode_step(model, ids[:, -1:], mask, torch.tensor([[7]]), cache)
    assert norm_close(step, model(ids)[:, -1], 1e-5)  # fp32, attention over a padded static cache: sums of <= 64

    # the compiled step and the per-shape caches live on the model: none in the module, none in its weights
    decoder = static_decoder(model)
    assert decoder.step is not None and [key[:2] for key in decoder.caches] == [(3, 64)]  # 6 + 40 tokens -> 64
    sample(model, prompts, 40, eos_id=7, pad_id=0, generator=torch.Generator().manual_seed(3), compile=True)
    assert len(decoder.caches) == 1  # the same shape reuses its cache
    other = GPT(model.config)
    assert static_decoder(other) is not decoder and not static_decoder(other).caches
    assert set(model.state_dict()) == set(other.state_dict())
