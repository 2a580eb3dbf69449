"""Reproduction T2: gold reward against KL, DPO against PPO (Rafailov et al. 2023, DPO §6.1, Fig. 2 left).

    python train_sft.py                                    # once: out/sft and the helpdesk world in data/
    python experiments/frontier.py                         # 3 seeds (run time: docs/reproductions.md, "T2")
    python experiments/frontier.py --dpo_betas=0.05,0.1,1,5 --ppo_kl_targets=1,2,4,8 --gt_kl_targets=1,2,4,8
                                                           # the paper's grid, four of each
    python experiments/frontier.py --quick=True            # a smoke run in seconds (tiny grid): not results

Helpdesk part, per seed: the SFT policy answers --n_prompts training prompts 4 times, and every pair of two
different answers (up to 6 per prompt, DPO App. C.1) is labelled from the gold judge (--labels). On these pairs and
prompts each method trains in this process with the repository's own script: DPO (train_dpo.py) per --dpo_betas;
PPO (train_rm.py --data=pairs on the same pairs, then train_ppo.py) per adaptive --ppo_kl_targets; PPO-GT
(train_ppo.py --reward=gold, the judge normalised as the RM is) per --gt_kl_targets; Preferred-FT (train_sft.py
from the SFT model on every pair's preferred answer). Every run is measured alike, --curve_points times, the last
at its end (`nanoalign.evaluate.curve_point`, then the script's final evaluation; DPO §6.1 evaluates every 100
steps): gold and the exact KL to the SFT model on the same --n_eval held-out prompts and generators, at
temperature 1. Oracle part, per seed (DPO §4-5, exact): the answers are all 216 sequences of 3 tokens from 6;
gold(y) = σ(Σ_t w[y_t]), w ~ N(0, 1) (a synthetic sentiment); π_ref a random autoregressive table; DPO fits a
tabular autoregressive policy (L-BFGS, float64) to --oracle_pairs pairs from π_ref x π_ref labelled σ(κ·Δgold),
whose optimum is π*_β ∝ π_ref·exp(κ·gold/β); no policy can beat the frontier max{E_π[gold] : KL(π‖π_ref) <= k}.

The published claims are printed with PASS or FAIL as measured: DPO >= PPO at matched KL within 1 s.e. (in each
bin of --kl_bins where >= 2 seeds hold both methods, the mean over those seeds of the difference of the methods'
mean gold there is >= -1 s.e. of it); the same against PPO-GT (the paper's full claim), PPO-GT >= PPO and PPO >=
Preferred-FT; oracle: every point on or below the exact frontier, KL(π_DPO‖π*_β) < 1e-3. results.json holds every
point; with matplotlib, frontier.png.

Decisions, and why:
- Pairs are sampled from the SFT policy (DPO App. C.1): DPO, the RM and Preferred-FT learn from one set of pairs
  on the policy's own answers, and PPO trains on their prompts. --labels=bt (default) draws each label once from
  the world's labeller, P(y1 ≻ y2) = σ(κ·(gold1 - gold2)), κ = helpdesk.KAPPA: DPO's optimum is then the known π*
  of reward κ·gold (what the oracle part checks), the labels are as noisy as the world's rankings, and ties,
  common here, still carry a label. --labels=gold is the paper's deterministic labelling, ties dropped.
- The budget, 15 min for 3 seeds on 2 cores, sets the size: 192 prompts (about 1150 pairs), 60 DPO steps (1.7
  epochs), 20 PPO updates of 64 episodes, 36 Preferred-FT steps (one epoch), 4 evaluations of 100 held-out
  prompts per run; two β's, two PPO targets and one PPO-GT target by default, the paper's four each by flag.
  Timed stage by stage on one seed at one thread (a PPO run 74 s, a DPO run 37 s, the RM 29 s, Preferred-FT
  17 s, the pairs 6 s, the oracle 5 s: 18 min for 3 seeds), over the 1.3-1.6x two threads give (1.6x for a PPO
  update: 3.1 s at one thread, 1.95 s at two): an estimated 11-14 min (the measured time: docs/reproductions.md,
  "T2"). Preferred-FT fine-tunes at DPO's rate, no weight decay.
- PPO's adaptive β (Ziegler et al. 2019) has horizon --kl_horizon = 64 episodes, one rollout, not 10000: over 20
  updates OAI-19's horizon would move β by under 3% in all, where a gain of 1 lets β move by up to the
  controller's clip, 20%, per update. lr 1e-4, not train_ppo.py's 3e-5, so that 20 updates travel a few nats
  (one seed, target 8: KL 0.9, 2.3, 3.3 and 4.1 after 5, 10, 15 and 20 updates).
- Matched KL is binned (--kl_bins) rather than interpolated, as every method contributes several points per
  seed; a bin counts once 2 seeds hold both methods in it, so that the s.e. over seeds exists.
- The oracle's β's are not the helpdesk's: a pair's sampling error reaches the policy's log-ratios divided by β,
  so KL(π_DPO‖π*) < 1e-3 from 4M pairs needs β of about 0.5 or more at κ = 5 (one seed: 3.7e-4 at β 0.5,
  8e-5 at β 1).
"""

