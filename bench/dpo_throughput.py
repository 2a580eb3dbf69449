"""The fixed DPO workload on the CPU, against the machine's own matmul throughput in the same dtype.

    python bench/dpo_throughput.py              # both modes, each in its own process (its own peak RSS)
    python bench/dpo_throughput.py --mode=live  # one mode
    python bench/dpo_throughput.py --dtype=bf16 # the same workload in bf16 -> bench/dpo_throughput_bf16.json
    python bench/dpo_throughput.py --mode=cached --fused_head=True  # the policy's fused LM head (--fused_head)
    python bench/dpo_throughput.py --mode=cached --vocab=50304      # GPT-2's vocabulary, with or without it
    python bench/dpo_throughput.py --mode=cached --activation_checkpointing=True  # blocks recomputed in backward

GPT-2 architecture, 4 layers, d_model 256, 4 heads, vocabulary 4096 (or --vocab), context 256; prompt 64, chosen 64,
rejected 64 tokens (random ids); 8 pairs per optimizer step; fp32, or with --dtype=bf16 weights, gradients, AdamW
moments and matmuls in bf16 (the scripts' --dtype=bf16, nanoalign.precision); β 0.1; AdamW lr 1e-5; 5 warm-up steps,
20 timed. The step is train_dpo.py's (bench/common.py: one concatenated forward, sigmoid loss, clip, AdamW). `live`
runs the frozen reference forward each step; `cached` reads reference log-probs computed beforehand, the reference
then deleted, as train_dpo.py's disk cache does. FLOPs: 3× forward for the policy + 1× for a live reference over the
2·(64 + 64) tokens of each pair, the LM head at the 2·64 scored positions only, as it runs (bench/common.py). Ratio
= achieved ÷ the 2048³ matmul's sustained GFLOP/s in the run's dtype, measured just before and just after the timed
steps and averaged (bench/common.py); the ratio to its fastest single call is printed too. What the fused head and
activation checkpointing recompute is not counted: their ratios fall by the work they add.
"""

import json
import subprocess
import sys
from dataclasses import dataclass

import torch

from common import (dpo_step, forward_flops, machine, matmul_gflops, peak_rss_mb, random_pairs, reset_peak_rss,
                    timed, write_json)
from nanoalign.config import check_config, parse_config
from nanoalign.model import GPT, GPTConfig
from nanoalign.precision import run_dtype
from nanoalign.sampling import model_logps
from nanoalign.scaffold import make_optimizer, setup, wrap_model


@dataclass
class Config:
    mode: str = "both"  # live | cached | both (each in a subprocess)
    compile: bool = True  # torch.compile each block (the scripts' --compile)
    fused_head: bool = False  # the policy's LM head and log-probs fused, logits recomputed in backward
    activation_checkpointing: bool = False  # the policy's blocks recomputed in backward (the scripts' flag)
    vocab: int = 4096  # the workload's; GPT-2's 50304 shows what the fused head saves
    pairs: int = 8
    prompt: int = 64
    response: int = 64
    warmup: int = 5
    steps: int = 20
    dtype: str = "fp32"  # fp32 | bf16
    allow_slow_dtype: bool = False  # run --dtype=bf16 on a CPU that only emulates it (tens of times slower)
    out: str = ""  # "" = bench/dpo_throughput.json, or with _bf16, _fused, _v<vocab> for the variants


