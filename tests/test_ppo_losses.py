"""PPO maths (Ziegler et al. 2019; Schulman et al. 2016, 2017), each against a hand value or a float64 loop.

Values here are of size ~1 after a handful of ops: float64 ones agree to ~1e-15 (abs=1e-12 where stated), fp32
ones (decimal inputs such as 0.1 rounded to fp32) to a few FP32_EPS ≈ 1e-7 relative; pytest.approx's default
rel 1e-6 and torch.allclose's rtol 1e-5 hold on any IEEE CPU and catch a wrong coefficient (1e-2 or more).
The sampled KL estimators are held to 4 standard errors of their mean."""

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from nanoalign.losses import (adaptive_kl_beta, gae, grpo_advantages, kl_estimate, masked_mean, per_token_rewards,
                              ppo_policy_loss, ppo_value_loss, reward_normalisation, rloo_advantages, whiten)


def test_gae_against_float64_double_sum():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    lengths = [6, 4, 1]
    mask = torch.zeros(3, 6, dtype=torch.float64)
    for b, L in enumerate(lengths):
        mask[b, :L] = 1
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, L in enumerate(lengths):
        V = [values[b, t].item() if t < L else 0.0 for t in range(L + 1)]
        delta = [rewards[b, t].item() + gamma * V[t + 1] - V[t] for t in range(L)]
        for t in range(L):
            expected = sum((gamma * lam) ** l * delta[t + l] for l in range(L - t))
            assert adv[b, t].item() == pytest.approx(expected, abs=1e-12)
            assert ret[b, t].item() == pytest.approx(expected + V[t], abs=1e-12)
        assert (adv[b, L:] == 0).all() and (ret[b, L:] == 0).all()


def test_gae_special_cases_and_padding():
    g = torch.Generator().manual_seed(1)
    r, v = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.float64)
    adv, _ = gae(r, v, mask, gamma=1.0, lam=0.0)  # λ = 0: Â = δ
    v_next = torch.cat([v[:, 1:], torch.zeros(2, 1, dtype=torch.float64)], 1)
    assert torch.allclose(adv, r + v_next - v)
    adv, _ = gae(r, v, mask, gamma=1.0, lam=1.0)  # γ = λ = 1: Â_t = Σ_{k>=t} r_k - V_t
    assert torch.allclose(adv, r.flip(1).cumsum(1).flip(1) - v)
    assert torch.equal(gae(r, v, mask)[0], gae(r, v, mask, gamma=1.0, lam=0.95)[0])  # the defaults: γ 1, λ 0.95
    # extra padding columns (holding garbage) after the last token change nothing
    pad = lambda x, fill: torch.cat([x, torch.full((2, 3), fill, dtype=torch.float64)], 1)
    adv_pad, ret_pad = gae(pad(r, 7.0), pad(v, -3.0), pad(mask, 0.0), 0.95, 0.9)
    adv_ref, ret_ref = gae(r, v, mask, 0.95, 0.9)
    assert torch.allclose(adv_pad[:, :5], adv_ref) and torch.allclose(ret_pad[:, :5], ret_ref)
    # prompt columns before the response (as in a PPO rollout) change nothing either
    adv_pre, ret_pre = gae(pad(r, 7.0).roll(3, 1), pad(v, -3.0).roll(3, 1), pad(mask, 0.0).roll(3, 1), 0.95, 0.9)
    assert torch.allclose(adv_pre[:, 3:], adv_ref) and torch.allclose(ret_pre[:, 3:], ret_ref)
    assert (adv_pre[:, :3] == 0).all()


def test_value_alignment_a_shifted_slice_fails():
    """The value of position t must pair with the reward of the token it scores (detail 15)."""
    r = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[0.2, 0.5, 0.9]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.float64)
    adv, _ = gae(r, v, mask, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.8, 0.5, 0.1])  # hand: 1 - V_t
    shifted, _ = gae(r, torch.tensor([[0.0, 0.2, 0.5]], dtype=torch.float64), mask, 1.0, 1.0)
    assert shifted[0].tolist() != pytest.approx(adv[0].tolist())


