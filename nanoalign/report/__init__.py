"""One command runs the helpdesk pipeline and writes a report: results, figures and sampled answers.

    python -m nanoalign.report                      # SFT -> RM -> best-of-N -> DPO -> PPO: out/report/index.md
    python -m nanoalign.report --stages=all         # + RLAIF (feedback model, RM, PPO) and the reward-hacking run
    python -m nanoalign.report --force=ppo          # rerun PPO even though it is current

Stages whose runs are current are reused (`nanoalign.report.pipeline` says which and why); the page is drawn only from
the stages current in this call, so no figure comes from an older checkpoint. It holds the results table, the
principle scores, the reward model's accuracy against its Bayes ceiling with a reliability diagram, best-of-N
with the Gao et al. (2022) fits, PPO's training curves (and the reward-hacking run when it ran), the gold-vs-KL
frontier, and three sampled answers per stage with their principle scores. Figures need matplotlib
(`pip install -e ".[plot]"`); without it the page holds the tables and says how to get the figures.
"""

import json
import time
from pathlib import Path

from nanoalign.config import check_config
from nanoalign.evaluate import gao_fit
from nanoalign.report import figures
from nanoalign.report.pipeline import ROOT, STAGES, Config, command, minutes, run_pipeline, selected
from nanoalign.world.gold_judge import PRINCIPLES
from nanoalign.world.helpdesk import FAILURES

POLICIES = ("sft", "bon", "dpo", "ppo", "ppo_rlaif", "ppo_hack")  # the stages that yield a policy


def _read(path) -> dict | list:
    path = Path(path)
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(path.read_text())


def _command(name: str, cfg: Config) -> str:
    return "python " + " ".join(command(name, cfg))


def policy_rows(results: dict, runs: dict) -> list[dict]:
    """One row per policy: gold (± s.e.), gain over SFT (± s.e. of the paired difference), failure rates, KL to
    SFT, win rate against SFT; best-of-N reports its realised best-of-8 policy and its analytic KL."""
    rows = []
    for name in (n for n in POLICIES if n in results):
        r = results[name]["selected"] if name == "bon" else results[name]
        row = {"stage": name, "title": STAGES[name].title, "gold": r["gold"], "se": r.get("gold_se"),
               "failures": r["failures"], "principles": r.get("principles", {}), "kl": r.get("kl", 0.0),
               "degenerate": r.get("degenerate", {}).get("any"),
               "win_rate": r.get("win_rate_vs_sft"), "seconds": runs[name]["seconds"], "samples": r["samples"]}
        if "sft_gold" in r and name != "sft":
            row["gain"], row["gain_se"] = r["gold"] - r["sft_gold"], r["gain_vs_sft_se"]
        rows.append(row)
    return rows


def _num(x, fmt="{:.3f}", none="") -> str:
    """x formatted, or `none` for a value that is undefined (null in its JSON: no pairs whose gold differs)."""
    return none if x is None else fmt.format(x)


def results_table(rows: list[dict], demo_gold: float) -> list[str]:
    lines = ["| stage | gold | gain vs SFT | " + " | ".join(FAILURES) + " | degenerate | KL (nats) | win rate vs SFT "
             "| time |", "| --- " * (8 + len(FAILURES) - 1) + "|",
             f"| demonstrations | {demo_gold:.3f} | " + " | " * (len(FAILURES) + 4) + " |"]
    for r in rows:
        gold = f"{r['gold']:.3f}" + (f" ± {r['se']:.3f}" if r["se"] is not None else "")
        gain = f"{r['gain']:+.3f} ± {r['gain_se']:.3f}" if "gain" in r else ""
        kl = f"≤ {r['kl']:.2f}" if r["stage"] == "bon" else f"{r['kl']:.2f}"
        lines.append(f"| {r['title']} | {gold} | {gain} | " + " | ".join(f"{r['failures'][f]:.2f}" for f in FAILURES)
                     + f" | {_num(r['degenerate'], '{:.2f}')} | {kl} | {_num(r['win_rate'], '{:.2f}')} "
                       f"| {minutes(r['seconds'])} |")
    return lines


