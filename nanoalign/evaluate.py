"""Evaluate a policy on held-out helpdesk prompts with the gold judge and write `eval.json`.

    python -m nanoalign.evaluate --checkpoint=out/sft                            # writes out/sft/eval.json
    python -m nanoalign.evaluate --checkpoint=path/to/gpt2 --out=out/gpt2        # eval.json elsewhere
    python -m nanoalign.evaluate --checkpoint=out/dpo --reference=out/sft        # + KL and win rate vs SFT
    python -m nanoalign.evaluate --checkpoint=out/sft --reward_model=out/rm --best_of_n=64   # best-of-N curve

eval.json is the contract every stage writes:
    {"gold", "principles": {name: mean}, "failures": {"disparage", "canned", "leak"}, "failures_on_intent",
     "degenerate", "n", "demo_gold"}
(failure rates over all prompts, and over the prompts of the intent that tempts each; the share of answers with a
degenerate sentence, by kind: nanoalign.world.gold_judge.judge_many) plus "gold_se" (the standard error of gold over the prompts), "length" (mean response tokens, EOS included),
"samples" (the first 3 prompts, each with its answer and the judge's verdict) and, against a reference policy,
"kl", "kl_k1", "win_rate_vs_sft", "sft_gold", "sft_failures", "sft_failures_on_intent" and "gain_vs_sft_se" (the standard error of the
paired gold difference gold - sft_gold). During training, the scripts' --eval_interval logs `curve_point`s;
at the end of a run `finish` writes eval.json. A reward model is measured on held-out rankings by
`reward_model_metrics` (train_rm.py's eval.json).
"""

import json
import math
import os
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch

from nanoalign.checkpoint import load_model, load_reward_model
from nanoalign.config import check_config, parse_config
from nanoalign.data import check_prompts, read_jsonl
from nanoalign.logprobs import token_logps
from nanoalign.losses import best_of_n_kl, best_of_n_pool, kwise_ranking_loss, token_kl
from nanoalign.precision import run_dtype
from nanoalign.sampling import group_rewards, join, reward_scores, sample
from nanoalign.scaffold import gathered
from nanoalign.world import gold_judge, helpdesk


@dataclass
class Config:
    checkpoint: str = "out/sft"  # policy to evaluate (nanoalign or local HF GPT-2 dir)
    data_dir: str = "data"  # holds sft_test.jsonl (held-out prompts and demonstrations)
    n: int = 200  # held-out prompts to answer
    max_new_tokens: int = 96  # response length limit
    temperature: float = 1.0  # sampling temperature (0 = greedy)
    batch_size: int = 64  # prompts per sampler call
    seed: int = 0  # sampling seed
    reference: str = ""  # SFT checkpoint for KL and win rate ("" = none)
    reward_model: str = ""  # with best_of_n > 0: the RM that picks the best answer
    best_of_n: int = 0  # > 0: best-of-N curve up to this N (a power of 2) on n_bon prompts -> best_of_n.json
    n_bon: int = 100  # held-out prompts for the best-of-N curve
    select: int = 8  # the realised best-of-N policy in best_of_n.json["selected"]: gold, failures, win rate
    out: str = ""  # directory for eval.json and best_of_n.json ("" = the evaluated checkpoint's)
    dtype: str = "fp32"  # fp32 | bf16: the models' weights while sampling and scoring (on the CPU)
    allow_slow_dtype: bool = False  # run --dtype=bf16 on a CPU that only emulates it (tens of times slower)


