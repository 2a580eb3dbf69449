"""train_rm.py's training steps against a hand-written float64 reference.

The reference reads each answer's reward at its last real token from its own unpadded forward, writes the
K-wise (all C(K,2) pairs), Plackett-Luce and soft Bradley-Terry losses out as sums over pairs and positions,
and takes AdamW steps by hand; it imports nothing from nanoalign.losses. train_rm.main's steps (two
micro-batches each, rows regrouped by length for speed) must reach the same weights and log the same losses.
Both run in float64: these losses depend on reward differences only, so the gradient of ln_f.bias and of the
head's bias is exactly 0, and in fp32 its rounding noise (~1e-8) divided by AdamW's √v + ε moves those weights
by ~1e-4 however right the code; in float64 that noise is ~1e-16 and moves them by < 1e-12.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import train_rm
from hand import clip_and_adamw, log_sigmoid, warmup_cosine
from nanoalign.checkpoint import load_model
from nanoalign.data import batch_indices

PROMPTS = [f"Where is my {item}, order #{1000 + 7 * i}?" for i, item in enumerate(
    ["lamp", "fan", "kettle", "blender", "lamp", "fan", "kettle", "blender"])]
ANSWERS = ["It ships tomorrow.", "Go away.", "Your order ships tomorrow. Anything else?", "Lost, sorry.",
           "We will check it."]


def prefs_records(k):
    """K answers of different lengths per prompt, and a ranking that is not their order."""
    return [{"prompt": p, "responses": [ANSWERS[(i + j) % len(ANSWERS)] for j in range(k)],
             "ranking": [(j * 2 + i) % k for j in range(k)] if k == 3 else [(i + j) % k for j in range(k)]}
            for i, p in enumerate(PROMPTS)]


def pairs_records():
    return [{"prompt": p, "chosen": ANSWERS[i % 5], "rejected": ANSWERS[(i + 2) % 5], "p": [1.0, 0.7, 0.55][i % 3]}
            for i, p in enumerate(PROMPTS)]


def reward(model, tok, prompt, answer):
    ids = torch.tensor([tok.encode_prompt(prompt) + tok.encode_response(answer)])
    return model(ids, output="scalar")[0, -1]  # unpadded: the last token is the EOS


def record_loss(cfg, model, tok, rec):
    """-> (the record's loss, and over its ranked pairs (better, worse): hits (1/2 on a tie), summed margins,
    number of pairs)."""
    if "chosen" in rec:  # soft Bradley-Terry: the label is P(chosen is better)
        d = reward(model, tok, rec["prompt"], rec["chosen"]) - reward(model, tok, rec["prompt"], rec["rejected"])
        x = d.item()
        return -(rec["p"] * log_sigmoid(d) + (1 - rec["p"]) * log_sigmoid(-d)), (x > 0) + 0.5 * (x == 0), x, 1
    r = [reward(model, tok, rec["prompt"], a) for a in rec["responses"]]
    order, k = rec["ranking"], len(rec["responses"])
    pairs = [(order[a], order[b]) for a in range(k) for b in range(a + 1, k)]
    diffs = [(r[i] - r[j]).item() for i, j in pairs]
    stats = sum((x > 0) + 0.5 * (x == 0) for x in diffs), sum(diffs), len(pairs)
    if cfg.loss == "kwise":  # mean over the C(K,2) pairs of -log σ(r_better - r_worse)
        return sum(-log_sigmoid(r[i] - r[j]) for i, j in pairs) / len(pairs), *stats
    total = 0.0  # Plackett-Luce: each position picks its answer from those not yet placed, / (K - 1)
    for pos in range(k - 1):
        rest = [r[i] for i in order[pos:]]
        top = max(x.item() for x in rest)
        total = total - (r[order[pos]] - (top + torch.log(sum(torch.exp(x - top) for x in rest))))
    return total / (k - 1), *stats


def reference_steps(cfg, init_dir, records, steps):
    torch.manual_seed(cfg.seed)  # train_rm's setup seeds, then the new head is drawn (in the default dtype)
    model, tok = load_model(init_dir, scalar_head=True)
    model = model.double()
    state, out = {}, []
    for step in range(steps):
        rows = batch_indices(len(records), cfg.batch_size, step, cfg.seed)
        per_record = [record_loss(cfg, model, tok, records[i]) for i in rows]
        loss = sum(x[0] for x in per_record) / len(rows)
        hits, margins, n_pairs = (sum(x[i] for x in per_record) for i in (1, 2, 3))
        loss.backward()
        lr = warmup_cosine(step, steps, cfg.lr, cfg.warmup_steps, cfg.min_lr)
        norm = clip_and_adamw(model.parameters(), lr, state, cfg.grad_clip, cfg.adam_eps, cfg.weight_decay)
        out.append({"loss": loss.item(), "grad_norm": norm, "rewards/accuracies": hits / n_pairs,
                    "rewards/margins": margins / n_pairs, "lr": lr})
    return dict(model.named_parameters()), out


@pytest.mark.parametrize("data,loss,k", [("prefs", "kwise", 4), ("prefs", "kwise", 3),
                                         ("prefs", "plackett_luce", 4), ("pairs", "kwise", 2)])
def test_rm_steps_equal_the_hand_written_reference(tiny_run, tmp_path, data, loss, k):
    records = pairs_records() if data == "pairs" else prefs_records(k)
    test = prefs_records(k if data == "prefs" else 2)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / f"{data}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "data" / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))  # no world
    (tmp_path / "data" / "prefs_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    cfg = train_rm.Config(data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "rm"),
                          init_from=str(tiny_run / "init"), data=data, loss=loss, epochs=3, batch_size=4,
                          micro_batch_size=2, rows_per_forward=3, lr=1e-2, min_lr=1e-3, warmup_steps=1,
                          grad_clip=0.5, log_interval=1, n_norm=4, max_new_tokens=8, seed=9)
    steps = cfg.epochs * (len(records) // cfg.batch_size)
    torch.set_default_dtype(torch.float64)  # the script's model, its new head and its optimizer in float64
    try:
        train_rm.main(cfg)
        expected, logged = reference_steps(cfg, tiny_run / "init", records, steps)
    finally:
        torch.set_default_dtype(torch.float32)
    got = load_file(tmp_path / "rm" / "model.safetensors")
    start = load_model(tiny_run / "init")[0].state_dict()
    # float64 both sides, only the order of sums differs: ~1e-14 apart after 6 steps (the zero-gradient biases
    # included: noise ~1e-16 times lr/adam_eps = 1e3 per step); a real bug moves weights by lr-sized steps (1e-3+)
    for name, p in expected.items():
        torch.testing.assert_close(got[name].double(), p.detach(), atol=1e-9, rtol=1e-7)
    assert max((got[n] - start[n]).abs().max().item() for n in expected if n in start) > 1e-2  # steps moved it
    log = [json.loads(l) for l in (tmp_path / "rm" / "log.jsonl").read_text().splitlines()]
    assert len(log) == steps
    for entry, expected in zip(log, logged):  # float64 scalars: summation order only
        assert {k: entry[k] for k in expected} == pytest.approx(expected, rel=1e-9, abs=1e-12)
