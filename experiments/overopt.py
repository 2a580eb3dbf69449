"""Reproduction T1: reward-model overoptimisation, best-of-N and RL against proxies of 3 sizes and 3 data sizes
(Gao et al. 2022, "Scaling laws for reward model overoptimization", §3).

    python train_sft.py                                    # once: out/sft and the helpdesk world in data/
    python experiments/overopt.py                          # 3 seeds (run time: docs/reproductions.md, "T1")
    python experiments/overopt.py --n_pairs=500,2000,8000 --ppo_proxies=4:500,4:2000,4:8000   # larger proxies
    python experiments/overopt.py --quick=True             # a smoke run in seconds (tiny grid): not results

Gold is the helpdesk judge. Each proxy is a reward model trained by train_rm.py's own code, in this process, for
one epoch on --n_pairs pairs of the world's rankings (whole rankings, hard orders drawn by Plackett-Luce on
kappa·gold: about 80% of their pairs agree with gold), on the SFT trunk cut to --sizes blocks. Per seed and proxy:

    best-of-N   the proxy scores one shared pool of SFT answers (--pool_size per prompt on --pool_prompts training
                prompts); for n = 1, 2, 4, ..., pool_size the unbiased pool estimator gives the expected proxy and
                gold score of the proxy's pick among n (`nanoalign.evaluate.best_of_n_curve`), at the analytic
                KL = log n - (n-1)/n
    RL          (--ppo_proxies) train_ppo.py with KL coefficient 0 on the proxy, trained on the pool's prompts;
                one point per pass over them (pool_prompts / ppo_rollout updates): the rollouts' mean KL (k1),
                gold and proxy

Scores are normalised under the SFT policy, so that every curve starts at 0 and moves in standard deviations:
gold minus the pool's mean gold, over the pool's gold std (one pair for every curve); a proxy likewise on its own
pool scores (PPO's logged score is first un-normalised with the proxy's stored gain and bias). Gold against
d = √KL is fitted by `nanoalign.evaluate.gao_fit` on the seed-averaged curves, with Gao's forms (§3): best-of-N
R(d) = d(α − βd), peak d* = α/(2β); RL R(d) = d(α − β log d), peak d* = exp(α/β − 1).

The published claims are printed with PASS or FAIL as measured (means over seeds ± one standard error): the
proxy rises monotonically with d (for best-of-N this holds on one pool by construction: the mean best of n + 1
never falls below the mean best of n; RL's is the test); gold rises then falls for the data-poorer proxies (the
seed-averaged curve peaks inside the range, fitted β > 0); R² >= 0.9 for both forms, the best-of-N form beating a
line in KL with as many parameters; d* moves right and β falls with data at each size, and with size at each data
size (best-of-N), and over the PPO proxies in order of data; at equal d, RL's gold gain <= best-of-N's with the
same proxy. results.json holds every seed's curves; with matplotlib, overopt.png.

Decisions, and why:
- A budget of 15 minutes on 2 cores. Timed in one thread on the 2-core development machine, on one seed of part
  of the grid: the pool of 64 x 64 answers takes 24 s; a proxy about 2.5, 4.9 and 9.8 ms per training pair at 1, 2 and 4 blocks
  (T3's figures), plus 2.5 s (1 block) to 9 s (4 blocks) to load it, score the pool's 4096 answers and measure
  its held-out accuracy; a PPO update of 32 episodes about 1.5 s. Hence 200, 800 and 3200 pairs (about 120 s of
  proxies per seed) and 3 PPO runs of 20 updates (about 100 s per seed): an estimated 12 min for 3 seeds (the
  measured time: docs/reproductions.md, "T1"). Gao's 500 to
  32k pairs would not fit (the world holds 24k). The proxies train as in experiments/rm_scaling.py: 8 rankings
  per step, warmup over the first 10% of the steps, one epoch, the K-wise loss.
- Sizes are the SFT trunk cut to its first 1, 2 or 4 blocks (`nanoalign.checkpoint.cut_trunk`), as in T3: one
  tokenizer and one pretraining, at no training cost.
- Sample once, score many times: one pool of 64 x 64 SFT answers (at most 64 tokens, temperature 1: PPO's
  rollout settings), shared by every proxy and seed, so that the seeds' spread is the proxies' own. Its columns
  are independent samples, and two answers tie on a proxy only when they are the same tokens (then their gold
  agrees too), so no tie-breaking shuffle is needed. n stops at 64 (Gao: 512): d reaches 1.78.
- The analytic KL is exact only without repeated answers (Beirami et al. 2024); the pool's distinct answers per
  prompt are reported (results.json's "distinct_per_prompt"). With repeats best-of-N's true d is smaller than
  plotted, which flatters RL in the comparison, not best-of-N.
- RL on the pool's prompts, so that RL and best-of-N are measured on the same prompts against the same SFT
  baseline; each point averages a whole pass over them (64 episodes: a point's gold has a standard error of
  about 1/8 SFT std per seed). PPO on 3 proxies (the largest trunk at each data size) x 3 seeds, 20 updates of
  32 episodes at lr 1e-4, the rate of the reward-hacking run (docs/results.md, "Reward hacking"), so that 20
  updates travel past the gold peak, train_ppo.py's defaults otherwise, no held-out evaluation. The KL
  is the rollouts' k1 estimate, a noisy mean that can dip below 0 near the start (counted as 0 in d).
- Only the proxies PPO trains on get 64 normalisation samples: PPO's missing-EOS penalty is in units of the
  stored normalisation; best-of-N is indifferent to it.
- Not done: 32k pairs, n up to 512, 500 updates x 256 episodes, and the small-KL-penalty arm.
"""

