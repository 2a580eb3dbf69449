"""GPU throughput: GPT-2-124M training MFU, a DPO step, and rollout generation (eager vs static KV cache with a
compiled decode step, CUDA graphs). Skips cleanly without CUDA; `--small=True` runs a tiny smoke test on CPU.

    python bench/gpu_mfu.py                       # on a GPU; prints one line per section, writes bench/gpu_mfu.json

MFU = achieved matmul FLOP/s ÷ the GPU's dense bf16 peak; FLOPs per token as in bench/common.py (3× forward
for training, full T×T attention counted). bf16 autocast with fp32 master weights, TF32 for fp32 matmuls;
`train_fused` recomputes its head's logits in backward under the same autocast (the recomputation not counted).
"""

import sys
from dataclasses import dataclass

import torch

from common import dpo_step, forward_flops, machine, matmul_gflops, random_pairs, timed, write_json
from nanoalign.config import check_config, parse_config
from nanoalign.logprobs import token_logps
from nanoalign.losses import sft_loss
from nanoalign.model import GPT, GPTConfig
from nanoalign.sampling import sample
from nanoalign.scaffold import make_optimizer, optimizer_step, setup, wrap_model

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0}  # dense, SXM data sheets


@dataclass
class Config:
    sections: str = "train,train_whole,train_fused,dpo,generate"
    batch_size: int = 16  # training rows of 1024 tokens
    fused_batch_size: int = 32  # rows for train_fused, whose head keeps no [B·T, V] logits
    dpo_pairs: int = 8  # pairs per DPO step, prompt 512 + response 512 each
    gen_batch: int = 64  # rollout rows
    gen_prompt: int = 128
    gen_new: int = 256
    warmup: int = 5
    steps: int = 20
    peak_tflops: float = 0.0  # 0: from the device name
    small: bool = False  # tiny model on the CPU: a smoke test of this script
    out: str = "bench/gpu_mfu.json"


