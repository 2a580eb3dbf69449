"""Reproduction T4: what AI-feedback labels are worth, arm by arm (Bai et al. 2022, Constitutional AI §4.1-4.3;
Lee et al. 2023, RLAIF).

    python train_sft.py && python -m nanoalign.rlaif       # once: out/sft and the feedback model out/judge
    python experiments/rlaif_labels.py                     # 3 seeds, the table and out/rlaif_labels/results.json

Per seed, the SFT policy answers n_prompts training prompts k times, and every pair of different answers is
labelled under every principle, in both orders, by the feedback model (out/judge) and by the synthetic labeller
(slot A's log-odds kappa·(s(A) - s(B)) + position_bias + noise, biased toward slot A). Each arm reads its labels
from those preferences:

    soft                  one principle drawn per comparison (CAI §4.1), both orders averaged: P
    hard                  1[P > ½]: over-confident labels, as chain-of-thought labels are (CAI §4.3: near 0 or 1)
    clamped               the hard labels clipped to [0.4, 0.6] (0.6 for the preferred answer, ½ on a tie, however
                          sure P was), as CAI clamps its over-confident chain-of-thought labels; not
                          `python -m nanoalign.rlaif --labels=clamped`, which clips P itself
    ensemble              P averaged over every principle (feedback model)
    principle m alone     every comparison under principle m (feedback model; --principles=single)
    one order             the drawn principle, slot A only: no order averaging
    unbiased              soft, from the synthetic labeller without its position bias

Each arm's labels train a reward model with train_rm.py's own code (--data=pairs, the soft Bradley-Terry loss,
its defaults), measured on the world's held-out rankings: accuracy against the gold order and against the noisy
labels, log-loss and calibration error against the noisy labels. The --ppo_arms of the feedback model also train
a short PPO policy with train_ppo.py's code on that reward model, evaluated against SFT on the same held-out
prompts. The published claims (CAI §4.3, RLAIF) are printed with PASS or FAIL as measured: a mean over seeds,
± one standard error, differences paired by seed.
"""

import contextlib
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the training scripts
import train_ppo  # noqa: E402
import train_rm  # noqa: E402
from nanoalign import rlaif  # noqa: E402
from nanoalign.checkpoint import load_model  # noqa: E402
from nanoalign.config import check_config, parse_config  # noqa: E402
from nanoalign.data import read_jsonl, write_jsonl  # noqa: E402
from nanoalign.report.experiment import logged, mean_se, write_results  # noqa: E402
from nanoalign.scaffold import setup  # noqa: E402
from nanoalign.world import helpdesk  # noqa: E402
from nanoalign.world.constitution import option_ids, read_constitution  # noqa: E402


@dataclass
class Config:
    data_dir: str = "data"  # the helpdesk world: prompts.jsonl, prefs_test.jsonl, sft_test.jsonl
    policy: str = "out/sft"  # the policy whose answers are labelled, the reward models' trunk, PPO's start
    judge: str = "out/judge"  # the feedback model (python -m nanoalign.rlaif trains it)
    out_dir: str = "out/rlaif_labels"  # results.json and one log per seed
    labellers: str = "model,synthetic"  # model: the feedback model | synthetic: the controlled labeller
    label_modes: str = "soft,hard,clamped"  # label arms; clamped: the hard labels clipped (soft: every other arm)
    principles: str = "single,ensemble"  # single: one arm per principle alone | ensemble: P averaged over all
    orders: str = "both,one"  # one: an arm without order averaging (and, synthetic, one without bias)
    seeds: int = 3  # seed, seed + 1, ...: prompts, sampling, principle draws, labeller noise, RM and PPO
    seed: int = 1234  # the first seed
    n_prompts: int = 80  # training prompts per seed, k answers each, every pair labelled
    k: int = 4  # answers per prompt
    max_new_tokens: int = 64  # answer length when sampling the policy (PPO's rollout length)
    kappa: float = 5.0  # synthetic: log-odds per unit of principle score
    noise: float = 1.0  # synthetic: std of the Gaussian log-odds noise
    position_bias: float = 1.0  # synthetic: log-odds added in favour of slot A
    batch_size: int = 16  # comparisons per forward of the feedback model
    rm_epochs: int = 2  # reward model: passes over the arm's pairs (train_rm.py's default)
    rm_batch_size: int = 32  # reward model: pairs per step
    ppo_arms: str = "hard,clamped"  # feedback-model arms that also train PPO on their reward model ("" = none)
    ppo_updates: int = 20  # PPO updates per arm (train_ppo.py: 60)
    ppo_rollout: int = 64  # PPO episodes per update
    n_eval: int = 100  # held-out prompts for each PPO policy (and SFT on the same prompts)
    device: str = "auto"  # auto | cpu | cuda


