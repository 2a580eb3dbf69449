"""Every equation of nanoalign, as pure tensor functions: tensors and floats in, tensors out. The per-token
log-probability they start from is `nanoalign.logprobs.token_logps` (a fast path beside its plain reference).

Shapes: B rows, T tokens, V vocabulary. Label shift: logits at position t score token t+1, so per-token
tensors are [B, T-1] with labels `input_ids[:, 1:]` and mask `loss_mask[:, 1:]`.
"""

import math
from dataclasses import dataclass

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


# ----- preference losses: the DPO family, KTO, ORPO -----------------------------------------------------


@dataclass
class Answers:
    """One micro-batch of answers as every preference loss reads it, each tensor [N]:
      logps      S_θ(y|x), the policy's log-prob summed over the response tokens (EOS included)
      ref_logps  S_ref(y|x), the frozen reference's; None for the losses in REFERENCE_FREE
      lengths    |y|, the response tokens, for the length-normalised losses (ipo, simpo, orpo and RPO)
      desirable  bool: a pair's chosen answer True, its rejected one False; or KTO's thumbs up (True) or down
    A batch of P pairs holds their P chosen answers first, then their P rejected ones in the same order (N = 2P),
    as they go through the model together; `halves` splits them. label_smoothing: the assumed label-flip rate ε,
    one per pair [P] or one float (cDPO, robust). kl: KTO's reference point z₀ (`kto_reference_point`)."""
    logps: Tensor
    ref_logps: Tensor | None = None
    lengths: Tensor | None = None
    desirable: Tensor | None = None
    label_smoothing: Tensor | float = 0.0
    kl: Tensor | float = 0.0

    @classmethod
    def pairs(cls, policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor | None = None,
              ref_rejected: Tensor | None = None, chosen_lengths: Tensor | None = None,
              rejected_lengths: Tensor | None = None, label_smoothing: Tensor | float = 0.0) -> "Answers":
        """A batch of P pairs from its chosen and rejected answers' tensors, each [P]."""
        cat = lambda c, r: None if c is None else torch.cat([c, r])
        desirable = torch.arange(2 * len(policy_chosen), device=policy_chosen.device) < len(policy_chosen)
        return cls(cat(policy_chosen, policy_rejected), cat(ref_chosen, ref_rejected),
                   cat(chosen_lengths, rejected_lengths), desirable, label_smoothing)

    @staticmethod
    def halves(x: Tensor) -> tuple[Tensor, Tensor]:
        """x [2P] of a batch of pairs -> (its chosen answers' values [P], its rejected answers' [P])."""
        return x.chunk(2)


@dataclass(frozen=True)
class LossParams:
    """The preference losses' hyper-parameters (train_dpo.py's flags of the same names)."""
    beta: float = 0.1  # β: DPO's KL strength (Rafailov et al. 2023 Eq. 7), SimPO's reward scale, KTO's β, ORPO's λ
    simpo_gamma: float = 1.0  # SimPO's target margin γ
    kto_lambda_d: float = 1.0  # KTO's weights of desirable (λ_D) and undesirable (λ_U) answers
    kto_lambda_u: float = 1.0
    rpo_alpha: float = 0.0  # RPO's weight of the chosen answer's NLL, added to a pairwise loss (0 = off)


def logratios(a: Answers) -> Tensor:
    """Each answer's log-ratio S_θ(y|x) - S_ref(y|x) [N]: β times it is DPO's implicit reward (DPO Eq. 5)."""
    return a.logps - a.ref_logps


def dpo_loss(a: Answers, p: LossParams) -> tuple[Tensor, Tensor]:
    """DPO with cDPO's label smoothing: -(1-ε) log σ(βh) - ε log σ(-βh) per pair, where
    h = [S_θ(y_w) - S_ref(y_w)] - [S_θ(y_l) - S_ref(y_l)] (Rafailov et al. 2023, Eq. 7; ε: Mitchell 2023, cDPO).
    ε = 0 is DPO; a [P] ε carries per-pair soft labels p = 1 - ε (AI feedback).
    Every pairwise loss returns (losses [P], the implicit rewards [2P], detached: β·(S_θ - S_ref) unless noted)."""
    r = logratios(a)
    chosen, rejected = a.halves(r)
    h = chosen - rejected
    eps = a.label_smoothing
    losses = -(1 - eps) * F.logsigmoid(p.beta * h) - eps * F.logsigmoid(-p.beta * h)
    return losses, p.beta * r.detach()


