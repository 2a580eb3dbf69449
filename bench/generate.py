"""Sampling throughput: the shared sampler (KV cache; eager, and with a static cache + compiled decode step)
against a loop without a cache and against Hugging Face `generate` on the same weights (exported with save_hf).

    python bench/generate.py        # prints one summary line, writes bench/generate.json

Same model as bench/dpo_throughput.py (GPT-2 architecture, 4 layers, d 256, 4 heads, vocabulary 4096); batch 32,
prompts of 64 random tokens, 64 new tokens (no early stop), temperature 1, no top-k / top-p; fp32 on the CPU.
Also the compute floor: the rollout's matmul FLOPs at the machine's sustained fp32 matmul rate.
"""

import tempfile
from dataclasses import dataclass

import torch

from common import machine, matmul_gflops, rollout_flops, timed, write_json
from nanoalign.config import check_config, parse_config
from nanoalign.model import GPT, GPTConfig
from nanoalign.sampling import sample
from nanoalign.scaffold import setup


@dataclass
class Config:
    batch: int = 32
    prompt: int = 64
    new_tokens: int = 64
    repeats: int = 3  # timed runs per method, after one warm-up run (the compile happens there)
    device: str = "cpu"  # cpu | cuda
    out: str = "bench/generate.json"


@torch.no_grad()
def no_cache_loop(model, prompts: torch.Tensor, new_tokens: int, g) -> torch.Tensor:
    """The textbook loop: a full forward over the whole sequence for every new token."""
    ids = prompts
    for _ in range(new_tokens):
        probs = model(ids)[:, -1].softmax(-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    return ids


def tokens_per_s(fn, n_tokens: int, repeats: int, device) -> float:
    return n_tokens / timed(fn, 1, repeats, device)


def main(cfg: Config) -> dict:
    check_config(cfg, positive="batch prompt new_tokens repeats", choices={"device": ("cpu", "cuda")})
    setup(0, cfg.device)  # seeds; on the CPU keeps freed memory in the process, as the scripts do
    model = GPT(GPTConfig(block_size=256, vocab_size=4096, n_layer=4, n_head=4, n_embd=256)).eval().to(cfg.device)
    prompts = torch.randint(0, 4096, (cfg.batch, cfg.prompt)).to(cfg.device)
    g = torch.Generator(cfg.device).manual_seed(0)
    n = cfg.batch * cfg.new_tokens
    run = lambda compiled: sample(model, prompts.tolist(), cfg.new_tokens, eos_id=-1, pad_id=0, generator=g,
                                  compile=compiled)
    result = {"machine": machine(), **vars(cfg),
              "sampler_tokens_per_s": tokens_per_s(lambda: run(False), n, cfg.repeats, cfg.device),
              "sampler_compiled_tokens_per_s": tokens_per_s(lambda: run(True), n, cfg.repeats, cfg.device),
              "no_cache_tokens_per_s": tokens_per_s(lambda: no_cache_loop(model, prompts, cfg.new_tokens, g), n,
                                                    max(1, cfg.repeats // 2), cfg.device)}
    try:
        from transformers import GPT2LMHeadModel
        with tempfile.TemporaryDirectory() as d:
            model.save_hf(d)
            hf = GPT2LMHeadModel.from_pretrained(d).eval().to(cfg.device)
        kw = dict(attention_mask=torch.ones_like(prompts), do_sample=True, max_new_tokens=cfg.new_tokens,
                  min_new_tokens=cfg.new_tokens, top_k=0, top_p=1.0, pad_token_id=0)
        with torch.no_grad():
            result["hf_generate_tokens_per_s"] = tokens_per_s(lambda: hf.generate(prompts, **kw), n, cfg.repeats,
                                                              cfg.device)
    except ImportError:
        result["hf_generate_tokens_per_s"] = None
    # the floor: a rollout's matmul FLOPs at the sustained fp32 matmul rate; no sampler can beat it
    flops = rollout_flops(model.config, cfg.batch, cfg.prompt, cfg.new_tokens)
    result["compute_floor_tokens_per_s"] = n / (flops / (matmul_gflops(cfg.device)[0] * 1e9))
    best = max(result["sampler_tokens_per_s"], result["sampler_compiled_tokens_per_s"])
    result["vs_no_cache"] = best / result["no_cache_tokens_per_s"]
    result["vs_hf_generate"] = best / result["hf_generate_tokens_per_s"] if result["hf_generate_tokens_per_s"] else None
    write_json(cfg.out, result)
    hf = result["hf_generate_tokens_per_s"]
    print(f"generate: sampler {result['sampler_tokens_per_s']:.0f} tok/s eager, "
          f"{result['sampler_compiled_tokens_per_s']:.0f} compiled | no cache {result['no_cache_tokens_per_s']:.0f} "
          f"({result['vs_no_cache']:.1f}x) | HF generate " + (f"{hf:.0f} ({result['vs_hf_generate']:.1f}x)" if hf else "n/a")
          + f" | compute floor {result['compute_floor_tokens_per_s']:.0f}"
          + (f" ({result['compute_floor_tokens_per_s'] / hf:.1f}x HF)" if hf else ""))
    return result


if __name__ == "__main__":
    main(parse_config(Config))
