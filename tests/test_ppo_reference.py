"""An independent PPO update, written for the test, against train_ppo.ppo_update.

The reference below takes a fixed rollout (prompts left-padded, answers with and without EOS, right-padded)
and the four models, and does one PPO update the slow, plain way: one episode and one token at a time, in
float64, with nothing from nanoalign.losses: the score with the missing-EOS penalty, the per-token KL at the
sampling temperature, the rewards, GAE, whitening (or RLOO / GRPO baselines), the clipped policy and value
losses over the same minibatches, gradient clipping and AdamW with the annealed learning rate, all by hand.
train_ppo's update, run on copies of the same models, must land on the same parameters.
"""
import copy
import math
import time
from dataclasses import replace

import pytest
import torch

import train_ppo
from hand import clip_and_adamw
from nanoalign.distributed import deal_minibatches
from nanoalign.model import GPT, GPTConfig
from nanoalign.scaffold import Process, make_optimizer

PAD, EOS, V = 0, 1, 13
CTX = Process(0, 1, torch.device("cpu"))


def tiny_models(seed=0):
    """policy (with a random, not zero, value head so values matter), reference, reward model, critic."""
    torch.manual_seed(seed)
    config = GPTConfig(block_size=16, vocab_size=V, n_layer=1, n_head=2, n_embd=8, scalar_head=True)
    policy, reference, rm, critic = (GPT(config).double() for _ in range(4))
    with torch.no_grad():
        for model in (policy, rm, critic):
            model.scalar_head.weight.normal_(std=0.5)
            model.scalar_head.bias.fill_(0.1)
    return policy, reference, rm, critic


def fixed_rollout(samples_per_prompt=2, seed=0):
    """8 episodes: prompts of 2-4 tokens left-padded to 4, answers of 1-5 tokens right-padded to 6; EOS ends
    five of them, the other three stop at the length limit."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens, answer_lens = [4, 2, 3, 4, 3, 2, 4, 3], [5, 1, 3, 5, 2, 4, 5, 3]
    eos = [True, True, False, True, True, False, True, False]
    ids = torch.full((8, 10), PAD)  # a padding column at the end: T - 1 = 9 differs from the batch's 8
    attn = torch.zeros(8, 10, dtype=torch.long)
    for b in range(8):
        if b % samples_per_prompt == 0:  # a prompt's samples share it
            prompt = torch.randint(2, V, (prompt_lens[b],), generator=g)
        ids[b, 4 - len(prompt):4], attn[b, 4 - len(prompt):4] = prompt, 1
        answer = torch.randint(2, V, (answer_lens[b],), generator=g)
        if eos[b]:
            answer[-1] = EOS
        ids[b, 4:4 + len(answer)], attn[b, 4:4 + len(answer)] = answer, 1
    response = attn.clone()
    response[:, :4] = 0
    mask = response[:, 1:].double()
    prompts = [f"Where is my order #{1000 + b // samples_per_prompt}?" for b in range(8)]
    return train_ppo.Rollout(prompts, [""] * 8, ids, attn, mask, torch.tensor(eos))


def gold(prompt, answer):
    """A stand-in gold judge (logged only): a score that differs between prompts."""
    return {"gold": int(prompt[-5:-1]) % 8 / 8}


# ------------------------------------------------------------------------------------------- reference


def log_softmax_at(row, token, temperature):
    """log softmax(row / T)[token] for one position: the row's logsumexp written out."""
    x = row / temperature
    top = x.max()
    return x[token] - (top + torch.log(sum(torch.exp(x[v] - top) for v in range(len(x)))))


def episode(model, roll, b, temperature, want_values):
    """Per response token t of episode b: (log-prob of ids[t] from the logits at t-1, value at t-1)."""
    out = model(roll.ids[b:b + 1], attention_mask=roll.attn[b:b + 1], output="both")
    logits, values = out[0][0], out[1][0]
    steps = [t for t in range(1, roll.ids.shape[1]) if roll.mask[b, t - 1] == 1]
    return [(log_softmax_at(logits[t - 1], roll.ids[b, t].item(), temperature),
             values[t - 1] if want_values else None,
             logits[t - 1]) for t in steps]


