"""Evaluation statistics: sequence KL against exhaustive enumeration, win rate, best-of-N curve and fits by hand."""

import math

import pytest
import torch

from nanoalign.evaluate import best_of_n_curve, linear_fit, reference_kl, win_rate
from nanoalign.model import GPT, GPTConfig
from nanoalign.sampling import sample

V, EOS, PAD, L, TEMP = 6, 0, 5, 3, 0.8


def tiny(seed):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=8, vocab_size=V, n_layer=1, n_head=1, n_embd=16)).eval()
    with torch.no_grad():
        for p in model.parameters():  # far from init, so the two models' distributions differ clearly
            p.normal_(std=0.3)
    return model


@torch.no_grad()
def exact_sequence_kl(policy, reference, prompt):
    """Σ over every response (EOS-terminated, or cut at L tokens) of π(y) log π(y)/π_ref(y), in float64."""
    total, stack = 0.0, [(list(prompt), 0.0, 0.0)]  # (sequence, log π, log π_ref)
    while stack:
        seq, lp, lq = stack.pop()
        p = (policy(torch.tensor([seq]))[0, -1].double() / TEMP).log_softmax(-1)
        q = (reference(torch.tensor([seq]))[0, -1].double() / TEMP).log_softmax(-1)
        for v in range(V):
            lp_v, lq_v = lp + p[v].item(), lq + q[v].item()
            if v == EOS or len(seq) - len(prompt) + 1 == L:
                total += torch.tensor(lp_v).exp().item() * (lp_v - lq_v)
            else:
                stack.append((seq + [v], lp_v, lq_v))
    return total


def test_sequence_kl_estimates_match_enumeration():
    """Both estimators are unbiased for the exact sequence KL; within 4 standard errors."""
    policy, reference = tiny(0), tiny(1)
    prompt = [1, 2]
    exact = exact_sequence_kl(policy, reference, prompt)
    g = torch.Generator().manual_seed(0)
    batches = [sample(policy, [prompt] * 500, L, eos_id=EOS, pad_id=PAD, temperature=TEMP, generator=g)
               for _ in range(8)]
    per_sample = [reference_kl(policy, reference, [b], TEMP) for b in batches]  # 8 batch means
    for key in ("kl", "kl_k1"):
        means = torch.tensor([m[key] for m in per_sample])
        # sampled: 4 standard errors of the 8 batch means (+ float64 rounding, should they all agree)
        assert abs(means.mean().item() - exact) < 4 * means.std().item() / 8 ** 0.5 + 1e-9, key
    assert exact > 0.1
    zero = reference_kl(policy, policy, batches[:1], TEMP)
    # a model against itself: log-prob differences of the same fp32 forwards, 0 up to a few u of ~3 (~1e-6 summed)
    assert abs(zero["kl"]) < 1e-6 and abs(zero["kl_k1"]) < 1e-6


def test_win_rate_counts_ties_half():
    assert win_rate([1.0, 0.5, 0.2, 0.9], [0.5, 0.5, 0.3, 0.1]) == (1 + 0.5 + 0 + 1) / 4


def test_best_of_n_curve_properties():
    """n = 1 is the plain sample mean; the proxy of the RM-picked answer never falls as n grows."""
    from nanoalign.evaluate import best_of_n
    from nanoalign.tokenizer import Tokenizer
    tok = Tokenizer.train(["Where is my order #1234? It shipped."] * 10, vocab_size=280)
    torch.manual_seed(0)
    policy = GPT(GPTConfig(block_size=32, vocab_size=len(tok), n_layer=1, n_head=2, n_embd=16)).eval()
    rm = GPT(GPTConfig(block_size=32, vocab_size=len(tok), n_layer=1, n_head=2, n_embd=16, scalar_head=True)).eval()
    rows, selected = best_of_n(policy, tok, rm, 2.0, 0.5, ["Where is my order #1234?", "Hi"], n_max=8,
                               max_new_tokens=6, select=4)
    assert selected["n"] == 4 and selected["kl"] == rows[2]["kl"] and 0 <= selected["win_rate_vs_sft"] <= 1
    assert [r["n"] for r in rows] == [1, 2, 4, 8]
    assert rows[0]["kl"] == 0.0
    proxies = [r["proxy"] for r in rows]
    assert all(b >= a - 1e-9 for a, b in zip(proxies, proxies[1:])) and proxies[-1] > proxies[0]