import contextlib
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the training scripts
import train_ppo  # noqa: E402
import train_rm  # noqa: E402
from nanoalign.checkpoint import cut_trunk, load_model, load_reward_model  # noqa: E402
from nanoalign.config import check_config, parse_config  # noqa: E402
from nanoalign.data import n_rankings, read_jsonl, read_rankings, write_jsonl  # noqa: E402
from nanoalign.evaluate import best_of_n_curve, gao_fit, linear_fit, sample_pool  # noqa: E402
from nanoalign.model import read_meta  # noqa: E402
from nanoalign.report.experiment import int_list, logged, mean_se, quick, write_results  # noqa: E402
from nanoalign.sampling import reward_scores  # noqa: E402
from nanoalign.scaffold import setup  # noqa: E402

QUICK = dict(sizes="1,2", n_pairs="24,48,96", batch_size=4, test_rankings=8, pool_prompts=4, pool_size=8,
             max_new_tokens=8, ppo_proxies="2:24,2:96", ppo_updates=4, ppo_rollout=2, seeds=2)  # a smoke run


@dataclass
class Config:
    data_dir: str = "data"  # the helpdesk world: prefs.jsonl, prefs_test.jsonl and prompts.jsonl
    init_from: str = "out/sft"  # the SFT policy: best-of-N's pool, PPO's start, the proxies' trunk
    out_dir: str = "out/overopt"  # results.json, log.txt and overopt.png
    sizes: str = "1,2,4"  # proxy sizes: the SFT trunk's first n blocks (at most its own depth)
    n_pairs: str = "200,800,3200"  # proxy training pairs (whole rankings), one epoch each
    batch_size: int = 8  # rankings per reward-model optimizer step
    test_rankings: int = 100  # held-out rankings for each proxy's accuracy (0 = all of prefs_test.jsonl)
    pool_prompts: int = 64  # training prompts in the best-of-N pool; PPO trains on the same prompts
    pool_size: int = 64  # SFT answers per pool prompt: n = 1, 2, 4, ..., pool_size (a power of 2, >= 4)
    max_new_tokens: int = 64  # answer length limit of the pool, PPO's rollouts and the proxies' normalisation
    ppo_proxies: str = "4:200,4:800,4:3200"  # blocks:pairs of the proxies PPO optimises ("" = no RL)
    ppo_updates: int = 20  # PPO updates per run, KL coefficient 0 (a multiple of pool_prompts / ppo_rollout)
    ppo_rollout: int = 32  # episodes per update (even; divides pool_prompts)
    ppo_lr: float = 1e-4  # PPO's learning rate (train_ppo.py: 3e-5)
    seeds: int = 3  # seed, seed + 1, ...: the proxies' data subsets, head init and data order, and PPO
    seed: int = 1234  # the first seed; also the pool's prompts and samples
    quick: bool = False  # a smoke run in seconds: QUICK's grid replaces the fields it names (not results)
    device: str = "auto"  # auto | cpu | cuda



