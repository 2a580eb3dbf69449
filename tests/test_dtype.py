"""--dtype: bf16 runs of SFT, DPO, the reward model and a PPO update agree with fp32 from the same start within
bf16's precision, really hold bf16 weights and AdamW moments, write fp32 checkpoints that load, evaluate and resume
bit for bit; fp16 is refused on the CPU; fp16's loss scaler skips overflowed steps without stopping the run.

The tolerances. bf16 keeps 8 significant bits, a unit roundoff u = 2^-8 ≈ 0.004 (2-3 decimal digits). A step's
loss is computed in fp32 from bf16 logits, so it differs from fp32's by the forward's rounding: a few u relative
through the tiny 2-block models, a little more each step as the weights drift apart. Losses must agree to
LOSS_RTOL = 0.02 relative (5u), or 1e-3 absolute for losses of the form -log σ(margin) (DPO, the reward model):
they fall like e^-margin, so their relative error is the margin's absolute error. The final weights must lie
within MOVE_RTOL = 0.2 of how far the fp32 run moved them from the start (measured: 0.06-0.08, mostly AdamW
turning slightly different small gradients into ±lr steps): a bf16 run that trained another model, or did not
train, misses by ~1. Each test also asserts that bf16 differs from fp32 (it did compute in bf16). The measured
maxima (on an AVX512-BF16 CPU, torch 2.13) are printed by each test (pytest -s).
"""

import json
import math
import random
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_dpo
import train_ppo
import train_rm
import train_sft
from conftest import run_killed_at, tiny_sft_records, torchrun
from nanoalign import evaluate
from nanoalign.checkpoint import load_model, write_checkpoint
from nanoalign.config import check_config
from nanoalign.data import read_jsonl
from nanoalign import precision
from nanoalign.precision import LossScaler, run_dtype
from nanoalign.scaffold import Process, make_optimizer, optimizer_step, setup, wrap_model

pytestmark = pytest.mark.slow  # whole bf16 and fp32 runs of each script: the full suite only

LOSS_RTOL, MOVE_RTOL = 0.02, 0.2
BF16 = dict(dtype="bf16", allow_slow_dtype=True)  # tiny models: seconds where bf16 is emulated, as on AVX2-only CPUs


