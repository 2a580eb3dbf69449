"""RLAIF: preference labels from an AI feedback model that reads a constitution (Bai et al. 2022, Constitutional
AI §4.1-4.3; Lee et al. 2023, RLAIF), written in the pairs format that train_rm.py and train_dpo.py read.

    python -m nanoalign.rlaif                                   # after train_sft.py: data/ai_pairs.jsonl
    python -m nanoalign.rlaif --labels=hard --principles=ensemble
    python -m nanoalign.rlaif --judge=path/to/gpt2              # any nanoalign checkpoint or local GPT-2 dir
    python -m nanoalign.rlaif --labeller=synthetic --position_bias=1.0   # the controlled labeller

The feedback model answers a comparison query through the shared chat template: the customer's message, one
principle, the two answers as (A) and (B), and a question; its preference is read from the log-probs of the
two option strings, in both orders, averaged against position bias:

    p_AB = σ(S("(A)" | q(y1, y2)) - S("(B)" | q(y1, y2)))        y1 in slot A
    P(y1 ≻ y2) = ½ [p_AB + (1 - p_BA)]                          p_BA: the same with the answers swapped

For the helpdesk world the feedback model is trained from scratch with train_sft.py on a judging corpus the
world writes (`constitution.write_judge_corpus`): comparison queries under one principle each, answered from
that principle's gold score alone, on answers from the world's answer generator (never the policy's samples, so
that it must generalise to them) and prompts outside the held-out test set. The labelling pass never calls the
gold judge; eval.json does, to measure the labels (agreement, log-loss, calibration, position bias).
"""

import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoalign.checkpoint import load_model, read_meta, recover
from nanoalign.config import check_config, parse_config
from nanoalign.data import left_pad, read_jsonl, write_jsonl
from nanoalign.evaluate import calibration, sample_answers, write_json
from nanoalign.logprobs import token_logps
from nanoalign.model import KVCache
from nanoalign.scaffold import die_with_parent, setup
from nanoalign.world import gold_judge, helpdesk
from nanoalign.world.constitution import OPTIONS, Principle, option_ids, principle_score, query, read_constitution, \
    write_judge_corpus


@dataclass
class Config:
    data_dir: str = "data"  # the helpdesk world (prompts.jsonl); the judging corpus is written to data_dir/judge
    policy: str = "out/sft"  # the policy whose answers are labelled
    judge: str = "out/judge"  # the feedback model; trained with train_sft.py first when missing
    constitution: str = ""  # principles file ("" = nanoalign/world/constitution.txt)
    out: str = "data/ai_pairs.jsonl"  # the labelled pairs: prompt, chosen, rejected, p = P(chosen is better)
    eval_dir: str = "out/rlaif"  # eval.json: the labels measured against the gold judge
    n_prompts: int = 1000  # training prompts whose answers are labelled
    k: int = 4  # answers sampled per prompt; each of their C(k, 2) pairs is labelled (as the human rankings)
    principles: str = "sample"  # sample: one principle per comparison (CAI) | ensemble: P averaged over all
    labels: str = "soft"  # soft: p = P | hard: p = 1 | clamped: p = P clipped to [0.4, 0.6] (CAI §4.3)
    order_average: bool = True  # average both orders (False: y1 always in slot A)
    labeller: str = "model"  # model: the feedback model | synthetic: logit kappa*(s(A) - s(B)) + bias + noise
    kappa: float = 5.0  # synthetic: logit per unit of principle score
    noise: float = 1.0  # synthetic: std of the Gaussian logit noise
    position_bias: float = 0.0  # synthetic: log-odds added in favour of slot A
    max_new_tokens: int = 64  # answer length when sampling the policy (PPO's rollout length)
    temperature: float = 1.0  # sampling temperature of the policy
    batch_size: int = 16  # comparisons per forward of the feedback model (4 sequences each)
    judge_train: int = 24000  # judging-corpus queries for a new feedback model
    judge_steps: int = 1000  # its train_sft.py steps (batch 32)
    judge_block_size: int = 320  # its context: a query holds the customer's message and two answers
    judge_prompt_loss: float = 0.1  # its loss on the query tokens: without it the verdict alone stays at chance
    seed: int = 1234  # prompts, sampling, principles drawn per comparison, the feedback model's training
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (CUDA): the models here and the feedback model's training
    allow_slow_dtype: bool = False  # run --dtype=bf16 on a CPU that only emulates it (tens of times slower)


