"""RLAIF (nanoalign.world.constitution, nanoalign.rlaif): the constitution, the comparison query and its option
log-probs, order averaging, label modes, the measurements, the judging corpus, and the labelling pass end to end
(feedback model and synthetic labeller), its pairs consumed by train_rm.py and train_dpo.py."""
import json
import math
import random
from itertools import islice

import pytest
import torch

import train_dpo
import train_rm
from nanoalign import rlaif
from nanoalign.checkpoint import load_model
from nanoalign.data import read_jsonl
from nanoalign.evaluate import calibration
from nanoalign.tokenizer import Tokenizer
from nanoalign.world import constitution, gold_judge, helpdesk

pytestmark = pytest.mark.slow  # RLAIF passes end to end: the full suite only


def test_the_packaged_constitution():
    principles = constitution.read_constitution()
    assert len(principles) >= 8 and len({p.text for p in principles}) == len(principles)
    assert {p.score for p in principles} == set(constitution.SCORES)  # every gold score is taught by some principle


@pytest.fixture(scope="module")
def judge(judge_dir):
    model, tok = load_model(judge_dir)
    return model.double().eval(), tok


@pytest.mark.parametrize("lines,match", [
    (["helpful: a", "kind: b"], r"c.txt:2: expected '<score>: <instruction>'"),
    (["helpful: a", "honest:"], r"c.txt:2: empty principle"),
    (["helpful: Be useful.", "# note", "honest: be useful."], r"c.txt:3: duplicate principle, first at line 1"),
    (["# nothing", "", "gold: x"], r"1 principle\(s\)"),
    (["no colon here", "gold: x"], r"c.txt:1: expected"),
])
def test_bad_constitutions(tmp_path, lines, match):
    path = tmp_path / "c.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match):
        constitution.read_constitution(path)


def test_options_must_split_alike(judge):
    from tokenizers import Tokenizer as HFTokenizer, models, trainers
    bpe = HFTokenizer(models.BPE())  # no pre-tokenizer: "(A)" can merge into one token while "(B)" stays three
    bpe.train_from_iterator(["(A)"] * 50 + ["(B"], trainers.BpeTrainer(vocab_size=12, show_progress=False))
    with pytest.raises(ValueError, match="splits the options differently"):
        constitution.option_ids(Tokenizer(bpe))
    a, b = constitution.option_ids(judge[1])  # a byte-level BPE splits them alike
    assert len(a) == len(b) and a[-1] == judge[1].eos_id


def test_option_logits_equal_unbatched_float64_log_probs(judge):
    """S("(A)"|q) - S("(B)"|q) from each query's own unpadded forward, token by token, EOS included."""
    model, tok = judge
    queries = [constitution.query("Where is my lamp?", "Choose the kinder answer.", "It ships.", "Go away."),
               constitution.query("Hi", "Choose the shorter answer.", "Hello there, how can I help you today?", "Hi.")]
    got = rlaif.option_logits(model, tok, queries, batch_size=2)
    for q, logit in zip(queries, got.tolist()):
        prompt = tok.encode_prompt(q)
        s = []
        for option in constitution.OPTIONS:
            ids = prompt + tok.encode_response(option)
            logits = model(torch.tensor([ids]))[0].double()
            s.append(sum((logits[t - 1].log_softmax(-1)[ids[t]]).item() for t in range(len(prompt), len(ids))))
        assert logit == pytest.approx(s[0] - s[1], abs=1e-9)  # a float64 judge: summation order, ~1e-14


def test_both_orders_share_one_forward_and_the_options_one_query_pass(judge):
    model, tok = judge
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    try:
        items = [("Where is my lamp?", "Choose the kinder answer.", "It ships.", "Go away.")] * 3
        pref = rlaif.model_preferences(model, tok, items, batch_size=3)
    finally:
        handle.remove()
    # one forward reads the 6 queries (3 comparisons x 2 orders) into the KV cache, one more the 12 options
    # (x 2) after them: every option token but the last, whose logits would score nothing
    L = len(constitution.option_ids(tok)[0])
    assert [tuple(c) for c in calls] == [(6, calls[0][1]), (12, L - 1)]
    swapped = rlaif.model_preferences(model, tok, [(p, pr, b, a) for p, pr, a, b in items], batch_size=3)
    assert swapped["p_ab"].tolist() == pytest.approx(pref["p_ba"].tolist(), abs=1e-12)  # the same queries


