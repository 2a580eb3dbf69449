"""train_dpo.py end to end on a tiny config: it learns (DPO, KTO on pairs and on thumbs up/down, ORPO with no
reference), the reference cache equals a live reference and is reused, the concatenated chosen + rejected forward
equals two separate forwards, 2 processes take 1 process's steps, and the gold-vs-KL points measure the policy of
their step."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_killed_at, torchrun
import train_dpo
from nanoalign.checkpoint import content_hash, load_model
from nanoalign.data import collate, encode_pairs, read_jsonl
from nanoalign.evaluate import curve_point
from nanoalign.logprobs import linear_logps
from nanoalign.sampling import by_length, model_logps, summed_logps
from tolerances import steps_close

pytestmark = pytest.mark.slow  # whole runs of the script, torchrun: the full suite only



def tiny(tiny_run, data_dir, out, **kw):
    base = dict(data_dir=str(data_dir), out_dir=str(out), init_from=str(tiny_run / "init"),
                cache_dir=str(Path(out).parent / "cache"), beta=0.5, batch_size=8, micro_batch_size=4,
                max_steps=12, warmup_steps=2, lr=3e-3, log_interval=1, ckpt_interval=6, n_eval=0,
                max_new_tokens=16, seed=7)
    return train_dpo.Config(**{**base, **kw})


def log(out, key="loss"):
    return [json.loads(l)[key] for l in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_dpo_learns_and_writes_eval(tiny_run, pairs_dir, tmp_path, monkeypatch):
    import nanoalign.evaluate
    monkeypatch.setattr(nanoalign.evaluate.gold_judge, "judge_many",  # the tiny world has no gold judge
                        lambda prompts, answers: {"gold": float(len(answers)), "failures": {}, "failures_on_intent": {}})
    monkeypatch.setattr(nanoalign.evaluate.gold_judge, "judge", lambda prompt, answer: {"gold": 0.0})
    result = train_dpo.main(tiny(tiny_run, pairs_dir, tmp_path / "dpo", n_eval=4, max_steps=30))
    loss = log(tmp_path / "dpo")
    # log 2: the policy starts as the reference (h = 0); the first step's loss is read after its micro-batches
    assert loss[0] == pytest.approx(0.6931, abs=0.02)
    assert loss[-1] < 0.3 * loss[0]
    assert log(tmp_path / "dpo", "rewards/accuracies")[-1] == 1.0
    assert json.loads((tmp_path / "dpo" / "eval.json").read_text()) == result
    assert result["gold"] == result["sft_gold"] == 4.0 and result["kl"] > 0


@pytest.mark.parametrize("kw", [dict(loss_type="kto"), dict(loss_type="kto", feedback_file="feedback.jsonl"),
                                dict(loss_type="orpo", beta=0.1)], ids=["kto_pairs", "kto_feedback", "orpo"])
def test_kto_and_orpo_learn_and_write_eval(tiny_run, pairs_dir, tmp_path, monkeypatch, kw):
    """Their loss falls, eval.json is written; KTO logs its reference point, which training moves above 0; ORPO
    loads no reference model (one load_model here, the policy's), builds no reference cache, and its chosen answers'
    likelihood rises (its SFT term)."""
    import nanoalign.evaluate
    monkeypatch.setattr(nanoalign.evaluate.gold_judge, "judge_many",  # the tiny world has no gold judge
                        lambda prompts, answers: {"gold": float(len(answers)), "failures": {}, "failures_on_intent": {}})
    monkeypatch.setattr(nanoalign.evaluate.gold_judge, "judge", lambda prompt, answer: {"gold": 0.0})
    loads = []
    monkeypatch.setattr(train_dpo, "load_model", lambda *a, **k: loads.append(a) or load_model(*a, **k))
    if kw["loss_type"] == "orpo":
        def refuse(*a, **k):
            raise AssertionError("ORPO must not build a reference cache")
        monkeypatch.setattr(train_dpo, "reference_cache", refuse)
        monkeypatch.setattr(train_dpo, "sequence_logps", refuse)
    result = train_dpo.main(tiny(tiny_run, pairs_dir, tmp_path / "run", n_eval=4, max_steps=30, **kw))
    loss = log(tmp_path / "run")
    assert loss[-1] < 0.8 * loss[0]
    assert json.loads((tmp_path / "run" / "eval.json").read_text()) == result and result["kl"] > 0
    cache = tmp_path / "cache"
    if kw["loss_type"] == "kto":
        assert log(tmp_path / "run", "kl")[0] == pytest.approx(0.0, abs=1e-4)  # policy = reference: z₀ ~ 0
        assert max(log(tmp_path / "run", "kl")) > 0.01 and len(loads) == 2 and len(list(cache.iterdir())) == 1
    else:
        assert len(loads) == 1 and not cache.exists()
        chosen = log(tmp_path / "run", "logps/chosen")
        assert chosen[-1] > chosen[0]
    if kw.get("feedback_file"):
        assert {"rewards/desirable", "rewards/undesirable"} <= set(json.loads(
            (tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1]))


def test_bad_feedback_names_file_line_and_field(tiny_run, pairs_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    lines = (pairs_dir / "feedback.jsonl").read_text().splitlines(keepends=True)
    (data / "feedback.jsonl").write_text("".join(lines[:2]) + lines[2].replace("true", '"yes"'))
    with pytest.raises(ValueError, match=r"feedback.jsonl:3: field 'label' must be true \(a thumbs up\)"):
        train_dpo.main(tiny(tiny_run, data, tmp_path / "run", loss_type="kto", feedback_file="feedback.jsonl"))
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_reference_cache_equals_live_and_is_reused(tiny_run, pairs_dir, tmp_path, monkeypatch):
    cfg = tiny(tiny_run, pairs_dir, tmp_path / "a", max_steps=4)
    train_dpo.main(cfg)
    (cache,) = (tmp_path / "cache").glob("ref_logps-*.safetensors")
    mtime = cache.stat().st_mtime_ns

    # live, written apart from the batched path: one unpadded forward per sequence, the response tokens'
    # log-softmax entries summed in float64
    reference, tok = load_model(cfg.init_from)
    seqs, _, _ = encode_pairs(tok, read_jsonl(pairs_dir / "pairs.jsonl"), reference.config.block_size)
    live = []
    with torch.no_grad():
        for ids, n_prompt in seqs:
            logp = reference.eval()(torch.tensor([ids]))[0].double().log_softmax(-1)  # [T, V]
            live.append(sum(logp[t - 1, ids[t]].item() for t in range(n_prompt, len(ids))))
    cached = load_file(cache)["logps"]
    assert cached.dtype == torch.float32 and cached.shape == (len(seqs),)
    # fp32 log-probs, each a few u of |z| + |logsumexp| (~2x its size) off, summed over <= 48 tokens of one sign:
    # the sum (~-100) is off by as much relative, ~1e-6; rel 1e-5
    assert cached.double() == pytest.approx(torch.tensor(live, dtype=torch.float64), rel=1e-5, abs=1e-6)

    # a second run reads the file and never runs the reference forward
    calls = []
    monkeypatch.setattr(train_dpo, "sequence_logps", lambda *a, **k: calls.append(1))
    train_dpo.main(tiny(tiny_run, pairs_dir, tmp_path / "b", max_steps=4))
    assert calls == [] and cache.stat().st_mtime_ns == mtime
    assert log(tmp_path / "b") == log(tmp_path / "a")

    # the live reference forward in the training batch gives the same run up to float rounding (a row's
    # padded length differs between the cache's length-sorted batches and the training batch)
    train_dpo.main(tiny(tiny_run, pairs_dir, tmp_path / "c", max_steps=4, ref_cache=False))
    assert log(tmp_path / "c") == pytest.approx(log(tmp_path / "a"), abs=1e-5)  # losses ~0.7: ~1e-6 apart


def test_changed_chat_template_gives_a_new_cache(tiny_run, pairs_dir, tmp_path, monkeypatch):
    """The cache key covers the encoded tokens, so a new template never reuses stale log-probs."""
    import nanoalign.data
    train_dpo.main(tiny(tiny_run, pairs_dir, tmp_path / "a", max_steps=1))
    original = nanoalign.data.render_prompt
    monkeypatch.setattr(nanoalign.data, "render_prompt", lambda prompt: "Customer says: " + original(prompt))
    train_dpo.main(tiny(tiny_run, pairs_dir, tmp_path / "b", max_steps=1))
    assert len(list((tmp_path / "cache").glob("ref_logps-*.safetensors"))) == 2


def test_cache_key_changes_with_data_and_weights(tiny_run):
    reference, tok = load_model(tiny_run / "init")
    state = reference.state_dict()
    data = b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
    key = content_hash(state, data, tok.hash, 48)
    assert key == content_hash(dict(reversed(list(state.items()))), data, tok.hash, 48)  # name order only
    assert key != content_hash(state, data + data, tok.hash, 48)
    assert key != content_hash(state, data, tok.hash, 47)
    nudged = {**state, "transformer.ln_f.bias": state["transformer.ln_f.bias"] + 1e-7}
    assert key != content_hash(nudged, data, tok.hash, 48)


def test_changed_data_file_gives_a_new_cache(tiny_run, pairs_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    lines = (pairs_dir / "pairs.jsonl").read_text().splitlines(keepends=True)
    (data / "sft_test.jsonl").write_text((pairs_dir / "sft_test.jsonl").read_text())
    for i, n in enumerate((64, 63)):
        (data / "pairs.jsonl").write_text("".join(lines[:n]))
        train_dpo.main(tiny(tiny_run, data, tmp_path / f"run{i}", max_steps=1))
    assert len(list((tmp_path / "cache").glob("ref_logps-*.safetensors"))) == 2


def test_concatenated_forward_equals_separate_forwards(tiny_run, pairs_dir):
    """One [2P, T] forward (chosen rows, then rejected) gives each row the log-prob of its own forward:
    padding to the longer half changes nothing but float rounding (right padding, causal attention)."""
    model, tok = load_model(tiny_run / "init")
    model.eval()
    seqs, chosen, rejected = encode_pairs(tok, read_jsonl(pairs_dir / "pairs.jsonl")[:6], 48)
    with torch.no_grad():
        together = model_logps(model, **collate([seqs[i] for i in chosen + rejected], tok.pad_id)).sum(-1)
        alone_chosen = model_logps(model, **collate([seqs[i] for i in chosen], tok.pad_id)).sum(-1)
        alone_rejected = model_logps(model, **collate([seqs[i] for i in rejected], tok.pad_id)).sum(-1)
    assert max(len(seqs[i][0]) for i in chosen) != max(len(seqs[i][0]) for i in rejected)  # padded differently
    # fp32 sums of <= 48 log-probs of one sign (~-100): as relative as each term's rounding, ~1e-6
    assert torch.allclose(together[:6], alone_chosen, atol=1e-6, rtol=1e-5)
    assert torch.allclose(together[6:], alone_rejected, atol=1e-6, rtol=1e-5)


def test_length_sorted_forwards_keep_each_rows_log_prob_and_order(tiny_run, pairs_dir):
    """`summed_logps` forwards rows sorted by length in chunks and returns them in the given order: chunks of 5
    or 1 give each row the log-prob of one forward of all 12 rows, and each chunk is padded to its own longest."""
    model, tok = load_model(tiny_run / "init")
    model.eval()
    seqs, chosen, rejected = encode_pairs(tok, read_jsonl(pairs_dir / "pairs.jsonl")[:6], 48)
    rows = [seqs[i] for i in chosen + rejected]
    with torch.no_grad():
        one = model_logps(model, **collate(rows, tok.pad_id)).sum(-1)
        for n in (5, 1):
            # as above: other padding, the same fp32 sums of <= 48 log-probs
            torch.testing.assert_close(summed_logps(model, rows, tok.pad_id, "cpu", n), one, atol=1e-6, rtol=1e-5)
    rows = rows[::-1]  # rejected first: the longest rows (cut at 48 tokens) first
    lengths = sorted(len(ids) for ids, _ in rows)
    assert lengths[4] < len(rows[0][0])  # so chunks in the given order would pad the first five more
    shapes = []

    def record(batch):
        shapes.append(tuple(batch["input_ids"].shape))
        return torch.zeros(len(batch["input_ids"]))

    by_length(rows, tok.pad_id, "cpu", 5, record)
    assert shapes == [(5, lengths[4]), (5, lengths[9]), (2, lengths[11])]  # each chunk padded to its own longest


def test_fused_head_flag_takes_the_fused_path_and_the_same_curve(tiny_run, pairs_dir, tmp_path, monkeypatch):
    """--fused_head=True sends the policy's log-probs through `linear_logps` (2 micro-batches a step), never the
    reference's (its cache is built by the plain head), and follows the plain head's curve to float rounding."""
    import nanoalign.model
    calls = []
    monkeypatch.setattr(nanoalign.model, "linear_logps", lambda *a: calls.append(1) or linear_logps(*a))
    train_dpo.main(tiny(tiny_run, pairs_dir, tmp_path / "plain", max_steps=4))
    assert not calls
    train_dpo.main(tiny(tiny_run, pairs_dir, tmp_path / "fused", max_steps=4, fused_head=True,
                        cache_dir=str(tmp_path / "cache_fused")))
    assert len(calls) == 8
    # fp32 steps ~1e-6 relative apart (tolerances.steps_close): the losses (~0.7) ~1e-6
    assert log(tmp_path / "fused") == pytest.approx(log(tmp_path / "plain"), abs=1e-5)


def test_resume_continues_the_same_loss_curve(tiny_run, pairs_dir, tmp_path, monkeypatch):
    train_dpo.main(tiny(tiny_run, pairs_dir, tmp_path / "full"))
    # killed after the step-6 checkpoint, before the step-12 one
    run_killed_at(train_dpo.main, tiny(tiny_run, pairs_dir, tmp_path / "cut"), 9, monkeypatch)
    train_dpo.main(tiny(tiny_run, pairs_dir, tmp_path / "cut", resume=True))
    assert log(tmp_path / "cut") == pytest.approx(log(tmp_path / "full"), abs=1e-6)  # same kernels and numbers


@pytest.mark.parametrize("kw", [{}, dict(loss_type="kto", feedback_file="feedback.jsonl", beta=1.0)],
                         ids=["dpo", "kto_feedback"])
def test_two_process_fsdp_matches_single_process(tiny_run, pairs_dir, tmp_path, kw):
    """2 gloo processes with FSDP2 (each 1 micro-batch of 4 pairs, forwarded in length-sorted chunks of 3, 3 and
    2 rows, through the fused LM head) == 1 process (2 micro-batches of 4, the plain head), same global batch
    of 8; rank 0 writes the reference cache while rank 1 waits. Only the order of floating-point reductions
    differs: the losses within 1e-5, the weights' steps steps_close (a smaller lr than elsewhere: Adam amplifies
    rounding once gradients vanish). KTO on thumbs up/down (the ranks' shares hold different numbers of each
    label): its reference point z₀ is the global batch's, so each step's z₀, logged as kl, agrees too."""
    train_dpo.main(tiny(tiny_run, pairs_dir, tmp_path / "one", max_steps=4, lr=1e-3, **kw))
    torchrun("train_dpo.py", tiny(tiny_run, pairs_dir, tmp_path / "two", max_steps=4, lr=1e-3, rows_per_forward=3,
                                  fused_head=True, cache_dir=str(tmp_path / "cache2"), **kw))
    assert log(tmp_path / "two") == pytest.approx(log(tmp_path / "one"), abs=1e-5)
    if kw:  # z₀ ~ 1 once the policy moves (fp32 sums of ~-100: ~1e-5 apart); 0 would test nothing
        assert log(tmp_path / "two", "kl") == pytest.approx(log(tmp_path / "one", "kl"), abs=1e-4)
        assert max(log(tmp_path / "one", "kl")) > 0.01
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert steps_close(b, a, load_file(tiny_run / "init" / "model.safetensors"))


def test_curve_points_measure_the_policy_of_their_step(tiny_run, pairs_dir, tmp_path, monkeypatch):
    """--eval_interval=3 logs at step 3 the gold and KL that `evaluate.curve_point` measures on the step-3
    checkpoint read back, and changes nothing in training: the same losses and weights as a run without it."""
    cfg = tiny(tiny_run, pairs_dir, tmp_path / "cut", max_steps=6, ckpt_interval=3, n_eval=4, eval_interval=3)
    run_killed_at(train_dpo.main, cfg, 4, monkeypatch)  # after the step-3 checkpoint
    policy, tok = load_model(tmp_path / "cut")
    expected = curve_point(policy, load_model(tiny_run / "init", tok)[0], tok, pairs_dir, 4, cfg.max_new_tokens,
                           cfg.temperature, cfg.seed)
    logged = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval/kl" in r] == [3] and expected["eval/kl"] > 0
    # the same weights, prompts and seed: the same samples; gold and KL summed over other batch shapes: ulps
    assert {k: v for k, v in logged[2].items() if k.startswith("eval/")} == pytest.approx(expected, abs=1e-6)
    train_dpo.main(replace(cfg, out_dir=str(tmp_path / "curve")))
    train_dpo.main(replace(cfg, out_dir=str(tmp_path / "plain"), n_eval=0, eval_interval=0))
    assert log(tmp_path / "curve") == log(tmp_path / "plain")
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("curve", "plain"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="--eval_interval=3 needs held-out prompts"):
        train_dpo.main(replace(cfg, out_dir=str(tmp_path / "none"), n_eval=0))


def test_two_process_curve_points_match_single_process(tiny_run, pairs_dir, tmp_path):
    """--eval_interval under FSDP2: every rank samples with the gathered weights, rank 0 logs the point of one
    process. Tolerance 1e-4: the weights differ by float rounding only, too little to change a sampled token."""
    cfg = lambda out: tiny(tiny_run, pairs_dir, tmp_path / out, max_steps=4, lr=1e-3, n_eval=4, eval_interval=2,
                           cache_dir=str(tmp_path / f"cache_{out}"))
    train_dpo.main(cfg("one"))
    torchrun("train_dpo.py", cfg("two"))
    points = [[{k: v for k, v in json.loads(line).items() if k.startswith("eval/")}
               for line in (tmp_path / d / "log.jsonl").read_text().splitlines() if "eval/kl" in line]
              for d in ("one", "two")]
    assert len(points[0]) == len(points[1]) == 1 and points[1][0] == pytest.approx(points[0][0], abs=1e-4)  # see above