# ----- preferences ----------------------------------------------------------------------------------------


@torch.no_grad()
def option_logits(model, tok, queries: list[str], batch_size: int = 16) -> torch.Tensor:
    """S("(A)" | q) - S("(B)" | q) for each query -> [Q] float64: the feedback model's log-odds for slot A, the
    options' per-token log-probs summed (EOS included) with the shared log-prob function. Each query is read
    once: its forward fills a KV cache that both options then continue from (half the work of scoring query +
    option twice, since a query is ~250 tokens and an option 4)."""
    a, b = option_ids(tok)
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(queries), batch_size):
        prompts = [tok.encode_prompt(q) for q in queries[s:s + batch_size]]
        for q, ids in zip(queries[s:s + batch_size], prompts):
            if len(ids) + len(a) > model.config.block_size:
                raise ValueError(f"a comparison query of {len(ids)} tokens does not fit the feedback model's "
                                 f"context ({model.config.block_size}); answers too long: {q[:80]!r}...")
        ids, mask = (t.to(device) for t in left_pad(prompts, tok.pad_id))  # [n, P]: every query ends in column P
        n, P = ids.shape
        cache = KVCache(model.config, n, P + len(a), device, dtype=next(model.parameters()).dtype)
        last = F.pad(torch.ones(n, 1, dtype=torch.bool, device=device), (P - 1, 0))  # [n, P]
        first = model(ids, attention_mask=mask, kv_cache=cache, logits_at=last)  # [n, V]: scores options' token 0
        cache.k, cache.v = ([t.repeat_interleave(2, 0) for t in kv] for kv in (cache.k, cache.v))  # rows A, B
        options = torch.tensor([a, b], device=device).repeat(n, 1)  # [2n, L]
        logits = first.repeat_interleave(2, 0)[:, None]  # [2n, 1, V]
        if len(a) > 1:  # the options' own tokens (but the last) score the tokens after them
            mask = torch.cat([mask.repeat_interleave(2, 0), mask.new_ones(2 * n, len(a) - 1)], 1)
            logits = torch.cat([logits, model(options[:, :-1], attention_mask=mask, kv_cache=cache)], 1)
        logps = token_logps(logits, options).sum(-1).double().view(n, 2)  # [n, 2]: S(A), S(B)
        out.append((logps[:, 0] - logps[:, 1]).cpu())
    return torch.cat(out)


def model_preferences(model, tok, items: list[tuple], batch_size: int = 16) -> dict:
    """items: (prompt, principle text, y1, y2) -> {"p_ab", "p_ba"} [N] float64, p_ab = P(slot A) with y1 in
    slot A, p_ba = P(slot A) with y2 there. Both orders of a comparison share one forward (4 sequences)."""
    queries = [q for p, pr, y1, y2 in items for q in (query(p, pr, y1, y2), query(p, pr, y2, y1))]
    logits = option_logits(model, tok, queries, 2 * batch_size).view(-1, 2)
    return {"p_ab": torch.sigmoid(logits[:, 0]), "p_ba": torch.sigmoid(logits[:, 1])}


def ai_preferences(model, tok, pairs: list[tuple], principles: list[Principle], rng: random.Random,
                   batch_size: int = 16) -> torch.Tensor:
    """The feedback model's P(y1 ≻ y2) [N] float64 for each (prompt, y1, y2): one principle drawn by rng per pair
    (CAI §4.1), both orders averaged (RLAIF §2), as the labelling pass writes its soft labels."""
    drawn = [rng.randrange(len(principles)) for _ in pairs]
    pref = model_preferences(model, tok, [(p, principles[m].text, y1, y2) for (p, y1, y2), m in zip(pairs, drawn)],
                             batch_size)
    return combine(pref["p_ab"], pref["p_ba"])


