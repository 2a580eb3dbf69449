"""A fixed PPO workload on the CPU, against the machine's own fp32 matmul throughput.

    python bench/ppo_throughput.py

The DPO benchmark's model (GPT-2 architecture, 4 layers, d_model 256, 4 heads, vocabulary 4096, random weights),
prompts of 64 random tokens, exactly 64 new tokens per answer (EOS is an id the model cannot sample, so no answer
stops early) at temperature 0.7, 32 episodes per update, 4 PPO epochs of 1 minibatch, a separate critic and a
reward model with 4-layer trunks of their own; fp32. Each update is train_ppo.py's own `rollout` and
`ppo_update` (so every answer, lacking EOS, takes the missing-EOS penalty: the work is the same). 1 warm-up
update, then `updates` timed.

FLOPs, matmuls only (bench/common.py): the rollout's prefill and KV-cached decode; scoring: one forward each of
the policy and reference (LM head at the 64 answer positions), reward model and critic (no LM head) over the
128 tokens; training: per epoch 3× a forward of the policy and of the critic. The compute floor is those FLOPs at
the sustained 2048³ matmul rate measured in the same process (before and after, averaged); the ratio is that
floor over the measured time, for the whole update and for each phase.
"""

import time
from dataclasses import dataclass, replace
import sys
from pathlib import Path

import torch

from common import forward_flops, machine, matmul_gflops, peak_rss_mb, reset_peak_rss, rollout_flops, write_json
from nanoalign.config import check_config, parse_config
from nanoalign.model import GPT, GPTConfig
from nanoalign.scaffold import make_optimizer, setup

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train_ppo.py, whose update code is timed
import train_ppo  # noqa: E402


@dataclass
class Config:
    episodes: int = 32  # per update
    prompt: int = 64  # prompt tokens
    new_tokens: int = 64  # answer tokens, exactly
    updates: int = 3  # timed updates, after one warm-up
    vocab_size: int = 4096  # the model: the DPO benchmark's
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    out: str = "bench/ppo_throughput.json"


class RandomPrompts:
    """The tokenizer's part the rollout uses: prompt "i" is a fixed row of random ids; EOS is outside the
    vocabulary, so the sampler never stops early; answers decode to their ids."""

    def __init__(self, n: int, length: int, vocab: int):
        self.rows = torch.randint(1, vocab, (n, length), generator=torch.Generator().manual_seed(0)).tolist()
        self.eos_id, self.pad_id = vocab, 0

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.rows[int(prompt)]

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def update_flops(c: GPTConfig, cfg: Config) -> dict:
    B, P, N = cfg.episodes, cfg.prompt, cfg.new_tokens
    T, tokens, scored = P + N, B * (P + N), B * N
    policy = forward_flops(c, T, tokens, scored)  # LM head at the answer positions only
    trunk = forward_flops(c, T, tokens, 0)  # reward model and critic: no LM head
    return {"rollout": rollout_flops(c, B, P, N), "score": 2 * policy + 2 * trunk,
            "train": 4 * 3 * (policy + trunk)}


def workload(cfg: Config):
    """The models, optimizers and prompts -> (model config, one_update(update) -> seconds of each phase)."""
    c = GPTConfig(block_size=cfg.prompt + cfg.new_tokens, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                  n_head=cfg.n_head, n_embd=cfg.n_embd)
    proc = setup(0, "cpu")
    run = replace(train_ppo.Config(), rollout_size=cfg.episodes, minibatches=1, ppo_epochs=4, temperature=0.7,
                  max_new_tokens=cfg.new_tokens, critic="separate", n_updates=cfg.updates + 1, device="cpu")
    policy, reference = GPT(c), GPT(c).eval().requires_grad_(False)
    rm = GPT(replace(c, scalar_head=True)).eval().requires_grad_(False)
    critic = GPT(replace(c, scalar_head=True))
    optimizer = make_optimizer(policy, run.lr, 0.0, eps=run.adam_eps)
    critic_opt = make_optimizer(critic, run.critic_lr, 0.0, eps=run.adam_eps)
    tok = RandomPrompts(cfg.episodes * (cfg.updates + 1), cfg.prompt, c.vocab_size)
    prompts = [str(i) for i in range(len(tok.rows))]

    def one_update(update: int) -> dict:
        t0 = time.perf_counter()
        roll = train_ppo.rollout(policy, tok, prompts, run, proc, update)
        t1 = time.perf_counter()
        metrics, _ = train_ppo.ppo_update(roll, policy, critic, reference, (rm, 1.0, 0.0), optimizer, critic_opt,
                                          run.beta, None, run, proc, update)
        if roll.mask.sum().item() != cfg.episodes * cfg.new_tokens:
            raise RuntimeError("an answer stopped early: the workload is exactly new_tokens per episode")
        return {"rollout": t1 - t0, "score": metrics["time/score"], "train": metrics["time/train"]}

    return c, one_update


def main(cfg: Config) -> dict:
    check_config(cfg, positive="episodes prompt new_tokens updates vocab_size n_layer n_head n_embd")
    c, one_update = workload(cfg)
    one_update(0)  # warm-up
    before = matmul_gflops()
    reset_peak_rss()
    times = [one_update(u) for u in range(1, cfg.updates + 1)]
    rss = peak_rss_mb()
    sustained = (before[0] + matmul_gflops()[0]) / 2
    seconds = {k: sum(t[k] for t in times) / len(times) for k in ("rollout", "score", "train")}
    flops = update_flops(c, cfg)
    total_s, total_flops = sum(seconds.values()), sum(flops.values())
    ratio = {k: flops[k] / seconds[k] / 1e9 / sustained for k in seconds}
    result = {"machine": machine(), "workload": {**vars(cfg), "model": vars(c)}, "seconds": seconds,
              "episodes_per_s": cfg.episodes / total_s, "gflops": {k: flops[k] / 1e9 for k in flops},
              "matmul_gflops_sustained": sustained, "ratio_to_matmul": ratio,
              "ratio_to_matmul_total": total_flops / total_s / 1e9 / sustained, "peak_rss_mb": rss}
    write_json(cfg.out, result)
    print(f"ppo_throughput: {result['episodes_per_s']:.1f} episodes/s | update {total_s:.2f}s = "
          + ", ".join(f"{k} {seconds[k]:.2f}s ({ratio[k]:.2f} of matmul)" for k in seconds)
          + f" | whole update {result['ratio_to_matmul_total']:.2f} of the {sustained:.0f} GFLOP/s matmul rate"
          + f" | peak RSS {rss:.0f} MB")
    return result


if __name__ == "__main__":
    main(parse_config(Config))
