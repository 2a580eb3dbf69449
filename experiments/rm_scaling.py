"""Reproduction T3: reward-model accuracy against data, model size and batching (Ouyang et al. 2022, InstructGPT
§3.5; Gao et al. 2022 §3; Ziegler et al. 2019 §2; N+ D18).

    python train_sft.py                                    # once: out/sft and the helpdesk world in data/
    python experiments/rm_scaling.py                       # 3 seeds (run time: docs/reproductions.md, "T3")
    python experiments/rm_scaling.py --n_pairs=250,500,1000,2000,4000,8000,16000   # T3's full grid
    python experiments/rm_scaling.py --quick=True          # a smoke run in seconds (tiny grid): not results

The world's rankings are noisy: each prompt's K = 4 answers are ranked by Plackett-Luce on kappa·gold, so a pair's
label is right with probability σ(kappa·|Δgold|), and no reward model can beat the Bayes ceiling A*, the mean of
that over the held-out pairs (`nanoalign.world.helpdesk.bayes_ceiling`). Every reward model is trained by train_rm.py's
own code, in this process, and measured on all of prefs_test.jsonl's pairs against the noisy labels. Per seed:

    data and size   each of --n_pairs training pairs (whole rankings, C(K,2) = 6 pairs each; one seed's subsets
                    are nested) x each of --sizes, one epoch, the K-wise loss (train_rm.py's default)
    batching        one set of --batching_pairs pairs for every arm, --batching_epochs epochs, the held-out
                    pairwise log-loss of σ(r_i - r_j) measured every half epoch (for every arm, so best-of-K,
                    which never orders the answers below the top one, pays for that):
                      grouped   all C(K,2) pairs of a ranking in one batch element: K forwards (InstructGPT Eq. 1)
                      shuffled  the same pairs as single examples, shuffled: 2 forwards per pair
                      bestof    -log softmax of the top answer among the K (Ziegler §2)
                      pl        Plackett-Luce, the likelihood of the whole ranking (the labels' own model)

The published claims are printed with PASS or FAIL as measured (means over seeds ± one standard error):
accuracy linear in log N and below the ceiling; within 3 points of A* at the largest N; larger RMs at least as
accurate as smaller ones at the largest N; shuffled pairs bottom out earlier and overfit more than grouped
rankings (InstructGPT §3.5); a monotone reliability table (N+ D18: under-calibrated but monotone). results.json
holds every run's eval.json; with matplotlib, accuracy_vs_pairs.png and batching_loss.png.

Decisions, and why:
- Sizes are the SFT trunk cut to its first 1, 2 or 4 blocks (embeddings and final LayerNorm kept): three depths
  that share one tokenizer and one pretraining, at no training cost. An SFT run per size costs minutes each;
  trunks trained from scratch start near chance (trlx #338) and would measure pretraining, not size.
- 8 rankings (48 pairs) per optimizer step instead of train_rm.py's 32, and warmup over each run's first 10% of
  steps instead of 20 steps, so that 250 pairs still make 5 steps; train_rm.py's learning rate and cosine
  otherwise. One epoch on the data-size grid, as Gao and InstructGPT train.
- The shuffled arm takes the C(K,2) = 6 pairs of each of the grouped arm's rankings per step, so both take the same
  steps on the same pairs under the same schedule: only the grouping differs (and the forwards, 3x).
- The grid fits a budget of 15 min on 2 cores. Timed on one seed of part of it (one thread, the 2-core
  development machine), a pair costs
  about 2.5, 4.9 and 9.8 ms at 1, 2 and 4 blocks, so the data-size grid costs about 150 s per seed up to 4000 pairs
  (8000 and 16000 would add about 410 s per seed), and the batching arms about 80 s per seed on 1000 pairs for 3
  epochs on the 2-block trunk: on 1000 pairs the held-out loss already rises in the second epoch.
- Rewards are not normalised for a consumer: nothing but this script reads them, so train_rm.py's normalisation
  gets 8 short samples (it needs some).
"""

