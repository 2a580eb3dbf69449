"""train_rm.py on a tiny config: it learns, calls the RM with K rows per prompt, reads the reward at the last
real token, stores a normalisation that consumers reproduce, resumes exactly, and 2 FSDP processes match 1."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_rm
from nanoalign.checkpoint import load_model, load_reward_model
from nanoalign.data import collate, left_pad, read_jsonl
from nanoalign.model import GPT, GPTConfig
from nanoalign.evaluate import pairwise_hits, ranked_above
from nanoalign.sampling import group_rewards, join, reward_scores
from conftest import run_killed_at, tiny_sft_records, torchrun
from tolerances import steps_close

pytestmark = pytest.mark.slow  # whole runs of the script, torchrun: the full suite only

K = 3


def tiny_prefs(n, seed):
    """K = 3 answers per prompt, ranked by a gold score the RM can learn: right > vague > rude."""
    rng = random.Random(seed)
    out = []
    for r in tiny_sft_records(n, seed):
        answers = [r["completion"], "Your order is on its way. Anything else?", "Ugh, read the website."]
        order = rng.sample(range(K), K)  # shuffle the answers so that position says nothing
        gold = [1.0, 0.5, 0.0]
        out.append({"prompt": r["prompt"], "responses": [answers[i] for i in order],
                    "ranking": sorted(range(K), key=lambda j: -gold[order[j]]), "gold": [gold[i] for i in order]})
    return out


@pytest.fixture(scope="module")
def prefs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefs")
    for name, n, seed in (("prefs.jsonl", 64, 0), ("prefs_test.jsonl", 8, 1)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in tiny_prefs(n, seed)))
    return d


def tiny(tiny_run, prefs_dir, out, **kw):
    base = dict(data_dir=str(prefs_dir), out_dir=str(out), init_from=str(tiny_run / "init"), epochs=4,
                batch_size=8, micro_batch_size=4, rows_per_forward=5, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                log_interval=1, n_norm=12, max_new_tokens=8, seed=7)
    return train_rm.Config(**{**base, **kw})


def log(out, key="loss"):
    return [json.loads(l)[key] for l in (Path(out) / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def rm_run(tiny_run, prefs_dir, tmp_path_factory):
    """One default-shaped run, watched: every GPT forward (rows, grad on?, output) and the sampler's batches."""
    out = tmp_path_factory.mktemp("rm") / "rm"
    calls, batches = [], []
    real_forward, real_sample = GPT.forward, train_rm.sample_answers

    def counting_forward(self, idx, *args, **kwargs):
        calls.append((idx.shape[0], torch.is_grad_enabled(), kwargs.get("output", "logits")))
        return real_forward(self, idx, *args, **kwargs)

    def recording_sample(*args, **kwargs):
        answers, out_batches = real_sample(*args, **kwargs)
        batches.extend(out_batches)
        return answers, out_batches

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GPT, "forward", counting_forward)
        mp.setattr(train_rm, "sample_answers", recording_sample)
        result = train_rm.main(tiny(tiny_run, prefs_dir, out))
    return {"out": out, "result": result, "calls": calls, "batches": batches}


def test_rm_learns_and_writes_eval(rm_run):
    curve = log(rm_run["out"])
    assert len(curve) == 4 * 64 // 8
    assert sum(curve[-4:]) < 0.5 * sum(curve[:4])  # ln 2 ~ 0.69 at the start: the head is nearly flat
    result = json.loads((rm_run["out"] / "eval.json").read_text())
    assert result == rm_run["result"]
    assert {"accuracy", "bayes_ceiling", "n_pairs", "accuracy_vs_gold", "realised_ceiling", "loss"} <= result.keys()
    assert result["n_pairs"] == 8 * K * (K - 1) // 2
    assert result["realised_ceiling"] == 1.0  # the tiny labels are noise-free
    assert result["accuracy"] > 0.8


