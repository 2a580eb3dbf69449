"""The report: one quick run of the whole pipeline, every stage reused on the second call, the reason each stage
would run again, no figure from an older run, the page without matplotlib, and the Gao et al. fit by hand."""

import json
import math
import random
import shutil

import pytest

from nanoalign import report
from nanoalign.evaluate import gao_fit
from nanoalign.report import figures, pipeline
from nanoalign.report.pipeline import Config, STAGES
from nanoalign.world.files import write_world

pytestmark = pytest.mark.slow  # the report's pipeline on tiny models: the full suite only


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """A tiny world and one `--quick=True` report over the default stages."""
    root = tmp_path_factory.mktemp("report")
    write_world(root / "data", seed=1234, n_train=96, n_test=24)
    cfg = Config(quick=True, out_root=str(root / "out"), data_dir=str(root / "data"))
    report.main(cfg)
    return cfg


def test_quick_report_writes_every_section(quick, capsys):
    page = (pipeline.Path(quick.out_root) / "report" / "index.md").read_text()
    for title in ("SFT", "best-of-8 (SFT + RM)", "DPO", "PPO"):
        assert f"| {title} | " in page
    for section in ("## Reward model", "## Best-of-N", "## PPO training", "## Gold against KL", "## Sampled answers"):
        assert section in page
    assert page.count("\n> → *") == 3 * 4, page  # three sampled answers for each of the four policies
    manifest = json.loads((pipeline.Path(quick.out_root) / "report" / "stages.json").read_text())
    assert list(manifest) == list(pipeline.DEFAULT) and all(r["seconds"] > 0 for r in manifest.values())
    assert manifest["rm"]["inputs"] == {"sft": pipeline.outputs_digest(manifest["sft"])}
    assert all(0 < r["work"] <= r["seconds"] + 0.5 for r in manifest.values())  # its seconds at full speed
    rm, dpo = manifest["rm"], manifest["dpo"]  # --jobs=2: DPO starts beside the RM, both as soon as SFT is done
    assert dpo["started"] < rm["started"] + rm["seconds"] and rm["started"] >= manifest["sft"]["seconds"]
    assert (pipeline.Path(quick.out_root) / "report" / "logs" / "dpo.log").read_text().strip()
    if figures.available():
        for name in ("reward_model", "best_of_n", "ppo_curves", "frontier"):
            assert f"({name}.png)" in page
            assert (pipeline.Path(quick.out_root) / "report" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()
    report.main(quick)  # nothing changed: every stage is reused and the page is drawn again
    out = capsys.readouterr().out
    assert out.count("reused (current)") == len(pipeline.DEFAULT) and "0 of 5 stages to run" in out, out
    assert (pipeline.Path(quick.out_root) / "report" / "index.md").read_text() == page


def test_stages_side_by_side_give_the_weights_of_one_at_a_time(quick, tmp_path):
    cfg = Config(quick=True, out_root=str(tmp_path / "out"), data_dir=quick.data_dir, jobs=1)
    runs = pipeline.run_pipeline(cfg)
    order = sorted(runs, key=lambda name: runs[name]["started"])  # one at a time, critical chain first
    assert order == ["sft", "rm", "ppo", "dpo", "bon"]
    assert all(runs[b]["started"] >= runs[a]["started"] + runs[a]["seconds"] for a, b in zip(order, order[1:]))
    for name in pipeline.DEFAULT:  # every checkpoint and result, byte for byte (config.json holds the paths)
        alone, beside = pipeline.Path(cfg.out_root) / name, pipeline.Path(quick.out_root) / name
        files = sorted(p.relative_to(alone) for p in alone.rglob("*")
                       if p.suffix == ".safetensors" or p.name in ("eval.json", "best_of_n.json"))
        assert files and all((alone / f).read_bytes() == (beside / f).read_bytes() for f in files), name


def test_the_stage_with_the_longest_chain_starts_first(quick):
    """When RM is done, PPO (which SFT -> RM -> PPO ends) starts before best-of-N, whether one slot is free or
    two (then both start in one pass, PPO first); in the pipeline's own order best-of-N would come first."""
    runs = json.loads((pipeline.Path(quick.out_root) / "report" / "stages.json").read_text())
    assert runs["ppo"]["started"] < runs["bon"]["started"]


def test_schedule_by_hand(monkeypatch):
    eta = {"sft": 10, "rm": 5, "bon": 1, "dpo": 8, "ppo": 3}
    needs = {name: STAGES[name].needs for name in eta}
    assert pipeline.schedule(eta, needs, jobs=1) == 27  # one after another
    # side by side at 0.6 speed each: rm, dpo at 10; rm done at 10 + 5/0.6, dpo 3 to go; ppo (the longer chain)
    # beside it until both are done 3/0.6 later; then bon alone (bon first would end at the same time here)
    # Python floats: a few ops on hand values, ~1e-16 (pytest.approx's default rel 1e-6)
    assert pipeline.schedule(eta, needs, jobs=2) == pytest.approx(10 + 5 / 0.6 + 3 / 0.6 + 1)
    # three at once share the same 1.2: bon and ppo start together when rm is done, at 0.4 each beside dpo
    assert pipeline.schedule(eta, needs, jobs=3) == pytest.approx(10 + 5 / 0.6 + 1 / 0.4 + 2 / 0.6)
    monkeypatch.setattr(pipeline, "SHARED", 0.5)  # no gain from running side by side: as long as one at a time
    assert pipeline.schedule(eta, needs, jobs=2) == pytest.approx(27)
    monkeypatch.setattr(pipeline, "SHARED", 1.0)  # a free second machine: the critical path
    assert pipeline.schedule(eta, needs, jobs=2) == pytest.approx(19)  # rm, dpo at 10; ppo at 15; bon at 18
    assert pipeline.schedule({"ppo": 3}, needs, jobs=2, running={"rm": 4}) == pytest.approx(7)  # ppo waits for rm
    # one slot beside dpo: ppo (the longer) first, bon when dpo is done, then alone: 222.3 s, where bon first
    # (the pipeline's order) would take 230.7 s
    monkeypatch.setattr(pipeline, "SHARED", 0.6)
    assert pipeline.critical_first(["bon", "ppo"], {"bon": 39, "ppo": 125}, needs) == ["ppo", "bon"]
    assert pipeline.critical_first(["dpo", "rm"], eta, needs) == ["dpo", "rm"]  # rm then ppo: 8, dpo 8: a tie
    assert pipeline.critical_first(["dpo", "rm"], {**eta, "dpo": 7}, needs) == ["rm", "dpo"]
    assert pipeline.schedule({"bon": 39, "ppo": 125}, needs, jobs=2, running={"dpo": 100}) == pytest.approx(
        100 / 0.6 + 25 / 0.6 + 14)


def reasons(cfg, manifest=None):
    manifest = manifest or json.loads((pipeline.Path(cfg.out_root) / "report" / "stages.json").read_text())
    return {name: reason for name, (_, reason) in pipeline.plan(pipeline.selected(cfg.stages), manifest, cfg).items()}


def test_each_reason_to_rerun_is_named(quick, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(quick.out_root, out)
    cfg = Config(quick=True, out_root=str(out), data_dir=quick.data_dir)
    manifest = json.loads((out / "report" / "stages.json").read_text())  # a copied tree is still current
    assert set(reasons(cfg, manifest).values()) == {None}

    changed = json.loads(json.dumps(manifest))
    changed["sft"]["code"]["nanoalign/losses.py"] = "0" * 64
    changed["bon"]["argv"] = changed["bon"]["argv"][:-1]
    changed["ppo"]["inputs"]["rm"] = "0" * 64
    why = reasons(cfg, changed)
    assert why["sft"] == "the code changed: nanoalign/losses.py"
    assert why["rm"] == why["dpo"] == f"it reads {out}/sft, which runs first"
    assert why["ppo"] == f"it reads {out}/sft, which runs first"
    changed["sft"] = manifest["sft"]
    why = reasons(cfg, changed)
    assert (why["sft"], why["rm"], why["dpo"]) == (None, None, None)
    assert why["bon"] == "its command changed" and why["ppo"] == f"its input changed: {out}/rm"

    (out / "dpo" / "eval.json").write_text("{}")  # a file edited after the report wrote it
    assert reasons(cfg, manifest)["dpo"] == f"changed since the report wrote it: {out}/dpo/eval.json"
    foreign = {k: v for k, v in manifest.items() if k != "dpo"}  # a run the report has no record of
    assert reasons(cfg, foreign)["dpo"] == f"{out}/dpo holds a run the report did not make (its command, code " \
                                           "and data are unknown)"
    (out / "dpo" / "eval.json").unlink()
    assert reasons(cfg, foreign)["dpo"].startswith(f"{out}/dpo holds a partial run (no eval.json")
    assert reasons(cfg, {**manifest, "dpo": {"running": True}})["dpo"] == \
        f"{out}/dpo holds a partial run (the report's last run of it was interrupted)"
    shutil.rmtree(out / "ppo")
    assert reasons(cfg, manifest)["ppo"] == f"no run in {out}/ppo"
    assert reasons(Config(**{**vars(cfg), "force": "rm"}), manifest)["rm"] == "asked for (--force)"


def test_a_failed_stage_leaves_no_page_and_is_partial_next_time(quick, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(quick.out_root, out)
    cfg = Config(quick=True, out_root=str(out), data_dir=quick.data_dir, force="ppo")
    broken = pipeline.Stage(**{**vars(STAGES["ppo"]), "quick": STAGES["ppo"].quick + ("--lr=nan",)})
    monkeypatch.setitem(STAGES, "ppo", broken)
    with pytest.raises(SystemExit, match="stage ppo failed"):
        report.main(cfg)
    assert not (out / "report" / "index.md").exists() and not list((out / "report").glob("*.png"))
    assert not (out / "ppo" / "eval.json").exists()  # the stale result is gone before the stage runs
    again = Config(**{**vars(cfg), "force": ""})
    assert reasons(again)["ppo"].endswith("(the report's last run of it was interrupted)")


def test_page_without_matplotlib_says_how_to_get_figures(quick, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(quick.out_root, out)
    for png in (out / "report").glob("*.png"):
        png.unlink()
    monkeypatch.setattr(figures, "available", lambda: False)
    cfg = Config(quick=True, out_root=str(out), data_dir=quick.data_dir)
    manifest = json.loads((out / "report" / "stages.json").read_text())
    page = report.write_report(cfg, manifest).read_text()
    assert "matplotlib is not installed" in page and "](" not in page.replace("](reward", "")
    assert not list((out / "report").glob("*.png")) and "| DPO | " in page


def test_a_stage_depends_on_the_code_it_runs():
    for name in STAGES:
        code = pipeline.code_digests(name)
        assert "nanoalign/losses.py" in code and "nanoalign/model.py" in code
        assert {"nanoalign/world/__init__.py", "nanoalign/world/gold_judge.py"} <= set(code)  # every stage is judged
        assert not [path for path in code if path.startswith("nanoalign/report/")]
        assert not {"train_dpo.py", "train_ppo.py"} & set(code) or name in ("dpo", "ppo", "ppo_rlaif", "ppo_hack")
    assert "nanoalign/online.py" in pipeline.code_digests("dpo")  # online DPO's labellers are in train_dpo.py
    assert "nanoalign/online.py" not in pipeline.code_digests("ppo")
    assert "nanoalign/distributed.py" in pipeline.code_digests("ppo")
    rlaif = set(pipeline.code_digests("rlaif"))
    assert {"nanoalign/rlaif.py", "nanoalign/world/constitution.txt", "nanoalign/world/__init__.py",
            "train_sft.py"} <= rlaif


def test_unknown_stages_are_refused():
    with pytest.raises(SystemExit, match="unknown stage 'ppoo'"):
        pipeline.selected("sft,ppoo")
    with pytest.raises(SystemExit, match="--force: unknown stage 'dp'"):
        report.main(Config(force="dp"))
    assert pipeline.selected("ppo_rlaif") == ["sft", "rlaif", "rm_rlaif", "ppo_rlaif"]
    assert pipeline.selected("all") == list(STAGES)


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_gao_fit_by_hand(form):
    kl = [0.0, 0.19, 0.64, 1.2, 1.8, 2.5, 3.2]
    shape = (lambda d: d * d) if form == "bon" else (lambda d: d * math.log(d) if d > 0 else 0.0)
    exact = [0.7 + 0.35 * k ** 0.5 - 0.17 * shape(k ** 0.5) for k in kl]
    fit = gao_fit(kl, exact, form)
    # float64 normal equations of 7 exact points, condition ~1e2: ~1e-14
    assert fit["alpha"] == pytest.approx(0.35, abs=1e-9) and fit["beta"] == pytest.approx(0.17, abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)

    rng = random.Random(0)
    noisy = [y + rng.gauss(0, 0.02) for y in exact]
    # least squares through the origin by its 2 x 2 normal equations, columns d and -shape(d)
    a = [k ** 0.5 for k in kl]
    b = [-shape(k ** 0.5) for k in kl]
    r = [y - noisy[0] for y in noisy]
    saa, sab, sbb = sum(x * x for x in a), sum(x * y for x, y in zip(a, b)), sum(y * y for y in b)
    sar, sbr = sum(x * y for x, y in zip(a, r)), sum(x * y for x, y in zip(b, r))
    det = saa * sbb - sab * sab
    alpha, beta = (sar * sbb - sbr * sab) / det, (saa * sbr - sab * sar) / det
    mean = sum(r) / len(r)
    r2 = 1 - sum((y - alpha * x - beta * z) ** 2 for y, x, z in zip(r, a, b)) / sum((y - mean) ** 2 for y in r)
    fit = gao_fit(kl, noisy, form)
    assert (fit["alpha"], fit["beta"], fit["r2"]) == pytest.approx((alpha, beta, r2), rel=1e-9)  # as above
    with pytest.raises(ValueError, match="KL = 0"):
        gao_fit(kl[1:], noisy[1:], form)


def test_all_stages_add_rlaif_and_reward_hacking(quick, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(quick.out_root, out)
    cfg = Config(quick=True, out_root=str(out), data_dir=str(tmp_path / "data"), stages="all")
    shutil.copytree(quick.data_dir, cfg.data_dir)
    (out / "judge").mkdir()
    (out / "judge" / "config.json").write_text("{}")  # an old feedback model: the rlaif stage trains a new one
    page = report.main(cfg).read_text()
    assert json.loads((out / "judge" / "config.json").read_text())["kind"] == "policy"
    said = capsys.readouterr().out
    assert said.count("reused (current)") == len(pipeline.DEFAULT) and "4 of 9 stages to run" in said
    for section in ("## RLAIF", "## Reward hacking", "| RLAIF → RM → PPO | ", "| PPO without a KL penalty | "):
        assert section in page
    assert (figures.available() and (out / "report" / "reward_hacking.png").exists()) or not figures.available()