def test_best_of_n_curve_by_hand():
    """The first prompt's proxy orders its answers 0 < 2 < 3 < 1: best of 2 over the C(4,2) = 6 pairs is answer 1
    in the 3 pairs holding it, answer 3 in 2, answer 2 in 1; the second prompt's answers all have gold 0.5."""
    proxy = torch.tensor([[0.1, 0.9, 0.3, 0.5], [2.0, 1.0, 4.0, 3.0]], dtype=torch.float64)  # [P = 2, N = 4]
    gold = torch.tensor([[1.0, 0.0, 2.0, 4.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    rows = best_of_n_curve(proxy, gold)
    assert [r["n"] for r in rows] == [1, 2, 4]
    # Python floats on hand values: ~1e-16, under pytest.approx's default rel 1e-6
    assert [r["kl"] for r in rows] == pytest.approx([0.0, math.log(2) - 1 / 2, math.log(4) - 3 / 4])
    first = [7 / 4, (3 * 0.0 + 2 * 4.0 + 1 * 2.0) / 6, 0.0]  # prompt 1: the mean, best of 2, the argmax's gold
    assert [r["gold"] for r in rows] == pytest.approx([(g + 0.5) / 2 for g in first])
    best2 = [(3 * 0.9 + 2 * 0.5 + 0.3) / 6, (3 * 4.0 + 2 * 3.0 + 2.0) / 6]
    assert [r["proxy"] for r in rows] == pytest.approx([(1.8 / 4 + 10 / 4) / 2, sum(best2) / 2, (0.9 + 4.0) / 2])


def test_linear_fit_by_hand():
    a, b, r2 = linear_fit([1, 2, 3], [2.5, 4.0, 5.5])  # exactly 1 + 1.5 x
    assert (a, b, r2) == pytest.approx((1.0, 1.5, 1.0))
    # y = 0, 1, 0, 1 at x = 0..3: slope Sxy / Sxx = 1 / 5, intercept 0.5 - 0.2 * 1.5 = 0.2; residuals -0.2 0.6
    # -0.6 0.2 leave 0.8 of the total sum of squares 1
    assert linear_fit([0, 1, 2, 3], [0, 1, 0, 1]) == pytest.approx((0.2, 0.2, 1 - 0.8 / 1.0))
    assert linear_fit([0, 1, 2], [3, 3, 3]) == pytest.approx((3.0, 0.0, 1.0))  # constant y: R² 1 by convention


def test_standard_error_by_hand():
    from nanoalign.evaluate import standard_error
    xs = [0.2, 0.5, 0.9, 0.4]
    mean = sum(xs) / 4
    assert abs(standard_error(xs) - (sum((x - mean) ** 2 for x in xs) / 3 / 4) ** 0.5) < 1e-12  # floats: ~1e-16
    assert standard_error([0.7]) == 0.0


def test_each_prompt_answers_alike_whatever_the_batch_and_length_limit():
    """One generator per prompt: an answer does not depend on its batch-mates, the batch size, or a longer limit
    (the sampler draws the same numbers for a row until its own EOS), so every eval.json's SFT baseline agrees."""
    from nanoalign.evaluate import sample_answers
    from nanoalign.tokenizer import Tokenizer
    tok = Tokenizer.train(["Where is my order #1234? It shipped."] * 10, vocab_size=280)
    torch.manual_seed(0)
    policy = GPT(GPTConfig(block_size=48, vocab_size=len(tok), n_layer=1, n_head=2, n_embd=16)).eval()
    prompts = [f"Where is my order #{1000 + i}?" for i in range(6)]
    full, _ = sample_answers(policy, tok, prompts, 20, batch_size=6, seed=3)
    split, _ = sample_answers(policy, tok, prompts, 20, batch_size=4, seed=3)
    longer, _ = sample_answers(policy, tok, prompts, 30, batch_size=6, seed=3)
    assert full == split
    assert all(b.startswith(a) for a, b in zip(full, longer))
    assert sample_answers(policy, tok, prompts, 20, batch_size=6, seed=4)[0] != full