def test_rm_calibration_error_by_hand(rm_run, prefs_dir):
    """The expected calibration error of σ(r_i - r_j) for "i ranked above j", each test pair once, in ten bins of
    width 0.1, recomputed with a loop from the saved RM's raw rewards."""
    model, tok = load_model(rm_run["out"], scalar_head=True, kinds=("reward_model",))
    bins = [[] for _ in range(10)]
    with torch.no_grad():
        for rec in read_jsonl(prefs_dir / "prefs_test.jsonl", "prefs"):
            rows = [train_rm.encode_example(tok, rec["prompt"], a, model.config.block_size) for a in rec["responses"]]
            r = [reward_scores(model, torch.tensor([ids]), torch.ones(1, len(ids))).item() for ids, _ in rows]
            rank = {answer: place for place, answer in enumerate(rec["ranking"])}
            for i in range(K):
                for j in range(i + 1, K):
                    p = 1 / (1 + math.exp(r[j] - r[i]))
                    bins[min(int(p * 10), 9)].append((p, float(rank[i] < rank[j])))
    n = sum(len(b) for b in bins)
    ece = sum(abs(sum(p for p, _ in b) - sum(y for _, y in b)) for b in bins) / n
    # the same fp32 rewards through another forward (batch shape), then float64 bin sums of <= 48 probabilities
    # ~0.5: a reward ~1e-6 off moves p by < 1e-6, and the ECE by as much (a p crossing a bin edge: not at 1e-6)
    assert rm_run["result"]["calibration_error"] == pytest.approx(ece, abs=1e-5)
    table = [v for b, x in enumerate(bins) if x  # the reliability table the report draws
             for v in (b / 10, len(x), sum(p for p, _ in x) / len(x), sum(y for _, y in x) / len(x))]
    assert [v for r in rm_run["result"]["reliability"] for v in (r["bin"][0], r["n"], r["mean_p"], r["rate"])] == \
        pytest.approx(table, abs=1e-5)  # as above


def test_rm_with_no_full_batch_is_an_error(tiny_run, prefs_dir, tmp_path):
    with pytest.raises(SystemExit, match="64 training records hold no full batch of --batch_size=65"):
        train_rm.main(tiny(tiny_run, prefs_dir, tmp_path / "rm", batch_size=65, micro_batch_size=0))


def test_rm_sees_exactly_k_rows_per_prompt(rm_run):
    """InstructGPT §3.5: K rows per prompt, not 2·C(K,2) rows of separate pairs. Training
    forwards are the ones with gradients on: 32 steps x 2 micro-batches of 4 prompts = 12 rows, forwarded in
    length-sorted chunks of 5, 5 and 2 rows."""
    training = [(rows, output) for rows, grad, output in rm_run["calls"] if grad]
    assert training == [(5, "scalar"), (5, "scalar"), (2, "scalar")] * (32 * 2)


def test_length_sorted_chunks_change_no_reward(tiny_run, prefs_dir):
    """Rows sorted by length and forwarded in chunks of 5 or 1 get the rewards of one forward of all 24 rows."""
    model, tok = load_model(tiny_run / "init", scalar_head=True)
    groups = [train_rm.encode_group(tok, r, model.config.block_size)
              for r in read_jsonl(prefs_dir / "prefs_test.jsonl", "prefs")]
    with torch.no_grad():
        one, *chunked = (group_rewards(model, groups, tok.pad_id, torch.device("cpu"), n) for n in (99, 5, 1))
    assert one.shape == (8, K)
    for rewards in chunked:
        # fp32, other padding: attention and layer sums of <= 48 terms round apart, a few u of rewards ~1
        torch.testing.assert_close(rewards, one, atol=1e-5, rtol=1e-5)


