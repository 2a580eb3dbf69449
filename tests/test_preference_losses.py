"""Bradley-Terry, K-wise, Plackett-Luce, best-of-K, soft labels and the preference losses (the DPO family, KTO,
ORPO), each computed a second way.

Every comparison is of float64 values of size ~1 after a handful of ops, so they agree to ~1e-15: the stated
abs=1e-12 and the defaults (pytest.approx rel 1e-6, torch.allclose rtol 1e-5) are far above that, and far below
the 1e-2 a wrong coefficient or sign makes."""

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F

from nanoalign.losses import (PER_ANSWER, PREFERENCE_LOSSES, REFERENCE_FREE, Answers, LossParams, best_of_k_loss,
                              bradley_terry_loss, kto_loss, kto_reference_point, kwise_ranking_loss, log1mexp, log_odds,
                              orpo_loss, plackett_luce_loss, preference_loss, soft_bradley_terry_loss)


def test_bradley_terry_equals_bce_and_hand_value():
    rc, rr = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    bce = F.binary_cross_entropy_with_logits(rc - rr, torch.ones(10, dtype=torch.float64))
    assert torch.allclose(bradley_terry_loss(rc, rr), bce)
    # log(1 + e⁻¹) to 5 decimals (±5e-6), computed in fp32 (±1e-7)
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(0.31326, abs=1e-5)
    m = torch.rand(10, dtype=torch.float64)
    assert torch.allclose(bradley_terry_loss(rc, rr, m), bradley_terry_loss(rc - m, rr))


def test_kwise_equals_mean_over_all_pairs():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 4, generator=g, dtype=torch.float64)
    ranking = torch.stack([torch.randperm(4, generator=g) for _ in range(3)])
    per_prompt = []
    for n in range(3):
        order = ranking[n].tolist()
        pairs = [(order[a], order[b]) for a, b in itertools.combinations(range(4), 2)]  # (better, worse)
        per_prompt.append(sum(math.log1p(math.exp(rewards[n, j] - rewards[n, i])) for i, j in pairs) / len(pairs))
    assert kwise_ranking_loss(rewards, ranking).item() == pytest.approx(sum(per_prompt) / 3, abs=1e-12)


def test_plackett_luce_k2_is_bt_and_k3_is_sequential_softmax():
    r = torch.randn(5, 2, dtype=torch.float64)
    ranking = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [1, 0]])
    best, worst = r.gather(1, ranking[:, :1])[:, 0], r.gather(1, ranking[:, 1:])[:, 0]
    assert torch.allclose(plackett_luce_loss(r, ranking), bradley_terry_loss(best, worst))
    assert torch.allclose(kwise_ranking_loss(r, ranking), bradley_terry_loss(best, worst))
    r3 = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64)
    order = [2, 0, 1]
    p = r3[0].exp()
    prob = p[2] / p.sum() * p[0] / (p[0] + p[1])  # choose 2 first from all, then 0 from {0, 1}
    assert plackett_luce_loss(r3, torch.tensor([order])).item() == pytest.approx(-math.log(prob) / 2, abs=1e-12)


def test_best_of_k_is_a_softmax_pick_and_k2_is_bt():
    """-log of P(best) = e^{r_best} / sum_j e^{r_j}, written out in a float64 loop; at K = 2 it is Bradley-Terry
    (only the best answer's index is read, so any order of the rest gives the same loss)."""
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(3, 4, generator=g, dtype=torch.float64)
    ranking = torch.stack([torch.randperm(4, generator=g) for _ in range(3)])
    by_hand = []
    for n in range(3):
        r = rewards[n].tolist()
        best = r[ranking[n, 0].item()]
        by_hand.append(-math.log(math.exp(best) / sum(math.exp(x) for x in r)))
    assert best_of_k_loss(rewards, ranking).item() == pytest.approx(sum(by_hand) / 3, abs=1e-12)
    rest_reversed = torch.cat([ranking[:, :1], ranking[:, 1:].flip(-1)], -1)
    assert best_of_k_loss(rewards, rest_reversed).item() == pytest.approx(sum(by_hand) / 3, abs=1e-12)
    r2, ranking2 = rewards[:, :2], torch.tensor([[0, 1], [1, 0], [1, 0]])
    best, worst = r2.gather(1, ranking2[:, :1])[:, 0], r2.gather(1, ranking2[:, 1:])[:, 0]
    assert torch.allclose(best_of_k_loss(r2, ranking2), bradley_terry_loss(best, worst))


