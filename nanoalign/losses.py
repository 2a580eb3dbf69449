"""Every equation of nanoalign, as pure tensor functions: tensors and floats in, tensors out. The per-token
log-probability they start from is `nanoalign.logprobs.token_logps` (a fast path beside its plain reference).

Shapes: B rows, T tokens, V vocabulary. Label shift: logits at position t score token t+1, so per-token
tensors are [B, T-1] with labels `input_ids[:, 1:]` and mask `loss_mask[:, 1:]`.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from nanoalign.logprobs import widen


def unpack(packed: Tensor, mask: Tensor) -> Tensor:
    """Values computed only at the True positions of mask [B, T] (packed [N], row-major) back to [B, T], zero
    elsewhere; differentiable."""
    return torch.zeros(mask.shape, dtype=packed.dtype, device=packed.device).masked_scatter(mask, packed)


def last_token_values(values: Tensor, attention_mask: Tensor) -> Tensor:
    """Read per-position values at each row's last real token, i* = argmax_t (t · a_t):
    the same index under left padding, right padding or none, and never a PAD slot (PAD != EOS).
    values [B, T], attention_mask [B, T] -> [B]."""
    positions = torch.arange(values.shape[1], device=values.device)
    last = (positions * attention_mask).argmax(-1)  # [B]
    return values.gather(1, last[:, None])[:, 0]


def sft_loss(logps: Tensor, mask: Tensor, n_tokens: float | None = None) -> Tensor:
    """Negative log-likelihood of the response tokens, a token mean over the *global* batch.

    logps, mask [B, T]: mask is 1 on response tokens including the final EOS, 0 on prompt and PAD.
    n_tokens: response tokens in the whole global batch (all micro-batches and ranks); default this batch's.
    A mean of micro-batch means would over-weight short answers and break accumulation/sharding parity.
    """
    n_tokens = mask.sum() if n_tokens is None else n_tokens
    return -(logps * mask).sum() / n_tokens


# ----- reward model -------------------------------------------------------------------------------------


def bradley_terry_nll(delta: Tensor) -> Tensor:
    """Bradley-Terry's negative log-likelihood of "first beats second" from the reward gap Δ = r_first - r_second,
    elementwise: -log σ(Δ) = softplus(-Δ) (Bradley & Terry 1952). Every pairwise loss below is built on it."""
    return F.softplus(-delta)


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float | None = None) -> Tensor:
    """Pairwise Bradley-Terry loss -log sigma(r_c - r_r - m) = softplus(r_r - r_c + m), mean over pairs.

    InstructGPT Eq. 1 at K = 2; DPO Eqs. 1-2; the optional margin as in TRL's RewardTrainer.
    r_chosen, r_rejected [P] scalar rewards; margin [P] or a float.
    """
    return bradley_terry_nll(r_chosen - r_rejected - (0.0 if margin is None else margin)).mean()


def kwise_ranking_loss(rewards: Tensor, ranking: Tensor) -> Tensor:
    """InstructGPT's K-wise loss: all C(K,2) pairs of one prompt's ranking, averaged (InstructGPT §3.5, Eq. 1).

    rewards [N, K]: one scalar per candidate (K forward passes, not 2·C(K,2)); ranking [N, K]: candidate
    indices best first. Returns the mean over prompts of (1/C(K,2)) sum_{i above j} softplus(r_j - r_i).
    """
    rank = torch.argsort(ranking, dim=-1)  # [N, K]: rank of each candidate, 0 = best
    above = rank[:, :, None] < rank[:, None, :]  # [N, K, K]: i ranked above j
    pair_losses = bradley_terry_nll(rewards[:, :, None] - rewards[:, None, :])  # [N, K, K]: -log σ(r_i - r_j)
    K = rewards.shape[-1]
    return (pair_losses * above).sum((1, 2)).mean() / (K * (K - 1) / 2)


def plackett_luce_loss(rewards: Tensor, ranking: Tensor) -> Tensor:
    """Negative log-likelihood of the full ranking under Plackett-Luce (DPO App. A.3, Eq. 18), divided by K-1
    so that K = 2 equals Bradley-Terry (a nanoalign choice).

    rewards [N, K]; ranking [N, K] candidate indices best first.
    -log P = -sum_{k<K} [r_(k) - logsumexp_{j>=k} r_(j)] with r_(k) the k-th ranked reward.
    """
    r = rewards.gather(-1, ranking)  # [N, K], best first
    tail_lse = torch.logcumsumexp(r.flip(-1), -1).flip(-1)  # [N, K]: logsumexp over r_(k..K)
    return -(r - tail_lse)[:, :-1].sum(-1).mean() / (r.shape[-1] - 1)


def best_of_k_loss(rewards: Tensor, ranking: Tensor) -> Tensor:
    """Best-of-K softmax: -log softmax(r)[best], the labeller's pick among K answers (Ziegler et al. 2019 §2;
    OAI-19's PickBest), mean over prompts. It is Plackett-Luce's first factor; K = 2 is Bradley-Terry.
    rewards [N, K]; ranking [N, K] candidate indices best first (only the first is read)."""
    best = rewards.gather(-1, ranking[:, :1])[:, 0]  # [N]
    return (rewards.logsumexp(-1) - best).mean()


def soft_bradley_terry_loss(r_first: Tensor, r_second: Tensor, p: Tensor) -> Tensor:
    """Bradley-Terry with soft labels p = P(first > second) (CAI §4.1; RLAIF): binary cross-entropy on the
    reward gap, -[p log sigma(Δ) + (1-p) log sigma(-Δ)], mean. p = 1 is the hard loss; the minimiser is
    Δ* = log(p / (1-p)), so the gap stays bounded. r_first, r_second, p [P]."""
    delta = r_first - r_second
    return (p * bradley_terry_nll(delta) + (1 - p) * bradley_terry_nll(-delta)).mean()


# ----- DPO family ---------------------------------------------------------------------------------------

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "ipo_sum", "simpo")


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: Tensor | float = 0.0, chosen_lengths: Tensor | None = None,
             rejected_lengths: Tensor | None = None, simpo_gamma: float = 1.0,
             rpo_alpha: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """The DPO family on summed sequence log-probs S (all [B]) -> (losses [B], chosen_rewards [B],
    rejected_rewards [B]); rewards are the implicit rewards beta·(S_θ - S_ref), detached.

    With h = (S_θ(y_w) - S_ref(y_w)) - (S_θ(y_l) - S_ref(y_l)):
      sigmoid   -(1-ε) log σ(βh) - ε log σ(-βh)          DPO Eq. 7; ε = label_smoothing is cDPO (Mitchell 2023)
      robust    [-(1-ε) log σ(βh) + ε log σ(-βh)]/(1-2ε)  rDPO (Chowdhury et al. 2024), unbiased under ε flips;
                                                          0 for a tie, ε = ½
      hinge     max(0, 1 - βh)                            SLiC-style hinge on reference-normalised likelihoods
      ipo       (h̄ - 1/(2β))², h̄ from length-averaged log-probs (as TRL computes it; β plays τ)
      ipo_sum   (h - 1/(2β))², summed log-probs               IPO Eq. 17 read on sequences (DPO-ref, OpenRLHF)
      simpo     -log σ(β S̄_θ(y_w) - β S̄_θ(y_l) - γ)      SimPO (Meng et al. 2024): reference-free, averaged
    ε may be a [B] tensor (per-pair soft labels p = 1 - ε, for AI feedback). rpo_alpha > 0 adds the RPO term
    α·(-S̄_θ(y_w)) (Pang et al. 2024), an NLL on the chosen answer that keeps its likelihood from falling.
    chosen_lengths, rejected_lengths [B]: response tokens, needed by ipo, simpo and rpo_alpha.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    eps = label_smoothing
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # [B]
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        # A tie (ε = ½, e.g. an AI-feedback p = ½) carries no preference and the correction is undefined: loss 0,
        # with a safe denominator so no inf reaches the gradient through the unselected branch.
        eps = torch.as_tensor(eps, dtype=h.dtype, device=h.device)
        tie = (1 - 2 * eps).abs() < 1e-6
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h))
        losses = torch.where(tie, 0.0, losses / torch.where(tie, 1.0, 1 - 2 * eps))
    elif loss_type == "hinge":
        losses = F.relu(1 - beta * h)
    elif loss_type == "ipo_sum":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "ipo":
        h_mean = chosen_logratios / chosen_lengths - rejected_logratios / rejected_lengths
        losses = (h_mean - 1 / (2 * beta)) ** 2
    else:  # simpo
        chosen_logratios = policy_chosen_logps / chosen_lengths  # its implicit reward: β·S̄_θ
        rejected_logratios = policy_rejected_logps / rejected_lengths
        losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios) - simpo_gamma)
    if rpo_alpha > 0:
        losses = losses - rpo_alpha * policy_chosen_logps / chosen_lengths
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# ----- KL and evaluation statistics ---------------------------------------------------------------------


