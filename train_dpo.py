"""Direct preference optimisation: fit the policy to preference pairs without a reward model (Rafailov et al. 2023).

    python train_dpo.py                                   # helpdesk pairs, out/sft -> out/dpo
    python train_dpo.py --loss_type=ipo_sum --beta=0.5    # any loss of nanoalign.losses.PREFERENCE_LOSSES
    python train_dpo.py --loss_type=kto --feedback_file=feedback.jsonl    # KTO on unpaired thumbs up/down
    python train_dpo.py --loss_type=orpo                  # ORPO: SFT + odds-ratio term, no reference model
    python train_dpo.py --ref_cache=False                 # a live reference forward each step instead of the cache
    python train_dpo.py --eval_interval=100               # + gold and KL on held-out prompts every 100 steps
    python train_dpo.py --online=True --labeller=ai       # online DPO: fresh pairs each step, the feedback model picks
    torchrun --nproc_per_node=2 train_dpo.py --compile=True

The policy starts from --init_from and the frozen reference is the same checkpoint (a reference-free loss, SimPO or
ORPO, loads none: `nanoalign.losses.REFERENCE_FREE`). Reference log-probs are
computed once per distinct (prompt, answer), cached in cache_dir keyed by a hash of all they depend on (the
reference's weights and config, tokenizer, chat template, data, max_len, device type and the log-prob code:
`reference_cache`), and the reference model is dropped while training. At the end the policy
and the SFT reference answer the same held-out prompts with the same seed: eval.json holds gold, failures, KL
to the reference and win rate next to sft_gold and sft_failures; --eval_interval adds points of the gold-vs-KL
curve on the same prompts during training (`evaluate.curve_point`, as DPO §6.1 evaluates every 100 steps).

Online DPO (--online=True; Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", §3,
Algorithm 1): no pairs file. Each step the current policy answers each of --batch_size training prompts
(data_dir/prompts.jsonl) twice, the labeller (--labeller: the feedback model --judge, a reward model
--reward_model, or the gold judge) prefers one answer, and the DPO step takes those pairs; the loss is unchanged,
the reference stays the --init_from model, forwarded live (the pairs are new every step, so there is nothing to
cache). Pairs of equal or empty answers cost no label; ties are skipped (`nanoalign.online`). --label_budget stops
the run once that many labels are used; the log has the labels used so far, the labeller's agreement with the
gold judge on the same pairs, and the seconds spent sampling, labelling and training.

Departures from the paper (DPO App. B: RMSprop, lr 1e-6, 150 warmup steps, batch 64, β 0.1): AdamW, lr 2e-4
with 10% warmup and cosine decay: the paper's rate is for multi-billion-parameter pretrained LMs, and this 1M-
parameter toy must move within minutes: on the helpdesk pairs half that rate leaves some disparaging and canned
answers in place, three times it drifts far from the reference and loses honesty. 200 steps, a quarter of an epoch
of batches of 32 pairs: the policy stays in the answers' language, while more steps drift out of it, which the
gold judge counts against every answer (the measured gold and KL: docs/results.md, "The stages"). β 0.1, summed
log-probs and the SFT model as reference are the paper's.
"""

import inspect
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from nanoalign.checkpoint import cached_tensors, content_hash, load_model, read_meta
from nanoalign.config import check_config, parse_config
from nanoalign.data import (batch_indices, check_batch, check_prompts, encode_preferences, read_jsonl,
                            require_soft_labels)
from nanoalign.evaluate import check_eval_prompts, curve_point_due, finish
from nanoalign.logger import Logger
from nanoalign.online import LABELLERS, gold_agreement, load_labeller, preferred, two_answers
from nanoalign.rlaif import judge_finished
from nanoalign.losses import (PER_ANSWER, PREFERENCE_LOSSES, REFERENCE_FREE, Answers, LossParams, kto_reference_point,
                              preference_loss)
from nanoalign.sampling import logps_code_version, summed_logps
from nanoalign.scaffold import (accumulate, claim_out_dir, global_backward, global_sum, lr_at,
                                make_optimizer, micro_batch, optimizer_step, resume, run_inputs, save_resumable, setup,
                                teardown, world_size, wrap_model)