def sample_answers(model, tok, prompts: list, max_new_tokens: int, temperature: float = 1.0,
                   batch_size: int = 64, seed: int = 0) -> tuple[list[str], list[dict]]:
    """Answer each prompt with the shared sampler -> (decoded answers, the sampler's token batches). Each prompt
    has its own generator, seeded by (seed, its index): its answer does not depend on the other answers'
    lengths, the batch size or max_new_tokens (beyond the cut), so every stage's SFT baseline is the same."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers, batches = [], []
    for s in range(0, len(prompts), batch_size):
        ids = [tok.encode_prompt(p) for p in prompts[s:s + batch_size]]
        g = [torch.Generator(device=device).manual_seed(seed * 100003 + i) for i in range(s, s + len(ids))]
        out = sample(model, ids, max_new_tokens, tok.eos_id, tok.pad_id, temperature=temperature, generator=g)
        answers += join(out, tok).answers
        batches.append(out)
    model.train(was_training)
    return answers, batches


@torch.no_grad()
def reference_kl(model, reference, batches: list[dict], temperature: float = 1.0) -> dict:
    """Sequence KL(π‖π_ref) on the policy's own samples, both at the sampling temperature (DPO paper, footnote 3):
    `kl` = mean Σ_t exact per-token KL (terms >= 0, low variance), `kl_k1` = mean Σ_t (log π - log π_ref).
    At temperature 0 (greedy decoding) both policies are point masses, whose KL is 0 or infinite, never a
    measure of drift: both are None (null in eval.json), with a line that says so."""
    if temperature == 0:
        print("KL to the reference not measured: at --temperature=0 (greedy) both policies are point masses, "
              "whose KL is 0 or infinite; eval.json holds null")
        return {"kl": None, "kl_k1": None}
    exact, k1 = [], []
    for out in batches:
        rows = join(out)
        ids, attn, mask = rows.ids, rows.attn, rows.mask  # [B, P+N], [B, P+N], [B, P+N-1]
        logits, ref_logits = (m(ids, attention_mask=attn)[:, :-1] for m in (model, reference))
        exact.append((token_kl(logits, ref_logits, temperature) * mask).sum(-1))
        labels = ids[:, 1:]
        k1.append(((token_logps(logits, labels, temperature) - token_logps(ref_logits, labels, temperature))
                   * mask).sum(-1))
    return {"kl": torch.cat(exact).mean().item(), "kl_k1": torch.cat(k1).mean().item()}


def standard_error(xs: list[float]) -> float:
    """Standard error of the mean of xs (unbiased variance)."""
    n = len(xs)
    mean = sum(xs) / n
    return (sum((x - mean) ** 2 for x in xs) / (n - 1) / n) ** 0.5 if n > 1 else 0.0


def calibration(p: torch.Tensor, outcome: torch.Tensor, bins: int = 10) -> dict:
    """Reliability of probabilities p [N] for 0/1 outcomes [N] -> {"table": per bin of p its range, count, mean p
    and the outcomes' rate; "error": the expected calibration error Σ_b (n_b / N)·|mean p_b - rate_b|, 0 for a
    calibrated forecaster, None (undefined) without outcomes}."""
    p, outcome = p.double(), outcome.double()
    which = (p * bins).long().clamp(0, bins - 1)
    table = [{"bin": [b / bins, (b + 1) / bins], "n": int((which == b).sum()), "mean_p": p[which == b].mean().item(),
              "rate": outcome[which == b].mean().item()} for b in range(bins) if (which == b).any()]
    error = sum(r["n"] * abs(r["mean_p"] - r["rate"]) for r in table) / len(p) if len(p) else None
    return {"table": table, "error": error}


def win_rate(gold: list[float], baseline_gold: list[float]) -> float:
    """Share of prompts where the answer's gold beats the baseline's; ties count half."""
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(gold, baseline_gold)) / len(gold)


def shown_samples(prompts: list[str], answers: list[str], k: int = 3) -> list[dict]:
    """The first k answers as a reader sees them: {"prompt", "answer", and the judge's "gold", "principles",
    "failures"}."""
    return [{"prompt": p, "answer": a, **gold_judge.judge(p, a)} for p, a in zip(prompts[:k], answers)]


def check_eval_prompts(tok, data_dir, n: int, block_size: int) -> None:
    """At a run's start: the held-out prompts evaluate_policy will answer exist and fit the context."""
    if n > 0:
        check_prompts(tok, read_jsonl(Path(data_dir) / "sft_test.jsonl", "sft")[:n], block_size)


