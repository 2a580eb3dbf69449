"""Reward model: a scalar score learned from ranked answers, on the SFT trunk (step 2 of RLHF).

    python train_rm.py                                     # helpdesk rankings from out/sft -> out/rm
    python train_rm.py --loss=plackett_luce                # likelihood of the full ranking instead of its pairs
    python train_rm.py --loss=best_of_k                    # likelihood of the top answer only (Ziegler §2)
    python train_rm.py --data=pairs                        # pairs.jsonl, an optional soft label "p" per pair
    python train_rm.py --data=pairs --pairs_file=ai_pairs.jsonl --soft_labels=True --out_dir=out/rm_rlaif
    python train_rm.py --resume=True                       # continue a killed run from out/rm's last checkpoint
    torchrun --nproc_per_node=2 train_rm.py --compile=True

Each prompt's K ranked answers are one batch element: K forward rows, a loss over all C(K,2) pairs
(InstructGPT §3.5, Eq. 1). The reward is the scalar head at the last real token, the EOS of prompt + response
+ EOS rendered as in SFT and PPO. After training, SFT samples on training prompts, drawn as PPO draws its
rollouts (same length limit and temperature; only answers that end in EOS, since PPO replaces the others'
score by a penalty), fix a gain and bias so that their rewards have mean 0 and std 1 (Ziegler et al. 2019 §2,
`losses.reward_normalisation`, the same function PPO uses for --reward=gold); they are stored in
out/rm/config.json and applied by every consumer through `nanoalign.sampling.reward_scores`.
out/rm/eval.json: held-out accuracy against the noisy labels beside its Bayes ceiling, and against the gold order;
the held-out log-loss and calibration error (with its reliability table) of P(i above j) = σ(r_i - r_j) against
the noisy labels. --eval_interval also logs the held-out loss and accuracy during training.

Departures from the papers: the tiny trunk trains at lr 5e-4 for 2 epochs (InstructGPT and Ziegler: 1 epoch
at 9e-6 to 5e-5 on pretrained models); Plackett-Luce is divided by K-1 so that K = 2 is Bradley-Terry; rewards
are normalised after training only (OAI-19 also normalises before); --data=pairs shuffles single pairs, the
batching InstructGPT found to overfit, kept as the simplest input for soft labels (AI feedback, CAI §4.1).
Answers longer than the context are cut (4% of the helpdesk rows, all padded with filler), so their reward is
read at the last kept token instead of the EOS.
"""

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from nanoalign.checkpoint import load_model, write_checkpoint
from nanoalign.config import check_config, parse_config
from nanoalign.data import batch_indices, encode_example, read_jsonl, require_soft_labels
from nanoalign.evaluate import pairwise_hits, ranked_above, reward_model_metrics, sample_answers, write_json
from nanoalign.logger import Logger
from nanoalign.losses import (best_of_k_loss, kwise_ranking_loss, plackett_luce_loss, reward_normalisation,
                              soft_bradley_terry_loss)
from nanoalign.model import GPT
from nanoalign.sampling import group_rewards, join, reward_scores
from nanoalign.scaffold import (accumulate, claim_out_dir, full_state, global_backward, global_sum, lr_at,
                                make_optimizer, micro_batch, optimizer_step, resume, run_inputs, save_resumable, setup,
                                teardown, world_size, wrap_model)
from nanoalign.world.files import ensure_world