def robust_dpo_loss(a: Answers, p: LossParams) -> tuple[Tensor, Tensor]:
    """Robust DPO, unbiased under labels flipped at rate ε: [-(1-ε) log σ(βh) + ε log σ(-βh)] / (1-2ε) per pair
    (Chowdhury et al. 2024, rDPO), h as in `dpo_loss`. A tie (ε = ½, e.g. an AI-feedback p = ½) carries no
    preference and the correction is undefined: its loss is 0, with a safe denominator so that no inf reaches the
    gradient through the branch not taken."""
    r = logratios(a)
    chosen, rejected = a.halves(r)
    h = chosen - rejected
    eps = torch.as_tensor(a.label_smoothing, dtype=h.dtype, device=h.device)
    tie = (1 - 2 * eps).abs() < 1e-6
    losses = (-(1 - eps) * F.logsigmoid(p.beta * h) + eps * F.logsigmoid(-p.beta * h))
    losses = torch.where(tie, 0.0, losses / torch.where(tie, 1.0, 1 - 2 * eps))
    return losses, p.beta * r.detach()


def hinge_loss(a: Answers, p: LossParams) -> tuple[Tensor, Tensor]:
    """max(0, 1 - βh) per pair, h as in `dpo_loss`: a hinge on reference-normalised likelihoods in the style of
    SLiC (Zhao et al. 2023, there on raw likelihoods)."""
    r = logratios(a)
    chosen, rejected = a.halves(r)
    h = chosen - rejected
    return F.relu(1 - p.beta * h), p.beta * r.detach()


def ipo_loss(a: Answers, p: LossParams) -> tuple[Tensor, Tensor]:
    """IPO (Azar et al. 2023, Eq. 17) as TRL computes it: (h̄ - 1/(2β))² per pair, with h̄ the difference of
    length-averaged log-ratios [S_θ(y_w) - S_ref(y_w)]/|y_w| - [S_θ(y_l) - S_ref(y_l)]/|y_l| (β plays τ)."""
    r = logratios(a)
    chosen, rejected = a.halves(r)
    chosen_lengths, rejected_lengths = a.halves(a.lengths)
    h_mean = chosen / chosen_lengths - rejected / rejected_lengths
    return (h_mean - 1 / (2 * p.beta)) ** 2, p.beta * r.detach()


def ipo_sum_loss(a: Answers, p: LossParams) -> tuple[Tensor, Tensor]:
    """IPO's Eq. 17 read on whole sequences (Azar et al. 2023; as DPO's reference code and OpenRLHF do):
    (h - 1/(2β))² per pair, h as in `dpo_loss` from summed log-probs."""
    r = logratios(a)
    chosen, rejected = a.halves(r)
    h = chosen - rejected
    return (h - 1 / (2 * p.beta)) ** 2, p.beta * r.detach()


def simpo_loss(a: Answers, p: LossParams) -> tuple[Tensor, Tensor]:
    """SimPO (Meng et al. 2024), reference-free: -log σ(β S̄_θ(y_w) - β S̄_θ(y_l) - γ) per pair, with
    S̄ = S/|y| the mean per-token log-prob; its implicit rewards are β·S̄_θ."""
    mean_logps = a.logps / a.lengths
    chosen, rejected = a.halves(mean_logps)
    return -F.logsigmoid(p.beta * (chosen - rejected) - p.simpo_gamma), p.beta * mean_logps.detach()


def kto_reference_point(logps: Tensor, ref_logps: Tensor, all_sum=None) -> Tensor:
    """KTO's reference point z₀ = max(0, mean_i [S_θ(y'_i|x_i) - S_ref(y'_i|x_i)]) (Ethayarajh et al. 2024 §4):
    an estimate of KL(π_θ ‖ π_ref) from mismatched pairs, each prompt x_i with an answer y'_i written for another
    prompt, clamped at 0 and detached (it sets the level the rewards are measured against, and is not trained
    through). logps, ref_logps [M]: this process's mismatched pairs. all_sum: sums over data-parallel ranks
    (as in `whiten`): the mean is over the global batch's pairs, so 1 and N processes share one z₀."""
    all_sum = all_sum or (lambda t: t)
    logratio = (logps - ref_logps).detach()
    total = all_sum(torch.stack([logratio.sum(), logratio.new_tensor(float(logratio.numel()))]))
    return (total[0] / total[1]).clamp(min=0).detach()


