"""Shared fixtures: a tiny hermetic dataset and starting checkpoint (no downloads, files in tmp dirs)."""

import json
import os
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from nanoalign.checkpoint import write_checkpoint
from nanoalign.data import read_jsonl
from nanoalign.model import GPT, GPTConfig
from nanoalign.tokenizer import Tokenizer
from nanoalign.world.files import write_world


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


@pytest.fixture(scope="session")
def pairs_dir(tiny_run, tmp_path_factory):
    """data/ with pairs.jsonl (the tiny demonstrations against a rude wrong answer), feedback.jsonl (every
    demonstration a thumbs up, every second rude answer a thumbs down: unpaired, 2:1) and sft_test.jsonl."""
    root = tmp_path_factory.mktemp("pairs")
    demos = read_jsonl(tiny_run / "data" / "sft.jsonl", "sft")
    pairs = [{"prompt": d["prompt"], "chosen": d["completion"],
              "rejected": d["completion"].replace("ships tomorrow", "is lost. Go away")} for d in demos]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    feedback = [{"prompt": p["prompt"], "answer": p[kind], "label": kind == "chosen"}
                for i, p in enumerate(pairs) for kind in ("chosen", "rejected") if kind == "chosen" or i % 2 == 0]
    (root / "feedback.jsonl").write_text("".join(json.dumps(r) + "\n" for r in feedback))
    (root / "sft_test.jsonl").write_text((tiny_run / "data" / "sft_test.jsonl").read_text())
    return root


@pytest.fixture(scope="session")
def judge_dir(tiny_run, tmp_path_factory):
    """A tiny random feedback model with room for comparison queries, on the tiny run's tokenizer."""
    tok = Tokenizer.load(tiny_run / "init")
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=320, vocab_size=len(tok), n_layer=1, n_head=2, n_embd=16))
    root = tmp_path_factory.mktemp("judge")
    write_checkpoint(root, model.state_dict(), {"model": asdict(model.config), "step": 0}, tok)
    return root


@pytest.fixture(scope="session")
def quick_world(tmp_path_factory):
    """A tiny helpdesk world (48 training prompts, 8 held out) in data/ and, in init/, a random 2-block GPT on a
    tokenizer trained on it: where the reproductions' --quick runs start."""
    root = tmp_path_factory.mktemp("quick_world")
    write_world(root / "data", seed=3, n_train=48, n_test=8)
    texts = [r["prompt"] + " " + r["completion"] for r in read_jsonl(root / "data" / "sft.jsonl", "sft")]
    tok = Tokenizer.train(texts, vocab_size=400)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=len(tok), n_layer=2, n_head=2, n_embd=16))
    write_checkpoint(root / "init", model.state_dict(), {"model": asdict(model.config), "step": 0}, tok)
    return root


REPO = Path(__file__).resolve().parents[1]
GLOO_EXIT_ABORT = "terminate called without an active exception"


def torchrun(script: str, cfg, nproc: int = 2) -> None:
    """Run a train_*.py script under torchrun on CPU (gloo, FSDP2) with cfg's fields as --key=value.

    Now and then (about 1 run in 10 here) a rank aborts at interpreter exit, after main() has returned, with
    the gloo shutdown race above (gloo threads still joinable at exit; pytorch PR #179291). Such a run is
    repeated from scratch, up to twice; any other failure fails the test at once."""
    args = [f"--{k}={v}" for k, v in vars(cfg).items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / script), *args]
    for _ in range(3):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode == 0 or GLOO_EXIT_ABORT not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-3000:]


def run_killed_at(main, cfg, step: int, monkeypatch) -> None:
    """Run main(cfg) and kill it (KeyboardInterrupt) right after it logs `step`, as a crash would."""
    import nanoalign.logger
    real_log = nanoalign.logger.Logger.log

    def dies(self, at, metrics, *args):
        real_log(self, at, metrics, *args)
        if at == step:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(nanoalign.logger.Logger, "log", dies)
    with pytest.raises(KeyboardInterrupt):
        main(cfg)
    monkeypatch.setattr(nanoalign.logger.Logger, "log", real_log)