def test_clipped_surrogate_hand_values_and_zero_gradients():
    eps = 0.2
    old = torch.zeros(1, 4, dtype=torch.float64)
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.7]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0]], dtype=torch.float64)
    logps = ratios.log().requires_grad_()
    mask = torch.ones(1, 4, dtype=torch.float64)
    loss, clipfrac, approx_kl = ppo_policy_loss(logps, old, adv, mask, eps)
    # per token: max(-A ρ, -A clip(ρ)) = [-1.2, 0.8, -2.2, -0.7]
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2 - 0.7) / 4)
    assert clipfrac.item() == pytest.approx(0.75)
    assert approx_kl.item() == pytest.approx(sum(math.log(x) ** 2 for x in (1.5, 0.5, 1.1, 0.7)) / 8)
    (grad,) = torch.autograd.grad(loss, logps)
    assert grad[0, 0] == 0 and grad[0, 1] == 0  # ρ > 1+ε with Â > 0, ρ < 1-ε with Â < 0: clipped, no gradient
    assert grad[0, 2] != 0 and grad[0, 3] != 0  # ρ < 1-ε with Â > 0 is not clipped (pessimistic bound)
    assert ppo_policy_loss(logps, old, adv, mask)[0].item() == loss.item()  # the default ε is 0.2


def test_clipped_value_loss_hand_values():
    old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[0.5, 0.1]])
    returns = torch.tensor([[1.0, 1.0]])
    loss, clipfrac = ppo_value_loss(values, old, returns, torch.ones(1, 2), clip_eps=0.2)
    # token 1: max((0.5-1)², (0.2-1)²) = 0.64; token 2: max(0.81, 0.81) = 0.81
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert clipfrac.item() == pytest.approx(0.5)
    old, values = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.1, 0.5]])  # V - V_old = 0.1 (kept), 0.5 (clipped)
    loss, clipfrac = ppo_value_loss(values, old, returns, torch.ones(1, 2))  # the default ε_v = 0.2
    assert loss.item() == pytest.approx(0.5 * (0.01 + max(0.25, 0.64)) / 2) and clipfrac.item() == 0.5


def test_sentinels_in_masked_slots_never_reach_a_loss():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    logps, old, adv = torch.tensor([[-1.0, -2.0, math.nan]]), torch.tensor([[-1.1, -1.9, 1.0]]), torch.tensor([[0.5, -0.3, math.nan]])
    loss, clipfrac, kl = ppo_policy_loss(logps, old, adv, mask)
    ref, _, _ = ppo_policy_loss(logps[:, :2], old[:, :2], adv[:, :2], mask[:, :2])
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item())