def evaluate_policy(model, tok, data_dir, n: int = 200, max_new_tokens: int = 96, temperature: float = 1.0,
                    batch_size: int = 64, seed: int = 0, reference=None,
                    baseline: bool = True) -> tuple[dict, list, list]:
    """Gold-judge the policy's answers to the first n held-out prompts -> (eval dict, prompts, answers).
    With a reference (the SFT model) also `kl` and `kl_k1`, and unless baseline=False (a point of a gold-vs-KL
    curve, taken during training) `win_rate_vs_sft` and the reference's own `sft_gold` and `sft_failures` on
    the same prompts and seed."""
    demos = read_jsonl(Path(data_dir) / "sft_test.jsonl", "sft")[:n]
    prompts = [d["prompt"] for d in demos]
    answers, batches = sample_answers(model, tok, prompts, max_new_tokens, temperature, batch_size, seed)
    metrics = gold_judge.judge_many(prompts, answers)
    gold = [gold_judge.judge(p, a)["gold"] for p, a in zip(prompts, answers)]
    metrics["gold_se"] = standard_error(gold)
    metrics["demo_gold"] = gold_judge.judge_many(prompts, [d["completion"] for d in demos])["gold"]
    metrics["length"] = torch.cat([b["response_mask"].sum(-1) for b in batches]).float().mean().item()  # tokens
    metrics["samples"] = shown_samples(prompts, answers)
    if reference is not None:
        metrics.update(reference_kl(model, reference, batches, temperature))
    if reference is not None and baseline:
        sft_answers, _ = sample_answers(reference, tok, prompts, max_new_tokens, temperature, batch_size, seed)
        sft = gold_judge.judge_many(prompts, sft_answers)
        metrics["sft_gold"], metrics["sft_failures"] = sft["gold"], sft["failures"]
        metrics["sft_failures_on_intent"] = sft["failures_on_intent"]
        sft_gold = [gold_judge.judge(p, a)["gold"] for p, a in zip(prompts, sft_answers)]
        metrics["win_rate_vs_sft"] = win_rate(gold, sft_gold)
        metrics["gain_vs_sft_se"] = standard_error([a - b for a, b in zip(gold, sft_gold)])  # paired, same prompts
    return metrics, prompts, answers


def curve_point(model, reference, tok, data_dir, n: int, max_new_tokens: int, temperature: float, seed: int) -> dict:
    """One point of the gold-vs-KL curve, taken during training as the DPO paper does every 100 steps (Rafailov
    et al. 2023, §6.1): gold and the KL to the reference on the first n held-out prompts, measured exactly as the
    final evaluation measures them (the same prompts and generators), without the reference's own answers
    -> {"eval/gold", "eval/gold_se", "eval/kl", "eval/kl_k1"} for log.jsonl."""
    metrics, _, _ = evaluate_policy(model, tok, data_dir, n, max_new_tokens, temperature, seed=seed,
                                    reference=reference, baseline=False)
    return {f"eval/{k}": metrics[k] for k in ("gold", "gold_se", "kl", "kl_k1")}


def curve_point_due(step: int, interval: int, last: int, model, reference, tok, data_dir, n: int,
                    max_new_tokens: int, temperature: float, seed: int) -> tuple[dict, float]:
    """Every `interval` steps before the `last` (whose final evaluation ends the curve), a point of the gold-vs-KL
    curve on the held-out prompts (`curve_point`), every rank sampling with the full weights -> (the
    point, or {} between points; the seconds it took, which a loop leaves out of its throughput)."""
    if not interval or step % interval or step >= last:
        return {}, 0.0
    t0 = time.time()
    with gathered(model):
        point = curve_point(model, reference, tok, data_dir, n, max_new_tokens, temperature, seed)
    return point, time.time() - t0


VS_REFERENCE = ("gold", "sft_gold", "failures", "sft_failures", "kl", "win_rate_vs_sft")  # finish's summary


def finish(model, tok, proc, out_dir, data_dir, n: int, max_new_tokens: int, temperature: float, seed: int,
           reference=None, summary: tuple = VS_REFERENCE, result: dict | None = None) -> dict:
    """A policy run's epilogue, after its final checkpoint is in out_dir: rank 0 answers the first n held-out
    prompts (`evaluate_policy`) with the trained model (read back from out_dir when it is sharded over ranks),
    against the reference when given (a model, or a checkpoint directory read here), prints 4 answers, writes
    out_dir/eval.json and prints the `summary` keys -> the eval dict (`result`, or {}, off rank 0 or with n = 0)."""
    if n <= 0 or not proc.master:
        return result if result is not None else {}
    policy = model if proc.world == 1 else load_model(out_dir, tok)[0].to(proc.device, proc.dtype)
    if isinstance(reference, (str, Path)):
        reference = load_model(reference, tok)[0].to(proc.device, proc.dtype).eval()
    result, prompts, answers = evaluate_policy(policy, tok, data_dir, n, max_new_tokens, temperature, seed=seed,
                                               reference=reference)
    for p, a in list(zip(prompts, answers))[:4]:
        print(f"\n> {p}\n{a}")
    write_json(Path(out_dir) / "eval.json", result)
    print("\neval:", {k: result.get(k) for k in summary})
    return result