def reference_update(models, roll, cfg, beta, update, adam):
    """One PPO update by hand; `adam` holds the AdamW states ({param: (m, v, step)}) across updates."""
    policy, reference, rm, critic, gain, bias = models
    B, temp = len(roll.ids), cfg.temperature
    head = cfg.advantage == "gae" and critic is None
    value_model = policy if head else critic
    old, ref, old_v, scores, raw = [], [], [], [], []
    with torch.no_grad():
        for b in range(B):
            old.append([lp.item() for lp, _, _ in episode(policy, roll, b, temp, False)])
            ref.append([lp.item() for lp, _, _ in episode(reference, roll, b, temp, False)])
            if cfg.advantage == "gae":
                old_v.append([v.item() for _, v, _ in episode(value_model, roll, b, temp, True)])
            last = max(t for t in range(roll.ids.shape[1]) if roll.attn[b, t] == 1)
            r = rm(roll.ids[b:b + 1], attention_mask=roll.attn[b:b + 1], output="scalar")[0, last].item()
            raw.append(gain * r + bias)
    golds = [gold(p, "")["gold"] for p in roll.prompts]
    if cfg.reward == "gold":  # the gold judge, normalised like the RM: mean 0, population std 1 over the rollout
        mean = sum(golds) / B
        std = math.sqrt(sum((g - mean) ** 2 for g in golds) / B)
        earned = [(g - mean) / std for g in golds]
    else:
        earned = raw
    scores = [e if roll.has_eos[b] else cfg.missing_eos_penalty for b, e in enumerate(earned)]

    def kl(o, r):  # Schulman 2020's estimators of KL(π ‖ π_ref) from one sampled token, u = r - o
        u = r - o
        return {"k1": -u, "k2": u * u / 2, "k3": math.exp(u) - 1 - u}[cfg.kl_estimator]

    rewards = [[-beta * kl(o, r) for o, r in zip(old[b], ref[b])] for b in range(B)]
    for b in range(B):
        rewards[b][-1] += scores[b]
    if cfg.whiten_rewards:  # unit variance over every response token, the mean kept
        flat = [x for r in rewards for x in r]
        mean = sum(flat) / len(flat)
        std = math.sqrt(sum((x - mean) ** 2 for x in flat) / len(flat) + 1e-8)
        rewards = [[(x - mean) / std + mean for x in r] for r in rewards]
    if cfg.advantage == "gae":
        adv, ret = [], []
        for b in range(B):
            a, nxt, values = [0.0] * len(rewards[b]), 0.0, old_v[b] + [0.0]
            for t in reversed(range(len(rewards[b]))):
                delta = rewards[b][t] + cfg.gamma * values[t + 1] - values[t]
                nxt = delta + cfg.gamma * cfg.lam * nxt
                a[t] = nxt
            adv.append(a)
            ret.append([a[t] + old_v[b][t] for t in range(len(a))])
        flat = [x for a in adv for x in a]
        mean = sum(flat) / len(flat)
        var = sum((x - mean) ** 2 for x in flat) / len(flat)
        adv = [[(x - mean) / math.sqrt(var + 1e-8) for x in a] for a in adv]
    else:
        k = cfg.samples_per_prompt
        totals = [sum(r) for r in rewards]
        adv = []
        for b in range(B):
            group = totals[b - b % k:b - b % k + k]
            if cfg.advantage == "rloo":
                a = totals[b] - (sum(group) - totals[b]) / (k - 1)
            else:
                m = sum(group) / k
                a = (totals[b] - m) / (math.sqrt(sum((x - m) ** 2 for x in group) / (k - 1)) + 1e-4)
            adv.append([a] * len(rewards[b]))

    lr_frac = 1 - update / cfg.n_updates
    logged = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "entropy")}
    for epoch in range(cfg.ppo_epochs):
        for mb in deal_minibatches(B, cfg.minibatches, cfg.seed + update * 97 + epoch, CTX):
            mb = mb.tolist()
            n = sum(len(old[b]) for b in mb)
            pg = vf = ent = clipped_tokens = half_sq = 0.0
            for b in mb:
                for t, (lp, v, logits) in enumerate(episode(policy, roll, b, temp, head)):
                    ratio = torch.exp(lp - old[b][t])
                    clipped_tokens += abs(ratio.item() - 1) > cfg.clip_eps
                    half_sq += 0.5 * (lp.item() - old[b][t]) ** 2
                    clipped = torch.clamp(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps)
                    pg = pg + torch.maximum(-adv[b][t] * ratio, -adv[b][t] * clipped)
                    p = torch.softmax(logits / temp, 0)
                    ent = ent - sum(p[i] * torch.log(p[i]) for i in range(V))
                if cfg.advantage == "gae":
                    for t, (_, v, _) in enumerate(episode(value_model, roll, b, temp, True)):
                        vc = old_v[b][t] + torch.clamp(v - old_v[b][t], -cfg.clip_eps_value, cfg.clip_eps_value)
                        vf = vf + torch.maximum((v - ret[b][t]) ** 2, (vc - ret[b][t]) ** 2)
            loss = pg / n - cfg.entropy_coef * ent / n + cfg.vf_coef * 0.5 * vf / n
            for k, x in zip(logged, (pg / n, 0.5 * vf / n, clipped_tokens / n, half_sq / n, ent / n)):
                logged[k].append(float(torch.as_tensor(x).detach()))
            loss.backward()
            clip_and_adamw(policy.parameters(), cfg.lr * lr_frac, adam, cfg.grad_clip, cfg.adam_eps)
            if critic is not None:
                clip_and_adamw(critic.parameters(), cfg.critic_lr * lr_frac, adam, cfg.grad_clip, cfg.adam_eps)
    def mean(xs):
        return sum(xs) / len(xs)

    u = [[r - o for o, r in zip(old[b], ref[b])] for b in range(B)]
    metrics = {"objective/kl": mean([-sum(x) for x in u]),
               "objective/kl_k2": mean([sum(x * x / 2 for x in e) for e in u]),
               "objective/kl_k3": mean([sum(math.expm1(x) - x for x in e) for e in u]),
               "objective/score": mean(scores), "objective/rm_score": mean(raw),
               "objective/gold": mean(golds), "objective/beta": beta,
               "response/length": mean([len(e) for e in old]), "response/eos_rate": mean(roll.has_eos.tolist()),
               **{f"ppo/{k}": mean(v) for k, v in logged.items()}}
    if cfg.advantage == "gae":  # 1 - Var(R - V) / Var(R) over the response tokens, unbiased variances
        def var(xs):
            return sum((x - mean(xs)) ** 2 for x in xs) / (len(xs) - 1)
        r = [x for e in ret for x in e]
        v = [x for e in old_v for x in e]
        metrics["ppo/explained_variance"] = 1 - var([a - b for a, b in zip(r, v)]) / var(r)
    return metrics