def arm_labels(pref: dict, drawn: torch.Tensor, cfg: Config, labeller: str, unbiased: dict | None = None) -> dict:
    """Every arm's labels P(y1 ≻ y2) [n] from one labeller's preferences {"p_ab", "p_ba"} [n, M] (every pair under
    every principle); drawn [n]: the principle drawn for each pair."""
    rows = torch.arange(len(drawn))
    both = rlaif.combine(pref["p_ab"], pref["p_ba"])  # [n, M]
    soft = both[rows, drawn]
    arms = {"soft": soft}
    if "hard" in cfg.label_modes or "clamped" in cfg.label_modes:
        arms["hard"] = rlaif.label(soft, "hard")
    if "clamped" in cfg.label_modes:
        arms["clamped"] = rlaif.label(arms["hard"], "clamped")
    if "ensemble" in cfg.principles and labeller == "model":
        arms["ensemble"] = both.mean(1)
    if "one" in cfg.orders:
        arms["one order"] = pref["p_ab"][rows, drawn]
        if unbiased is not None:
            arms["unbiased"] = rlaif.combine(unbiased["p_ab"], unbiased["p_ba"])[rows, drawn]
    if "single" in cfg.principles and labeller == "model":
        arms.update({f"principle {m + 1} alone": both[:, m] for m in range(both.shape[1])})
    return arms


def train_reward_model(cfg: Config, pairs: list, p: torch.Tensor, work: Path, seed: int) -> dict:
    """train_rm.py --data=pairs on these labels, in this process -> its eval.json (the checkpoint in work/rm)."""
    write_jsonl(work / "pairs.jsonl", rlaif.pair_rows(pairs, p))
    return train_rm.main(train_rm.Config(
        data_dir=cfg.data_dir, out_dir=str(work / "rm"), init_from=cfg.policy, data="pairs",
        pairs_file=str(work / "pairs.jsonl"), soft_labels=True, epochs=cfg.rm_epochs, batch_size=cfg.rm_batch_size,
        micro_batch_size=cfg.rm_batch_size, n_norm=64, max_new_tokens=cfg.max_new_tokens, log_interval=10 ** 6,
        ckpt_interval=10 ** 6, device=cfg.device, seed=seed))


def train_policy(cfg: Config, work: Path, seed: int) -> dict:
    """train_ppo.py on the reward model in work/rm, in this process -> its eval.json."""
    return train_ppo.main(train_ppo.Config(
        data_dir=cfg.data_dir, init_from=cfg.policy, reward_model=str(work / "rm"), out_dir=str(work / "ppo"),
        n_updates=cfg.ppo_updates, rollout_size=cfg.ppo_rollout, max_new_tokens=cfg.max_new_tokens,
        n_eval=cfg.n_eval, log_interval=10 ** 6, ckpt_interval=10 ** 6, device=cfg.device, seed=seed))