def token_kl(logits: Tensor, ref_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Exact per-token KL(π‖π_ref) = Σ_v π(v) [log π(v) - log π_ref(v)], both at the sampling temperature.
    logits, ref_logits [B, T, V] -> [B, T], every term >= 0. Summed over a response's tokens it is an
    unbiased, low-variance estimate of the sequence KL (DPO footnote 3)."""
    logp = (widen(logits) / temperature).log_softmax(-1)
    ref_logp = (widen(ref_logits) / temperature).log_softmax(-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of the sampling distribution softmax(logits / T) at each position, -Σ_v p_v log p_v, in fp32
    (or float64).
    logits [..., V] -> [...]."""
    logp = (widen(logits) / temperature).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def best_of_n_kl(n: int) -> float:
    """Analytic KL of best-of-n to the base policy, log n - (n-1)/n (Stiennon Table 10; Gao); exact without ties."""
    return math.log(n) - (n - 1) / n


def best_of_n_pool(proxy: Tensor, gold: Tensor, n: int) -> Tensor:
    """Unbiased estimate of E[gold of the best-of-n answer] from a pool of N >= n samples per prompt
    (a U-statistic): sort by proxy ascending; the i-th (1-based) is the best of a random
    n-subset with probability C(i-1, n-1) / C(N, n). proxy, gold [P, N] -> [P]. The sort is stable: shuffle
    the columns first to break ties in proxy at random."""
    N = proxy.shape[-1]
    order = proxy.argsort(dim=-1, stable=True)
    i = torch.arange(1, N + 1, dtype=torch.float64)
    log_w = torch.where(i >= n, torch.lgamma(i) - torch.lgamma(i - n + 1) - math.lgamma(n), -math.inf)
    log_w = log_w - (math.lgamma(N + 1) - math.lgamma(n + 1) - math.lgamma(N - n + 1))  # / C(N, n)
    return (gold.gather(-1, order).double() * log_w.exp()).sum(-1)


# ----- PPO for language models --------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor, n: Tensor | float | None = None) -> Tensor:
    """Mean of x over the positions where mask is 1 (x, mask broadcastable). n: the count to divide by,
    default mask.sum(); data-parallel ranks pass the global count, and the sum of their results is the
    global mean (as `sft_loss`'s n_tokens). Masked slots are selected away, not multiplied by 0, so a NaN or
    inf there never reaches the result."""
    return torch.where(mask.bool(), x, 0.0).sum() / (mask.sum() if n is None else n)


def kl_estimate(logps: Tensor, ref_logps: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimates of KL(π‖π_ref) from tokens sampled from π (Schulman 2020, "Approximating KL"):
    with u = log π_ref - log π, k1 = -u (unbiased, can be < 0), k2 = u²/2 (biased, >= 0),
    k3 = (e^u - 1) - u (unbiased, >= 0). logps, ref_logps [B, T] -> [B, T]; the caller masks."""
    u = ref_logps - logps
    if kind == "k1":
        return -u
    if kind == "k2":
        return 0.5 * u ** 2
    if kind == "k3":
        return torch.expm1(u) - u
    raise ValueError(f"unknown KL estimator {kind!r}; expected k1, k2 or k3")


def adaptive_kl_beta(beta: float, kl: float, kl_target: float, n_steps: int, horizon: int) -> float:
    """Ziegler et al. 2019 adaptive KL controller, as in its code (lm-human-preferences AdaptiveKLController):
    e = clip(KL/target - 1, -0.2, 0.2); β <- β (1 + e · n_steps / horizon). n_steps = episodes per update."""
    error = min(max(kl / kl_target - 1, -0.2), 0.2)
    return beta * (1 + error * n_steps / horizon)


def per_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """r_t = -β·kl_t on every response token, plus the sequence score on the last real one (Ziegler §2;
    InstructGPT Eq. 2; N detail 17). scores [B]; kl, mask [B, T] (mask a prefix of 1s per row) -> [B, T]."""
    rewards = torch.where(mask.bool(), -beta * kl, 0.0)
    last = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(-1)  # [B]
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, all_sum=None) -> Tensor:
    """(x - μ)/sqrt(σ² + 1e-8) over masked positions, μ added back when not shifting (OAI-19; N detail 18).
    σ² is the biased (population) variance, as in the OpenAI code. Masked positions come back as 0.
    all_sum: a function summing a tensor over data-parallel ranks, so that μ and σ² are those of every rank's
    tokens; default none, this batch's."""
    all_sum = all_sum or (lambda t: t)
    x = torch.where(mask.bool(), x, 0.0)  # masked slots may hold anything, NaN included
    n = all_sum(mask.sum())
    mean = all_sum(masked_mean(x, mask, n))
    var = all_sum(masked_mean((x - mean) ** 2, mask, n))
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return torch.where(mask.bool(), out if shift_mean else out + mean, 0.0)


def reward_normalisation(scores: Tensor, all_sum=None) -> tuple[float, float]:
    """Gain and bias that put gain·s + bias at mean 0 and std 1 over `scores` (Ziegler et al. 2019 §2), so the
    KL coefficient β means the same for any reward: the population std, as the OpenAI code's normalisation.
    all_sum: sums over data-parallel ranks, as in `whiten`. Scores that do not vary fix no scale: gain 1."""
    all_sum = all_sum or (lambda t: t)
    scores = scores.detach().double().flatten()
    n = all_sum(torch.tensor(float(scores.numel()), dtype=torch.float64, device=scores.device))
    mean = all_sum(scores.sum()) / n
    std = (all_sum(((scores - mean) ** 2).sum()) / n).sqrt().item()
    gain = 1.0 / std if std > 1e-8 else 1.0
    return gain, -gain * mean.item()


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, Eq. 16): δ_t = r_t + γ V_{t+1} - V_t with V = 0
    outside the mask, Â_t = δ_t + γλ Â_{t+1} = Σ_{t' ≥ t} (γλ)^(t'-t) δ_t', and returns R_t = Â_t + V_t.
    The backward recursion is one matmul with the upper-triangular matrix of (γλ)^(t'-t), no loop over tokens.
    rewards, values, mask [B, T] (mask one run of 1s per row, the response; padding after EOS contributes
    nothing) -> (advantages [B, T], returns [B, T]), zero outside the mask."""
    rewards, values = (torch.where(mask.bool(), t, 0.0) for t in (rewards, values))  # NaN-proof, as whiten
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
    deltas = (rewards + gamma * next_values - values) * mask
    lag = torch.arange(rewards.shape[1], device=rewards.device)
    lag = lag[:, None] - lag[None, :]  # [T', T]: t' - t
    discount = torch.where(lag >= 0, (gamma * lam) ** lag.clamp(min=0).to(rewards.dtype), 0.0)
    advantages = (deltas @ discount) * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2,
                    n_tokens: Tensor | float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Clipped surrogate (PPO Eq. 7), minimised: mean_m max(-Â ρ, -Â clip(ρ, 1-ε, 1+ε)), ρ = e^(ℓ - ℓ_old).
    All [B, T] -> (loss, clipfrac = mean_m 1[|ρ-1| > ε], approx_kl = mean_m (ℓ - ℓ_old)²/2), stats detached.
    Masked slots may hold any finite or non-finite sentinel: they are zeroed before they reach the loss.
    n_tokens: tokens of the global minibatch (all ranks), as in `sft_loss`; default this batch's."""
    log_ratio = torch.where(mask.bool(), logps - old_logps, 0.0)
    ratio = log_ratio.exp()
    surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    loss = masked_mean(torch.where(mask.bool(), surrogate, 0.0), mask, n_tokens)
    clipfrac = masked_mean(((ratio - 1).abs() > clip_eps).float(), mask, n_tokens).detach()
    return loss, clipfrac, masked_mean(0.5 * log_ratio ** 2, mask, n_tokens).detach()


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float = 0.2,
                   n_tokens: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """Clipped value loss (openai/baselines ppo2; OAI-19; N detail 19): V_c = V_old + clip(V - V_old, ±ε_v),
    ½ mean_m max((V - R)², (V_c - R)²). All [B, T] -> (loss, value clipfrac). n_tokens: as in
    `ppo_policy_loss`. Masked slots may hold anything: they are selected away first."""
    values, old_values, returns = (torch.where(mask.bool(), t, 0.0) for t in (values, old_values, returns))
    clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask, n_tokens)
    clipfrac = masked_mean(((values - old_values).abs() > clip_eps).float(), mask, n_tokens).detach()
    return loss, clipfrac


def rloo_advantages(returns: Tensor) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): A_i = R_i - mean_{j≠i} R_j = k/(k-1)·(R_i - R̄).
    returns [P, k] sequence returns of k samples per prompt -> [P, k]."""
    k = returns.shape[-1]
    return k / (k - 1) * (returns - returns.mean(-1, keepdim=True))


def grpo_advantages(returns: Tensor, eps: float = 1e-4) -> Tensor:
    """GRPO outcome advantages (Shao et al. 2024): (R_i - mean_j R_j) / (std_j R_j + ε), std unbiased
    (torch's default). returns [P, k] -> [P, k]; equal returns give 0."""
    return (returns - returns.mean(-1, keepdim=True)) / (returns.std(-1, keepdim=True) + eps)
