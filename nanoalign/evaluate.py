"""Evaluate a policy on held-out helpdesk prompts with the gold judge and write `eval.json`.

    python -m nanoalign.evaluate --checkpoint=out/sft            # writes out/sft/eval.json

eval.json is the contract every stage writes (ALGORITHMS.md §1.1):
    {"gold", "principles": {name: mean}, "failures": {"disparage", "canned", "leak"}, "n", "demo_gold"}
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoalign import helpdesk
from nanoalign.checkpoint import load_model
from nanoalign.data import read_jsonl
from nanoalign.sampling import sample
from nanoalign.scaffold import parse_config


@dataclass
class Config:
    checkpoint: str = "out/sft"  # policy to evaluate (nanoalign or local HF GPT-2 dir)
    data_dir: str = "data"  # holds sft_test.jsonl (held-out prompts and demonstrations)
    n: int = 200  # held-out prompts to answer
    max_new_tokens: int = 96  # response length limit
    temperature: float = 1.0  # sampling temperature (0 = greedy)
    batch_size: int = 64  # prompts per sampler call
    seed: int = 0  # sampling seed


def generate(model, tok, prompts: list, max_new_tokens: int, temperature: float = 1.0, batch_size: int = 64,
             seed: int = 0) -> list[str]:
    """Answer each prompt with the shared sampler; returns the decoded responses (special tokens dropped)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    answers = []
    for s in range(0, len(prompts), batch_size):
        ids = [tok.encode_prompt(p) for p in prompts[s:s + batch_size]]
        out = sample(model, ids, max_new_tokens, tok.eos_id, tok.pad_id, temperature=temperature, generator=g)
        for row, m in zip(out["response_ids"].tolist(), out["response_mask"].tolist()):
            answers.append(tok.decode([t for t, keep in zip(row, m) if keep]))
    model.train(was_training)
    return answers


def evaluate_policy(model, tok, data_dir, n: int = 200, max_new_tokens: int = 96, temperature: float = 1.0,
                    batch_size: int = 64, seed: int = 0) -> tuple[dict, list, list]:
    """Gold-judge the policy's answers to the first n held-out prompts -> (eval dict, prompts, answers)."""
    demos = read_jsonl(Path(data_dir) / "sft_test.jsonl", "sft")[:n]
    prompts = [d["prompt"] for d in demos]
    answers = generate(model, tok, prompts, max_new_tokens, temperature, batch_size, seed)
    metrics = helpdesk.judge_many(prompts, answers)
    metrics["demo_gold"] = helpdesk.judge_many(prompts, [d["completion"] for d in demos])["gold"]
    return metrics, prompts, answers


def write_json(path, obj) -> None:
    """Write JSON atomically: a temp file beside it, then rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def main(cfg: Config) -> dict:
    model, tok = load_model(cfg.checkpoint)
    metrics, prompts, answers = evaluate_policy(model, tok, cfg.data_dir, cfg.n, cfg.max_new_tokens,
                                                cfg.temperature, cfg.batch_size, cfg.seed)
    for p, a in list(zip(prompts, answers))[:3]:
        print(f"> {p}\n{a}\n")
    write_json(Path(cfg.checkpoint) / "eval.json", metrics)
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main(parse_config(Config))