def run_seed(cfg: Config, seed: int, principles, policy, tok, judge, judge_tok, log) -> dict:
    """One seed: sample the pairs, ask both labellers, train every arm's reward model (and PPO policy)
    -> {labeller: {arm: metrics}}."""
    lcfg = rlaif.Config(k=cfg.k, max_new_tokens=cfg.max_new_tokens, kappa=cfg.kappa, noise=cfg.noise,
                        position_bias=cfg.position_bias, batch_size=cfg.batch_size, seed=seed)
    prompts = [r["prompt"] for r in read_jsonl(Path(cfg.data_dir) / "prompts.jsonl", "prompts")]
    prompts = random.Random(seed).sample(prompts, min(cfg.n_prompts, len(prompts)))
    pairs, _ = rlaif.sample_pairs(policy, tok, prompts, lcfg, source=cfg.policy)
    every = [(i, m) for i in range(len(pairs)) for m in range(len(principles))]  # each pair under each principle
    rng = random.Random(f"{seed}/principles")
    drawn = torch.tensor([rng.randrange(len(principles)) for _ in pairs])
    gold = rlaif.gold_scores(pairs)
    results, rows = {"position": {}}, torch.arange(len(pairs))
    for labeller in cfg.labellers.split(","):
        t0 = time.time()
        feedback_model = (judge, judge_tok) if labeller == "model" else (None, None)

        def ask(c):  # [n pairs, M principles] each
            return {k: v.view(len(pairs), -1)
                    for k, v in rlaif.preferences(pairs, every, principles, c, *feedback_model).items()}
        pref = ask(lcfg)
        unbiased = None if labeller == "model" else ask(replace(lcfg, position_bias=0.0))
        log(f"seed {seed}: {len(pairs)} pairs x {len(principles)} principles labelled by the {labeller} labeller "
            f"({time.time() - t0:.0f}s)")
        # position bias: P(slot A) when both slots hold the same answer (½ without bias); and on the labelled
        # pairs, whose y1 is a random one of the two answers, so that an unbiased labeller's mean P(y1) is ½
        if labeller == "model":
            same = rlaif.position_bias(judge, judge_tok, pairs, principles, lcfg)
        else:
            zero = torch.zeros(200, dtype=torch.float64)
            s = rlaif.synthetic_preferences(zero, zero, cfg.kappa, cfg.noise, cfg.position_bias,
                                            torch.Generator().manual_seed(seed))
            same = {"one_order": s["p_ab"].mean().item(), "both_orders": rlaif.combine(**s).mean().item()}
        results["position"][labeller] = {
            "identical_answers": same, "pairs_one_order": pref["p_ab"][rows, drawn].mean().item(),
            "pairs_both_orders": rlaif.combine(pref["p_ab"], pref["p_ba"])[rows, drawn].mean().item()}
        results[labeller] = {}
        for arm, p in arm_labels(pref, drawn, cfg, labeller, unbiased).items():
            t0 = time.time()
            quality = rlaif.label_quality(p, gold[:, 0], gold[:, 1])
            metrics = {"labels": {"agreement": quality["agreement"], "log_loss": quality["log_loss"],
                                  "calibration_error": quality["calibration"]["error"]}}
            with tempfile.TemporaryDirectory() as work, contextlib.redirect_stdout(None):
                metrics["rm"] = train_reward_model(cfg, pairs, p, Path(work), seed)
                if labeller == "model" and arm in cfg.ppo_arms.split(","):
                    metrics["ppo"] = train_policy(cfg, Path(work), seed)
            results[labeller][arm] = metrics
            ppo = metrics.get("ppo")
            log(f"seed {seed} {labeller:9s} {arm:20s} labels agree {over_seeds([results], labeller, arm, 'labels', 'agreement')[0]:.3f}, RM accuracy vs gold "
                f"{metrics['rm']['accuracy_vs_gold']:.3f}"
                + (f", PPO gold {ppo['gold']:.3f} (SFT {ppo['sft_gold']:.3f}), KL {ppo['kl']:.2f}" if ppo else "")
                + f" ({time.time() - t0:.0f}s)")
    results["human_label_agreement"] = helpdesk.bayes_ceiling(gold.tolist())
    results["pairs"] = len(pairs)
    return results


# ----- the summary and the claims -----------------------------------------------------------------------------


def over_seeds(runs: list[dict], labeller: str, arm: str, *path) -> list[float]:
    """One metric (a path into an arm's metrics) for each seed; NaN where it is undefined (None: a label metric on
    a sample where no pair's gold differs), so every mean and difference over seeds that includes it is NaN."""
    values = []
    for run in runs:
        x = run[labeller][arm]
        for key in path:
            x = x[key]
        values.append(math.nan if x is None else x)
    return values



def paired(runs, labeller, arm_a, arm_b, *path) -> tuple[float, float]:
    """mean ± s.e. over seeds of metric(arm_a) - metric(arm_b), paired by seed."""
    return mean_se([a - b for a, b in zip(over_seeds(runs, labeller, arm_a, *path),
                                          over_seeds(runs, labeller, arm_b, *path))])