def proxies(flag: str) -> list[str]:
    """--ppo_proxies as a list of "blocks:pairs" keys."""
    return [key for key in flag.split(",") if key]


def standardise(x: torch.Tensor) -> tuple[float, float]:
    """(mean, population std) of x, the std 1 where x is constant (a random model's answers all score gold 0)."""
    mean, std = x.mean().item(), x.std(correction=0).item()
    return mean, std if std > 0 else 1.0


def fit(kl: list[float], gold: list[float], form: str) -> dict:
    """`gao_fit` plus the fitted curve's peak d*: α/(2β) for best-of-N, exp(α/β - 1) for RL; inf when it has none
    (β <= 0) or lies beyond e^50."""
    f = gao_fit(kl, gold, form)
    a, b = f["alpha"], f["beta"]
    if b <= 0:
        return {**f, "d_star": math.inf}
    return {**f, "d_star": a / (2 * b) if form == "bon" else math.exp(a / b - 1) if a / b < 50 else math.inf}


def rl_points(log: list[dict], every: int, gold_norm: tuple, reward_norm: tuple, proxy_norm: tuple) -> list[dict]:
    """PPO's log, one record per update -> one point per `every` updates (a pass over the pool's prompts): the mean
    rollout KL, gold normalised as the pool's, and the proxy un-normalised by its stored (gain, bias), then
    normalised by its pool scores."""
    points = []
    for s in range(0, len(log), every):
        window = log[s:s + every]
        kl, gold, score = (sum(r[f"objective/{m}"] for r in window) / len(window) for m in ("kl", "gold", "rm_score"))
        raw = (score - reward_norm[1]) / reward_norm[0]
        points.append({"updates": [window[0]["step"], window[-1]["step"]], "kl": kl,
                       "gold": (gold - gold_norm[0]) / gold_norm[1], "proxy": (raw - proxy_norm[0]) / proxy_norm[1]})
    return points


def rl_minus_bon(rl: list[dict], bon: list[dict]) -> float | None:
    """One seed's mean gold difference RL - best-of-N over the RL points inside best-of-N's range of d (best-of-N
    interpolated linearly in d); None when no RL point lies there."""
    d_bon, gold_bon = [math.sqrt(r["kl"]) for r in bon], [r["gold"] for r in bon]
    diffs = [p["gold"] - float(numpy.interp(math.sqrt(max(p["kl"], 0.0)), d_bon, gold_bon))
             for p in rl if p["kl"] <= bon[-1]["kl"]]
    return sum(diffs) / len(diffs) if diffs else None