from nanoalign.tokenizer import render_prompt


@dataclass
class Config:
    data_dir: str = "data"  # pairs_file for training, sft_test.jsonl for the held-out evaluation prompts
    pairs_file: str = "pairs.jsonl"  # in data_dir: {"prompt","chosen","rejected","p"?} or Anthropic-HH lines
    feedback_file: str = ""  # in data_dir, instead of pairs_file: {"prompt","answer","label"} thumbs up/down (kto only)
    out_dir: str = "out/dpo"  # checkpoint, log.jsonl and eval.json go here
    init_from: str = "out/sft"  # nanoalign or local HF GPT-2 dir; gives the policy and the frozen reference
    resume: bool = False  # continue from out_dir's checkpoint (optimizer, RNG, data position)
    cache_dir: str = "out/cache"  # reference log-probs, one safetensors file per content hash
    ref_cache: bool = True  # False = a live reference forward every step (reference kept in memory)
    max_len: int | None = None  # tokens per prompt + answer; None = the model's block_size
    beta: float = 0.1  # pull toward the reference (DPO Eq. 7); smaller drifts further. SimPO wants ~2; ORPO's λ
    loss_type: str = "sigmoid"  # sigmoid | robust | hinge | ipo | ipo_sum | simpo | kto | orpo (PREFERENCE_LOSSES)
    label_smoothing: float = 0.0  # cDPO / robust ε, the assumed label-flip rate; a pair's "p" overrides (ε = 1-p)
    soft_labels: bool = False  # every pair must carry "p" (AI feedback labels, nanoalign.rlaif)
    simpo_gamma: float = 1.0  # SimPO target margin γ (simpo only)
    rpo_alpha: float = 0.0  # weight of the NLL on the chosen answer (RPO); 0 = off
    kto_lambda_d: float = 1.0  # KTO's weight λ_D of desirable answers (kto only)
    kto_lambda_u: float = 1.0  # KTO's weight λ_U of undesirable answers (kto only)
    batch_size: int = 32  # pairs (or feedback records) per optimizer step (global, over ranks and micro-batches)
    micro_batch_size: int = 0  # pairs (records) per backward per process (0 = the process's whole share of the batch)
    rows_per_forward: int = 16  # rows per forward, length-sorted in a micro-batch (speed; FSDP gathers per forward)
    max_steps: int = 200  # optimizer steps (0.27 epochs of the helpdesk pairs)
    lr: float = 2e-4  # peak AdamW learning rate
    min_lr: float = 1e-5  # end of the cosine
    warmup_steps: int = 20  # linear warmup (10%)
    weight_decay: float = 0.0  # on matrices only; off, so only the preferences pull the weights
    grad_clip: float = 1.0  # global grad-norm clip (0 = off)
    log_interval: int = 25  # steps between progress lines (metrics averaged over them)
    ckpt_interval: int = 100  # steps between checkpoints (also at the end)
    n_eval: int = 200  # held-out prompts answered by policy and reference for eval.json (0 = skip)
    eval_interval: int = 0  # steps between gold and KL on those prompts, eval/gold, eval/kl in log.jsonl (0 = none)
    max_new_tokens: int = 96  # answer length limit when sampling
    temperature: float = 1.0  # sampling temperature for eval and KL (0 = greedy)
    compile: bool = False  # torch.compile each transformer block
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    fused_head: bool = False  # LM head + log-probs in row chunks, logits recomputed in backward (less memory, GPU)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "fp32"  # fp32 | bf16 (weights and AdamW moments) | fp16 (CUDA, loss scaling): nanoalign.precision
    allow_slow_dtype: bool = False  # run --dtype=bf16 on a CPU that only emulates it (tens of times slower)
    seed: int = 1234  # data order and evaluation sampling (policy and reference alike)
    online: bool = False  # sample the pairs from the current policy every step, labelled by --labeller (no pairs file)
    labeller: str = "ai"  # online: ai (the feedback model, --judge) | rm (--reward_model) | gold (the gold judge)
    judge: str = "out/judge"  # online, --labeller=ai: the feedback model (python -m nanoalign.rlaif trains it)
    reward_model: str = "out/rm"  # online, --labeller=rm: a reward model from train_rm.py
    label_budget: int = 0  # online: stop once this many labels are used (0 = none: --max_steps decides)
    sample_max_new_tokens: int = 64  # online: answer length limit when sampling the pairs (PPO's rollout length)


