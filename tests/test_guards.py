"""Guards that mean what they say: caches keyed on all they depend on, a feedback model reused only when its training
finished, children that die with their parent, finite flags, divergence stopped before any checkpoint holds it,
strict eval.json at temperature 0, and errors that name the file, line, field or flag."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nanoalign.checkpoint as ckpt
import train_dpo
import train_ppo
import train_rm
import train_sft
from conftest import REPO, run_killed_at
from test_faults import sft, world  # noqa: F401 (world is a fixture): the same tiny runs as the fault tests
from nanoalign import evaluate, rlaif, sampling
from nanoalign.checkpoint import load_model, read_meta, write_checkpoint
from nanoalign.config import parse_config
from nanoalign.data import encode_pairs, read_jsonl
from nanoalign.model import GPT, GPTConfig
from nanoalign.scaffold import DIVERGENCE, optimizer_step
from nanoalign.tokenizer import Tokenizer
from nanoalign.world import helpdesk

pytestmark = pytest.mark.slow  # whole runs with faults injected: the full suite only


def ppo_config(tiny_run, world, out, **kw):
    return train_ppo.Config(**{**dict(data_dir=str(world), init_from=str(tiny_run / "init"), n_eval=0,
                                      reward_model=str(world / "rm"), out_dir=str(out), n_updates=2, rollout_size=4,
                                      max_new_tokens=4), **kw})


def dpo_config(tiny_run, pairs_dir, tmp_path, **kw):
    return train_dpo.Config(**{**dict(data_dir=str(pairs_dir), init_from=str(tiny_run / "init"), n_eval=0,
                                      out_dir=str(tmp_path / "dpo"), cache_dir=str(tmp_path / "cache"), batch_size=8,
                                      max_steps=2, warmup_steps=1, log_interval=1), **kw})


def finite_checkpoint(path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(Path(path) / "model.safetensors").values())


# ----- caches keyed on everything that matters ------------------------------------------------------------------


def with_config(model: GPT, **changes) -> GPT:
    """The same weights under another config (settings outside the weights)."""
    other = GPT(replace(model.config, **changes))
    other.load_state_dict(model.state_dict())
    return other


def test_the_reference_cache_key_changes_with_everything_the_log_probs_depend_on(tiny_run, pairs_dir, monkeypatch):
    model, tok = load_model(tiny_run / "init")
    records = read_jsonl(pairs_dir / "pairs.jsonl")
    seqs = encode_pairs(tok, records, 40)[0]
    key = lambda m=model, t=tok, s=seqs, n=40, d="cpu": train_dpo.reference_cache("c", m, t, s, n, d).name
    base = key()
    assert key() == key(with_config(model)) == base  # the same inputs, the same file
    other_tok = Tokenizer.train([r["prompt"] for r in records], vocab_size=280)
    variants = {"n_head": key(with_config(model, n_head=1)),
                "layer_norm_epsilon": key(with_config(model, layer_norm_epsilon=1e-3)),
                "dtype": key(copy.deepcopy(model).double()),
                "tokenizer": key(t=other_tok), "data": key(s=encode_pairs(tok, records[1:], 40)[0]),
                "max_len": key(n=39), "device": key(d="cuda")}

    def template(prompt):  # another chat template: its code differs
        return "USER " + str(prompt)

    monkeypatch.setattr(train_dpo, "render_prompt", template)
    variants["template"] = key()
    monkeypatch.undo()
    version = sampling.logps_code_version()
    monkeypatch.setattr(sampling, "model_logps", lambda *a, **k: sampling.model_logps(*a, **k))
    assert sampling.logps_code_version() != version  # another log-prob path: another version
    variants["code"] = key()
    monkeypatch.undo()
    assert key() == base
    assert len(set(variants.values()) | {base}) == len(variants) + 1, variants


def test_a_reference_differing_only_in_heads_gets_its_own_log_probs(tiny_run, pairs_dir, tmp_path):
    """Two references with the same weights, 2 heads and 1: the second run computes its own log-probs (the same
    weights read with another number of heads are another model), and each run finishes marked finished."""
    model, tok = load_model(tiny_run / "init")
    one_head = with_config(model, n_head=1)
    write_checkpoint(tmp_path / "init1", one_head.state_dict(), {"model": asdict(one_head.config), "step": 0}, tok)
    for n, init in enumerate((tiny_run / "init", tmp_path / "init1"), 1):
        train_dpo.main(dpo_config(tiny_run, pairs_dir, tmp_path, init_from=str(init), out_dir=str(tmp_path / f"d{n}")))
        assert len(list((tmp_path / "cache").glob("ref_logps-*.safetensors"))) == n
        assert read_meta(tmp_path / f"d{n}")["finished"] is True


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.pop("n_head"), r"init/config.json: field 'model.n_head' is missing"),
    (lambda m: m.pop("layer_norm_epsilon"), r"init/config.json: field 'model.layer_norm_epsilon' is missing"),
    (lambda m: m.update(n_heads=2), r"init/config.json: field 'model.n_heads' is unknown"),
])
def test_a_config_json_missing_or_adding_a_model_field_names_it(tiny_run, tmp_path, edit, match):
    shutil.copytree(tiny_run / "init", tmp_path / "init")
    meta = read_meta(tmp_path / "init")
    edit(meta["model"])
    (tmp_path / "init" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        load_model(tmp_path / "init")


def test_a_gpt2_config_missing_a_field_names_it(tiny_run, tmp_path):
    model, _ = load_model(tiny_run / "init")
    model.save_hf(tmp_path / "hf")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    del hf["n_head"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"hf/config.json: missing field 'n_head'"):
        GPT.from_pretrained(tmp_path / "hf")


# ----- a feedback model reused only when finished; children die with their parent -------------------------------


@pytest.fixture(scope="module")
def prompts_world(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("rlaif_guard")
    prompts = [p for p, _ in zip(helpdesk.prompt_stream(3), range(12))]
    for name, rows in (("prompts.jsonl", prompts[:10]), ("prompts_test.jsonl", prompts[10:])):
        (root / name).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    return root


def test_an_interrupted_feedback_model_is_resumed_not_used(prompts_world, judge_dir, tmp_path, monkeypatch):
    """The feedback model's training killed after its step-1 checkpoint: config.json says "finished": false, and
    the next pass refuses it when its flags differ, resumes it when they agree, and uses it once finished."""
    judge = tmp_path / "judge"
    cfg = rlaif.Config(data_dir=str(prompts_world), policy=str(judge_dir), judge=str(judge),
                       out=str(tmp_path / "ai_pairs.jsonl"), eval_dir=str(tmp_path / "eval"), n_prompts=3, k=2,
                       max_new_tokens=4, judge_train=40, judge_steps=3, seed=5)
    real_run = subprocess.run

    def killed(argv, **kw):  # the training rlaif starts, in this process, killed as a crash would
        run_killed_at(train_sft.main, parse_config(train_sft.Config, argv[2:] + ["--ckpt_interval=1",
                                                                                 "--log_interval=1"]), 2, monkeypatch)
        ckpt._LOCKS.pop(str(ckpt._lock_path(judge))).close()  # a killed run's lock goes with it
        raise subprocess.CalledProcessError(-9, argv)

    monkeypatch.setattr(subprocess, "run", killed)
    with pytest.raises(subprocess.CalledProcessError):
        rlaif.main(cfg)
    monkeypatch.setattr(subprocess, "run", real_run)
    assert read_meta(judge)["step"] == 1 and read_meta(judge)["finished"] is False
    assert not rlaif.judge_finished(judge)
    with pytest.raises(SystemExit, match=r"judge/config.json: an unfinished training of the feedback model with "
                                         r"--max_steps=3, where this call trains with --max_steps=4"):
        rlaif.main(replace(cfg, judge_steps=4))
    rlaif.main(cfg)
    assert read_meta(judge)["step"] == 3 and read_meta(judge)["finished"] is True and rlaif.judge_finished(judge)
    assert rlaif.judge_finished(judge_dir)  # a checkpoint that records nothing (GPT-2, hand-made) is used as it is


def children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is pid, from /proc."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            state, ppid = (d / "stat").read_text().rsplit(")", 1)[1].split()[:2] if d.name.isdigit() else ("Z", 0)
        except OSError:
            continue
        if int(ppid) == pid and state not in "ZX":
            found.append(int(d.name))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def kill_parent_and_watch_child(argv: list, env: dict) -> None:
    """Start argv, wait for its child, SIGKILL the parent (no handler runs), then the child must die too."""
    parent = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not children(parent.pid):
            assert parent.poll() is None, f"{argv} ended (exit {parent.returncode}) before starting its child"
            assert time.time() < deadline, "no child started"
            time.sleep(0.05)
        child = children(parent.pid)[0]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 60  # a liveness deadline, not a measurement: the kill is immediate
        while alive(child) and time.time() < deadline:
            time.sleep(0.05)
        still = alive(child)
        if still:
            os.kill(child, signal.SIGKILL)
        assert not still, "the child outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_sigkilled_rlaif_pass_takes_its_feedback_model_training_with_it(prompts_world, judge_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prompts_world, data, ignore=shutil.ignore_patterns("judge"))
    argv = [sys.executable, "-m", "nanoalign.rlaif", f"--data_dir={data}", f"--policy={judge_dir}",
            f"--judge={tmp_path / 'judge'}", "--judge_train=40", "--judge_steps=1000000", "--n_prompts=2", "--k=2",
            f"--out={tmp_path / 'ai.jsonl'}", f"--eval_dir={tmp_path / 'eval'}", "--device=cpu"]
    kill_parent_and_watch_child(argv, {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


_REPORT = """
import dataclasses, sys
from nanoalign import report
from nanoalign.report import pipeline
pipeline.STAGES["sft"] = dataclasses.replace(pipeline.STAGES["sft"], argv=("-m", "sleeper"), quick=())
report.main(report.Config(stages="sft", out_root=sys.argv[1], data_dir=sys.argv[2]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_sigkilled_report_takes_its_stages_with_it(tmp_path):
    (tmp_path / "sleeper.py").write_text("import time\ntime.sleep(600)\n")  # a stage that runs until killed
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}"}
    kill_parent_and_watch_child([sys.executable, "-c", _REPORT, str(tmp_path / "out"), str(tmp_path / "data")], env)


# ----- flags, divergence and checkpoints ---------------------------------------------------------------------


@pytest.mark.parametrize("script,kw,match", [
    (train_sft, dict(lr=float("inf")), r"--lr=inf: must be a finite number"),
    (train_dpo, dict(beta=float("inf")), r"--beta=inf: must be a finite number"),
    (train_ppo, dict(beta=float("inf")), r"--beta=inf: must be a finite number"),
    (train_rm, dict(weight_decay=float("inf")), r"--weight_decay=inf: must be a finite number"),
    (evaluate, dict(temperature=float("inf")), r"--temperature=inf: must be a finite number"),
])
def test_an_infinite_flag_is_refused_before_anything_is_written(tmp_path, script, kw, match):
    out = tmp_path / "out"
    field = "out" if script is evaluate else "out_dir"
    with pytest.raises(SystemExit, match=match):
        script.main(script.Config(**{field: str(out), "data_dir": str(tmp_path / "no_data")}, **kw))
    assert not out.exists() and not (tmp_path / "no_data").exists()


def test_lr_1e3_stops_at_step_1_with_nothing_written(tiny_run, tmp_path):
    out = tmp_path / "sft"
    with pytest.raises(FloatingPointError, match=r"step 1: diverged: the update took the weights' norm from .* "
                                                 r"no checkpoint of this run was written"):
        train_sft.main(sft(tiny_run, out, lr=1e3))
    assert not (out / "model.safetensors").exists()


def test_a_run_diverging_late_names_its_last_checkpoint_which_is_good(tiny_run, tmp_path, monkeypatch):
    """--lr=1e3 from step 4 of a run that checkpoints every step: stopped at step 4, before any checkpoint of
    its weights; the step-3 checkpoint it names loads, is finite, and its loss is that of a sane model."""
    real = train_sft.lr_at
    monkeypatch.setattr(train_sft, "lr_at", lambda step, *a: 1e3 if step >= 3 else real(step, *a))
    out = tmp_path / "sft"
    with pytest.raises(FloatingPointError, match=rf"step 4: diverged: .* the last checkpoint, {out} \(step 3\), is "
                                                 r"the last good one"):
        train_sft.main(sft(tiny_run, out, ckpt_interval=1))
    assert read_meta(out)["step"] == 3 and read_meta(out)["finished"] is False and finite_checkpoint(out)
    model, _ = load_model(out)
    assert all(p.abs().max() < 10 for p in model.parameters())  # the init's scale, not the diverged 1e3s
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)


