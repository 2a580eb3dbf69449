"""experiments/rlaif_labels.py (reproduction T4): each arm's labels by hand, the claims' verdicts on known
numbers, and a two-seed run end to end on a tiny world and tiny models."""

import json
import random
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch

from nanoalign.data import read_jsonl
from nanoalign.world import gold_judge, helpdesk
from nanoalign.world.constitution import read_constitution

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import rlaif_labels  # noqa: E402

pytestmark = pytest.mark.slow  # a reproduction, --quick: the full suite only


def test_each_arm_reads_its_labels_from_the_preferences():
    p_ab = torch.tensor([[0.9, 0.2, 0.6], [0.3, 0.5, 0.8]], dtype=torch.float64)  # [n = 2 pairs, M = 3]
    p_ba = torch.tensor([[0.3, 0.4, 0.5], [0.1, 0.7, 0.6]], dtype=torch.float64)
    flat = {"p_ab": torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]).double(), "p_ba": p_ba}
    drawn = torch.tensor([0, 2])
    arms = rlaif_labels.arm_labels({"p_ab": p_ab, "p_ba": p_ba}, drawn, rlaif_labels.Config(), "model", flat)
    both = [[0.5 * (a + 1 - b) for a, b in zip(ra, rb)] for ra, rb in zip(p_ab.tolist(), p_ba.tolist())]
    soft = [both[0][0], both[1][2]]  # 0.8, 0.6
    # float64 labels, a few ops on hand values: ~1e-16 apart, under pytest.approx's default rel 1e-6
    assert arms["soft"].tolist() == pytest.approx(soft)
    assert arms["hard"].tolist() == [1.0, 1.0]
    assert arms["clamped"].tolist() == pytest.approx([0.6, 0.6])  # the hard labels, clipped
    assert arms["ensemble"].tolist() == pytest.approx([sum(r) / 3 for r in both])
    assert arms["one order"].tolist() == pytest.approx([0.9, 0.8])
    assert arms["unbiased"].tolist() == pytest.approx([0.5 * (0.5 + 1 - 0.3), 0.5 * (0.5 + 1 - 0.6)])
    for m in range(3):
        assert arms[f"principle {m + 1} alone"].tolist() == pytest.approx([both[0][m], both[1][m]])
    synthetic = rlaif_labels.arm_labels({"p_ab": p_ab, "p_ba": p_ba}, drawn, rlaif_labels.Config(), "synthetic")
    assert set(synthetic) == {"soft", "hard", "clamped", "one order"}  # ensemble and single: the model's
    few = rlaif_labels.arm_labels({"p_ab": p_ab, "p_ba": p_ba}, drawn, rlaif_labels.Config(
        label_modes="soft", principles="ensemble", orders="both"), "model")
    assert set(few) == {"soft", "ensemble"}


def fake_runs(values: dict) -> list[dict]:
    """Seeds of results holding only what the claims read: values[arm] = (RM accuracy vs gold, RM loss,
    RM calibration error, PPO gold or None) per seed."""
    runs = []
    for seed in range(len(next(iter(values.values())))):
        run = {"model": {}, "position": {"model": {
            "identical_answers": {"one_order": 0.6 + 0.01 * seed, "both_orders": 0.5 - 0.01 * seed},
            "pairs_one_order": 0.55, "pairs_both_orders": 0.5}}}
        for arm, per_seed in values.items():
            acc, loss, cal, ppo_gold = per_seed[seed]
            run["model"][arm] = {"rm": {"accuracy_vs_gold": acc, "loss": loss, "calibration_error": cal},
                                 "labels": {"log_loss": loss}}
            if ppo_gold is not None:
                run["model"][arm]["ppo"] = {"gold": ppo_gold, "sft_gold": 0.7, "kl": 2.0 if arm == "hard" else 1.0,
                                            "failures": dict.fromkeys(helpdesk.FAILURES, 0.1),
                                            "sft_failures": dict.fromkeys(helpdesk.FAILURES, 0.2)}
        runs.append(run)
    return runs