@pytest.mark.parametrize("sentinel", [math.nan, math.inf, -math.inf])
def test_sentinels_in_masked_slots_never_reach_values_whitening_or_gae(sentinel):
    """Selected away with `where`, not multiplied by the mask (0 · NaN = NaN): the values, their losses and
    gradients equal those of the same tensors with the masked slots cut off."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    clean = [torch.randn(2, 3, generator=g, dtype=torch.float64) * mask for _ in range(4)]
    dirty = [torch.where(mask.bool(), t, sentinel) for t in clean]
    for tensors in (clean, dirty):
        values = tensors[0].clone().requires_grad_(True)
        loss, _ = ppo_value_loss(values, tensors[1], tensors[2], mask)
        loss.backward()
        out = (loss, values.grad, whiten(tensors[3], mask), *gae(tensors[3], tensors[0], mask, 0.9, 0.8),
               per_token_rewards(torch.ones(2, dtype=torch.float64), tensors[1], mask, 0.1),
               masked_mean(tensors[3], mask))
        if tensors is clean:
            expected = out
    for got, want in zip(out, expected):
        assert torch.isfinite(got).all() and torch.allclose(got, want)


def test_reward_normalisation_population_std_and_constant_scores():
    s = torch.tensor([1.0, 2.0, 4.0, 9.0])
    gain, bias = reward_normalisation(s)
    mean = sum(s.tolist()) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in s.tolist()) / 4)  # population, not unbiased
    assert (gain, bias) == (pytest.approx(1 / std), pytest.approx(-mean / std))
    normed = gain * s.double() + bias
    assert normed.mean().item() == pytest.approx(0, abs=1e-12) and normed.std(correction=0).item() == pytest.approx(1)
    assert reward_normalisation(torch.full((5,), 0.3)) == (1.0, pytest.approx(-0.3))  # no spread: centre only
    assert reward_normalisation(s / 100) == (pytest.approx(100 / std), pytest.approx(-mean / std))  # std < 1
    shares = as_ranks(lambda rows, all_sum: reward_normalisation(s[rows], all_sum), [slice(0, 1), slice(1, 4)])
    assert shares[0] == shares[1] == (pytest.approx(gain), pytest.approx(bias))  # every rank: the whole's


def test_kl_estimators_on_gaussians():
    """q = N(0,1) sampled, p = N(μ,1): KL(q‖p) = μ²/2; k1, k3 unbiased, k3 >= 0, k2 biased at large μ."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400_000, generator=g, dtype=torch.float64)
    for mu in (0.1, 0.5, 1.5):
        logq, logp = -x ** 2 / 2, -(x - mu) ** 2 / 2  # normalising constants cancel
        exact = mu ** 2 / 2
        for kind in ("k1", "k3"):
            k = kl_estimate(logq, logp, kind)
            assert abs(k.mean().item() - exact) < 4 * k.std().item() / len(x) ** 0.5, (kind, mu)
        assert (kl_estimate(logq, logp, "k3") >= 0).all()
    k2 = kl_estimate(logq, logp, "k2")  # μ = 1.5: E[u²/2] = μ²/2 + μ⁴/8 ... biased upwards
    assert k2.mean().item() > 1.5 * exact
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logq, logp, "k4")


def test_kl_gradients_bernoulli():
    """Schulman 2020, "Approximating KL", derived:
    E_π[∇log π · k1] = ∇KL(π‖ref); E_π[∇log π · k3] = ∇KL(π‖ref) - ∇KL(ref‖π)."""
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    q = 0.6
    p = torch.sigmoid(theta)
    probs, ref = torch.stack([1 - p, p]), torch.tensor([1 - q, q], dtype=torch.float64)
    kl_fwd = (probs * (probs / ref).log()).sum()
    kl_rev = (ref * (ref / probs).log()).sum()
    (g_fwd,) = torch.autograd.grad(kl_fwd, theta, retain_graph=True)
    (g_rev,) = torch.autograd.grad(kl_rev, theta, retain_graph=True)
    for kind, expected in (("k1", g_fwd), ("k3", g_fwd - g_rev)):
        k = kl_estimate(probs.log().detach(), ref.log(), kind)  # reward held constant
        (g,) = torch.autograd.grad((probs.detach() * probs.log() * k).sum(), theta, retain_graph=True)
        assert g.item() == pytest.approx(expected.item(), abs=1e-12), kind


def test_adaptive_kl_controller_by_hand():
    kw = dict(kl_target=6.0, n_steps=512, horizon=10000)
    assert adaptive_kl_beta(0.15, 6.0, **kw) == pytest.approx(0.15)  # at target
    assert adaptive_kl_beta(0.15, 6.6, **kw) == pytest.approx(0.15 * (1 + 0.1 * 0.0512))  # above: grows
    assert adaptive_kl_beta(0.15, 3.0, **kw) == pytest.approx(0.15 * (1 - 0.2 * 0.0512))  # far below: clipped
    assert adaptive_kl_beta(0.15, 60.0, **kw) == pytest.approx(0.15 * (1 + 0.2 * 0.0512))  # far above: clipped


