"""experiments/overopt.py (reproduction T1): its helper maths by hand, the claims' verdicts on curves of known
shape, and --quick=True end to end on a tiny world and a tiny model."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch


from nanoalign.data import read_jsonl
from nanoalign.losses import best_of_n_kl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import overopt  # noqa: E402

pytestmark = pytest.mark.slow  # a reproduction, --quick: the full suite only

NS = [1, 2, 4, 8, 16, 32, 64]


def test_standardise_by_hand():
    mean, std = overopt.standardise(torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64))
    assert mean == 3.0 and std == pytest.approx(math.sqrt((4 + 1 + 0 + 9) / 4))  # population std; Python floats
    assert overopt.standardise(torch.zeros(5)) == (0.0, 1.0)  # constant: recentred only


def test_fitted_peaks_by_hand_and_on_a_grid():
    """d* from the fit: α/(2β) for best-of-N, exp(α/β - 1) for RL, and the argmax of each fitted curve on a grid."""
    kl = [best_of_n_kl(n) for n in NS]
    grid = [i / 10000 for i in range(1, 40000)]
    bon = overopt.fit(kl, [0.6 * d - 0.2 * d * d for d in map(math.sqrt, kl)], "bon")
    # float64 least squares on exact curves: ~1e-15 (pytest.approx's default rel 1e-6 far above); the grid's
    # argmax is within its spacing 1e-4 of the peak
    assert (bon["alpha"], bon["beta"], bon["d_star"]) == pytest.approx((0.6, 0.2, 0.6 / 0.4))
    assert max(grid, key=lambda d: 0.6 * d - 0.2 * d * d) == pytest.approx(bon["d_star"], abs=1e-4)
    rl_kl = [0.0, 0.04, 0.25, 1.0, 2.25, 4.0]
    rl = overopt.fit(rl_kl, [d * (0.5 - 0.4 * math.log(d)) if d else 0.0 for d in map(math.sqrt, rl_kl)], "rl")
    assert (rl["alpha"], rl["beta"], rl["d_star"]) == pytest.approx((0.5, 0.4, math.exp(0.5 / 0.4 - 1)))
    assert max(grid, key=lambda d: d * (0.5 - 0.4 * math.log(d))) == pytest.approx(rl["d_star"], abs=1e-4)
    rising = overopt.fit(kl, [0.3 * d + 0.1 * d * d for d in map(math.sqrt, kl)], "bon")  # β = -0.1: no peak
    assert rising["beta"] == pytest.approx(-0.1) and rising["d_star"] == math.inf


def test_rl_points_average_each_pass_and_normalise_by_hand():
    log = [{"step": s, "objective/kl": kl, "objective/gold": g, "objective/rm_score": r}
           for s, kl, g, r in ((1, 0.0, 0.7, 1.0), (2, 0.2, 0.9, 3.0), (3, 1.0, 0.5, 5.0), (4, 1.4, 0.3, 7.0))]
    points = overopt.rl_points(log, 2, gold_norm=(0.6, 0.2), reward_norm=(2.0, 1.0), proxy_norm=(0.5, 0.25))
    # pass 1: KL 0.1, gold (0.8 - 0.6) / 0.2 = 1; RM score 2 = 2·raw + 1, raw 0.5 -> (0.5 - 0.5) / 0.25 = 0
    # pass 2: KL 1.2, gold (0.4 - 0.6) / 0.2 = -1; RM score 6 -> raw 2.5 -> (2.5 - 0.5) / 0.25 = 8
    assert [p["updates"] for p in points] == [[1, 2], [3, 4]]
    for p, expected in zip(points, ((0.1, 1.0, 0.0), (1.2, -1.0, 8.0))):
        assert (p["kl"], p["gold"], p["proxy"]) == pytest.approx(expected)


def test_rl_minus_bon_interpolates_in_d_by_hand():
    bon = [{"kl": 0.0, "gold": 0.0}, {"kl": 1.0, "gold": 0.4}, {"kl": 4.0, "gold": 0.2}]  # d = 0, 1, 2
    rl = [{"kl": -0.01, "gold": 0.05},  # a noisy KL below 0 is d = 0, where best-of-N is 0: +0.05
          {"kl": 0.25, "gold": 0.1},  # d = 0.5: best-of-N 0.2, -0.1
          {"kl": 2.25, "gold": 0.1},  # d = 1.5: best-of-N 0.3, -0.2
          {"kl": 6.25, "gold": 0.0}]  # d = 2.5: beyond best-of-N's range, left out
    assert overopt.rl_minus_bon(rl, bon) == pytest.approx((0.05 - 0.1 - 0.2) / 3)
    assert overopt.rl_minus_bon(rl[3:], bon) is None


def known_runs(flat: str = "") -> list[dict]:
    """Two seeds of exact curves (gold ± 0.01 by seed, so the means are exact): best-of-N gold d(0.5 - βd) with
    β = 0.5 / (blocks · pairs / 10), proxy d; RL on proxy 2:10 gold d(0.15 - 0.15 log d), peak at d = 1, below
    best-of-N's d(0.5 - 0.25d); on 2:40 d(0.8 - 0.1 log d), peak at e^7, above best-of-N's d(0.5 - 0.0625d).
    `flat`: a proxy whose best-of-N gold only rises, 0.5d."""
    runs = []
    for sign in (1, -1):
        run = {}
        for size in (1, 2):
            for n in (10, 20, 40):
                key, beta = f"{size}:{n}", 0.5 / (size * n / 10)
                gold = (lambda d: 0.5 * d) if key == flat else (lambda d, b=beta: d * (0.5 - b * d))
                run[key] = {"rm": {"accuracy": 0.6, "accuracy_vs_gold": 0.6, "loss": 0.7},
                            "bon": [{"n": n, "kl": best_of_n_kl(n), "proxy": math.sqrt(best_of_n_kl(n)),
                                     "gold": gold(math.sqrt(best_of_n_kl(n))) + 0.01 * sign} for n in NS]}
        for key, alpha, beta in (("2:10", 0.15, 0.15), ("2:40", 0.8, 0.1)):
            run[key]["rl"] = [{"updates": [2 * i + 1, 2 * i + 2], "kl": d * d, "proxy": d,
                               "gold": d * (alpha - beta * math.log(d)) + 0.01 * sign} for i, d in
                              enumerate((0.2, 0.5, 1.0, 1.5, 2.0, 3.0))]
        runs.append(run)
    return runs


def test_claims_verdicts_on_known_curves():
    cfg = overopt.Config(sizes="1,2", n_pairs="10,20,40", ppo_proxies="2:10,2:40")
    summ = overopt.summary(known_runs())
    assert summ["1:10"]["bon_fit"]["r2"] == pytest.approx(1.0) and summ["1:10"]["bon"][0]["gold"] == pytest.approx(
        (0.0, 0.01))  # n = 1: gold 0 ± 0.01 over the seeds
    assert summ["2:10"]["rl"][0]["d"] == 0.0 and summ["2:10"]["rl_fit"]["d_star"] == pytest.approx(1.0)
    expected = [("best-of-N: the proxy rises monotonically", True),
                ("best-of-N: gold rises then falls", True),  # 10 pairs: peaks at d = 0.44 (1 block), 1.10 (2)
                ("best-of-N: R² >= 0.9", True), ("best-of-N: the form d(α − βd) fits better than a line", True),
                ("best-of-N: with more data", True), ("best-of-N: with larger proxies", True),
                ("RL: the proxy rises monotonically", True),
                ("RL: gold rises then falls", False),  # 2:40 peaks beyond its last point
                ("RL: R² >= 0.9", True), ("RL: with more proxy data", True),  # d* 1 -> e^7, β 0.15 -> 0.1
                ("at equal d, RL's gold gain <= best-of-N's with the same proxy, 2:10", True),
                ("at equal d, RL's gold gain <= best-of-N's with the same proxy, 2:40", False)]
    found = overopt.claims(summ, cfg)
    assert [(c["claim"].startswith(text), c["pass"]) for c, (text, _) in zip(found, expected)] == [
        (True, verdict) for _, verdict in expected] and len(found) == len(expected)
    flat = {text: c["pass"] for c in overopt.claims(overopt.summary(known_runs(flat="1:10")), cfg)
            for text, _ in expected if c["claim"].startswith(text)}
    assert not flat["best-of-N: gold rises then falls"] and not flat["best-of-N: with more data"]
    assert not flat["best-of-N: with larger proxies"]  # at 10 pairs the 1-block proxy no longer peaks first
    assert flat["best-of-N: R² >= 0.9"] and flat["RL: with more proxy data"]
    json.dumps(overopt.finite(summ), allow_nan=False)  # strict JSON


@pytest.fixture
def world(quick_world):
    return quick_world


def test_quick_run_end_to_end(world, tmp_path, capsys):
    """--quick=True trains 6 proxies per seed, PPO with KL coefficient 0 on 2 of them, on the pool's prompts, and
    writes strict JSON with every curve."""
    rm_runs, ppo_runs = [], []
    real_rm, real_ppo = overopt.train_rm.main, overopt.train_ppo.main

    def recording_rm(rm_cfg):
        rm_runs.append((rm_cfg.seed, rm_cfg.init_from, sorted(r["prompt"] for r in read_jsonl(
            Path(rm_cfg.data_dir) / "prefs.jsonl"))))
        return real_rm(rm_cfg)

    def recording_ppo(ppo_cfg):
        ppo_runs.append((ppo_cfg.seed, ppo_cfg.beta, ppo_cfg.n_updates, [r["prompt"] for r in read_jsonl(
            Path(ppo_cfg.data_dir) / "prompts.jsonl")]))
        return real_ppo(ppo_cfg)

    cfg = overopt.Config(data_dir=str(world / "data"), init_from=str(world / "init"), out_dir=str(tmp_path / "t1"),
                         quick=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(overopt.train_rm, "main", recording_rm)
        mp.setattr(overopt.train_ppo, "main", recording_ppo)
        result = overopt.main(cfg)
    text = (tmp_path / "t1" / "results.json").read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"results.json holds {c}: not strict JSON"))
    assert len(rm_runs) == 2 * 6 and [s for s, _, _ in rm_runs] == [cfg.seed] * 6 + [cfg.seed + 1] * 6
    assert [len(p) for _, _, p in rm_runs[:3]] == [4, 8, 16] and set(rm_runs[0][2]) < set(rm_runs[1][2])  # nested
    assert rm_runs[0][1] != str(world / "init") and rm_runs[3][1] == str(world / "init")  # 1 block cut, 2 whole
    assert [(s, b, n) for s, b, n, _ in ppo_runs] == [(cfg.seed, 0.0, 4)] * 2 + [(cfg.seed + 1, 0.0, 4)] * 2
    assert all(len(p) == 4 and p == ppo_runs[0][3] for *_, p in ppo_runs)  # the pool's 4 prompts every time
    assert len(saved["runs"]) == 2 and saved["claims"] == json.loads(json.dumps(overopt.finite(result["claims"])))
    for run in saved["runs"]:
        assert set(run) == {f"{s}:{n}" for s in (1, 2) for n in (24, 48, 96)}
        assert all([r["n"] for r in v["bon"]] == [1, 2, 4, 8] for v in run.values())
        assert {k for k, v in run.items() if "rl" in v} == {"2:24", "2:96"}
        assert [p["updates"] for p in run["2:24"]["rl"]] == [[1, 2], [3, 4]]  # a point per pass over 4 prompts
        # n = 1: the SFT mean, recentred (float64 means of ~1 values: ~1e-16)
        assert run["1:24"]["bon"][0]["gold"] == pytest.approx(0.0, abs=1e-9)
    assert [p["d"] for p in saved["summary"]["2:96"]["rl"]][0] == 0.0 and len(saved["summary"]["2:96"]["rl"]) == 3
    assert all(isinstance(c["pass"], bool) for c in saved["claims"]) and len(saved["claims"]) == 12
    assert saved["plots"] == ["overopt.png"] or saved["plots"] == []
    assert all((tmp_path / "t1" / name).stat().st_size > 0 for name in saved["plots"])
    out = capsys.readouterr().out
    assert out.count("PASS  ") + out.count("FAIL  ") == 12 and "| PPO proxy | d | gold |" in out
    assert (tmp_path / "t1" / "log.txt").read_text().count("proxy") == 12


def test_bad_flags_stop_before_any_work(world, tmp_path):
    base = dict(data_dir=str(world / "data"), init_from=str(world / "init"), out_dir=str(tmp_path / "o"),
                sizes="1,2", n_pairs="24,48", batch_size=4, ppo_proxies="2:24", pool_prompts=4, ppo_rollout=2,
                ppo_updates=4)
    for flags, message in (({"n_pairs": "48,24"}, "--n_pairs=48,24"),
                           ({"sizes": "1,3", "ppo_proxies": "3:24"}, "--sizes=1,3: the trunk at .* has 2 blocks"),
                           ({"n_pairs": "12", "ppo_proxies": ""}, "--n_pairs=12: 12 pairs are 2 rankings"),
                           ({"pool_size": 48}, "--pool_size=48"),
                           ({"ppo_proxies": "2:30"}, "--ppo_proxies=2:30"),
                           ({"ppo_rollout": 3}, "--ppo_rollout=3"),
                           ({"ppo_updates": 3}, "--ppo_updates=3"),
                           ({"pool_prompts": 1000, "ppo_proxies": ""}, "--pool_prompts=1000"),
                           ({"seeds": 0}, "--seeds=0"),
                           ({"init_from": str(tmp_path / "none")}, "no checkpoint at")):
        with pytest.raises(SystemExit, match=message):
            overopt.main(overopt.Config(**{**base, **flags}))
    assert not (tmp_path / "o").exists()
