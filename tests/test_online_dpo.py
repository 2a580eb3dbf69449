"""Online DPO (train_dpo.py --online=True; Guo et al. 2024, Algorithm 1): each step's pairs are sampled from the
weights of that step, the chosen answer is the labeller's, the labels are counted against --label_budget, eval.json
is written, and two online steps in float64 equal the hand-written DPO steps on the same pairs. The flag checks
and the pair rule run in the fast tier."""

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_dpo
import nanoalign.online
from hand import clip_and_adamw, warmup_cosine
from nanoalign.checkpoint import load_model
from nanoalign.online import gold_preferences, preferred
from nanoalign.world import gold_judge, helpdesk
from test_dpo_reference import pair_loss, sequence_logp


def online(world, out, **kw):
    base = dict(data_dir=str(world / "data"), out_dir=str(out), init_from=str(world / "init"), online=True,
                labeller="gold", beta=0.5, batch_size=6, max_steps=3, warmup_steps=1, lr=1e-2, min_lr=1e-3,
                log_interval=1, n_eval=0, sample_max_new_tokens=12, max_new_tokens=12, seed=7)
    return train_dpo.Config(**{**base, **kw})


class Longer:
    """A test labeller that prefers the longer answer, ½ on equal lengths and on each step's first pair (a tie
    every step, so that the DPO step's mean is over fewer pairs than were labelled), recording what it was
    asked."""

    def __init__(self):
        self.asked = []

    def __call__(self, pairs, step):
        self.asked.append((step, pairs))
        return torch.tensor([0.5 if len(a) == len(b) or i == 0 else float(len(a) > len(b))
                             for i, (_, a, b) in enumerate(pairs)], dtype=torch.float64)


@pytest.fixture
def recorded(monkeypatch):
    """Runs of train_dpo.main with the Longer labeller, recording the weights each sampler call saw, the weights
    after each DPO step and the records each step encoded."""
    seen = {"labeller": Longer(), "sampled_with": [], "after_step": [], "records": []}
    monkeypatch.setattr(train_dpo, "load_labeller", lambda *a, **k: seen["labeller"])
    real_sample, real_step, real_encode = (nanoalign.online.sample_answers, train_dpo.dpo_step,
                                           train_dpo.encode_preferences)

    def weights(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def sample(model, *a, **k):
        seen["sampled_with"].append(weights(model))
        return real_sample(model, *a, **k)

    def step(model, *a, **k):
        out = real_step(model, *a, **k)
        seen["after_step"].append(weights(model))
        return out

    def encode(tok, records, *a, **k):
        seen["records"].append(records)
        return real_encode(tok, records, *a, **k)

    monkeypatch.setattr(nanoalign.online, "sample_answers", sample)
    monkeypatch.setattr(train_dpo, "dpo_step", step)
    monkeypatch.setattr(train_dpo, "encode_preferences", encode)
    return seen


@pytest.mark.slow
def test_pairs_come_from_the_current_policy_and_the_labellers_choice(quick_world, tmp_path, recorded):
    result = train_dpo.main(online(quick_world, tmp_path / "run", n_eval=4, label_budget=15, max_steps=10))
    asked = recorded["labeller"].asked
    # every step's pairs were sampled with the weights the previous step left (the first: --init_from's)
    start = load_model(quick_world / "init")[0].state_dict()
    assert len(recorded["sampled_with"]) == len(asked) == len(recorded["after_step"]) == 3  # 6 + 6 + 3 labels
    for k, seen in enumerate(recorded["sampled_with"]):
        before = start if k == 0 else recorded["after_step"][k - 1]
        assert all(torch.equal(seen[name], before[name]) for name in before)
    moved = recorded["after_step"][0]
    assert any(not torch.equal(moved[name], start[name]) for name in start)  # so the check above can fail
    # the chosen answer is the labeller's preferred one; ties (equal lengths) are not trained on
    for (step, pairs), records in zip(asked, recorded["records"]):
        assert records == [{"prompt": p, "chosen": max(a, b, key=len), "rejected": min(a, b, key=len), "p": 1.0}
                           for p, a, b in pairs[1:] if len(a) != len(b)]
    # the label budget: 6 and 6 prompts, then the 3 labels left; the log counts them
    assert [len(pairs) for _, pairs in asked] == [6, 6, 3]
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["labels"] for r in logged] == [6, 12, 15] and [r["step"] for r in logged] == [1, 2, 3]
    assert all(r["time/sample"] > 0 and r["sample/tokens_per_s"] > 0 for r in logged)
    assert json.loads((tmp_path / "run" / "eval.json").read_text()) == result and result["kl"] > 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["labels"]["used"] == 15


@pytest.mark.slow
def test_gold_labeller_run_measures_itself_against_gold(quick_world, tmp_path):
    """--labeller=gold end to end: the labels agree with the gold judge wherever gold differs."""
    train_dpo.main(online(quick_world, tmp_path / "run", max_steps=2, sample_max_new_tokens=24))
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["labels"] for r in logged] == [6, 12]
    assert all(r["labels/gold_agreement"] in (None, 1.0) for r in logged)


