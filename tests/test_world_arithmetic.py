"""The scripts' rank arithmetic, in one process: a rank of a two-process world whose peer holds the same data
must take exactly the step that one process takes on that data.

`global_sum` is replaced by doubling (the peer's share is identical) and the model is not wrapped, so the
gradient one rank computes is what FSDP's average over the two identical ranks would be. Every "× world",
"/ world", global count and global batch size in the update code must then cancel; a wrong one changes the
step or a logged metric. test_train_*.py's two-process tests check the same under real torchrun.
"""
import copy
from dataclasses import replace

import pytest
import torch

import train_dpo
import train_ppo
import train_rm
import train_sft
from nanoalign import distributed
from nanoalign.checkpoint import load_model
from nanoalign.data import encode_example, encode_preferences, read_jsonl
from nanoalign.scaffold import Process, make_optimizer
from test_ppo_reference import BASE, fixed_rollout, gold, tiny_models

ONE, TWO = Process(0, 1, torch.device("cpu")), Process(0, 2, torch.device("cpu"))


def as_rank_of_two(monkeypatch, module):
    """module's global_sum as a two-rank all-reduce whose peer holds the same values."""
    monkeypatch.setattr(module, "global_sum", lambda x, proc: 2 * x)


def same_steps(one, two, metrics_one, metrics_two):
    # float64 models (test_ppo_reference.tiny_models); two ranks' sums only regroup the same terms: ~1e-15
    for a, b in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert metrics_two == pytest.approx(metrics_one, rel=1e-9, abs=1e-12)


@pytest.fixture
def model64(tiny_run):
    torch.set_default_dtype(torch.float64)
    try:
        model, tok = load_model(tiny_run / "init")
        yield model.double(), tok
    finally:
        torch.set_default_dtype(torch.float32)


def test_sft_step(tiny_run, model64, monkeypatch):
    model, tok = model64
    records = read_jsonl(tiny_run / "data" / "sft.jsonl")[:6]
    examples = [encode_example(tok, r["prompt"], r["completion"], 48) for r in records]
    cfg = train_sft.Config(batch_size=6, micro_batch_size=4, max_steps=2, warmup_steps=1, lr=1e-2, grad_clip=0.5,
                           prompt_loss_weight=0.2)
    one, two = model, copy.deepcopy(model)
    opt_one, opt_two = make_optimizer(one, cfg.lr, 0.1), make_optimizer(two, cfg.lr, 0.1)
    for step in range(2):
        m1, t1 = train_sft.sft_step(one, opt_one, examples, tok.pad_id, step, cfg, ONE)
        with monkeypatch.context() as mp:
            as_rank_of_two(mp, train_sft)
            m2, t2 = train_sft.sft_step(two, opt_two, examples, tok.pad_id, step, replace(cfg, batch_size=12), TWO)
        same_steps(one, two, m1, m2)
        assert t1 == t2 == sum(len(ids) for ids, _ in examples)  # tokens this rank read


def test_dpo_step(tiny_run, model64, monkeypatch):
    """Pairwise losses with RPO's term, and KTO, whose reference point adds the sum and the count of the
    mismatched pairs' log-ratios over ranks (a doubled sum over an undoubled count would double z₀)."""
    from test_dpo_reference import RECORDS
    model, tok = model64
    smoothing = torch.tensor([0.0, 0.2, 0.0, 0.1, 0.0, 0.0])
    reference = copy.deepcopy(model).requires_grad_(False)
    for loss_type, cached, kw in (("sigmoid", False, dict(rpo_alpha=0.5)), ("ipo", True, dict(rpo_alpha=0.5)),
                                  ("kto", True, {}), ("kto", False, dict(kto_lambda_d=1.5)), ("orpo", False, {})):
        prefs = encode_preferences(tok, RECORDS[:6], 48, 5 if loss_type == "kto" else None)
        cfg = train_dpo.Config(batch_size=6, micro_batch_size=4, max_steps=2, warmup_steps=1, lr=1e-2,
                               loss_type=loss_type, **kw)
        ref_logps = train_dpo.sequence_logps(reference, prefs.seqs, tok.pad_id, "cpu") if cached else None
        one, two = copy.deepcopy(model), copy.deepcopy(model)
        opt_one, opt_two = make_optimizer(one, cfg.lr, 0.1), make_optimizer(two, cfg.lr, 0.1)
        data = (prefs, smoothing, tok.pad_id)
        read = [row for rows in prefs.rows + (prefs.mismatched or []) for row in rows]  # KTO's z₀ reads partners
        for step in range(2):
            m1, t1 = train_dpo.dpo_step(one, reference, ref_logps, opt_one, data, list(range(6)), step, cfg, ONE)
            with monkeypatch.context() as mp:
                as_rank_of_two(mp, train_dpo)
                m2, t2 = train_dpo.dpo_step(two, reference, ref_logps, opt_two, data, list(range(6)), step,
                                            replace(cfg, batch_size=12), TWO)
            same_steps(one, two, m1, m2)
            assert t1 == t2 == sum(len(prefs.seqs[i][0]) for i in read)


