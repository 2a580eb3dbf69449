"""An out_dir belongs to one run: a folder of runs, an out_dir that overlaps a checkpoint the run reads, and a data
folder with someone's own files are refused before anything is written; a checkpoint commit deletes only what its
predecessor owned; a new run moves the previous one aside whole; --resume=True refuses a changed run; the report
leaves a live run's files alone; evaluate checks its reward model before writing; a reader beside a live writer
gets one whole checkpoint."""

import json
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import nanoalign.checkpoint as ckpt
import nanoalign.model
import train_dpo
import train_ppo
import train_rm
import train_sft
from conftest import REPO, run_killed_at
from nanoalign import evaluate
from nanoalign.checkpoint import load_model, move_aside, read_meta, write_checkpoint
from nanoalign.model import GPT, GPTConfig
from nanoalign.report import pipeline
from nanoalign.scaffold import sha256
from nanoalign.tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # whole runs into shared folders: the full suite only


def sft(tiny_run, out, **kw):
    base = dict(data_dir=str(tiny_run / "data"), out_dir=str(out), init_from=str(tiny_run / "init"), batch_size=8,
                max_steps=4, warmup_steps=2, lr=3e-3, log_interval=1, ckpt_interval=2, n_eval=0, seed=7)
    return train_sft.Config(**{**base, **kw})


def snapshot(root: Path) -> dict:
    """Every file under root (and root's lock file beside it) -> its bytes."""
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    return {**files, "lock": Path(f"{root.resolve()}.lock").exists()}


def tiny_checkpoint(tiny_run, path, step=1, block_size=48, **meta):
    tok = Tokenizer.load(tiny_run / "init")
    torch.manual_seed(step)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=len(tok), n_layer=1, n_head=2, n_embd=16))
    write_checkpoint(path, model.state_dict(), {"model": asdict(model.config), "kind": "policy", "step": step, **meta},
                     tok)
    return model


# ----- a folder of runs, overlapping folders, data folders ------------------------------------------------


def test_a_folder_of_runs_is_refused_and_nothing_is_touched(tiny_run, tmp_path):
    """--out_dir=out where out/sft was meant: out holds the runs sft, rm, dpo (one only a log and an eval.json):
    refused naming them, before the lock file or anything else is written."""
    out = tmp_path / "out"
    tiny_checkpoint(tiny_run, out / "sft")
    tiny_checkpoint(tiny_run, out / "rm", kind="reward_model")
    (out / "dpo").mkdir()
    (out / "dpo" / "log.jsonl").write_text('{"step": 1}\n')
    (out / "dpo" / "eval.json").write_text("{}")
    (out / "cache").mkdir()  # not a run: no reason to refuse
    before = snapshot(out)
    with pytest.raises(SystemExit, match=rf"--out_dir={out} holds other runs or checkpoints \(dpo, rm, sft\)"):
        train_sft.main(sft(tiny_run, out))
    assert snapshot(out) == before and not before["lock"]


def test_a_commit_deletes_only_the_children_its_checkpoint_owned(tiny_run, tmp_path):
    """A checkpoint with a child (PPO's critic) replaced by one without: the owned child goes, an HF export saved
    inside the run's folder (a subfolder with a config.json) stays, byte for byte."""
    out, tok = tmp_path / "run", Tokenizer.load(tiny_run / "init")
    state, meta = tiny_state(tok, 1)
    write_checkpoint(out, state, meta, tok, children={"critic": (tiny_state(tok, 2)[0], {**meta, "kind": "critic"},
                                                                  None)})
    assert read_meta(out)["children"] == ["critic"]
    export = out / "hf"
    export.mkdir()
    (export / "config.json").write_text('{"model_type": "gpt2"}')
    (export / "model.safetensors").write_bytes(b"weights")
    write_checkpoint(out, *tiny_state(tok, 3), tok)
    assert not (out / "critic").exists() and read_meta(out)["children"] == []
    assert (export / "config.json").read_text() == '{"model_type": "gpt2"}'
    assert (export / "model.safetensors").read_bytes() == b"weights"
    with pytest.raises(SystemExit, match=r"holds other runs or checkpoints \(hf\)"):  # a new run there: refused
        train_sft.main(sft(tiny_run, out))


def tiny_state(tok, seed):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=48, vocab_size=len(tok), n_layer=1, n_head=2, n_embd=16))
    return model.state_dict(), {"model": asdict(model.config), "kind": "policy", "step": seed}