# ---------------------------------------------------------------------------------------------- tests

BASE = train_ppo.Config(n_updates=4, rollout_size=8, minibatches=2, ppo_epochs=2, lr=3e-2, critic_lr=1e-2,
                        temperature=0.7, beta=0.3, vf_coef=0.5, entropy_coef=0.01, grad_clip=0.5,
                        missing_eos_penalty=-2.0, lam=0.9, gamma=0.95, clip_eps=0.1, clip_eps_value=0.05, seed=11)
VARIANTS = {
    "head": {},
    "separate_critic": dict(critic="separate"),
    "adaptive_beta": dict(kl_target=0.01, kl_horizon=20),
    "k2": dict(kl_estimator="k2"),
    "k3": dict(kl_estimator="k3"),
    "whiten_rewards": dict(whiten_rewards=True),
    "reward_gold": dict(reward="gold"),
    "temperature_1": dict(temperature=1.0),
    "rloo": dict(advantage="rloo", samples_per_prompt=2),
    "grpo": dict(advantage="grpo", samples_per_prompt=4),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_ppo_update_equals_the_hand_written_reference(name, monkeypatch):
    """Two updates (the second with the annealed lr and, for adaptive β, the adapted coefficient): the same
    parameters and the same logged metrics."""
    monkeypatch.setattr(train_ppo.gold_judge, "judge", gold)
    cfg = replace(BASE, **VARIANTS[name])
    roll = fixed_rollout(cfg.samples_per_prompt)
    policy, reference, rm, critic = tiny_models()
    separate = cfg.critic == "separate" and cfg.advantage == "gae"
    gain, bias = 1.5, -0.2
    ours = [copy.deepcopy(m) for m in (policy, reference, rm, critic)]
    theirs = [copy.deepcopy(m) for m in (policy, reference, rm, critic)]

    optimizer = make_optimizer(ours[0], cfg.lr, 0.0, eps=cfg.adam_eps)
    critic_opt = make_optimizer(ours[3], cfg.critic_lr, 0.0, eps=cfg.adam_eps) if separate else None
    beta, logged, gold_norm = cfg.beta, [], None
    for update in range(2):
        ours[0].eval()
        t0 = time.time()
        metrics, gold_norm = train_ppo.ppo_update(roll, ours[0], ours[3] if separate else None, ours[1],
                                                  (ours[2], gain, bias), optimizer, critic_opt, beta, gold_norm, cfg,
                                                  CTX, update)
        wall = time.time() - t0
        assert 0 <= metrics["time/score"] <= metrics["time/score"] + metrics["time/train"] <= wall
        logged.append(metrics)
        if cfg.kl_target > 0:
            beta = train_ppo.adaptive_kl_beta(beta, metrics["objective/kl"], cfg.kl_target, cfg.rollout_size,
                                              cfg.kl_horizon)

    adam, beta = {}, cfg.beta
    for update in range(2):
        models = (theirs[0], theirs[1], theirs[2], theirs[3] if separate else None, gain, bias)
        expected = reference_update(models, roll, cfg, beta, update, adam)
        got = {k: v for k, v in logged[update].items() if not k.startswith("time/")}
        assert got == pytest.approx(expected, rel=1e-7, abs=1e-10)  # float64 metrics: summation order, ~1e-15
        if cfg.kl_target > 0:  # Ziegler et al. 2019's controller, by hand
            error = min(max(expected["objective/kl"] / cfg.kl_target - 1, -0.2), 0.2)
            beta = beta * (1 + error * cfg.rollout_size / cfg.kl_horizon)

    # float64 both sides, only the order of sums differs (~1e-14 after the steps); a real bug moves weights by
    # lr-sized steps (1e-3 or more)
    moved = 0.0
    for a, b, start in zip(ours[0].parameters(), theirs[0].parameters(), policy.parameters()):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)
        moved = max(moved, (a - start).abs().max().item())
    assert moved > 1e-3  # the update did something
    if separate:
        for a, b in zip(ours[3].parameters(), theirs[3].parameters()):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_missing_eos_penalty_replaces_the_score(monkeypatch):
    monkeypatch.setattr(train_ppo.gold_judge, "judge", lambda prompt, answer: {"gold": 0.0})
    roll = fixed_rollout()
    policy, reference, rm, _ = tiny_models()
    cfg = BASE
    metrics, _ = train_ppo.ppo_update(roll, policy.eval(), None, reference, (rm, 1.5, -0.2),
                                      make_optimizer(policy, cfg.lr, 0.0), None, 0.0, None, cfg, CTX, 0)
    with torch.no_grad():
        raw = []
        for b in range(8):
            last = max(t for t in range(roll.ids.shape[1]) if roll.attn[b, t] == 1)
            raw.append(1.5 * rm(roll.ids[b:b + 1], attention_mask=roll.attn[b:b + 1], output="scalar")[0, last] - 0.2)
    scored = [r.item() if eos else cfg.missing_eos_penalty for r, eos in zip(raw, roll.has_eos.tolist())]
    # float64 models, the same forwards batched or alone: ~1e-15 (pytest.approx's rel 1e-6 default: far above)
    assert metrics["objective/rm_score"] == pytest.approx(sum(r.item() for r in raw) / 8)
    assert metrics["objective/score"] == pytest.approx(sum(scored) / 8)
    assert metrics["response/eos_rate"] == 5 / 8