def test_pairwise_hits_counts_each_ranked_pair_once_and_half_a_tie():
    ranking = torch.tensor([[2, 0, 1], [0, 1, 2]])  # best first
    above = ranked_above(ranking)
    pairs = {(i, j) for i in range(3) for j in range(3) if above[0, i, j]}
    assert pairs == {(2, 0), (2, 1), (0, 1)} and above[1].tolist() == [[0, 1, 1], [0, 0, 1], [0, 0, 0]]
    scores = torch.tensor([[0.5, 0.5, 2.0], [1.0, 3.0, 0.0]])
    # row 0: 2>0 hit, 2>1 hit, 0~1 tie; row 1: 0<1 miss, 0>2 hit, 1>2 hit
    hits, margins, n = pairwise_hits(scores, above)
    assert (hits, n) == (2 + 0.5 + 0 + 1 + 1, 6)
    assert margins == pytest.approx((1.5 + 1.5 + 0.0) + (-2.0 + 1.0 + 3.0))  # dyadic fp32 numbers: exact sums


def test_reward_is_read_at_the_last_real_token():
    """Right-padded, left-padded and unpadded rows give the same reward; reading the last
    column instead would read a PAD slot and fail."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=2, n_head=2, n_embd=32, scalar_head=True)).eval()
    seqs = [[3, 5, 7, 9, 2], [4, 6, 8, 10, 12, 14, 16, 2], [11, 13, 2]]
    with torch.no_grad():
        right = collate([(s, 1) for s in seqs], pad_id=1)
        r_right = reward_scores(model, right["input_ids"], right["attention_mask"])
        r_left = reward_scores(model, *left_pad(seqs, pad_id=1))
        r_alone = torch.cat([reward_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                             for s in seqs])
        r_last_column = model(right["input_ids"], attention_mask=right["attention_mask"], output="scalar")[:, -1]
    # fp32, padded and unpadded attention sum different numbers of terms (<= 8): a few u of rewards ~1
    torch.testing.assert_close(r_right, r_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r_left, r_alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(r_last_column, r_alone, atol=1e-3)  # a PAD slot's reward is another number


def test_consumer_reproduces_the_normalisation(rm_run):
    """Ziegler et al. 2019 §2: load_reward_model + reward_scores on the SFT samples the script fitted on
    give mean 0 and std 1 (population std, as fitted), and the raw rewards do not."""
    model, tok, gain, bias = load_reward_model(rm_run["out"])
    assert json.loads((rm_run["out"] / "config.json").read_text())["reward_norm"] == {"gain": gain, "bias": bias}
    with torch.no_grad():
        rows = [join(b) for b in rm_run["batches"]]  # prompt + response, as PPO's rollout scores them
        scores = [torch.cat([reward_scores(model, r.ids, r.attn, g, c) for r in rows])
                  for g, c in ((gain, bias), (1.0, 0.0))]
    normalised, raw = scores
    assert len(normalised) == 12
    # fp32 rewards (|raw| ~ 1/gain) through the same forwards as the fit, gain·r + bias in fp32: ~1e-6 of 1
    assert abs(normalised.mean().item()) < 1e-5 and abs(normalised.std(correction=0).item() - 1) < 1e-5
    assert abs(raw.mean().item()) > 1e-3 or abs(raw.std(correction=0).item() - 1) > 1e-3


def test_plackett_luce_option_learns(tiny_run, prefs_dir, tmp_path):
    result = train_rm.main(tiny(tiny_run, prefs_dir, tmp_path / "pl", loss="plackett_luce", epochs=2, n_norm=4))
    curve = log(tmp_path / "pl")
    assert sum(curve[-4:]) < 0.5 * sum(curve[:4]) and result["accuracy"] > 0.8


def test_best_of_k_option_learns_and_held_out_evaluations_are_logged(tiny_run, prefs_dir, tmp_path):
    """--loss=best_of_k learns; --eval_interval logs the held-out loss and accuracy, and the last one (after the
    last step) equals eval.json's, measured on the final weights; the reliability table counts each pair once."""
    out = tmp_path / "bok"
    result = train_rm.main(tiny(tiny_run, prefs_dir, out, loss="best_of_k", epochs=2, n_norm=4, eval_interval=8))
    curve = log(out)
    assert sum(curve[-4:]) < 0.5 * sum(curve[:4]) and result["accuracy"] > 0.6
    evals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [8, 16]  # 64 prompts / 8 per step: one evaluation per epoch
    assert evals[-1]["eval/loss"] == pytest.approx(result["loss"], abs=1e-6)  # the same weights and forwards
    assert evals[-1]["eval/accuracy"] == pytest.approx(result["accuracy"])
    assert evals[0]["eval/loss"] != evals[-1]["eval/loss"]
    assert sum(row["n"] for row in result["reliability"]) == result["n_pairs"] == 8 * 3