@pytest.mark.parametrize("script", [train_sft, train_rm])
def test_a_data_dir_with_other_files_is_never_written_over(tiny_run, pairs_dir, tmp_path, script):
    """A --data_dir without the file the script trains on but with the user's own pairs.jsonl: refused, naming
    the flag, the missing file and what the folder holds; the folder is left as it was."""
    data = tmp_path / "mine"
    shutil.copytree(pairs_dir, data)
    before = snapshot(data)
    needed = "sft.jsonl" if script is train_sft else "prefs.jsonl"
    cfg = script.Config(data_dir=str(data), out_dir=str(tmp_path / "out"), init_from=str(tiny_run / "init"))
    with pytest.raises(SystemExit, match=rf"--data_dir={data}: no {needed}, and the folder holds other files "
                                         r"\(feedback.jsonl, pairs.jsonl, sft_test.jsonl\): the helpdesk world is written only into "
                                         r"a missing or empty folder"):
        script.main(cfg)
    assert snapshot(data) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("script,flag", [(train_dpo, "init_from"), (train_rm, "init_from"),
                                         (train_ppo, "init_from"), (train_ppo, "reward_model")])
def test_out_dir_equal_to_a_checkpoint_the_run_reads_is_refused(tiny_run, pairs_dir, tmp_path, script, flag):
    """--out_dir equal to --init_from (DPO's reference, the RM's trunk, PPO's policy) or --reward_model would
    overwrite the model being read (DPO would then compare the policy with itself): refused, the checkpoint
    untouched."""
    model = tmp_path / "model"
    shutil.copytree(tiny_run / "init", model)
    before = snapshot(model)
    kw = {"init_from": str(tiny_run / "init"), "reward_model": str(tiny_run / "init"), flag: str(model)}
    kw = {k: v for k, v in kw.items() if k in script.Config.__dataclass_fields__}
    cfg = script.Config(data_dir=str(pairs_dir), out_dir=str(model), **kw)
    with pytest.raises(SystemExit, match=rf"--out_dir={model} is --{flag}={model}: a run never writes into a "
                                         r"checkpoint it reads"):
        script.main(cfg)
    assert snapshot(model) == before


def test_out_dir_inside_or_around_a_checkpoint_the_run_reads_is_refused(tiny_run, pairs_dir, tmp_path):
    sft_dir = tmp_path / "out" / "sft"
    shutil.copytree(tiny_run / "init", sft_dir)
    before = snapshot(tmp_path / "out")
    inside = train_dpo.Config(data_dir=str(pairs_dir), init_from=str(sft_dir), out_dir=str(sft_dir / "dpo"))
    with pytest.raises(SystemExit, match=rf"--out_dir={sft_dir / 'dpo'} is inside --init_from={sft_dir}"):
        train_dpo.main(inside)
    around = train_dpo.Config(data_dir=str(pairs_dir), init_from=str(sft_dir), out_dir=str(tmp_path / "out"))
    with pytest.raises(SystemExit, match=rf"--init_from={sft_dir} is inside --out_dir={tmp_path / 'out'}"):
        train_dpo.main(around)
    assert snapshot(tmp_path / "out") == before


# ----- one run per folder ---------------------------------------------------------------------------------


def test_a_new_run_moves_the_previous_one_aside_whole(tiny_run, tmp_path, monkeypatch):
    """Run 1 finishes (with an eval.json); run 2 into the same out_dir is killed before its first checkpoint: the
    folder holds run 2's log alone, and .prev-1 all of run 1 (checkpoint, log, eval.json), unchanged. A third
    run goes to .prev-2; a file that is no run's stays where it is."""
    out = tmp_path / "sft"
    train_sft.main(sft(tiny_run, out))
    (out / "eval.json").write_text('{"run": 1}')
    (out / "notes.txt").write_text("mine")
    first = {name: (out / name).read_bytes() for name in ckpt.RUN_FILES if (out / name).exists()}
    assert set(first) == {"model.safetensors", "config.json", "tokenizer.json", "resume.safetensors", "log.jsonl",
                          "eval.json"}
    run_killed_at(train_sft.main, sft(tiny_run, out), 1, monkeypatch)
    assert sorted(p.name for p in out.iterdir()) == [".prev-1", "log.jsonl", "notes.txt"]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]
    assert {p.name: p.read_bytes() for p in (out / ".prev-1").iterdir()} == first
    train_sft.main(sft(tiny_run, out, max_steps=2))
    assert sorted(p.name for p in (out / ".prev-2").iterdir()) == ["log.jsonl"]
    assert read_meta(out)["step"] == 2 and (out / "notes.txt").read_text() == "mine"
    assert move_aside(tmp_path / "empty") is None


