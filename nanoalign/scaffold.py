"""The training scaffold every script shares: processes and devices, the batch split, one run per out_dir,
FSDP2 and compile, the run's precision (`nanoalign.precision`), AdamW with warmup + cosine, the optimizer step
(which stops a non-finite run) and resume state. The log is `nanoalign.logger`.

One multi-process path: under `torchrun` the scaffold starts NCCL (GPU) or gloo (CPU) and shards with FSDP2;
as a plain script it does neither. Loss normalisation under accumulation and sharding: every script divides
its summed loss by the *global* count (tokens, pairs) and multiplies by the world size (`global_backward`), because
FSDP2 averages gradients over ranks; then 1 process and N processes take the same step.
"""

import contextlib
import ctypes
import ctypes.util
import dataclasses
import hashlib
import math
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from nanoalign.checkpoint import foreign_runs, hold_lock, read_meta, read_resume_state, recover, write_checkpoint
from nanoalign.precision import LossScaler, loss_scaler, prepare, run_dtype

# ----- batch split ----------------------------------------------------------------------------------


def micro_batch(batch_size: int, micro_batch_size: int, world: int) -> int:
    """Each process's micro-batch: micro_batch_size, or with 0 (the default) its whole share of the global batch,
    batch_size / world. A batch that does not split over the processes, or a micro-batch that does not divide a
    process's share, is an error naming the flags and a value that works."""
    if batch_size % world:
        raise SystemExit(f"--batch_size={batch_size} does not split over {world} processes: use a multiple of "
                         f"{world}, e.g. --batch_size={(batch_size // world + 1) * world}")
    share = batch_size // world
    if micro_batch_size == 0:
        return share
    if share % micro_batch_size:
        raise SystemExit(f"--micro_batch_size={micro_batch_size} does not divide a process's share of the batch "
                         f"(--batch_size={batch_size} over {world} processes: {share}); use a divisor of {share}, "
                         f"or 0 for the whole share")
    return micro_batch_size


def world_size() -> int:
    """The number of processes torchrun started (1 for a plain script)."""
    return int(os.environ.get("WORLD_SIZE", 1))


# ----- processes and devices ---------------------------------------------------------------------------


@dataclasses.dataclass
class Process:
    """This process of the run, as `setup` made it: every script passes it to the scaffold as `proc`."""
    rank: int  # 0 .. world - 1; rank 0 writes checkpoints, logs and eval.json
    world: int  # processes torchrun started (1 for a plain script)
    device: torch.device
    dtype: torch.dtype = torch.float32  # of the run's forwards, --dtype (nanoalign.precision)
    scaler: LossScaler | None = None  # fp16's loss scaler
    data: list = dataclasses.field(default_factory=list)  # [path, sha256] of each data file trained on (run_inputs)

    @property
    def master(self) -> bool:
        return self.rank == 0

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on: multiplied by the loss scale under fp16, else the loss itself."""
        return loss if self.scaler is None else self.scaler.scale_loss(loss)


def setup(seed: int, device: str = "auto", dtype: str = "fp32", allow_slow_dtype: bool = False) -> Process:
    """Start the process group under torchrun, pick the device and the precision (--dtype, refused here where it
    is unsupported: `precision.run_dtype`), seed. Every rank seeds identically here so that models are built with
    the same initial weights; per-rank seeds (seed + 100003·rank, N detail 6) are for sampling and are derived by
    the caller. One process-wide side effect: on the CPU, `keep_cpu_heap` changes glibc's malloc thresholds for
    the whole process."""
    world, rank = world_size(), int(os.environ.get("RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    compute = run_dtype(dtype, torch.device(device), world, allow_slow_dtype)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device == "cpu":
        keep_cpu_heap()
    torch.manual_seed(seed)
    return Process(rank, world, torch.device(device), compute, loss_scaler(compute))


def keep_cpu_heap() -> None:
    """Keep freed tensor memory in the process for the next step. By default glibc maps large blocks anew and
    trims the heap top after large frees, so every step page-faults its activations back in, zero-filled:
    12,889 faults (50 MB) per step of the CPU DPO benchmark, 7% of its time (bench/RESULTS.md); none after
    this. A no-op without glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum: blocks below 32 MB come from the heap
    mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)


