"""PPO on the helpdesk prompts: the policy samples, the reward model scores, a KL penalty holds it near SFT.

    python train_ppo.py                                   # policy out/sft, reward model out/rm -> out/ppo
    python train_ppo.py --critic=separate                 # value model initialised from the reward model
    python train_ppo.py --advantage=rloo --samples_per_prompt=4   # critic-free variants on the same loop
    python train_ppo.py --reward=gold                     # PPO on the true reward (DPO paper's "PPO-GT")
    python train_ppo.py --kl_target=4 --eval_interval=20  # adaptive β; gold and KL on held-out prompts every 20
    python train_ppo.py --beta=0 --n_updates=200 --lr=1e-4 --out_dir=out/ppo_hack   # reward hacking, made visible
    torchrun --nproc_per_node=2 train_ppo.py              # data-parallel: each rank samples a share of the rollout
    python train_ppo.py --resume=True                     # continue a killed run from out/ppo's last checkpoint

One update, top to bottom (Ziegler et al. 2019; "The N implementation details of RLHF with PPO", N 1-21):
  1. rollout    sample answers to a batch of prompts at temperature T (no top-k / top-p: exact sampling)
  2. score      normalised reward-model score at the last real token; missing EOS -> score replaced by a penalty
  3. KL penalty old, reference and value forwards on prompt + response; r_t = -β·kl_t, score added on the last token
  4. advantages GAE on the per-token rewards (whitened), or RLOO / GRPO on sequence returns
  5. PPO epochs clipped surrogate + clipped value loss over shuffled minibatches
  6. log        RM reward, gold, KL k1/k2/k3, β, entropy, clipfrac, approx-KL, value loss, explained variance,
                the seconds spent in rollout (1), scoring (2-4) and training (5)
Under torchrun the policy and a separate critic are sharded with FSDP2, their weights gathered once for the whole
rollout; the frozen reference and reward model are forward-only, so every rank keeps an unsharded replica. Which
episodes each rank samples (whole prompts, one generator per episode), its rows of each minibatch, and the sums,
means and variances over all ranks (whitening, the loss and gold normalisations, β, the logs) are
nanoalign/distributed.py's: 1 and N processes sample the same episodes and take the same steps.
Departures: no micro-batching (each minibatch is one forward and backward; the reference recipes accumulate
gradients over micro-batches, which at these sizes would change nothing but speed); RLOO and GRPO are
aggregated per token like PPO (the loss is a mean over the minibatch's response tokens, where the RLOO and
GRPO papers average each answer's tokens first, then the answers); AdamW's β₂ is 0.95 (`make_optimizer`);
minibatches are stratified rather than a plain shuffle (each run of `minibatches` consecutive
episodes is dealt one to each minibatch), so that a minibatch holds the same episodes for any world size; the
adaptive β uses the rollout's mean k1 sequence KL; the gold reward is normalised like the reward model's, with
gain and bias fitted on the first rollout (the SFT policy's samples), so β means the same for both.
"""

import time
from dataclasses import asdict, dataclass

import torch

from nanoalign.checkpoint import load_model, load_reward_model, read_meta
from nanoalign.config import check_config, parse_config
from nanoalign.data import batch_indices, check_batch, check_prompts, read_jsonl
from nanoalign.distributed import (all_sum, deal_minibatches, global_mean, global_total, global_var, rank_share,
                                   row_generators)
from nanoalign.evaluate import check_eval_prompts, curve_point_due, finish
from nanoalign.logger import Logger
from nanoalign.losses import (adaptive_kl_beta, gae, grpo_advantages, kl_estimate, masked_mean, per_token_rewards,
                              ppo_policy_loss, ppo_value_loss, reward_normalisation, rloo_advantages, token_entropy,
                              unpack, whiten)
