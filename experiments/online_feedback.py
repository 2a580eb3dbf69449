"""Reproduction T5: online against offline AI feedback at the same number of labels (Guo et al. 2024, "Direct
Language Model Alignment from Online AI Feedback", §3-4).

    python train_sft.py && python -m nanoalign.rlaif       # once: out/sft, out/judge and data/ai_pairs.jsonl
    python experiments/online_feedback.py                  # 3 seeds, the table and out/online_feedback/results.json

Per seed, three arms spend the same number of AI labels (--labels) from the same feedback model (out/judge):

    online DPO            train_dpo.py --online=True --labeller=ai: each step the current policy answers --batch_size
                          training prompts twice and the feedback model picks (OAIF Algorithm 1), --labels / --batch_size
                          steps; pairs of equal or empty answers cost no label and ties train nothing, so it may use a
                          few labels fewer than the others (never more: the budget stops it)
    offline DPO           train_dpo.py on --labels pairs drawn (by seed) from the AI-labelled SFT samples that
                          `python -m nanoalign.rlaif` wrote (data/ai_pairs.jsonl), the same steps and batch
    RLAIF -> RM -> PPO    train_rm.py on those same pairs, then train_ppo.py on that reward model (--ppo_updates)

Both DPO arms train on the feedback model's pick (chosen = the answer it prefers, no soft "p"), as OAIF does; the
reward model reads the same picks. Every arm starts from out/sft with the same β, learning rate and schedule as
train_dpo.py's and train_ppo.py's defaults, and is measured by the gold judge against KL to SFT on the same
held-out prompts (--n_eval), at --eval_points points during training and at the end. The paper's claim, online >
offline at matched labels, and online against RLAIF -> RM -> PPO are printed with PASS or FAIL as measured: means
over seeds ± one standard error, differences paired by seed.

Budget: 2048 labels (64 steps of 32 prompts) per arm keeps the default run near 12 minutes on the 2 cores, estimated
from the stages' measured speeds (README: DPO ~0.3 s a step, the feedback model 139 comparisons/s, sampling ~200
answers/s, PPO ~2 s an update): per seed about 90 s online (sampling and labelling 64 answers and 32 comparisons a
step), 30 s offline, 25 s for the reward model and 60 s for 30 PPO updates, with 100 evaluation prompts at 3 points
each. The run itself reports its time (time_s).
"""

import contextlib
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the training scripts
import train_dpo  # noqa: E402
import train_ppo  # noqa: E402
import train_rm  # noqa: E402
from nanoalign.config import check_config, parse_config  # noqa: E402
from nanoalign.data import read_jsonl, write_jsonl  # noqa: E402
from nanoalign.report.experiment import logged, mean_se, quick, write_results  # noqa: E402
from nanoalign.rlaif import judge_finished  # noqa: E402

ARMS = ("online DPO", "offline DPO", "RLAIF -> RM -> PPO")


@dataclass
class Config:
    data_dir: str = "data"  # the helpdesk world: prompts.jsonl, sft_test.jsonl, prefs_test.jsonl
    policy: str = "out/sft"  # every arm's start and reference
    judge: str = "out/judge"  # the feedback model (python -m nanoalign.rlaif trains it)
    ai_pairs: str = "data/ai_pairs.jsonl"  # the AI-labelled SFT samples (python -m nanoalign.rlaif writes them)
    out_dir: str = "out/online_feedback"  # results.json and log.txt
    labels: int = 2048  # AI labels per arm (a multiple of --batch_size)
    batch_size: int = 32  # prompts (online) or pairs (offline) per DPO step
    rm_norm: int = 64  # SFT samples that fix the reward model's gain and bias (train_rm.py: 256)
    ppo_updates: int = 30  # PPO updates on the reward model (train_ppo.py: 60)
    ppo_rollout: int = 64  # PPO episodes per update
    max_new_tokens: int = 64  # answer length when sampling pairs, normalisation samples and rollouts
    n_eval: int = 100  # held-out prompts for gold and KL (the same for every arm)
    eval_points: int = 2  # gold-vs-KL points during training, before the final evaluation
    seeds: int = 3  # seed, seed + 1, ...: the subsample, the data order, the sampling
    seed: int = 1234  # the first seed
    quick: bool = False  # a smoke run on tiny settings (the tests): numbers mean nothing
    device: str = "auto"  # auto | cpu | cuda