# ----- resume means the same run --------------------------------------------------------------------------


def test_resume_refuses_changed_flags_and_data_and_accepts_a_longer_run(tiny_run, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_run / "data", data)
    out = tmp_path / "sft"
    train_sft.main(sft(tiny_run, out, data_dir=str(data)))
    recorded = read_meta(out)["data_sha256"]
    assert recorded == [[str(data / "sft.jsonl"), sha256(data / "sft.jsonl")]]
    before = snapshot(out)
    with pytest.raises(SystemExit, match=rf"^--resume=True: these differ from the run in {out}: --lr=0.001 "
                                         r"\(was 0.003\), --seed=1 \(was 7\)$"):
        train_sft.main(sft(tiny_run, out, data_dir=str(data), resume=True, lr=1e-3, seed=1))
    with open(data / "sft.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "Where is my fan?", "completion": "On its way."}) + "\n")
    with pytest.raises(SystemExit, match=rf"differ from the run in {out}: {data / 'sft.jsonl'} \(sha256 "
                                         rf"{sha256(data / 'sft.jsonl')[:12]}, was {recorded[0][1][:12]}\)$"):
        train_sft.main(sft(tiny_run, out, data_dir=str(data), resume=True))
    assert snapshot(out) == before
    shutil.copy(tiny_run / "data" / "sft.jsonl", data / "sft.jsonl")
    (out / "eval.json").write_text("{}")  # of step 4: removed, since the run goes on
    train_sft.main(sft(tiny_run, out, data_dir=str(data), resume=True, max_steps=6, log_interval=2))
    assert read_meta(out)["step"] == 6 and not (out / "eval.json").exists()
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 6]


@pytest.mark.parametrize("script,changed", [
    (train_dpo, dict(beta=0.5, loss_type="ipo", init_from="elsewhere")),
    (train_rm, dict(loss="plackett_luce", adam_eps=1e-8)),
    (train_ppo, dict(reward_model="elsewhere", max_new_tokens=8, kl_target=4.0)),
])
def test_every_script_refuses_a_changed_resume_before_reading_anything(tmp_path, script, changed):
    """A resumable checkpoint recorded with the defaults (and the hash of its data file); --resume=True with other
    trajectory flags is refused naming each one, with its recorded value; flags that may change are accepted
    up to the point where the (fake) checkpoint would be read."""
    out, data = tmp_path / "run", tmp_path / "data"
    data.mkdir()
    trained = {train_dpo: "pairs.jsonl", train_rm: "prefs.jsonl", train_ppo: "prompts.jsonl"}[script]
    (data / trained).write_text('{"prompt": "hi"}\n')
    cfg = script.Config(data_dir=str(data), out_dir=str(out))
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"run": asdict(cfg),
                                                 "data_sha256": [[str(data / trained), sha256(data / trained)]]}))
    (out / "resume.safetensors").write_bytes(b"")
    shown = ", ".join(f"--{k}={changed[k]} \\(was {v}\\)" for k, v in asdict(cfg).items() if k in changed)
    with pytest.raises(SystemExit, match=rf"^--resume=True: these differ from the run in {out}: {shown}$"):
        script.main(script.Config(data_dir=str(data), out_dir=str(out), resume=True, **changed))
    may = dict(log_interval=7, ckpt_interval=3, device="cpu", n_eval=0)  # then the checkpoint is read: it is fake
    with pytest.raises(Exception) as refused:
        script.main(script.Config(data_dir=str(data), out_dir=str(out), resume=True, **may))
    assert "differ from the run" not in str(refused.value)


# ----- the report -----------------------------------------------------------------------------------------