def test_soft_labels_reduce_to_bt_and_have_bounded_minimiser():
    rc, rr = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    assert torch.allclose(soft_bradley_terry_loss(rc, rr, torch.ones(6, dtype=torch.float64)),
                          bradley_terry_loss(rc, rr))
    p = 0.8
    delta = torch.tensor([math.log(p / (1 - p))], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(soft_bradley_terry_loss(delta, torch.zeros(1, dtype=torch.float64), torch.tensor([p], dtype=torch.float64)), delta)
    assert abs(grad.item()) < 1e-12


def pair_loss(pc, pr, rc, rr, beta, loss_type="sigmoid", label_smoothing=0.0, chosen_lengths=None,
              rejected_lengths=None, simpo_gamma=1.0, rpo_alpha=0.0):
    """A pairwise loss of the registry on [P] tensors -> (losses [P], chosen rewards [P], rejected rewards [P])."""
    a = Answers.pairs(pc, pr, rc, rr, chosen_lengths, rejected_lengths, label_smoothing)
    losses, rewards = preference_loss(loss_type, a, LossParams(beta, simpo_gamma, rpo_alpha=rpo_alpha))
    return (losses, *Answers.halves(rewards))


def dpo_inputs(h_values, beta=1.0):
    """Policy/reference sums giving log-ratio difference h per pair, lengths 4 (chosen) and 2 (rejected)."""
    h = torch.tensor(h_values, dtype=torch.float64)
    z = torch.zeros_like(h)
    return (h.clone().requires_grad_(), z.clone().requires_grad_(), z, z), dict(
        chosen_lengths=torch.full_like(h, 4.0), rejected_lengths=torch.full_like(h, 2.0))


def test_dpo_sigmoid_hand_values_and_bt_equivalence():
    (pc, pr, rc, rr), _ = dpo_inputs([0.0, 1.0, -2.0])
    losses, cr, rj = pair_loss(pc, pr, rc, rr, beta=0.5)
    expected = [math.log(2), math.log1p(math.exp(-0.5)), math.log1p(math.exp(1.0))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert torch.allclose(losses.mean(), bradley_terry_loss(cr, rj))  # DPO = BT on the implicit rewards
    # adding any f(x) to both log-ratios changes nothing
    shift = torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64)
    assert torch.allclose(pair_loss(pc + shift, pr + shift, rc, rr, beta=0.5)[0], losses)


def test_dpo_gradient_matches_closed_form():
    """∇L = -β σ(r̂_l - r̂_w) (∇S(y_w) - ∇S(y_l)) (DPO §4): w.r.t. S(y_w) it is -β σ(-βh)."""
    (pc, pr, rc, rr), _ = dpo_inputs([0.7, -0.4])
    losses, _, _ = pair_loss(pc, pr, rc, rr, beta=0.3)
    gc, gr = torch.autograd.grad(losses.sum(), (pc, pr))
    expected = -0.3 * torch.sigmoid(-0.3 * torch.tensor([0.7, -0.4], dtype=torch.float64))
    assert torch.allclose(gc, expected) and torch.allclose(gr, -expected)
    assert (gc < 0).all() and (gr > 0).all()  # descent pushes chosen up, rejected down


def test_dpo_variants_by_hand():
    (pc, pr, rc, rr), lengths = dpo_inputs([0.0, 0.8, 3.0])
    beta, eps = 0.5, 0.1
    bh = 0.5 * torch.tensor([0.0, 0.8, 3.0], dtype=torch.float64)
    ls = lambda x: -math.log1p(math.exp(-x))  # log σ(x)
    cdpo, _, _ = pair_loss(pc, pr, rc, rr, beta, label_smoothing=eps)
    assert cdpo.tolist() == pytest.approx([-(1 - eps) * ls(x) - eps * ls(-x) for x in bh.tolist()])
    robust, _, _ = pair_loss(pc, pr, rc, rr, beta, "robust", label_smoothing=eps)  # a float ε, float64 exact
    assert robust.tolist() == pytest.approx([(-(1 - eps) * ls(x) + eps * ls(-x)) / 0.8 for x in bh.tolist()],
                                            rel=1e-14)
    for b in (0.25, 2.0):  # the IPO target 1/(2β), away from β = ½ where it equals 2β
        h = torch.tensor([0.0, 0.8, 3.0], dtype=torch.float64)
        assert pair_loss(pc, pr, rc, rr, b, "ipo_sum")[0].tolist() == pytest.approx(((h - 1 / (2 * b)) ** 2).tolist())
        assert pair_loss(pc, pr, rc, rr, b, "ipo", **lengths)[0].tolist() == pytest.approx(
            ((h / 4 - 1 / (2 * b)) ** 2).tolist())
    hinge, _, _ = pair_loss(pc, pr, rc, rr, beta, "hinge")
    assert hinge.tolist() == pytest.approx([1.0, 0.6, 0.0])
    ipo_sum, _, _ = pair_loss(pc, pr, rc, rr, beta, "ipo_sum")
    assert ipo_sum.tolist() == pytest.approx([1.0, 0.04, 4.0])  # (h - 1/(2β))², 1/(2β) = 1
    ipo, _, _ = pair_loss(pc, pr, rc, rr, beta, "ipo", **lengths)  # h̄ = h/4 (chosen length 4, rejected 0)
    assert ipo.tolist() == pytest.approx([1.0, 0.64, 0.0625])
    simpo, cw, _ = pair_loss(pc, pr, rc, rr, 2.0, "simpo", simpo_gamma=1.0, **lengths)
    assert simpo.tolist() == pytest.approx([-ls(2.0 * h / 4 - 1.0) for h in (0.0, 0.8, 3.0)])
    assert cw.tolist() == pytest.approx([2.0 * h / 4 for h in (0.0, 0.8, 3.0)])
    assert pair_loss(pc, pr, rc, rr, 2.0, "simpo", **lengths)[0].tolist() == simpo.tolist()  # γ defaults to 1
    rpo, _, _ = pair_loss(pc, pr, rc, rr, beta, rpo_alpha=1.0, **lengths)
    base, _, _ = pair_loss(pc, pr, rc, rr, beta)
    assert (rpo - base).tolist() == pytest.approx([-h / 4 for h in (0.0, 0.8, 3.0)])
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'; expected one of sigmoid, robust"):
        pair_loss(pc, pr, rc, rr, beta, "dpo")


def test_robust_dpo_is_unbiased_under_label_flips_and_cdpo_is_soft_labels():
    h = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    z = torch.zeros(3, dtype=torch.float64)
    eps = 0.2
    clean = pair_loss(h, z, z, z, 1.0, "sigmoid")[0]
    flipped = pair_loss(-h, z, z, z, 1.0, "robust", label_smoothing=eps)[0]
    kept = pair_loss(h, z, z, z, 1.0, "robust", label_smoothing=eps)[0]
    assert torch.allclose((1 - eps) * kept + eps * flipped, clean)  # E over ε-flipped labels = clean loss
    cdpo = pair_loss(h, z, z, z, 1.0, label_smoothing=eps)[0]
    soft = torch.stack([soft_bradley_terry_loss(h[i:i + 1], z[i:i + 1], torch.tensor([1 - eps])) for i in range(3)])
    assert torch.allclose(cdpo, soft)
    per_pair = pair_loss(h, z, z, z, 1.0, label_smoothing=torch.tensor([0.0, eps, 0.0]))[0]
    assert torch.allclose(per_pair[1], cdpo[1]) and torch.allclose(per_pair[0], clean[0])


def test_robust_dpo_tie_is_zero_with_finite_gradients():
    """A soft label p = ½ (an AI-feedback tie) makes 1 - 2ε = 0: the pair says nothing, so its loss is 0, and
    no inf leaks into the gradient through the branch that is not taken."""
    h = torch.tensor([0.7, -0.4], dtype=torch.float64, requires_grad=True)
    z = torch.zeros(2, dtype=torch.float64)
    eps = torch.tensor([0.5, 0.2], dtype=torch.float64)
    losses, _, _ = pair_loss(h, z, z, z, 1.0, "robust", label_smoothing=eps)
    losses.sum().backward()
    assert losses[0].item() == 0.0 and h.grad[0].item() == 0.0
    ls = lambda x: -math.log1p(math.exp(-x))
    assert losses[1].item() == pytest.approx((-(0.8) * ls(-0.4) + 0.2 * ls(0.4)) / 0.6)
    assert torch.isfinite(h.grad).all()
    assert pair_loss(h, z, z, z, 1.0, "robust", label_smoothing=0.5)[0].tolist() == [0.0, 0.0]


def test_length_normalised_losses_divide_each_side_by_its_own_length():
    """ipo and simpo average each answer's log-ratio (log-prob) over its own tokens: with both sides non-zero and
    lengths 4 (chosen) and 2 (rejected), dividing either side by the other's length gives another value."""
    pc = torch.tensor([-3.0, -6.0], dtype=torch.float64)
    pr = torch.tensor([-5.0, -1.0], dtype=torch.float64)
    rc = torch.tensor([-4.0, -5.0], dtype=torch.float64)
    rr = torch.tensor([-3.0, -2.0], dtype=torch.float64)
    lengths = dict(chosen_lengths=torch.tensor([4.0, 4.0], dtype=torch.float64),
                   rejected_lengths=torch.tensor([2.0, 2.0], dtype=torch.float64))
    beta, gamma = 0.5, 0.3
    ipo, _, _ = pair_loss(pc, pr, rc, rr, beta, "ipo", **lengths)
    simpo, _, _ = pair_loss(pc, pr, rc, rr, beta, "simpo", simpo_gamma=gamma, **lengths)
    for i in range(2):
        h_bar = (pc[i] - rc[i]).item() / 4 - (pr[i] - rr[i]).item() / 2
        assert ipo[i].item() == pytest.approx((h_bar - 1 / (2 * beta)) ** 2)
        margin = beta * pc[i].item() / 4 - beta * pr[i].item() / 2 - gamma
        assert simpo[i].item() == pytest.approx(math.log1p(math.exp(-margin)))


def test_kto_by_a_loop_over_answers_with_the_reference_point_of_the_global_batch():
    """KTO (Ethayarajh et al. 2024 §4) answer by answer in float64: z₀ = max(0, mean of the mismatched pairs'
    log-ratios) over both "ranks'" pairs together (3 and 5 of them, so a mean of the two means would differ), then
    λ_y - v(x, y). z₀ is detached: no gradient reaches the mismatched pairs' log-probs."""
    g = torch.Generator().manual_seed(2)
    logps, ref = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    desirable = torch.tensor([True, False, True, True, False, False])
    kl_logps = (torch.randn(8, generator=g, dtype=torch.float64) + 0.4).requires_grad_()
    kl_ref = torch.randn(8, generator=g, dtype=torch.float64)
    beta, lam_d, lam_u = 0.7, 1.3, 0.6
    mean = sum(kl_logps[i].item() - kl_ref[i].item() for i in range(8)) / 8
    other_rank = lambda a, b: torch.stack([(a - b).sum(), torch.tensor(float(len(a)), dtype=torch.float64)])
    z0 = kto_reference_point(kl_logps[:3], kl_ref[:3], all_sum=lambda t: t + other_rank(kl_logps[3:], kl_ref[3:]))
    assert mean > 0 and z0.item() == pytest.approx(mean, abs=1e-12) and not z0.requires_grad
    assert kto_reference_point(kl_logps[:3] - 10, kl_ref[:3]).item() == 0.0  # a negative estimate is clamped
    losses, rewards = kto_loss(Answers(logps, ref, desirable=desirable, kl=z0), LossParams(beta, kto_lambda_d=lam_d,
                                                                                          kto_lambda_u=lam_u))
    sigmoid = lambda x: 1 / (1 + math.exp(-x))
    for i in range(6):
        r = logps[i].item() - ref[i].item()
        value = lam_d * sigmoid(beta * (r - mean)) if desirable[i] else lam_u * sigmoid(beta * (mean - r))
        assert losses[i].item() == pytest.approx((lam_d if desirable[i] else lam_u) - value, abs=1e-12)
        assert rewards[i].item() == pytest.approx(beta * r, abs=1e-12)
    # a pair reads as two answers: chosen desirable, rejected not
    pairs = Answers.pairs(logps[:3], logps[3:], ref[:3], ref[3:])
    assert pairs.desirable.tolist() == [True] * 3 + [False] * 3
    assert torch.equal(kto_loss(pairs, LossParams(beta))[0][:3],
                       kto_loss(Answers(logps, ref, desirable=torch.ones(6, dtype=torch.bool)), LossParams(beta))[0][:3])


def test_orpo_by_hand_and_its_log_odds_stay_finite():
    """ORPO (Hong et al. 2024 §4, Eqs. 6-7) pair by pair in float64: the chosen answer's mean NLL plus λ times
    -log σ of the log odds ratio, odds P/(1-P) of the length-normalised likelihood P = exp(S/|y|); no reference
    is read (ref_logps None)."""
    pc = torch.tensor([-3.0, -12.0, -0.5], dtype=torch.float64)
    pr = torch.tensor([-8.0, -2.0, -20.0], dtype=torch.float64)
    lc = torch.tensor([4.0, 6.0, 1.0], dtype=torch.float64)
    lr = torch.tensor([2.0, 5.0, 3.0], dtype=torch.float64)
    lam = 0.25
    losses, rewards = orpo_loss(Answers.pairs(pc, pr, None, None, lc, lr), LossParams(lam))
    for i in range(3):
        mc, mr = pc[i].item() / lc[i].item(), pr[i].item() / lr[i].item()
        odds = lambda m: math.exp(m) / (1 - math.exp(m))
        ratio = math.log(odds(mc) / odds(mr))
        assert losses[i].item() == pytest.approx(-mc + lam * math.log1p(math.exp(-ratio)), abs=1e-12)
        assert rewards[i].item() == pytest.approx(lam * mc, abs=1e-12)
    # log(1 - e^m) on both sides of -log 2, and a mean log-prob of 0 or within an ulp of it: finite, with
    # finite gradients through either branch
    m = torch.tensor([-30.0, -1.0, -0.5, -1e-3, -1e-300, 0.0], dtype=torch.float64, requires_grad=True)
    for x, y in zip(m.tolist()[:4], log1mexp(m[:4]).tolist()):
        assert y == pytest.approx(math.log(-math.expm1(x)), rel=1e-14)
    odds = log_odds(m)
    odds.sum().backward()
    assert torch.isfinite(odds).all() and torch.isfinite(m.grad).all()
    assert odds[-1].item() == pytest.approx(-math.log(torch.finfo(torch.float64).eps), rel=1e-6)  # log odds of -eps


def test_every_registered_loss_has_a_cited_equation_and_runs_on_a_batch_of_pairs():
    """The registry's contract: a function of (Answers, LossParams) -> (losses, rewards), documented with its
    paper's author and year; the reference-free ones never read ref_logps."""
    pc, pr = torch.tensor([-3.0, -5.0], dtype=torch.float64), torch.tensor([-4.0, -2.0], dtype=torch.float64)
    lengths = torch.tensor([3.0, 2.0], dtype=torch.float64)
    for name, fn in PREFERENCE_LOSSES.items():
        assert re.search(r"[A-Z]\w+ (et al\. )?20\d\d", fn.__doc__), name
        ref = None if name in REFERENCE_FREE else torch.zeros(2, dtype=torch.float64)
        a = Answers.pairs(pc, pr, ref, ref, lengths, lengths)
        losses, rewards = fn(a, LossParams(0.5))
        assert losses.shape == ((4,) if name in PER_ANSWER else (2,)) and rewards.shape == (4,), name
        assert torch.isfinite(losses).all(), name