def test_a_loss_100x_its_reference_stops_the_run_before_the_update(tiny_run, tmp_path, monkeypatch):
    real_loss, calls = train_sft.sft_loss, []

    def exploding(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * 1e4 if len(calls) == 5 else loss  # one micro-batch per step: step 5

    monkeypatch.setattr(train_sft, "sft_loss", exploding)
    out = tmp_path / "sft"
    with pytest.raises(FloatingPointError, match=rf"step 5: diverged: \|loss\| [\d.e+]+ is more than "
                                                 rf"{DIVERGENCE:g}x its reference .* the last checkpoint, {out} "
                                                 r"\(step 4\)"):
        train_sft.main(sft(tiny_run, out))
    assert read_meta(out)["step"] == 4 and finite_checkpoint(out)


def test_the_divergence_rule_by_hand():
    """|v| > DIVERGENCE x max(first, median of the recent): a loss falling 1000x and then bouncing 100x its recent
    median passes (the first value bounds it), a jump over 100x the first does not; a zero reference trips
    nothing."""
    def run(values, watch="loss"):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for v in values:
            model(torch.ones(1, 4)).sum().backward()
            optimizer_step(model, opt, 1e-3, 1.0, "step", {"loss": v}, watch=watch)

    run([7.0, 1.0] + [0.007] * 10 + [0.7, 700.0])  # 0.7 is 100x the median, 700 = 100x the first
    with pytest.raises(FloatingPointError, match=r"diverged: \|loss\| 700.1 is more than 100x its reference 7"):
        run([7.0, 1.0] + [0.007] * 10 + [700.1])
    with pytest.raises(FloatingPointError, match=r"diverged: \|loss\| 1000 is more than 100x its reference 5"):
        run([-5.0] * 60 + [-1000.0])  # by magnitude: a loss that may be negative
    run([0.0] * 5 + [3.0])
    run([1.0, 1e9], watch="grad_norm")  # PPO's rule reads the gradient norm, not the loss


@pytest.mark.parametrize("script", ["dpo", "rm", "ppo"])
def test_dpo_rm_and_ppo_at_lr_1e3_stop_instead_of_finishing_diverged(script, tiny_run, pairs_dir, world, quick_world,
                                                                       tmp_path):
    if script == "dpo":
        main, cfg = train_dpo.main, dpo_config(tiny_run, pairs_dir, tmp_path, lr=1e3)
    elif script == "rm":
        main, cfg = train_rm.main, train_rm.Config(data_dir=str(quick_world / "data"), out_dir=str(tmp_path / "rm"),
                                                   init_from=str(quick_world / "init"), epochs=1, batch_size=8,
                                                   n_norm=4, max_new_tokens=4, lr=1e3)
    else:
        main, cfg = train_ppo.main, ppo_config(tiny_run, world, tmp_path / "ppo", lr=1e3)
    with pytest.raises(FloatingPointError, match=r"(step|update) 1(, epoch 1)?: diverged"):
        main(cfg)
    assert not list(tmp_path.glob("*/model.safetensors"))


def test_a_checkpoint_with_non_finite_weights_is_refused_and_the_old_one_kept(tiny_run, tmp_path):
    model, tok = load_model(tiny_run / "init")
    state = model.state_dict()
    write_checkpoint(tmp_path / "c", state, {"model": asdict(model.config), "step": 1}, tok)
    before = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    bad = {**state, "transformer.h.1.mlp.c_fc.weight": state["transformer.h.1.mlp.c_fc.weight"] * float("inf")}
    with pytest.raises(FloatingPointError, match=r"c: step 2: non-finite weights in transformer.h.1.mlp.c_fc.weight"):
        write_checkpoint(tmp_path / "c", bad, {"model": asdict(model.config), "step": 2}, tok)
    assert {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()} == before


# ----- temperature 0, PPO edge cases, errors naming the file or flag ------------------------------------------


def strict(path) -> dict:
    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def test_temperature_0_is_greedy_and_eval_json_strict(tiny_run, pairs_dir, tmp_path):
    """KL between two greedy (point-mass) policies is 0 or infinite: null, with the rest of eval.json strict JSON,
    from nanoalign.evaluate and from a training run's epilogue. Greedy: the same answers for any seed."""
    kw = dict(checkpoint=str(tiny_run / "init"), reference=str(tiny_run / "init"), data_dir=str(tiny_run / "data"),
              n=4, max_new_tokens=8, temperature=0.0)
    runs = [evaluate.main(evaluate.Config(**kw, seed=seed, out=str(tmp_path / f"e{seed}"))) for seed in (0, 1)]
    assert [s["answer"] for s in runs[0]["samples"]] == [s["answer"] for s in runs[1]["samples"]]
    saved = strict(tmp_path / "e0" / "eval.json")
    assert saved["kl"] is None and saved["kl_k1"] is None and 0 <= saved["gold"] <= 1
    train_dpo.main(dpo_config(tiny_run, pairs_dir, tmp_path, max_steps=1, n_eval=4, max_new_tokens=8,
                              temperature=0.0))
    assert strict(tmp_path / "dpo" / "eval.json")["kl"] is None


def test_eval_json_refuses_nan_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"eval.json: field 'curve\[1\].gold' is nan, not a JSON number"):
        evaluate.write_json(tmp_path / "eval.json", {"curve": [{"gold": 1.0}, {"gold": float("nan")}]})
    assert not list(tmp_path.iterdir())


