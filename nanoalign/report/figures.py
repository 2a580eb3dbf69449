"""The report's figures, drawn with matplotlib (the optional `plot` extra) and written as PNG files atomically.

Each function takes the numbers the stages wrote (eval.json, best_of_n.json, log.jsonl) and one path. Axes carry
their units; the SFT policy, where every stage starts, is marked in each figure; legends name the command or
flag behind each curve.
"""

import math
import os
from pathlib import Path


def available() -> bool:
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def _axes(ncols: int, nrows: int = 1, width: float = 5.0):
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt  # noqa: PLC0415
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 3.8 * nrows), squeeze=False)
    return plt, fig, axes.flatten()


def _save(plt, fig, path) -> None:
    path = Path(path)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def reward_model(rm: dict, path) -> None:
    """Accuracy beside the Bayes ceiling, and the reliability diagram of P(i above j) = σ(r_i − r_j)."""
    plt, fig, (left, right) = _axes(2)
    bars = {"held-out\naccuracy": rm["accuracy"], "accuracy vs\ngold order": rm.get("accuracy_vs_gold")}
    bars = {k: v for k, v in bars.items() if v is not None}
    left.bar(list(bars), list(bars.values()), color=["tab:blue", "tab:green"][:len(bars)])
    if "bayes_ceiling" in rm:
        left.axhline(rm["bayes_ceiling"], color="k", ls="--", label=f"Bayes ceiling {rm['bayes_ceiling']:.3f}")
        left.legend(loc="upper right")
    left.set_ylim(0.5, 1.0)
    left.set_ylabel("pairwise accuracy (fraction of held-out pairs)")
    left.set_title(f"train_rm.py: {rm['n_pairs']} held-out pairs")
    table = rm["reliability"]
    right.plot([0, 1], [0, 1], color="k", ls="--", lw=1, label="calibrated")
    right.plot([r["mean_p"] for r in table], [r["rate"] for r in table], "o-", label="reward model")
    for r in table:
        right.annotate(str(r["n"]), (r["mean_p"], r["rate"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    right.set_xlabel("predicted P(i ranked above j) = σ(r_i − r_j)")
    right.set_ylabel("observed rate (noisy labels)")
    right.set_title(f"reliability (calibration error {rm['calibration_error']:.3f}; n per bin)")
    right.legend(loc="upper left")
    _save(plt, fig, path)


def best_of_n(curve: list[dict], fits: list[dict], path) -> None:
    """Proxy (RM) and gold score of best-of-N against KL, with the Gao et al. (2022) fits drawn over gold."""
    plt, fig, (left, right) = _axes(2)
    kl = [r["kl"] for r in curve]
    left.plot(kl, [r["proxy"] for r in curve], "o-", color="tab:orange", label="proxy: reward model")
    left.set_ylabel("RM score (SFT samples: mean 0, std 1)")
    right.plot(kl, [r["gold"] for r in curve], "o", color="tab:green", label="gold judge")
    grid = [kl[-1] * i / 100 for i in range(101)]
    for fit, style in zip(fits, ("-", ":")):
        d = [k ** 0.5 for k in grid]
        shape = [x * x if fit["form"] == "bon" else x * math.log(x) if x > 0 else 0.0 for x in d]
        y = [curve[0]["gold"] + fit["alpha"] * x - fit["beta"] * s for x, s in zip(d, shape)]
        name = "d(α − βd)" if fit["form"] == "bon" else "d(α − β log d)"
        right.plot(grid, y, style, color="k", lw=1, label=f"Gao fit {name}, R² {fit['r2']:.3f}")
    right.set_ylabel("gold score (0–1)")
    for ax, key in ((left, "proxy"), (right, "gold")):
        ax.set_xlabel("KL(best-of-N ‖ SFT) = log N − (N−1)/N  (nats)")
        for r in curve:
            ax.annotate(f"N={r['n']}", (r["kl"], r[key]), fontsize=7, xytext=(2, 4), textcoords="offset points")
        ax.legend(loc="best", fontsize=8)
    left.set_title("evaluate --best_of_n=64 (pool estimator), N = 1 is SFT")
    right.set_title("gold rises, then falls: overoptimisation")
    _save(plt, fig, path)


def training_curves(logs: dict, path) -> None:
    """PPO's rollouts by update: RM score, gold, KL to SFT and entropy; one colour per run (its command), each
    update faint and the mean of the last 5 bold."""
    plt, fig, axes = _axes(2, nrows=2)
    panels = (("objective/rm_score", "RM score (normalised)"), ("objective/gold", "gold score (0–1)"),
              ("objective/kl", "KL to SFT (nats / answer)"), ("ppo/entropy", "entropy (nats / token)"))
    for ax, (key, label) in zip(axes, panels):
        for name, rows in logs.items():
            steps, ys = [r["step"] for r in rows], [r[key] for r in rows]
            line, = ax.plot(steps, ys, lw=0.6, alpha=0.4)
            smooth = [sum(ys[max(0, i - 4):i + 1]) / len(ys[max(0, i - 4):i + 1]) for i in range(len(ys))]
            ax.plot(steps, smooth, color=line.get_color(), label=f"{name} (mean of the last 5 updates)")
            ax.axhline(ys[0], color=line.get_color(), ls=":", lw=0.8)
        ax.set_xlabel("PPO update")
        ax.set_ylabel(label)
    axes[0].legend(loc="best", fontsize=7, title="dotted: update 1 (SFT)", title_fontsize=7)
    _save(plt, fig, path)


def reward_hacking(rows: list[dict], command: str, path) -> None:
    """A run without the KL penalty: the proxy climbs while gold collapses."""
    plt, fig, (ax,) = _axes(1, width=7.0)
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["objective/rm_score"] for r in rows], color="tab:orange", label="RM score (left)")
    ax.set_ylabel("RM score (normalised)")
    ax.set_xlabel("PPO update")
    gold = ax.twinx()
    gold.plot(steps, [r["objective/gold"] for r in rows], color="tab:green", label="gold (right)")
    gold.axhline(rows[0]["objective/gold"], color="tab:green", ls=":", lw=0.8, label="gold at update 1 (SFT)")
    gold.set_ylabel("gold score (0–1)")
    gold.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    gold.legend(loc="upper right", fontsize=8)
    ax.set_title(command, fontsize=8)
    _save(plt, fig, path)


def frontier(points: list[dict], curve: list[dict] | None, path) -> None:
    """Gold against KL to SFT for every policy (error bars: ± one standard error), best-of-N as a curve."""
    plt, fig, (ax,) = _axes(1, width=7.0)
    if curve:
        ax.plot([r["kl"] for r in curve], [r["gold"] for r in curve], "--", color="grey", lw=1,
                label="best-of-N, N = 1 … 64 (KL analytic)")
    for p in points:
        style = dict(marker="*", markersize=14) if p["kl"] == 0 else dict(marker="o")
        ax.errorbar(p["kl"], p["gold"], yerr=p.get("se"), capsize=3, ls="none", label=p["label"], **style)
    ax.set_xlabel("KL(policy ‖ SFT) on held-out prompts (nats / answer)")
    ax.set_ylabel("gold score (0–1)")
    ax.set_title("gold against KL: up and to the left is better")
    ax.legend(loc="best", fontsize=7)
    _save(plt, fig, path)