def log(out, key="loss"):
    return [json.loads(line)[key] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def weights(out):
    return load_file(Path(out) / "model.safetensors")


def moved(start: dict, a: dict, b: dict) -> tuple[float, float]:
    """(|a - b|, |a - start|) over every tensor of a, global L2 norms: how far two runs ended apart, against how
    far run a moved from the start."""
    apart = sum((a[k] - b[k]).double().square().sum() for k in a).sqrt().item()
    move = sum((a[k] - start[k]).double().square().sum() for k in a if k in start).sqrt().item()
    return apart, move


def watch_dtypes(monkeypatch, module) -> list:
    """Record, at each optimizer step of `module` (a script), the dtypes of the model's parameters and of its AdamW
    moments (after the step): the run's in-memory state, not what its checkpoint stores."""
    seen, real = [], module.optimizer_step

    def watched(model, optimizer, *args, **kwargs):
        norm = real(model, optimizer, *args, **kwargs)
        moments = {v.dtype for s in optimizer.state.values() for k, v in s.items() if k != "step"}
        seen.append(({p.dtype for p in model.parameters()}, moments))
        return norm

    monkeypatch.setattr(module, "optimizer_step", watched)
    return seen


def assert_parity(losses32, losses16, start, w32, w16, abs_tol=0.0):
    assert len(losses16) == len(losses32)
    assert losses16 == pytest.approx(losses32, rel=LOSS_RTOL, abs=abs_tol) and losses16 != losses32
    apart, move = moved(start, w32, w16)
    assert 0 < apart < MOVE_RTOL * move, (apart, move)
    return max(abs(a - b) / abs(a) for a, b in zip(losses32, losses16)), apart / move


# ----- the flag -------------------------------------------------------------------------------------------


def test_dtype_choices_and_fp16_refused_where_unsupported(tiny_run, tmp_path):
    with pytest.raises(SystemExit, match=r"--dtype=fp8: expected one of fp32, bf16, fp16"):
        check_config(train_sft.Config(dtype="fp8"))
    out = tmp_path / "sft"
    with pytest.raises(SystemExit) as e:
        train_sft.main(train_sft.Config(data_dir=str(tiny_run / "data"), out_dir=str(out),
                                        init_from=str(tiny_run / "init"), device="cpu", dtype="fp16"))
    assert str(e.value).startswith("--dtype=fp16 needs a CUDA device") and "\n" not in str(e.value)
    assert not out.exists()  # refused before anything is written
    with pytest.raises(SystemExit, match="--dtype=fp16 is single-process only"):
        run_dtype("fp16", torch.device("cuda"), world=2)
    assert run_dtype("fp16", torch.device("cuda")) == torch.float16  # no CUDA needed to decide
    assert run_dtype("bf16", torch.device("cpu"), world=2, allow_slow=True) == torch.bfloat16


def test_bf16_is_refused_where_the_cpu_emulates_it(tiny_run, tmp_path, monkeypatch):
    """Where a bf16 matmul runs more than precision.SLOW times longer than fp32 (torch emulating bf16),
    --dtype=bf16 stops before anything is written, in one line naming the flag, the CPU capability, the measured
    slowdown and the override; with --allow_slow_dtype=True, or a CPU that multiplies bf16 natively, it runs."""
    monkeypatch.setattr(precision, "half_slowdown", lambda: 61.0)
    out = tmp_path / "sft"
    with pytest.raises(SystemExit) as e:
        train_sft.main(sft(tiny_run, out, dtype="bf16"))
    message = str(e.value)
    assert message.startswith("--dtype=bf16: this CPU (torch capability ") and "\n" not in message
    assert "61x slower than fp32" in message and "--allow_slow_dtype=True" in message
    assert not out.exists()
    assert run_dtype("bf16", torch.device("cpu"), allow_slow=True) == torch.bfloat16
    assert run_dtype("bf16", torch.device("cuda")) == torch.bfloat16  # a GPU is not timed
    monkeypatch.setattr(precision, "half_slowdown", lambda: 0.5)  # native bf16 (AMX, AVX512-BF16, Arm BF16)
    assert run_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_the_bf16_slowdown_is_measured_and_leaves_the_thread_count():
    threads = torch.get_num_threads()
    slowdown = precision.half_slowdown.__wrapped__(n=64)  # the uncached function
    assert 0 < slowdown < math.inf and torch.get_num_threads() == threads


# ----- SFT ------------------------------------------------------------------------------------------------


def sft(tiny_run, out, **kw):
    base = dict(data_dir=str(tiny_run / "data"), out_dir=str(out), init_from=str(tiny_run / "init"), batch_size=8,
                micro_batch_size=4, max_steps=6, warmup_steps=2, lr=3e-3, log_interval=1, ckpt_interval=3,
                n_eval=0, max_new_tokens=16, seed=7)
    return train_sft.Config(**{**base, **kw})


def test_sft_bf16_matches_fp32_and_holds_bf16_state(tiny_run, tmp_path, monkeypatch):
    train_sft.main(sft(tiny_run, tmp_path / "fp32"))
    seen = watch_dtypes(monkeypatch, train_sft)
    train_sft.main(sft(tiny_run, tmp_path / "bf16", **BF16))
    assert seen and all(s == ({torch.bfloat16}, {torch.bfloat16}) for s in seen)
    loss_err, weight_err = assert_parity(log(tmp_path / "fp32"), log(tmp_path / "bf16"), weights(tiny_run / "init"),
                                         weights(tmp_path / "fp32"), weights(tmp_path / "bf16"))
    print(f"SFT bf16 vs fp32: loss {loss_err:.2e} relative, weights {weight_err:.3f} of the move")
    # the checkpoint is fp32 (fp32 code reads it as ever) holding bf16 values exactly
    stored = weights(tmp_path / "bf16")
    assert all(t.dtype == torch.float32 and torch.equal(t, t.bfloat16().float()) for t in stored.values())
    moments = load_file(tmp_path / "bf16" / "resume.safetensors")
    assert any(k.endswith("exp_avg") for k in moments)
    assert all(t.dtype == torch.float32 and torch.equal(t, t.bfloat16().float())
               for k, t in moments.items() if k.endswith(("exp_avg", "exp_avg_sq")))


def test_bf16_resume_continues_bit_for_bit(tiny_run, tmp_path, monkeypatch):
    """Killed after the step-3 checkpoint and resumed: the same losses and weights as the run never stopped,
    exactly, since the fp32 checkpoint narrows back to the bf16 weights and moments it was written from."""
    train_sft.main(sft(tiny_run, tmp_path / "full", **BF16))
    run_killed_at(train_sft.main, sft(tiny_run, tmp_path / "cut", **BF16), 4, monkeypatch)
    train_sft.main(sft(tiny_run, tmp_path / "cut", **BF16, resume=True))
    assert log(tmp_path / "cut") == log(tmp_path / "full")
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_bf16_matches_single_process(tiny_run, tmp_path):
    """Under torchrun bf16 parameters are sharded as they are (FSDP2), their gradients summed over ranks in fp32:
    2 processes (1 micro-batch of 4 each) take 1 process's steps (2 micro-batches of 4, summed in bf16) within
    bf16's precision, and write the same kind of checkpoint."""
    train_sft.main(sft(tiny_run, tmp_path / "one", max_steps=4, **BF16))
    torchrun("train_sft.py", sft(tiny_run, tmp_path / "two", max_steps=4, **BF16))
    one, two = log(tmp_path / "one"), log(tmp_path / "two")
    assert two == pytest.approx(one, rel=LOSS_RTOL)
    assert all(t.dtype == torch.float32 and torch.equal(t, t.bfloat16().float())
               for t in weights(tmp_path / "two").values())
    print(f"bf16, 2 processes vs 1: loss {max(abs(a - b) / a for a, b in zip(one, two)):.2e} relative")


def test_bf16_checkpoint_loads_and_evaluates(quick_world, tmp_path):
    """A bf16 SFT run on the helpdesk world; its checkpoint read by fp32 code and by `nanoalign.evaluate
    --dtype=bf16`: the gold judge scores both, on the same held-out prompts."""
    data = quick_world / "data"
    train_sft.main(train_sft.Config(data_dir=str(data), out_dir=str(tmp_path / "sft"),
                                    init_from=str(quick_world / "init"), batch_size=8, max_steps=3, log_interval=1,
                                    n_eval=0, **BF16))
    model, _ = load_model(tmp_path / "sft")
    assert next(model.parameters()).dtype == torch.float32
    results = {dtype: evaluate.main(evaluate.Config(checkpoint=str(tmp_path / "sft"), data_dir=str(data), n=4,
                                                    max_new_tokens=12, out=str(tmp_path / dtype), dtype=dtype,
                                                    allow_slow_dtype=True))
               for dtype in ("fp32", "bf16")}
    for r in results.values():
        assert 0 <= r["gold"] <= 1 and r["length"] > 0 and len(r["samples"]) == 3
    assert (tmp_path / "bf16" / "eval.json").exists()


# ----- DPO ------------------------------------------------------------------------------------------------


def test_dpo_bf16_matches_fp32(tiny_run, pairs_dir, tmp_path, monkeypatch):
    """The DPO loss is -log σ(h): once h is large the loss is ~e^-h, and its relative error is h's absolute error,
    not a few u. So the margins (β h) are held to LOSS_RTOL, and the losses to LOSS_RTOL or 1e-3 absolute (0.15% of
    the first loss, log 2). Also: the policy and its cached reference are both bf16, so the first step's margin is
    ~0 and its loss log 2 (a reference left in fp32 would put the bf16 policy's rounding into h)."""
    def cfg(out, **kw):
        return train_dpo.Config(data_dir=str(pairs_dir), out_dir=str(tmp_path / out), init_from=str(tiny_run / "init"),
                                cache_dir=str(tmp_path / "cache"), beta=0.5, batch_size=8, micro_batch_size=4,
                                max_steps=6, warmup_steps=2, lr=3e-3, log_interval=1, ckpt_interval=6, n_eval=0,
                                seed=7, **kw)
    train_dpo.main(cfg("fp32"))
    seen = watch_dtypes(monkeypatch, train_dpo)
    train_dpo.main(cfg("bf16", **BF16))
    assert seen and all(s == ({torch.bfloat16}, {torch.bfloat16}) for s in seen)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # the reference's dtype is part of the cache key
    loss_err, weight_err = assert_parity(log(tmp_path / "fp32"), log(tmp_path / "bf16"), weights(tiny_run / "init"),
                                         weights(tmp_path / "fp32"), weights(tmp_path / "bf16"), abs_tol=1e-3)
    m32, m16 = log(tmp_path / "fp32", "rewards/margins"), log(tmp_path / "bf16", "rewards/margins")
    assert m16 == pytest.approx(m32, rel=LOSS_RTOL, abs=1e-3) and abs(m16[0]) < 1e-3, (m32, m16)
    loss_abs = max(abs(a - b) for a, b in zip(log(tmp_path / "fp32"), log(tmp_path / "bf16")))
    print(f"DPO bf16 vs fp32: loss {loss_abs:.2e} absolute ({loss_err:.2e} relative), margins "
          f"{max(abs(a - b) / abs(a) for a, b in zip(m32[1:], m16[1:])):.2e} relative after the first "
          f"({m16[0]:.1e}), weights {weight_err:.3f} of the move")


# ----- reward model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefs_dir(tmp_path_factory):
    """K = 3 answers per prompt ranked right > vague > rude, in shuffled slots."""
    d = tmp_path_factory.mktemp("prefs")
    for name, n, seed in (("prefs.jsonl", 48, 0), ("prefs_test.jsonl", 8, 1)):
        rng, rows = random.Random(seed), []
        for r in tiny_sft_records(n, seed):
            answers = [r["completion"], "Your order is on its way. Anything else?", "Ugh, read the website."]
            order = rng.sample(range(3), 3)
            gold = [[1.0, 0.5, 0.0][i] for i in order]
            rows.append({"prompt": r["prompt"], "responses": [answers[i] for i in order],
                         "ranking": sorted(range(3), key=lambda j: -gold[j]), "gold": gold})
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_rm_bf16_matches_fp32(tiny_run, prefs_dir, tmp_path, monkeypatch):
    """The ranking losses are sums of -log σ(r_i - r_j): as DPO's, held to LOSS_RTOL or an absolute tolerance, here
    2e-3: the K-wise loss averages 6 pairs per ranking over two micro-batches, and the gap grows over the run's
    steps (measured: up to 1.15e-3, at a loss of 0.036 in the fifth step)."""
    def cfg(out, **kw):
        return train_rm.Config(data_dir=str(prefs_dir), out_dir=str(tmp_path / out), init_from=str(tiny_run / "init"),
                               epochs=1, batch_size=8, micro_batch_size=4, rows_per_forward=6, lr=3e-3, min_lr=3e-4,
                               warmup_steps=2, log_interval=1, n_norm=6, max_new_tokens=8, seed=7, **kw)
    r32 = train_rm.main(cfg("fp32"))
    seen = watch_dtypes(monkeypatch, train_rm)
    r16 = train_rm.main(cfg("bf16", **BF16))
    assert seen and all(s == ({torch.bfloat16}, {torch.bfloat16}) for s in seen)
    torch.manual_seed(7)  # as setup() seeds the runs, before the new scalar head is drawn
    start = load_model(tiny_run / "init", scalar_head=True)[0].state_dict()
    loss_err, weight_err = assert_parity(log(tmp_path / "fp32"), log(tmp_path / "bf16"), start,
                                         weights(tmp_path / "fp32"), weights(tmp_path / "bf16"), abs_tol=2e-3)
    print(f"RM bf16 vs fp32: loss {loss_err:.2e} relative, weights {weight_err:.3f} of the move; held-out "
          f"accuracy {r32['accuracy']:.3f} vs {r16['accuracy']:.3f}")
    assert abs(r16["accuracy"] - r32["accuracy"]) <= 0.1


# ----- PPO ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ppo_dirs(tiny_run, tmp_path_factory):
    """prompts.jsonl beside the tiny data and a random reward model on the tiny init's trunk."""
    root = tmp_path_factory.mktemp("ppo_dtype")
    (root / "data").mkdir()
    for name in ("sft.jsonl", "sft_test.jsonl"):
        (root / "data" / name).write_text((tiny_run / "data" / name).read_text())
    prompts = [r["prompt"] for r in read_jsonl(tiny_run / "data" / "sft.jsonl", "sft")]
    (root / "data" / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    torch.manual_seed(5)
    rm, tok = load_model(tiny_run / "init", scalar_head=True)
    write_checkpoint(root / "rm", rm.state_dict(), {"model": asdict(rm.config), "kind": "reward_model",
                                                    "reward_norm": {"gain": 2.0, "bias": -0.5}}, tok)
    return root


def ppo(tiny_run, ppo_dirs, **kw):
    base = dict(data_dir=str(ppo_dirs / "data"), init_from=str(tiny_run / "init"), reward_model=str(ppo_dirs / "rm"),
                rollout_size=8, minibatches=2, ppo_epochs=2, lr=1e-3, max_new_tokens=8, n_eval=0, seed=3)
    return train_ppo.Config(**{**base, **kw})


def test_ppo_update_bf16_matches_fp32(tiny_run, ppo_dirs):
    """One PPO update (scoring, KL, GAE, 2 epochs of 2 minibatches) on the same rollout, sampled once in fp32
    (sampling at another precision may draw other tokens, and then nothing is comparable), fp32 vs bf16 models.
    At PPO's default lr (3e-5) most bf16 updates round away (nanoalign.precision); 1e-3 here."""
    metrics, weights_after = {}, {}
    for dtype in ("fp32", "bf16"):
        cfg = ppo(tiny_run, ppo_dirs, dtype=dtype, allow_slow_dtype=True)
        proc = setup(cfg.seed, "cpu", dtype, allow_slow_dtype=True)
        policy, tok, reference, reward, critic = train_ppo.load_models(cfg, proc)
        if dtype == "fp32":
            prompts = [r["prompt"] for r in read_jsonl(ppo_dirs / "data" / "prompts.jsonl", "prompts")]
            roll = train_ppo.rollout(policy, tok, prompts, cfg, proc, update=0)
            start = {k: v.clone() for k, v in policy.state_dict().items()}
        assert {p.dtype for m in (policy, reference, reward[0]) for p in m.parameters()} == {proc.dtype}
        optimizer = make_optimizer(policy, cfg.lr, 0.0, eps=cfg.adam_eps)
        metrics[dtype], _ = train_ppo.ppo_update(roll, policy, critic, reference, reward, optimizer, None, cfg.beta,
                                                 None, cfg, proc, update=0)
        assert {v.dtype for s in optimizer.state.values() for k, v in s.items() if k != "step"} == {proc.dtype}
        weights_after[dtype] = {k: v.float() for k, v in policy.state_dict().items()}
    m32, m16 = metrics["fp32"], metrics["bf16"]
    for k in ("objective/rm_score", "objective/score", "ppo/pg_loss", "ppo/vf_loss", "ppo/entropy"):
        assert m16[k] == pytest.approx(m32[k], rel=LOSS_RTOL, abs=1e-3), k
    assert m16["objective/kl"] == m32["objective/kl"] == 0  # the old policy is the reference, at the same dtype
    apart, move = moved(start, weights_after["fp32"], weights_after["bf16"])
    print(f"PPO bf16 vs fp32: pg_loss {m32['ppo/pg_loss']:.5f} vs {m16['ppo/pg_loss']:.5f}, weights "
          f"{apart / move:.3f} of the move")
    assert 0 < apart < MOVE_RTOL * move, (apart, move)


def test_ppo_bf16_runs_end_to_end(tiny_run, ppo_dirs, tmp_path, monkeypatch):
    """Two updates of train_ppo.py with a separate critic at bf16: sampling, scoring and both optimizers in bf16;
    the final checkpoints (policy and critic) are fp32 files that load."""
    seen = watch_dtypes(monkeypatch, train_ppo)
    train_ppo.main(ppo(tiny_run, ppo_dirs, out_dir=str(tmp_path / "ppo"), n_updates=2, critic="separate",
                       **BF16))
    assert len(seen) == 2 * 2 * 2 * 2 and all(s == ({torch.bfloat16}, {torch.bfloat16}) for s in seen)
    assert all(torch.isfinite(torch.tensor(v)) for v in log(tmp_path / "ppo", "ppo/pg_loss"))
    for d in (tmp_path / "ppo", tmp_path / "ppo" / "critic"):
        assert all(t.dtype == torch.float32 for t in weights(d).values())
    load_model(tmp_path / "ppo")


# ----- fp16's loss scaler -----------------------------------------------------------------------------------


def tiny_step_setup(seed=0, sgd=False):
    """A 2-layer net and its optimizer: AdamW as the scripts', or plain SGD, whose step shows the gradient's scale
    (Adam's first step, ±lr, does not)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return model, torch.optim.SGD(model.parameters(), lr=1e-2) if sgd else make_optimizer(model, 1e-2, 0.0)


def loss_of(model):
    x = torch.linspace(-1, 1, 12).view(3, 4)
    return model(x).square().mean()


def test_loss_scaler_steps_like_no_scaler_and_skips_an_overflow():
    plain, plain_opt = tiny_step_setup()
    scaled, scaled_opt = tiny_step_setup()
    scaler = LossScaler(scale=2.0 ** 10, growth_interval=3)
    for step in range(4):
        loss_of(plain).backward()
        loss = loss_of(scaled)
        scaler.scale_loss(loss).backward()
        assert all(torch.equal(b.grad, a.grad * scaler.scale) for a, b in zip(plain.parameters(), scaled.parameters()))
        optimizer_step(plain, plain_opt, 1e-2, 1.0)
        optimizer_step(scaled, scaled_opt, 1e-2, 1.0, losses={"loss": loss.item()}, scaler=scaler)
        for a, b in zip(plain.parameters(), scaled.parameters()):
            assert torch.equal(a, b)  # a power-of-2 scale undone exactly: the same steps
    assert scaler.scale == 2.0 ** 10 * 2  # grown once, after 3 good steps (applied at the 4th scale_loss)
    # an overflow: the step is skipped (weights, moments, step count as they were), no error, the scale halved
    before = [p.clone() for p in scaled.parameters()]
    moments = {k: v.clone() for k, v in scaled_opt.state[scaled[0].weight].items()}
    loss = loss_of(scaled)
    scaler.scale_loss(loss).backward()
    scaled[2].bias.grad.fill_(float("inf"))
    norm = optimizer_step(scaled, scaled_opt, 1e-2, 1.0, losses={"loss": loss.item()}, scaler=scaler)
    assert norm == float("inf") and all(p.grad is None for p in scaled.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, scaled.parameters()))
    assert all(torch.equal(v, scaled_opt.state[scaled[0].weight][k]) for k, v in moments.items())
    scaler.scale_loss(loss_of(scaled))
    assert scaler.scale == 2.0 ** 10 and scaler.good == 0
    # without a scaler the same overflow stops the run, as in fp32
    loss_of(plain).backward()
    plain[2].bias.grad.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        optimizer_step(plain, plain_opt, 1e-2, 1.0)


def test_loss_scaler_stops_on_a_non_finite_loss_or_at_scale_one():
    model, opt = tiny_step_setup()
    scaler = LossScaler(scale=2.0)
    loss = loss_of(model)
    scaler.scale_loss(loss).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):  # a NaN loss is no overflow of the scaling
        optimizer_step(model, opt, 1e-2, 1.0, losses={"loss": float("nan")}, scaler=scaler)
    loss = loss_of(model)
    scaler.scale_loss(loss).backward()
    model[0].weight.grad[0, 0] = float("inf")
    optimizer_step(model, opt, 1e-2, 1.0, losses={"loss": loss.item()}, scaler=scaler)  # skipped: 2 -> 1
    scaler.scale_loss(loss_of(model)).backward()
    assert scaler.scale == 1.0
    model[0].weight.grad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError):  # at scale 1 the gradient itself is non-finite
        optimizer_step(model, opt, 1e-2, 1.0, losses={"loss": 1.0}, scaler=scaler)


def test_loss_scale_changes_between_steps_only():
    """Micro-batches of one step share its scale, and so do two optimizers stepping on one backward (PPO's
    policy and critic): an overflow in the first halves the scale for the next backward, not for the second."""
    a, opt_a = tiny_step_setup(0, sgd=True)
    b, opt_b = tiny_step_setup(1, sgd=True)
    scaler = LossScaler(scale=2.0 ** 8)
    scaler.scale_loss(loss_of(a) + loss_of(b)).backward()
    scaler.scale_loss(loss_of(a) + loss_of(b)).backward()  # a second micro-batch
    assert scaler.scale == 2.0 ** 8
    a[0].bias.grad.fill_(float("inf"))
    b_grad = b[0].weight.grad.clone()
    b_before = b[0].weight.detach().clone()
    optimizer_step(a, opt_a, 1e-2, 0.0, losses={"loss": 1.0}, scaler=scaler)  # skipped
    optimizer_step(b, opt_b, 1e-2, 0.0, losses={"loss": 1.0}, scaler=scaler)  # steps, unscaled by 2^8
    assert torch.equal(b[0].weight, b_before - 1e-2 * (b_grad / 2.0 ** 8))
    scaler.scale_loss(loss_of(a))
    assert scaler.scale == 2.0 ** 7


def test_fp16_autocast_path_on_cpu_matches_fp32_and_skips_overflows(tiny_run):
    """fp16's whole path (fp32 master weights, autocast forwards, the scaled loss, skipped overflows) through
    train_sft.sft_step, on the CPU by building the context by hand (the scripts refuse fp16 there: slow, and
    CUDA is what it is for). At the default scale (2^16) it takes fp32's steps within fp16's precision (11
    significant bits: LOSS_RTOL holds with room); from 2^22 the first steps' gradients overflow fp16, so they are
    skipped and the scale halved until they fit, then it trains."""
    tok = load_model(tiny_run / "init")[1]
    examples = [train_sft.encode_example(tok, r["prompt"], r["completion"], 48, r["where"])
                for r in read_jsonl(tiny_run / "data" / "sft.jsonl", "sft")[:8]]
    cfg = train_sft.Config(batch_size=8, micro_batch_size=4, max_steps=12, warmup_steps=1, lr=1e-2)
    runs = {}
    for name, dtype, scaler in (("fp32", torch.float32, None), ("fp16", torch.float16, LossScaler()),
                                ("fp16 from 2^22", torch.float16, LossScaler(scale=2.0 ** 22))):
        proc = Process(0, 1, torch.device("cpu"), dtype, scaler)
        policy = wrap_model(load_model(tiny_run / "init")[0], proc)
        optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay)
        runs[name] = [train_sft.sft_step(policy, optimizer, examples, tok.pad_id, step, cfg, proc)[0]
                      for step in range(cfg.max_steps)]
        if scaler is not None:
            assert {p.dtype for p in policy.parameters()} == {torch.float32}  # master weights
            assert policy(torch.tensor([examples[0][0]])).dtype == torch.float16  # the forward under autocast
    fp32, fp16, high = ([m["loss"] for m in runs[k]] for k in ("fp32", "fp16", "fp16 from 2^22"))
    assert fp16 == pytest.approx(fp32, rel=LOSS_RTOL) and fp16 != fp32
    assert all(torch.isfinite(torch.tensor(m["grad_norm"])) for m in runs["fp16"])  # 2^16 fits: nothing skipped
    skipped = [not torch.isfinite(torch.tensor(m["grad_norm"])).item() for m in runs["fp16 from 2^22"]]
    n = skipped.index(False)  # the leading overflows (later steps may overflow again as the gradients grow)
    assert 0 < n < 8 and sum(skipped) < cfg.max_steps / 2, skipped
    assert high[:n + 1] == [high[0]] * (n + 1) and high[-1] < 0.85 * high[0]  # no update until the scale fits
    print(f"fp16 vs fp32: loss {max(abs(a - b) / a for a, b in zip(fp32, fp16)):.2e} relative; from 2^22: "
          f"steps skipped {skipped}, loss {high[n]:.3f} -> {high[-1]:.3f}")


def test_bf16_feedback_model_judges_like_fp32(judge_dir):
    """nanoalign.rlaif's comparison log-odds (a KV-cached query pass, then both options) from a bf16 feedback
    model: those of fp32 to within a fifth of their spread across the queries (measured: 1e-3 apart, spread
    0.029), so the bf16 judge ranks comparisons as the fp32 one does."""
    from nanoalign import rlaif
    from nanoalign.world import constitution
    model, tok = load_model(judge_dir)
    queries = [constitution.query(f"Where is my {item}, order #{1000 + i}?", "Choose the kinder answer.",
                                  "It ships tomorrow.", "Go away.") for i, item in enumerate(["lamp", "fan"] * 3)]
    fp32 = rlaif.option_logits(model.eval(), tok, queries)
    bf16 = rlaif.option_logits(model.to(torch.bfloat16), tok, queries)
    print(f"feedback log-odds bf16 vs fp32: {(bf16 - fp32).abs().max():.2e} apart, spread {fp32.std():.2e}")
    assert 0 < (bf16 - fp32).abs().max() < 0.2 * fp32.std()