@dataclass
class Config:
    data_dir: str = "data"  # prefs.jsonl / prefs_test.jsonl (the helpdesk world is generated if missing)
    out_dir: str = "out/rm"  # checkpoint, log.jsonl and eval.json go here
    init_from: str = "out/sft"  # SFT checkpoint: the RM's trunk, and the policy sampled for normalisation
    resume: bool = False  # continue from out_dir's checkpoint (optimizer, RNG, data position)
    data: str = "prefs"  # prefs: K ranked answers per prompt | pairs: pairs_file with optional soft label "p"
    pairs_file: str = "pairs.jsonl"  # --data=pairs: the pairs in data_dir (ai_pairs.jsonl: nanoalign.rlaif's)
    soft_labels: bool = False  # --data=pairs: every pair must carry "p" (AI feedback labels)
    loss: str = "kwise"  # prefs: kwise (all C(K,2) pairs) | plackett_luce | best_of_k; pairs: soft Bradley-Terry
    epochs: int = 2  # passes over the training records
    batch_size: int = 32  # prompts (K rows each) or pairs per optimizer step (global)
    micro_batch_size: int = 0  # prompts or pairs per backward per process (0 = the process's whole share)
    rows_per_forward: int = 32  # answers per forward, length-sorted within a micro-batch (speed only)
    lr: float = 5e-4  # peak AdamW learning rate
    min_lr: float = 5e-5  # end of the cosine
    warmup_steps: int = 20  # linear warmup
    weight_decay: float = 0.1  # on matrices only
    adam_eps: float = 1e-5  # as for PPO (N+); see step 4
    grad_clip: float = 1.0  # global grad-norm clip (0 = off)
    log_interval: int = 25  # steps between progress lines
    eval_interval: int = 0  # steps between held-out evaluations, logged as eval/loss, eval/accuracy (0 = end only)
    ckpt_interval: int = 100  # steps between resumable checkpoints (the final one carries the normalisation)
    n_norm: int = 256  # SFT samples on training prompts that fix the reward's gain and bias (OAI-19: 256)
    max_new_tokens: int = 64  # answer length limit for those samples (PPO's rollout limit)
    temperature: float = 1.0  # their sampling temperature (PPO's rollout temperature)
    compile: bool = False  # torch.compile each transformer block
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "fp32"  # fp32 | bf16 (weights and AdamW moments) | fp16 (CUDA, loss scaling): nanoalign.precision
    allow_slow_dtype: bool = False  # run --dtype=bf16 on a CPU that only emulates it (tens of times slower)
    seed: int = 1234  # head init and data order; sampling for normalisation uses seed


def encode_group(tok, rec: dict, max_len: int) -> dict:
    """One record -> its answers as token rows: a prefs record's K answers with their ranking, or a pairs
    record's chosen and rejected (ranking [0, 1]) with p = P(chosen is better), 1 unless given."""
    answers = rec["responses"] if "responses" in rec else [rec["chosen"], rec["rejected"]]
    rows = [encode_example(tok, rec["prompt"], a, max_len, rec["where"]) for a in answers]
    return {"rows": rows, "ranking": rec.get("ranking", [0, 1]), "p": rec.get("p", 1.0), "gold": rec.get("gold"),
            "where": rec["where"]}


def check_same_k(groups: list[dict]) -> int:
    """The one K of a file's records (rewards form an [N, K] tensor); a record with another K is an error."""
    K = len(groups[0]["rows"])
    for g in groups:
        if len(g["rows"]) != K:
            raise ValueError(f"{g['where']}: field 'responses' has {len(g['rows'])} answers, the file's first "
                             f"record {K}; use one K per file")
    return K


def rm_step(model, optimizer, groups: list[dict], pad_id: int, step: int, max_steps: int, cfg: Config,
            proc) -> tuple[dict, int]:
    """One optimizer step (step counts from 1) on this rank's groups: per micro-batch the soft Bradley-Terry
    (--data=pairs), K-wise, Plackett-Luce or best-of-K loss, re-weighted to a mean over the global batch's prompts, then
    AdamW -> (metrics, with the pairwise accuracy and margin over every C(K,2) pair; tokens read here)."""
    loss_sum, hits, margins, n_pairs, tokens = 0.0, 0.0, 0.0, 0.0, 0
    for micro in accumulate(model, groups, cfg.micro_batch_size):
        rewards = group_rewards(model, micro, pad_id, proc.device, cfg.rows_per_forward)  # [N, K]
        ranking = torch.tensor([g["ranking"] for g in micro], device=proc.device)  # [N, K]
        if cfg.data == "pairs":  # column 0 is the chosen answer, p = P(chosen is better)
            p = torch.tensor([g["p"] for g in micro], device=proc.device)
            loss = soft_bradley_terry_loss(rewards[:, 0], rewards[:, 1], p)
        elif cfg.loss == "kwise":
            loss = kwise_ranking_loss(rewards, ranking)
        elif cfg.loss == "best_of_k":
            loss = best_of_k_loss(rewards, ranking)
        else:
            loss = plackett_luce_loss(rewards, ranking)
        # the losses are means over this micro-batch's prompts: re-weight to a mean over the global batch
        loss = loss * len(micro) / cfg.batch_size
        global_backward(loss, proc)
        loss_sum += loss.item()
        h, m, n = pairwise_hits(rewards.detach(), ranked_above(ranking))
        hits, margins, n_pairs = hits + h, margins + m, n_pairs + n
        tokens += sum(len(ids) for g in micro for ids, _ in g["rows"])
    lr = lr_at(step - 1, max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr)
    grad_norm = optimizer_step(model, optimizer, lr, cfg.grad_clip, f"step {step}", {"loss": loss_sum}, proc.scaler)
    n_pairs = global_sum(n_pairs, proc)
    return {"loss": global_sum(loss_sum, proc), "rewards/accuracies": global_sum(hits, proc) / n_pairs,
            "rewards/margins": global_sum(margins, proc) / n_pairs, "lr": lr, "grad_norm": grad_norm}, tokens