def claims(runs: list[dict], cfg: Config) -> list[dict]:
    """The published claims that the arms run here can test, each with what was measured and PASS / FAIL."""
    out = []

    def claim(text, passed, measured):
        out.append({"claim": text, "pass": bool(passed), "measured": measured})

    for labeller in cfg.labellers.split(","):
        arms = runs[0][labeller]
        tag = f"[{labeller}]"
        if {"soft", "hard"} <= arms.keys():
            d, s = paired(runs, labeller, "soft", "hard", "rm", "accuracy_vs_gold")
            claim(f"{tag} soft >= hard labels: RM accuracy against gold (CAI §4.3)", d >= 0,
                  f"soft - hard {d:+.3f} ± {s:.3f}")
            d, s = paired(runs, labeller, "soft", "hard", "rm", "loss")
            claim(f"{tag} soft >= hard labels: RM held-out log-loss", d <= 0, f"soft - hard {d:+.3f} ± {s:.3f}")
        if {"hard", "clamped"} <= arms.keys():
            d, s = paired(runs, labeller, "clamped", "hard", "rm", "calibration_error")
            claim(f"{tag} clamping over-confident labels -> better-calibrated RM (CAI §4.3)", d < 0,
                  f"calibration error clamped - hard {d:+.3f} ± {s:.3f}")
            if "ppo" in arms["hard"] and "ppo" in arms["clamped"]:
                dk, sk = paired(runs, labeller, "clamped", "hard", "ppo", "kl")
                dg, sg = paired(runs, labeller, "clamped", "hard", "ppo", "gold")
                claim(f"{tag} ... and less extreme RL: lower KL at equal gold (within 1 s.e.)", dk < 0 and dg >= -sg,
                      f"clamped - hard: KL {dk:+.2f} ± {sk:.2f}, gold {dg:+.3f} ± {sg:.3f}")
        singles = [a for a in arms if a.endswith(" alone")]
        if "ensemble" in arms and singles:
            acc = {a: mean_se(over_seeds(runs, labeller, a, "rm", "accuracy_vs_gold")) for a in ["ensemble", *singles]}
            best = max(singles, key=lambda a: acc[a][0])
            claim(f"{tag} the principles' ensemble beats every single principle: RM accuracy against gold",
                  acc["ensemble"][0] > acc[best][0],
                  f"ensemble {acc['ensemble'][0]:.3f} ± {acc['ensemble'][1]:.3f}, best single ({best}) "
                  f"{acc[best][0]:.3f} ± {acc[best][1]:.3f}")
            if len(runs) > 1:
                single_se = sum(acc[a][1] for a in singles) / len(singles)
                claim(f"{tag} ... with lower seed variance", acc["ensemble"][1] < single_se,
                      f"s.e. over seeds: ensemble {acc['ensemble'][1]:.3f}, single principles (mean) {single_se:.3f}")
        if "one" in cfg.orders:
            pos = {k: mean_se([r["position"][labeller]["identical_answers"][k] for r in runs])
                   for k in ("one_order", "both_orders")}
            pairs = {k: mean_se([r["position"][labeller][f"pairs_{k}"] for r in runs]) for k in ("one_order",
                                                                                                "both_orders")}
            claim(f"{tag} order averaging removes the measured position bias: P(slot A) for the same answer in both "
                  f"slots nearer ½ (RLAIF)", abs(pos["both_orders"][0] - 0.5) < abs(pos["one_order"][0] - 0.5),
                  f"one order {pos['one_order'][0]:.3f} ± {pos['one_order'][1]:.3f}, both orders "
                  f"{pos['both_orders'][0]:.3f} ± {pos['both_orders'][1]:.3f}; mean P(y1) on the labelled pairs "
                  f"{pairs['one_order'][0]:.3f} and {pairs['both_orders'][0]:.3f}")
        if {"soft", "one order"} <= arms.keys():
            d, s = paired(runs, labeller, "soft", "one order", "labels", "log_loss")
            claim(f"{tag} ... the labels' log-loss against gold falls", d < 0, f"both orders - one order {d:+.3f} ± "
                                                                               f"{s:.3f}")
            d, s = paired(runs, labeller, "soft", "one order", "rm", "accuracy_vs_gold")
            claim(f"{tag} ... and the RM's accuracy against gold rises", d > 0,
                  f"both orders - one order {d:+.3f} ± {s:.3f}")
        if {"soft", "unbiased"} <= arms.keys():
            d, s = paired(runs, labeller, "soft", "unbiased", "rm", "accuracy_vs_gold")
            claim(f"{tag} with order averaging the biased labeller's RM is no worse than the unbiased one's (within "
                  f"1 s.e.)", d >= -s, f"biased - unbiased {d:+.3f} ± {s:.3f}")
        for arm in (a for a in arms if "ppo" in arms[a]):
            g, s = mean_se([r[labeller][arm]["ppo"]["gold"] - r[labeller][arm]["ppo"]["sft_gold"] for r in runs])
            claim(f"{tag} RLAIF PPO ({arm} labels) beats SFT on gold", g > 0, f"gain {g:+.3f} ± {s:.3f}")
            rates = {f: (mean_se(over_seeds(runs, labeller, arm, "ppo", "failures", f))[0],
                         mean_se(over_seeds(runs, labeller, arm, "ppo", "sft_failures", f))[0])
                     for f in helpdesk.FAILURES}
            claim(f"{tag} ... and lowers each failure rate", all(p <= s for p, s in rates.values()),
                  ", ".join(f"{f} {p:.2f} (SFT {s:.2f})" for f, (p, s) in rates.items()))
    return out