def test_soft_labelled_pairs_and_their_errors(tiny_run, prefs_dir, tmp_path):
    """--data=pairs reads an optional per-pair probability p; a p outside [0, 1] is rejected naming file, line,
    field, before anything is written."""
    pairs = [{"prompt": r["prompt"], "chosen": r["responses"][r["ranking"][0]],
              "rejected": r["responses"][r["ranking"][-1]], "p": 0.9} for r in tiny_prefs(16, 2)]
    data = tmp_path / "data"
    data.mkdir()
    for name in ("prefs.jsonl", "prefs_test.jsonl"):
        (data / name).write_text((prefs_dir / name).read_text())
    (data / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    result = train_rm.main(tiny(tiny_run, data, tmp_path / "soft", data="pairs", epochs=2, n_norm=4))
    assert log(tmp_path / "soft")[-1] < log(tmp_path / "soft")[0] and 0 <= result["accuracy"] <= 1
    pairs[3]["p"] = 1.5
    (data / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    with pytest.raises(ValueError, match=r"pairs.jsonl:4: field 'p'"):
        train_rm.main(tiny(tiny_run, data, tmp_path / "bad", data="pairs"))
    assert not (tmp_path / "bad").exists()


def test_two_process_fsdp_matches_single_process(tiny_run, prefs_dir, tmp_path):
    """2 gloo processes with FSDP2 (each 1 micro-batch of 4 prompts) == 1 process (2 micro-batches of 4), same
    global batch of 8 prompts (24 rows). Only the order of floating-point reductions differs: the losses within
    1e-5, the weights' steps steps_close (whose margin covers the output biases, moved by rounding alone)."""
    train_rm.main(tiny(tiny_run, prefs_dir, tmp_path / "one", epochs=1, n_norm=4))
    torchrun("train_rm.py", tiny(tiny_run, prefs_dir, tmp_path / "two", epochs=1, n_norm=4))
    assert log(tmp_path / "two") == pytest.approx(log(tmp_path / "one"), abs=1e-5)
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert "scalar_head.weight" in a
    # the head, drawn from the seed, starts the same in both: taken as 0 there
    assert steps_close(b, a, load_file(tiny_run / "init" / "model.safetensors"))


def test_resume_continues_the_same_loss_curve(tiny_run, prefs_dir, tmp_path, monkeypatch):
    """Killed after the step-6 checkpoint and resumed: the same loss curve, weights and normalised result as a
    run never stopped (16 steps, checkpoints every 6)."""
    cfg = dict(epochs=2, ckpt_interval=6)
    full = train_rm.main(tiny(tiny_run, prefs_dir, tmp_path / "full", **cfg))
    run_killed_at(train_rm.main, tiny(tiny_run, prefs_dir, tmp_path / "cut", **cfg), 9, monkeypatch)
    assert len(log(tmp_path / "cut")) == 9
    resumed = train_rm.main(tiny(tiny_run, prefs_dir, tmp_path / "cut", resume=True, **cfg))
    # the same kernels on the same checkpointed numbers: a few ulps at most
    assert log(tmp_path / "cut") == pytest.approx(log(tmp_path / "full"), abs=1e-6)
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "cut"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert resumed["reward_norm"] == pytest.approx(full["reward_norm"], rel=1e-5)  # gain, bias: fp32 statistics
    assert resumed["accuracy"] == full["accuracy"]
    assert not (tmp_path / "cut" / "resume.safetensors").exists()  # the final checkpoint is a plain RM
    with pytest.raises(FileNotFoundError, match="resume.safetensors: missing"):  # nothing left to resume
        train_rm.main(tiny(tiny_run, prefs_dir, tmp_path / "cut", resume=True, **cfg))
