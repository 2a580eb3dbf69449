"""Checkpoints: safetensors + JSON, never pickles, committed atomically.

    out_dir/model.safetensors   weights in fp32 for any --dtype (bf16 widens exactly); the tied lm_head dropped
                                (safetensors refuses shared memory)
    out_dir/config.json         {"model": GPTConfig, "kind", "run": run config, "tokenizer_hash", "step",
                                "metrics"}, reward models also {"reward_norm": {"gain", "bias"}}
    out_dir/tokenizer.json      the tokenizer the weights were trained with
    out_dir/resume.safetensors  optimizer moments and RNG state (resume only; later stages ignore it)
    out_dir/critic/             PPO's separate critic: a checkpoint of its own, written in the same commit

A checkpoint is written to `out_dir/.next`, marked complete, then committed file by file with `os.replace`, so
that after a kill at any moment the next reader finds one complete checkpoint: the previous one, or the new one
once `recover` has finished the commit. Each checkpoint records its kind (KINDS), and loaders refuse the wrong
one: a reward model is not a policy. A missing or damaged file is an error naming it. Caches of computed tensors
(DPO's reference log-probs) are safetensors files named by `content_hash` of their inputs, written to a temp
file and renamed.
"""

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanoalign.model import GPT, read_meta, read_tensors
from nanoalign.tokenizer import Tokenizer, check_tokenizer_hash


NEXT, COMPLETE = ".next", "COMPLETE"  # out_dir/.next: a checkpoint being written; its marker: fully written
FILES = ("model.safetensors", "config.json", "tokenizer.json", "resume.safetensors")  # what a checkpoint holds


def write_checkpoint(out_dir, model_state: dict, meta: dict, tokenizer: Tokenizer, resume_state=None,
                     children: dict | None = None) -> None:
    """Write a full-precision state dict and its metadata to `out_dir`, atomically.

    model_state: name -> tensor (full, unsharded; on rank 0). meta: JSON-serialisable, merged into config.json.
    resume_state: (optimizer state dict as returned by `get_optimizer_state_dict`, {name: tensor} of RNG states).
    children: {name: (model_state, meta, resume_state)}, checkpoints of their own in out_dir/name (PPO's separate
    critic), inside the same commit: a kill never leaves a child from another step than its parent.

    The files are written to out_dir/.next, then a marker (listing the previous checkpoint's files the new one
    lacks) says they are complete, then `_commit` renames each over its old copy and deletes the stale ones. A
    kill before the marker leaves the previous checkpoint and a `.next` that `recover` deletes; a kill after it, a
    commit that `recover` completes; every reader calls `recover` first. Only entries inside out_dir are renamed,
    so out_dir itself may be a mount point or a symlink; other files there (log.jsonl, eval.json) stay.
    Non-finite weights (the model's or a child's) are refused first, with out_dir left as it was.
    """
    out_dir = Path(out_dir)
    _check_finite(out_dir, model_state, meta)
    for name, (child_state, child_meta, _) in (children or {}).items():
        _check_finite(out_dir, child_state, child_meta, f"{name}/")
    out_dir.mkdir(parents=True, exist_ok=True)
    recover(out_dir)
    nxt = out_dir / NEXT
    _write_files(nxt, model_state, meta, tokenizer, resume_state)
    for name, (child_state, child_meta, child_resume) in (children or {}).items():
        _write_files(nxt / name, child_state, child_meta, tokenizer, child_resume)
    new = {p.name for p in nxt.iterdir()}
    stale = [name for name in (*FILES, *_children(out_dir)) if name not in new and (out_dir / name).exists()]
    _fault("written")
    _write_json(nxt / COMPLETE, {"stale": stale})
    _fault("marked")
    _commit(out_dir)


