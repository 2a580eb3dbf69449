"""experiments/rm_scaling.py (reproduction T3): its helper maths by hand, the claims' verdicts on
known numbers, and --quick=True end to end on a tiny world and a tiny model."""

import json
import sys
from pathlib import Path

import pytest

from nanoalign.data import read_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import rm_scaling  # noqa: E402

pytestmark = pytest.mark.slow  # a reproduction, --quick: the full suite only


def test_a_rankings_pairs_better_answer_first():
    ranking = {"prompt": "p", "responses": ["a", "b", "c", "d"], "ranking": [2, 0, 3, 1]}
    pairs = rm_scaling.ranking_pairs([ranking])
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("c", "a"), ("c", "d"), ("c", "b"), ("a", "d"),
                                                            ("a", "b"), ("d", "b")]
    assert all(p["prompt"] == "p" for p in pairs)


def test_pooled_reliability_by_hand():
    one = [{"bin": [0.0, 0.1], "n": 2, "mean_p": 0.05, "rate": 0.0}, {"bin": [0.5, 0.6], "n": 1, "mean_p": 0.5,
                                                                     "rate": 1.0}]
    two = [{"bin": [0.5, 0.6], "n": 3, "mean_p": 0.58, "rate": 0.0}]
    pooled = rm_scaling.pooled_reliability([two, one])
    assert [b["bin"] for b in pooled] == [[0.0, 0.1], [0.5, 0.6]] and [b["n"] for b in pooled] == [2, 4]
    # Python floats: ~1e-16
    assert pooled[1]["mean_p"] == pytest.approx((0.5 + 3 * 0.58) / 4) and pooled[1]["rate"] == pytest.approx(0.25)


def fake_runs(acc: dict, final_loss: dict, curves: dict, rates: list[float]) -> list[dict]:
    """Seeds holding what the claims read: acc["size,N"] and final_loss[arm] per seed; curves[arm] per epoch."""
    table = [{"bin": [i / 10, (i + 1) / 10], "n": 40, "mean_p": i / 10 + 0.05, "rate": r} for i, r in enumerate(rates)]
    runs = []
    for seed in range(len(next(iter(acc.values())))):
        scaling = {key: {"accuracy": v[seed], "accuracy_vs_gold": 0.0, "loss": 0.0, "calibration_error": 0.0,
                         "reliability": table} for key, v in acc.items()}
        batching = {arm: {"accuracy": 0.7, "loss": final_loss[arm][seed],
                          "curve": [{"epoch": i + 1, "loss": x} for i, x in enumerate(curve)]}
                    for arm, curve in curves.items()}
        runs.append({"scaling": scaling, "batching": batching})
    return runs


def test_claims_verdicts_on_known_numbers():
    cfg = rm_scaling.Config(n_pairs="250,500,1000", sizes="1,2", batching="grouped,shuffled", batching_epochs=3)
    acc = {"1,250": [0.60, 0.62], "1,500": [0.65, 0.65], "1,1000": [0.70, 0.68],  # 0.04 per doubling: linear
           "2,250": [0.60, 0.60], "2,500": [0.70, 0.70], "2,1000": [0.71, 0.71]}  # bends: R² 1 - 0.00135 / 0.0074
    runs = fake_runs(acc, {"grouped": [0.50, 0.52], "shuffled": [0.55, 0.56]},
                     {"grouped": [0.6, 0.5, 0.51], "shuffled": [0.55, 0.53, 0.56]}, [0.1, 0.3, 0.2, 0.6])
    found = rm_scaling.claims(runs, rm_scaling.summary(runs), cfg, ceiling=0.73)
    assert len(found) == 8 and [c["claim"].split(", ")[-1].split(" (")[0] for c in found[:2]] == ["1-block RM",
                                                                                               "2-block RM"]
    assert (found[0]["pass"], found[0]["measured"]) == (True, "+0.0400 per doubling, R² 1.00; last step +0.0400")
    assert (found[1]["pass"], found[1]["measured"]) == (False, "+0.0550 per doubling, R² 0.82; last step +0.0100")
    verdicts = {c["claim"].split(" (")[0].split(":")[0]: (c["pass"], c["measured"]) for c in found[2:]}
    assert verdicts["... saturating below the Bayes ceiling A*"][0]  # 0.71 < 0.73
    assert verdicts["within 3 points of A* at the largest N"] == (True, "A* - accuracy +0.020 ± 0.000")
    assert verdicts["larger RMs >= smaller at the largest N"] == (True, "accuracy difference +0.0200 ± 0.0100")
    assert verdicts["shuffled pairs bottom out earlier than grouped rankings"] == (
        False, "shuffled epoch 2, grouped epoch 2 of 3")
    assert verdicts["... and overfit more"] == (True, "shuffled - grouped +0.0450 ± 0.0050")
    assert verdicts["monotone reliability"] == (False, "4 bins of >= 30 pairs: rates 0.10 0.30 0.20 0.60")


