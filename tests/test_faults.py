"""Bad input and faults: flags checked before anything is written, a non-finite step stops the run with the last
good checkpoint kept, data validated at start, damaged or wrong-kind checkpoints refused by path, a checkpoint
write killed at every point (or failing on a full disk) recovered, one run per out_dir, torn log lines, and a
resumed log equal to the uninterrupted one when log_interval does not divide ckpt_interval."""

import errno
import json
import math
import re
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nanoalign.checkpoint as ckpt
import train_dpo
import train_ppo
import train_rm
import train_sft
from conftest import REPO, run_killed_at, torchrun
from nanoalign import evaluate
from nanoalign.checkpoint import (hold_lock, load_model, load_reward_model, read_meta, read_resume_state, recover,
                                  write_checkpoint)
from nanoalign.data import read_jsonl
from nanoalign.model import GPT, GPTConfig
from nanoalign.logger import Logger
from nanoalign.scaffold import Process, micro_batch

pytestmark = pytest.mark.slow  # whole runs with faults injected: the full suite only


def sft(tiny_run, out, **kw):
    base = dict(data_dir=str(tiny_run / "data"), out_dir=str(out), init_from=str(tiny_run / "init"), batch_size=8,
                max_steps=6, warmup_steps=2, lr=3e-3, log_interval=1, ckpt_interval=2, n_eval=0, seed=7)
    return train_sft.Config(**{**base, **kw})


@pytest.fixture(scope="module")
def world(tiny_run, tmp_path_factory):
    """The tiny data plus pairs.jsonl and prompts.jsonl, and a tiny reward model on the init trunk."""
    root = tmp_path_factory.mktemp("faults")
    demos = read_jsonl(tiny_run / "data" / "sft.jsonl", "sft")
    rows = {"pairs.jsonl": [{"prompt": d["prompt"], "chosen": d["completion"], "rejected": "Go away."} for d in demos],
            "prompts.jsonl": [{"prompt": d["prompt"]} for d in demos]}
    for name, records in rows.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "sft_test.jsonl").write_text((tiny_run / "data" / "sft_test.jsonl").read_text())
    rm, tok = load_model(tiny_run / "init", scalar_head=True)
    write_checkpoint(root / "rm", rm.state_dict(), {"model": asdict(rm.config), "kind": "reward_model",
                                                    "reward_norm": {"gain": 1.0, "bias": 0.0}}, tok)
    return root