def train_proxy(cfg: Config, rankings: list[dict], trunk: str, out: Path, data: Path, seed: int, for_ppo: bool):
    """train_rm.py on these rankings for one epoch, in this process -> its eval.json (the checkpoint in out)."""
    write_jsonl(data / "prefs.jsonl", rankings)
    with contextlib.redirect_stdout(None):
        return train_rm.main(train_rm.Config(
            data_dir=str(data), out_dir=str(out), init_from=trunk, epochs=1, batch_size=cfg.batch_size,
            micro_batch_size=cfg.batch_size, warmup_steps=max(1, len(rankings) // cfg.batch_size // 10),
            n_norm=64 if for_ppo else 8, max_new_tokens=cfg.max_new_tokens if for_ppo else 8,
            log_interval=10 ** 6, ckpt_interval=10 ** 6, device=cfg.device, seed=seed))


def train_policy(cfg: Config, rm: Path, data: Path, out: Path, seed: int) -> list[dict]:
    """train_ppo.py with KL coefficient 0 on the proxy at rm, in this process -> its log, one record per update."""
    with contextlib.redirect_stdout(None):
        train_ppo.main(train_ppo.Config(
            data_dir=str(data), init_from=cfg.init_from, reward_model=str(rm), out_dir=str(out), beta=0.0,
            lr=cfg.ppo_lr, n_updates=cfg.ppo_updates, rollout_size=cfg.ppo_rollout, minibatches=2,
            max_new_tokens=cfg.max_new_tokens, n_eval=0, log_interval=1, ckpt_interval=10 ** 6, device=cfg.device,
            seed=seed))
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def run_seed(cfg: Config, seed: int, rankings: list[dict], trunks: dict, pool: dict, work: Path, device, log) -> dict:
    """One seed: every proxy trained and scored on the pool (best-of-N); those of --ppo_proxies optimised by PPO."""
    order = random.Random(seed).sample(rankings, len(rankings))  # nested subsets: N's rankings start 2N's
    k, ppo = len(rankings[0]["responses"]), proxies(cfg.ppo_proxies)
    run = {}
    for size in int_list(cfg, "sizes"):
        for n in int_list(cfg, "n_pairs"):
            t0, key, rm_dir = time.time(), f"{size}:{n}", work / f"rm_{seed}_{size}_{n}"
            rm_eval = train_proxy(cfg, order[:n_rankings(n, k)], trunks[size][0], rm_dir, work / "data", seed,
                                  key in ppo)
            rm, _, gain, bias = load_reward_model(rm_dir)
            rm.to(device).eval()
            with torch.no_grad():
                scores = torch.stack([reward_scores(rm, ids, attn).cpu() for ids, attn in pool["rows"]]).double()
            proxy_norm = standardise(scores)  # [P, N] raw scores -> mean 0, std 1 on the pool
            run[key] = {"rm": {m: rm_eval[m] for m in ("accuracy", "accuracy_vs_gold", "loss")},
                        "bon": best_of_n_curve((scores - proxy_norm[0]) / proxy_norm[1], pool["gold"])}
            line = (f"seed {seed} proxy {key}: RM accuracy vs gold {rm_eval['accuracy_vs_gold']:.3f}; best-of-N gold "
                    + " ".join(f"{r['gold']:+.2f}" for r in run[key]["bon"]))
            if key in ppo:
                t1 = time.time()
                logged = train_policy(cfg, rm_dir, work / "ppo_data", work / f"ppo_{seed}_{size}_{n}", seed)
                run[key]["rl"] = rl_points(logged, cfg.pool_prompts // cfg.ppo_rollout, pool["gold_norm"],
                                           (gain, bias), proxy_norm)
                line += "; RL (d, gold) " + " ".join(f"({math.sqrt(max(p['kl'], 0)):.2f}, {p['gold']:+.2f})"
                                                     for p in run[key]["rl"]) + f" (PPO {time.time() - t1:.0f}s)"
            log(line + f" ({time.time() - t0:.0f}s)")
    return run


# ----- the summary and the claims -----------------------------------------------------------------------------



def summary(runs: list[dict]) -> dict:
    """Per proxy: the seed-averaged curves (mean, s.e. per point; d from the mean KL) and their fits; RL's curve
    starts at d = 0 with gold and proxy 0, the SFT policy."""
    out = {}
    for key, first in runs[0].items():
        bon = [{"n": row["n"], "kl": row["kl"], "d": math.sqrt(row["kl"]),
                **{m: mean_se([r[key]["bon"][i][m] for r in runs]) for m in ("gold", "proxy")}}
               for i, row in enumerate(first["bon"])]
        kl, gold = [p["kl"] for p in bon], [p["gold"][0] for p in bon]
        out[key] = {"rm_accuracy_vs_gold": mean_se([r[key]["rm"]["accuracy_vs_gold"] for r in runs]), "bon": bon,
                    "bon_fit": fit(kl, gold, "bon"), "bon_linear_r2": linear_fit(kl, gold)[2]}
        if "rl" in first:
            rl = [{"updates": [0, 0], "kl": 0.0, "d": 0.0, "gold": (0.0, 0.0), "proxy": (0.0, 0.0)}]
            for i, p in enumerate(first["rl"]):
                kl = sum(r[key]["rl"][i]["kl"] for r in runs) / len(runs)
                rl.append({"updates": p["updates"], "kl": kl, "d": math.sqrt(max(kl, 0.0)),
                           **{m: mean_se([r[key]["rl"][i][m] for r in runs]) for m in ("gold", "proxy")}})
            gaps = [g for g in (rl_minus_bon(r[key]["rl"], r[key]["bon"]) for r in runs) if g is not None]
            out[key].update({"rl": rl, "rl_fit": fit([p["d"] ** 2 for p in rl], [p["gold"][0] for p in rl], "rl"),
                             "rl_minus_bon": mean_se(gaps) if gaps else None})
    return out


def claims(summ: dict, cfg: Config) -> list[dict]:
    """The published claims (Gao et al. 2022 §3) that this grid can test, each with what was measured and PASS/FAIL."""
    out = []

    def claim(text, passed, measured):
        out.append({"claim": text, "pass": bool(passed), "measured": measured})

    def tally(bad, keys):
        return f"{len(keys) - len(bad)} of {len(keys)}" + (f"; not {', '.join(bad)}" if bad else "")

    def trends(text, series, fits):  # along every series of proxies d* moves right and β falls, strictly
        ok = all(fits[b]["d_star"] > fits[a]["d_star"] and fits[b]["beta"] < fits[a]["beta"]
                 for s in series.values() for a, b in zip(s, s[1:]))
        claim(f"{text}, d* moves right and the fitted β falls: {', '.join(series)}", ok, "; ".join(
            f"{name}: d* " + " ".join(f"{fits[k]['d_star']:.2f}" for k in s) + ", β "
            + " ".join(f"{fits[k]['beta']:+.3f}" for k in s) for name, s in series.items()))

    sizes, ns, rl_keys = int_list(cfg, "sizes"), int_list(cfg, "n_pairs"), [k for k in summ if "rl" in summ[k]]
    for method, form, keys, poor in (("best-of-N", "bon", list(summ), [f"{s}:{ns[0]}" for s in sizes]),
                                     ("RL", "rl", rl_keys, rl_keys)):
        if not keys:
            continue
        curves, fits = {k: summ[k][form] for k in keys}, {k: summ[k][f"{form}_fit"] for k in keys}
        falls = [k for k in keys if not all(b["proxy"][0] > a["proxy"][0] for a, b in zip(curves[k], curves[k][1:]))]
        claim(f"{method}: the proxy rises monotonically with d, every proxy", not falls, tally(falls, keys))
        peaks = {k: max(range(len(curves[k])), key=lambda i: curves[k][i]["gold"][0]) for k in poor}
        claim(f"{method}: gold rises then falls (its peak inside the range, fitted β > 0), "
              + (f"the proxies on the fewest pairs ({ns[0]})" if form == "bon" else "every PPO proxy"),
              all(0 < peaks[k] < len(curves[k]) - 1 and fits[k]["beta"] > 0 for k in poor),
              "; ".join(f"{k}: peak at d = {curves[k][peaks[k]]['d']:.2f}, β {fits[k]['beta']:+.3f}" for k in poor))
        low = min(keys, key=lambda k: fits[k]["r2"] if not math.isnan(fits[k]["r2"]) else -math.inf)
        claim(f"{method}: R² >= 0.9 for its form on the seed-averaged curves, every proxy",
              all(fits[k]["r2"] >= 0.9 for k in keys), f"lowest {fits[low]['r2']:.3f} ({low})")
        if form == "bon":
            worse = [k for k in keys if not fits[k]["r2"] > summ[k]["bon_linear_r2"]]
            claim("best-of-N: the form d(α − βd) fits better than a line a + b·KL (R², 2 parameters each)",
                  not worse, tally(worse, keys))
            if len(ns) > 1:
                trends("best-of-N: with more data", {f"{s} blocks": [f"{s}:{n}" for n in ns] for s in sizes}, fits)
            if len(sizes) > 1:
                trends("best-of-N: with larger proxies", {f"{n} pairs": [f"{s}:{n}" for s in sizes] for n in ns}, fits)
        elif len(keys) >= 2:
            by_data = sorted(keys, key=lambda k: [*map(int, k.split(":"))][::-1])  # by pairs, then blocks
            trends("RL: with more proxy data", {"PPO proxies": by_data}, fits)
    for k in rl_keys:
        gap = summ[k]["rl_minus_bon"]
        claim(f"at equal d, RL's gold gain <= best-of-N's with the same proxy, {k} (paired by seed; best-of-N "
              f"interpolated in d at RL's points with d <= {summ[k]['bon'][-1]['d']:.2f})",
              gap is not None and gap[0] <= 0,
              f"RL - best-of-N {gap[0]:+.3f} ± {gap[1]:.3f}" if gap else "no RL point in best-of-N's range")
    return out


def tables(summ: dict) -> str:
    """Markdown: per proxy its best-of-N curve and fit, then per PPO proxy its RL curve and fit."""
    first = next(iter(summ.values()))
    lines = ["| proxy (blocks:pairs) | RM acc. vs gold | best-of-N gold at n = " + " ".join(str(p["n"]) for p in
                                                                                          first["bon"])
             + " | α | β | d* | R² | R² a + b·KL |", "| --- " * 8 + "|"]
    for key, v in summ.items():
        f = v["bon_fit"]
        lines.append(f"| {key} | {v['rm_accuracy_vs_gold'][0]:.3f} ± {v['rm_accuracy_vs_gold'][1]:.3f} | "
                     + " ".join(f"{p['gold'][0]:+.2f}" for p in v["bon"])
                     + f" | {f['alpha']:.3f} | {f['beta']:.3f} | {f['d_star']:.2f} | {f['r2']:.3f} | "
                       f"{v['bon_linear_r2']:.3f} |")
    rl = {k: v for k, v in summ.items() if "rl" in v}
    if rl:
        lines += ["", "| PPO proxy | d | gold | proxy | α | β | d* | R² |", "| --- " * 8 + "|"]
        for key, v in rl.items():
            f = v["rl_fit"]
            lines.append(f"| {key} | " + " ".join(f"{p['d']:.2f}" for p in v["rl"]) + " | "
                         + " ".join(f"{p['gold'][0]:+.2f}" for p in v["rl"]) + " | "
                         + " ".join(f"{p['proxy'][0]:+.2f}" for p in v["rl"])
                         + f" | {f['alpha']:.3f} | {f['beta']:.3f} | {f['d_star']:.2f} | {f['r2']:.3f} |")
    return "\n".join(lines)


def plots(summ: dict, cfg: Config, out: Path) -> list[str]:
    """overopt.png: gold against d per proxy size (best-of-N) and for the PPO proxies (RL), fitted forms as lines;
    none (with a note) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e .[plot]): no plots")
        return []
    sizes, rl = int_list(cfg, "sizes"), [k for k in summ if "rl" in summ[k]]
    panels = len(sizes) + bool(rl)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4), squeeze=False)
    axes = axes[0]

    def curve(ax, d, gold, f, label, form):
        line = ax.errorbar(d, [m for m, _ in gold], yerr=[e for _, e in gold], marker="o", capsize=3, ls="",
                           label=label)
        grid = numpy.linspace(1e-3, max(*d, 1e-2), 100)
        shape = grid ** 2 if form == "bon" else grid * numpy.log(grid)
        ax.plot(grid, f["alpha"] * grid - f["beta"] * shape, color=line[0].get_color())
        return line[0].get_color()

    for ax, size in zip(axes, sizes):
        for key in (k for k in summ if k.startswith(f"{size}:")):
            v = summ[key]
            curve(ax, [p["d"] for p in v["bon"]], [p["gold"] for p in v["bon"]], v["bon_fit"],
                  f"{key.split(':')[1]} pairs (R² {v['bon_fit']['r2']:.2f})", "bon")
        ax.set(title=f"best-of-N, {size}-block proxies", xlabel="d = √KL (nats^½)")
        ax.legend(fontsize=8)
    if rl:
        for key in rl:
            v = summ[key]
            color = curve(axes[-1], [p["d"] for p in v["rl"]], [p["gold"] for p in v["rl"]], v["rl_fit"],
                          f"proxy {key} (R² {v['rl_fit']['r2']:.2f})", "rl")
            axes[-1].plot([p["d"] for p in v["bon"]], [p["gold"][0] for p in v["bon"]], ls="--", color=color)
        axes[-1].set(title="RL (PPO, KL coefficient 0); dashed: best-of-N", xlabel="d = √KL (nats^½)")
        axes[-1].legend(fontsize=8)
    axes[0].set_ylabel("gold − SFT gold (SFT std); mean ± s.e.")
    fig.tight_layout()
    fig.savefig(out / "overopt.png", dpi=120)
    plt.close(fig)
    return ["overopt.png"]


def finite(x):
    """x with every NaN or infinite float replaced by None, for strict JSON (an undefined R², a peak out of reach)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def main(cfg: Config) -> dict:
    t_start = time.time()
    # 1. the config and the inputs, checked before anything is written
    cfg = quick(cfg, QUICK)
    check_config(cfg, positive="batch_size pool_prompts pool_size max_new_tokens ppo_updates ppo_rollout ppo_lr seeds",
                 nonneg="test_rankings")
    sizes, ns, ppo = int_list(cfg, "sizes"), int_list(cfg, "n_pairs"), proxies(cfg.ppo_proxies)
    if cfg.pool_size < 4 or cfg.pool_size & (cfg.pool_size - 1):
        raise SystemExit(f"--pool_size={cfg.pool_size}: expected a power of 2, at least 4 (3 points for 2 parameters)")
    if not set(ppo) <= {f"{s}:{n}" for s in sizes for n in ns}:
        raise SystemExit(f"--ppo_proxies={cfg.ppo_proxies}: expected comma-separated blocks:pairs of the proxies "
                         f"trained (--sizes={cfg.sizes} x --n_pairs={cfg.n_pairs}), e.g. {sizes[-1]}:{ns[0]}")
    every = cfg.pool_prompts // cfg.ppo_rollout  # updates per pass over the pool's prompts
    if ppo and (cfg.ppo_rollout % 2 or cfg.pool_prompts % cfg.ppo_rollout or cfg.ppo_updates % every
                or cfg.ppo_updates < 2 * every):
        raise SystemExit(f"--ppo_rollout={cfg.ppo_rollout} --ppo_updates={cfg.ppo_updates}: the rollout must be even "
                         f"(2 minibatches) and divide --pool_prompts={cfg.pool_prompts}, and the updates make at "
                         f"least 2 whole passes over the pool's prompts ({every} updates each)")
    data = Path(cfg.data_dir)
    if not (Path(cfg.init_from) / "config.json").exists():
        raise SystemExit(f"no checkpoint at {cfg.init_from}: first train the SFT policy: python train_sft.py")
    if not all((data / name).exists() for name in ("prefs.jsonl", "prefs_test.jsonl", "prompts.jsonl")):
        raise SystemExit(f"no prefs.jsonl, prefs_test.jsonl or prompts.jsonl in {data}: python train_sft.py writes "
                         f"the helpdesk world into --data_dir")
    rankings, held_out = read_rankings(data / "prefs.jsonl"), read_rankings(data / "prefs_test.jsonl")
    prompts = [r["prompt"] for r in read_jsonl(data / "prompts.jsonl", "prompts")]
    k = len(rankings[0]["responses"])
    depth = read_meta(cfg.init_from)["model"]["n_layer"]
    if sizes[-1] > depth:
        raise SystemExit(f"--sizes={cfg.sizes}: the trunk at {cfg.init_from} has {depth} blocks")
    for n in ns:
        if not cfg.batch_size <= n_rankings(n, k) <= len(rankings):
            raise SystemExit(f"--n_pairs={cfg.n_pairs}: {n} pairs are {n_rankings(n, k)} rankings of K = {k}; need "
                             f"between --batch_size={cfg.batch_size} and the {len(rankings)} in {data / 'prefs.jsonl'}")
    if cfg.pool_prompts > len(prompts):
        raise SystemExit(f"--pool_prompts={cfg.pool_prompts}: {data / 'prompts.jsonl'} holds {len(prompts)}")

    # 2. the trunks, the pool of SFT answers (sampled once, scored by every proxy), then every seed's proxies
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory() as work, logged(out / "log.txt") as log:
        work = Path(work)
        device = setup(cfg.seed, cfg.device).device
        trunks = {s: cut_trunk(cfg.init_from, s, work / f"trunk{s}") for s in sizes}  # size -> (path, params)
        (work / "data").mkdir()
        write_jsonl(work / "data" / "prefs_test.jsonl", held_out[:cfg.test_rankings or None])
        t0 = time.time()
        sft, tok = load_model(cfg.init_from)
        chosen = random.Random(cfg.seed).sample(prompts, cfg.pool_prompts)
        rows, answers, gold = sample_pool(sft.to(device), tok, chosen, cfg.pool_size, cfg.max_new_tokens, 1.0,
                                          cfg.seed)
        gold_norm = standardise(gold.double())
        pool = {"rows": rows, "gold": (gold.double() - gold_norm[0]) / gold_norm[1], "gold_norm": gold_norm}
        (work / "ppo_data").mkdir()
        write_jsonl(work / "ppo_data" / "prompts.jsonl", [{"prompt": p} for p in chosen])
        distinct = sum(len(set(a)) for a in answers) / len(answers)
        log(f"pool: {cfg.pool_prompts} prompts x {cfg.pool_size} SFT answers, gold {gold_norm[0]:.3f} (std "
            f"{gold_norm[1]:.3f}), {distinct:.1f} distinct answers per prompt ({time.time() - t0:.0f}s)")
        for seed in range(cfg.seed, cfg.seed + cfg.seeds):
            runs.append(run_seed(cfg, seed, rankings, trunks, pool, work, device, log))
    # 3. means over seeds, fits, the claims, tables, the plot and results.json
    summ = summary(runs)
    found = claims(summ, cfg)
    result = {"config": asdict(cfg), "trunk_params": {s: p for s, (_, p) in trunks.items()},
              "pool": {"sft_gold": gold_norm[0], "sft_gold_std": gold_norm[1], "distinct_per_prompt": distinct},
              "summary": summ, "claims": found, "runs": runs, "plots": plots(summ, cfg, out),
              "time_s": time.time() - t_start}
    return write_results(out, finite(result), f"{tables(summ)}\n\ngold is normalised under the SFT policy: (gold - "
                         f"{gold_norm[0]:.3f}) / {gold_norm[1]:.3f}; each proxy likewise on its pool scores", found,
                         len(runs))


if __name__ == "__main__":
    main(parse_config(Config))
