"""train_dpo.py's training steps against a hand-written float64 reference.

The reference scores each answer with its own unpadded forward, sums the log-softmax of the response tokens
one position at a time, counts the response tokens (never the prompt), writes every preference loss out by
hand (KTO's reference point from its mismatched pairs as well), and takes AdamW steps by hand with warmup +
cosine learning rates; it imports nothing from nanoalign.losses. Three steps of train_dpo.main (two
micro-batches each), run in float64, must reach the same weights and log the same losses and gradient norms.
"""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import train_dpo
from nanoalign.checkpoint import load_model
from hand import clip_and_adamw, log_sigmoid, warmup_cosine
from nanoalign.data import batch_indices

RECORDS = [  # answers of different lengths, so length-normalised losses see the difference; two soft labels
    {"prompt": "Where is my lamp, order #1234?", "chosen": "Your lamp (order #1234) ships tomorrow.",
     "rejected": "Go away."},
    {"prompt": "Where is my fan, order #2222?", "chosen": "Your fan ships tomorrow. Anything else?",
     "rejected": "Your fan (order #2222) is lost.", "p": 0.8},
    {"prompt": "Where is my kettle, order #3131?", "chosen": "Your kettle (order #3131) ships tomorrow.",
     "rejected": "It ships."},
    {"prompt": "Where is my blender, order #4040?", "chosen": "Ships tomorrow.",
     "rejected": "Your blender (order #4040) is lost, sorry.", "p": 0.6},
    {"prompt": "Where is my lamp, order #5555?", "chosen": "Your lamp (order #5555) ships tomorrow. Anything else?",
     "rejected": "Your lamp is lost."},
    {"prompt": "Where is my fan, order #6060?", "chosen": "Your fan (order #6060) ships tomorrow.",
     "rejected": "No idea, order #6060 is lost."},
    {"prompt": "Where is my kettle, order #7007?", "chosen": "Your kettle ships tomorrow.",
     "rejected": "Kettle? Lost."},
    {"prompt": "Where is my blender, order #8118?", "chosen": "Your blender (order #8118) ships tomorrow.",
     "rejected": "Your blender ships never."},
]


def sequence_logp(model, tok, prompt, answer):
    """(Σ log p of the response tokens, EOS included, from one unpadded forward; number of response tokens)."""
    prompt_ids, answer_ids = tok.encode_prompt(prompt), tok.encode_response(answer)
    ids = torch.tensor([prompt_ids + answer_ids])
    logits = model(ids)[0]
    total = 0.0
    for t in range(len(prompt_ids), ids.shape[1]):
        row = logits[t - 1]
        total = total + row[ids[0, t]] - torch.logsumexp(row, 0)
    return total, len(answer_ids)


def mismatched(records, seed):
    """KTO's mismatched pairs by the rule nanoalign.data.encode_preferences states: the distinct (prompt, answer)s
    as first seen (every chosen answer, then every rejected one) in a torch.randperm(seed) shuffle, each one's
    prompt with the next one's answer, cyclically -> {(prompt, answer): (prompt, other answer)}."""
    distinct = list(dict.fromkeys([(r["prompt"], r["chosen"]) for r in records]
                                  + [(r["prompt"], r["rejected"]) for r in records]))
    order = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed)).tolist()
    return {distinct[k]: (distinct[k][0], distinct[order[(i + 1) % len(order)]][1]) for i, k in enumerate(order)}


def pair_loss(cfg, pc, pr, rc, rr, lc, lr_, eps, z0=0.0):
    h = (pc - rc) - (pr - rr)
    b = cfg.beta
    if cfg.loss_type == "kto":  # the pair's two answers: chosen desirable, rejected not (summed; / 2B outside)
        return (cfg.kto_lambda_d * (1 - torch.sigmoid(b * ((pc - rc) - z0)))
                + cfg.kto_lambda_u * (1 - torch.sigmoid(b * (z0 - (pr - rr)))))
    if cfg.loss_type == "orpo":  # reference-free: the chosen answer's mean NLL + λ·(-log σ(log odds ratio))
        log_odds = lambda m: m - torch.log(1 - torch.exp(m))  # odds P/(1-P) of P = exp(mean log-prob)
        return -pc / lc - b * log_sigmoid(log_odds(pc / lc) - log_odds(pr / lr_))
    if cfg.loss_type == "sigmoid":
        loss = -(1 - eps) * log_sigmoid(b * h) - eps * log_sigmoid(-b * h)
    elif cfg.loss_type == "robust":
        loss = 0.0 * h if eps == 0.5 else (-(1 - eps) * log_sigmoid(b * h) + eps * log_sigmoid(-b * h)) / (1 - 2 * eps)
    elif cfg.loss_type == "hinge":
        loss = torch.clamp(1 - b * h, min=0.0)
    elif cfg.loss_type == "ipo_sum":
        loss = (h - 1 / (2 * b)) ** 2
    elif cfg.loss_type == "ipo":
        loss = ((pc - rc) / lc - (pr - rr) / lr_ - 1 / (2 * b)) ** 2
    else:  # simpo: reference-free, length-averaged
        loss = -log_sigmoid(b * pc / lc - b * pr / lr_ - cfg.simpo_gamma)
    return loss - cfg.rpo_alpha * pc / lc


