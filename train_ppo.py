"""PPO on the helpdesk prompts: the policy samples, the reward model scores, a KL penalty holds it near SFT.

    python train_ppo.py                                   # policy out/sft, reward model out/rm -> out/ppo
    python train_ppo.py --critic=separate                 # value model initialised from the reward model
    python train_ppo.py --advantage=rloo --samples_per_prompt=4   # critic-free variants on the same loop
    python train_ppo.py --reward=gold                     # PPO on the true reward (DPO paper's "PPO-GT")
    python train_ppo.py --beta=0 --n_updates=300 --out_dir=out/ppo_hack   # reward hacking, made visible

One update, top to bottom (Ziegler et al. 2019; "The N implementation details of RLHF with PPO", N 1-21):
  1. rollout    sample answers to a batch of prompts at temperature T (no top-k / top-p: exact sampling)
  2. score      normalised reward-model score at the last real token; missing EOS -> score replaced by a penalty
  3. KL penalty old, reference and value forwards on prompt + response; r_t = -β·kl_t, score added on the last token
  4. advantages GAE on the per-token rewards (whitened), or RLOO / GRPO on sequence returns
  5. PPO epochs clipped surrogate + clipped value loss over shuffled minibatches
  6. log        RM reward, gold, KL k1/k2/k3, β, entropy, clipfrac, approx-KL, value loss, explained variance
Departures: one process only (each rank would need its own rollouts; FSDP parity for PPO is the speed issue's);
the adaptive β uses the batch's mean k1 sequence KL; the gold reward is normalised like the reward model's, with
gain and bias fitted on the first rollout (the SFT policy's samples), so β means the same for both.
"""

import time
from dataclasses import asdict, dataclass

import torch

from nanoalign import helpdesk
from nanoalign.checkpoint import load_model, load_reward_model, write_checkpoint
from nanoalign.data import batch_indices, read_jsonl
from nanoalign.evaluate import evaluate_policy, write_json
from nanoalign.losses import (adaptive_kl_beta, gae, grpo_advantages, kl_estimate, masked_mean, per_token_rewards,
                              ppo_policy_loss, ppo_value_loss, rloo_advantages, token_logps, whiten)
from nanoalign.sampling import reward_scores, sample
from nanoalign.scaffold import Logger, full_state, make_optimizer, optimizer_step, parse_config, setup


@dataclass
class Config:
    data_dir: str = "data"  # prompts.jsonl (training prompts) and sft_test.jsonl (held-out evaluation)
    init_from: str = "out/sft"  # policy and frozen reference
    reward_model: str = "out/rm"  # frozen, normalised reward model (and the separate critic's init)
    out_dir: str = "out/ppo"  # checkpoint, log.jsonl, eval.json
    reward: str = "rm"  # rm | gold (the helpdesk judge itself: no proxy error)
    critic: str = "head"  # head (zero-initialised scalar head on the policy) | separate (copy of the RM)
    advantage: str = "gae"  # gae | rloo | grpo
    samples_per_prompt: int = 1  # answers per prompt in a rollout (rloo/grpo need >= 2)
    n_updates: int = 60  # rollout + optimisation rounds
    rollout_size: int = 64  # episodes per update
    minibatches: int = 2  # minibatches per PPO epoch
    ppo_epochs: int = 4  # passes over each rollout
    lr: float = 3e-5  # AdamW learning rate, linearly annealed to 0 (N detail 5)
    critic_lr: float = 3e-4  # learning rate of the separate critic
    adam_eps: float = 1e-5  # N+ / N detail 21
    grad_clip: float = 1.0  # global grad-norm clip
    temperature: float = 1.0  # sampling temperature, also in every log-prob forward (N detail 10)
    max_new_tokens: int = 64  # response length limit
    beta: float = 0.05  # KL coefficient (initial value when adaptive)
    kl_estimator: str = "k1"  # k1 | k3 per-token KL in the reward
    kl_target: float = 0.0  # > 0: adaptive β toward this sequence KL (nats), Ziegler's controller
    kl_horizon: int = 10000  # adaptive controller horizon
    whiten_rewards: bool = False  # per-token rewards scaled to unit variance, mean kept (OAI-19 on, N+ off)
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE λ
    clip_eps: float = 0.2  # policy ratio clip ε
    clip_eps_value: float = 0.2  # value clip ε_v
    vf_coef: float = 0.1  # value loss weight (head critic)
    entropy_coef: float = 0.0  # entropy bonus (logged either way)
    missing_eos_penalty: float = -1.0  # score of an answer with no EOS (replaces the RM score; N+)
    n_eval: int = 200  # held-out prompts for the final eval.json
    log_interval: int = 1  # updates between progress lines
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 1234  # data order and sampling