def test_claims_verdicts_on_known_numbers():
    runs = fake_runs({
        "soft": [(0.70, 0.60, 0.03, None), (0.72, 0.58, 0.05, None), (0.68, 0.62, 0.04, None)],
        "hard": [(0.66, 0.70, 0.10, 0.80), (0.70, 0.72, 0.12, 0.76), (0.67, 0.69, 0.11, 0.78)],
        "clamped": [(0.69, 0.65, 0.02, 0.79), (0.69, 0.66, 0.03, 0.78), (0.66, 0.64, 0.04, 0.77)],
        "ensemble": [(0.71, 0.6, 0.0, None), (0.70, 0.6, 0.0, None), (0.72, 0.6, 0.0, None)],
        "principle 1 alone": [(0.74, 0.6, 0.0, None), (0.60, 0.6, 0.0, None), (0.70, 0.6, 0.0, None)],
        "principle 2 alone": [(0.60, 0.6, 0.0, None), (0.62, 0.6, 0.0, None), (0.58, 0.6, 0.0, None)],
        "one order": [(0.72, 0.6, 0.0, None), (0.73, 0.6, 0.0, None), (0.70, 0.6, 0.0, None)],
    })
    found = {c["claim"].split("] ")[1]: c for c in rlaif_labels.claims(runs, rlaif_labels.Config(labellers="model"))}
    soft_hard = found["soft >= hard labels: RM accuracy against gold (CAI §4.3)"]
    assert soft_hard["pass"] and soft_hard["measured"] == "soft - hard +0.023 ± 0.009"  # diffs .04, .02, .01
    assert found["soft >= hard labels: RM held-out log-loss"]["pass"]
    assert found["clamping over-confident labels -> better-calibrated RM (CAI §4.3)"]["pass"]
    less_extreme = found["... and less extreme RL: lower KL at equal gold (within 1 s.e.)"]
    assert less_extreme["pass"] and "KL -1.00 ± 0.00" in less_extreme["measured"]  # gold 0.000 ± 0.010
    best = found["the principles' ensemble beats every single principle: RM accuracy against gold"]
    assert best["pass"] and "best single (principle 1 alone) 0.680" in best["measured"]
    assert found["... with lower seed variance"]["pass"]  # s.e. 0.006 against (0.042 + 0.012) / 2 = 0.027
    position = found["order averaging removes the measured position bias: P(slot A) for the same answer in both "
                     "slots nearer ½ (RLAIF)"]
    assert position["pass"] and position["measured"] == ("one order 0.610 ± 0.006, both orders 0.490 ± 0.006; mean "
                                                         "P(y1) on the labelled pairs 0.550 and 0.500")
    assert not found["... and the RM's accuracy against gold rises"]["pass"]  # one order is better here
    assert found["... the labels' log-loss against gold falls"]["pass"] is False  # 0.60 against 0.60: no fall
    assert [c["pass"] for c in rlaif_labels.claims(runs, rlaif_labels.Config(labellers="model"))
            if "beats SFT" in c["claim"] or "failure rate" in c["claim"]] == [True] * 4  # hard and clamped PPO


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """Helpdesk prompts for labelling and PPO, held-out demonstrations, and held-out gold-scored rankings."""
    root = tmp_path_factory.mktemp("t4")
    rng = random.Random(0)
    prompts = list(islice(helpdesk.prompt_stream(4), 14))
    rows = {"prompts.jsonl": [{"prompt": p} for p in prompts[:10]],
            "sft_test.jsonl": [{"prompt": p, "completion": helpdesk.demonstration(p, rng)} for p in prompts[10:]],
            "prefs_test.jsonl": []}
    for p in prompts[10:]:
        answers = helpdesk.candidates(p, rng, 3)
        gold = [gold_judge.judge(p, a)["gold"] for a in answers]
        rows["prefs_test.jsonl"].append({"prompt": p, "responses": answers, "gold": gold,
                                         "ranking": sorted(range(3), key=lambda i: -gold[i])})
    for name, records in rows.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_two_seeds_end_to_end(tiny_world, judge_dir, tmp_path, capsys):
    cfg = rlaif_labels.Config(data_dir=str(tiny_world), policy=str(judge_dir), judge=str(judge_dir),
                              out_dir=str(tmp_path / "t4"), seeds=2, seed=5, n_prompts=4, k=3, max_new_tokens=6,
                              batch_size=4, rm_batch_size=4, ppo_arms="hard", ppo_updates=1, ppo_rollout=4, n_eval=2)
    seen = []  # what each reward model was trained on: its seed and the labels in its pairs file
    real_main = rlaif_labels.train_rm.main

    def recording_main(rm_cfg):
        seen.append((rm_cfg.seed, sorted({r["p"] for r in read_jsonl(rm_cfg.pairs_file, "pairs")})))
        return real_main(rm_cfg)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rlaif_labels.train_rm, "main", recording_main)
        result = rlaif_labels.main(cfg)
    saved = json.loads((tmp_path / "t4" / "results.json").read_text())
    n_arms = 5 + len(read_constitution()) + 5  # model: soft, hard, clamped, ensemble, one order, singles; synthetic
    assert [s for s, _ in seen] == [5] * n_arms + [6] * n_arms
    labels = [p for _, p in seen]
    assert set(labels[1]) <= {0.5, 1.0} and set(labels[2]) <= {0.5, 0.6}  # hard, clamped: p of the chosen answer
    assert len(labels[0]) > 2 and all(0.5 <= p <= 1 for p in labels[0])  # soft
    assert saved["claims"] == result["claims"] and len(saved["runs"]) == 2
    n_principles = len(read_constitution())
    for run in saved["runs"]:
        assert set(run["model"]) == {"soft", "hard", "clamped", "ensemble", "one order",
                                     *(f"principle {m + 1} alone" for m in range(n_principles))}
        assert set(run["synthetic"]) == {"soft", "hard", "clamped", "one order", "unbiased"}
        for arm, metrics in [*run["model"].items(), *run["synthetic"].items()]:
            assert {"accuracy_vs_gold", "loss", "calibration_error"} <= metrics["rm"].keys()
            assert ("ppo" in metrics) == (arm == "hard" and metrics in run["model"].values())
        assert run["model"]["hard"]["ppo"]["sft_gold"] >= 0
    claims = [c["claim"] for c in saved["claims"]]
    assert len(claims) == 17 and all(isinstance(c["pass"], bool) for c in saved["claims"])
    out = capsys.readouterr().out
    assert "| model | principle 9 alone |" in out and out.count("PASS") + out.count("FAIL") == 17
    for run in saved["runs"]:
        assert run["position"]["model"]["identical_answers"]["both_orders"] == pytest.approx(0.5)
        assert set(run["position"]["synthetic"]) == {"identical_answers", "pairs_one_order", "pairs_both_orders"}
    log = (tmp_path / "t4" / "log.txt").read_text()
    assert log.count("labelled by the model labeller") == 2


def test_missing_checkpoints_and_bad_arms_stop_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at .*nothing: first train the SFT policy"):
        rlaif_labels.main(rlaif_labels.Config(policy=str(tmp_path / "nothing"), out_dir=str(tmp_path / "o")))
    with pytest.raises(SystemExit, match="--label_modes=soft,fuzzy"):
        rlaif_labels.main(rlaif_labels.Config(label_modes="soft,fuzzy", out_dir=str(tmp_path / "o")))
    with pytest.raises(SystemExit, match="soft is every other arm's mode"):
        rlaif_labels.main(rlaif_labels.Config(label_modes="hard", out_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()
