"""train_ppo.py: the rollout/training log-prob identity, padding invariance, a tiny end-to-end run, resume,
2 FSDP processes against 1 (sampling without per-step collectives, then the same steps), and the gold-vs-KL
points of --eval_interval."""

import copy
import json
import os
import socket
from dataclasses import asdict, replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

import train_ppo
import train_sft
from conftest import run_killed_at, torchrun
from nanoalign.checkpoint import load_model, write_checkpoint
from nanoalign.data import batch_indices
from nanoalign.distributed import row_generators
from nanoalign.evaluate import curve_point
from nanoalign.losses import gae, kl_estimate, per_token_rewards, ppo_policy_loss, ppo_value_loss, whiten
from nanoalign.sampling import join, reward_scores, sample, scored_forward
from nanoalign.scaffold import Process, gathered, setup, teardown, wrap_model
from tolerances import steps_close

pytestmark = pytest.mark.slow  # whole runs of the script, torchrun: the full suite only


@pytest.fixture(scope="module")
def ppo_dirs(tiny_run, tmp_path_factory):
    """prompts.jsonl beside the tiny data, and a tiny random reward model (scalar head, gain/bias stored)."""
    root = tmp_path_factory.mktemp("ppo")
    data = root / "data"
    data.mkdir()
    for name in ("sft.jsonl", "sft_test.jsonl"):
        (data / name).write_text((tiny_run / "data" / name).read_text())
    prompts = [json.loads(l)["prompt"] for l in (tiny_run / "data" / "sft.jsonl").read_text().splitlines()]
    (data / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    # a policy that answers and stops (tiny SFT), and a random reward head on its trunk
    train_sft.main(train_sft.Config(data_dir=str(data), out_dir=str(root / "sft"), init_from=str(tiny_run / "init"),
                                    batch_size=16, micro_batch_size=16, max_steps=60, lr=1e-2, warmup_steps=5,
                                    n_eval=0, log_interval=20))
    torch.manual_seed(5)
    rm, tok = load_model(root / "sft", scalar_head=True)
    with torch.no_grad():
        rm.scalar_head.weight.normal_(std=1.0)
    write_checkpoint(root / "rm", rm.state_dict(), {"model": asdict(rm.config),
                                                    "reward_norm": {"gain": 2.0, "bias": -0.5}}, tok)
    return root


def rollout(model, tok, temperature=0.7, n=8):
    out = sample(model, [tok.encode_prompt(f"Where is my lamp, order #{1000 + i}?") for i in range(n)], 10,
                 tok.eos_id, tok.pad_id, temperature=temperature, generator=torch.Generator().manual_seed(0))
    rows = join(out)
    return rows.ids, rows.attn, rows.mask


def test_rollout_samples_each_row_at_the_temperature_and_marks_the_answers_that_stopped(ppo_dirs):
    """rollout = the shared sampler with each episode's own generator, at --temperature, the answer length
    bounded by the context; has_eos and the response mask follow the sampled tokens."""
    policy, tok = load_model(ppo_dirs / "sft")
    prompts = [f"Where is my lamp, order #{1000 + 37 * i}?" for i in range(6)]
    cfg = train_ppo.Config(rollout_size=6, samples_per_prompt=2, max_new_tokens=100, temperature=0.7, seed=1)
    roll = train_ppo.rollout(policy, tok, prompts, cfg, Process(0, 1, torch.device("cpu")), update=2)
    batch = [prompts[i] for i in batch_indices(len(prompts), 3, 2, cfg.seed)]
    encoded = [tok.encode_prompt(p) for p in batch for _ in range(2)]
    limit = policy.config.block_size - max(map(len, encoded))
    assert limit < cfg.max_new_tokens  # the context, not --max_new_tokens, bounds the answers here
    out = sample(policy, encoded, limit, tok.eos_id, tok.pad_id, temperature=0.7,
                 generator=row_generators(cfg.seed, 2, range(6), 6, torch.device("cpu")))
    assert roll.prompts == [p for p in batch for _ in range(2)]
    assert roll.ids[:, -out["response_ids"].shape[1]:].tolist() == out["response_ids"].tolist()
    for b in range(6):
        response = [t for t, m in zip(out["response_ids"][b].tolist(), out["response_mask"][b].tolist()) if m]
        assert roll.has_eos[b].item() == (tok.eos_id in response) and roll.mask[b].sum().item() == len(response)
        assert roll.answers[b] == tok.decode(response)
    assert 0 < roll.has_eos.sum() < 6  # both kinds present (seed chosen so), or the check above is weak


def test_first_ratio_is_one_against_the_sampler(tiny_run):
    """The training forward's log-probs (train mode, a minibatch, at the sampling temperature) equal the log-probs
    the sampler drew each token with, in its KV-cached decode: the first PPO ratio is 1 (N details 4, 5, 10)."""
    policy, tok = load_model(tiny_run / "init", scalar_head=True)
    out = sample(policy.eval(), [tok.encode_prompt(f"Where is my lamp, order #{1000 + i}?") for i in range(8)], 10,
                 tok.eos_id, tok.pad_id, temperature=0.7, generator=torch.Generator().manual_seed(0))
    rows = join(out)
    ids, attn, mask = rows.ids, rows.attn, rows.mask
    policy.train()
    mb = torch.tensor([5, 1, 6])
    new, _, _ = scored_forward(policy, ids[mb], attn[mb], mask[mb], 0.7, values=True)
    sampled = out["response_logps"][mb][out["response_mask"][mb].bool()]
    # fp32 log-probs (~-3) of one batched forward against the sampler's cached incremental ones: a few u each
    assert torch.allclose(new[mask[mb].bool()], sampled, atol=1e-5, rtol=1e-5)
    # and the test can fail: at temperature 1 the same tokens have other log-probs
    at_one, _, _ = scored_forward(policy, ids[mb], attn[mb], mask[mb], 1.0, values=True)
    assert not torch.allclose(at_one[mask[mb].bool()], sampled, atol=1e-3)  # 1/T changes them by ~30%


def test_values_and_logps_align_with_the_scored_token(tiny_run):
    """scored_forward()[t-1] pairs the log-prob of token t with the value read at position t-1, the position whose
    logits score it (N detail 15): checked against a plain full forward, position by position."""
    policy, tok = load_model(tiny_run / "init", scalar_head=True)
    with torch.no_grad():
        policy.scalar_head.weight.normal_()
    ids, attn, mask = rollout(policy.eval(), tok)
    logps, _, values = scored_forward(policy, ids, attn, mask, 0.7, values=True)
    with torch.no_grad():
        logits, scalar = policy(ids, attention_mask=attn, output="both")
    for b in range(len(ids)):
        for t in range(1, ids.shape[1]):
            if mask[b, t - 1]:
                expected = (logits[b, t - 1] / 0.7).log_softmax(-1)[ids[b, t]]
                # fp32, the same forward read two ways: log-probs ~-3 within a few u; values the same numbers
                assert logps[b, t - 1].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
                assert values[b, t - 1].item() == pytest.approx(scalar[b, t - 1].item(), rel=1e-5, abs=1e-6)
            else:
                assert logps[b, t - 1] == 0


def test_critics_start_at_zero_and_at_the_normalised_score(ppo_dirs):
    """--critic=head: a zero-initialised value head, V ≡ 0 (N detail 11). --critic=separate: the RM with its
    gain and bias folded into the head, so V at the last token is the normalised reward PPO is trained on."""
    cfg = train_ppo.Config(data_dir=str(ppo_dirs / "data"), init_from=str(ppo_dirs / "sft"),
                           reward_model=str(ppo_dirs / "rm"))
    proc = setup(0, "cpu")
    policy, tok, _, (rm, gain, bias), critic = train_ppo.load_models(cfg, proc)
    assert critic is None and (gain, bias) == (2.0, -0.5)
    ids, attn, _ = rollout(policy.eval(), tok)
    with torch.no_grad():
        assert torch.equal(policy(ids, attention_mask=attn, output="scalar"), torch.zeros(ids.shape))
        _, _, _, _, critic = train_ppo.load_models(train_ppo.Config(**{**asdict(cfg), "critic": "separate"}), proc)
        values = critic(ids, attention_mask=attn, output="scalar")
        last = attn.shape[1] - 1 - attn.flip(-1).argmax(-1)  # right-padded: the last real token of each row
        expected = reward_scores(rm, ids, attn, gain, bias)
        # fp32: gain and bias folded into the head's weights against applied after it: a few u of values ~1
        assert torch.allclose(values[torch.arange(len(ids)), last], expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(expected, reward_scores(rm, ids, attn))  # gain and bias matter here


def test_adaptive_beta_moves_toward_the_target(ppo_dirs, tmp_path):
    """An update whose KL is above the target raises β for the next, one below lowers it (Ziegler et al. 2019's
    controller, as the loop wires it): here the first update's KL is 0 (policy = reference), the later ones
    above the target, so β falls once, then rises."""
    cfg = train_ppo.Config(data_dir=str(ppo_dirs / "data"), init_from=str(ppo_dirs / "sft"),
                           reward_model=str(ppo_dirs / "rm"), out_dir=str(tmp_path / "ppo"), n_updates=4,
                           rollout_size=8, minibatches=2, ppo_epochs=1, lr=3e-3, max_new_tokens=16, n_eval=0,
                           seed=3, kl_target=1e-3, kl_horizon=100)
    train_ppo.main(cfg)
    log = [json.loads(l) for l in (tmp_path / "ppo" / "log.jsonl").read_text().splitlines()]
    betas, kls = [e["objective/beta"] for e in log], [e["objective/kl"] for e in log]
    assert betas[0] == cfg.beta
    moves = [(after - before) * (kl - cfg.kl_target) for before, after, kl in zip(betas, betas[1:], kls)]
    assert all(m > 0 for m in moves), (betas, kls)
    assert kls[0] < cfg.kl_target < max(kls)  # both directions were exercised


def ppo_step_losses(policy, reference, ids, attn, mask, scores):
    """Steps 3-5 of train_ppo with a fixed score per row: KL penalty, GAE, whitening, the two losses."""
    with torch.no_grad():
        old, _, old_values = scored_forward(policy, ids, attn, mask, 0.7, values=True)
        ref, _, _ = scored_forward(reference, ids, attn, mask, 0.7, values=False)
    kl = kl_estimate(old, ref) * mask
    rewards = per_token_rewards(scores, kl, mask, 0.1)
    advantages, returns = gae(rewards, old_values * mask, mask, 1.0, 0.95)
    advantages = whiten(advantages, mask)
    logps, _, values = scored_forward(policy, ids, attn, mask, 0.7, values=True)
    pg, _, _ = ppo_policy_loss(logps - 0.01, old, advantages, mask)  # a shifted policy, so the loss is not trivial
    vf, _ = ppo_value_loss(values + 0.05, old_values, returns, mask)
    return torch.stack([kl.sum(), rewards.sum(), pg, vf])


def test_padding_after_eos_contributes_nothing(tiny_run):
    """Extra PAD columns after every response (attention 0, mask 0) leave every loss unchanged (N detail 14)."""
    policy, tok = load_model(tiny_run / "init", scalar_head=True)
    with torch.no_grad():
        policy.scalar_head.weight.normal_()
    reference = load_model(tiny_run / "init", tok)[0]
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ids, attn, mask = rollout(policy.eval(), tok)
    scores = torch.linspace(-1, 1, len(ids))
    pad = 5
    ids_p = torch.cat([ids, torch.full((len(ids), pad), tok.pad_id)], 1)
    attn_p = torch.cat([attn, torch.zeros(len(ids), pad, dtype=attn.dtype)], 1)
    mask_p = torch.cat([mask, torch.zeros(len(ids), pad)], 1)
    base = ppo_step_losses(policy, reference, ids, attn, mask, scores)
    padded = ppo_step_losses(policy, reference, ids_p, attn_p, mask_p, scores)
    assert torch.allclose(base, padded, atol=1e-5, rtol=1e-5)  # fp32, 5 more PAD columns: sums round apart


@pytest.mark.parametrize("variant", [dict(), dict(critic="separate"), dict(advantage="rloo", samples_per_prompt=4),
                                     dict(advantage="grpo", samples_per_prompt=4)])
def test_tiny_ppo_run_raises_the_reward(ppo_dirs, tiny_run, tmp_path, variant):
    cfg = train_ppo.Config(data_dir=str(ppo_dirs / "data"), init_from=str(ppo_dirs / "sft"),
                           reward_model=str(ppo_dirs / "rm"), out_dir=str(tmp_path / "ppo"), n_updates=12,
                           rollout_size=32, minibatches=2, ppo_epochs=2, lr=3e-3, critic_lr=3e-3, max_new_tokens=24,
                           beta=0.01, n_eval=4, seed=3, **variant)
    result = train_ppo.main(cfg)
    log = [json.loads(l) for l in (tmp_path / "ppo" / "log.jsonl").read_text().splitlines()]
    scores = [entry["objective/score"] for entry in log]  # the score PPO maximises (missing-EOS penalty applied)
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.2
    # policy == reference before any update: the same weights, fp32 log-prob differences of a few u of ~3
    assert log[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert {"gold", "kl", "win_rate_vs_sft", "failures"} <= set(result)


def decode_on_rank(rank: int, port: int, init_dir: str) -> None:
    """One of two gloo ranks: the sharded model decodes 1 token on rank 0 and 12 on rank 1 inside `gathered`,
    counting FSDP's all-gathers, then both take a backward pass, whose collectives must still pair up."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    proc = setup(0, "cpu")
    model, tok = load_model(init_dir)
    full = copy.deepcopy(model)
    model = wrap_model(model, proc)
    prompts, n_new = [tok.encode_prompt("Where is my fan, order #1234?")] * 3, 1 + 11 * rank
    gathers, all_gather = [], dist.all_gather_single
    dist.all_gather_single = lambda *args, **kw: gathers.append(1) or all_gather(*args, **kw)
    with gathered(model):
        before = len(gathers)
        out = sample(model, prompts, n_new, tok.eos_id, tok.pad_id, temperature=0)
        assert len(gathers) == before, "a collective in a decode step"
    assert all(isinstance(p, DTensor) for p in model.parameters())  # sharded again
    expected = sample(full, prompts, n_new, tok.eos_id, tok.pad_id, temperature=0)  # the unsharded model's answers
    assert torch.equal(out["response_ids"], expected["response_ids"])
    model(out["prompt_ids"]).mean().backward()
    teardown()
    os._exit(0)  # skip interpreter shutdown, where gloo now and then aborts (conftest.GLOO_EXIT_ABORT)


def test_gathered_policy_decodes_without_collectives(tiny_run):
    """Ranks whose rows finish at different steps run different numbers of decode forwards: with the weights
    gathered once there is no collective per forward, so neither rank waits for the other (no hang)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(decode_on_rank, args=(port, str(tiny_run / "init")), nprocs=2)


def test_two_process_fsdp_matches_single_process(ppo_dirs, tmp_path):
    """2 gloo processes with FSDP2, each sampling and training on half of every rollout, == 1 process: one
    generator per episode, whitening (rewards and advantages) and loss normalisation over both ranks' tokens,
    the same minibatches.
    Only the order of floating-point reductions (and each rank's padding) differs: the weights' steps within
    steps_close (the value head started at 0), the global metrics within 1e-5 relative (or absolute, near 0)."""
    cfg = lambda out: train_ppo.Config(data_dir=str(ppo_dirs / "data"), init_from=str(ppo_dirs / "sft"),
                                       reward_model=str(ppo_dirs / "rm"), out_dir=str(tmp_path / out), n_updates=2,
                                       rollout_size=8, minibatches=2, ppo_epochs=2, lr=3e-3, max_new_tokens=24,
                                       whiten_rewards=True, n_eval=0, seed=3)
    train_ppo.main(cfg("one"))
    torchrun("train_ppo.py", cfg("two"))
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert steps_close(b, a, load_file(ppo_dirs / "sft" / "model.safetensors"))
    last = [{k: v for k, v in json.loads((tmp_path / d / "log.jsonl").read_text().splitlines()[-1]).items()
             if not k.startswith("time")} for d in ("one", "two")]  # wall-clock times differ
    assert last[1] == pytest.approx(last[0], rel=1e-5, abs=1e-5)  # the last update's global metrics


@pytest.mark.parametrize("variant", [dict(kl_target=0.5),  # value head; adaptive β to restore
                                     dict(critic="separate"),  # the critic and its AdamW, in out_dir/critic
                                     dict(reward="gold", advantage="rloo", samples_per_prompt=4)])  # gold's scale
def test_resume_continues_the_same_run(ppo_dirs, tmp_path, monkeypatch, variant):
    """Killed after the update-2 checkpoint and resumed: every logged metric and the final weights are those of a
    run never stopped: policy, value head or separate critic, AdamW moments, β and the gold normalisation."""
    cfg = lambda out, **kw: train_ppo.Config(
        data_dir=str(ppo_dirs / "data"), init_from=str(ppo_dirs / "sft"), reward_model=str(ppo_dirs / "rm"),
        out_dir=str(tmp_path / out), n_updates=5, ckpt_interval=2, rollout_size=8, minibatches=2, ppo_epochs=2,
        lr=3e-3, max_new_tokens=24, n_eval=0, seed=3, **variant, **kw)
    train_ppo.main(cfg("full"))
    run_killed_at(train_ppo.main, cfg("cut"), 3, monkeypatch)
    train_ppo.main(cfg("cut", resume=True))
    logs = [[{k: v for k, v in json.loads(l).items() if not k.startswith("time")}  # wall-clock times differ
             for l in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("full", "cut")]
    assert [e["step"] for e in logs[1]] == [1, 2, 3, 4, 5]
    for resumed, uninterrupted in zip(logs[1], logs[0]):  # the same kernels on the same checkpointed numbers
        assert resumed == pytest.approx(uninterrupted, abs=1e-6)
    for f in ["model.safetensors"] + (["critic/model.safetensors"] if "critic" in variant else []):
        a, b = (load_file(tmp_path / d / f) for d in ("full", "cut"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)  # as above: ulps of weights ~0.1 at most


def test_curve_points_measure_the_policy_of_their_update(ppo_dirs, tmp_path, monkeypatch):
    """--eval_interval=2 logs at update 2 the gold and KL that `evaluate.curve_point` measures on the update-2
    checkpoint read back, and changes nothing in training: the same metrics and weights as a run without it."""
    cfg = train_ppo.Config(data_dir=str(ppo_dirs / "data"), init_from=str(ppo_dirs / "sft"),
                           reward_model=str(ppo_dirs / "rm"), out_dir=str(tmp_path / "cut"), n_updates=4,
                           ckpt_interval=2, rollout_size=8, minibatches=2, ppo_epochs=2, lr=3e-3, max_new_tokens=16,
                           eval_max_new_tokens=16, n_eval=4, eval_interval=2, kl_target=0.5, seed=3)
    run_killed_at(train_ppo.main, cfg, 3, monkeypatch)  # after the update-2 checkpoint
    policy, tok = load_model(tmp_path / "cut")
    reference = load_model(ppo_dirs / "sft", tok, scalar_head=False)[0]
    expected = curve_point(policy, reference, tok, cfg.data_dir, 4, 16, cfg.temperature, cfg.seed)
    logged = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval/kl" in r] == [2] and expected["eval/kl"] > 0
    # the same weights, prompts and seed: the same samples; gold and KL summed over other batch shapes: ulps
    assert {k: v for k, v in logged[1].items() if k.startswith("eval/")} == pytest.approx(expected, abs=1e-6)
    logs = []
    for out, flags in (("curve", {}), ("plain", dict(n_eval=0, eval_interval=0))):
        train_ppo.main(replace(cfg, out_dir=str(tmp_path / out), **flags))
        logs.append([{k: v for k, v in json.loads(line).items() if not k.startswith(("time", "eval/"))}
                     for line in (tmp_path / out / "log.jsonl").read_text().splitlines()])
    assert logs[0] == logs[1]
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("curve", "plain"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="--eval_interval=2 needs held-out prompts"):
        train_ppo.main(replace(cfg, out_dir=str(tmp_path / "none"), n_eval=0))