@pytest.fixture
def world(quick_world):
    return quick_world


def test_quick_run_end_to_end(world, tmp_path, capsys):
    """--quick=True trains every (size, N) and batching arm for each of 2 seeds and writes well-formed results;
    every arm of a seed sees the same rankings, the shuffled one as their C(K,2) pairs in steps of as many pairs."""
    seen = []  # per train_rm run: (seed, data, loss, prompts of its records, records, batch size, epochs)
    real_main = rm_scaling.train_rm.main

    def recording_main(rm_cfg):
        name = rm_cfg.pairs_file if rm_cfg.data == "pairs" else "prefs.jsonl"
        records = read_jsonl(Path(rm_cfg.data_dir) / name)
        seen.append((rm_cfg.seed, rm_cfg.data, rm_cfg.loss, sorted({r["prompt"] for r in records}), len(records),
                     rm_cfg.batch_size, rm_cfg.epochs))
        return real_main(rm_cfg)

    cfg = rm_scaling.Config(data_dir=str(world / "data"), init_from=str(world / "init"), out_dir=str(tmp_path / "t3"),
                            quick=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rm_scaling.train_rm, "main", recording_main)
        result = rm_scaling.main(cfg)
    saved = json.loads((tmp_path / "t3" / "results.json").read_text())
    assert saved["claims"] == result["claims"] and len(saved["runs"]) == 2
    assert len(seen) == 2 * (2 * 2 + 4) and [s[0] for s in seen] == [cfg.seed] * 8 + [cfg.seed + 1] * 8
    scaling, batching = seen[:4], seen[4:8]
    assert [s[4] for s in scaling] == [8, 16, 8, 16] and scaling[0][3] == scaling[2][3]  # 48, 96 pairs; nested
    assert set(scaling[0][3]) < set(scaling[1][3]) and all(s[6] == 1 for s in scaling)
    assert [(s[1], s[2]) for s in batching] == [("prefs", "kwise"), ("pairs", "kwise"), ("prefs", "best_of_k"),
                                                ("prefs", "plackett_luce")]
    assert all(s[3] == batching[0][3] and s[6] == 2 for s in batching)  # the same prompts, 2 epochs
    assert [s[4] for s in batching] == [8, 48, 8, 8] and [s[5] for s in batching] == [4, 24, 4, 4]
    assert seen[8][3] != seen[0][3]  # the next seed draws other rankings
    for run in saved["runs"]:
        assert set(run["scaling"]) == {"1,48", "1,96", "2,48", "2,96"} and run["scaling"]["2,96"]["train_pairs"] == 96
        assert set(run["batching"]) == {"grouped", "shuffled", "bestof", "pl"}
        for arm in run["batching"].values():
            assert [c["epoch"] for c in arm["curve"]] == [0.5, 1, 1.5, 2]  # 2 steps per epoch, 2 epochs
            assert arm["curve"][-1]["loss"] == pytest.approx(arm["loss"], abs=1e-6)  # the same weights and forwards
        for r in [*run["scaling"].values(), *run["batching"].values()]:
            assert 0 <= r["accuracy"] <= 1 and r["n_pairs"] == 8 * 6
    assert 0.5 < saved["bayes_ceiling"] < 1 and set(saved["trunk_params"]) == {"1", "2"}
    assert all(isinstance(c["pass"], bool) for c in saved["claims"]) and len(saved["claims"]) == 6
    assert saved["plots"] == ["accuracy_vs_pairs.png", "batching_loss.png"] or saved["plots"] == []
    assert all((tmp_path / "t3" / name).stat().st_size > 0 for name in saved["plots"])
    out = capsys.readouterr().out
    assert out.count("PASS") + out.count("FAIL") == 6 and "| bestof | 4 |" in out and "| shuffled | 12 |" in out
    assert (tmp_path / "t3" / "log.txt").read_text().count("seed") == 16


def test_bad_flags_stop_before_any_work(world, tmp_path):
    base = dict(data_dir=str(world / "data"), init_from=str(world / "init"), out_dir=str(tmp_path / "o"))
    for flags, message in (({"batching": "grouped,mixed"}, "--batching=grouped,mixed"),
                           ({"n_pairs": "250,x"}, "--n_pairs=250,x"),
                           ({"sizes": "2,1"}, "--sizes=2,1"),
                           ({"sizes": "1,3"}, "--sizes=1,3: the trunk at .* has 2 blocks"),
                           ({"n_pairs": "24"}, "--n_pairs=24: 4 rankings"),
                           ({"batching_epochs": 1}, "--batching_epochs=1"),
                           ({"seeds": 0}, "--seeds=0"),
                           ({"init_from": str(tmp_path / "none")}, "no checkpoint at")):
        with pytest.raises(SystemExit, match=message):
            rm_scaling.main(rm_scaling.Config(**{**base, "sizes": "1,2", **flags}))
    assert not (tmp_path / "o").exists()