import bisect
import contextlib
import itertools
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the training scripts
import train_dpo  # noqa: E402
import train_ppo  # noqa: E402
import train_rm  # noqa: E402
import train_sft  # noqa: E402
from nanoalign import rlaif  # noqa: E402
from nanoalign.checkpoint import load_model  # noqa: E402
from nanoalign.config import check_config, parse_config  # noqa: E402
from nanoalign.data import read_jsonl, write_jsonl  # noqa: E402
from nanoalign.losses import Answers, LossParams, dpo_loss  # noqa: E402
from nanoalign.report.experiment import logged, mean_se, quick, write_results  # noqa: E402
from nanoalign.scaffold import setup  # noqa: E402
from nanoalign.world import helpdesk  # noqa: E402

QUICK = dict(dpo_betas="0.1,1", ppo_kl_targets="2", gt_kl_targets="2", n_prompts=8, max_new_tokens=12,
             eval_max_new_tokens=12, batch_size=4, dpo_steps=4, ppo_updates=2, ppo_rollout=8, rm_epochs=1,
             rm_norm=4, pft_steps=4, curve_points=2, n_eval=4, oracle_betas="1,5", oracle_pairs=20000, oracle_iters=4,
             seeds=2)  # --quick=True: a smoke run in seconds, for the tests
MIN_SEEDS = 2  # seeds a KL bin needs with both methods in it to count in a matched-KL claim
V, L = 6, 3  # the oracle's vocabulary and answer length: 216 answers


@dataclass
class Config:
    data_dir: str = "data"  # the helpdesk world: prompts.jsonl, prefs.jsonl, and the held-out _test files
    init_from: str = "out/sft"  # the SFT policy: every method's start, the KL reference, the pairs' sampler
    out_dir: str = "out/frontier"  # results.json, log.txt and the plot
    dpo_betas: str = "0.1,1"  # DPO runs' β (DPO §6.1 sweeps 0.05,0.1,1,5)
    ppo_kl_targets: str = "2,8"  # PPO runs' adaptive KL targets, nats per answer (DPO §6.1: 3,6,9,12 on IMDb)
    gt_kl_targets: str = "8"  # PPO-GT runs' KL targets
    labels: str = "bt"  # bt: one draw of σ(κ·Δgold) per pair | gold: the higher gold wins, ties dropped
    n_prompts: int = 192  # training prompts per seed, 4 SFT answers each (also PPO's prompts)
    max_new_tokens: int = 64  # answer length of the sampled pairs and of PPO's rollouts
    eval_max_new_tokens: int = 96  # answer length on the held-out prompts, as in every stage's evaluation
    batch_size: int = 32  # pairs per DPO and RM step, answers per Preferred-FT step
    dpo_steps: int = 60  # DPO optimizer steps (1.7 epochs of ~1150 pairs)
    dpo_lr: float = 2e-4  # train_dpo.py's
    ppo_updates: int = 20  # PPO updates per run
    ppo_rollout: int = 64  # episodes per update
    ppo_lr: float = 1e-4  # PPO learning rate
    ppo_beta: float = 0.05  # the adaptive β's start (train_ppo.py's fixed β)
    kl_horizon: int = 64  # the adaptive controller's horizon, in episodes
    rm_epochs: int = 2  # reward model: passes over the pairs (train_rm.py's)
    rm_norm: int = 128  # SFT samples fixing the reward's gain and bias (train_rm.py: 256)
    pft_steps: int = 36  # Preferred-FT steps (one epoch)
    pft_lr: float = 2e-4  # Preferred-FT learning rate (DPO's)
    curve_points: int = 4  # evaluations per run, evenly spaced, the last at its end (1 = the end only)
    n_eval: int = 100  # held-out prompts per evaluation
    kl_bins: str = "1,2,4,8"  # bin edges (nats) of the matched-KL comparison: bins [0, 1), [1, 2), ..., [8, inf)
    oracle_betas: str = "0.5,1,2,5"  # oracle DPO runs' β
    oracle_pairs: int = 4000000  # oracle pairs per seed
    oracle_iters: int = 128  # oracle L-BFGS iterations per β; points after 1, 2, 4, ... of them and the last
    seeds: int = 3  # seed, seed + 1, ...: prompts, samples, labels, training, oracle task
    seed: int = 1234  # the first seed
    quick: bool = False  # a smoke run in seconds: QUICK's values replace the fields it names (not results)
    device: str = "auto"  # auto | cpu | cuda