def test_learning_rate_anneals_linearly_to_zero(monkeypatch):
    monkeypatch.setattr(train_ppo.gold_judge, "judge", lambda prompt, answer: {"gold": 0.0})
    roll, (policy, reference, rm, critic) = fixed_rollout(), tiny_models()
    cfg = replace(BASE, critic="separate", n_updates=5)
    optimizer, critic_opt = make_optimizer(policy, cfg.lr, 0.0), make_optimizer(critic, cfg.critic_lr, 0.0)
    for update in (0, 2, 4):
        train_ppo.ppo_update(roll, policy.eval(), critic, reference, (rm, 1.0, 0.0), optimizer, critic_opt,
                             cfg.beta, None, cfg, CTX, update)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr * (1 - update / 5))  # Python floats
        assert critic_opt.param_groups[0]["lr"] == pytest.approx(cfg.critic_lr * (1 - update / 5))


@pytest.mark.parametrize("rows,n,world", [(8, 2, 1), (12, 3, 1), (16, 4, 2), (8, 4, 2)])
def test_every_row_in_exactly_one_minibatch_per_epoch(rows, n, world):
    """Over the ranks' shares, each global row lands in exactly one minibatch; minibatches are equal in size,
    and different seeds deal them differently (a shuffle, not a fixed split)."""
    deals = []
    for seed in (0, 1):
        seen = []
        for rank in range(world):
            parts = deal_minibatches(rows // world, n, seed, Process(rank, world, torch.device("cpu")))
            assert len(parts) == n and {len(p) for p in parts} == {rows // world // n}
            seen += [(j, rank * (rows // world) + i) for j, p in enumerate(parts) for i in p.tolist()]
        assert sorted(row for _, row in seen) == list(range(rows))
        deals.append(sorted(seen))
    assert deals[0] != deals[1]