def kto_loss(a: Answers, p: LossParams) -> tuple[Tensor, Tensor]:
    """KTO (Ethayarajh et al. 2024 §4), on answers labelled desirable or not, one term per answer [N]:
        λ_y - v(x, y),   v = λ_D σ(β (r - z₀)) if y is desirable,   λ_U σ(β (z₀ - r)) if not,
    that is λ_D (1 - σ(β (r - z₀))) or λ_U (1 - σ(β (z₀ - r))), with r = S_θ(y|x) - S_ref(y|x) and
    z₀ = a.kl (`kto_reference_point`, the same for every answer of the global batch). The loss is the mean over
    answers. A pair reads as two answers, its chosen one desirable and its rejected one not. Rewards β·r [N]."""
    r = logratios(a)
    desirable = p.kto_lambda_d * (1 - torch.sigmoid(p.beta * (r - a.kl)))
    undesirable = p.kto_lambda_u * (1 - torch.sigmoid(p.beta * (a.kl - r)))
    return torch.where(a.desirable, desirable, undesirable), p.beta * r.detach()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0 without cancellation (Mächler 2012): log(-expm1(x)) for x > -log 2, where e^x is
    near 1, and log1p(-e^x) below. Each branch reads only inputs where it is finite, so neither leaks an inf or NaN
    into the gradient."""
    near = x > -math.log(2)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near, -1.0, x))))


def log_odds(mean_logps: Tensor) -> Tensor:
    """log odds(y|x) = log P - log(1 - P) of P = exp(S̄), the length-normalised likelihood (Hong et al. 2024 §4).
    A mean log-prob that rounds to 0 (every token certain) is read as -eps of its dtype, so the odds stay finite."""
    m = mean_logps.clamp(max=-torch.finfo(mean_logps.dtype).eps)
    return m - log1mexp(m)


def orpo_loss(a: Answers, p: LossParams) -> tuple[Tensor, Tensor]:
    """ORPO (Hong et al. 2024 §4, Eqs. 6-7), reference-free, per pair:
        L_SFT + λ · L_OR = -S̄_θ(y_w) + λ · (-log σ(log odds_θ(y_w|x) - log odds_θ(y_l|x)))
    with S̄ = S/|y| the mean per-token log-prob and odds = P/(1 - P) of P = exp(S̄) (`log_odds`); λ = p.beta.
    L_SFT is the chosen answer's mean per-token NLL, averaged over pairs. Rewards λ·S̄_θ [2P] (as TRL's)."""
    mean_logps = a.logps / a.lengths
    chosen, rejected = a.halves(mean_logps)
    odds_ratio = -F.logsigmoid(log_odds(chosen) - log_odds(rejected))
    return -chosen + p.beta * odds_ratio, p.beta * mean_logps.detach()


PREFERENCE_LOSSES = {  # --loss_type: name -> function(Answers, LossParams) -> (losses, rewards)
    "sigmoid": dpo_loss,
    "robust": robust_dpo_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "ipo_sum": ipo_sum_loss,
    "simpo": simpo_loss,
    "kto": kto_loss,
    "orpo": orpo_loss,
}
REFERENCE_FREE = ("simpo", "orpo")  # read no S_ref: no reference model is loaded and no reference cache is built
PER_ANSWER = ("kto",)  # one term per labelled answer (pairs read as two), not per pair; unpaired data allowed


def preference_loss(loss_type: str, a: Answers, p: LossParams) -> tuple[Tensor, Tensor]:
    """The loss `loss_type` of PREFERENCE_LOSSES -> (losses, rewards); with p.rpo_alpha > 0 plus RPO's term
    α·(-S̄_θ(y_w)) on each pair (Pang et al. 2024), an NLL on the chosen answer that keeps its likelihood from
    falling."""
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(PREFERENCE_LOSSES)}")
    losses, rewards = PREFERENCE_LOSSES[loss_type](a, p)
    if p.rpo_alpha > 0:
        chosen, _ = a.halves(a.logps)
        chosen_lengths, _ = a.halves(a.lengths)
        losses = losses - p.rpo_alpha * chosen / chosen_lengths
    return losses, rewards


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