import contextlib
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the training scripts
import train_rm  # noqa: E402
from nanoalign.checkpoint import cut_trunk  # noqa: E402
from nanoalign.config import check_config, parse_config  # noqa: E402
from nanoalign.data import n_rankings, read_rankings, write_jsonl  # noqa: E402
from nanoalign.evaluate import linear_fit  # noqa: E402
from nanoalign.model import read_meta  # noqa: E402
from nanoalign.report.experiment import int_list, logged, mean_se, quick, write_results  # noqa: E402

ARMS = {  # --batching name -> train_rm.py's (--data, --loss)
    "grouped": ("prefs", "kwise"), "shuffled": ("pairs", "kwise"), "bestof": ("prefs", "best_of_k"),
    "pl": ("prefs", "plackett_luce")}
QUICK = dict(n_pairs="48,96", sizes="1,2", batching_pairs=48, batching_epochs=2, batching_size=2, batch_size=4,
             test_rankings=8, seeds=2)  # --quick=True: a smoke run in seconds, for the tests
MIN_BIN = 30  # pairs a reliability bin needs (pooled over seeds) to count in the monotonicity check (3 bins at least)


@dataclass
class Config:
    data_dir: str = "data"  # the helpdesk world: prefs.jsonl (training rankings), prefs_test.jsonl (held out)
    init_from: str = "out/sft"  # the SFT checkpoint whose trunk, cut to each size, starts every reward model
    out_dir: str = "out/rm_scaling"  # results.json, log.txt and the plots
    n_pairs: str = "250,500,1000,2000,4000"  # training pairs per RM (whole rankings); 8000,16000 add ~20 min
    sizes: str = "1,2,4"  # trunk depths: the SFT trunk's first n blocks (at most its own depth)
    batching: str = "grouped,shuffled,bestof,pl"  # batching arms at one budget of rankings ("" = none)
    batching_pairs: int = 1000  # pairs (whole rankings) each batching arm trains on
    batching_epochs: int = 3  # passes over them; the held-out loss is measured every half epoch
    batching_size: int = 2  # trunk depth of the batching arms
    batch_size: int = 8  # rankings per optimizer step (shuffled: their C(K,2) pairs each)
    test_rankings: int = 0  # held-out rankings measured (0 = all of prefs_test.jsonl)
    seeds: int = 3  # seed, seed + 1, ...: the subsets, head init and data order
    seed: int = 1234  # the first seed
    quick: bool = False  # a smoke run in seconds: QUICK's grid replaces the fields it names (not results)
    device: str = "auto"  # auto | cpu | cuda



def ranking_pairs(rankings: list[dict]) -> list[dict]:
    """Every ranking's C(K,2) pairs (better answer first), as the world writes pairs.jsonl: the shuffled arm's
    examples, the same comparisons as the grouped arm's."""
    return [{"prompt": r["prompt"], "chosen": r["responses"][a], "rejected": r["responses"][b]}
            for r in rankings for a, b in combinations(r["ranking"], 2)]