def test_per_token_rewards_land_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    r = per_token_rewards(torch.tensor([2.0, -1.0]), kl, mask, beta=0.1)
    assert r[0].tolist() == pytest.approx([-0.01, -0.02, -0.03 + 2.0, 0.0])
    assert r[1].tolist() == pytest.approx([-0.05 - 1.0, 0.0, 0.0, 0.0])
    r64 = per_token_rewards(torch.tensor([2.0, -1.0]), kl.double(), mask, beta=0.1)  # fp32 scores, fp64 KL
    assert r64.dtype == torch.float64 and torch.allclose(r64, r.double())


def test_whitening_masked_statistics():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 100.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    w = whiten(x, mask)
    real = w[mask.bool()]
    assert real.mean().item() == pytest.approx(0, abs=1e-12)
    # biased variance, as OAI-19; whiten divides by √(var + 1e-8): off 1 by 1e-8 / var ≈ 5e-9
    assert (real ** 2).mean().item() == pytest.approx(1, abs=1e-6)
    kept = whiten(x, mask, shift_mean=False)[mask.bool()]
    assert kept.mean().item() == pytest.approx(3.0) and kept.var(unbiased=False).item() == pytest.approx(1, abs=1e-6)
    assert (w[~mask.bool()] == 0).all()


def as_ranks(fn, shards):
    """fn(shard, all_sum) on each shard in its own thread, all_sum summing a tensor over the threads: a stand-in
    for data-parallel ranks and their all-reduce."""
    barrier, slots = threading.Barrier(len(shards)), [None] * len(shards)

    def all_sum(i, t):
        slots[i] = t
        barrier.wait()
        total = sum(slots)
        barrier.wait()  # every thread has read the slots before the next call overwrites them
        return total

    with ThreadPoolExecutor(len(shards)) as pool:
        return list(pool.map(lambda i: fn(shards[i], lambda t: all_sum(i, t)), range(len(shards))))


def test_sharded_batch_gives_the_whole_batch_statistics():
    """Rows split over two "ranks": whitening with a global all_sum, and losses divided by the global token
    count and then summed, equal the one-process values on the whole batch."""
    g = torch.Generator().manual_seed(2)
    logps, old, adv, values, ret = torch.randn(5, 6, 6, generator=g, dtype=torch.float64)
    mask = (torch.arange(6) < torch.tensor([6, 2, 5, 1, 4, 3])[:, None]).double()
    halves = [slice(0, 2), slice(2, 6)]  # uneven, as response lengths make them
    w = as_ranks(lambda rows, all_sum: whiten(adv[rows], mask[rows], all_sum=all_sum), halves)
    assert torch.allclose(torch.cat(w), whiten(adv, mask))
    n = mask.sum()
    for fn in (lambda m, **kw: ppo_policy_loss(logps[m], old[m], adv[m], mask[m], 0.1, **kw),
               lambda m, **kw: ppo_value_loss(values[m], old[m], ret[m], mask[m], 0.1, **kw)):
        parts = [torch.stack(fn(rows, n_tokens=n)) for rows in halves]
        assert torch.allclose(sum(parts), torch.stack(fn(slice(None))))


def test_rloo_and_grpo():
    R = torch.tensor([[1.0, 2.0, 4.0, 5.0], [3.0, 3.0, 3.0, 3.0]], dtype=torch.float64)
    loo = torch.tensor([[R[p, i] - (R[p].sum() - R[p, i]) / 3 for i in range(4)] for p in range(2)])
    assert torch.allclose(rloo_advantages(R), loo)
    grpo = grpo_advantages(R)
    std = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (4 - 3) ** 2 + (5 - 3) ** 2) / 3)
    assert grpo[0].tolist() == pytest.approx([(r - 3) / (std + 1e-4) for r in (1, 2, 4, 5)])
    assert (grpo[1] == 0).all() and (rloo_advantages(R)[1] == 0).all()