def reference_steps(cfg, init_dir, steps):
    """The weights, losses and gradient norms after `steps` optimizer steps, all by hand in float64."""
    policy, tok = load_model(init_dir)
    policy = policy.double()
    reference = copy.deepcopy(policy).requires_grad_(False)
    state, out = {}, []
    partner = mismatched(RECORDS, cfg.seed)
    for step in range(steps):
        rows = batch_indices(len(RECORDS), cfg.batch_size, step, cfg.seed)
        total, stats = 0.0, {k: 0.0 for k in ("rewards/accuracies", "rewards/margins", "rewards/chosen",
                                                 "rewards/rejected", "logps/chosen", "logps/rejected")}
        ties = 0.0  # pairs whose margin is 0 but for rounding (the first step: policy = reference)
        z0 = 0.0
        if cfg.loss_type == "kto":  # mean log-ratio of the batch's answers' prompts with their partners' answers
            with torch.no_grad():
                kl = [sequence_logp(policy, tok, *partner[(RECORDS[i]["prompt"], RECORDS[i][f])])[0]
                      - sequence_logp(reference, tok, *partner[(RECORDS[i]["prompt"], RECORDS[i][f])])[0]
                      for i in rows for f in ("chosen", "rejected")]
            z0 = max(0.0, sum(k.item() for k in kl) / len(kl))
        for i in rows:
            r = RECORDS[i]
            pc, lc = sequence_logp(policy, tok, r["prompt"], r["chosen"])
            pr, lr_ = sequence_logp(policy, tok, r["prompt"], r["rejected"])
            with torch.no_grad():
                rc, _ = sequence_logp(reference, tok, r["prompt"], r["chosen"])
                rr, _ = sequence_logp(reference, tok, r["prompt"], r["rejected"])
            eps = 1 - r.get("p", 1 - cfg.label_smoothing)
            total = total + pair_loss(cfg, pc, pr, rc, rr, lc, lr_, eps, z0)
            # the implicit rewards β(S_θ - S_ref); SimPO's and ORPO's are β·S̄_θ (no reference)
            wc, wr = (pc / lc, pr / lr_) if cfg.loss_type in ("simpo", "orpo") else (pc - rc, pr - rr)
            wc, wr = cfg.beta * wc.item(), cfg.beta * wr.item()
            for k, x in zip(stats, (float(wc > wr), wc - wr, wc, wr, pc.item(), pr.item())):
                stats[k] += x / cfg.batch_size
            ties += (abs(wc - wr) < 1e-9) / cfg.batch_size  # float64 margins of a tie: ~1e-15
        loss = total / (2 * cfg.batch_size if cfg.loss_type == "kto" else cfg.batch_size)  # KTO: mean over answers
        loss.backward()
        lr = warmup_cosine(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr)
        norm = clip_and_adamw(policy.parameters(), lr, state, cfg.grad_clip, 1e-8, cfg.weight_decay)
        out.append({"loss": loss.item(), "grad_norm": norm, "lr": lr, **stats, "ties": ties,
                    **({"kl": z0} if cfg.loss_type == "kto" else {})})
    return dict(policy.named_parameters()), out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_ref")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return root


@pytest.mark.parametrize("loss_type,kw", [("sigmoid", {}), ("robust", dict(label_smoothing=0.2)), ("hinge", {}),
                                          ("sigmoid", dict(label_smoothing=0.1, rpo_alpha=0.5, rows_per_forward=3)),
                                          ("ipo", dict(rows_per_forward=3)), ("ipo_sum", {}),
                                          ("simpo", dict(beta=2.0, simpo_gamma=0.5)),
                                          ("sigmoid", dict(ref_cache=False, rows_per_forward=3)),
                                          ("kto", {}), ("kto", dict(kto_lambda_d=1.5, kto_lambda_u=0.6, ref_cache=False,
                                                                    rows_per_forward=3)),
                                          ("orpo", dict(beta=0.2))])
def test_dpo_steps_equal_the_hand_written_reference(tiny_run, pairs, tmp_path, loss_type, kw):
    cfg = train_dpo.Config(data_dir=str(pairs), out_dir=str(tmp_path / "dpo"), init_from=str(tiny_run / "init"),
                           cache_dir=str(tmp_path / "cache"), loss_type=loss_type, beta=kw.pop("beta", 0.5),
                           batch_size=4, micro_batch_size=2, max_steps=3, warmup_steps=1, lr=1e-2, min_lr=1e-3,
                           weight_decay=0.1, grad_clip=0.5, log_interval=1, n_eval=0, seed=5, **kw)
    torch.set_default_dtype(torch.float64)  # the script's models and optimizer in float64, as the reference
    try:
        train_dpo.main(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    expected, logged = reference_steps(cfg, tiny_run / "init", cfg.max_steps)
    if loss_type == "kto":  # the reference point is used, not clamped away at every step
        assert max(entry["kl"] for entry in logged) > 0.01, [entry["kl"] for entry in logged]
    got = load_file(tmp_path / "dpo" / "model.safetensors")
    start = load_model(tiny_run / "init")[0].state_dict()
    # float64 both sides, only the order of sums differs (~1e-14 after the steps); a real bug moves weights by
    # lr-sized steps (1e-3 or more)
    for name, p in expected.items():
        torch.testing.assert_close(got[name].double(), p.detach(), atol=1e-9, rtol=1e-7)
    assert max((got[n] - start[n]).abs().max().item() for n in expected) > 1e-2  # three steps moved it
    log = [json.loads(l) for l in (tmp_path / "dpo" / "log.jsonl").read_text().splitlines()]
    assert len(log) == cfg.max_steps
    for entry, expected in zip(log, logged):
        # the accuracy counts margins > 0: a tie's sign is rounding's (any kernel's), so each tie may count either way
        ties = expected.pop("ties")
        assert abs(entry["rewards/accuracies"] - expected.pop("rewards/accuracies")) <= ties + 1e-12
        assert {k: entry[k] for k in expected} == pytest.approx(expected, rel=1e-9, abs=1e-12)  # float64 scalars