def samples_section(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        lines.append(f"\n**{r['title']}**\n")
        for s in r["samples"]:
            scores = ", ".join(f"{k} {v:g}" for k, v in s["principles"].items())
            failed = [k for k, v in s["failures"].items() if v]
            lines += [f"> {s['prompt']}", ">", f"> → *{s['answer']}*", "",
                      f"gold {s['gold']:.3f} ({scores}){'; fails: ' + ', '.join(failed) if failed else ''}", ""]
    return lines


def write_report(cfg: Config, runs: dict) -> Path:
    """out/report/index.md (and its PNG figures) from the stages in `runs`, all current."""
    out, page = Path(cfg.out_root), Path(cfg.out_root) / "report"
    results = {name: _read(out / name / STAGES[name].result) for name in runs}
    draw = figures.available()
    rows = policy_rows(results, runs)
    lines = ["# nanoalign report", "",
             f"`python -m nanoalign.report{' --quick=True' if cfg.quick else ''}`: stages "
             + ", ".join(f"{n} ({minutes(r['seconds'])})" for n, r in runs.items())
             + f"; data `{cfg.data_dir}`, runs under `{cfg.out_root}/`. Gold is the helpdesk judge's score (0–1) of "
               "answers to the held-out prompts; ± is one standard error over the prompts; failure rates are over all "
               "the prompts (over each failure's own intent in `failures_on_intent` of the stage's eval.json); "
               "degenerate is the share of answers with a degenerate sentence (a repeat, courtesy beyond one greeting "
               "and one closing, another intent's content, rudeness); KL is to the SFT policy "
               "in nats per answer; each stage's time is the wall-clock time of the run that wrote it (which may have "
               "shared the machine with another stage: `--jobs`).", ""]
    if cfg.quick:
        lines += ["**--quick: tiny models and a few steps; these numbers only show that the pipeline runs.**", ""]
    if not draw:
        lines += ["*Figures not drawn: matplotlib is not installed. `pip install -e \".[plot]\"`, then run "
                  "`python -m nanoalign.report` again (current stages are reused, so it takes seconds).*", ""]
    if rows:
        lines += ["## Results", "", *results_table(rows, results["sft"]["demo_gold"]), "",
                  "Principle scores (means over the held-out answers):", "",
                  "| stage | " + " | ".join(PRINCIPLES) + " |", "| --- " * (len(PRINCIPLES) + 1) + "|"]
        lines += [f"| {r['title']} | " + " | ".join(_num(r["principles"].get(p), "{:.2f}") for p in PRINCIPLES) + " |"
                  for r in rows if r["principles"]]
        lines += ["", "Commands:", "", *(f"- {r['title']}: `{_command(r['stage'], cfg)}`" for r in rows), ""]
    if "rm" in results:
        rm = results["rm"]
        lines += ["## Reward model", "", f"`{_command('rm', cfg)}`: held-out accuracy {rm['accuracy']:.3f} against the "
                  f"noisy labels, Bayes ceiling {_num(rm.get('bayes_ceiling'))} (the best any model can reach given "
                  f"the labels' noise), accuracy against the noise-free gold order {_num(rm.get('accuracy_vs_gold'))}, "
                  f"calibration error {rm['calibration_error']:.3f}, on {rm['n_pairs']} pairs.", ""]
        lines += ["| P(i above j) | pairs | mean P | observed rate |", "| --- | --- | --- | --- |"]
        lines += [f"| {b['bin'][0]:.1f}–{b['bin'][1]:.1f} | {b['n']} | {b['mean_p']:.3f} | {b['rate']:.3f} |"
                  for b in rm["reliability"]]
        if draw:
            figures.reward_model(rm, page / "reward_model.png")
            lines += ["", "![reward model](reward_model.png)"]
        lines.append("")
    if "bon" in results:
        curve = results["bon"]["curve"]
        fits = [gao_fit([r["kl"] for r in curve], [r["gold"] for r in curve], form) for form in ("bon", "rl")]
        lines += ["## Best-of-N", "", f"`{_command('bon', cfg)}`: per prompt the RM's pick among N SFT answers (the "
                  "unbiased pool estimator), against the analytic KL. Gold gain over N = 1 fitted with both forms of "
                  "Gao et al. (2022), d = √KL: " + "; ".join(
                      f"{f['form']}: α {_fixed(f['alpha'])}, β {_fixed(f['beta'])}, R² {f['r2']:.3f}" for f in fits), "",
                  "| N | " + " | ".join(str(r["n"]) for r in curve) + " |", "| --- " * (len(curve) + 1) + "|",
                  *(f"| {key} | " + " | ".join(f"{r[key]:.3f}" for r in curve) + " |"
                    for key in ("kl", "proxy", "gold"))]
        if draw:
            figures.best_of_n(curve, fits, page / "best_of_n.png")
            lines += ["", "![best-of-N](best_of_n.png)"]
        lines.append("")
    if "rlaif" in results:
        labels = results["rlaif"]
        lines += ["## RLAIF", "", f"`{_command('rlaif', cfg)}`: the feedback model's labels agree with the gold "
                  f"order on {_num(labels['agreement'], '{:.3f}', 'n/a')} of the pairs (one order only: "
                  f"{_num(labels.get('agreement_one_order'))}; human-like labels: "
                  f"{_num(labels.get('human_label_agreement'))}), "
                  f"log-loss {_num(labels['log_loss'], '{:.3f}', 'n/a')}."]
        if "rm_rlaif" in results:
            lines.append(f"The reward model trained on them (`{_command('rm_rlaif', cfg)}`): held-out accuracy "
                         f"{results['rm_rlaif']['accuracy']:.3f} against the human-like labels, against the gold "
                         f"order {_num(results['rm_rlaif'].get('accuracy_vs_gold'))}.")
        lines.append("")
    logs = {STAGES[n].legend: _read(out / n / "log.jsonl") for n in ("ppo", "ppo_rlaif") if n in results}
    if logs:
        lines += ["## PPO training", "", "Each update's rollout on training prompts: the RM score PPO maximises, "
                  "the gold judge's score it never sees, the KL to SFT and the entropy.", ""]
        for name, log in logs.items():
            lines.append(f"`{name}`: update 1 → {log[-1]['step']}: RM score {log[0]['objective/rm_score']:+.2f} → "
                         f"{log[-1]['objective/rm_score']:+.2f}, gold {log[0]['objective/gold']:.3f} → "
                         f"{log[-1]['objective/gold']:.3f}, KL {log[-1]['objective/kl']:.2f} nats.")
        if draw:
            figures.training_curves(logs, page / "ppo_curves.png")
            lines += ["", "![PPO curves](ppo_curves.png)"]
        lines.append("")
    if "ppo_hack" in results:
        log, cmd = _read(out / "ppo_hack" / "log.jsonl"), STAGES["ppo_hack"].legend
        peak = max(log, key=lambda r: r["objective/gold"])
        lines += ["## Reward hacking", "", f"`{cmd}`: without the KL penalty gold peaks at update {peak['step']} "
                  f"({peak['objective/gold']:.3f}) and ends at {log[-1]['objective/gold']:.3f}, while the RM score "
                  f"goes {log[0]['objective/rm_score']:+.2f} → {log[-1]['objective/rm_score']:+.2f}."]
        if draw:
            figures.reward_hacking(log, cmd, page / "reward_hacking.png")
            lines += ["", "![reward hacking](reward_hacking.png)"]
        lines.append("")
    if rows and draw:
        points = [{"label": f"{r['title']} ({STAGES[r['stage']].legend})", "kl": r["kl"], "gold": r["gold"],
                   "se": r["se"]} for r in rows]
        figures.frontier(points, results["bon"]["curve"] if "bon" in results else None, page / "frontier.png")
        lines += ["## Gold against KL", "", "![frontier](frontier.png)", ""]
    if rows:
        lines += ["## Sampled answers", "", "The first three held-out prompts (best-of-N: its pick), with the "
                  "judge's principle scores.", *samples_section(rows)]
    path = page / "index.md"
    tmp = path.with_name("index.md.tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    tmp.replace(path)
    return path


def _fixed(x: float) -> str:
    """x to 3 decimals, with no "-0.000": a fit of flat points gives ±1e-17 from one call to the next."""
    return f"{round(x, 3) + 0.0:.3f}"


def main(cfg: Config) -> Path:
    check_config(cfg, positive="jobs")
    for name in (n for n in cfg.force.split(",") if n not in ("", "all")):
        if name not in STAGES:
            raise SystemExit(f"--force: unknown stage {name!r}; expected all or some of {', '.join(STAGES)}")
    missing = [STAGES[n].argv[0] for n in selected(cfg.stages) if STAGES[n].argv[0] != "-m"
               and not (ROOT / STAGES[n].argv[0]).exists()]
    if missing:
        raise SystemExit(f"the report runs the repository's scripts ({', '.join(sorted(set(missing)))} missing): "
                         "run it from a checkout installed with `pip install -e .`")
    page = Path(cfg.out_root) / "report"
    for stale in [*page.glob("*.png"), page / "index.md"]:  # nothing drawn from an older run survives
        stale.unlink(missing_ok=True)
    t0 = time.time()
    runs = run_pipeline(cfg)
    path = write_report(cfg, runs)
    print(f"[report] wrote {path} in {minutes(time.time() - t0)}")
    return path