@torch.no_grad()
def sequence_logps(model, seqs: list, pad_id: int, device) -> torch.Tensor:
    """S(y|x) of every (ids, n_prompt) sequence under the frozen reference -> [N] fp32 on the CPU, computed once
    for the cache, 64 length-sorted rows per forward."""
    return summed_logps(model, seqs, pad_id, device, rows_per_forward=64).cpu()


def reference_cache(cache_dir, reference, tok, seqs: list, max_len: int, device_type: str) -> Path:
    """The reference log-probs' cache file, named by a hash of everything they depend on: the reference's weights
    (with their dtype) and its whole config (heads, LayerNorm epsilon: settings outside the weights), the
    tokenizer, the chat template's code, the token sequences (the data), max_len, the device type and the code of
    the log-prob path (`sampling.logps_code_version`). Any of them changed, a new file is computed."""
    template = inspect.getsource(sys.modules[render_prompt.__module__])  # render_prompt, encode_prompt, ...
    key = content_hash(reference.state_dict(), json.dumps(asdict(reference.config), sort_keys=True), tok.hash,
                       template, repr(seqs), max_len, device_type, logps_code_version())
    return Path(cache_dir) / f"ref_logps-{key}.safetensors"


def loss_params(cfg: Config) -> LossParams:
    """The loss flags, as the preference losses read them."""
    return LossParams(cfg.beta, cfg.simpo_gamma, cfg.kto_lambda_d, cfg.kto_lambda_u, cfg.rpo_alpha)


def answer_rows(per_record: list[tuple], records: list[int]) -> list:
    """The records' answers, first answers of all then second answers of all: a batch of pairs' chosen rows, then
    their rejected rows, as `nanoalign.losses.Answers` holds them."""
    return [per_record[k][j] for j in range(len(per_record[0])) for k in records]


