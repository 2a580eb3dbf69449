"""experiments/frontier.py (reproduction T2): the labels, the matched-KL comparison, the oracle's answers and its
exact frontier, each by hand, and --quick=True end to end on a tiny world and a tiny model."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from nanoalign.world import helpdesk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import frontier  # noqa: E402

pytestmark = pytest.mark.slow  # a reproduction, --quick: the full suite only


def test_labels_by_hand():
    gold = torch.tensor([[0.5, 0.2], [0.1, 0.1], [0.0, 0.3]], dtype=torch.float64)
    first, labelled = frontier.label(gold, "gold", torch.Generator().manual_seed(0))
    assert first.tolist() == [True, False, False] and labelled.tolist() == [True, False, True]  # the tie: no label
    n = 40000  # bt: the first answer wins with probability σ(κ·(0.6 - 0.4)) = σ(1) = 0.7311 at κ = 5
    first, labelled = frontier.label(torch.tensor([[0.6, 0.4]] * n, dtype=torch.float64), "bt",
                                     torch.Generator().manual_seed(0))
    p = 1 / (1 + math.exp(-helpdesk.KAPPA * 0.2))
    assert labelled.all() and abs(first.double().mean().item() - p) < 4 * (p * (1 - p) / n) ** 0.5  # 4 s.e.


def test_matched_kl_by_hand():
    """Edges [1, 2]: bins [0, 1), [1, 2), [2, inf). Seed 0: A 0.7 at KL 0.5; A 0.8 and 0.6 (mean 0.7) and B 0.5 at
    KL 1-2 (KL 1 falls in [1, 2)); B 0.9 at KL 3. Seed 1: A 0.4, B 0.5 at KL 1.5; A 0.9 at KL 0.2. Seed 2: B only.
    Only bin [1, 2) holds both methods in two seeds: differences 0.7 - 0.5 = 0.2 and 0.4 - 0.5 = -0.1, mean 0.05,
    s.e. 0.15 (their sample std 0.2121, over √2)."""
    pts = lambda *xs: [{"method": m, "kl": k, "gold": g} for m, k, g in xs]
    seeds = [pts(("A", 0.5, 0.7), ("A", 1.0, 0.8), ("A", 1.9, 0.6), ("B", 1.2, 0.5), ("B", 3.0, 0.9)),
             pts(("A", 1.5, 0.4), ("B", 1.5, 0.5), ("A", 0.2, 0.9)),
             pts(("B", 1.5, 0.1), ("B", 0.1, 0.1))]
    (row,) = frontier.matched_kl(seeds, "A", "B", [1.0, 2.0])
    assert row["bin"] == [1.0, 2.0] and row["seeds"] == 2
    # Python floats, a few ops on hand values: ~1e-16, under pytest.approx's default rel 1e-6
    assert (row["diff"], row["se"], row["a"], row["b"]) == pytest.approx((0.05, 0.15, 0.55, 0.5))
    # one open bin [0.05, inf) over every point of seed 0 (A 0.7, B 0.7) and seed 1 (A 0.65, B 0.5)
    (row,) = frontier.matched_kl(seeds, "A", "B", [0.05])
    assert row["bin"] == [0.05, None] and (row["diff"], row["seeds"]) == (pytest.approx(0.075), 2)
    assert frontier.matched_kl(seeds[:1], "A", "B", [1.0, 2.0]) == []  # one seed is not enough


def test_oracle_answers_and_their_contexts():
    ys, contexts = frontier.answers_and_contexts()
    assert ys.shape == (216, 3) and len({tuple(y) for y in ys.tolist()}) == 216
    i = ys.tolist().index([2, 3, 4])
    assert contexts[i].tolist() == [0, 1 + 2, 1 + 6 + 2 * 6 + 3]  # (), (2,), (2, 3)
    assert contexts.max().item() == 1 + 6 + 36 - 1
    table = torch.randn(43, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logps = frontier.answer_logps(table, ys, contexts)
    assert logps.exp().sum().item() == pytest.approx(1.0, abs=1e-12)  # a distribution; float64, ~1e-16
    by_hand = sum(table[c].log_softmax(0)[y].item() for c, y in zip(contexts[i].tolist(), [2, 3, 4]))
    assert logps[i].item() == pytest.approx(by_hand, abs=1e-12)


def test_exact_frontier_by_hand():
    """Two answers, π_ref = (½, ½), gold = (1, 0): a policy putting p on the first has KL log 2 + p log p +
    (1-p) log(1-p) and gold p; at a given KL the best of the two solutions is p >= ½. KL(p = 0.9) = 0.3681."""
    ref, gold = torch.tensor([0.5, 0.5], dtype=torch.float64).log(), torch.tensor([1.0, 0.0], dtype=torch.float64)
    kl = math.log(2) + 0.9 * math.log(0.9) + 0.1 * math.log(0.1)
    # 200 float64 bisections on log τ over [log 1e-8, log 1e12]: the bracket shrinks below rounding (~1e-16)
    assert frontier.frontier_gold(ref, gold, kl) == pytest.approx(0.9, abs=1e-9)
    assert frontier.frontier_gold(ref, gold, 0.0) == pytest.approx(0.5, abs=1e-9)
    assert frontier.frontier_gold(ref, gold, math.log(2)) == 1.0  # the point mass on the first answer, and past it
    assert frontier.exact_kl(torch.tensor([0.0, -math.inf], dtype=torch.float64), ref) == pytest.approx(math.log(2))


def test_optimum_and_frontier_bound_every_policy():
    """π* = π_ref·exp(r/β)/Z reaches E[r] - β·KL = β·log Z (DPO Eqs. 4-5, computed here from Z itself), and no
    random policy on 6 answers lies above the frontier at its own KL."""
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(6, generator=g, dtype=torch.float64).log_softmax(0)
    gold = torch.rand(6, generator=g, dtype=torch.float64)
    star = frontier.optimum(ref, gold, 0.3)
    log_z = torch.logsumexp(ref + gold / 0.3, 0).item()
    assert (star.exp() * gold).sum().item() - 0.3 * frontier.exact_kl(star, ref) == pytest.approx(0.3 * log_z)
    for _ in range(200):
        policy = (3 * torch.randn(6, generator=g, dtype=torch.float64)).log_softmax(0)
        value = (policy.exp() * gold).sum().item()
        assert value <= frontier.frontier_gold(ref, gold, frontier.exact_kl(policy, ref)) + 1e-9


@pytest.fixture
def world(quick_world):
    return quick_world


def test_quick_run_end_to_end(world, tmp_path, capsys):
    """--quick=True trains every method for each of 2 seeds and writes well-formed results: each run's points at
    its curve points, every oracle point under the exact frontier (true for any policy, so this checks the
    measurement), and the claims printed as measured."""
    cfg = frontier.Config(data_dir=str(world / "data"), init_from=str(world / "init"), out_dir=str(tmp_path / "t2"),
                          quick=True)
    result = frontier.main(cfg)
    saved = json.loads((tmp_path / "t2" / "results.json").read_text())
    assert saved["claims"] == result["claims"] and len(saved["helpdesk"]) == len(saved["oracle"]) == 2
    for run in saved["helpdesk"]:
        assert [(r["method"], r["setting"]) for r in run["runs"]] == [
            ("DPO", "β 0.1"), ("DPO", "β 1"), ("PPO", "KL 2"), ("PPO-GT", "KL 2"), ("Preferred-FT", "")]
        assert [[p["step"] for p in r["points"]] for r in run["runs"]] == [[2, 4], [2, 4], [1, 2], [1, 2], [2, 4]]
        assert all(p["kl"] > -1e-6 and 0 <= p["gold"] <= 1 for r in run["runs"] for p in r["points"])
        assert run["pairs"] >= 4 and 0 <= run["agreement"] <= 1
    for run in saved["oracle"]:
        assert [p["method"] for p in run["points"]] == ["Preferred-FT"] + ["DPO"] * 6  # 2 β x steps 1, 2, 4
        assert all(p["frontier_gap"] >= -1e-9 for p in run["points"])
    assert all(isinstance(c["pass"], bool) for c in saved["claims"]) and len(saved["claims"]) == 6
    assert saved["plots"] in (["frontier.png"], [])
    assert all((tmp_path / "t2" / name).stat().st_size > 0 for name in saved["plots"])
    out = capsys.readouterr().out
    assert out.count("PASS") + out.count("FAIL") == 6 and "| Preferred-FT |" in out
    assert (tmp_path / "t2" / "log.txt").read_text().count("oracle DPO") == 4


def test_bad_flags_stop_before_any_work(world, tmp_path):
    base = dict(data_dir=str(world / "data"), init_from=str(world / "init"), out_dir=str(tmp_path / "o"))
    for flags, message in (({"labels": "soft"}, "--labels=soft"),
                           ({"kl_bins": "2,1"}, "--kl_bins=2,1"),
                           ({"dpo_betas": "0.1,x"}, "--dpo_betas=0.1,x"),
                           ({"gt_kl_targets": "-1"}, "--gt_kl_targets=-1"),
                           ({"dpo_steps": 10, "curve_points": 3}, "--dpo_steps=10: must be a multiple"),
                           ({"n_prompts": 49}, "--n_prompts=49: need between"),
                           ({"seeds": 0}, "--seeds=0"),
                           ({"init_from": str(tmp_path / "none")}, "no checkpoint at")):
        with pytest.raises(SystemExit, match=message):
            frontier.main(frontier.Config(**{**base, **flags}))
    assert not (tmp_path / "o").exists()