def test_order_averaging_cancels_an_additive_position_bias():
    """With slot-A log-odds d + b, ½[σ(d + b) + 1 - σ(-d + b)] is ½ exactly at d = 0 and keeps the sign of d;
    one order alone is biased toward slot A."""
    g = torch.Generator().manual_seed(0)
    s1, s2 = torch.tensor([0.5, 0.9, 0.2]), torch.tensor([0.5, 0.1, 0.4])
    pref = rlaif.synthetic_preferences(s1, s2, kappa=5.0, noise=0.0, position_bias=1.5, generator=g)
    both, one = rlaif.combine(pref["p_ab"], pref["p_ba"]), rlaif.combine(pref["p_ab"], pref["p_ba"], False)
    assert both[0].item() == 0.5 and both[1] > 0.5 and both[2] < 0.5
    # fp32 σ of a hand value: a few u (≈ 1e-7) relative, under pytest.approx's default rel 1e-6
    assert one[0].item() == pytest.approx(1 / (1 + math.exp(-1.5))) and one[2] > 0.5  # the bias flips pair 3
    noisy = rlaif.synthetic_preferences(s1.repeat(4000), s2.repeat(4000), 5.0, 1.0, 0.0, g)
    assert noisy["p_ab"].view(-1, 3)[:, 1].mean() > 0.9  # noise spreads the labels, the sign holds on average


def test_label_modes_and_measurements_by_hand():
    # float64 (or fp32 inputs such as 0.9 rounded once: 3e-8 relative) against hand values after a few ops: the
    # default rel 1e-6 of pytest.approx holds and catches any wrong coefficient
    P = torch.tensor([0.9, 0.3, 0.5, 0.65], dtype=torch.float64)
    assert rlaif.label(P, "hard").tolist() == [1.0, 0.0, 0.5, 1.0]
    assert rlaif.label(P, "clamped").tolist() == pytest.approx([0.6, 0.4, 0.5, 0.6])
    assert rlaif.label(P, "soft") is P
    with pytest.raises(ValueError, match="unknown label mode"):
        rlaif.label(P, "fuzzy")
    g1, g2 = torch.tensor([0.8, 0.8, 0.1, 0.4, 0.3]).double(), torch.tensor([0.2, 0.1, 0.5, 0.4, 0.9]).double()
    P = torch.tensor([0.9, 0.3, 0.5, 0.7, 0.2], dtype=torch.float64)
    # gold differs on pairs 0, 1, 2, 4: right, wrong, half (P = ½), right
    assert rlaif.agreement(P, g1, g2) == pytest.approx(2.5 / 4)
    assert rlaif.log_loss(P, g1, g2) == pytest.approx(-(math.log(0.9) + math.log(0.3) + math.log(0.5)
                                                        + math.log(0.8)) / 4)
    quality = rlaif.label_quality(P, g1, g2)  # pair 3 (a gold tie) is left out of the calibration
    assert quality["agreement"] == rlaif.agreement(P, g1, g2) and quality["log_loss"] == rlaif.log_loss(P, g1, g2)
    assert [(r["n"], r["mean_p"], r["rate"]) for r in quality["calibration"]["table"]] == \
        [(1, 0.2, 0.0), (1, 0.3, 1.0), (1, 0.5, 0.0), (1, 0.9, 1.0)]  # y1 is the gold-better answer in pairs 0, 1
    assert quality["calibration"]["error"] == pytest.approx((0.2 + 0.7 + 0.5 + 0.1) / 4)
    two = calibration(torch.tensor([0.9, 0.3, 0.5, 0.2]), torch.tensor([1, 1, 0, 0]), bins=2)
    assert two["table"] == [{"bin": [0.0, 0.5], "n": 2, "mean_p": pytest.approx(0.25), "rate": 0.5},
                            {"bin": [0.5, 1.0], "n": 2, "mean_p": pytest.approx(0.7), "rate": 0.5}]
    assert two["error"] == pytest.approx((2 * 0.25 + 2 * 0.2) / 4)
    assert rlaif.per_pair(torch.tensor([1.0, 0.0, 0.4]), torch.tensor([0, 0, 1]), 2).tolist() == \
        pytest.approx([0.5, 0.4])