from nanoalign.sampling import join, reward_scores, sample, scored_forward, token_values
from nanoalign.scaffold import (claim_out_dir, gathered, global_backward, make_optimizer,
                                optimizer_step, resume, run_inputs, save_final, save_resumable, setup, teardown,
                                world_size, wrap_model)
from nanoalign.world import gold_judge

@dataclass
class Config:
    data_dir: str = "data"  # prompts.jsonl (training prompts) and sft_test.jsonl (held-out evaluation)
    init_from: str = "out/sft"  # policy and frozen reference
    reward_model: str = "out/rm"  # frozen, normalised reward model (and the separate critic's init)
    out_dir: str = "out/ppo"  # checkpoint, log.jsonl, eval.json
    resume: bool = False  # continue from out_dir's last checkpoint (policy, critic, optimizers, β, RNG)
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
    kl_estimator: str = "k1"  # k1 | k2 | k3 per-token KL in the reward
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
    eval_interval: int = 0  # updates between gold and KL on those prompts, eval/gold, eval/kl in log.jsonl (0 = none)
    eval_max_new_tokens: int = 96  # their answer length limit, as in every stage's evaluation
    log_interval: int = 1  # updates between progress lines
    ckpt_interval: int = 20  # updates between resumable checkpoints (the final one is the plain policy)
    compile: bool = False  # torch.compile each transformer block
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "fp32"  # fp32 | bf16 (weights and AdamW moments) | fp16 (CUDA, loss scaling): nanoalign.precision
    allow_slow_dtype: bool = False  # run --dtype=bf16 on a CPU that only emulates it (tens of times slower)
    seed: int = 1234  # data order and sampling


@dataclass
class Rollout:
    """One update's episodes on this rank: prompt + response tokens and what the sampler knows of them."""
    prompts: list  # [B] prompt texts, a prompt's samples adjacent
    answers: list  # [B] decoded responses
    ids: torch.Tensor  # [B, T] prompt (left-padded) + response (right-padded)
    attn: torch.Tensor  # [B, T] 1 on real tokens
    mask: torch.Tensor  # [B, T-1] float, 1 where ids[:, 1:] is a response token (its EOS included)
    has_eos: torch.Tensor  # [B] bool: the answer stopped by itself


def rollout(policy, tok, prompts: list, cfg: Config, proc, update: int) -> Rollout:
    """Step 1: this update's prompts, each samples_per_prompt times, a prompt's samples adjacent; this rank samples
    its share, each episode with its own generator, the policy's weights gathered once (no collective per step)."""
    n_prompts, k = cfg.rollout_size // cfg.samples_per_prompt, cfg.samples_per_prompt
    batch = [prompts[i] for i in batch_indices(len(prompts), n_prompts, update, cfg.seed)]
    encoded = [tok.encode_prompt(p) for p in batch]
    # the whole rollout's longest prompt bounds the answer length on every rank, as in one process
    max_new_tokens = min(cfg.max_new_tokens, policy.config.block_size - max(map(len, encoded)))
    rows = rank_share(cfg.rollout_size, proc)
    batch, encoded = ([x for x in xs for _ in range(k)][rows.start:rows.stop] for xs in (batch, encoded))
    policy.eval()
    with gathered(policy):
        out = sample(policy, encoded, max_new_tokens, tok.eos_id, tok.pad_id, temperature=cfg.temperature,
                     generator=row_generators(cfg.seed, update, rows, cfg.rollout_size, proc.device))
    seqs = join(out, tok)
    return Rollout(batch, seqs.answers, seqs.ids, seqs.attn, seqs.mask, seqs.has_eos)


STATS = ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "entropy")  # minibatch_loss's parts, logged as ppo/...