@torch.no_grad()
def sample_pool(model, tok, prompts: list, n: int, max_new_tokens: int = 96, temperature: float = 1.0,
                seed: int = 0) -> tuple[list[tuple], list[list[str]], torch.Tensor]:
    """n answers to each prompt, drawn prompt after prompt from one generator: a best-of-N pool, sampled once and
    scored by any number of reward models -> (per prompt its token rows (ids, attention_mask) [n, T] as
    `reward_scores` reads them, the decoded answers, their gold [P, n])."""
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    rows, answers, gold = [], [], []
    for p in prompts:
        out = sample(model, [tok.encode_prompt(p)] * n, max_new_tokens, tok.eos_id, tok.pad_id,
                     temperature=temperature, generator=g)
        pool = join(out, tok)
        rows.append((pool.ids, pool.attn))
        answers.append(pool.answers)
        gold.append(torch.tensor([gold_judge.judge(p, a)["gold"] for a in answers[-1]]))
    return rows, answers, torch.stack(gold)


def best_of_n_curve(proxy: torch.Tensor, gold: torch.Tensor) -> list[dict]:
    """proxy, gold [P, N]: N answers per prompt -> for n = 1, 2, 4, ..., N the analytic KL log n - (n-1)/n and the
    expected proxy and gold score of the answer the proxy ranks best among n, by the unbiased pool estimator,
    averaged over the prompts."""
    rows, n = [], 1
    while n <= proxy.shape[-1]:
        rows.append({"n": n, "kl": best_of_n_kl(n), "proxy": best_of_n_pool(proxy, proxy, n).mean().item(),
                     "gold": best_of_n_pool(proxy, gold, n).mean().item()})
        n *= 2
    return rows


@torch.no_grad()
def best_of_n(model, tok, rm, gain: float, bias: float, prompts: list, n_max: int = 64, max_new_tokens: int = 96,
              temperature: float = 1.0, seed: int = 0, select: int = 8) -> tuple[list[dict], dict]:
    """Best-of-N with the reward model: n_max answers per prompt, then for n = 1, 2, 4, ..., n_max the expected
    proxy and gold score of the answer the RM ranks best among n, by the unbiased pool estimator, beside
    the analytic KL log n - (n-1)/n (an upper bound when answers repeat: Beirami et al. 2024).
    Also one realised best-of-`select` policy (select < n_max): per prompt the RM's pick among `select` of the
    answers, with its gold, failure rates, win rate against another of the answers (an SFT sample) and samples."""
    assert select < n_max, f"select ({select}) must be below n_max ({n_max}): the SFT baseline is a sample outside"
    rows, answers, gold = sample_pool(model, tok, prompts, n_max, max_new_tokens, temperature, seed)
    proxy = torch.stack([reward_scores(rm, ids, attn, gain, bias).cpu() for ids, attn in rows])  # [P, n_max]
    shuffle = torch.randperm(n_max, generator=torch.Generator().manual_seed(seed))  # random tie-breaking
    proxy, gold = proxy[:, shuffle], gold[:, shuffle]
    answers = [[a[i] for i in shuffle.tolist()] for a in answers]
    pick = proxy[:, :select].argmax(-1).tolist()  # the RM's choice among the first `select` answers
    chosen = [a[i] for a, i in zip(answers, pick)]
    judged = gold_judge.judge_many(prompts, chosen)
    selected = {"n": select, "kl": best_of_n_kl(select), "gold": judged["gold"], "principles": judged["principles"],
                "failures": judged["failures"], "failures_on_intent": judged["failures_on_intent"],
                "degenerate": judged["degenerate"],
                "win_rate_vs_sft": win_rate(gold[range(len(pick)), pick].tolist(), gold[:, -1].tolist()),
                "samples": shown_samples(prompts, chosen)}
    return best_of_n_curve(proxy, gold), selected