def test_judging_corpus_verdicts_follow_their_principle(tmp_path):
    principles = constitution.read_constitution()
    records = constitution.judge_corpus(principles, helpdesk.prompt_stream("t"), 90, random.Random(0))
    assert [r["principle"] for r in records] == [p.text for p in principles] * 10  # in turn, balanced
    by_text = {p.text: p.score for p in principles}
    slots = []
    for r in records:
        lines = r["prompt"].split("\n")
        prompt, a, b = lines[0].removeprefix("Customer: "), lines[2][4:], lines[3][4:]
        sa, sb = (constitution.principle_score(by_text[r["principle"]], prompt, y) for y in (a, b))
        assert sa != sb and r["completion"] == constitution.OPTIONS[sa < sb]
        slots.append(r["completion"])
    assert 0.3 < slots.count("(A)") / len(slots) < 0.7  # fair slots: 0.5 ± 0.053 (n = 90), 3.8 standard errors


def test_garble_makes_policy_like_failures():
    rng = random.Random(0)
    prompt = "Where is my order #1234?"
    good = helpdesk.compose(prompt, rng, "correct")
    assert gold_judge.judge(prompt, good)["principles"]["coherent"] == 1.0
    worse = [constitution.garble(good, rng) for _ in range(30)]
    assert all(gold_judge.judge(prompt, w)["gold"] < gold_judge.judge(prompt, good)["gold"] for w in worse if w != good)
    assert sum(w != good for w in worse) >= 25


@pytest.fixture(scope="module")
def rlaif_world(tiny_run, tmp_path_factory):
    """prompts.jsonl and prompts_test.jsonl of helpdesk prompts beside the tiny SFT data."""
    root = tmp_path_factory.mktemp("rlaif")
    prompts = list(islice(helpdesk.prompt_stream(3), 12))
    for name, rows in (("prompts.jsonl", prompts[:10]), ("prompts_test.jsonl", prompts[10:])):
        (root / name).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    return root


@pytest.mark.parametrize("kw", [dict(labeller="model"), dict(labeller="synthetic", principles="ensemble",
                                                                  labels="clamped", order_average=False)])
def test_labelling_pass_writes_pairs_and_eval(tiny_run, judge_dir, rlaif_world, tmp_path, kw):
    cfg = rlaif.Config(data_dir=str(rlaif_world), policy=str(judge_dir), judge=str(judge_dir),
                       out=str(tmp_path / "ai_pairs.jsonl"), eval_dir=str(tmp_path / "eval"), n_prompts=6, k=3,
                       max_new_tokens=6, **kw)
    result = rlaif.main(cfg)
    rows = read_jsonl(tmp_path / "ai_pairs.jsonl", "pairs")
    assert len(rows) == result["pairs"] == 18 - result["pairs_left_out"] > 0
    assert all(0.5 <= r["p"] <= (0.6 if kw.get("labels") == "clamped" else 1.0) for r in rows)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(saved) >= {"agreement", "agreement_one_order", "log_loss", "calibration", "human_label_agreement",
                          "principles", "comparisons_per_s"}
    n_principles = len(constitution.read_constitution())
    assert saved["comparisons"] == len(rows) * (n_principles if kw.get("principles") == "ensemble" else 1)
    if kw["labeller"] == "model":
        assert saved["position_bias"]["both_orders"] == pytest.approx(0.5)