def floats(cfg: Config, name: str) -> list[float]:
    """A comma-separated flag of positive numbers, or one clear error naming it."""
    value = getattr(cfg, name)
    try:
        out = [float(x) for x in value.split(",")]
    except ValueError:
        out = []
    if not out or not min(out) > 0:
        raise SystemExit(f"--{name}={value}: expected comma-separated positive numbers")
    return out


# ----- the helpdesk part ----------------------------------------------------------------------------------------


def label(gold: torch.Tensor, labels: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's label from the gold scores [N, 2] of its answers -> (first answer preferred [N], labelled [N]).
    bt: one draw with P(first preferred) = σ(κ·(g1 - g2)), the world's labeller (`helpdesk.noisy_ranking`'s pairs);
    gold: the higher gold is preferred and ties are left unlabelled."""
    if labels == "bt":
        p = torch.sigmoid(helpdesk.KAPPA * (gold[:, 0] - gold[:, 1]))
        return torch.rand(len(gold), generator=generator, dtype=gold.dtype) < p, torch.ones(len(gold), dtype=torch.bool)
    return gold[:, 0] > gold[:, 1], gold[:, 0] != gold[:, 1]


def preference_pairs(policy, tok, prompts: list, cfg: Config, seed: int) -> tuple[list[dict], float]:
    """4 SFT answers per prompt; every pair of two different answers, labelled -> (pairs rows, the labels'
    agreement with the gold order, ties counted ½)."""
    pairs, _ = rlaif.sample_pairs(policy, tok, prompts, rlaif.Config(k=4, max_new_tokens=cfg.max_new_tokens,
                                                                     seed=seed), source=cfg.init_from)
    gold = rlaif.gold_scores(pairs)  # [N, 2]
    first, labelled = label(gold, cfg.labels, torch.Generator().manual_seed(seed))
    rows = [{"prompt": p, "chosen": y1 if f else y2, "rejected": y2 if f else y1}
            for (p, y1, y2), f, keep in zip(pairs, first.tolist(), labelled.tolist()) if keep]
    sign = torch.where(first, 1.0, -1.0) * (gold[:, 0] - gold[:, 1]).sign()  # 1 agrees, -1 not, 0 a tie
    return rows, ((sign[labelled] + 1) / 2).mean().item()


def curve(method: str, setting: str, out: Path, final: dict, steps: int) -> dict:
    """A run's points of the gold-vs-KL curve: those its log holds, then its final evaluation."""
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    points = [{"step": r["step"], "kl": r["eval/kl"], "gold": r["eval/gold"], "gold_se": r["eval/gold_se"]}
              for r in log if "eval/kl" in r]
    points.append({"step": steps, "kl": final["kl"], "gold": final["gold"], "gold_se": final["gold_se"]})
    return {"method": method, "setting": setting, "points": points,
            "final": {k: final[k] for k in ("gold", "kl", "kl_k1", "sft_gold", "win_rate_vs_sft", "failures")}}


