"""train_sft.py end to end on a tiny config: it learns, resumes exactly, 2 FSDP processes match 1, and the
gold-vs-KL points of --eval_interval measure the policy of their step."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_killed_at, torchrun
import train_sft
from nanoalign.checkpoint import load_model
from nanoalign.evaluate import curve_point
from nanoalign.logprobs import linear_logps
from tolerances import steps_close

pytestmark = pytest.mark.slow  # whole runs of the script, torchrun: the full suite only



def tiny(tiny_run, out, **kw):
    base = dict(data_dir=str(tiny_run / "data"), out_dir=str(out), init_from=str(tiny_run / "init"),
                batch_size=8, micro_batch_size=4, max_steps=12, warmup_steps=2, lr=3e-3, log_interval=1,
                ckpt_interval=6, n_eval=0, max_new_tokens=24, seed=7)
    return train_sft.Config(**{**base, **kw})


def losses(out):
    return [json.loads(l)["loss"] for l in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_sft_learns_and_writes_eval(tiny_run, tmp_path, monkeypatch):
    import nanoalign.evaluate
    monkeypatch.setattr(nanoalign.evaluate.gold_judge, "judge_many",  # the tiny world has no gold judge
                        lambda prompts, answers: {"gold": float(len(answers)), "failures": {}, "failures_on_intent": {}})
    result = train_sft.main(tiny(tiny_run, tmp_path / "sft", n_eval=4, max_steps=40, lr=1e-2))
    curve = losses(tmp_path / "sft")
    assert curve[-1] < 0.5 * curve[0]
    assert json.loads((tmp_path / "sft" / "eval.json").read_text()) == result
    assert result["gold"] == 4.0 and 0 < result["length"] <= 24


def test_fused_head_flag_takes_the_fused_path_and_the_same_curve(tiny_run, tmp_path, monkeypatch):
    """--fused_head=True sends every micro-batch's log-probs through `linear_logps` (2 per step) and follows the
    plain head's loss curve and weights to float rounding."""
    import nanoalign.model
    calls = []
    monkeypatch.setattr(nanoalign.model, "linear_logps", lambda *a: calls.append(1) or linear_logps(*a))
    train_sft.main(tiny(tiny_run, tmp_path / "plain", max_steps=4))
    assert not calls
    train_sft.main(tiny(tiny_run, tmp_path / "fused", max_steps=4, fused_head=True))
    assert len(calls) == 8
    # fp32, sums in another order: the steps agree to ~1e-6 relative (tolerances.steps_close), the losses (~3)
    # then to ~1e-6 (‖∇L‖·‖Δw‖ and their own rounding): abs 1e-5
    assert losses(tmp_path / "fused") == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("plain", "fused"))
    assert steps_close(b, a, load_file(tiny_run / "init" / "model.safetensors"))


def test_resume_continues_the_same_loss_curve(tiny_run, tmp_path, monkeypatch):
    train_sft.main(tiny(tiny_run, tmp_path / "full"))
    # killed after the step-6 checkpoint, before the step-12 one
    run_killed_at(train_sft.main, tiny(tiny_run, tmp_path / "cut"), 9, monkeypatch)
    assert len(losses(tmp_path / "cut")) == 9
    train_sft.main(tiny(tiny_run, tmp_path / "cut", resume=True))
    # the same kernels on the same checkpointed numbers: a few ulps of values ~1 at most
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "cut"))
    for k in a:  # as above: the same kernels and numbers
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.parametrize("checkpointing", [False, True])
def test_two_process_fsdp_matches_single_process(tiny_run, tmp_path, checkpointing):
    """2 gloo processes with FSDP2 (each 1 micro-batch of 4) == 1 process (2 micro-batches of 4), same global
    batch of 8, also when the sharded run recomputes its activations (activation checkpointing). Only the order
    of floating-point reductions differs: the losses within 1e-5 (as for the fused head), the steps steps_close."""
    train_sft.main(tiny(tiny_run, tmp_path / "one", max_steps=4))
    torchrun("train_sft.py", tiny(tiny_run, tmp_path / "two", max_steps=4, activation_checkpointing=checkpointing))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert steps_close(b, a, load_file(tiny_run / "init" / "model.safetensors"))


def test_curve_points_measure_the_policy_of_their_step(tiny_run, tmp_path, monkeypatch):
    """Fine-tuning with --eval_interval=2 logs at step 2 the gold and KL to --init_from that `evaluate.curve_point`
    measures on the step-2 checkpoint read back, changes nothing in training, and compares eval.json with the
    --init_from model (Preferred-FT, as DPO's eval.json)."""
    cfg = tiny(tiny_run, tmp_path / "cut", max_steps=4, ckpt_interval=2, n_eval=4, eval_interval=2)
    run_killed_at(train_sft.main, cfg, 3, monkeypatch)  # after the step-2 checkpoint
    policy, tok = load_model(tmp_path / "cut")
    expected = curve_point(policy, load_model(tiny_run / "init", tok)[0], tok, cfg.data_dir, 4, cfg.max_new_tokens,
                           cfg.temperature, cfg.seed)
    logged = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval/kl" in r] == [2] and expected["eval/kl"] > 0
    # the same weights, prompts and seed: the same samples; gold and KL (~1) summed over other batch shapes: ulps
    assert {k: v for k, v in logged[1].items() if k.startswith("eval/")} == pytest.approx(expected, abs=1e-6)
    result = train_sft.main(replace(cfg, out_dir=str(tmp_path / "curve")))
    assert {"kl", "sft_gold", "win_rate_vs_sft"} <= result.keys()
    train_sft.main(replace(cfg, out_dir=str(tmp_path / "plain"), n_eval=0, eval_interval=0))
    assert losses(tmp_path / "curve") == losses(tmp_path / "plain")
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("curve", "plain"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="--eval_interval=2 needs held-out prompts .* and a model"):
        train_sft.main(replace(cfg, out_dir=str(tmp_path / "none"), init_from=""))