def train_reward_model(cfg: Config, rankings: list[dict], trunk: str, arm: str, epochs: int, seed: int,
                       data: Path) -> tuple[dict, list[dict]]:
    """train_rm.py on these rankings (the shuffled arm: their pairs), in this process -> (its eval.json, the
    held-out loss and accuracy every half epoch when epochs > 1)."""
    kind, loss = ARMS[arm]
    write_jsonl(data / "prefs.jsonl", rankings)
    per_record = math.comb(len(rankings[0]["responses"]), 2) if kind == "pairs" else 1
    if kind == "pairs":
        write_jsonl(data / "pairs.jsonl", ranking_pairs(rankings))
    steps_per_epoch = len(rankings) // cfg.batch_size  # the same for both kinds: pairs come C(K,2) per ranking
    with tempfile.TemporaryDirectory() as work, contextlib.redirect_stdout(None):
        out = Path(work) / "rm"
        result = train_rm.main(train_rm.Config(
            data_dir=str(data), out_dir=str(out), init_from=trunk, data=kind, loss=loss, epochs=epochs,
            batch_size=cfg.batch_size * per_record, micro_batch_size=cfg.batch_size * per_record,
            warmup_steps=max(1, epochs * steps_per_epoch // 10),
            eval_interval=max(1, steps_per_epoch // 2) if epochs > 1 else 0,
            n_norm=8, max_new_tokens=8, log_interval=10 ** 6, ckpt_interval=10 ** 6, device=cfg.device, seed=seed))
        curve = [{"epoch": r["step"] / steps_per_epoch, "loss": r["eval/loss"], "accuracy": r["eval/accuracy"]}
                 for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "eval/loss" in r]
    return result, curve


def run_seed(cfg: Config, seed: int, rankings: list[dict], trunks: dict, data: Path, log) -> dict:
    """One seed: every (size, N) reward model for one epoch, then every batching arm for several."""
    order = random.Random(seed).sample(rankings, len(rankings))  # nested subsets: N's rankings start 2N's
    k = len(rankings[0]["responses"])
    run = {"scaling": {}, "batching": {}}
    for size in int_list(cfg, "sizes"):
        for n in int_list(cfg, "n_pairs"):
            t0 = time.time()
            chosen = order[:n_rankings(n, k)]
            result, _ = train_reward_model(cfg, chosen, trunks[size][0], "grouped", 1, seed, data)
            run["scaling"][f"{size},{n}"] = {**result, "train_pairs": len(chosen) * math.comb(k, 2)}
            log(f"seed {seed} size {size} N {n:6d}: accuracy {result['accuracy']:.3f} (ceiling "
                f"{result['bayes_ceiling']:.3f}), vs gold {result['accuracy_vs_gold']:.3f} ({time.time() - t0:.0f}s)")
    chosen = order[:n_rankings(cfg.batching_pairs, k)]
    for arm in filter(None, cfg.batching.split(",")):
        t0 = time.time()
        result, curve = train_reward_model(cfg, chosen, trunks[cfg.batching_size][0], arm, cfg.batching_epochs, seed,
                                           data)
        run["batching"][arm] = {**result, "curve": curve}
        log(f"seed {seed} {arm:8s}: held-out loss every half epoch " + " ".join(f"{c['loss']:.4f}" for c in curve)
            + f", accuracy {result['accuracy']:.3f} ({time.time() - t0:.0f}s)")
    return run


# ----- the summary and the claims -----------------------------------------------------------------------------



def pooled_reliability(tables: list[list[dict]]) -> list[dict]:
    """Reliability tables (`nanoalign.evaluate.calibration`'s bins) of several runs pooled bin by bin: counts add,
    mean predicted probability and observed rate are count-weighted."""
    bins = {}
    for table in tables:
        for row in table:
            b = bins.setdefault(tuple(row["bin"]), {"bin": row["bin"], "n": 0, "mean_p": 0.0, "rate": 0.0})
            b["n"] += row["n"]
            b["mean_p"] += row["n"] * row["mean_p"]
            b["rate"] += row["n"] * row["rate"]
    return [{**b, "mean_p": b["mean_p"] / b["n"], "rate": b["rate"] / b["n"]} for _, b in sorted(bins.items())]


def summary(runs: list[dict]) -> dict:
    """Means ± s.e. over seeds: per (size, N) the held-out measures; per batching arm the held-out loss curve."""
    out = {"scaling": {}, "batching": {}}
    for key in runs[0]["scaling"]:
        out["scaling"][key] = {m: mean_se([r["scaling"][key][m] for r in runs])
                               for m in ("accuracy", "accuracy_vs_gold", "loss", "calibration_error")}
    for arm in runs[0]["batching"]:
        points = range(len(runs[0]["batching"][arm]["curve"]))
        out["batching"][arm] = {
            "epochs": [c["epoch"] for c in runs[0]["batching"][arm]["curve"]],
            "curve": [mean_se([r["batching"][arm]["curve"][i]["loss"] for r in runs]) for i in points],
            **{m: mean_se([r["batching"][arm][m] for r in runs]) for m in ("accuracy", "loss")}}
    return out


def claims(runs: list[dict], summ: dict, cfg: Config, ceiling: float) -> list[dict]:
    """The published claims this grid can test, each with what was measured and PASS / FAIL."""
    out = []

    def claim(text, passed, measured):
        out.append({"claim": text, "pass": bool(passed), "measured": measured})

    sizes, ns = int_list(cfg, "sizes"), int_list(cfg, "n_pairs")
    acc = {key: v["accuracy"] for key, v in summ["scaling"].items()}  # "size,N" -> (mean, s.e.)
    if len(ns) >= 3:
        for size in sizes:
            _, slope, r2 = linear_fit([math.log2(n) for n in ns], [acc[f"{size},{n}"][0] for n in ns])
            last = acc[f"{size},{ns[-1]}"][0] - acc[f"{size},{ns[-2]}"][0]
            claim(f"accuracy ≈ linear in log N (R² >= 0.9, rising), {size}-block RM (Gao §3; InstructGPT §3.5)",
                  r2 >= 0.9 and slope > 0, f"{slope:+.4f} per doubling, R² {r2:.2f}; last step {last:+.4f}")
    top = max(acc, key=lambda key: acc[key][0])
    claim("... saturating below the Bayes ceiling A*: every accuracy below it", acc[top][0] < ceiling,
          f"highest {acc[top][0]:.3f} ± {acc[top][1]:.3f} (size,N = {top}), A* {ceiling:.3f}")
    big = f"{sizes[-1]},{ns[-1]}"
    claim(f"within 3 points of A* at the largest N ({ns[-1]} pairs, {sizes[-1]}-block RM)",
          ceiling - acc[big][0] <= 0.03, f"A* - accuracy {ceiling - acc[big][0]:+.3f} ± {acc[big][1]:.3f}")
    for small, large in zip(sizes, sizes[1:]):
        d, s = mean_se([r["scaling"][f"{large},{ns[-1]}"]["accuracy"] - r["scaling"][f"{small},{ns[-1]}"]["accuracy"]
                        for r in runs])
        claim(f"larger RMs >= smaller at the largest N: {large} blocks against {small}", d >= 0,
              f"accuracy difference {d:+.4f} ± {s:.4f}")
    arms = summ["batching"]
    if {"grouped", "shuffled"} <= arms.keys():
        best = {a: arms[a]["epochs"][min(range(len(arms[a]["curve"])), key=lambda i: arms[a]["curve"][i][0])]
                for a in ("grouped", "shuffled")}
        claim("shuffled pairs bottom out earlier than grouped rankings: epoch of the lowest held-out loss "
              "(InstructGPT §3.5)", best["shuffled"] < best["grouped"],
              f"shuffled epoch {best['shuffled']:g}, grouped epoch {best['grouped']:g} of {cfg.batching_epochs}")
        d, s = mean_se([r["batching"]["shuffled"]["loss"] - r["batching"]["grouped"]["loss"] for r in runs])
        claim("... and overfit more: higher final held-out loss", d > 0, f"shuffled - grouped {d:+.4f} ± {s:.4f}")
    table = pooled_reliability([r["scaling"][big]["reliability"] for r in runs])
    rates = [row["rate"] for row in table if row["n"] >= MIN_BIN]
    claim(f"monotone reliability: the observed rate rises with σ(r_i - r_j), {sizes[-1]}-block RM at the largest N "
          f"(N+ D18)", len(rates) >= 3 and all(a <= b for a, b in zip(rates, rates[1:])),
          f"{len(rates)} bins of >= {MIN_BIN} pairs: rates " + " ".join(f"{x:.2f}" for x in rates))
    return out


def tables(summ: dict, cfg: Config, k: int, params: dict, ceiling: float, realised: float,
           reliability: list[dict]) -> str:
    """Markdown: accuracy per N and size; the batching arms; the reliability table of the largest RM."""
    sizes, ns = int_list(cfg, "sizes"), int_list(cfg, "n_pairs")
    lines = ["| pairs N | " + " | ".join(f"{s}-block ({params[s] / 1e6:.2f}M)" for s in sizes) + " |",
             "| --- " * (len(sizes) + 1) + "|"]
    for n in ns:
        cells = [summ["scaling"][f"{s},{n}"]["accuracy"] for s in sizes]
        lines.append(f"| {n} | " + " | ".join(f"{m:.3f} ± {e:.3f}" for m, e in cells) + " |")
    lines.append(f"| A* (realised) | {ceiling:.3f} ({realised:.3f})" + " |" * len(sizes))
    if summ["batching"]:
        epochs = " ".join(f"{e:g}" for e in next(iter(summ["batching"].values()))["epochs"])
        lines += ["", f"| --batching ({cfg.batching_pairs} pairs, {cfg.batching_size}-block) | forwards per ranking "
                      f"| held-out loss at epochs {epochs} | final loss | final accuracy |", "| --- " * 5 + "|"]
        for arm, v in summ["batching"].items():
            rows = 2 * math.comb(k, 2) if ARMS[arm][0] == "pairs" else k  # 2 rows per pair, or K per ranking
            lines.append(f"| {arm} | {rows} | " + " ".join(f"{m:.4f}" for m, _ in v["curve"])
                         + f" | {v['loss'][0]:.4f} ± {v['loss'][1]:.4f} | {v['accuracy'][0]:.3f} ± "
                           f"{v['accuracy'][1]:.3f} |")
    lines += ["", "| σ(r_i - r_j) bin | pairs | mean predicted | observed rate |", "| --- " * 4 + "|"]
    lines += [f"| {b['bin'][0]:.1f}-{b['bin'][1]:.1f} | {b['n']} | {b['mean_p']:.3f} | {b['rate']:.3f} |"
              for b in reliability]
    return "\n".join(lines)


def plots(summ: dict, cfg: Config, params: dict, ceiling: float, out: Path) -> list[str]:
    """accuracy_vs_pairs.png and batching_loss.png, or none (with a note) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e .[plot]): no plots")
        return []
    ns = int_list(cfg, "n_pairs")
    fig, ax = plt.subplots(figsize=(6, 4))
    for size in int_list(cfg, "sizes"):
        m = [summ["scaling"][f"{size},{n}"]["accuracy"] for n in ns]
        ax.errorbar(ns, [a for a, _ in m], yerr=[e for _, e in m], marker="o", capsize=3,
                    label=f"--sizes={size} ({params[size] / 1e6:.2f}M parameters)")
    ax.axhline(ceiling, linestyle="--", color="black", label=f"Bayes ceiling A* = {ceiling:.3f}")
    ax.set(xscale="log", xlabel="training pairs N (log scale)", ylabel="held-out pairwise accuracy (fraction of pairs)",
           title="Reward-model accuracy, one epoch (mean ± s.e. over seeds)")
    ax.set_xticks(ns, [str(n) for n in ns], minor=False)
    ax.minorticks_off()
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_pairs.png", dpi=120)
    written = ["accuracy_vs_pairs.png"]
    if summ["batching"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, v in summ["batching"].items():
            ax.errorbar(v["epochs"], [m for m, _ in v["curve"]], yerr=[e for _, e in v["curve"]], marker="o", capsize=3,
                        label=f"--batching={arm}")
        ax.set(xlabel="epochs (passes over the training pairs)", ylabel="held-out pairwise log-loss (nats per pair)",
               title=f"{cfg.batching_pairs} pairs, {cfg.batching_size}-block RM (mean ± s.e. over seeds)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "batching_loss.png", dpi=120)
        written.append("batching_loss.png")
    plt.close("all")
    return written


def main(cfg: Config) -> dict:
    t_start = time.time()
    # 1. the config and the inputs, checked before anything is written
    cfg = quick(cfg, QUICK)
    check_config(cfg, positive="batching_pairs batching_epochs batching_size batch_size seeds", nonneg="test_rankings")
    sizes, ns = int_list(cfg, "sizes"), int_list(cfg, "n_pairs")
    if sorted(set(sizes)) != sizes or sorted(set(ns)) != ns:
        raise SystemExit(f"--sizes={cfg.sizes} --n_pairs={cfg.n_pairs}: each must be increasing, without repeats")
    arms = list(filter(None, cfg.batching.split(",")))
    if not set(arms) <= ARMS.keys():
        raise SystemExit(f"--batching={cfg.batching}: expected a comma-separated subset of {', '.join(ARMS)}")
    if arms and cfg.batching_epochs < 2:
        raise SystemExit(f"--batching_epochs={cfg.batching_epochs}: the arms are compared across epochs; need >= 2")
    prefs, test = Path(cfg.data_dir) / "prefs.jsonl", Path(cfg.data_dir) / "prefs_test.jsonl"
    if not (Path(cfg.init_from) / "config.json").exists():
        raise SystemExit(f"no checkpoint at {cfg.init_from}: first train the SFT policy: python train_sft.py")
    if not (prefs.exists() and test.exists()):
        raise SystemExit(f"no {prefs} or {test}: python train_sft.py writes the helpdesk world into --data_dir")
    rankings, held_out = read_rankings(prefs), read_rankings(test)
    k = len(rankings[0]["responses"])
    if any(r.get("gold") is None for r in held_out):
        raise SystemExit(f"{test}: every held-out ranking needs its 'gold' scores, for the Bayes ceiling")
    depth = read_meta(cfg.init_from)["model"]["n_layer"]
    if sizes[-1] > depth:
        raise SystemExit(f"--sizes={cfg.sizes}: the trunk at {cfg.init_from} has {depth} blocks")
    for name, n in [*(("n_pairs", n) for n in ns), *([("batching_pairs", cfg.batching_pairs)] if arms else [])]:
        if not cfg.batch_size <= n_rankings(n, k) <= len(rankings):
            raise SystemExit(f"--{name}={n}: {n_rankings(n, k)} rankings of K = {k}; need between --batch_size="
                             f"{cfg.batch_size} and the {len(rankings)} in {prefs}")
    if arms and cfg.batching_size not in sizes:
        raise SystemExit(f"--batching_size={cfg.batching_size}: must be one of --sizes={cfg.sizes}")

    # 2. the trunks, the held-out rankings, then every seed's reward models
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory() as work, logged(out / "log.txt") as log:
        work = Path(work)
        trunks = {s: cut_trunk(cfg.init_from, s, work / f"trunk{s}") for s in sizes}  # size -> (path, params)
        data = work / "data"
        data.mkdir()
        write_jsonl(data / "prefs_test.jsonl", held_out[:cfg.test_rankings or None])
        for seed in range(cfg.seed, cfg.seed + cfg.seeds):
            runs.append(run_seed(cfg, seed, rankings, trunks, data, log))
    # 3. means over seeds, the claims, tables, plots and results.json
    first = runs[0]["scaling"][f"{sizes[-1]},{ns[-1]}"]
    ceiling, realised = first["bayes_ceiling"], first["realised_ceiling"]
    params = {s: p for s, (_, p) in trunks.items()}
    summ = summary(runs)
    found = claims(runs, summ, cfg, ceiling)
    reliability = pooled_reliability([r["scaling"][f"{sizes[-1]},{ns[-1]}"]["reliability"] for r in runs])
    result = {"config": asdict(cfg), "trunk_params": params, "bayes_ceiling": ceiling, "realised_ceiling": realised,
              "summary": summ, "reliability": reliability, "claims": found, "runs": runs,
              "plots": plots(summ, cfg, params, ceiling, out), "time_s": time.time() - t_start}
    return write_results(out, result, tables(summ, cfg, k, params, ceiling, realised, reliability), found, len(runs))


if __name__ == "__main__":
    main(parse_config(Config))