def die_with_parent():
    """A `preexec_fn` for subprocess: the child is killed (SIGKILL) when the process that started it dies, even
    of a SIGKILL, which no handler sees, so a killed report or RLAIF pass leaves no training running behind it
    (Linux's PR_SET_PDEATHSIG; None elsewhere). A parent that died before the child armed it is caught by the
    parent pid check."""
    if not sys.platform.startswith("linux"):
        return None
    prctl, parent = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl, os.getpid()
    PR_SET_PDEATHSIG = 1  # linux/prctl.h

    def arm():  # runs in the child between fork and exec: no allocation-heavy Python here
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return arm


READS = ("init_from", "reward_model")  # flags naming checkpoints a run reads (DPO's reference is its --init_from)
# Flags a resumed run may change: they leave the arithmetic of the training steps as it was (logging, checkpoint and
# evaluation cadence, where and how fast it computes, the split of a batch into micro-batches), or set the run's
# length (max_steps, n_updates, epochs), which stretches or shortens the learning-rate schedule from the step reached.
MAY_CHANGE = frozenset({"resume", "out_dir", "max_steps", "n_updates", "epochs", "log_interval", "ckpt_interval",
                        "eval_interval", "n_eval", "eval_max_new_tokens", "device", "compile",
                        "activation_checkpointing", "fused_head", "micro_batch_size", "rows_per_forward", "cache_dir",
                        "ref_cache", "allow_slow_dtype"})


def claim_out_dir(cfg, proc: Process) -> None:
    """An out_dir holds one run. Before anything is written, `check_out_dir` refuses an out_dir that holds other
    runs or overlaps what the run reads; then rank 0 takes the lock for the run's life (`checkpoint.hold_lock`)
    and finishes or undoes a checkpoint write that a killed run left (`checkpoint.recover`). A previous run's files
    are moved aside by the run's first write, its log (`nanoalign.logger`). The other ranks wait, so none reads
    out_dir before that."""
    if proc.master:
        check_out_dir(cfg)
        hold_lock(cfg.out_dir)
        recover(cfg.out_dir)
    if proc.world > 1:
        dist.barrier()


def run_inputs(cfg, proc: Process, data=(), may_change=()) -> None:
    """Hash the `data` files the run trains on, once they exist (every checkpoint records them); on resume, the run
    in out_dir must be this one (`check_resume`, `may_change` adding the script's own flags to MAY_CHANGE)."""
    if proc.master:
        proc.data = [[str(path), sha256(path)] for path in data]
        if cfg.resume:
            check_resume(cfg, proc.data, MAY_CHANGE | set(may_change))


def check_out_dir(cfg) -> None:
    """Refuse, with one error naming the flags, an out_dir that is, lies inside or holds a checkpoint the run reads
    (READS), that is its --data_dir, or that holds other runs' folders (`checkpoint.foreign_runs`: --out_dir=out
    where out/sft was meant)."""
    out = Path(cfg.out_dir).resolve()
    for flag in READS:
        value = getattr(cfg, flag, "")
        if not value:
            continue
        read = Path(value).resolve()
        if read == out or read in out.parents:
            where = "is" if read == out else "is inside"
            raise SystemExit(f"--out_dir={cfg.out_dir} {where} --{flag}={value}: a run never writes into a "
                             f"checkpoint it reads; choose another --out_dir")
        if out in read.parents:
            raise SystemExit(f"--{flag}={value} is inside --out_dir={cfg.out_dir}: a run's folder holds that run "
                             f"alone; choose another --out_dir")
    if getattr(cfg, "data_dir", "") and Path(cfg.data_dir).resolve() == out:
        raise SystemExit(f"--out_dir={cfg.out_dir} is --data_dir={cfg.data_dir}: choose another --out_dir")
    others = foreign_runs(out)
    if others:
        raise SystemExit(f"--out_dir={cfg.out_dir} holds other runs or checkpoints ({', '.join(p.name for p in others)}"
                         f"): a run's folder holds that run alone; choose a folder of its own (e.g. a new subfolder)")