def _check_finite(out_dir: Path, state: dict, meta: dict, prefix: str = "") -> None:
    bad = next((k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise FloatingPointError(f"{out_dir}: step {meta.get('step')}: non-finite weights in {prefix}{bad}; "
                                 f"checkpoint not written, the one in {out_dir} is unchanged")


_LOCKS = {}  # lock file path -> its open file, held for the process's life


def hold_lock(out_dir, master: bool = True) -> None:
    """One run per out_dir: rank 0 (master) takes an advisory lock (flock) on out_dir.lock, beside out_dir, and
    holds it until the process ends; the lock file records its pid. A second run gets an error naming the holder;
    the OS drops a killed run's lock, so the next run takes it over. A process that holds the lock already (main
    called again in one process) keeps it."""
    path = _lock_path(out_dir)
    if not master or str(path) in _LOCKS:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise SystemExit(f"{out_dir} is in use by another run (pid {holder}; lock {path}): wait for it to finish, "
                         f"or choose another --out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _LOCKS[str(path)] = f


def _lock_path(out_dir) -> Path:
    return Path(f"{Path(out_dir).resolve()}.lock")


def _written_by_another(out_dir) -> bool:
    """Whether another live process holds out_dir's lock (a run that may be writing a checkpoint there now)."""
    path = _lock_path(out_dir)
    if str(path) in _LOCKS or not path.exists():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def recover(out_dir) -> None:
    """Finish or undo a checkpoint write that a kill interrupted: a complete out_dir/.next is committed, an
    incomplete one deleted; a replaced child left aside is deleted. Nothing is touched while another live run
    holds out_dir's lock: its write may be in progress (its checkpoint is complete while .next is incomplete)."""
    out_dir = Path(out_dir)
    if _written_by_another(out_dir):
        return
    nxt = out_dir / NEXT
    if (nxt / COMPLETE).exists():
        _commit(out_dir)
    elif nxt.exists():
        shutil.rmtree(nxt)
    for old in out_dir.glob(".old-*"):  # a child directory replaced by a finished commit
        shutil.rmtree(old)


def _commit(out_dir: Path) -> None:
    """Move each entry of out_dir/.next over its old copy (a child directory: the old one first aside, since a
    directory cannot be renamed over a non-empty one), delete the stale ones, then .next. Repeatable after a kill
    at any point: entries already moved are no longer in .next."""
    nxt = out_dir / NEXT
    stale = json.loads((nxt / COMPLETE).read_text())["stale"]
    for entry in sorted(p for p in nxt.iterdir() if p.name != COMPLETE):  # config.json before model.*
        target, aside = out_dir / entry.name, out_dir / f".old-{entry.name}"
        if entry.is_dir() and target.exists():
            os.replace(target, aside)
        os.replace(entry, target)
        shutil.rmtree(aside, ignore_errors=True)
        _fault(f"moved {entry.name}")
    for name in stale:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    shutil.rmtree(nxt)


def _children(out_dir: Path) -> list[str]:
    """The child checkpoints (subdirectories with a config.json) of the checkpoint in out_dir."""
    return [p.name for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
            and (p / "config.json").exists()] if out_dir.exists() else []


def _fault(point: str) -> None:
    """A named point of the checkpoint write; the fault-injection tests replace this to kill the writer there."""


def _full(t: torch.Tensor) -> torch.Tensor:
    """A tensor as a checkpoint stores it: on the CPU, bf16 and fp16 widened to fp32 (exactly), so that a --dtype=bf16
    run's weights and moments read as fp32 code expects and a resumed run narrows them back bit for bit."""
    t = t.detach().contiguous().cpu()
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2))


def _write_files(path: Path, model_state: dict, meta: dict, tokenizer: Tokenizer, resume_state) -> None:
    path.mkdir(parents=True)
    tensors = {k: _full(v) for k, v in model_state.items() if k != "lm_head.weight"}
    save_file(tensors, path / "model.safetensors")
    tokenizer.save(path / "tokenizer.json")
    meta = {**meta, "tokenizer_hash": tokenizer.hash}
    if resume_state is not None:
        optim_state, rng = resume_state
        flat, meta["optimizer"] = _flatten_optimizer(optim_state)
        save_file({**flat, **{f"rng/{k}": v for k, v in rng.items()}}, path / "resume.safetensors")
    _write_json(path / "config.json", meta)


KINDS = ("policy", "reward_model", "critic")  # a language model (SFT, DPO, PPO, the feedback model); RM; PPO critic


def check_kind(path, meta: dict, kinds: tuple) -> None:
    """A checkpoint of another kind than `kinds` is an error (one without a recorded kind passes: HF GPT-2, or
    written before kinds were recorded; a stored reward normalisation marks a reward model)."""
    assert set(kinds) <= set(KINDS), f"unknown checkpoint kinds {kinds}; expected some of {KINDS}"
    kind = meta.get("kind") or ("reward_model" if "reward_norm" in meta else None)
    if kind is not None and kind not in kinds:
        raise ValueError(f"{path}: a {kind} checkpoint (config.json field 'kind'), where a {' or '.join(kinds)} "
                         f"is expected")


def read_resume_state(path) -> tuple[dict, dict]:
    """Inverse of the resume part of `write_checkpoint`: (optimizer state dict, RNG tensors)."""
    path = Path(path)
    recover(path)
    flat = read_tensors(path / "resume.safetensors")
    rng = {k.removeprefix("rng/"): v for k, v in flat.items() if k.startswith("rng/")}
    return _unflatten_optimizer(flat, read_meta(path)["optimizer"]), rng


def load_model(path, tokenizer: Tokenizer | None = None, scalar_head: bool | None = None,
               kinds: tuple = ("policy",)) -> tuple[GPT, Tokenizer]:
    """`--init_from`: a nanoalign checkpoint or a local HF GPT-2 directory with tokenizer.json beside it.
    Checks the checkpoint's kind against `kinds` and its recorded tokenizer hash; grows the vocabulary if the
    tokenizer added special tokens (GPT-2's tokenizer lacks PAD and the role markers). scalar_head: as in
    `GPT.from_pretrained` (True turns an SFT model into a reward model; None keeps what is stored)."""
    path = Path(path)
    recover(path)
    check_kind(path, read_meta(path), kinds)
    tokenizer = tokenizer or Tokenizer.load(path)
    check_tokenizer_hash(tokenizer, path)
    model = GPT.from_pretrained(path, scalar_head=scalar_head)
    model.resize_vocab(len(tokenizer))
    return model, tokenizer


def load_reward_model(path, tokenizer: Tokenizer | None = None) -> tuple[GPT, Tokenizer, float, float]:
    """A reward model written by train_rm.py -> (model, tokenizer, gain, bias). Consumers score with
    `nanoalign.sampling.reward_scores(model, ..., gain, bias)` so that SFT samples score mean 0, std 1
    (Ziegler et al. 2019 §2)."""
    model, tokenizer = load_model(path, tokenizer, scalar_head=True, kinds=("reward_model",))  # recovers, checks
    meta = read_meta(path)
    if "reward_norm" not in meta:
        raise ValueError(f"{path}/config.json: missing field 'reward_norm'; expected a reward model from train_rm.py")
    return model, tokenizer, meta["reward_norm"]["gain"], meta["reward_norm"]["bias"]


def cut_trunk(init_from, n_layer: int, out) -> tuple[str, int]:
    """The checkpoint at init_from cut to its first n_layer blocks, its embeddings and final LayerNorm kept, written
    to out -> (checkpoint directory, parameters): a smaller reward model's trunk with the same tokenizer and
    pretraining (Gao et al. 2022 §3 vary the proxy's size). The full depth is init_from itself."""
    model, tok = load_model(init_from)
    if n_layer == model.config.n_layer:
        return str(init_from), model.num_params()
    kept = {k: v for k, v in model.state_dict().items()
            if not k.startswith("transformer.h.") or int(k.split(".")[2]) < n_layer}
    config = replace(model.config, n_layer=n_layer)
    write_checkpoint(out, kept, {"model": asdict(config), "kind": "policy", "step": 0, "cut_from": str(init_from)}, tok)
    return str(out), load_model(out)[0].num_params()


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
    return read_tensors(path)


def _flatten_optimizer(state: dict) -> tuple[dict, dict]:
    """Optimizer state dict keyed by parameter name -> ({"optim/<param>/<key>": tensor}, JSON param groups)."""
    flat = {}
    for name, entry in state["state"].items():
        for key, value in entry.items():
            flat[f"optim/{name}/{key}"] = _full(torch.as_tensor(value))
    return flat, state["param_groups"]


def _unflatten_optimizer(flat: dict, param_groups: list) -> dict:
    state = {}
    for key, value in flat.items():
        if key.startswith("optim/"):
            name, field = key.removeprefix("optim/").rsplit("/", 1)
            state.setdefault(name, {})[field] = value
    return {"state": state, "param_groups": param_groups}