def test_rm_step(tiny_run, monkeypatch):
    from test_rm_reference import prefs_records
    torch.manual_seed(0)
    model, tok = load_model(tiny_run / "init", scalar_head=True)
    model = model.double()
    groups = [train_rm.encode_group(tok, {**r, "where": "test"}, 48) for r in prefs_records(3)[:6]]
    for data in ("prefs", "pairs"):
        if data == "pairs":  # two answers each, soft labels
            groups = [{**g, "rows": g["rows"][:2], "ranking": [0, 1], "p": 0.7} for g in groups]
        cfg = train_rm.Config(batch_size=6, micro_batch_size=4, rows_per_forward=5, lr=1e-2, warmup_steps=1,
                              data=data)
        one, two = copy.deepcopy(model), copy.deepcopy(model)
        opt_one, opt_two = make_optimizer(one, cfg.lr, 0.1), make_optimizer(two, cfg.lr, 0.1)
        for step in (1, 2):
            m1, t1 = train_rm.rm_step(one, opt_one, groups, tok.pad_id, step, 2, cfg, ONE)
            with monkeypatch.context() as mp:
                as_rank_of_two(mp, train_rm)
                m2, t2 = train_rm.rm_step(two, opt_two, groups, tok.pad_id, step, 2, replace(cfg, batch_size=12), TWO)
            same_steps(one, two, m1, m2)
            assert t1 == t2 == sum(len(ids) for g in groups for ids, _ in g["rows"])


@pytest.mark.parametrize("variant", [{}, dict(critic="separate", whiten_rewards=True),
                                     dict(advantage="grpo", samples_per_prompt=4)])
def test_ppo_update(monkeypatch, variant):
    monkeypatch.setattr(train_ppo.gold_judge, "judge", gold)
    cfg = replace(BASE, minibatches=1, **variant)  # one minibatch: the same rows for any world size
    roll = fixed_rollout(cfg.samples_per_prompt)
    separate = cfg.critic == "separate"
    runs = []
    for proc in (ONE, TWO):
        policy, reference, rm, critic = tiny_models()
        optimizer, critic_opt = make_optimizer(policy, cfg.lr, 0.0), make_optimizer(critic, cfg.critic_lr, 0.0)
        with monkeypatch.context() as mp:
            if proc.world == 2:
                as_rank_of_two(mp, distributed)  # PPO's statistics over ranks are nanoalign.distributed's
            metrics, _ = train_ppo.ppo_update(roll, policy.eval(), critic if separate else None, reference,
                                              (rm, 1.5, -0.2), optimizer, critic_opt, cfg.beta, None,
                                              replace(cfg, rollout_size=8 * proc.world), proc, 1)
        runs.append((policy, critic, {k: v for k, v in metrics.items() if not k.startswith("time/")}))
    (p1, c1, m1), (p2, c2, m2) = runs
    same_steps(p1, p2, m1, m2)
    same_steps(c1, c2, {}, {})


def test_rollout_shares(tiny_run):
    """Each rank of two samples exactly its half of the one-process rollout, and the longest prompt of the whole
    rollout, not of the rank's half, bounds every answer (here the context binds, not --max_new_tokens)."""
    model, tok = load_model(tiny_run / "init")
    prompts = ["Where is my lamp, order #1234? It has been a while.", "Hi", "Lamp?", "Order #77?"]
    cfg = replace(BASE, rollout_size=8, samples_per_prompt=2, max_new_tokens=100)
    whole = train_ppo.rollout(model, tok, prompts, cfg, ONE, update=3)
    assert not whole.has_eos[:4].all() and not whole.has_eos[4:].all()  # answers in each half run to the bound
    for rank in (0, 1):
        half = train_ppo.rollout(model, tok, prompts, cfg, Process(rank, 2, torch.device("cpu")), update=3)
        rows = slice(4 * rank, 4 * rank + 4)
        assert half.prompts == whole.prompts[rows] and half.answers == whole.answers[rows]
        assert half.has_eos.tolist() == whole.has_eos[rows].tolist()
        assert half.mask.sum(-1).tolist() == whole.mask[rows].sum(-1).tolist()


def test_global_mean_and_unbiased_variance(monkeypatch):
    x = torch.tensor([1.0, 2.0, 4.0, 9.0], dtype=torch.float64)
    assert distributed.global_mean(x, ONE) == pytest.approx(4.0)  # small sums of hand values: exact or ~1e-16
    assert distributed.global_var(x, ONE) == pytest.approx(x.var().item())  # torch's unbiased convention
    assert distributed.global_total(x, ONE) == pytest.approx(16.0)
    as_rank_of_two(monkeypatch, distributed)  # the peer holds x too: the statistics of [x, x]
    assert distributed.global_mean(x, TWO) == pytest.approx(4.0)
    assert distributed.global_var(x, TWO) == pytest.approx(torch.cat([x, x]).var().item())
    assert distributed.global_total(x, TWO) == pytest.approx(32.0)
    assert torch.equal(distributed.all_sum(TWO)(x), 2 * x)
    assert list(distributed.rank_share(8, ONE)) == list(range(8))
    assert [list(distributed.rank_share(8, Process(r, 2, torch.device("cpu")))) for r in (0, 1)] == [[0, 1, 2, 3],
                                                                                             [4, 5, 6, 7]]
