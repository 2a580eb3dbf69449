"""Supervised fine-tuning: imitate the demonstrations, loss on response tokens only (step 1 of RLHF).

    python train_sft.py                                    # helpdesk world, tiny GPT from scratch -> out/sft
    python train_sft.py --init_from=path/to/gpt2           # a local HF GPT-2 directory (tokenizer.json beside it)
    python train_sft.py --init_from=out/sft --data_dir=d --eval_interval=50   # fine-tune; gold and KL to out/sft
    torchrun --nproc_per_node=2 train_sft.py --compile=True

With no --init_from it generates the helpdesk world into data/ if missing, trains a BPE tokenizer on it and a
small GPT from scratch (pretraining-like), saves out/sft, prints sampled answers and writes
out/sft/eval.json. SFT imitates: the demonstrations' failures come back at about their rates. When fine-tuning from
--init_from (Preferred-FT: SFT on preferred answers, DPO §6.1), --eval_interval logs gold and the KL to the
--init_from model on the held-out prompts during training (`evaluate.curve_point`), and eval.json then compares
the result with that model as train_dpo.py's does (KL, win rate, its own gold on the same prompts).
"""

import time
from dataclasses import dataclass, replace
from pathlib import Path


from nanoalign.checkpoint import load_model
from nanoalign.config import check_config, parse_config
from nanoalign.data import batch_indices, check_batch, collate, encode_example, read_jsonl
from nanoalign.evaluate import check_eval_prompts, curve_point_due, finish
from nanoalign.logger import Logger
from nanoalign.losses import sft_loss
from nanoalign.model import GPT, GPTConfig
from nanoalign.sampling import model_logps
from nanoalign.scaffold import (accumulate, claim_out_dir, global_backward, global_sum, lr_at,
                                make_optimizer, micro_batch, optimizer_step, resume, run_inputs, save_resumable, setup,
                                teardown, world_size, wrap_model)
from nanoalign.tokenizer import Tokenizer
from nanoalign.world.files import ensure_world


@dataclass
class Config:
    data_dir: str = "data"  # helpdesk world (generated if missing) or your own sft.jsonl / sft_test.jsonl
    out_dir: str = "out/sft"  # checkpoint, log.jsonl and eval.json go here
    init_from: str = ""  # "" = new tokenizer + model; else a nanoalign or local HF GPT-2 directory
    resume: bool = False  # continue from out_dir's checkpoint (optimizer, RNG, data position)
    vocab_size: int = 1024  # BPE vocabulary when training a tokenizer
    n_layer: int = 4  # new model only
    n_head: int = 4  # new model only
    n_embd: int = 128  # new model only
    block_size: int = 160  # context length in tokens, new model only
    batch_size: int = 32  # sequences per optimizer step (global, over ranks and micro-batches)
    micro_batch_size: int = 0  # sequences per forward per process (0 = the process's whole share of the batch)
    max_steps: int = 1200  # optimizer steps
    lr: float = 2e-3  # peak AdamW learning rate
    min_lr: float = 1e-4  # end of the cosine
    warmup_steps: int = 50  # linear warmup
    weight_decay: float = 0.1  # on matrices only
    prompt_loss_weight: float = 0.0  # weight of each prompt token's loss against a response token's (0 = off)
    grad_clip: float = 1.0  # global grad-norm clip (0 = off)
    log_interval: int = 25  # steps between progress lines
    ckpt_interval: int = 400  # steps between checkpoints (also at the end)
    n_eval: int = 200  # held-out prompts answered for eval.json (0 = skip)
    eval_interval: int = 0  # steps between gold and KL to --init_from on those prompts, eval/gold, eval/kl (0 = none)
    max_new_tokens: int = 96  # answer length limit when sampling
    temperature: float = 1.0  # sampling temperature for eval (0 = greedy)
    compile: bool = False  # torch.compile each transformer block
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    fused_head: bool = False  # LM head + log-probs in row chunks, logits recomputed in backward (less memory, GPU)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "fp32"  # fp32 | bf16 (weights and AdamW moments) | fp16 (CUDA, loss scaling): nanoalign.precision
    allow_slow_dtype: bool = False  # run --dtype=bf16 on a CPU that only emulates it (tens of times slower)
    seed: int = 1234  # model init and data order; sampling uses seed + 100003 * rank


def sft_step(model, optimizer, examples: list, pad_id: int, step: int, cfg: Config, proc) -> tuple[dict, int]:
    """One optimizer step on this rank's (ids, n_prompt) examples: the gradient of the mean loss over the global
    batch's response tokens (and prompt tokens, weighted by --prompt_loss_weight), accumulated over
    micro-batches, then AdamW at the step's learning rate -> (metrics, tokens read here)."""
    w = cfg.prompt_loss_weight  # each prompt token but the first is predicted, from the tokens before it
    n_tokens = global_sum(sum(len(ids) - n_prompt + w * (n_prompt - 1) for ids, n_prompt in examples), proc)
    loss_sum, tokens = 0.0, 0
    for micro in accumulate(model, examples, cfg.micro_batch_size):
        batch = {key: v.to(proc.device) for key, v in collate(micro, pad_id).items()}
        if w > 0:  # the loss mask becomes a weight per token: 1 on the response, w on the prompt
            batch["loss_mask"] = batch["loss_mask"] + w * (batch["attention_mask"] - batch["loss_mask"])
        logps = model_logps(model, **batch)  # [B, T-1], zero where the weight is
        loss = sft_loss(logps, batch["loss_mask"][:, 1:], n_tokens)  # this micro-batch's share of the global mean
        global_backward(loss, proc)
        loss_sum += loss.item()
        tokens += batch["attention_mask"].sum().item()
    lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr)
    grad_norm = optimizer_step(model, optimizer, lr, cfg.grad_clip, f"step {step + 1}", {"loss": loss_sum},
                               proc.scaler)
    return {"loss": global_sum(loss_sum, proc), "lr": lr, "grad_norm": grad_norm}, tokens


