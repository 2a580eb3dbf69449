"""Checkpoints: safetensors + JSON, never pickles, swapped in atomically.

    out_dir/model.safetensors   weights (the tied lm_head dropped: safetensors refuses shared memory)
    out_dir/config.json         {"model": GPTConfig, "run": run config, "tokenizer_hash", "step", "metrics"},
                                reward models also {"reward_norm": {"gain", "bias"}}
    out_dir/tokenizer.json      the tokenizer the weights were trained with
    out_dir/resume.safetensors  optimizer moments and RNG state (resume only; later stages ignore it)
    out_dir/critic/             PPO's separate critic: a checkpoint of its own, written in the same swap

A checkpoint is written to `out_dir.tmp` and swapped in with `os.replace`, so a kill at any moment leaves
one complete checkpoint: the previous one or the new one. Caches of computed tensors (DPO's reference
log-probs) are safetensors files named by `content_hash` of their inputs and written the same way.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nanoalign.model import GPT
from nanoalign.tokenizer import Tokenizer, check_tokenizer_hash


def write_checkpoint(out_dir, model_state: dict, meta: dict, tokenizer: Tokenizer, resume_state=None,
                     children: dict | None = None) -> None:
    """Write a full-precision state dict and its metadata to `out_dir`, atomically.

    model_state: name -> tensor (full, unsharded; on rank 0). meta: JSON-serialisable, merged into config.json.
    resume_state: (optimizer state dict as returned by `get_optimizer_state_dict`, {name: tensor} of RNG states).
    children: {name: (model_state, meta, resume_state)}, checkpoints of their own in out_dir/name (PPO's separate
    critic), inside the same swap: a kill never leaves a child from another step than its parent.
    """
    out_dir = Path(out_dir)
    tmp, old = Path(f"{out_dir}.tmp"), Path(f"{out_dir}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    _write_files(tmp, model_state, meta, tokenizer, resume_state)
    for name, (child_state, child_meta, child_resume) in (children or {}).items():
        _write_files(tmp / name, child_state, child_meta, tokenizer, child_resume)
    for extra in ("log.jsonl", "eval.json"):  # run artefacts live beside the weights and survive the swap
        if (out_dir / extra).exists():
            shutil.copy2(out_dir / extra, tmp / extra)
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)  # the previous checkpoint survives until the swap completes
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _write_files(path: Path, model_state: dict, meta: dict, tokenizer: Tokenizer, resume_state) -> None:
    path.mkdir(parents=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items() if k != "lm_head.weight"}
    save_file(tensors, path / "model.safetensors")
    tokenizer.save(path / "tokenizer.json")
    meta = {**meta, "tokenizer_hash": tokenizer.hash}
    if resume_state is not None:
        optim_state, rng = resume_state
        flat, meta["optimizer"] = _flatten_optimizer(optim_state)
        save_file({**flat, **{f"rng/{k}": v for k, v in rng.items()}}, path / "resume.safetensors")
    (path / "config.json").write_text(json.dumps(meta, indent=2))


def read_meta(path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def read_resume_state(path) -> tuple[dict, dict]:
    """Inverse of the resume part of `write_checkpoint`: (optimizer state dict, RNG tensors)."""
    path = Path(path)
    flat = load_file(path / "resume.safetensors")
    rng = {k.removeprefix("rng/"): v for k, v in flat.items() if k.startswith("rng/")}
    return _unflatten_optimizer(flat, read_meta(path)["optimizer"]), rng


def load_model(path, tokenizer: Tokenizer | None = None, scalar_head: bool | None = None) -> tuple[GPT, Tokenizer]:
    """`--init_from`: a nanoalign checkpoint or a local HF GPT-2 directory with tokenizer.json beside it.
    Checks the tokenizer hash recorded in the checkpoint; grows the vocabulary if the tokenizer added
    special tokens (GPT-2's tokenizer lacks PAD and the role markers). scalar_head: as in
    `GPT.from_pretrained` (True turns an SFT model into a reward model; None keeps what is stored)."""
    path = Path(path)
    tokenizer = tokenizer or Tokenizer.load(path)
    check_tokenizer_hash(tokenizer, path)
    model = GPT.from_pretrained(path, scalar_head=scalar_head)
    model.resize_vocab(len(tokenizer))
    return model, tokenizer


def load_reward_model(path, tokenizer: Tokenizer | None = None) -> tuple[GPT, Tokenizer, float, float]:
    """A reward model written by train_rm.py -> (model, tokenizer, gain, bias). Consumers score with
    `nanoalign.sampling.reward_scores(model, ..., gain, bias)` so that SFT samples score mean 0, std 1
    (Ziegler et al. 2019 §2)."""
    meta = read_meta(path)
    if "reward_norm" not in meta:
        raise ValueError(f"{path}/config.json: missing field 'reward_norm'; expected a reward model from train_rm.py")
    model, tokenizer = load_model(path, tokenizer, scalar_head=True)
    return model, tokenizer, meta["reward_norm"]["gain"], meta["reward_norm"]["bias"]


def content_hash(*parts) -> str:
    """A cache key: sha256 over `parts`, each a state dict (every tensor's name, dtype, shape and bytes, in
    name order), bytes, or anything else by its str(). Any changed weight, file byte or setting changes it."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, dict):
            for name in sorted(part):
                t = part[name].detach().cpu().contiguous()
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes: bf16 has no numpy dtype
        else:
            h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\x00")  # a separator, so ("ab", "c") and ("a", "bc") differ
    return h.hexdigest()[:16]


def cached_tensors(path, compute) -> dict[str, torch.Tensor]:
    """Tensors from the safetensors file `path`; on a miss, `compute()` -> {name: tensor} is written there
    first (a temp file beside it, then os.replace, so a killed run leaves no half-written cache). Both
    cases return what the file holds, on the CPU, so a first and a second run see identical values."""
    path = Path(path)
    if not path.exists():
        tensors = {k: v.detach().contiguous().cpu() for k, v in compute().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file(tensors, tmp)
        os.replace(tmp, path)
    return load_file(path)


def _flatten_optimizer(state: dict) -> tuple[dict, dict]:
    """Optimizer state dict keyed by parameter name -> ({"optim/<param>/<key>": tensor}, JSON param groups)."""
    flat = {}
    for name, entry in state["state"].items():
        for key, value in entry.items():
            flat[f"optim/{name}/{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    return flat, state["param_groups"]


def _unflatten_optimizer(flat: dict, param_groups: list) -> dict:
    state = {}
    for key, value in flat.items():
        if key.startswith("optim/"):
            name, field = key.removeprefix("optim/").rsplit("/", 1)
            state.setdefault(name, {})[field] = value
    return {"state": state, "param_groups": param_groups}
