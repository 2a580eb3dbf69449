"""The enumerable oracle (Rafailov et al. 2023 §4): a tabular policy over K = 6 answers to one prompt, a known
reward r and a random reference. The KL-regularised optimum is known in closed form,
pi*(y) = pi_ref(y) exp(r(y)/beta) / Z (DPO Eqs. 4-5), and DPO on Bradley-Terry labels must find it.

Why it holds (DPO §4-5): S_θ(y) = log pi_θ(y), so beta·h_ij = beta·log[pi_θ(i) pi_ref(j) / (pi_θ(j) pi_ref(i))].
At pi_θ = pi* this is r_i - r_j, the Bradley-Terry log-odds of i over j, which minimises the soft-label
cross-entropy of every pair at once; the K-1 free logits fix all C(K,2) differences, so pi* is the only minimiser.
"""

import itertools

import torch

from nanoalign.losses import Answers, LossParams, dpo_loss

K, BETA = 6, 0.5


def world(seed=0):
    """Known reward r [K] and reference pi_ref [K] (float64), and the optimum pi* ∝ pi_ref·exp(r/beta)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(K, generator=g, dtype=torch.float64)
    ref_logps = (0.5 * torch.randn(K, generator=g, dtype=torch.float64)).log_softmax(0)
    optimum_logps = (ref_logps + r / BETA).log_softmax(0)
    return r, ref_logps, optimum_logps


def kl(logp, logq):
    return (logp.exp() * (logp - logq)).sum().item()


def fit_tabular_policy(pair_loss):
    """Minimise pair_loss(policy log-probs [K]) over K free logits with L-BFGS in float64, from pi uniform."""
    logits = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([logits], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = pair_loss(logits.log_softmax(0))
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return logits.detach().log_softmax(0)


def test_optimum_identity_and_perturbation():
    """E_{pi*}[r] - beta·KL(pi*||pi_ref) = beta·log Z (§7.3), and any other policy scores lower."""
    r, ref_logps, optimum_logps = world()
    log_z = torch.logsumexp(ref_logps + r / BETA, 0).item()

    def objective(logps):
        return (logps.exp() * r).sum().item() - BETA * kl(logps, ref_logps)

    # float64 identities over K = 6 terms of size ~1: ~1e-15
    assert abs(objective(optimum_logps) - BETA * log_z) < 1e-12
    assert abs(kl(optimum_logps, ref_logps) - ((optimum_logps.exp() * r).sum().item() / BETA - log_z)) < 1e-12
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        perturbed = (optimum_logps + 0.1 * torch.randn(K, generator=g, dtype=torch.float64)).log_softmax(0)
        assert objective(perturbed) < objective(optimum_logps) - 1e-6  # 0.1-sized moves cost ~1e-3, rounding 1e-15


def test_exact_soft_label_dpo_recovers_the_optimum():
    """Expected DPO loss over all C(K,2) pairs with soft labels p_ij = σ(r_i - r_j), weights pi_ref(i)·pi_ref(j).
    Soft labels enter as label_smoothing ε = 1 - p (the cDPO identity, Mitchell 2023)."""
    r, ref_logps, optimum_logps = world()
    i, j = torch.tensor(list(itertools.combinations(range(K), 2))).T  # [15] each: all unordered pairs
    p = torch.sigmoid(r[i] - r[j])
    weights = (ref_logps[i] + ref_logps[j]).exp()

    def expected_loss(logps):
        losses, _ = dpo_loss(Answers.pairs(logps[i], logps[j], ref_logps[i], ref_logps[j], label_smoothing=1 - p),
                             LossParams(BETA))
        return (weights * losses).sum()

    policy_logps = fit_tabular_policy(expected_loss)
    # an optimiser's answer in float64: L-BFGS stops near the minimiser, where the KL is quadratic in the distance
    # (1e-6: logits ~1e-3 apart), far below the 0.1 the fit starts from
    assert kl(policy_logps, optimum_logps) < 1e-6
    assert kl(ref_logps, optimum_logps) > 0.1  # the test starts far from the answer


def test_sampled_hard_label_dpo_recovers_the_optimum():
    """200k pairs drawn from pi_ref x pi_ref, hard labels from Bradley-Terry on r, aggregated into counts of
    each (winner, loser); plain sigmoid DPO on them lands within KL 1e-3 of pi* (sampling error only)."""
    r, ref_logps, optimum_logps = world()
    g = torch.Generator().manual_seed(2)
    n = 200_000
    a, b = torch.multinomial(ref_logps.exp().expand(n, K), 2, replacement=True, generator=g).T  # [n] each
    a_wins = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(r[a] - r[b])
    winner, loser = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
    keep = winner != loser  # a tie carries no preference (h = 0, zero gradient)
    counts = torch.zeros(K, K, dtype=torch.float64).index_put_((winner[keep], loser[keep]),
                                                                torch.ones(int(keep.sum()), dtype=torch.float64),
                                                                accumulate=True)  # [K, K]
    w, l = counts.nonzero().T  # every ordered (winner, loser) seen at least once

    def mean_loss(logps):
        losses, _ = dpo_loss(Answers.pairs(logps[w], logps[l], ref_logps[w], ref_logps[l]), LossParams(BETA))
        return (counts[w, l] * losses).sum() / counts.sum()

    policy_logps = fit_tabular_policy(mean_loss)
    # sampling error: a maximum-likelihood fit of 5 free logits on ~1.7e5 pairs has an expected KL to the truth of
    # ~5 / (2·1.7e5) ≈ 1.5e-5 (more where pairs are rare); 1e-3 is far above that and far below the 0.1 start
    assert kl(policy_logps, optimum_logps) < 1e-3
    assert kl(ref_logps, optimum_logps) > 0.1
