"""Checkpoints: safetensors + JSON, never pickles, committed atomically.

    out_dir/model.safetensors   weights in fp32 for any --dtype (bf16 widens exactly); the tied lm_head dropped
                                (safetensors refuses shared memory)
    out_dir/config.json         {"model": GPTConfig, "kind", "run": run config, "data_sha256": [[data file,
                                sha256], ...], "tokenizer_hash", "step", "metrics", "children"}, reward models also
                                {"reward_norm": {"gain", "bias"}}
    out_dir/tokenizer.json      the tokenizer the weights were trained with
    out_dir/resume.safetensors  optimizer moments and RNG state (resume only; later stages ignore it)
    out_dir/critic/             PPO's separate critic: a checkpoint of its own, written in the same commit; the
                                parent's config.json lists its children ("children"), the only subfolders it owns

A checkpoint is written to `out_dir/.next`, marked complete, then committed file by file with `os.replace`, so
that after a kill at any moment the next reader finds one complete checkpoint: the previous one, or the new one
once `recover` has finished the commit; a reader beside a live writer gets the files of one of them, never of
both (`settled_read`). A commit replaces or deletes only the files a checkpoint holds (FILES) and the children
its predecessor listed: anything else in out_dir (an HF export, another run) stays. The files of a whole run
(RUN_FILES: the checkpoint, log.jsonl, eval.json) are moved aside together by the next run (`move_aside`).
Each checkpoint records its kind (KINDS), and loaders refuse the wrong one: a reward model is not a policy. A
missing or damaged file is an error naming it. Caches of computed tensors (DPO's reference log-probs) are
safetensors files named by `content_hash` of their inputs, written to a temp file and renamed.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
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
    _write_files(nxt, model_state, {**meta, "children": sorted(children or {})}, tokenizer, resume_state)
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
    _LOCKS[str(path)] = _take_lock(out_dir)


@contextlib.contextmanager
def locked(out_dir):
    """out_dir's lock, as `hold_lock` takes it, for the length of a block (the report clearing a stage's folder
    before it reruns it): the same error while a live run holds it, so a live run's files are never touched."""
    path = _lock_path(out_dir)
    if str(path) in _LOCKS:
        yield
        return
    f = _take_lock(out_dir)
    try:
        yield
    finally:
        f.close()  # closing the file drops the flock


def _take_lock(out_dir):
    path = _lock_path(out_dir)
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
    return f


def _lock_path(out_dir) -> Path:
    return Path(f"{Path(out_dir).resolve()}.lock")


def in_use(out_dir) -> bool:
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
    if in_use(out_dir):
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
    """The child checkpoints of the checkpoint in out_dir: those its config.json lists (none when it has no readable
    config.json). A subfolder is never taken for a child because it looks like a checkpoint: it may be another run."""
    try:
        children = json.loads((out_dir / "config.json").read_text()).get("children", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [name for name in children if isinstance(name, str) and name and "/" not in name
            and not name.startswith(".")]


RUN_FILES = (*FILES, "log.jsonl", "eval.json", "best_of_n.json")  # a run's files in its out_dir, besides children
PREV = ".prev-"  # out_dir/.prev-N: a previous run's files, moved aside whole by a new run (`move_aside`)


def run_entries(out_dir) -> list[str]:
    """The entries of out_dir that belong to the run there: those of RUN_FILES it holds and its checkpoint's
    children. Empty for a folder that holds no run."""
    out_dir = Path(out_dir)
    return [name for name in (*RUN_FILES, *_children(out_dir)) if (out_dir / name).exists()]


def foreign_runs(out_dir) -> list[Path]:
    """The subfolders of out_dir that hold a checkpoint or a run's files (a config.json, model.safetensors,
    log.jsonl or eval.json) and are not children of out_dir's checkpoint: other runs, or an export, that a run
    writing into out_dir must not take for its own."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    owned = set(_children(out_dir))
    return sorted(p for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in owned
                  and any((p / name).exists() for name in ("config.json", "model.safetensors", "log.jsonl",
                                                            "eval.json")))


def move_aside(out_dir) -> Path | None:
    """Move the run in out_dir (`run_entries`) into out_dir/.prev-N, N one above the highest there, so that a new run
    starts in a folder of its own and nothing of the previous one is lost -> that folder, or None when out_dir
    held no run. Entries are renamed within out_dir (out_dir may be a mount point); other files stay."""
    out_dir = Path(out_dir)
    entries = run_entries(out_dir)
    if not entries:
        return None
    taken = [int(p.name[len(PREV):]) for p in out_dir.glob(f"{PREV}*") if p.name[len(PREV):].isdigit()]
    aside = out_dir / f"{PREV}{max(taken, default=0) + 1}"
    aside.mkdir()
    for name in entries:
        os.replace(out_dir / name, aside / name)
    return aside


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


def settled_read(path, read, wait_s: float = 60.0):
    """read() of the checkpoint in `path`, all of its files from one checkpoint although another live run may commit a
    new one there meanwhile: a commit moves config.json first and is marked complete before it starts, so the
    read (or the error it raised, a mix of two checkpoints' files) is repeated until config.json is the same file
    before and after it with no commit marked; while a live run's commit is in progress it waits (up to wait_s,
    then an error naming the folder)."""
    path, deadline = Path(path), time.monotonic() + wait_s
    while True:
        before = _stamp(path)
        if before is not None:
            try:
                result = read()
            except Exception:
                if _stamp(path) == before:  # an error of the checkpoint itself, not of a mix
                    raise
            else:
                if _stamp(path) == before:
                    return result
        else:
            recover(path)  # finishes the commit if its writer has died meanwhile; a live writer's is left alone
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: another run kept committing checkpoints there for {wait_s:.0f} s while "
                               f"this one read it; read it again when that run is done")
        time.sleep(0.05)


def _stamp(path: Path):
    """None while a commit is marked in path (a live writer's, `recover` having finished a dead one's); else the
    identity of config.json (inode, modification time, size), which every commit replaces."""
    if (path / NEXT / COMPLETE).exists():
        return None
    try:
        st = (path / "config.json").stat()
    except FileNotFoundError:
        return ()
    return st.st_ino, st.st_mtime_ns, st.st_size


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

    def read():
        check_kind(path, read_meta(path), kinds)
        tok = tokenizer or Tokenizer.load(path)
        check_tokenizer_hash(tok, path)
        model = GPT.from_pretrained(path, scalar_head=scalar_head)
        model.resize_vocab(len(tok))
        return model, tok

    return settled_read(path, read)


def load_reward_model(path, tokenizer: Tokenizer | None = None) -> tuple[GPT, Tokenizer, float, float]:
    """A reward model written by train_rm.py -> (model, tokenizer, gain, bias). Consumers score with
    `nanoalign.sampling.reward_scores(model, ..., gain, bias)` so that SFT samples score mean 0, std 1
    (Ziegler et al. 2019 §2)."""
    (model, tokenizer), meta = settled_read(path, lambda: (  # load_model recovers and checks
        load_model(path, tokenizer, scalar_head=True, kinds=("reward_model",)), read_meta(path)))
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