def run_seed(cfg: Config, seed: int, policy, tok, prompts: list, work: Path, log) -> dict:
    """One seed of the helpdesk part: the pairs, then every method's runs -> {"pairs", "agreement", "rm", "runs"}."""
    t0 = time.time()
    prompts = random.Random(seed).sample(prompts, cfg.n_prompts)
    pairs, agreement = preference_pairs(policy, tok, prompts, cfg, seed)
    if len(pairs) < cfg.batch_size:
        raise SystemExit(f"{len(pairs)} labelled pairs from --n_prompts={cfg.n_prompts}: fewer than --batch_size")
    data = work / "data"
    write_jsonl(data / "pairs.jsonl", pairs)  # DPO's and the RM's
    write_jsonl(data / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pairs])  # Pref.-FT
    write_jsonl(data / "prompts.jsonl", [{"prompt": p} for p in prompts])  # PPO's: the pairs' prompts
    log(f"seed {seed}: {len(pairs)} pairs on {len(prompts)} prompts, labels agree with gold {agreement:.3f} "
        f"({time.time() - t0:.0f}s)")
    every = dict(data_dir=str(data), init_from=cfg.init_from, n_eval=cfg.n_eval, log_interval=10 ** 6,
                 ckpt_interval=10 ** 6, device=cfg.device, seed=seed)
    runs = []

    def train(method, setting, script, config, steps):  # one run of a training script, in this process
        t0, out = time.time(), Path(config.out_dir)
        with contextlib.redirect_stdout(None):
            runs.append(curve(method, setting, out, script.main(config), steps))
        log(f"seed {seed} {method:12s} {setting:10s}: (KL, gold) " + " ".join(
            f"({p['kl']:.2f}, {p['gold']:.3f})" for p in runs[-1]["points"]) + f" ({time.time() - t0:.0f}s)")

    for beta in floats(cfg, "dpo_betas"):
        train("DPO", f"β {beta:g}", train_dpo, train_dpo.Config(
            **every, out_dir=str(work / f"dpo{beta:g}"), cache_dir=str(work / "cache"), beta=beta,
            batch_size=cfg.batch_size, max_steps=cfg.dpo_steps, lr=cfg.dpo_lr, warmup_steps=max(1, cfg.dpo_steps // 10),
            eval_interval=cfg.dpo_steps // cfg.curve_points, max_new_tokens=cfg.eval_max_new_tokens), cfg.dpo_steps)
    t0 = time.time()
    with contextlib.redirect_stdout(None):  # the RM learns from DPO's pairs
        rm = train_rm.main(train_rm.Config(
            **{k: v for k, v in every.items() if k != "n_eval"}, out_dir=str(work / "rm"), data="pairs",
            epochs=cfg.rm_epochs, batch_size=cfg.batch_size, n_norm=cfg.rm_norm, max_new_tokens=cfg.max_new_tokens))
    log(f"seed {seed} reward model: held-out accuracy {rm['accuracy']:.3f} (ceiling {rm['bayes_ceiling']:.3f}), "
        f"vs gold {rm['accuracy_vs_gold']:.3f} ({time.time() - t0:.0f}s)")
    for method, reward, name in (("PPO", "rm", "ppo_kl_targets"), ("PPO-GT", "gold", "gt_kl_targets")):
        for target in floats(cfg, name):
            train(method, f"KL {target:g}", train_ppo, train_ppo.Config(
                **every, out_dir=str(work / f"{reward}{target:g}"), reward_model=str(work / "rm"), reward=reward,
                n_updates=cfg.ppo_updates, rollout_size=cfg.ppo_rollout, lr=cfg.ppo_lr, beta=cfg.ppo_beta,
                kl_target=target, kl_horizon=cfg.kl_horizon, max_new_tokens=cfg.max_new_tokens,
                eval_max_new_tokens=cfg.eval_max_new_tokens, eval_interval=cfg.ppo_updates // cfg.curve_points),
                cfg.ppo_updates)
    train("Preferred-FT", "", train_sft, train_sft.Config(
        **every, out_dir=str(work / "pft"), batch_size=cfg.batch_size, max_steps=cfg.pft_steps, lr=cfg.pft_lr,
        min_lr=cfg.pft_lr / 10, warmup_steps=max(1, cfg.pft_steps // 10), weight_decay=0.0,
        eval_interval=cfg.pft_steps // cfg.curve_points, max_new_tokens=cfg.eval_max_new_tokens), cfg.pft_steps)
    return {"pairs": len(pairs), "agreement": agreement, "rm": {k: rm[k] for k in ("accuracy", "accuracy_vs_gold")},
            "runs": runs}


# ----- the oracle part -------------------------------------------------------------------------------------------


def answers_and_contexts() -> tuple[torch.Tensor, torch.Tensor]:
    """All V^L answers [N, L] and, for each token, the index of its context y_<t [N, L]: contexts are numbered
    by length, then in base V (the empty one 0, the V one-token ones 1..V, ...), 1 + V + ... + V^(L-1) in all."""
    ys = torch.tensor(list(itertools.product(range(V), repeat=L)))  # [N, L]
    contexts = torch.zeros_like(ys)
    for t in range(1, L):
        offset = (V ** t - 1) // (V - 1)  # contexts shorter than t
        contexts[:, t] = offset + (ys[:, :t] * V ** torch.arange(t - 1, -1, -1)).sum(-1)
    return ys, contexts


def answer_logps(table: torch.Tensor, ys: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
    """S(y) = Σ_t log π(y_t | y_<t) of every answer under an autoregressive table of logits [contexts, V] -> [N]."""
    return table.log_softmax(-1)[contexts, ys].sum(-1)


def optimum(ref_logps: torch.Tensor, reward: torch.Tensor, beta: float) -> torch.Tensor:
    """log π*_β = log of π_ref·exp(r/β)/Z, the maximiser of E_π[r] - β·KL(π‖π_ref) (DPO Eqs. 4-5) -> [N]."""
    return (ref_logps + reward / beta).log_softmax(0)


def exact_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> float:
    """KL(π‖π_ref) over all answers, from log-probs [N] (-inf where π is 0)."""
    p = logps.exp()
    return (torch.special.xlogy(p, p) - p * ref_logps).sum().item()


def frontier_gold(ref_logps: torch.Tensor, gold: torch.Tensor, kl: float) -> float:
    """The most gold any policy reaches within KL kl of π_ref: E[gold] under π*_τ ∝ π_ref·exp(gold/τ) at the τ
    where KL(π*_τ‖π_ref) = kl (it falls as τ grows; bisection on log τ), max gold past the frontier's end."""
    lo, hi = math.log(1e-8), math.log(1e12)  # KL(π*) from the point mass on the best answer down to ~1e-25
    if kl >= exact_kl(optimum(ref_logps, gold, math.exp(lo)), ref_logps):
        return gold.max().item()
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if exact_kl(optimum(ref_logps, gold, math.exp(mid)), ref_logps) > kl else (lo, mid)
    return (optimum(ref_logps, gold, math.exp(hi)).exp() * gold).sum().item()


def oracle_seed(cfg: Config, seed: int, log) -> dict:
    """One seed of the oracle part: the task, its pairs, DPO at each β (points every round of L-BFGS) and
    Preferred-FT (the labels' winners' distribution, SFT's optimum on them), each point against the frontier."""
    g = torch.Generator().manual_seed(seed)
    ys, contexts = answers_and_contexts()
    gold = torch.sigmoid(torch.randn(V, generator=g, dtype=torch.float64)[ys].sum(-1))  # [N]
    ref_table = torch.randn(int(contexts.max()) + 1, V, generator=g, dtype=torch.float64)
    ref = answer_logps(ref_table, ys, contexts)
    draws = torch.multinomial(ref.exp(), 2 * cfg.oracle_pairs, replacement=True, generator=g).view(2, -1)
    first, _ = label(gold[draws].T, "bt", g)  # Bradley-Terry labels, whose DPO optimum is π*
    winner, loser = torch.where(first, draws[0], draws[1]), torch.where(first, draws[1], draws[0])
    keep = winner != loser  # a pair of one answer twice carries no preference
    counts = torch.zeros(len(ys), len(ys), dtype=torch.float64).index_put_(
        (winner[keep], loser[keep]), torch.ones(int(keep.sum()), dtype=torch.float64), accumulate=True)
    w, lose = counts.nonzero().T  # every (winner, loser) seen

    def point(logps, **what):
        kl, value = exact_kl(logps, ref), (logps.exp() * gold).sum().item()
        return {**what, "kl": kl, "gold": value, "frontier_gap": frontier_gold(ref, gold, kl) - value}

    points = [point(counts.sum(1).log() - counts.sum().log(), method="Preferred-FT")]
    for beta in floats(cfg, "oracle_betas"):
        table = ref_table.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([table], lr=1, max_iter=1, max_eval=25, tolerance_grad=1e-12, tolerance_change=1e-15,
                                line_search_fn="strong_wolfe")  # one iteration per step; its memory persists

        def closure():  # the mean DPO loss over the pairs (DPO Eq. 7), each (winner, loser) once with its count
            opt.zero_grad()
            logps = answer_logps(table, ys, contexts)
            losses, _ = dpo_loss(Answers.pairs(logps[w], logps[lose], ref[w], ref[lose]), LossParams(beta))
            loss = (counts[w, lose] * losses).sum() / counts.sum()
            loss.backward()
            return loss

        for step in range(1, cfg.oracle_iters + 1):
            opt.step(closure)
            if step & (step - 1) == 0 or step == cfg.oracle_iters:  # points along the path: steps 1, 2, 4, ...
                points.append(point(answer_logps(table.detach(), ys, contexts), method="DPO", beta=beta, step=step))
        star = optimum(ref, helpdesk.KAPPA * gold, beta)  # BT labels σ(κ·Δgold): DPO's optimum at β
        points[-1]["kl_to_optimum"] = exact_kl(answer_logps(table.detach(), ys, contexts), star)
        points[-1]["optimum"] = {"kl": exact_kl(star, ref), "gold": (star.exp() * gold).sum().item()}
        log(f"seed {seed} oracle DPO β {beta:g}: KL(π_DPO‖π*) {points[-1]['kl_to_optimum']:.2e}")
    taus = torch.logspace(-3, 2, 60).tolist()  # the frontier, for the plot
    frontier = [{"kl": exact_kl(optimum(ref, gold, t), ref), "gold": (optimum(ref, gold, t).exp() * gold).sum().item()}
                for t in taus]
    return {"points": points, "frontier": frontier, "ref_gold": (ref.exp() * gold).sum().item(),
            "pairs": int(keep.sum())}


# ----- the summary and the claims ---------------------------------------------------------------------------------



def matched_kl(seeds: list[list[dict]], a: str, b: str, edges: list[float]) -> list[dict]:
    """Method a against method b at matched KL. seeds[s]: seed s's points {"method", "kl", "gold"}. Per KL bin
    ([0, edges[0]), [edges[0], edges[1]), ..., [edges[-1], inf)) and seed holding points of both methods in it, the
    difference of their mean golds there; for each bin with >= MIN_SEEDS such seeds -> {"bin": [lo, hi or None],
    "seeds", "diff" and "se" (mean and standard error over those seeds), "a", "b" (each method's mean)}."""
    rows = []
    for k in range(len(edges) + 1):
        both = []  # per seed with both methods in bin k: (mean gold of a, mean gold of b)
        for points in seeds:
            golds = [[p["gold"] for p in points if p["method"] == m and bisect.bisect_right(edges, p["kl"]) == k]
                     for m in (a, b)]
            if all(golds):
                both.append([sum(x) / len(x) for x in golds])
        if len(both) >= MIN_SEEDS:
            diff, se = mean_se([x - y for x, y in both])
            rows.append({"bin": [edges[k - 1] if k else 0.0, edges[k] if k < len(edges) else None],
                         "seeds": len(both), "diff": diff, "se": se, "a": mean_se([x for x, _ in both])[0],
                         "b": mean_se([y for _, y in both])[0]})
    return rows


def claims(helpdesk_runs: list[dict], oracle_runs: list[dict], edges: list[float]) -> list[dict]:
    """The published claims, each with what was measured and PASS / FAIL."""
    out = []
    seeds = [[{**p, "method": r["method"]} for r in run["runs"] for p in r["points"]] for run in helpdesk_runs]
    for a, b, text in (("DPO", "PPO", "DPO >= PPO at matched KL within 1 s.e. (DPO §6.1, Fig. 2 left)"),
                       ("DPO", "PPO-GT", "DPO >= PPO-GT at matched KL within 1 s.e. (the paper's full claim)"),
                       ("PPO-GT", "PPO", "PPO-GT >= PPO at matched KL within 1 s.e."),
                       ("PPO", "Preferred-FT", "PPO >= Preferred-FT at matched KL within 1 s.e.")):
        rows = matched_kl(seeds, a, b, edges)
        bins = [f"[{r['bin'][0]:g}, {'inf' if r['bin'][1] is None else format(r['bin'][1], 'g')})" for r in rows]
        out.append({"claim": text, "pass": bool(rows) and all(r["diff"] >= -r["se"] for r in rows), "bins": rows,
                    "measured": "; ".join(f"KL {name}: {r['a']:.3f} - {r['b']:.3f} = {r['diff']:+.3f} ± {r['se']:.3f} "
                                          f"({r['seeds']} seeds)" for name, r in zip(bins, rows))
                    or f"no KL bin holds both methods in >= {MIN_SEEDS} seeds"})
    points = [p for run in oracle_runs for p in run["points"]]
    worst = min(points, key=lambda p: p["frontier_gap"])
    out.append({"claim": "oracle: every point on or below the exact frontier (DPO Eqs. 4-5)",
                "pass": worst["frontier_gap"] >= -1e-9,
                "measured": f"{len(points)} points; least frontier gold - gold {worst['frontier_gap']:+.2e}"})
    finals = [p for p in points if "kl_to_optimum" in p]
    far = max(finals, key=lambda p: p["kl_to_optimum"])
    out.append({"claim": "oracle: KL(π_DPO‖π*_β) < 1e-3 at every β (DPO §5)", "pass": far["kl_to_optimum"] < 1e-3,
                "measured": f"largest {far['kl_to_optimum']:.2e} (β {far['beta']:g}), over {len(finals)} runs"})
    return out


def tables(helpdesk_runs: list[dict], oracle_runs: list[dict]) -> str:
    """Markdown: each helpdesk run's points (means over seeds); the first seed's oracle DPO runs."""
    lines = ["| method | setting | KL at each point (nats) | gold at each point | gain vs SFT at the end | "
             "win rate vs SFT |", "| --- " * 6 + "|"]
    for i, r in enumerate(helpdesk_runs[0]["runs"]):
        per = [run["runs"][i] for run in helpdesk_runs]
        kl, gold = (" ".join(f"{mean_se([p['points'][j][key] for p in per])[0]:.3f}" for j in range(len(r["points"])))
                    for key in ("kl", "gold"))
        gain = mean_se([p["final"]["gold"] - p["final"]["sft_gold"] for p in per])
        win = mean_se([p["final"]["win_rate_vs_sft"] for p in per])
        lines.append(f"| {r['method']} | {r['setting']} | {kl} | {gold} | {gain[0]:+.3f} ± {gain[1]:.3f} | "
                     f"{win[0]:.2f} ± {win[1]:.2f} |")
    sft = mean_se([run["runs"][0]["final"]["sft_gold"] for run in helpdesk_runs])
    lines += [f"| SFT | | 0 | {sft[0]:.3f} ± {sft[1]:.3f} | | |", "",
              "| oracle β | KL(π*‖π_ref) | E_π*[gold] | DPO KL | DPO gold | KL(π_DPO‖π*) |", "| --- " * 6 + "|"]
    lines += [f"| {p['beta']:g} | {p['optimum']['kl']:.3f} | {p['optimum']['gold']:.4f} | {p['kl']:.3f} | "
              f"{p['gold']:.4f} | {p['kl_to_optimum']:.1e} |" for p in oracle_runs[0]["points"] if "kl_to_optimum" in p]
    return "\n".join(lines)


def plot(helpdesk_runs: list[dict], oracle_runs: list[dict], out: Path) -> list[str]:
    """frontier.png: every helpdesk point (each seed); the first seed's oracle points against its frontier."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e .[plot]): no plots")
        return []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    flags = {"DPO": "train_dpo.py --beta={}", "PPO": "train_ppo.py --kl_target={}",
             "PPO-GT": "train_ppo.py --reward=gold --kl_target={}", "Preferred-FT": "train_sft.py on the chosen answers{}"}
    for (method, setting), marker in zip(dict.fromkeys((r["method"], r["setting"]) for r in helpdesk_runs[0]["runs"]),
                                         "os^Dvp<>"):
        runs = [r for run in helpdesk_runs for r in run["runs"] if (r["method"], r["setting"]) == (method, setting)]
        mean = [{k: sum(r["points"][i][k] for r in runs) / len(runs) for k in ("kl", "gold")}
                for i in range(min(len(r["points"]) for r in runs))]  # seed means, point by point along training
        axes[0].plot([p["kl"] for p in mean], [p["gold"] for p in mean], marker=marker, ms=5,
                     label=flags[method].format(setting.split()[-1] if setting else ""))
    for method, marker in (("DPO", "o"), ("Preferred-FT", "D")):
        pts = [p for p in oracle_runs[0]["points"] if p["method"] == method]
        axes[1].scatter([p["kl"] for p in pts], [p["gold"] for p in pts], s=14, marker=marker, label=method)
    sft = [run["runs"][0]["final"]["sft_gold"] for run in helpdesk_runs]
    axes[0].scatter([0] * len(sft), sft, s=40, color="black", marker="*", label="SFT")
    frontier = oracle_runs[0]["frontier"]
    axes[1].plot([f["kl"] for f in frontier], [f["gold"] for f in frontier], color="black", label="exact frontier")
    axes[0].set(xlabel="KL(π‖π_SFT) on held-out prompts (nats)", ylabel="gold (mean over held-out prompts)",
                title="Helpdesk: each run's evaluations along training, mean of the seeds")
    axes[1].set(xlabel="KL(π‖π_ref) (nats, exact)", ylabel="E_π[gold] (exact)",
                title="Oracle: 216 answers, the first seed")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close("all")
    return ["frontier.png"]


def main(cfg: Config) -> dict:
    t_start = time.time()
    # 1. the config and the inputs, checked before anything is written
    cfg = quick(cfg, QUICK)
    check_config(cfg, positive="n_prompts max_new_tokens eval_max_new_tokens batch_size dpo_steps dpo_lr ppo_updates "
                               "ppo_rollout ppo_lr kl_horizon rm_epochs rm_norm pft_steps pft_lr curve_points n_eval "
                               "oracle_pairs oracle_iters seeds", nonneg="ppo_beta", choices={"labels": ("bt", "gold")})
    edges = floats(cfg, "kl_bins")
    if sorted(set(edges)) != edges:
        raise SystemExit(f"--kl_bins={cfg.kl_bins}: the bin edges must be increasing, without repeats")
    for name in ("dpo_betas", "ppo_kl_targets", "gt_kl_targets", "oracle_betas"):
        floats(cfg, name)
    for name in ("dpo_steps", "ppo_updates", "pft_steps"):
        if getattr(cfg, name) % cfg.curve_points:
            raise SystemExit(f"--{name}={getattr(cfg, name)}: must be a multiple of --curve_points={cfg.curve_points}")
    if not (Path(cfg.init_from) / "config.json").exists():
        raise SystemExit(f"no checkpoint at {cfg.init_from}: first train the SFT policy: python train_sft.py")
    world = Path(cfg.data_dir)
    needed = ("prompts.jsonl", "prefs.jsonl", "sft_test.jsonl", "prefs_test.jsonl")
    if not all((world / name).exists() for name in needed):
        raise SystemExit(f"{world} lacks one of {', '.join(needed)}: python train_sft.py writes the helpdesk world")
    prompts = [r["prompt"] for r in read_jsonl(world / "prompts.jsonl", "prompts")]
    if not cfg.ppo_rollout <= cfg.n_prompts <= len(prompts):
        raise SystemExit(f"--n_prompts={cfg.n_prompts}: need between --ppo_rollout={cfg.ppo_rollout} and the "
                         f"{len(prompts)} prompts in {world / 'prompts.jsonl'}")

    # 2. every seed: the oracle part, then the helpdesk part's pairs and runs, in a scratch directory
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = setup(cfg.seed, cfg.device).device
    policy, tok = load_model(cfg.init_from)
    policy = policy.to(device)
    helpdesk_runs, oracle_runs = [], []
    with logged(out / "log.txt") as log:
        for seed in range(cfg.seed, cfg.seed + cfg.seeds):
            oracle_runs.append(oracle_seed(cfg, seed, log))
            with tempfile.TemporaryDirectory() as work:
                work = Path(work)
                (work / "data").mkdir()
                for name in needed[1:]:  # held out; prefs.jsonl unread but present, or train_rm.py writes a world
                    (work / "data" / name).symlink_to((world / name).resolve())
                helpdesk_runs.append(run_seed(cfg, seed, policy, tok, prompts, work, log))

    # 3. the claims, tables, the plot and results.json
    found = claims(helpdesk_runs, oracle_runs, edges)
    result = {"config": asdict(cfg), "helpdesk": helpdesk_runs, "oracle": oracle_runs, "claims": found,
              "plots": plot(helpdesk_runs, oracle_runs, out), "time_s": time.time() - t_start}
    return write_results(out, result, tables(helpdesk_runs, oracle_runs), found, cfg.seeds)


if __name__ == "__main__":
    main(parse_config(Config))