def synthetic_preferences(s1: torch.Tensor, s2: torch.Tensor, kappa: float, noise: float, position_bias: float,
                          generator: torch.Generator) -> dict:
    """The controlled labeller: slot A's log-odds are kappa·(s(A) - s(B)) + position_bias + N(0, noise²), a fresh
    draw per order. s1, s2 [N]: the principle's scores of y1 and y2 -> {"p_ab", "p_ba"} as model_preferences."""
    d = kappa * (s1 - s2).double()
    eps = noise * torch.randn(2, len(d), generator=generator, dtype=torch.float64)
    return {"p_ab": torch.sigmoid(d + position_bias + eps[0]), "p_ba": torch.sigmoid(-d + position_bias + eps[1])}


def combine(p_ab: torch.Tensor, p_ba: torch.Tensor, order_average: bool = True) -> torch.Tensor:
    """P(y1 ≻ y2): ½[p_AB + (1 - p_BA)] with order averaging (RLAIF §2), else p_AB alone."""
    return 0.5 * (p_ab + (1 - p_ba)) if order_average else p_ab


def label(P: torch.Tensor, mode: str) -> torch.Tensor:
    """The label written for y1 ≻ y2 from P: soft (P), hard (1[P > ½], ½ on a tie) or clamped to [0.4, 0.6]."""
    if mode == "soft":
        return P
    if mode == "hard":
        return torch.where(P > 0.5, 1.0, torch.where(P < 0.5, 0.0, 0.5)).double()
    if mode == "clamped":
        return P.clamp(0.4, 0.6)
    raise ValueError(f"unknown label mode {mode!r}; expected soft, hard or clamped")


# ----- measuring labels against the gold judge -------------------------------------------------------------