def run_mode(cfg: Config) -> dict:
    mc = GPTConfig(block_size=256, vocab_size=cfg.vocab, n_layer=4, n_head=4, n_embd=256)
    # seeds; keeps freed memory in the process (scaffold.keep_cpu_heap), as the scripts do; wrap_model casts to bf16
    proc = setup(0, "cpu", cfg.dtype, cfg.allow_slow_dtype)
    policy = wrap_model(GPT(mc), proc, cfg.compile, cfg.activation_checkpointing, cfg.fused_head)
    reference = wrap_model(GPT(mc), proc, cfg.compile).eval().requires_grad_(False)
    optimizer = make_optimizer(policy, 1e-5, 0.0)
    g = torch.Generator().manual_seed(0)
    batches = [random_pairs(cfg.pairs, cfg.prompt, cfg.response, mc.vocab_size, "cpu", g)
               for _ in range(cfg.warmup + cfg.steps)]
    cached = None
    if cfg.mode == "cached":
        with torch.no_grad():
            cached = [model_logps(reference, **b).sum(-1) for b in batches]
        reference = None
    before = matmul_gflops(dtype=proc.dtype)
    reset_peak_rss()  # the peak of the training loop only, not of building the cache
    work = iter(zip(batches, cached or [None] * len(batches)))

    def step():
        batch, ref = next(work)
        dpo_step(policy, optimizer, batch, 0.1, 1e-5, reference=reference, ref_logps=ref)

    dt = timed(step, cfg.warmup, cfg.steps, "cpu")
    rss = peak_rss_mb()  # before the matmuls' own buffers
    after = matmul_gflops(dtype=proc.dtype)
    sustained, best = (before[0] + after[0]) / 2, max(before[1], after[1])  # either side of the loop: drift cancels
    T, rows = cfg.prompt + cfg.response, 2 * cfg.pairs
    passes = 3 + (1 if cfg.mode == "live" else 0)  # policy forward + backward, reference forward
    gflops = passes * forward_flops(mc, T, rows * T, rows * cfg.response) / dt / 1e9
    return {"mode": cfg.mode, "dtype": cfg.dtype, "compile": cfg.compile, "fused_head": cfg.fused_head,
            "activation_checkpointing": cfg.activation_checkpointing, "vocab": cfg.vocab, "pairs_per_s": cfg.pairs / dt,
            "step_s": dt, "achieved_gflops": gflops, "matmul_gflops": sustained, "ratio": gflops / sustained,
            "matmul_best_gflops": best, "ratio_to_best": gflops / best,
            "peak_rss_mb": rss, "machine": machine()}


def main(cfg: Config) -> None:
    check_config(cfg, positive="pairs prompt response steps vocab", nonneg="warmup",
                 choices={"mode": ("live", "cached", "both")})
    run_dtype(cfg.dtype, torch.device("cpu"), allow_slow=cfg.allow_slow_dtype)  # refused here, not in each child
    if cfg.mode != "both":
        result = run_mode(cfg)
        print(json.dumps(result))
        return
    results = {}
    for mode in ("live", "cached"):
        args = [f"--{k}={v}" for k, v in vars(cfg).items() if k not in ("mode", "out")]
        proc = subprocess.run([sys.executable, __file__, f"--mode={mode}", *args], capture_output=True, text=True,
                              check=True)
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    variant = ("" if cfg.dtype == "fp32" else f"_{cfg.dtype}") + ("_fused" if cfg.fused_head else "") + \
        ("_ckpt" if cfg.activation_checkpointing else "") + ("" if cfg.vocab == 4096 else f"_v{cfg.vocab}")
    write_json(cfg.out or f"bench/dpo_throughput{variant}.json", results)
    live, cached = results["live"], results["cached"]
    print(f"dpo_throughput ({cfg.dtype}): live {live['pairs_per_s']:.2f} pairs/s, {live['achieved_gflops']:.1f} "
          f"GFLOP/s = {live['ratio']:.2f} of matmul {live['matmul_gflops']:.1f} ({live['ratio_to_best']:.2f} of its best "
          f"{live['matmul_best_gflops']:.1f}), peak RSS {live['peak_rss_mb']:.0f} MB | "
          f"cached {cached['pairs_per_s']:.2f} pairs/s ({cached['pairs_per_s'] / live['pairs_per_s']:.2f}x), "
          f"{cached['achieved_gflops']:.1f} GFLOP/s = {cached['ratio']:.2f}, peak RSS {cached['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main(parse_config(Config))