def table(runs: list[dict], cfg: Config) -> str:
    """Markdown: one row per labeller and arm, each metric's mean ± s.e. over seeds."""
    cols = [("labels agree", ("labels", "agreement")), ("labels log-loss", ("labels", "log_loss")),
            ("RM acc. vs gold", ("rm", "accuracy_vs_gold")), ("RM acc. vs labels", ("rm", "accuracy")),
            ("RM log-loss", ("rm", "loss")), ("RM calib. error", ("rm", "calibration_error")),
            ("PPO gold", ("ppo", "gold")), ("PPO KL", ("ppo", "kl"))]
    lines = ["| labeller | arm | " + " | ".join(c for c, _ in cols) + " |", "| --- " * (len(cols) + 2) + "|"]
    for labeller in cfg.labellers.split(","):
        for arm, metrics in runs[0][labeller].items():
            cells = []
            for _, (stage, key) in cols:
                if stage in metrics:
                    m, s = mean_se(over_seeds(runs, labeller, arm, stage, key))
                    cells.append(f"{m:.3f} ± {s:.3f}" if key != "kl" else f"{m:.2f} ± {s:.2f}")
                else:
                    cells.append("")
            lines.append(f"| {labeller} | {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(cfg: Config) -> dict:
    t_start = time.time()
    for name, value, allowed in (("labellers", cfg.labellers, ("model", "synthetic")),
                                 ("label_modes", cfg.label_modes, ("soft", "hard", "clamped")),
                                 ("principles", cfg.principles, ("single", "ensemble")),
                                 ("orders", cfg.orders, ("both", "one"))):
        if not set(value.split(",")) <= set(allowed):
            raise SystemExit(f"--{name}={value}: expected a comma-separated subset of {', '.join(allowed)}")
    check_config(cfg, positive="seeds n_prompts max_new_tokens batch_size rm_epochs rm_batch_size ppo_updates "
                               "ppo_rollout", nonneg="kappa noise position_bias n_eval")
    if cfg.k < 2:
        raise SystemExit(f"--k={cfg.k}: need at least 2 answers per prompt to compare")
    if "soft" not in cfg.label_modes.split(","):
        raise SystemExit(f"--label_modes={cfg.label_modes}: soft is every other arm's mode and must be included")
    for path, what in ((cfg.policy, "the SFT policy: python train_sft.py"),
                       *([(cfg.judge, "the feedback model: python -m nanoalign.rlaif")]
                         if "model" in cfg.labellers else [])):
        if not (Path(path) / "config.json").exists():
            raise SystemExit(f"no checkpoint at {path}: first train {what}")
    principles = read_constitution()
    device = setup(cfg.seed, cfg.device).device
    policy, tok = load_model(cfg.policy)
    policy = policy.to(device)
    judge = judge_tok = None
    if "model" in cfg.labellers:
        judge, judge_tok = load_model(cfg.judge)
        judge = judge.to(device).eval()
        option_ids(judge_tok, cfg.judge)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    with logged(out / "log.txt") as log:
        for seed in range(cfg.seed, cfg.seed + cfg.seeds):
            runs.append(run_seed(cfg, seed, principles, policy, tok, judge, judge_tok, log))
    found = claims(runs, cfg)
    result = {"config": asdict(cfg), "runs": runs, "claims": found, "time_s": time.time() - t_start,
              "human_label_agreement": mean_se([r["human_label_agreement"] for r in runs]),
              "pairs_per_seed": [r["pairs"] for r in runs]}
    return write_results(out, result, f"{table(runs, cfg)}\n\nlabels drawn like the world's human ones (σ(κ Δgold)) "
                         f"would agree with gold {result['human_label_agreement'][0]:.3f} on these pairs", found,
                         len(runs))


if __name__ == "__main__":
    main(parse_config(Config))