QUICK = dict(labels=12, batch_size=6, rm_norm=8, ppo_updates=2, ppo_rollout=4, max_new_tokens=8, n_eval=2,
             eval_points=1, seeds=2)


def curve(out_dir: Path, final: dict) -> list[dict]:
    """An arm's gold-vs-KL points: those its log holds (eval/gold, eval/kl at --eval_points), then eval.json's."""
    points = [{"step": r["step"], "gold": r["eval/gold"], "kl": r["eval/kl"]}
              for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines()) if "eval/kl" in r]
    return points + [{"step": None, "gold": final["gold"], "kl": final["kl"]}]


def arm_result(out_dir: Path, final: dict, labels: int, seconds: float) -> dict:
    return {"gold": final["gold"], "kl": final["kl"], "sft_gold": final["sft_gold"],
            "gain": final["gold"] - final["sft_gold"], "labels": labels, "curve": curve(out_dir, final),
            "time_s": seconds}


def run_seed(cfg: Config, seed: int, pool: list[dict], log) -> dict:
    """One seed: the three arms at --labels AI labels each -> {arm: its result}."""
    steps = cfg.labels // cfg.batch_size
    dpo = dict(data_dir=cfg.data_dir, init_from=cfg.policy, batch_size=cfg.batch_size, max_steps=steps,
               warmup_steps=max(1, steps // 10), n_eval=cfg.n_eval, eval_interval=steps // (cfg.eval_points + 1),
               log_interval=10 ** 6, ckpt_interval=10 ** 6, device=cfg.device, seed=seed)
    results = {}
    with tempfile.TemporaryDirectory() as work, contextlib.redirect_stdout(None):
        work = Path(work)
        t0 = time.time()
        final = train_dpo.main(train_dpo.Config(
            out_dir=str(work / "online"), online=True, labeller="ai", judge=cfg.judge, label_budget=cfg.labels,
            sample_max_new_tokens=cfg.max_new_tokens, **dpo))
        used = json.loads((work / "online" / "config.json").read_text())["labels"]
        results["online DPO"] = arm_result(work / "online", final, used["used"], time.time() - t0)
        results["online DPO"]["gold_agreement"] = used["agree"] / used["compared"] if used["compared"] else None

        # the same number of AI labels from the offline pool: the feedback model's pick, without the soft "p"
        picked = random.Random(f"{seed}/pairs").sample(pool, cfg.labels)
        write_jsonl(work / "pairs.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in picked])
        t0 = time.time()
        final = train_dpo.main(train_dpo.Config(out_dir=str(work / "offline"), pairs_file=str(work / "pairs.jsonl"),
                                                cache_dir=str(work / "cache"), **dpo))
        results["offline DPO"] = arm_result(work / "offline", final, cfg.labels, time.time() - t0)

        t0 = time.time()
        train_rm.main(train_rm.Config(
            data_dir=cfg.data_dir, out_dir=str(work / "rm"), init_from=cfg.policy, data="pairs",
            pairs_file=str(work / "pairs.jsonl"), epochs=1, batch_size=cfg.batch_size, n_norm=cfg.rm_norm,
            max_new_tokens=cfg.max_new_tokens, log_interval=10 ** 6, ckpt_interval=10 ** 6, device=cfg.device,
            seed=seed))
        final = train_ppo.main(train_ppo.Config(
            data_dir=cfg.data_dir, init_from=cfg.policy, reward_model=str(work / "rm"), out_dir=str(work / "ppo"),
            n_updates=cfg.ppo_updates, rollout_size=cfg.ppo_rollout, max_new_tokens=cfg.max_new_tokens,
            n_eval=cfg.n_eval, eval_interval=max(1, cfg.ppo_updates // (cfg.eval_points + 1)), log_interval=10 ** 6,
            ckpt_interval=10 ** 6, device=cfg.device, seed=seed))
        results["RLAIF -> RM -> PPO"] = arm_result(work / "ppo", final, cfg.labels, time.time() - t0)
    for arm, r in results.items():
        log(f"seed {seed} {arm:20s} {r['labels']} labels: gold {r['gold']:.3f} (SFT {r['sft_gold']:.3f}), "
            f"KL {r['kl']:.2f} ({r['time_s']:.0f}s)")
    return results


def over_seeds(runs: list[dict], arm: str, key: str) -> list[float]:
    return [run[arm][key] for run in runs]


def paired(runs: list[dict], a: str, b: str, key: str = "gold") -> tuple[float, float]:
    """mean ± s.e. over seeds of key(a) - key(b), paired by seed."""
    return mean_se([x - y for x, y in zip(over_seeds(runs, a, key), over_seeds(runs, b, key))])


def claims(runs: list[dict]) -> list[dict]:
    out = []
    d, s = paired(runs, "online DPO", "offline DPO")
    out.append({"claim": "online DPO > offline DPO on gold at matched AI labels (OAIF §4)", "pass": d > 0,
                "measured": f"online - offline {d:+.3f} ± {s:.3f}"})
    d, s = paired(runs, "online DPO", "RLAIF -> RM -> PPO")
    out.append({"claim": "online DPO > RLAIF -> RM -> PPO on gold at matched AI labels (OAIF §4)", "pass": d > 0,
                "measured": f"online - (RM -> PPO) {d:+.3f} ± {s:.3f}"})
    g, s = mean_se(over_seeds(runs, "online DPO", "gain"))
    out.append({"claim": "online DPO beats SFT on gold", "pass": g > 0, "measured": f"gain {g:+.3f} ± {s:.3f}"})
    return out


def table(runs: list[dict]) -> str:
    """Markdown: one row per arm, each number's mean ± s.e. over seeds."""
    lines = ["| arm | labels | gold | gain vs SFT | KL | seconds |", "| --- | --- | --- | --- | --- | --- |"]
    for arm in ARMS:
        cells = [mean_se(over_seeds(runs, arm, k)) for k in ("labels", "gold", "gain", "kl", "time_s")]
        lines.append(f"| {arm} | {cells[0][0]:.0f} | {cells[1][0]:.3f} ± {cells[1][1]:.3f} | "
                     f"{cells[2][0]:+.3f} ± {cells[2][1]:.3f} | {cells[3][0]:.2f} ± {cells[3][1]:.2f} | "
                     f"{cells[4][0]:.0f} |")
    return "\n".join(lines)


def main(cfg: Config) -> dict:
    t_start = time.time()
    cfg = quick(cfg, QUICK)
    check_config(cfg, positive="labels batch_size rm_norm ppo_updates ppo_rollout max_new_tokens n_eval seeds",
                 nonneg="eval_points")
    if cfg.labels % cfg.batch_size:
        raise SystemExit(f"--labels={cfg.labels}: must be a multiple of --batch_size={cfg.batch_size}")
    if cfg.labels // cfg.batch_size < cfg.eval_points + 1:
        raise SystemExit(f"--eval_points={cfg.eval_points}: needs --labels / --batch_size > {cfg.eval_points} steps")
    for path, what in ((cfg.policy, "the SFT policy: python train_sft.py"),):
        if not (Path(path) / "config.json").exists():
            raise SystemExit(f"no checkpoint at {path}: first train {what}")
    if not judge_finished(cfg.judge):
        raise SystemExit(f"no feedback model at {cfg.judge}: first train it: python -m nanoalign.rlaif")
    if not Path(cfg.ai_pairs).exists():
        raise SystemExit(f"no AI-labelled pairs at {cfg.ai_pairs}: python -m nanoalign.rlaif writes them")
    pool = read_jsonl(cfg.ai_pairs, "pairs")
    if len(pool) < cfg.labels:
        raise SystemExit(f"--labels={cfg.labels}: more than the {len(pool)} AI-labelled pairs in {cfg.ai_pairs}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    with logged(out / "log.txt") as log:
        for seed in range(cfg.seed, cfg.seed + cfg.seeds):
            runs.append(run_seed(cfg, seed, pool, log))
    found = claims(runs)
    result = {"config": asdict(cfg), "runs": runs, "claims": found, "time_s": time.time() - t_start}
    return write_results(out, result, table(runs), found, cfg.seeds)


if __name__ == "__main__":
    main(parse_config(Config))