def forward(model, ids, attn, temperature, with_values):
    """Per-token log-probs of each row's own tokens [B, T-1], logits [B, T-1, V], and values [B, T-1] read at
    the position whose logits score the token, so values and log-probs align (N detail 15)."""
    if with_values:
        logits, values = model(ids, attention_mask=attn, output="both")
        values = values[:, :-1]
    else:
        logits, values = model(ids, attention_mask=attn), None
    logits = logits[:, :-1]
    return token_logps(logits, ids[:, 1:], temperature), logits, values


def main(cfg: Config) -> dict:
    assert cfg.reward in ("rm", "gold") and cfg.critic in ("head", "separate") and cfg.advantage in ("gae", "rloo", "grpo")
    assert cfg.advantage == "gae" or cfg.samples_per_prompt >= 2, "rloo and grpo need samples_per_prompt >= 2"
    # 0. processes, models: policy (+ value head), frozen reference, frozen reward model, critic
    ctx = setup(cfg.seed, cfg.device)
    uses_critic = cfg.advantage == "gae"
    policy, tok = load_model(cfg.init_from, scalar_head=uses_critic and cfg.critic == "head")
    if uses_critic and cfg.critic == "head":
        policy.reset_scalar_head(std=0.0)  # V ≡ 0 at the start (N detail 11)
    reference = load_model(cfg.init_from, tok, scalar_head=False)[0].eval().requires_grad_(False)
    rm, _, gain, bias = load_reward_model(cfg.reward_model, tok)
    rm.eval().requires_grad_(False)
    critic = None
    if uses_critic and cfg.critic == "separate":  # fold the RM's gain/bias into its head: V starts at the score
        critic = load_reward_model(cfg.reward_model, tok)[0]
        with torch.no_grad():
            critic.scalar_head.weight.mul_(gain)
            critic.scalar_head.bias.mul_(gain).add_(bias)
        critic.to(ctx.device)
    for m in (policy, reference, rm):
        m.to(ctx.device)
    optimizer = make_optimizer(policy, cfg.lr, 0.0, eps=cfg.adam_eps)
    critic_opt = make_optimizer(critic, cfg.critic_lr, 0.0, eps=cfg.adam_eps) if critic is not None else None
    prompts = [r["prompt"] for r in read_jsonl(f"{cfg.data_dir}/prompts.jsonl", "prompts")]
    logger = Logger(cfg.out_dir, ctx, cfg.n_updates)
    g = torch.Generator(device=ctx.device).manual_seed(cfg.seed + 100003 * ctx.rank)
    beta, gold_norm = cfg.beta, None
    n_prompts = cfg.rollout_size // cfg.samples_per_prompt

    for update in range(cfg.n_updates):
        t0 = time.time()
        # 1. rollout: each prompt samples_per_prompt times, rows of one prompt adjacent
        batch = [prompts[i] for i in batch_indices(len(prompts), n_prompts, update, cfg.seed)]
        batch = [p for p in batch for _ in range(cfg.samples_per_prompt)]
        policy.eval()
        out = sample(policy, [tok.encode_prompt(p) for p in batch], cfg.max_new_tokens, tok.eos_id, tok.pad_id,
                     temperature=cfg.temperature, generator=g)
        ids = torch.cat([out["prompt_ids"], out["response_ids"]], 1)  # [B, T]
        attn = torch.cat([out["prompt_mask"], out["response_mask"]], 1)
        mask = torch.cat([torch.zeros_like(out["prompt_mask"]), out["response_mask"]], 1)[:, 1:].float()  # [B, T-1]
        answers = [tok.decode(r[m.bool()].tolist()) for r, m in zip(out["response_ids"], out["response_mask"])]
        has_eos = ((out["response_ids"] == tok.eos_id) & out["response_mask"].bool()).any(-1)

        # 2. score: normalised RM (or gold) at the last real token; no EOS -> the penalty replaces it
        gold = torch.tensor([helpdesk.judge(p, a)["gold"] for p, a in zip(batch, answers)], device=ctx.device)
        with torch.no_grad():
            rm_scores = reward_scores(rm, ids, attn, gain, bias)  # [B]
        if cfg.reward == "gold":
            if gold_norm is None:  # SFT-policy samples: mean 0, std 1, as the RM's normalisation
                gold_norm = (1 / gold.std().item(), -gold.mean().item() / gold.std().item())
            scores = gold_norm[0] * gold + gold_norm[1]
        else:
            scores = rm_scores
        scores = torch.where(has_eos, scores, torch.full_like(scores, cfg.missing_eos_penalty))

        # 3. KL penalty: old and reference log-probs from the training forward, at the sampling temperature
        with torch.no_grad():
            old_logps, _, old_values = forward(policy, ids, attn, cfg.temperature, critic is None and uses_critic)
            if critic is not None:
                old_values = critic(ids, attention_mask=attn, output="scalar")[:, :-1]
            ref_logps, _, _ = forward(reference, ids, attn, cfg.temperature, False)
        kl = kl_estimate(old_logps, ref_logps, cfg.kl_estimator) * mask  # [B, T-1]
        rewards = per_token_rewards(scores, kl, mask, beta)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)

        # 4. advantages: GAE with the critic, or RLOO / GRPO baselines from the other samples of the prompt
        if uses_critic:
            advantages, returns = gae(rewards, old_values * mask, mask, cfg.gamma, cfg.lam)
            advantages = whiten(advantages, mask)
        else:
            seq_returns = rewards.sum(-1).view(n_prompts, cfg.samples_per_prompt)  # s - β Σ kl, per answer
            fn = rloo_advantages if cfg.advantage == "rloo" else grpo_advantages
            advantages = fn(seq_returns).view(-1, 1) * mask  # the same advantage on every token of an answer

        # 5. PPO epochs over shuffled minibatches
        policy.train()
        lr_frac = 1 - update / cfg.n_updates  # linear anneal to 0 (N detail 5)
        stats = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "entropy")}
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(len(batch), generator=torch.Generator().manual_seed(cfg.seed + update * 97 + _))
            for mb in perm.chunk(cfg.minibatches):
                logps, logits, values = forward(policy, ids[mb], attn[mb], cfg.temperature,
                                                critic is None and uses_critic)
                pg_loss, clipfrac, approx_kl = ppo_policy_loss(logps, old_logps[mb], advantages[mb], mask[mb],
                                                               cfg.clip_eps)
                logp_all = (logits.float() / cfg.temperature).log_softmax(-1)
                entropy = masked_mean(-(logp_all.exp() * logp_all).sum(-1), mask[mb])
                loss = pg_loss - cfg.entropy_coef * entropy
                vf_loss = torch.zeros(())
                if uses_critic:
                    if critic is not None:
                        values = critic(ids[mb], attention_mask=attn[mb], output="scalar")[:, :-1]
                    vf_loss, _ = ppo_value_loss(values, old_values[mb], returns[mb], mask[mb], cfg.clip_eps_value)
                    loss = loss + cfg.vf_coef * vf_loss
                loss.backward()
                optimizer_step(policy, optimizer, cfg.lr * lr_frac, cfg.grad_clip)
                if critic is not None:
                    optimizer_step(critic, critic_opt, cfg.critic_lr * lr_frac, cfg.grad_clip)
                for k, v in (("pg_loss", pg_loss), ("vf_loss", vf_loss), ("clipfrac", clipfrac),
                             ("approx_kl", approx_kl), ("entropy", entropy)):
                    stats[k].append(v.item())

        # 6. log; adapt β toward the KL target (Ziegler et al. 2019)
        seq_kl = {k: (kl_estimate(old_logps, ref_logps, k) * mask).sum(-1).mean().item() for k in ("k1", "k2", "k3")}
        metrics = {"objective/score": scores.mean().item(), "objective/rm_score": rm_scores.mean().item(),
                   "objective/gold": gold.mean().item(),
                   "objective/kl": seq_kl["k1"], "objective/kl_k2": seq_kl["k2"], "objective/kl_k3": seq_kl["k3"],
                   "objective/beta": beta, **{f"ppo/{k}": sum(v) / len(v) for k, v in stats.items()},
                   "response/length": mask.sum(-1).mean().item(), "response/eos_rate": has_eos.float().mean().item()}
        if uses_critic:
            r_all, v_all = returns[mask.bool()], old_values[mask.bool()]
            metrics["ppo/explained_variance"] = (1 - (r_all - v_all).var() / r_all.var()).item()
        if cfg.kl_target > 0:
            beta = adaptive_kl_beta(beta, seq_kl["k1"], cfg.kl_target, len(batch), cfg.kl_horizon)
        if (update + 1) % cfg.log_interval == 0:
            logger.log(update + 1, metrics, mask.sum().item() / (time.time() - t0))

    # 7. save, evaluate on held-out prompts against the SFT reference, write eval.json
    meta = {"model": asdict(policy.config), "run": asdict(cfg), "step": cfg.n_updates, "metrics": metrics}
    write_checkpoint(cfg.out_dir, full_state(policy), meta, tok)
    result = {}
    if cfg.n_eval > 0:
        result, eval_prompts, eval_answers = evaluate_policy(policy, tok, cfg.data_dir, cfg.n_eval, cfg.max_new_tokens,
                                                             cfg.temperature, seed=cfg.seed, reference=reference)
        for p, a in list(zip(eval_prompts, eval_answers))[:4]:
            print(f"\n> {p}\n{a}")
        write_json(f"{cfg.out_dir}/eval.json", result)
        print("\neval:", {k: result[k] for k in ("gold", "sft_gold", "failures", "sft_failures", "kl", "win_rate_vs_sft")})
    return result


if __name__ == "__main__":
    main(parse_config(Config))