def dpo_step(model, reference, ref_logps, optimizer, data: tuple, rows: list, step: int, cfg: Config,
             proc) -> tuple[dict, int]:
    """One optimizer step on this rank's `rows` (record indices): per micro-batch, the records' answers (a pair's
    chosen and rejected together: the DPO authors concatenate them into one forward) go through the model
    length-sorted into forwards of --rows_per_forward rows, so that little is padding; the loss
    (`nanoalign.losses.preference_loss`) summed over its terms / the global batch's terms, then AdamW. KTO first
    measures its reference point z₀ on the whole global batch. data = (prefs, smoothing, pad_id) from main;
    ref_logps [N sequences] when cached, else None and the reference runs live (or not at all, for a
    reference-free loss) -> (metrics, means over the global batch; tokens read here)."""
    prefs, smoothing, pad_id = data
    params, paired = loss_params(cfg), len(prefs.rows[0]) == 2

    def forward(net, answers: list):
        return summed_logps(net, [prefs.seqs[i] for i in answers], pad_id, proc.device, cfg.rows_per_forward)

    def reference_logps(answers: list):
        if cfg.loss_type in REFERENCE_FREE:
            return None
        if ref_logps is not None:
            return ref_logps[answers]
        with torch.no_grad():
            return forward(reference, answers)

    kl, tokens = 0.0, 0
    if cfg.loss_type in PER_ANSWER:  # KTO's z₀: every answer's prompt with another answer, over all ranks' batch
        mismatched = answer_rows(prefs.mismatched, rows)
        with torch.no_grad():
            kl = kto_reference_point(forward(model, mismatched), reference_logps(mismatched),
                                     lambda t: global_sum(t, proc))
        tokens += sum(len(prefs.seqs[i][0]) for i in mismatched)
    terms = cfg.batch_size * (len(prefs.rows[0]) if cfg.loss_type in PER_ANSWER else 1)  # the global batch's
    sums = {}
    for micro in accumulate(model, rows, cfg.micro_batch_size):
        answers = answer_rows(prefs.rows, micro)  # pairs: chosen then rejected, forwarded length-sorted
        logps = forward(model, answers)  # [N]
        lengths = torch.tensor([float(len(prefs.seqs[i][0]) - prefs.seqs[i][1]) for i in answers],
                               device=proc.device)  # for ipo, simpo, orpo, rpo
        desirable = torch.tensor(answer_rows(prefs.desirable, micro), device=proc.device)
        batch = Answers(logps, reference_logps(answers), lengths, desirable, smoothing[micro], kl)
        losses, rewards = preference_loss(cfg.loss_type, batch, params)
        global_backward(losses.sum() / terms, proc)  # summed over terms / the global batch's terms
        if paired:
            chosen_rewards, rejected_rewards = Answers.halves(rewards)
            policy_chosen, policy_rejected = Answers.halves(logps.detach())
            stats = {"loss": losses.detach(), "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                     "rewards/margins": chosen_rewards - rejected_rewards, "rewards/chosen": chosen_rewards,
                     "rewards/rejected": rejected_rewards, "logps/chosen": policy_chosen,
                     "logps/rejected": policy_rejected}
        else:  # thumbs up/down: the mean reward of each kind, from sums and counts
            stats = {"loss": losses.detach(), "rewards/desirable": torch.where(desirable, rewards, 0.0),
                     "rewards/undesirable": torch.where(desirable, 0.0, rewards), "desirable": desirable.float()}
        sums = {name: sums.get(name, 0.0) + v.sum().item() for name, v in stats.items()}
        tokens += sum(len(prefs.seqs[i][0]) for i in answers)
    lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr)
    grad_norm = optimizer_step(model, optimizer, lr, cfg.grad_clip, f"step {step + 1}", {"loss": sums["loss"]},
                               proc.scaler)
    metrics = {name: global_sum(v, proc) / (terms if name == "loss" else cfg.batch_size) for name, v in sums.items()}
    if not paired:
        share = metrics.pop("desirable")  # of the global batch's answers
        metrics["rewards/desirable"] /= max(share, 1 / cfg.batch_size)
        metrics["rewards/undesirable"] /= max(1 - share, 1 / cfg.batch_size)
    if cfg.loss_type in PER_ANSWER:
        metrics["kl"] = float(kl)
    return {**metrics, "lr": lr, "grad_norm": grad_norm}, tokens


def online_step(model, reference, label, prompts: list, optimizer, tok, max_len: int, step: int, cfg: Config,
                proc, budget_left: float) -> tuple[dict, int, tuple]:
    """Online DPO, one step (Guo et al. 2024, Algorithm 1): the step's prompts answered twice by the current
    policy, the labeller's preference, the DPO step on the pairs it prefers (chosen: the preferred answer; ties
    skipped), the reference live. At most budget_left pairs are labelled -> (metrics, tokens the DPO step read,
    (pairs agreeing with gold, pairs whose gold differs))."""
    t0 = time.time()
    batch = [prompts[i] for i in batch_indices(len(prompts), cfg.batch_size, step, cfg.seed)]
    pairs, sampled = two_answers(model, tok, batch, cfg.sample_max_new_tokens, cfg.temperature, cfg.seed + 1 + step)
    pairs = pairs[:int(min(budget_left, len(pairs)))]
    t_sample = time.time()
    p = label(pairs, step)  # P(y1 ≻ y2)
    records = preferred(pairs, p)
    t_label = time.time()
    metrics, tokens = {}, 0
    if records:  # the loss is a mean over the pairs kept: --batch_size's place in dpo_step
        prefs = encode_preferences(tok, records, max_len)
        smoothing = torch.full((len(records),), cfg.label_smoothing, device=proc.device)
        metrics, tokens = dpo_step(model, reference, None, optimizer, (prefs, smoothing, tok.pad_id),
                                   list(range(len(records))), step, replace(cfg, batch_size=len(records)), proc)
    t_train = time.time()
    metrics.update({"pairs/labelled": len(pairs), "pairs/trained": len(records), "time/sample": t_sample - t0,
                    "time/label": t_label - t_sample, "time/train": t_train - t_label,
                    "sample/tokens_per_s": sampled / max(t_sample - t0, 1e-9)})
    return metrics, tokens, gold_agreement(pairs, p)