def test_ai_pairs_feed_the_reward_model_and_dpo(tiny_run, judge_dir, rlaif_world, tmp_path):
    """The same training code: soft Bradley-Terry in train_rm.py, per-pair cDPO ε in train_dpo.py; a pairs file
    without "p" is an error when soft labels are asked for."""
    rlaif.main(rlaif.Config(data_dir=str(rlaif_world), policy=str(judge_dir), labeller="synthetic",
                            out=str(rlaif_world / "ai_pairs.jsonl"), eval_dir=str(tmp_path / "eval"), n_prompts=8,
                            k=2, max_new_tokens=6))
    for name in ("prefs_test.jsonl", "sft_test.jsonl"):  # the held-out files the scripts evaluate on
        src = tiny_run / "data" / "sft_test.jsonl"
        rows = [json.loads(l) for l in src.read_text().splitlines()]
        if name.startswith("prefs"):
            rows = [{"prompt": r["prompt"], "responses": [r["completion"], "No."], "ranking": [0, 1]} for r in rows]
        (rlaif_world / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_rm.main(train_rm.Config(data_dir=str(rlaif_world), out_dir=str(tmp_path / "rm"), init_from=str(judge_dir),
                                  data="pairs", pairs_file="ai_pairs.jsonl", soft_labels=True, epochs=1, batch_size=4,
                                  micro_batch_size=4, n_norm=4, max_new_tokens=6))
    train_dpo.main(train_dpo.Config(data_dir=str(rlaif_world), pairs_file="ai_pairs.jsonl", soft_labels=True,
                                    out_dir=str(tmp_path / "dpo"), init_from=str(judge_dir),
                                    cache_dir=str(tmp_path / "cache"), batch_size=4, micro_batch_size=4, max_steps=2,
                                    n_eval=0))
    (rlaif_world / "hard.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if k != "p"}) + "\n"
        for r in map(json.loads, (rlaif_world / "ai_pairs.jsonl").read_text().splitlines())))
    with pytest.raises(ValueError, match=r"hard.jsonl:1: no field 'p'"):
        train_dpo.main(train_dpo.Config(data_dir=str(rlaif_world), pairs_file="hard.jsonl", soft_labels=True,
                                        out_dir=str(tmp_path / "dpo2"), init_from=str(judge_dir), n_eval=0))
    with pytest.raises(ValueError, match=r"hard.jsonl:1: no field 'p'"):
        train_rm.main(train_rm.Config(data_dir=str(rlaif_world), out_dir=str(tmp_path / "rm2"), data="pairs",
                                      pairs_file="hard.jsonl", soft_labels=True, init_from=str(judge_dir)))


def test_a_missing_feedback_model_is_trained_first(rlaif_world, judge_dir, tmp_path):
    """No checkpoint at --judge: the judging corpus is written beside the world and train_sft.py trains one."""
    cfg = rlaif.Config(data_dir=str(rlaif_world), policy=str(judge_dir), judge=str(tmp_path / "judge"),
                       out=str(tmp_path / "ai_pairs.jsonl"), eval_dir=str(tmp_path / "eval"), n_prompts=3, k=2,
                       max_new_tokens=4, judge_train=40, judge_steps=2, seed=5)
    result = rlaif.main(cfg)
    assert (tmp_path / "judge" / "model.safetensors").exists()
    assert len(read_jsonl(rlaif_world / "judge" / "sft.jsonl", "sft")) == 40
    test_prompts = {r["prompt"] for r in read_jsonl(rlaif_world / "prompts_test.jsonl", "prompts")}
    corpus = read_jsonl(rlaif_world / "judge" / "sft_test.jsonl", "sft")
    assert not any(r["prompt"].split("\n")[0].removeprefix("Customer: ") in test_prompts for r in corpus)
    assert 0 <= result["judge_test_accuracy"]["all"] <= 1