def minibatch_loss(policy, critic, mb: dict, n_tokens: float, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 5 on one minibatch, mb its rows of ppo_update's episodes: the clipped surrogate, the entropy bonus
    and with GAE the clipped value loss (the policy's value head, or the separate critic), each summed over the
    response tokens ÷ n_tokens, the whole minibatch's over all ranks -> (loss, the STATS, detached)."""
    uses_critic = cfg.advantage == "gae"
    logps, logits, values = scored_forward(policy, mb["ids"], mb["attn"], mb["mask"], cfg.temperature,
                                           values=uses_critic and critic is None)
    pg_loss, clipfrac, approx_kl = ppo_policy_loss(logps, mb["old_logps"], mb["advantages"], mb["mask"],
                                                   cfg.clip_eps, n_tokens)
    entropy = masked_mean(unpack(token_entropy(logits, cfg.temperature), mb["mask"].bool()), mb["mask"], n_tokens)
    loss, vf_loss = pg_loss - cfg.entropy_coef * entropy, torch.zeros((), device=logps.device)
    if uses_critic:
        if critic is not None:
            values = token_values(critic, mb["ids"], mb["attn"])
        vf_loss, _ = ppo_value_loss(values, mb["old_values"], mb["returns"], mb["mask"], cfg.clip_eps_value, n_tokens)
        loss = loss + cfg.vf_coef * vf_loss
    return loss, torch.stack([pg_loss, vf_loss, clipfrac, approx_kl, entropy]).detach()


def ppo_update(roll: Rollout, policy, critic, reference, reward: tuple, optimizer, critic_opt, beta: float,
               gold_norm, cfg: Config, proc, update: int) -> tuple[dict, tuple | None]:
    """Steps 2-5 on one rollout: score it, price the KL, estimate advantages, and take the PPO epochs.
    reward = (rm, gain, bias); critic is None for the value head (or RLOO / GRPO). Sums, means and variances are
    over every rank's episodes (nanoalign/distributed.py). Returns the update's metrics (step 6) and the gold
    normalisation (fitted on the first rollout when --reward=gold)."""
    t0, ids, attn, mask = time.time(), roll.ids, roll.attn, roll.mask
    uses_critic = cfg.advantage == "gae"
    head = uses_critic and critic is None  # values from the policy's own scalar head, in the policy's forward
    all_ranks = all_sum(proc)  # x -> x summed over every rank's episodes (x in one process)

    # 2. score: normalised RM (or gold) at the last real token; no EOS -> the penalty replaces it
    gold = torch.tensor([gold_judge.judge(p, a)["gold"] for p, a in zip(roll.prompts, roll.answers)],
                        dtype=torch.float64, device=proc.device)
    rm, gain, bias = reward
    with torch.no_grad():
        rm_scores = reward_scores(rm, ids, attn, gain, bias)  # [B]
    if cfg.reward == "gold" and gold_norm is None:  # SFT-policy samples: mean 0, std 1, as the RM's normalisation
        gold_norm = reward_normalisation(gold, all_ranks)
    scores = gold_norm[0] * gold + gold_norm[1] if cfg.reward == "gold" else rm_scores
    scores = torch.where(roll.has_eos, scores, torch.full_like(scores, cfg.missing_eos_penalty))

    # 3. KL penalty: old and reference log-probs from the training forward, at the sampling temperature
    with torch.no_grad():
        old_logps, _, old_values = scored_forward(policy, ids, attn, mask, cfg.temperature, values=head)
        if critic is not None:
            old_values = token_values(critic, ids, attn)
        ref_logps, _, _ = scored_forward(reference, ids, attn, mask, cfg.temperature)
    kl = kl_estimate(old_logps, ref_logps, cfg.kl_estimator)  # [B, T-1]; 0 off the response, where both are 0
    rewards = per_token_rewards(scores, kl, mask, beta)
    if cfg.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False, all_sum=all_ranks)

    # 4. advantages: GAE with the critic, or RLOO / GRPO baselines from the other samples of the prompt
    episodes = {"ids": ids, "attn": attn, "mask": mask, "old_logps": old_logps}
    if uses_critic:
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        episodes.update(advantages=whiten(advantages, mask, all_sum=all_ranks), old_values=old_values, returns=returns)
    else:
        seq_returns = rewards.sum(-1).view(-1, cfg.samples_per_prompt)  # s - β Σ kl, per answer
        fn = rloo_advantages if cfg.advantage == "rloo" else grpo_advantages
        episodes["advantages"] = fn(seq_returns).view(-1, 1) * mask  # the same advantage on every token of an answer

    t_score = time.time()
    # 5. PPO epochs over shuffled minibatches, the learning rate annealed linearly to 0 (N detail 5)
    policy.train()
    lr_frac, stats = 1 - update / cfg.n_updates, []
    for epoch in range(cfg.ppo_epochs):
        for mb in deal_minibatches(len(ids), cfg.minibatches, cfg.seed + update * 97 + epoch, proc):
            batch = {key: v[mb] for key, v in episodes.items()}
            loss, parts = minibatch_loss(policy, critic, batch, global_total(batch["mask"], proc), cfg)
            global_backward(loss, proc)
            where = f"update {update + 1}, epoch {epoch + 1}"
            terms = {"pg_loss": parts[0].item(), "vf_loss": parts[1].item()}  # checked finite before each step
            # the loss may be negative or near 0: divergence is watched on the gradient norm (`Divergence`)
            optimizer_step(policy, optimizer, cfg.lr * lr_frac, cfg.grad_clip, where, terms, proc.scaler, "grad_norm")
            if critic is not None:
                optimizer_step(critic, critic_opt, cfg.critic_lr * lr_frac, cfg.grad_clip, f"{where} (critic)", terms,
                               proc.scaler, "grad_norm")
            stats.append(all_ranks(parts).tolist())  # this rank's shares of the minibatch's means, summed

    # 6. metrics: means over the whole rollout (every rank's episodes)
    seq_kl = {k: global_mean((kl_estimate(old_logps, ref_logps, k) * mask).sum(-1), proc) for k in ("k1", "k2", "k3")}
    metrics = {"objective/score": global_mean(scores, proc), "objective/rm_score": global_mean(rm_scores, proc),
               "objective/gold": global_mean(gold, proc),
               "objective/kl": seq_kl["k1"], "objective/kl_k2": seq_kl["k2"], "objective/kl_k3": seq_kl["k3"],
               "objective/beta": beta, **{f"ppo/{k}": sum(v) / len(v) for k, v in zip(STATS, zip(*stats))},
               "response/length": global_mean(mask.sum(-1), proc),
               "response/eos_rate": global_mean(roll.has_eos.float(), proc),
               "time/score": t_score - t0, "time/train": time.time() - t_score}
    if uses_critic:
        r_all, v_all = returns[mask.bool()], old_values[mask.bool()]
        var_r = global_var(r_all, proc) if global_total(mask, proc) > 1 else 0.0
        # None where the returns do not vary (e.g. answers of one token, all without EOS, at β = 0): nothing to explain
        metrics["ppo/explained_variance"] = 1 - global_var(r_all - v_all, proc) / var_r if var_r > 0 else None
    return metrics, gold_norm


def load_models(cfg: Config, proc) -> tuple:
    """Step 0: the policy, sharded, with a value head for --critic=head that starts at V ≡ 0 (N detail 11); the
    frozen reference and reward model (rm, gain, bias), forward-only and replicated on every rank; and a
    separate critic, sharded, initialised from the RM with its gain and bias folded into the head, so that V
    starts at the normalised score. On resume the policy and critic come from out_dir."""
    uses_critic = cfg.advantage == "gae"
    head = uses_critic and cfg.critic == "head"
    policy, tok = load_model(cfg.out_dir if cfg.resume else cfg.init_from, scalar_head=head)
    if head and not cfg.resume:
        policy.reset_scalar_head(std=0.0)
    policy = wrap_model(policy, proc, cfg.compile)
    reference = load_model(cfg.init_from, tok, scalar_head=False)[0].to(proc.device, proc.dtype)
    reference.eval().requires_grad_(False)
    rm, _, gain, bias = load_reward_model(cfg.reward_model, tok)
    rm.to(proc.device, proc.dtype).eval().requires_grad_(False)
    critic = None
    if uses_critic and cfg.critic == "separate" and cfg.resume:  # written beside the policy, in the same commit
        critic = load_model(f"{cfg.out_dir}/critic", tok, scalar_head=True, kinds=("critic",))[0]
        critic = wrap_model(critic, proc, cfg.compile)
    elif uses_critic and cfg.critic == "separate":
        critic = load_reward_model(cfg.reward_model, tok)[0]
        with torch.no_grad():
            critic.scalar_head.weight.mul_(gain)
            critic.scalar_head.bias.mul_(gain).add_(bias)
        critic = wrap_model(critic, proc, cfg.compile)
    return policy, tok, reference, (rm, gain, bias), critic


def check_rollout(cfg: Config, world: int) -> None:
    """The config, checked before anything is written: ranges, choices, and a rollout that splits into whole
    prompts per rank (a prompt's samples stay together) and each rank's share into the minibatches."""
    check_config(cfg, positive="samples_per_prompt n_updates rollout_size minibatches ppo_epochs lr critic_lr adam_eps "
                               "temperature max_new_tokens clip_eps clip_eps_value kl_horizon log_interval "
                               "ckpt_interval eval_max_new_tokens",
                 nonneg="grad_clip beta kl_target vf_coef entropy_coef n_eval eval_interval",
                 choices={"reward": ("rm", "gold"), "critic": ("head", "separate"),
                          "advantage": ("gae", "rloo", "grpo"), "kl_estimator": ("k1", "k2", "k3")})
    for name in ("gamma", "lam"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise SystemExit(f"--{name}={getattr(cfg, name)}: must be in [0, 1]")
    if cfg.eval_interval and not cfg.n_eval:
        raise SystemExit(f"--eval_interval={cfg.eval_interval} needs held-out prompts to answer: --n_eval > 0")
    if cfg.advantage != "gae" and cfg.samples_per_prompt < 2:
        raise SystemExit(f"--advantage={cfg.advantage} needs --samples_per_prompt >= 2 (its baseline is the other "
                         f"samples of the prompt)")
    unit = cfg.samples_per_prompt * world * cfg.minibatches  # a rollout is a whole number of these
    if cfg.rollout_size % (cfg.samples_per_prompt * world) or cfg.rollout_size // world % cfg.minibatches:
        raise SystemExit(f"--rollout_size={cfg.rollout_size} must split into whole prompts "
                         f"(--samples_per_prompt={cfg.samples_per_prompt}) on each of {world} processes and each "
                         f"process's share into --minibatches={cfg.minibatches}: use a multiple of {unit}, e.g. "
                         f"--rollout_size={max(1, cfg.rollout_size // unit) * unit}")


def check_reward_context(rm, cfg: Config, tok, records: list, block_size: int) -> None:
    """The reward model (and the separate critic, its copy) must read a whole rollout row: the longest prompt
    plus --max_new_tokens, within the policy's context; a shorter context is an error naming both, at start."""
    reach = min(block_size, max(len(tok.encode_prompt(r["prompt"])) for r in records) + cfg.max_new_tokens)
    if rm.config.block_size < reach:
        raise SystemExit(f"{cfg.reward_model}: the reward model's context ({rm.config.block_size} tokens) is shorter "
                         f"than a rollout row can be ({reach} tokens: the longest prompt of "
                         f"{cfg.data_dir}/prompts.jsonl + --max_new_tokens={cfg.max_new_tokens}, within the "
                         f"policy's {block_size}); lower --max_new_tokens or use a reward model with a longer context")


def main(cfg: Config) -> dict:
    # 0. the config; processes and models
    check_rollout(cfg, world_size())
    proc = setup(cfg.seed, cfg.device, cfg.dtype, cfg.allow_slow_dtype)
    claim_out_dir(cfg, proc)  # one run per out_dir
    run_inputs(cfg, proc, data=[f"{cfg.data_dir}/prompts.jsonl"])  # a resumed run must be this run
    policy, tok, reference, reward, critic = load_models(cfg, proc)
    optimizer = make_optimizer(policy, cfg.lr, 0.0, eps=cfg.adam_eps)
    critic_opt = make_optimizer(critic, cfg.critic_lr, 0.0, eps=cfg.adam_eps) if critic is not None else None
    records = read_jsonl(f"{cfg.data_dir}/prompts.jsonl", "prompts")
    check_prompts(tok, records, policy.config.block_size)  # every prompt, before any rollout draws it
    check_reward_context(reward[0], cfg, tok, records, policy.config.block_size)
    check_batch(len(records), cfg.rollout_size // cfg.samples_per_prompt,
                "--rollout_size / --samples_per_prompt, the prompts per update")
    check_eval_prompts(tok, cfg.data_dir, cfg.n_eval, policy.config.block_size)
    prompts = [r["prompt"] for r in records]
    beta, gold_norm, start = cfg.beta, None, 0
    if cfg.resume:  # optimizer moments, RNG, the update reached, and the adapted β and gold normalisation
        start = resume(cfg.out_dir, policy, optimizer)
        if critic is not None:
            resume(f"{cfg.out_dir}/critic", critic, critic_opt)
        state = read_meta(cfg.out_dir)["ppo"]
        beta, gold_norm = state["beta"], state["gold_norm"]
    logger = Logger(cfg.out_dir, proc, cfg.n_updates, resume_step=start)

    for update in range(start, cfg.n_updates):
        t0 = time.time()
        roll = rollout(policy, tok, prompts, cfg, proc, update)  # 1
        t_rollout = time.time()
        metrics, gold_norm = ppo_update(roll, policy, critic, reference, reward, optimizer, critic_opt, beta,
                                        gold_norm, cfg, proc, update)  # 2-6
        metrics["time/rollout"] = t_rollout - t0
        if cfg.kl_target > 0:  # adapt β toward the KL target (Ziegler et al. 2019)
            beta = adaptive_kl_beta(beta, metrics["objective/kl"], cfg.kl_target, cfg.rollout_size, cfg.kl_horizon)
        point, t_eval = curve_point_due(update + 1, cfg.eval_interval, cfg.n_updates, policy, reference, tok,
                                        cfg.data_dir, cfg.n_eval, cfg.eval_max_new_tokens, cfg.temperature, cfg.seed)
        metrics.update(point)
        t0 += t_eval  # the throughput counts training time only
        if (update + 1) % cfg.log_interval == 0 or point:
            logger.log(update + 1, metrics, global_total(roll.mask, proc) / (time.time() - t0))
        if (update + 1) % cfg.ckpt_interval == 0 and update + 1 < cfg.n_updates:
            save_resumable(cfg.out_dir, policy, optimizer, tok, proc, cfg, update + 1, metrics,
                           {"ppo": {"beta": beta, "gold_norm": gold_norm}},
                           {"critic": (critic, critic_opt)} if critic is not None else None)

    # 7. save the policy (a separate critic in out_dir/critic); evaluate it on held-out prompts against the SFT
    #    reference, write eval.json
    meta = {"model": asdict(policy.config), "kind": "policy", "run": asdict(cfg), "step": cfg.n_updates,
            "metrics": metrics}
    save_final(cfg.out_dir, policy, tok, proc, meta, {"critic": critic} if critic is not None else None)
    result = finish(policy, tok, proc, cfg.out_dir, cfg.data_dir, cfg.n_eval, cfg.eval_max_new_tokens,
                    cfg.temperature, cfg.seed, reference=reference)
    teardown()
    return result


if __name__ == "__main__":
    main(parse_config(Config))
