"""The reproductions' shared helpers (nanoalign/report/experiment.py)."""

import json
from dataclasses import dataclass

import pytest

from nanoalign.report.experiment import int_list, logged, mean_se, print_claims, quick, write_results


@dataclass
class Flags:
    n_pairs: str = "250,500,1000"
    quick: bool = False


def test_int_list_parses_increasing_positive_integers_or_names_the_flag():
    assert int_list(Flags(), "n_pairs") == [250, 500, 1000]
    for bad in ("", "250,x", "0,5", "500,250", "5,5"):
        with pytest.raises(SystemExit, match=f"--n_pairs={bad}: expected increasing comma-separated positive"):
            int_list(Flags(bad), "n_pairs")


def test_mean_se_by_hand():
    mean, se = mean_se([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)  # Python floats: ~1e-16
    assert se == pytest.approx((((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2 / 3) ** 0.5)


def test_logged_prints_and_keeps_every_line(tmp_path, capsys):
    with logged(tmp_path / "log.txt") as log:
        log("first")
        assert (tmp_path / "log.txt").read_text() == "first\n"  # written as it goes
        log("second")
    assert (tmp_path / "log.txt").read_text() == "first\nsecond\n" and capsys.readouterr().out == "first\nsecond\n"


def test_print_claims(capsys):
    print_claims([{"claim": "a holds", "pass": True, "measured": "+0.1"},
                  {"claim": "b holds", "pass": False, "measured": "-0.2"}])
    assert capsys.readouterr().out == "PASS  a holds: +0.1\nFAIL  b holds: -0.2\n"


def test_quick_replaces_the_fields_it_names_only_when_asked(capsys):
    assert quick(Flags(), {"n_pairs": "8"}) == Flags()
    assert quick(Flags(quick=True), {"n_pairs": "8"}) == Flags("8", True)
    assert "--quick=True: {'n_pairs': '8'}" in capsys.readouterr().out


def test_write_results_writes_then_prints_tables_claims_and_time(tmp_path, capsys):
    result = {"time_s": 90.0, "x": [1, 2]}
    claims = [{"claim": "it rises", "pass": True, "measured": "+1"}]
    assert write_results(tmp_path, result, "| a | b |", claims, seeds=3) is result
    assert json.loads((tmp_path / "results.json").read_text()) == result
    said = capsys.readouterr().out
    assert said.index("| a | b |") < said.index("PASS  it rises: +1") < said.index("3 seeds in 1.5 min")