def ranked_above(ranking: torch.Tensor) -> torch.Tensor:
    """ranking [N, K], indices best first -> [N, K, K], True where answer i is ranked above answer j."""
    rank = ranking.argsort(-1)  # [N, K], 0 = best
    return rank[:, :, None] < rank[:, None, :]


def pairwise_hits(scores: torch.Tensor, above: torch.Tensor) -> tuple[float, float, float]:
    """Pairs (i above j) that scores [N, K] order alike, 1 each and 1/2 on a tie
    -> (hits, summed margin s_i - s_j, number of pairs)."""
    diff = (scores[:, :, None] - scores[:, None, :]).double()  # [N, K, K]: s_i - s_j
    hits = (diff > 0).double() + 0.5 * (diff == 0).double()
    return (hits * above).sum().item(), (diff * above).sum().item(), above.sum().item()


def reward_model_metrics(model, groups: list[dict], pad_id: int, device, rows_per_forward: int) -> dict:
    """The measures over all C(K,2) pairs of each held-out ranking: accuracy, log-loss (the K-wise loss), calibration
    error and reliability table of P(i above j) = σ(r_i - r_j), all against the noisy labels; with gold scores
    recorded, the Bayes and realised ceilings and the accuracy against the gold order."""
    rewards = group_rewards(model, groups, pad_id, device, rows_per_forward).cpu()  # [N, K]
    ranking = torch.tensor([g["ranking"] for g in groups])
    above = ranked_above(ranking)  # [N, K, K]
    hits, _, n_pairs = pairwise_hits(rewards, above)
    i, j = torch.triu_indices(*above.shape[1:], 1)  # each pair once: P(answer i above answer j), i < j
    reliability = calibration(torch.sigmoid(rewards[:, i] - rewards[:, j]).flatten(), above[:, i, j].flatten())
    result = {"accuracy": hits / n_pairs, "calibration_error": reliability["error"]}
    if all(g["gold"] is not None for g in groups):
        gold = torch.tensor([g["gold"] for g in groups], dtype=torch.float64)  # [N, K]
        result["bayes_ceiling"] = helpdesk.bayes_ceiling(pair for g in gold.tolist() for pair in combinations(g, 2))
        hits, _, _ = pairwise_hits(gold, above)  # labels that agree with the gold order
        result["realised_ceiling"] = hits / n_pairs
        hits, _, n_gold = pairwise_hits(rewards, gold[:, :, None] > gold[:, None, :])  # gold ties skipped
        result["accuracy_vs_gold"] = hits / n_gold
    result.update({"n_pairs": int(n_pairs), "loss": kwise_ranking_loss(rewards, ranking).item(),
                   "reliability": reliability["table"]})
    return result


def gao_fit(kl: list[float], score: list[float], form: str = "bon") -> dict:
    """Fit a score-vs-KL curve with the functional forms of Gao et al. (2022, §3): with d = √KL and R(d) the
    score minus its value at KL = 0 (one point must be there),
        best-of-N ("bon")  R(d) = d·(α − β·d)          RL ("rl")  R(d) = d·(α − β·log d).
    Both are linear in (α, β): least squares -> {"alpha", "beta", "r2", "form"}, r2 = 1 − SS_res / SS_tot of R."""
    if form not in ("bon", "rl") or 0.0 not in kl:
        raise ValueError(f"gao_fit needs form 'bon' or 'rl' (got {form!r}) and the point at KL = 0 (the start)")
    d = torch.tensor(kl, dtype=torch.float64).sqrt()
    r = torch.tensor(score, dtype=torch.float64) - score[kl.index(0.0)]
    x = torch.stack([d, -(d * d if form == "bon" else torch.special.xlogy(d, d))], 1)  # [P, 2]; 0·log 0 = 0
    alpha, beta = torch.linalg.lstsq(x, r[:, None]).solution.squeeze(1).tolist()
    residual = r - x @ torch.tensor([alpha, beta], dtype=torch.float64)
    r2 = 1.0 - (residual.square().sum() / (r - r.mean()).square().sum()).item()
    return {"alpha": alpha, "beta": beta, "r2": r2, "form": form}


