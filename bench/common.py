"""What the benchmarks share: the matmul FLOP count (Kaplan et al. 2020 §2.1), the machine's matmul peak, one DPO
step exactly as train_dpo.py takes it, and a JSON writer. Run the benchmarks from the repository root."""

import ctypes
import ctypes.util
import gc
import json
import platform
import resource
import time

import torch

from nanoalign.losses import Answers, LossParams, dpo_loss
from nanoalign.model import GPTConfig
from nanoalign.sampling import model_logps
from nanoalign.scaffold import optimizer_step


def forward_flops(c: GPTConfig, T: int, tokens: int, scored: int | None = None) -> float:
    """Matmul FLOPs of one forward over `tokens` tokens in rows of length T: per token n_layer·(24·d² + 4·T·d)
    — QKV, projection, 4d MLP, QKᵀ and AV counted at full T×T (a causal kernel does about half) — plus
    2·d·V for the tied LM head at each of the `scored` positions (default every token; `model_logps` runs
    the head only where a response token is scored)."""
    scored = tokens if scored is None else scored
    return tokens * c.n_layer * (24 * c.n_embd ** 2 + 4 * T * c.n_embd) + scored * 2 * c.n_embd * c.vocab_size


def rollout_flops(c: GPTConfig, batch: int, prompt: int, new_tokens: int) -> float:
    """Matmul FLOPs of sampling `new_tokens` per row with a KV cache, no early stop: the prefill of the prompts
    with the LM head at the last prompt token, then one token per row per step, each attending to the
    prompt + s tokens before it, for the new_tokens - 1 tokens after the first."""
    steps = sum(forward_flops(c, prompt + s, batch, batch) for s in range(1, new_tokens))
    return forward_flops(c, prompt, batch * prompt, batch) + steps


def matmul_gflops(device="cpu", dtype=torch.float32, n=2048, repeats=10) -> tuple[float, float]:
    """GFLOP/s of n×n matmuls measured here and now, the denominator of every ratio: (sustained, best) — the
    sustained rate is timed like the workloads (the mean of `repeats` calls after a warm-up), the best is the
    fastest single call."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = [timed(lambda: a @ b, 1 if i == 0 else 0, 1, device) for i in range(repeats)]
    return 2 * n ** 3 / (sum(times) / repeats) / 1e9, 2 * n ** 3 / min(times) / 1e9


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, warmup: int, steps: int, device) -> float:
    """Seconds per call of fn, after `warmup` untimed calls (compilation happens there)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def random_pairs(n_pairs: int, prompt: int, response: int, vocab: int, device, generator) -> dict:
    """A DPO micro-batch of random ids, chosen rows then rejected rows, no padding: input_ids,
    attention_mask, loss_mask [2P, prompt + response]."""
    ids = torch.randint(0, vocab, (2 * n_pairs, prompt + response), generator=generator).to(device)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, prompt:] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}


def dpo_step(model, optimizer, batch: dict, beta: float, lr: float, reference=None, ref_logps=None) -> float:
    """One optimizer step of train_dpo.py's inner loop: chosen and rejected in one forward (as train_dpo.py does up
    to --rows_per_forward = 16 rows: the benchmarks' 8 pairs), the reference live (`reference`) or cached
    (`ref_logps` [2P]), sigmoid DPO loss, backward, clip, AdamW."""
    policy_chosen, policy_rejected = model_logps(model, **batch).sum(-1).chunk(2)
    if ref_logps is None:
        with torch.no_grad():
            ref_logps = model_logps(reference, **batch).sum(-1)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    losses, _ = dpo_loss(Answers.pairs(policy_chosen, policy_rejected, ref_chosen, ref_rejected), LossParams(beta))
    losses.mean().backward()
    optimizer_step(model, optimizer, lr, 1.0)
    return losses.mean().item()


def reset_peak_rss() -> None:
    """Start a fresh peak-RSS window: collect garbage, hand freed heap memory back (what setup allocated and
    dropped must not count), then reset the kernel's high-water mark (Linux: /proc/self/clear_refs)."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, AttributeError, TypeError):
        pass  # not glibc / not Linux: the peak then covers the whole process


def peak_rss_mb() -> float:
    """The peak resident set since the last reset_peak_rss (VmHWM), else since the process started."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def machine() -> str:
    """The device every figure was measured on; for a CPU its vector capability as torch dispatches it (AVX2,
    AVX512, ...: what sets fp32 kernel speed, and whether bf16 is native: nanoalign.precision)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return (f"{platform.processor() or platform.machine()}, capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")


def write_json(path, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