@pytest.mark.slow
def test_online_steps_equal_hand_written_dpo_steps_on_their_pairs(quick_world, tmp_path, recorded):
    """Two online steps in float64 against the DPO steps written by hand (test_dpo_reference's unpadded
    log-probs and loss, hand.py's AdamW) on the pairs each step trained on: the online plumbing (orientation,
    ties skipped, the mean over the pairs kept, the live reference) takes the offline DPO step, and logs its loss."""
    cfg = online(quick_world, tmp_path / "run", max_steps=2, weight_decay=0.1, grad_clip=0.5, label_smoothing=0.1)
    torch.set_default_dtype(torch.float64)
    try:
        train_dpo.main(cfg)
        policy, tok = load_model(cfg.init_from)
        policy = policy.double()
        reference = load_model(cfg.init_from)[0].double().requires_grad_(False)
        state, losses = {}, []
        assert all(len(records) >= 2 for records in recorded["records"])  # each step trained on pairs
        for step, records in enumerate(recorded["records"]):
            total = 0.0
            for r in records:
                pc, lc = sequence_logp(policy, tok, r["prompt"], r["chosen"])
                pr, lr_ = sequence_logp(policy, tok, r["prompt"], r["rejected"])
                with torch.no_grad():
                    rc, _ = sequence_logp(reference, tok, r["prompt"], r["chosen"])
                    rr, _ = sequence_logp(reference, tok, r["prompt"], r["rejected"])
                total = total + pair_loss(cfg, pc, pr, rc, rr, lc, lr_, cfg.label_smoothing)
            loss = total / len(records)
            loss.backward()
            losses.append(loss.item())
            lr = warmup_cosine(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr)
            clip_and_adamw(policy.parameters(), lr, state, cfg.grad_clip, 1e-8, cfg.weight_decay)
    finally:
        torch.set_default_dtype(torch.float32)
    logged = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(losses, rel=1e-9, abs=1e-12)  # float64 scalars; AdamW alone hides a loss scale
    got = load_file(tmp_path / "run" / "model.safetensors")
    # float64 both sides, only the order of sums differs (~1e-14); a wrong pair, sign or mean moves lr-sized steps
    for name, p in policy.named_parameters():
        torch.testing.assert_close(got[name].double(), p.detach(), atol=1e-9, rtol=1e-7)
    start = load_model(cfg.init_from)[0].state_dict()
    assert max((got[n] - start[n]).abs().max().item() for n in start if n in got) > 1e-3  # two steps moved it


def test_preferred_pairs_orient_by_the_label_and_skip_ties():
    pairs = [("q1", "a", "b"), ("q2", "c", "d"), ("q3", "e", "f")]
    p = torch.tensor([0.8, 0.5, 0.1], dtype=torch.float64)
    assert preferred(pairs, p) == [{"prompt": "q1", "chosen": "a", "rejected": "b", "p": 0.8},
                                   {"prompt": "q3", "chosen": "f", "rejected": "e", "p": 0.9}]


def test_gold_labeller_by_hand():
    """1 where y1's gold is higher, 0 where lower, ½ on equal gold (the same answer twice)."""
    prompt = next(helpdesk.prompt_stream(0))
    answers = helpdesk.candidates(prompt, random.Random(0), 4)
    g = [gold_judge.judge(prompt, a)["gold"] for a in answers]
    hi, lo = max(range(4), key=g.__getitem__), min(range(4), key=g.__getitem__)
    assert g[hi] > g[lo]
    p = gold_preferences([(prompt, answers[hi], answers[lo]), (prompt, answers[lo], answers[hi]),
                          (prompt, answers[lo], answers[lo])])
    assert p.tolist() == [1.0, 0.0, 0.5]


@pytest.mark.parametrize("kw,message", [
    (dict(labeller="human"), "--labeller=human: expected one of ai, rm, gold"),
    (dict(loss_type="kto"), "--online=True labels pairs of sampled answers; --loss_type=kto"),
    (dict(loss_type="kto", feedback_file="feedback.jsonl"), "--feedback_file=feedback.jsonl trains on labelled"),
    (dict(soft_labels=True), "--soft_labels=True"),
    (dict(labeller="ai", judge="nowhere"), "--judge=nowhere: no finished feedback model there"),
    (dict(labeller="rm", reward_model="nowhere"), "--reward_model=nowhere: no reward model there"),
    (dict(sample_max_new_tokens=500), "--sample_max_new_tokens=500: .*prompts.jsonl:\\d+ has a prompt of"),
    (dict(batch_size=1000), "--batch_size=1000: larger than the data"),
], ids=["labeller", "kto", "feedback", "soft", "judge", "rm", "length", "batch"])
def test_bad_online_flags_stop_with_one_clear_error(quick_world, tmp_path, kw, message):
    with pytest.raises(SystemExit, match=message):
        train_dpo.main(online(quick_world, tmp_path / "run", **kw))
    assert not (tmp_path / "run" / "log.jsonl").exists()