def main(cfg: Config) -> dict:
    # 0. the config, checked before anything is written
    check_config(cfg, positive="vocab_size n_layer n_head n_embd block_size batch_size max_steps lr log_interval "
                               "ckpt_interval", nonneg="micro_batch_size min_lr warmup_steps weight_decay "
                                                     "prompt_loss_weight grad_clip n_eval eval_interval max_new_tokens "
                                                     "temperature")
    if cfg.eval_interval and not (cfg.n_eval and cfg.init_from):
        raise SystemExit(f"--eval_interval={cfg.eval_interval} needs held-out prompts (--n_eval > 0) and a model "
                         f"to measure the KL against (--init_from)")
    if cfg.n_embd % cfg.n_head:
        raise SystemExit(f"--n_embd={cfg.n_embd} must be a multiple of --n_head={cfg.n_head}")
    cfg = replace(cfg, micro_batch_size=micro_batch(cfg.batch_size, cfg.micro_batch_size, world_size()))

    # 1. processes, seeds, data (the helpdesk world is generated on first use)
    proc = setup(cfg.seed, cfg.device, cfg.dtype, cfg.allow_slow_dtype)
    data_dir, out_dir = Path(cfg.data_dir), Path(cfg.out_dir)
    claim_out_dir(cfg, proc)  # one run per out_dir
    ensure_world(data_dir, "sft.jsonl", cfg.seed, proc)
    # a resumed run must be this run; the sampling flags only shape the evaluation, so they may change
    run_inputs(cfg, proc, data=[data_dir / "sft.jsonl"], may_change=("max_new_tokens", "temperature"))
    train = read_jsonl(data_dir / "sft.jsonl", "sft")

    # 2. tokenizer and model: resumed, chained from --init_from, or new
    step = 0
    if cfg.resume:
        model, tok = load_model(out_dir)
    elif cfg.init_from:
        model, tok = load_model(cfg.init_from)
    else:
        tok = Tokenizer.train((t for r in train for t in (r["prompt"], r["completion"])), cfg.vocab_size)
        model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=len(tok), n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd))
    if proc.master:
        print(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config}")
    # the gold-vs-KL points measure the KL against the model fine-tuning started from
    reference = load_model(cfg.init_from, tok)[0].to(proc.device, proc.dtype).eval() if cfg.eval_interval else None
    model = wrap_model(model, proc, cfg.compile, cfg.activation_checkpointing, cfg.fused_head)

    # 3. demonstrations -> token ids; loss on the response tokens (+ EOS) only
    examples = [encode_example(tok, r["prompt"], r["completion"], model.config.block_size, r["where"]) for r in train]
    check_batch(len(examples), cfg.batch_size)
    check_eval_prompts(tok, data_dir, cfg.n_eval, model.config.block_size)

    # 4. optimizer; on resume its moments and the RNG state come back
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    if cfg.resume:
        step = resume(out_dir, model, optimizer)
    logger = Logger(out_dir, proc, cfg.max_steps, resume_step=step)

    # 5. train
    model.train()
    t_last, tokens_seen, metrics = time.time(), 0, {}
    while step < cfg.max_steps:
        rows = batch_indices(len(examples), cfg.batch_size, step, cfg.seed)[proc.rank::proc.world]
        metrics, tokens = sft_step(model, optimizer, [examples[i] for i in rows], tok.pad_id, step, cfg, proc)
        tokens_seen += tokens
        step += 1
        point, t_eval = curve_point_due(step, cfg.eval_interval, cfg.max_steps, model, reference, tok, data_dir,
                                        cfg.n_eval, cfg.max_new_tokens, cfg.temperature, cfg.seed)
        t_last += t_eval  # the throughput counts training time only
        if step % cfg.log_interval == 0 or step == cfg.max_steps or point:
            logger.log(step, {**metrics, **point}, tokens_seen * proc.world / (time.time() - t_last))
            t_last, tokens_seen = time.time(), 0
        if step % cfg.ckpt_interval == 0 or step == cfg.max_steps:
            save_resumable(out_dir, model, optimizer, tok, proc, cfg, step, metrics, finished=step == cfg.max_steps)

    # 6. evaluate on held-out prompts with the gold judge (against the --init_from model with --eval_interval);
    #    print a few answers
    result = finish(model, tok, proc, out_dir, data_dir, cfg.n_eval, cfg.max_new_tokens, cfg.temperature, cfg.seed,
                    reference=reference, summary=("gold", "demo_gold", "failures"),
                    result={"train_loss": metrics.get("loss")})
    teardown()
    return result


if __name__ == "__main__":
    main(parse_config(Config))
