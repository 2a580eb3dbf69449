"""Shared fixtures: a tiny hermetic dataset and starting checkpoint (no downloads, files in tmp dirs)."""

import json
import random
from dataclasses import asdict

import pytest
import torch

from nanoalign.checkpoint import write_checkpoint
from nanoalign.model import GPT, GPTConfig
from nanoalign.tokenizer import Tokenizer


def tiny_sft_records(n, seed):
    rng = random.Random(seed)
    items = ["kettle", "lamp", "blender", "fan"]
    out = []
    for _ in range(n):
        order, item = rng.randint(1000, 9999), rng.choice(items)
        out.append({"prompt": f"Where is my {item}, order #{order}?",
                    "completion": f"Your {item} (order #{order}) ships tomorrow. Anything else?"})
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """data/ with sft.jsonl + sft_test.jsonl, and init/ a random tiny GPT with its tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "data").mkdir()
    for name, n, seed in (("sft.jsonl", 64, 0), ("sft_test.jsonl", 8, 1)):
        (root / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in tiny_sft_records(n, seed)))
    tok = Tokenizer.train([r["prompt"] + r["completion"] for r in tiny_sft_records(64, 0)], vocab_size=300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=len(tok), n_layer=2, n_head=2, n_embd=32))
    write_checkpoint(root / "init", model.state_dict(), {"model": asdict(model.config), "step": 0}, tok)
    return root