def hold(out: Path):
    """A process holding out's lock, as a live manual run does."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; from nanoalign.checkpoint import hold_lock; "
                               f"hold_lock({str(out)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_the_report_leaves_a_live_runs_files(tmp_path, monkeypatch):
    """A manual run holds out/sft's lock: the report refuses before any stage runs and leaves its log and
    eval.json; with the up-front check passed (the run took the lock just after it), the stage's own lock check
    refuses it, again before touching a file."""
    cfg = pipeline.Config(quick=True, out_root=str(tmp_path / "out"), data_dir=str(tmp_path / "data"),
                          stages="sft")
    run = tmp_path / "out" / "sft"
    run.mkdir(parents=True)
    (run / "log.jsonl").write_text('{"step": 1}\n')
    (run / "eval.json").write_text("{}")
    holder = hold(run)
    before = snapshot(run)
    try:
        with pytest.raises(SystemExit, match=rf"in use by another run: {run}; wait for it"):
            pipeline.run_pipeline(cfg)
        assert snapshot(run) == before
        monkeypatch.setattr(pipeline, "in_use", lambda path: False)
        with pytest.raises(SystemExit, match=rf"stage sft not run: {run} is in use by another run \(pid "
                                             rf"{holder.pid}"):
            pipeline.run_pipeline(cfg)
        assert snapshot(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_the_report_deletes_only_its_own_unchanged_runs(tmp_path):
    """Before a stage reruns: a run the report recorded and nobody changed is deleted (files that are no run's
    stay); an edited one, or one made by hand, is moved aside whole."""
    cfg = pipeline.Config(out_root=str(tmp_path / "out"), data_dir=str(tmp_path / "data"))
    run = tmp_path / "out" / "dpo"
    run.mkdir(parents=True)
    for name in ("config.json", "log.jsonl", "eval.json", "notes.txt"):
        (run / name).write_text(name)
    record = {"outputs": pipeline.output_digests("dpo", cfg)}
    pipeline.clear_stage("dpo", record, cfg)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    for name in ("config.json", "eval.json"):
        (run / name).write_text(name)
    record = {"outputs": pipeline.output_digests("dpo", cfg)}
    (run / "eval.json").write_text("edited")
    pipeline.clear_stage("dpo", record, cfg)
    assert sorted(p.name for p in (run / ".prev-1").iterdir()) == ["config.json", "eval.json"]
    (run / "log.jsonl").write_text("by hand")
    pipeline.clear_stage("dpo", None, cfg)
    assert (run / ".prev-2" / "log.jsonl").read_text() == "by hand" and (run / "notes.txt").exists()


# ----- evaluate, readers ----------------------------------------------------------------------------------


def test_best_of_n_checks_the_reward_models_tokenizer_before_writing(tiny_run, quick_world, pairs_dir, tmp_path):
    """A reward model of another tokenizer is refused before eval.json is written; --out equal to the reward model
    or the reference (whose eval.json is their own run's) is refused at once."""
    rm, tok = load_model(quick_world / "init", scalar_head=True)  # another tokenizer than tiny_run's
    write_checkpoint(tmp_path / "rm", rm.state_dict(), {"model": asdict(rm.config), "kind": "reward_model",
                                                        "reward_norm": {"gain": 1.0, "bias": 0.0}}, tok)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        evaluate.main(evaluate.Config(checkpoint=str(tiny_run / "init"), reward_model=str(tmp_path / "rm"),
                                      best_of_n=4, select=2, data_dir=str(pairs_dir), n=2, out=str(tmp_path / "e")))
    assert not (tmp_path / "e").exists()
    with pytest.raises(SystemExit, match=rf"--out={tmp_path / 'rm'} is --reward_model={tmp_path / 'rm'}: evaluate "
                                         r"writes into the evaluated checkpoint or --out"):
        evaluate.main(evaluate.Config(checkpoint=str(tiny_run / "init"), reward_model=str(tmp_path / "rm"),
                                      best_of_n=4, select=2, out=str(tmp_path / "rm")))
    with pytest.raises(SystemExit, match=rf"--out={tiny_run / 'init'} is --reference={tiny_run / 'init'}"):
        evaluate.main(evaluate.Config(checkpoint=str(tiny_run / "init"), reference=str(tiny_run / "init")))
    assert not (tmp_path / "rm" / "eval.json").exists() and not (tiny_run / "init" / "eval.json").exists()


def test_a_reader_beside_a_live_writer_gets_one_whole_checkpoint(tiny_run, tmp_path, monkeypatch):
    """Another run commits a checkpoint (block_size 64) while a reader is between config.json (block_size 48) and
    the weights: the reader reads again and returns the new checkpoint whole, config and weights."""
    out = tmp_path / "c"
    tiny_checkpoint(tiny_run, out, step=1, block_size=48)
    real, calls = nanoalign.model.read_tensors, []

    def commit_meanwhile(path):
        calls.append(path)
        if len(calls) == 1:
            new.append(tiny_checkpoint(tiny_run, out, step=2, block_size=64))
        return real(path)

    new = []
    monkeypatch.setattr(nanoalign.model, "read_tensors", commit_meanwhile)
    model, _ = load_model(out)
    assert len(calls) == 2 and model.config.block_size == 64
    assert all(torch.equal(model.state_dict()[k], v) for k, v in new[0].state_dict().items() if k != "lm_head.weight")