# ----- flags ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script,kw,match", [
    (train_sft, dict(batch_size=0), r"--batch_size=0: must be > 0"),
    (train_sft, dict(lr=float("nan")), r"--lr=nan: must be > 0"),
    (train_sft, dict(micro_batch_size=3), r"--micro_batch_size=3 does not divide .* use a divisor of 32"),
    (train_sft, dict(device="gpu"), r"--device=gpu: expected one of auto, cpu, cuda"),
    (train_dpo, dict(loss_type="sigmoidd"), r"--loss_type=sigmoidd: expected one of sigmoid, robust"),
    (train_dpo, dict(beta=-0.1), r"--beta=-0.1: must be > 0"),
    (train_dpo, dict(label_smoothing=0.5), r"--label_smoothing=0.5: the assumed label-flip rate must be below"),
    (train_dpo, dict(loss_type="kto", kto_lambda_u=-1.0), r"--kto_lambda_u=-1.0: must be >= 0"),
    (train_dpo, dict(feedback_file="feedback.jsonl"), r"--feedback_file=feedback.jsonl: unpaired thumbs up/down "
                                                      r"trains a loss of labelled answers \(kto\); --loss_type=sigmoid"),
    (train_dpo, dict(loss_type="kto", rpo_alpha=0.5), r"--rpo_alpha=0.5: RPO adds an NLL to each pair's loss"),
    (train_rm, dict(loss="ranking"), r"--loss=ranking: expected one of kwise, plackett_luce"),
    (train_ppo, dict(temperature=0.0), r"--temperature=0.0: must be > 0"),
    (train_ppo, dict(beta=-1.0), r"--beta=-1.0: must be >= 0"),
    (train_ppo, dict(lam=1.5), r"--lam=1.5: must be in \[0, 1\]"),
    (train_ppo, dict(rollout_size=10, minibatches=4), r"--rollout_size=10 must split .* e.g. --rollout_size=8"),
    (train_ppo, dict(advantage="rloo"), r"--advantage=rloo needs --samples_per_prompt >= 2"),
])
def test_a_bad_flag_stops_before_anything_is_written(tmp_path, script, kw, match):
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1}\n')  # a previous run's log must survive
    cfg = script.Config(out_dir=str(out), data_dir=str(tmp_path / "no_data"), **kw)
    with pytest.raises(SystemExit, match=match):
        script.main(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl"] and (out / "log.jsonl").read_text() == '{"step": 1}\n'
    assert not (tmp_path / "no_data").exists() and not Path(f"{out}.lock").exists()


def test_a_batch_larger_than_the_data_names_the_flag_and_leaves_the_log(tiny_run, world, tmp_path):
    n = len(read_jsonl(tiny_run / "data" / "sft.jsonl", "sft"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "log.jsonl").write_text('{"step": 1}\n')  # a previous run's log must survive
    with pytest.raises(SystemExit, match=f"--batch_size={n + 1}: larger than the data \\({n} examples\\); use at most {n}"):
        train_sft.main(sft(tiny_run, tmp_path / "out", batch_size=n + 1))
    assert (tmp_path / "out" / "log.jsonl").read_text() == '{"step": 1}\n'
    with pytest.raises(SystemExit, match=f"--rollout_size / --samples_per_prompt, the prompts per update={n + 1}"):
        train_ppo.main(train_ppo.Config(data_dir=str(world), init_from=str(tiny_run / "init"), n_eval=0,
                                        reward_model=str(world / "rm"), out_dir=str(tmp_path / "ppo"),
                                        rollout_size=2 * (n + 1), samples_per_prompt=2, minibatches=1))
    assert not (tmp_path / "ppo" / "log.jsonl").exists()


def test_evaluate_and_the_benchmarks_check_their_flags(tmp_path):
    with pytest.raises(SystemExit, match="--n=0: must be > 0"):
        evaluate.main(evaluate.Config(n=0))
    with pytest.raises(SystemExit, match="--best_of_n=48 needs a power of 2"):
        evaluate.main(evaluate.Config(best_of_n=48, reward_model="out/rm"))
    sys.path.insert(0, str(REPO / "bench"))
    import dpo_throughput
    with pytest.raises(SystemExit, match="--mode=fast: expected one of live, cached, both"):
        dpo_throughput.main(dpo_throughput.Config(mode="fast"))


def test_torchrun_with_the_default_micro_batch(tiny_run, tmp_path):
    """torchrun with the defaults (docs/scripts.md): each of 2 processes takes half of the batch of 8."""
    torchrun("train_sft.py", sft(tiny_run, tmp_path / "two", max_steps=2))
    assert read_meta(tmp_path / "two")["run"]["micro_batch_size"] == 4


def test_the_micro_batch_is_derived_for_any_world_that_divides_the_batch():
    assert [micro_batch(32, 0, w) for w in (1, 2, 4, 8)] == [32, 16, 8, 4]
    assert micro_batch(32, 8, 2) == 8
    with pytest.raises(SystemExit, match=r"--batch_size=32 does not split over 3 processes: .* --batch_size=33"):
        micro_batch(32, 0, 3)
    with pytest.raises(SystemExit, match=r"--micro_batch_size=5 .* \(--batch_size=32 over 2 processes: 16\)"):
        micro_batch(32, 5, 2)


# ----- non-finite steps -----------------------------------------------------------------------------------


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_run, tmp_path, monkeypatch):
    """NaN injected into the loss at step 3: the run stops there naming the step, the step-2 checkpoint stays
    (finite), log.jsonl ends at step 2; resumed without the fault, the run finishes."""
    real_loss, calls = train_sft.sft_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss  # one micro-batch per step

    monkeypatch.setattr(train_sft, "sft_loss", poisoned)
    out = tmp_path / "sft"
    with pytest.raises(FloatingPointError, match=r"step 3: non-finite training values \(loss nan, grad_norm nan\)"):
        train_sft.main(sft(tiny_run, out))
    assert read_meta(out)["step"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(out / "model.safetensors").values())
    assert [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    monkeypatch.setattr(train_sft, "sft_loss", real_loss)
    train_sft.main(sft(tiny_run, out, resume=True))
    assert read_meta(out)["step"] == 6


def test_a_non_finite_ppo_loss_stops_the_run_naming_the_update(tiny_run, world, tmp_path, monkeypatch):
    real = train_ppo.ppo_policy_loss
    monkeypatch.setattr(train_ppo, "ppo_policy_loss", lambda *a, **k: (lambda r: (r[0] * float("nan"), *r[1:]))(
        real(*a, **k)))
    with pytest.raises(FloatingPointError, match=r"update 1, epoch 1: non-finite"):
        train_ppo.main(train_ppo.Config(data_dir=str(world), init_from=str(tiny_run / "init"),
                                        reward_model=str(world / "rm"), out_dir=str(tmp_path / "ppo"), n_updates=2,
                                        rollout_size=4, max_new_tokens=4, n_eval=0))
    assert not (tmp_path / "ppo" / "model.safetensors").exists()


# ----- data -----------------------------------------------------------------------------------------------


def test_data_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "sft.jsonl"
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(ValueError, match=r"sft.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        read_jsonl(bad, "sft")
    same = tmp_path / "pairs.jsonl"
    same.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                    '{"prompt": "a", "chosen": "b", "rejected": "b"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: field 'rejected' equals 'chosen'"):
        read_jsonl(same)
    ranked = tmp_path / "prefs.jsonl"
    ranked.write_text('{"prompt": "a", "responses": ["x", "y", "x"], "ranking": [0, 1, 2]}\n')
    with pytest.raises(ValueError, match=r"prefs.jsonl:1: field 'responses\[2\]' repeats an earlier answer"):
        read_jsonl(ranked)
    hh = tmp_path / "hh.jsonl"
    dialogue = "\n\nHuman: hi\n\nAssistant: yo"
    hh.write_text(json.dumps({"chosen": dialogue, "rejected": dialogue}))
    with pytest.raises(ValueError, match=r"hh.jsonl:1: the 'rejected' answer equals the 'chosen' one"):
        read_jsonl(hh)


def test_an_over_long_prompt_stops_ppo_at_start(tiny_run, world, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("sft_test.jsonl", "prompts.jsonl"):
        (data / name).write_text((world / name).read_text())
    with open(data / "prompts.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "Where is my lamp? " * 40}) + "\n")
    n = len((data / "prompts.jsonl").read_text().splitlines())
    with pytest.raises(ValueError, match=rf"prompts.jsonl:{n}: field 'prompt' is \d+ tokens, longer than the context"):
        train_ppo.main(train_ppo.Config(data_dir=str(data), init_from=str(tiny_run / "init"),
                                        reward_model=str(world / "rm"), out_dir=str(tmp_path / "ppo"), n_eval=0))
    assert not (tmp_path / "ppo" / "log.jsonl").exists()


# ----- checkpoints ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "resume.safetensors"])
def test_a_truncated_checkpoint_file_is_named(tiny_run, tmp_path, name):
    resume_state = ({"state": {}, "param_groups": []}, {"torch": torch.get_rng_state()})
    write_checkpoint(tmp_path / "c", *tiny_state(tiny_run), Tokenizer_of(tiny_run), resume_state)
    path = tmp_path / "c" / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ValueError, match=re.escape(f"{path}: damaged")):
        load_model(tmp_path / "c")
        read_resume_state(tmp_path / "c")


def test_the_wrong_kind_of_checkpoint_is_refused(tiny_run, world, tmp_path):
    with pytest.raises(ValueError, match=r"rm: a reward_model checkpoint .* where a policy is expected"):
        train_sft.main(sft(tiny_run, tmp_path / "sft", init_from=str(world / "rm")))
    write_checkpoint(tmp_path / "p", *tiny_state(tiny_run, kind="policy"), Tokenizer_of(tiny_run))
    with pytest.raises(ValueError, match=r"/p: a policy checkpoint .* where a reward_model is expected"):
        load_reward_model(tmp_path / "p")
    eval_json = world / "rm" / "eval.json"
    with pytest.raises(ValueError, match="a reward_model checkpoint"):  # evaluate never writes into an RM
        evaluate.main(evaluate.Config(checkpoint=str(world / "rm"), data_dir=str(world), n=2))
    assert not eval_json.exists()


def test_evaluate_writes_into_out(tiny_run, world, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate.gold_judge, "judge_many", lambda prompts, answers: {"gold": 1.0, "failures": {}, "failures_on_intent": {}})
    monkeypatch.setattr(evaluate.gold_judge, "judge", lambda prompt, answer: {"gold": 1.0})
    evaluate.main(evaluate.Config(checkpoint=str(tiny_run / "init"), data_dir=str(world), n=2, max_new_tokens=4,
                                  out=str(tmp_path / "e")))
    assert (tmp_path / "e" / "eval.json").exists() and not (tiny_run / "init" / "eval.json").exists()


def Tokenizer_of(tiny_run):
    from nanoalign.tokenizer import Tokenizer
    return Tokenizer.load(tiny_run / "init")


def tiny_state(tiny_run, step=1, kind="policy"):
    torch.manual_seed(step)
    model = GPT(GPTConfig(block_size=48, vocab_size=len(Tokenizer_of(tiny_run)), n_layer=1, n_head=2, n_embd=16))
    return model.state_dict(), {"model": asdict(model.config), "kind": kind, "step": step}


POINTS = ["written", "marked", "moved config.json", "moved critic", "moved model.safetensors", "moved tokenizer.json"]


@pytest.mark.parametrize("point", POINTS)
def test_a_checkpoint_write_killed_at_any_point_is_recovered(tiny_run, tmp_path, monkeypatch, point):
    """Step 1 (resumable, with a critic) is replaced by step 2 (no resume state: a final checkpoint, with a
    critic); a kill at `point` leaves, for the next reader, exactly step 1 (before the completion marker) or
    exactly step 2 (after it), never a mix, and nothing left over."""
    tok = Tokenizer_of(tiny_run)
    out = tmp_path / "c"
    resume_state = ({"state": {}, "param_groups": []}, {"torch": torch.get_rng_state()})
    for step in (1, 2):
        state, meta = tiny_state(tiny_run, step)
        child = (tiny_state(tiny_run, 10 + step, "critic")[0], {**meta, "kind": "critic"}, None)
        if step == 2:
            def kill(at):
                if at == point:
                    raise KeyboardInterrupt(at)
            monkeypatch.setattr(ckpt, "_fault", kill)
            with pytest.raises(KeyboardInterrupt):
                write_checkpoint(out, state, meta, tok, None, {"critic": child})
            monkeypatch.undo()
        else:
            write_checkpoint(out, state, meta, tok, resume_state, {"critic": child})
    expected = 1 if POINTS.index(point) < 1 else 2
    model, _ = load_model(out)  # recovers first
    state = tiny_state(tiny_run, expected)[0]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items() if k != "lm_head.weight")
    assert read_meta(out)["step"] == read_meta(out / "critic")["step"] == expected
    assert (out / "resume.safetensors").exists() == (expected == 1)  # the final checkpoint has no resume state
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "critic"] + (["resume.safetensors"] * (expected == 1)))


def test_out_dir_may_be_a_symlink_or_a_mount_point(tiny_run, tmp_path, monkeypatch):
    """Only entries inside out_dir are renamed: a symlinked out_dir stays a link, and renaming out_dir itself
    (which a mount point refuses with EBUSY) never happens."""
    target = tmp_path / "disk"
    target.mkdir()
    (tmp_path / "c").symlink_to(target)
    real_replace = os.replace

    def mount_point(src, dst):
        if Path(src) in (tmp_path / "c", target) or Path(dst) in (tmp_path / "c", target):
            raise OSError(errno.EBUSY, "Device or resource busy", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", mount_point)
    for step in (1, 2):
        write_checkpoint(tmp_path / "c", *tiny_state(tiny_run, step), Tokenizer_of(tiny_run))
    assert (tmp_path / "c").is_symlink() and read_meta(target)["step"] == 2


def test_a_full_disk_leaves_the_previous_checkpoint(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "c"
    write_checkpoint(out, *tiny_state(tiny_run, 1), Tokenizer_of(tiny_run))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        write_checkpoint(out, *tiny_state(tiny_run, 2), Tokenizer_of(tiny_run))
    monkeypatch.undo()
    assert read_meta(out)["step"] == 1
    load_model(out)
    assert not (out / ".next").exists()  # the reader removed the half-written one


# ----- one run per out_dir --------------------------------------------------------------------------------


def test_a_second_run_on_the_same_out_dir_is_refused_until_the_first_dies(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from nanoalign.checkpoint import hold_lock; "
                               f"hold_lock({str(out)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match=rf"{out} is in use by another run \(pid {holder.pid};"):
            hold_lock(out)
        (out / ".next").mkdir(parents=True)  # the holder's checkpoint write in progress
        recover(out)
        assert (out / ".next").exists()  # a reader leaves a live run's write alone
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    hold_lock(out)  # the killed run's lock is taken over
    assert Path(f"{out.resolve()}.lock").read_text().strip() == str(os.getpid())
    recover(out)
    assert not (out / ".next").exists()


def test_two_concurrent_training_runs_on_one_out_dir(tiny_run, tmp_path):
    cmd = [sys.executable, str(REPO / "train_sft.py"), *(f"--{k}={v}" for k, v in asdict(
        sft(tiny_run, tmp_path / "sft", max_steps=400, ckpt_interval=50, log_interval=50)).items())]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        lock = Path(f"{(tmp_path / 'sft').resolve()}.lock")
        while not (lock.exists() and lock.read_text().strip()):  # the pid is written once the lock is held
            time.sleep(0.05)
        second = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert second.returncode != 0 and f"is in use by another run (pid {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait()


# ----- logs -----------------------------------------------------------------------------------------------


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    Logger(tmp_path, Process(0, 1, torch.device("cpu")), 10, resume_step=2)
    assert log.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n'
    assert "log.jsonl:3: dropped a torn last line" in capsys.readouterr().out
    log.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"log.jsonl:2: damaged log line"):
        Logger(tmp_path, Process(0, 1, torch.device("cpu")), 10, resume_step=2)


@pytest.mark.parametrize("script", [train_sft, train_dpo])
def test_resumed_log_equals_the_uninterrupted_one_row_for_row(tiny_run, world, tmp_path, monkeypatch, script):
    """log_interval 3 does not divide ckpt_interval 4: killed at step 9 (after the step-8 checkpoint), resumed,
    the log has the uninterrupted run's rows (DPO's means over each interval included), times aside."""
    if script is train_sft:
        def cfg(out, **kw):
            return sft(tiny_run, out, max_steps=10, log_interval=3, ckpt_interval=4, **kw)
    else:
        def cfg(out, **kw):
            return train_dpo.Config(data_dir=str(world), out_dir=str(out), init_from=str(tiny_run / "init"),
                                    cache_dir=str(tmp_path / "cache"), batch_size=8, max_steps=10, warmup_steps=2,
                                    lr=3e-3, log_interval=3, ckpt_interval=4, n_eval=0, seed=7, **kw)
    script.main(cfg(tmp_path / "full"))
    run_killed_at(script.main, cfg(tmp_path / "cut"), 9, monkeypatch)
    script.main(cfg(tmp_path / "cut", resume=True))
    rows = [[{k: v for k, v in json.loads(l).items() if k != "time"}
             for l in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("full", "cut")]
    assert [r["step"] for r in rows[0]] == [3, 6, 9, 10]
    assert len(rows[1]) == len(rows[0])
    for a, b in zip(*rows):  # a resumed run: the same kernels on the same checkpointed numbers, a few ulps at most
        assert a.keys() == b.keys() and all(math.isclose(a[k], b[k], abs_tol=1e-6) for k in a), (a, b)