def check_online(cfg: Config) -> None:
    """--online=True's flags, checked before anything is written: one process, a paired loss, no data file of
    labels, and the labeller's checkpoint present."""
    if cfg.loss_type in PER_ANSWER or cfg.feedback_file:
        flags = f"--loss_type={cfg.loss_type}" + (f" --feedback_file={cfg.feedback_file}" if cfg.feedback_file else "")
        paired = ", ".join(name for name in PREFERENCE_LOSSES if name not in PER_ANSWER)
        raise SystemExit(f"--online=True labels pairs of sampled answers; {flags} trains on labelled single "
                         f"answers: use a paired loss ({paired})")
    if cfg.soft_labels:
        raise SystemExit("--soft_labels=True: online pairs carry the labeller's pick, no \"p\" from a pairs file")
    if world_size() > 1:
        raise SystemExit("--online=True runs in one process (its sampling and labelling are not split over ranks)")
    if cfg.labeller == "ai" and not judge_finished(cfg.judge):
        raise SystemExit(f"--judge={cfg.judge}: no finished feedback model there; python -m nanoalign.rlaif trains "
                         f"one (or --labeller=rm|gold)")
    if cfg.labeller == "rm" and not (Path(cfg.reward_model) / "config.json").exists():
        raise SystemExit(f"--reward_model={cfg.reward_model}: no reward model there; python train_rm.py trains one "
                         f"(or --labeller=ai|gold)")


def check_online_prompts(tok, records: list, cfg: Config, max_len: int) -> None:
    """The training prompts of an online run, checked at start: enough for a batch, and each with room for an
    answer of --sample_max_new_tokens (the pair then fits the DPO step's max_len uncut)."""
    check_batch(len(records), cfg.batch_size)  # prompts per step
    check_prompts(tok, records, max_len)
    longest = max(records, key=lambda r: len(tok.encode_prompt(r["prompt"])))
    n = len(tok.encode_prompt(longest["prompt"]))
    if n + cfg.sample_max_new_tokens > max_len:
        raise SystemExit(f"--sample_max_new_tokens={cfg.sample_max_new_tokens}: {longest['where']} has a prompt of {n} "
                         f"tokens, which leaves {max_len - n} for an answer within max_len {max_len}")