def check_resume(cfg, data: list, may_change=MAY_CHANGE) -> None:
    """--resume=True continues the run in cfg.out_dir: every flag outside `may_change` must equal the value its
    checkpoint records, and each data file its sha256 there; the differences are refused in one line. A missing
    resume state is refused here too, before anything is removed."""
    out_dir = Path(cfg.out_dir)
    require_resume_state(out_dir)
    meta = read_meta(out_dir)
    run, now = meta.get("run", {}), dataclasses.asdict(cfg)
    differ = [f"--{k}={now[k]} (was {run[k]})" for k in now if k in run and k not in may_change and now[k] != run[k]]
    for (path, digest), (_, was) in zip(data, meta.get("data_sha256", [])):
        if digest != was:
            differ.append(f"{path} (sha256 {(digest or 'missing')[:12]}, was {(was or 'missing')[:12]})")
    if differ:
        raise SystemExit(f"--resume=True: these differ from the run in {out_dir}: {', '.join(differ)}")


def require_resume_state(out_dir) -> None:
    if not (Path(out_dir) / "resume.safetensors").exists():
        raise FileNotFoundError(f"{out_dir}/resume.safetensors: missing; --resume=True continues from a checkpoint "
                                "written during training (a finished reward model or PPO policy has none)")


def sha256(path) -> str | None:
    """The sha256 of a file's bytes, read in 1 MiB blocks; None for a missing file (its reader names it)."""
    if not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def global_sum(x, proc: Process):
    """Sum a Python number (token counts for the global loss normalisation) or a tensor (statistics such as
    PPO's whitening moments) over ranks."""
    if proc.world == 1:
        return x
    if torch.is_tensor(x):
        x = x.detach().clone()
        dist.all_reduce(x)
        return x
    t = torch.tensor(float(x), dtype=torch.float64, device=proc.device if proc.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.item()


def wrap_model(model: torch.nn.Module, proc: Process, compile: bool = False,
               activation_checkpointing: bool = False, fused_head: bool = False) -> torch.nn.Module:
    """Compile each block in place, shard each block, then the root (embeddings, tied head, final norm).
    Activation checkpointing keeps only each block's input for backward and recomputes the rest; the fused head
    makes `GPT.forward(output="logps")` (`sampling.model_logps`) take its log-probs from the hidden states in
    chunks of rows, recomputing each chunk's logits in backward (`logprobs.linear_logps`). The run's --dtype is
    applied first (`precision.prepare`): bf16 parameters are sharded as they are, their gradients summed over
    ranks in fp32. Build the optimizer only afterwards: sharding turns parameters into DTensors."""
    prepare(model.to(proc.device), proc.dtype)
    model.checkpoint_blocks, model.fused_head = activation_checkpointing, fused_head
    if proc.device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    elif proc.dtype == torch.bfloat16:
        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()  # fp32 on CPU keeps the parity tests tight
    for block in model.transformer.h:
        if compile:
            block.compile(fullgraph=True)  # in place: state_dict keys stay clean (no _orig_mod.)
        if proc.world > 1:
            fully_shard(block, mp_policy=mp)
    if proc.world > 1:
        fully_shard(model, mp_policy=mp)
    return model


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Keep a sharded model's full weights on every rank for a whole block of forwards (a rollout's decode
    steps): one all-gather per FSDP module on entry, none per forward, so ranks may run different numbers
    of forwards (their rows finish at different steps). A no-op for an unsharded model."""
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in sharded:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def accumulate(model, items: list, size: int):
    """Gradient accumulation: yield `items` in micro-batches of `size`, with the model's gradient sync (FSDP's
    reduce-scatter) off for every micro-batch but the last, so the ranks communicate once per optimizer step."""
    starts = range(0, len(items), size)
    for k, s in enumerate(starts):
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(k == len(starts) - 1)
        yield items[s:s + size]


def global_backward(loss: torch.Tensor, proc: Process) -> None:
    """Backward on a loss summed over this rank's rows and divided by the global count (tokens, pairs, prompts),
    times the world size: FSDP2 averages gradients over ranks, so 1 and N processes take the same step."""
    proc.scaled(loss * proc.world).backward()  # under fp16 also times the loss scale (nanoalign.precision)


# ----- optimizer ----------------------------------------------------------------------------------------


def make_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8):
    """AdamW; weight decay on matrices only (not biases, LayerNorm gains or position/token tables' ties).
    Departure: β₂ = 0.95 by default (GPT-3 §B, nanoGPT), where the RLHF reference recipes (Ziegler et al. 2019,
    InstructGPT; the DPO paper used RMSprop) keep Adam's 0.999. Kept from GPT training practice, not tuned
    against 0.999 here; pass betas to align."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)  # one kernel, CPU or GPU


def lr_at(step: int, max_steps: int, lr: float, warmup_steps: int, min_lr: float) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `max_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


DIVERGENCE = 100.0  # a step's watched value above this multiple of its reference stops the run (`Divergence`)
DIVERGENCE_WINDOW = 50  # the recent steps whose median is part of that reference
WEIGHT_GROWTH = 2.0  # an update that multiplies the weights' global norm by more than this stops the run


@dataclasses.dataclass
class Divergence:
    """What `optimizer_step` keeps between the steps of one optimizer (held by the optimizer it serves), to stop a
    run that diverges while its values stay finite. Two rules, both with the weights of the last checkpoint
    untouched on disk:

      - before the update: |v| > DIVERGENCE × max(|v₁|, median of the last DIVERGENCE_WINDOW |v|), v the step's
        watched value (the loss; PPO watches the gradient norm, since its loss may be negative or near zero) and
        v₁ the first value this run saw. The first value keeps a loss that falls towards 0 (DPO on separable
        pairs) from turning noise into a 100x jump; the median lets a value that drifts up slowly (PPO's
        gradient norm) move its reference with it. Falling never trips it, nor anything while the reference is 0.
      - after the update: the weights' global norm grown more than WEIGHT_GROWTH x in one step (AdamW moves
        every weight by about the learning rate, so --lr=1e3 multiplies it a thousandfold at step 1), caught
        before any checkpoint holds those weights.

    A checkpoint is thus written only of weights whose previous step's loss passed the first rule and whose own
    step passed the second (a loss measures the weights before the update, so no loss of a checkpoint's own
    weights exists when it is written)."""
    history: list = dataclasses.field(default_factory=list)  # |v| of the recent steps, the first one kept
    checkpoint: str = ""  # the last checkpoint this run wrote or resumed from: "out/sft (step 2)"

    def reference(self) -> float:
        recent = sorted(self.history[1:][-DIVERGENCE_WINDOW:] or self.history)
        return max(self.history[0], recent[len(recent) // 2])

    def last_good(self) -> str:
        return (f"the last checkpoint, {self.checkpoint}, is the last good one" if self.checkpoint else
                "no checkpoint of this run was written")


def divergence(optimizer) -> Divergence:
    """The optimizer's Divergence state, made on first use (a plain attribute, as `sampling.static_decoder`)."""
    if "_divergence" not in optimizer.__dict__:
        optimizer.__dict__["_divergence"] = Divergence()
    return optimizer.__dict__["_divergence"]


def _weight_norm(model) -> float:
    norm = torch.nn.utils.get_total_norm([p.detach() for p in model.parameters()])
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # a DTensor under FSDP2


def optimizer_step(model, optimizer, lr: float, grad_clip: float, where: str = "", losses: dict | None = None,
                   scaler: LossScaler | None = None, watch: str = "loss") -> float:
    """Set the learning rate, clip the global gradient norm, step, zero the gradients; returns the norm.
    A non-finite gradient norm (over all ranks) or loss term, or a divergence (`Divergence`: losses[watch], or
    the gradient norm with watch="grad_norm" or no such loss term, against its recent range; then the update's
    growth of the weights), stops the run with a FloatingPointError naming the step and the last checkpoint this
    run wrote, which no stopped step has touched. where: the step, for the error ("step 17"); losses: {name: float} this
    step's loss terms. scaler: fp16's (`Process.scaler`): the gradients are unscaled first, and non-finite ones
    with finite losses are an overflow of the scaling: the step is skipped, weights and moments unchanged, and
    the norm (inf or NaN) returned."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if scaler is not None:
        scaler.unscale_(model.parameters())
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    norm = norm.item()
    terms = {**(losses or {}), "grad_norm": norm}
    state = divergence(optimizer)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in terms.items())
    if not all(math.isfinite(v) for v in terms.values()):
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.overflowed(losses or {}):
            return norm
        raise FloatingPointError(f"{where or 'a step'}: non-finite training values ({shown}); stopped before "
                                 f"the update: {state.last_good()} (a lower --lr, or --grad_clip, may help)")
    watch = watch if watch in terms else "grad_norm"
    value = abs(terms[watch])
    if state.history and state.reference() > 0 and value > DIVERGENCE * state.reference():
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"{where or 'a step'}: diverged: |{watch}| {value:.4g} is more than {DIVERGENCE:g}x "
                                 f"its reference {state.reference():.4g} (the larger of its first value and its "
                                 f"median over the last {DIVERGENCE_WINDOW} steps; {shown}); stopped before the "
                                 f"update: {state.last_good()} (a lower --lr may help)")
    state.history = state.history[:1] + state.history[1:][-DIVERGENCE_WINDOW + 1:] + [value]
    before = _weight_norm(model)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    after = _weight_norm(model)
    if not after <= WEIGHT_GROWTH * before:  # NaN fails too
        raise FloatingPointError(f"{where or 'a step'}: diverged: the update took the weights' norm from "
                                 f"{before:.4g} to {after:.4g} (more than {WEIGHT_GROWTH:g}x in one step; "
                                 f"lr {lr:.4g}); "
                                 f"stopped before any checkpoint of it: {state.last_good()} (a lower --lr may help)")
    if scaler is not None:
        scaler.stepped()
    return norm


# ----- state for checkpoints ---------------------------------------------------------------------------

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model, optimizer=None):
    """Full (unsharded, CPU) model state, and optimizer state keyed by parameter name; empty off rank 0."""
    model_state = get_model_state_dict(model, options=_FULL)
    if optimizer is None:
        return model_state
    return model_state, get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_optimizer_state(model, optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_resumable(out_dir, model, optimizer, tok, proc: Process, cfg, step: int, metrics: dict,
                   extra: dict | None = None, children: dict | None = None, kind: str = "policy",
                   finished: bool = False) -> None:
    """Gather the full model and optimizer state and write a resumable checkpoint of `kind` from rank 0; `extra`
    (JSON: a script's own state, e.g. PPO's β) goes into config.json; children {name: (model, optimizer)},
    critics, are written as resumable checkpoints in out_dir/name in the same commit (`resume(out_dir/name, ...)`
    reads one). config.json's "finished" says whether this is the run's last step (`finished`): a reader that
    wants a trained model (`rlaif`'s feedback model) refuses an interrupted training by it."""
    rng = {"torch": torch.get_rng_state()}
    run = {"run": dataclasses.asdict(cfg), "data_sha256": proc.data, "step": step, "finished": finished}
    kids = {}
    for name, (child, child_optimizer) in (children or {}).items():  # every rank gathers, rank 0 writes
        child_state, child_optim_state = full_state(child, child_optimizer)
        kids[name] = (child_state, {"model": dataclasses.asdict(child.config), "kind": "critic", **run},
                      (child_optim_state, rng))
    model_state, optim_state = full_state(model, optimizer)
    if proc.master:
        meta = {"model": dataclasses.asdict(model.config), "kind": kind, **run, "metrics": metrics, **(extra or {})}
        write_checkpoint(out_dir, model_state, meta, tok, (optim_state, rng), kids)
    divergence(optimizer).checkpoint = f"{out_dir} (step {step})"


def save_final(out_dir, model, tok, proc: Process, meta: dict, children: dict | None = None) -> None:
    """A finished run's plain checkpoint, meta as its config.json (no optimizer or RNG state: nothing to resume)
    with "finished": true: every rank gathers the full state, rank 0 writes; children {name: model}, critics, in
    out_dir/name in the same commit, each with meta's fields but its own "model" and "kind"."""
    meta, state = {**meta, "finished": True}, full_state(model)
    kids = {name: (full_state(child), {**meta, "model": dataclasses.asdict(child.config), "kind": "critic"}, None)
            for name, child in (children or {}).items()}
    if proc.master:
        write_checkpoint(out_dir, state, {"data_sha256": proc.data, **meta}, tok, children=kids or None)


def resume(out_dir, model, optimizer) -> int:
    """Restore the optimizer moments and the RNG state written by `save_resumable`; returns the step. A checkpoint
    write that a kill interrupted is first finished or undone (`recover`)."""
    recover(out_dir)
    require_resume_state(out_dir)
    optim_state, rng = read_resume_state(out_dir)
    load_optimizer_state(model, optimizer, optim_state)
    torch.set_rng_state(rng["torch"])
    step = read_meta(out_dir)["step"]
    divergence(optimizer).checkpoint = f"{out_dir} (step {step})"
    return step