def test_ppo_with_one_token_answers_and_no_kl_penalty_runs(tiny_run, world, tmp_path):
    """--max_new_tokens=1 --beta=0: every answer is cut without EOS and scored the same penalty, so the returns do
    not vary and the explained variance is undefined (null), not a division by zero."""
    out = tmp_path / "ppo"
    train_ppo.main(ppo_config(tiny_run, world, out, max_new_tokens=1, beta=0.0))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["ppo/explained_variance"] is None for r in log)
    assert read_meta(out)["finished"] is True


def test_a_reward_model_with_a_shorter_context_is_named(tiny_run, world, tmp_path):
    _, tok = load_model(tiny_run / "init")
    torch.manual_seed(0)
    rm = GPT(GPTConfig(block_size=16, vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, scalar_head=True))
    write_checkpoint(tmp_path / "rm", rm.state_dict(), {"model": asdict(rm.config), "kind": "reward_model",
                                                        "reward_norm": {"gain": 1.0, "bias": 0.0}}, tok)
    with pytest.raises(SystemExit, match=r"rm: the reward model's context \(16 tokens\) is shorter than a rollout row "
                                         r"can be \(\d+ tokens: the longest prompt of .*prompts.jsonl \+ "
                                         r"--max_new_tokens=4, within the policy's 48\)"):
        train_ppo.main(ppo_config(tiny_run, world, tmp_path / "ppo", reward_model=str(tmp_path / "rm")))


def test_max_len_above_the_context_names_the_flag(tiny_run, pairs_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"--max_len=100: longer than the context of .*init \(48 tokens\); use at "
                                         r"most 48"):
        train_dpo.main(dpo_config(tiny_run, pairs_dir, tmp_path, max_len=100))


def test_a_lone_surrogate_names_the_file_line_and_field(tmp_path):
    bad = tmp_path / "sft.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "ok\\ud800"}\n')
    with pytest.raises(ValueError, match=r"sft.jsonl:2: field 'completion' holds a lone surrogate \(\\ud800 at "
                                         r"character 3\)"):
        read_jsonl(bad, "sft")
    chat = tmp_path / "prompts.jsonl"
    chat.write_text('{"prompt": [{"role": "user", "content": "\\udfff"}]}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: field 'prompt\[0\].content' holds a lone surrogate"):
        read_jsonl(chat, "prompts")