def main(cfg: Config) -> dict:
    # 0. the config, checked before anything is written
    check_config(cfg, positive="beta batch_size rows_per_forward max_steps lr log_interval ckpt_interval max_len",
                 nonneg="micro_batch_size min_lr warmup_steps weight_decay grad_clip n_eval eval_interval "
                        "max_new_tokens temperature label_smoothing simpo_gamma rpo_alpha kto_lambda_d kto_lambda_u "
                        "label_budget sample_max_new_tokens",
                 choices={"loss_type": tuple(PREFERENCE_LOSSES), "labeller": LABELLERS})
    if cfg.online:
        check_online(cfg)
    if cfg.eval_interval and not cfg.n_eval:
        raise SystemExit(f"--eval_interval={cfg.eval_interval} needs held-out prompts to answer: --n_eval > 0")
    if cfg.feedback_file and cfg.loss_type not in PER_ANSWER:
        raise SystemExit(f"--feedback_file={cfg.feedback_file}: unpaired thumbs up/down trains a loss of labelled "
                         f"answers ({', '.join(PER_ANSWER)}); --loss_type={cfg.loss_type} compares pairs")
    if cfg.rpo_alpha and cfg.loss_type in PER_ANSWER:
        raise SystemExit(f"--rpo_alpha={cfg.rpo_alpha}: RPO adds an NLL to each pair's loss; --loss_type="
                         f"{cfg.loss_type} has one term per answer")
    if not cfg.label_smoothing < 0.5:
        raise SystemExit(f"--label_smoothing={cfg.label_smoothing}: the assumed label-flip rate must be below 0.5")
    cfg = replace(cfg, micro_batch_size=micro_batch(cfg.batch_size, cfg.micro_batch_size, world_size()))

    # 1. processes, seeds, preference pairs (or thumbs up/down; online: the training prompts)
    proc = setup(cfg.seed, cfg.device, cfg.dtype, cfg.allow_slow_dtype)
    data_dir, out_dir = Path(cfg.data_dir), Path(cfg.out_dir)
    claim_out_dir(cfg, proc)  # one run per out_dir
    data_path = data_dir / ("prompts.jsonl" if cfg.online else cfg.feedback_file or cfg.pairs_file)
    # a resumed run must be this run; the evaluation's sampling flags only shape the evaluation, so they may
    # change (online, --temperature also samples the pairs: it must not)
    run_inputs(cfg, proc, data=[data_path], may_change=("max_new_tokens",) + ((), ("temperature",))[not cfg.online])
    if cfg.online:
        records = read_jsonl(data_path, "prompts")
        prompts = [r["prompt"] for r in records]
    elif cfg.feedback_file:
        records = read_jsonl(data_path, "feedback")
    else:
        records = read_jsonl(data_path)  # schema detected: pairs, or HH text read as pairs
        if "chosen" not in records[0]:
            raise ValueError(f"{records[0]['where']}: expected preference pairs (prompt, chosen, rejected) or HH text")
    if cfg.soft_labels:
        require_soft_labels(records)

    # 2. policy from --init_from (or out_dir on resume); the reference is the --init_from model, frozen. A
    #    reference-free loss loads it only to measure the KL of --eval_interval's curve points
    model, tok = load_model(out_dir if cfg.resume else cfg.init_from)
    step = 0  # set by resume() below
    uses_reference = cfg.loss_type not in REFERENCE_FREE
    reference = None
    if uses_reference or cfg.eval_interval:
        reference = load_model(cfg.init_from, tok)[0].to(proc.device, proc.dtype).eval().requires_grad_(False)
    if cfg.max_len is not None and cfg.max_len > model.config.block_size:
        raise SystemExit(f"--max_len={cfg.max_len}: longer than the context of {cfg.init_from} "
                         f"({model.config.block_size} tokens); use at most {model.config.block_size}, or None for it")
    max_len = cfg.max_len or model.config.block_size
    if proc.master:
        print(f"model: {model.num_params() / 1e6:.2f}M parameters; max_len {max_len}"
              + (" (inherited)" if cfg.max_len is None else ""))
    if cfg.online:
        check_online_prompts(tok, records, cfg, max_len)
        check_eval_prompts(tok, data_dir, cfg.n_eval, model.config.block_size)
        label = load_labeller(cfg.labeller, cfg.judge if cfg.labeller == "ai" else cfg.reward_model, tok,
                              proc.device, proc.dtype, cfg.seed, max_len)
    model = wrap_model(model, proc, cfg.compile, cfg.activation_checkpointing, cfg.fused_head)

    # 3. records -> distinct token sequences; each pair points at its chosen and its rejected row, each feedback
    #    record at its answer's; KTO adds each answer's prompt with another answer, for its reference point
    #    (online: the pairs are sampled and encoded each step, `online_step`)
    prefs = smoothing = ref_logps = None
    if not cfg.online:
        prefs = encode_preferences(tok, records, max_len, cfg.seed if cfg.loss_type in PER_ANSWER else None,
                                   feedback=bool(cfg.feedback_file))
        check_batch(len(records), cfg.batch_size)
        check_eval_prompts(tok, data_dir, cfg.n_eval, model.config.block_size)
        # cDPO soft labels: a pair's own "p" (AI feedback) or the global label_smoothing
        smoothing = torch.tensor([1 - r.get("p", 1 - cfg.label_smoothing) for r in records], device=proc.device)
        if proc.master:
            print(f"{len(records)} {'feedback records' if cfg.feedback_file else 'pairs'}, {len(prefs.seqs)} "
                  f"distinct sequences, {cfg.max_steps * cfg.batch_size / len(records):.2f} epochs")

    # 4. reference log-probs: computed once, cached on disk, then the reference leaves memory (online: live)
    if cfg.ref_cache and uses_reference and not cfg.online:
        seqs = prefs.seqs
        cache = reference_cache(cfg.cache_dir, reference, tok, seqs, max_len, proc.device.type)
        t0, hit = time.time(), cache.exists()
        if not proc.master and proc.world > 1:
            torch.distributed.barrier()  # rank 0 computes and writes first; the others then read its file
        ref_logps = cached_tensors(cache, lambda: {"logps": sequence_logps(reference, seqs, tok.pad_id, proc.device)})
        ref_logps = ref_logps["logps"].to(proc.device)  # [N sequences], fp32, as the policy's log-probs
        if proc.master and proc.world > 1:
            torch.distributed.barrier()
        if proc.master:
            print(f"reference log-probs {'read from' if hit else 'computed into'} {cache} in {time.time() - t0:.0f}s")
        if not cfg.eval_interval:
            reference = None  # the reference leaves memory (the gold-vs-KL points measure against it)

    # 5. optimizer; on resume its moments, the RNG state and (online) the labels used come back
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    window = []  # the metrics of the steps since the last log line, averaged into the next one
    labels = {"used": 0, "agree": 0.0, "compared": 0}  # online: labels so far; agreement with gold on their pairs
    if cfg.resume:
        step = resume(out_dir, model, optimizer)
        window = read_meta(out_dir).get("log_window", [])
        labels = read_meta(out_dir).get("labels", labels)
    logger = Logger(out_dir, proc, cfg.max_steps, resume_step=step)

    # 6. train
    model.train()
    data = (prefs, smoothing, tok.pad_id)
    budget = cfg.label_budget or float("inf")
    t_last, tokens_seen, metrics = time.time(), 0, {}
    done = step >= cfg.max_steps or labels["used"] >= budget
    while not done:
        if cfg.online:  # sample two answers per prompt from the current policy, label them, a DPO step on them
            metrics, tokens, (agree, compared) = online_step(model, reference, label, prompts, optimizer, tok,
                                                             max_len, step, cfg, proc, budget - labels["used"])
            labels = {"used": labels["used"] + metrics["pairs/labelled"], "agree": labels["agree"] + agree,
                      "compared": labels["compared"] + compared}
        else:
            rows = batch_indices(len(records), cfg.batch_size, step, cfg.seed)[proc.rank::proc.world]
            metrics, tokens = dpo_step(model, reference, ref_logps, optimizer, data, rows, step, cfg, proc)
        tokens_seen += tokens
        step += 1
        done = step == cfg.max_steps or labels["used"] >= budget
        window.append(metrics)  # one pair batch is noisy: log the means over the interval
        point, t_eval = curve_point_due(step, cfg.eval_interval, cfg.max_steps, model, reference, tok, data_dir,
                                        cfg.n_eval, cfg.max_new_tokens, cfg.temperature, cfg.seed)
        t_last += t_eval  # the throughput counts training time (online: with sampling and labelling) only
        if step % cfg.log_interval == 0 or done or point:
            names = dict.fromkeys(name for m in window for name in m)  # an online step with only ties has no loss
            means = {name: sum(m[name] for m in window if name in m) / sum(name in m for m in window)
                     for name in names}
            if cfg.online:  # totals so far, not means over the interval
                means.update({"labels": labels["used"], "labels/gold_agreement":
                              labels["agree"] / labels["compared"] if labels["compared"] else None})
            logger.log(step, {**means, **point}, tokens_seen * proc.world / (time.time() - t_last))
            t_last, tokens_seen, window = time.time(), 0, []
        if step % cfg.ckpt_interval == 0 or done:  # with the window of steps not yet logged
            save_resumable(out_dir, model, optimizer, tok, proc, cfg, step, metrics,
                           {"log_window": window, **({"labels": labels} if cfg.online else {})}, finished=done)

    # 7. evaluate policy and SFT reference (read back from --init_from) on the same held-out prompts and seed:
    #    gold, failures, KL, win rate
    result = finish(model, tok, proc, out_dir, data_dir, cfg.n_eval, cfg.max_new_tokens, cfg.temperature, cfg.seed,
                    reference=cfg.init_from, result={"train_loss": metrics.get("loss")})
    teardown()
    return result


if __name__ == "__main__":
    main(parse_config(Config))