def main(cfg: Config) -> dict:
    # 0. the config, checked before anything is written
    check_config(cfg, positive="epochs batch_size rows_per_forward lr adam_eps log_interval ckpt_interval n_norm "
                               "max_new_tokens temperature",
                 nonneg="micro_batch_size min_lr warmup_steps weight_decay grad_clip eval_interval",
                 choices={"data": ("prefs", "pairs"), "loss": ("kwise", "plackett_luce", "best_of_k")})
    cfg = replace(cfg, micro_batch_size=micro_batch(cfg.batch_size, cfg.micro_batch_size, world_size()))

    # 1. processes, seeds, data (the helpdesk world is generated on first use)
    proc = setup(cfg.seed, cfg.device, cfg.dtype, cfg.allow_slow_dtype)
    data_dir, out_dir = Path(cfg.data_dir), Path(cfg.out_dir)
    claim_out_dir(cfg, proc)  # one run per out_dir
    needed = cfg.pairs_file if cfg.data == "pairs" else "prefs.jsonl"
    ensure_world(data_dir, needed, cfg.seed, proc)
    train_file = data_dir / needed
    # a resumed run must be this run; the normalisation's samples come after training, so they may change
    run_inputs(cfg, proc, data=[train_file], may_change=("n_norm", "max_new_tokens", "temperature"))
    train = read_jsonl(train_file, cfg.data)
    if cfg.data == "pairs" and cfg.soft_labels:
        require_soft_labels(train)
    test = read_jsonl(data_dir / "prefs_test.jsonl", "prefs")

    # 2. the SFT trunk plus a new scalar head ~ N(0, 1/sqrt(D+1)) (N detail 8); without SFT init an RM
    # sits near chance (trlx #338). On resume, the trunk and head of out_dir's checkpoint
    model, tok = load_model(out_dir if cfg.resume else cfg.init_from, scalar_head=True,
                            kinds=("policy", "reward_model"))
    if proc.master:
        print(f"reward model: {model.num_params() / 1e6:.2f}M parameters from {cfg.init_from}")
    model = wrap_model(model, proc, cfg.compile, cfg.activation_checkpointing)

    # 3. records -> groups of K token rows; every error is raised here, before anything is written
    examples = [encode_group(tok, r, model.config.block_size) for r in train]
    test_groups = [encode_group(tok, r, model.config.block_size) for r in test]
    K = check_same_k(examples)
    check_same_k(test_groups)
    max_steps = cfg.epochs * (len(examples) // cfg.batch_size)  # derived, printed, never stored in cfg
    if max_steps == 0:
        raise SystemExit(f"{len(examples)} training records hold no full batch of --batch_size={cfg.batch_size}")
    if proc.master:
        print(f"{len(examples)} {cfg.data} records of K = {K} answers (K rows each), {max_steps} steps")

    # 4. optimizer. A ranking loss sees reward differences only, so some gradients are exactly zero in exact
    # arithmetic (head bias, final LayerNorm bias, key biases); eps 1e-5 keeps Adam from turning their rounding
    # noise into lr-sized steps, which made 1- and 2-process runs drift apart at eps 1e-8
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, eps=cfg.adam_eps)
    start = resume(out_dir, model, optimizer) if cfg.resume else 0  # moments, RNG and the step come back
    logger = Logger(out_dir, proc, max_steps, resume_step=start)

    # 5. train
    model.train()
    t_last, tokens_seen, metrics = time.time(), 0, {}
    for step in range(start + 1, max_steps + 1):
        rows = batch_indices(len(examples), cfg.batch_size, step - 1, cfg.seed)[proc.rank::proc.world]
        metrics, tokens = rm_step(model, optimizer, [examples[i] for i in rows], tok.pad_id, step, max_steps, cfg,
                                  proc)
        tokens_seen += tokens
        evaluate = cfg.eval_interval and step % cfg.eval_interval == 0
        if evaluate:  # every rank takes part in the sharded forwards; the logger writes rank 0's copy
            model.eval()
            with torch.no_grad():
                held = reward_model_metrics(model, test_groups, tok.pad_id, proc.device, cfg.rows_per_forward)
            model.train()
            metrics.update({"eval/loss": held["loss"], "eval/accuracy": held["accuracy"]})
        if step % cfg.log_interval == 0 or step == max_steps or evaluate:
            logger.log(step, metrics, tokens_seen * proc.world / (time.time() - t_last))
            t_last, tokens_seen = time.time(), 0
        if step % cfg.ckpt_interval == 0 and step < max_steps:  # the last one is written normalised, below
            save_resumable(out_dir, model, optimizer, tok, proc, cfg, step, metrics, kind="reward_model")

    # 6. rank 0, on a plain copy of the trained weights: normalise, evaluate, save
    model_state = full_state(model)
    result = {}
    if proc.master:
        rm = GPT(model.config)
        rm.load_state_dict(model_state)
        rm.to(proc.device, proc.dtype).eval()
        with torch.no_grad():
            # 6a. SFT samples on random training prompts (the policy PPO starts from) -> gain, bias with
            # gain * r + bias at mean 0, std 1 on exactly this sample (Ziegler §2; OAI-19 normalize_after)
            policy = load_model(cfg.init_from, tok, scalar_head=False)[0].to(proc.device, proc.dtype)
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.n_norm]
            prompts = [train[i]["prompt"] for i in order.tolist()]
            answers, batches = sample_answers(policy, tok, prompts, cfg.max_new_tokens, cfg.temperature,
                                              seed=cfg.seed)
            rows = [join(b, tok) for b in batches]  # the sampler's own tokens, as PPO scores them
            scores = torch.cat([reward_scores(rm, r.ids, r.attn) for r in rows])  # [n_norm]
            # PPO replaces the score of an answer without EOS by a penalty: only finished answers are scored
            finished = torch.cat([r.has_eos for r in rows])
            gain, bias = reward_normalisation(scores[finished] if finished.any() else scores)
            for p, a, r in list(zip(prompts, answers, (gain * scores + bias).tolist()))[:3]:
                print(f"\n> {p}\n{a}\n[normalised reward {r:+.2f}]")

            # 6b. held-out accuracy over all C(K,2) pairs of each ranking, against the noisy labels and gold
            result = reward_model_metrics(rm, test_groups, tok.pad_id, proc.device, cfg.rows_per_forward)
            result.update({"train_loss": metrics["loss"], "reward_norm": {"gain": gain, "bias": bias}})
        print("\neval:", {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()
                          if k != "reliability"})

        # 6c. the checkpoint carries the normalisation; consumers load it with load_reward_model
        meta = {"model": asdict(model.config), "kind": "reward_model", "run": asdict(cfg), "data_sha256": proc.data,
                "step": max_steps, "finished": True, "metrics": result, "reward_norm": {"gain": gain, "bias": bias}}
        write_checkpoint(out_dir, model_state, meta, tok)
        write_json(out_dir / "eval.json", result)
    teardown()
    return result


if __name__ == "__main__":
    main(parse_config(Config))