def linear_fit(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Least squares y ≈ a + b·x -> (a, b, R² = 1 - residual / total sum of squares; 1 when y is constant)."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    b = sum((u - mx) * (v - my) for u, v in zip(x, y)) / sum((u - mx) ** 2 for u in x)
    a = my - b * mx
    total = sum((v - my) ** 2 for v in y)
    residual = sum((v - a - b * u) ** 2 for u, v in zip(x, y))
    return a, b, 1 - residual / total if total > 0 else 1.0


def write_json(path, obj) -> None:
    """Write strict JSON atomically: a temp file beside it, then rename. A NaN or infinity (which json.dumps would
    write as the non-JSON NaN / Infinity) is an error naming the file and the key; an undefined value is None."""
    path = Path(path)
    bad = _non_finite(obj)
    if bad is not None:
        raise ValueError(f"{path}: field {bad[0]!r} is {bad[1]}, not a JSON number; not written")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _non_finite(obj, where: str = "") -> tuple[str, float] | None:
    """(key path such as "kl" or "curve[2].gold", value) of the first NaN or infinity in a JSON-like object."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _non_finite(v, f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else str(k))
        if found is not None:
            return found
    return None


def main(cfg: Config) -> dict:
    check_config(cfg, positive="n max_new_tokens batch_size n_bon", nonneg="temperature best_of_n select")
    if cfg.best_of_n and (cfg.best_of_n & (cfg.best_of_n - 1) or not cfg.reward_model or cfg.select >= cfg.best_of_n):
        raise SystemExit(f"--best_of_n={cfg.best_of_n} needs a power of 2, --reward_model, and --select below it "
                         f"(got --select={cfg.select}, --reward_model={cfg.reward_model!r})")
    for flag in ("reference", "reward_model"):  # their eval.json is their own run's result
        if getattr(cfg, flag) and Path(getattr(cfg, flag)).resolve() == Path(cfg.out or cfg.checkpoint).resolve():
            raise SystemExit(f"--out={cfg.out or cfg.checkpoint} is --{flag}={getattr(cfg, flag)}: evaluate writes "
                             f"into the evaluated checkpoint or --out, never into a model it compares with")
    dtype = run_dtype(cfg.dtype, torch.device("cpu"), allow_slow=cfg.allow_slow_dtype)
    model, tok = load_model(cfg.checkpoint)  # a policy: a reward model or critic is refused here
    model = model.to(dtype)
    reference = load_model(cfg.reference, tok)[0].to(dtype).eval() if cfg.reference else None
    if cfg.best_of_n > 0:  # read (and its tokenizer checked against the policy's) before anything is written
        rm, _, gain, bias = load_reward_model(cfg.reward_model, tok)
        rm = rm.to(dtype)
    out = Path(cfg.out or cfg.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    metrics, prompts, answers = evaluate_policy(model, tok, cfg.data_dir, cfg.n, cfg.max_new_tokens,
                                                cfg.temperature, cfg.batch_size, cfg.seed, reference)
    for p, a in list(zip(prompts, answers))[:3]:
        print(f"> {p}\n{a}\n")
    write_json(out / "eval.json", metrics)
    print(json.dumps(metrics, indent=2))
    if cfg.best_of_n > 0:
        rows, selected = best_of_n(model, tok, rm, gain, bias, prompts[:cfg.n_bon], cfg.best_of_n,
                                   cfg.max_new_tokens, cfg.temperature, cfg.seed, cfg.select)
        print(f"{'N':>4} {'KL':>6} {'proxy':>7} {'gold':>7}")
        for r in rows:
            print(f"{r['n']:>4} {r['kl']:>6.3f} {r['proxy']:>7.3f} {r['gold']:>7.4f}")
        print(f"best-of-{cfg.select}, realised:", selected)
        write_json(out / "best_of_n.json", {"curve": rows, "selected": selected})
        metrics["best_of_n"] = {"curve": rows, "selected": selected}
    return metrics


if __name__ == "__main__":
    main(parse_config(Config))