def agreement(P: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> float | None:
    """mean 1[(P - ½)(g1 - g2) > 0] over pairs whose gold differs, ½ where P = ½ (a label that prefers neither);
    None (undefined) without such pairs."""
    differ = g1 != g2
    right = ((P - 0.5) * (g1 - g2) > 0).double() + 0.5 * (P == 0.5).double()
    return right[differ].mean().item() if differ.any() else None


def log_loss(P: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> float | None:
    """-mean log P(the gold-better answer) over pairs whose gold differs (P clipped to [1e-6, 1 - 1e-6]); None
    without such pairs."""
    differ = g1 != g2
    q = torch.where(g1 > g2, P, 1 - P).clamp(1e-6, 1 - 1e-6)
    return -q[differ].log().mean().item() if differ.any() else None


def label_quality(P: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> dict:
    """Labels P = P(y1 ≻ y2) against the gold order: agreement, log-loss and calibration over the pairs whose gold
    differs (the rate: how often y1 is the gold-better answer)."""
    differ = g1 != g2
    return {"agreement": agreement(P, g1, g2), "log_loss": log_loss(P, g1, g2),
            "calibration": calibration(P[differ], (g1 > g2)[differ])}


def train_judge(cfg: Config, principles: list[Principle]) -> None:
    """Write the judging corpus and train the feedback model with train_sft.py (a separate process: the package
    does not import the scripts, and one that dies with this one: `die_with_parent`). An interrupted training
    there (its checkpoint's config.json says "finished": false) is resumed when it ran with these flags, and
    refused, naming the flag that differs, when not."""
    script = Path(__file__).resolve().parent.parent / "train_sft.py"
    if not script.exists():
        raise FileNotFoundError(f"no feedback model at {cfg.judge}, and no train_sft.py at {script} to train one")
    corpus = write_judge_corpus(cfg.data_dir, principles, cfg.judge_train, 500, cfg.seed)
    flags = {"data_dir": corpus, "out_dir": cfg.judge, "block_size": cfg.judge_block_size,
             "max_steps": cfg.judge_steps, "n_eval": 0, "prompt_loss_weight": cfg.judge_prompt_loss,
             "seed": cfg.seed, "device": cfg.device, "dtype": cfg.dtype, "allow_slow_dtype": cfg.allow_slow_dtype}
    resume = (Path(cfg.judge) / "config.json").exists()  # only an unfinished training reaches here with one
    if resume:
        run = read_meta(cfg.judge).get("run", {})
        differ = next((k for k in ("data_dir", "block_size", "max_steps", "prompt_loss_weight", "seed", "dtype")
                       if str(run.get(k)) != str(flags[k])), None)
        if differ is not None:
            raise SystemExit(f"{cfg.judge}/config.json: an unfinished training of the feedback model with "
                             f"--{differ}={run.get(differ)}, where this call trains with --{differ}={flags[differ]}; "
                             f"finish it (python train_sft.py --resume=True --out_dir={cfg.judge} ...), or move it "
                             f"away to train a new one")
    print(f"{'resuming' if resume else 'training'} the feedback model in {cfg.judge} on {corpus} "
          f"({cfg.judge_steps} steps)")
    subprocess.run([sys.executable, str(script), *(f"--{k}={v}" for k, v in flags.items()), f"--resume={resume}"],
                   check=True, preexec_fn=die_with_parent())


def judge_finished(path) -> bool:
    """Whether `path` holds a feedback model to use: a checkpoint whose config.json does not say "finished": false
    (a nanoalign training's last checkpoint says true; one from elsewhere, a GPT-2 directory, says nothing)."""
    if Path(path).exists():
        recover(path)  # a checkpoint write that a kill interrupted: finished or undone first
    return (Path(path) / "config.json").exists() and read_meta(path).get("finished", True) is not False


def sample_pairs(policy, tok, prompts: list, cfg: Config, source: str = "the policy") -> tuple[list[tuple], int]:
    """cfg.k answers per prompt from the policy -> (every pair (prompt, y1, y2) of two different non-empty answers,
    the number of pairs before leaving out the others: a pair of equal answers or with an empty one says nothing)."""
    longest = max(len(tok.encode_prompt(p)) for p in prompts)
    if longest + cfg.max_new_tokens > policy.config.block_size:
        raise SystemExit(f"a prompt of {longest} tokens + --max_new_tokens={cfg.max_new_tokens} exceeds the policy's "
                         f"context ({policy.config.block_size} tokens in {source})")
    answers, _ = sample_answers(policy, tok, [p for p in prompts for _ in range(cfg.k)], cfg.max_new_tokens,
                                cfg.temperature, seed=cfg.seed)
    pairs = [(p, answers[i * cfg.k + a], answers[i * cfg.k + b]) for i, p in enumerate(prompts)
             for a in range(cfg.k) for b in range(a + 1, cfg.k)]
    return [(p, y1, y2) for p, y1, y2 in pairs if comparable(y1, y2)], len(pairs)


def comparable(y1: str, y2: str) -> bool:
    """Whether a pair is worth a label: two different non-empty answers (equal answers, or an empty one, say
    nothing about which is better)."""
    return y1 != y2 and bool(y1.strip()) and bool(y2.strip())


def preferences(pairs: list[tuple], comparisons: list[tuple], principles: list[Principle], cfg: Config, judge=None,
                judge_tok=None) -> dict:
    """Each comparison (pair index, principle index) asked of the feedback model (judge given) or of the synthetic
    labeller (cfg.kappa, noise, position_bias, seed) -> {"p_ab", "p_ba"} [C] float64."""
    if judge is not None:
        return model_preferences(judge, judge_tok, [(pairs[i][0], principles[m].text, *pairs[i][1:])
                                                    for i, m in comparisons], cfg.batch_size)
    # the controlled labeller reads the principle's score: an experiment's instrument, not RLAIF proper
    s = torch.tensor([[principle_score(principles[m].score, pairs[i][0], y) for y in pairs[i][1:]]
                      for i, m in comparisons], dtype=torch.float64)
    return synthetic_preferences(s[:, 0], s[:, 1], cfg.kappa, cfg.noise, cfg.position_bias,
                                 torch.Generator().manual_seed(cfg.seed))


# ----- the labelling pass ------------------------------------------------------------------------------------


def main(cfg: Config) -> dict:
    check_config(cfg, positive="n_prompts k max_new_tokens temperature batch_size judge_train judge_steps "
                               "judge_block_size", nonneg="kappa noise judge_prompt_loss",
                 choices={"principles": ("sample", "ensemble"), "labels": ("soft", "hard", "clamped"),
                          "labeller": ("model", "synthetic")})
    if cfg.k < 2:
        raise SystemExit(f"--k={cfg.k}: need at least 2 answers per prompt to compare")
    principles = read_constitution(cfg.constitution or None)
    proc = setup(cfg.seed, cfg.device, cfg.dtype, cfg.allow_slow_dtype)
    device, dtype = proc.device, proc.dtype

    # 1. the feedback model (trained first if missing) and the policy's answers, k per training prompt
    judge = judge_tok = None
    if cfg.labeller == "model":
        if not judge_finished(cfg.judge):  # missing, or a training that was interrupted
            train_judge(cfg, principles)
        judge, judge_tok = load_model(cfg.judge)
        judge = judge.to(device, dtype).eval()
        option_ids(judge_tok, cfg.judge)  # options split differently fail here, before any sampling
    policy, tok = load_model(cfg.policy)
    prompts = [r["prompt"] for r in read_jsonl(Path(cfg.data_dir) / "prompts.jsonl", "prompts")]
    prompts = random.Random(cfg.seed).sample(prompts, min(cfg.n_prompts, len(prompts)))
    t0 = time.time()
    pairs, n_all = sample_pairs(policy.to(device, dtype), tok, prompts, cfg, source=cfg.policy)
    t_sample = time.time() - t0
    print(f"{len(pairs)} pairs from {len(prompts)} prompts x {cfg.k} answers ({t_sample:.0f}s; "
          f"{n_all - len(pairs)} left out: equal or empty answers)")

    # 2. comparisons: one principle per pair (or every principle), each asked in both orders
    rng = random.Random(f"{cfg.seed}/principles")
    comparisons = [(i, m) for i in range(len(pairs)) for m in
                   ([rng.randrange(len(principles))] if cfg.principles == "sample" else range(len(principles)))]
    t0 = time.time()
    pref = preferences(pairs, comparisons, principles, cfg, judge, judge_tok)
    t_label = time.time() - t0
    pair_of = torch.tensor([i for i, _ in comparisons])
    P = per_pair(combine(pref["p_ab"], pref["p_ba"], cfg.order_average), pair_of, len(pairs))
    p = label(P, cfg.labels)

    # 3. the pairs file
    rows = pair_rows(pairs, p)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, rows)

    # 4. the labels measured against the gold judge (evaluation only: nothing above read it)
    result = measure(principles, pairs, comparisons, pref, p)
    result.update({"labels": cfg.labels, "principles_mode": cfg.principles, "labeller": cfg.labeller,
                   "order_average": cfg.order_average, "pairs": len(pairs), "pairs_left_out": n_all - len(pairs),
                   "comparisons": len(comparisons),
                   "comparisons_per_s": len(comparisons) / max(t_label, 1e-9), "label_time_s": t_label,
                   "sample_time_s": t_sample})
    if cfg.labeller == "model":
        result["position_bias"] = position_bias(judge, judge_tok, pairs, principles, cfg)
        held_out = Path(cfg.data_dir) / "judge" / "sft_test.jsonl"
        if held_out.exists():  # the judging corpus's own test queries: verdicts it was taught to give
            result["judge_test_accuracy"] = judge_accuracy(judge, judge_tok, read_jsonl(held_out, "sft"),
                                                           cfg.batch_size)
    Path(cfg.eval_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(cfg.eval_dir) / "eval.json", result)
    print(f"wrote {out} ({len(rows)} pairs) and {Path(cfg.eval_dir) / 'eval.json'}")
    print("eval:", {k: v if v is None else round(v, 4) for k, v in result.items() if k in
                    ("agreement", "agreement_one_order", "human_label_agreement", "log_loss", "comparisons_per_s")})
    return result


def pair_rows(pairs: list[tuple], p: torch.Tensor) -> list[dict]:
    """Records of the pairs format from labels p = P(y1 ≻ y2): chosen = the answer the label prefers, "p" =
    P(chosen is better) >= ½."""
    return [{"prompt": pr, "chosen": y1 if q >= 0.5 else y2, "rejected": y2 if q >= 0.5 else y1,
             "p": round(max(q, 1 - q), 6)} for (pr, y1, y2), q in zip(pairs, p.tolist())]


def per_pair(values: torch.Tensor, pair_of: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """The mean of each pair's comparisons (one, or one per principle for the ensemble) -> [n_pairs]."""
    total = torch.zeros(n_pairs, dtype=values.dtype).index_add_(0, pair_of, values)
    return total / torch.bincount(pair_of, minlength=n_pairs)


def gold_scores(pairs: list[tuple]) -> torch.Tensor:
    """The gold judge's score of both answers of each (prompt, y1, y2) -> [N, 2] float64 (measurement only)."""
    return torch.tensor([[gold_judge.judge(p, y)["gold"] for y in (y1, y2)] for p, y1, y2 in pairs],
                        dtype=torch.float64)


def measure(principles, pairs, comparisons, pref, p) -> dict:
    """The written labels p against the gold judge (agreement, log-loss, calibration); agreement of both orders
    averaged and of one order alone; per principle, agreement with its own score and with gold; and what
    labels drawn like the world's human ones (σ(κ Δgold)) would agree on the same pairs."""
    g = gold_scores(pairs)
    pair_of = torch.tensor([i for i, _ in comparisons])
    both, one = combine(pref["p_ab"], pref["p_ba"]), pref["p_ab"]
    result = {**label_quality(p, g[:, 0], g[:, 1]),
              "agreement_both_orders": agreement(per_pair(both, pair_of, len(pairs)), g[:, 0], g[:, 1]),
              "agreement_one_order": agreement(per_pair(one, pair_of, len(pairs)), g[:, 0], g[:, 1]),
              "human_label_agreement": helpdesk.bayes_ceiling(g.tolist()),
              "principles": {}}
    for m, pr in enumerate(principles):
        rows = [c for c, (_, mc) in enumerate(comparisons) if mc == m]
        if rows:
            own = torch.tensor([[principle_score(pr.score, pairs[comparisons[c][0]][0], y)
                                 for y in pairs[comparisons[c][0]][1:]] for c in rows], dtype=torch.float64)
            gold = g[pair_of[rows]]
            result["principles"][pr.text] = {
                "score": pr.score, "n": len(rows),
                "agreement_with_its_score": agreement(both[rows], own[:, 0], own[:, 1]),
                "agreement_with_gold": agreement(both[rows], gold[:, 0], gold[:, 1])}
    return result


def judge_accuracy(judge, tok, records: list[dict], batch_size: int = 16) -> dict:
    """The share of judging-corpus queries whose verdict the feedback model prefers, per principle and overall."""
    logits = option_logits(judge, tok, [r["prompt"] for r in records], 2 * batch_size)
    right = [(x > 0) == (r["completion"] == OPTIONS[0]) for r, x in zip(records, logits.tolist())]
    out = {}
    for r, ok in zip(records, right):
        out.setdefault(r.get("principle", "all"), []).append(ok)
    return {**{k: sum(v) / len(v) for k, v in out.items()}, "all": sum(right) / len(right)}


def position_bias(judge, tok, pairs, principles, cfg: Config, n: int = 200) -> dict:
    """P(slot A) when both slots hold the same answer (½ for an unbiased labeller), over up to n answers under
    random principles: one order alone, and averaged over both orders (½ by construction)."""
    rng = random.Random(f"{cfg.seed}/position")
    queries = [query(pr, rng.choice(principles).text, y, y) for pr, y, _ in pairs[:n]]
    p_same = torch.sigmoid(option_logits(judge, tok, queries, 2 * cfg.batch_size))  # both orders: the same query
    return {"one_order": p_same.mean().item(), "both_orders": combine(p_same, p_same).mean().item()}


if __name__ == "__main__":
    main(parse_config(Config))