def main(cfg: Config) -> dict:
    check_config(cfg, positive="batch_size fused_batch_size dpo_pairs gen_batch gen_prompt gen_new steps",
                 nonneg="warmup peak_tflops")
    unknown = set(cfg.sections.split(",")) - {"train", "train_whole", "train_fused", "dpo", "generate"}
    if unknown:
        raise SystemExit(f"--sections={cfg.sections}: unknown {', '.join(sorted(unknown))}; expected a "
                         f"comma-separated subset of train, train_whole, train_fused, dpo, generate")
    if not torch.cuda.is_available() and not cfg.small:
        print("gpu_mfu: no CUDA device, skipped")
        return {}
    device = "cpu" if cfg.small else "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if cfg.small:
        mc = GPTConfig(block_size=128, vocab_size=512, n_layer=2, n_head=2, n_embd=64)
        cfg.batch_size, cfg.fused_batch_size, cfg.dpo_pairs = 2, 4, 2
        cfg.gen_batch, cfg.gen_prompt, cfg.gen_new = 4, 16, 8
        cfg.warmup, cfg.steps = 1, 2
    else:  # GPT-2 124M, vocabulary padded from 50257 to a multiple of 64 (nanoGPT)
        mc = GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768)
    peak = cfg.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in machine()), 0.0)
    proc = setup(0, device)
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=not cfg.small)
    g = torch.Generator().manual_seed(0)
    result = {"machine": machine(), "peak_bf16_tflops": peak, "model": vars(mc), "torch": torch.__version__,
              "measured_bf16_matmul_tflops": matmul_gflops(device, torch.bfloat16, 256 if cfg.small else 8192)[1] / 1e3}
    print(f"{result['machine']}: data-sheet bf16 peak {peak} TFLOP/s, measured 8192³ bf16 matmul "
          f"{result['measured_bf16_matmul_tflops']:.0f} TFLOP/s", flush=True)

    def report(name, **figures):
        result[name] = figures
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in figures.items()), flush=True)
        write_json(cfg.out, result)

    torch.manual_seed(0)
    model = wrap_model(GPT(mc), proc, compile=True)
    optimizer = make_optimizer(model, 6e-4, 0.1)
    sections = cfg.sections.split(",")
    T = mc.block_size

    if "train" in sections:  # next-token loss on every token, as SFT with a full mask
        ids = torch.randint(0, mc.vocab_size, (cfg.batch_size, T), generator=g).to(device)

        def train_step():
            with amp:
                logits = model(ids)
            sft_loss(token_logps(logits[:, :-1], ids[:, 1:]), torch.ones_like(ids[:, 1:])).backward()
            optimizer_step(model, optimizer, 6e-4, 1.0)

        dt = timed(train_step, cfg.warmup, cfg.steps, device)
        tokens = cfg.batch_size * T / dt
        achieved = 3 * forward_flops(mc, T, 1) * tokens / 1e12
        report("train", tokens_per_s=tokens, tflops=achieved, mfu=achieved / peak if peak else 0.0,
               step_ms=dt * 1e3, peak_mem_gb=torch.cuda.max_memory_allocated() / 2 ** 30 if not cfg.small else 0.0)

    if "train_whole" in sections:  # the same step with forward + loss compiled as one graph
        whole = GPT(mc).to(device)
        whole_opt = make_optimizer(whole, 6e-4, 0.1)
        ids = torch.randint(0, mc.vocab_size, (cfg.batch_size, T), generator=g).to(device)

        @torch.compile
        def loss_fn(ids):
            with amp:
                logits = whole(ids)
            return sft_loss(token_logps(logits[:, :-1], ids[:, 1:]), torch.ones_like(ids[:, 1:]))

        def whole_step():
            loss_fn(ids).backward()
            optimizer_step(whole, whole_opt, 6e-4, 1.0)

        dt = timed(whole_step, cfg.warmup, cfg.steps, device)
        tokens = cfg.batch_size * T / dt
        achieved = 3 * forward_flops(mc, T, 1) * tokens / 1e12
        report("train_whole", tokens_per_s=tokens, tflops=achieved, mfu=achieved / peak if peak else 0.0,
               step_ms=dt * 1e3)
        del whole, whole_opt

    if "train_fused" in sections:  # whole graph again, the LM head and log-probs fused (`--fused_head`)
        fused = GPT(mc).to(device)
        fused.fused_head = True
        fused_opt = make_optimizer(fused, 6e-4, 0.1)
        ids = torch.randint(0, mc.vocab_size, (cfg.fused_batch_size, T), generator=g).to(device)
        torch.cuda.reset_peak_memory_stats() if not cfg.small else None  # the peak includes `model` and its AdamW

        @torch.compile
        def fused_loss(ids):
            with amp:
                logps = fused(ids[:, :-1], output="logps", labels=ids[:, 1:].reshape(-1))
            return -logps.mean()

        def fused_step():
            fused_loss(ids).backward()
            optimizer_step(fused, fused_opt, 6e-4, 1.0)

        dt = timed(fused_step, cfg.warmup, cfg.steps, device)
        tokens = cfg.fused_batch_size * (T - 1) / dt
        achieved = 3 * forward_flops(mc, T - 1, 1) * tokens / 1e12  # the recomputed head in backward not counted
        report("train_fused", tokens_per_s=tokens, tflops=achieved, mfu=achieved / peak if peak else 0.0,
               step_ms=dt * 1e3, peak_mem_gb=torch.cuda.max_memory_allocated() / 2 ** 30 if not cfg.small else 0.0)
        del fused, fused_opt

    if "dpo" in sections:  # live reference; pairs of 512 + 512 tokens, no padding
        reference = wrap_model(GPT(mc), proc, compile=True).eval().requires_grad_(False)
        half = T // 2
        batch = random_pairs(cfg.dpo_pairs, half, half, mc.vocab_size, device, g)

        def step():
            with amp:
                dpo_step(model, optimizer, batch, 0.1, 1e-5, reference=reference)

        dt = timed(step, cfg.warmup, cfg.steps, device)
        achieved = 4 * forward_flops(mc, T, 2 * cfg.dpo_pairs * T, 2 * cfg.dpo_pairs * half) / dt / 1e12
        report("dpo", pairs_per_s=cfg.dpo_pairs / dt, tflops=achieved, mfu=achieved / peak if peak else 0.0)
        del reference

    if "generate" in sections:  # rollouts: never stopping early (eos_id -1), temperature 1
        model.eval()
        prompts = torch.randint(0, mc.vocab_size, (cfg.gen_batch, cfg.gen_prompt), generator=g).tolist()
        figures = {}
        for name, compiled in (("eager", False), ("static_compiled", True)):
            def gen():
                with amp:
                    sample(model, prompts, cfg.gen_new, eos_id=-1, pad_id=0, compile=compiled)
            try:
                dt = timed(gen, 2, 3 if not cfg.small else 1, device)
                figures[f"{name}_tokens_per_s"] = cfg.gen_batch * cfg.gen_new / dt
            except Exception as e:  # a failed mode is reported, the other still measured
                figures[f"{name}_error"] = repr(e)[:300]
        if "eager_tokens_per_s" in figures and "static_compiled_tokens_per_s" in figures:
            figures["speedup"] = figures["static_compiled_tokens_per_s"] / figures["eager_tokens_per_s"]
        report("generate", **figures)
    return result


if __name__ == "__main__":
    main(parse_config(Config, sys.argv[1:]))
