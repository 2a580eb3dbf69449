"""train_sft.py's training steps against a hand-written float64 reference.

The reference scores each demonstration from its own unpadded forward, one token at a time (the response with
its EOS at weight 1, the prompt at --prompt_loss_weight), divides the batch's weighted negative log-likelihood
by its summed weights,
and takes AdamW steps by hand; it imports nothing from nanoalign.losses. train_sft.main's steps (two
micro-batches of different token counts each) must reach the same weights and log the same losses.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import train_sft
from hand import clip_and_adamw, warmup_cosine
from nanoalign.checkpoint import load_model
from nanoalign.data import batch_indices, read_jsonl


def reference_steps(cfg, init_dir, records, steps):
    model, tok = load_model(init_dir)
    model = model.double()
    state, out = {}, []
    for step in range(steps):
        nll, n_tokens = 0.0, 0
        for i in batch_indices(len(records), cfg.batch_size, step, cfg.seed):
            prompt, answer = tok.encode_prompt(records[i]["prompt"]), tok.encode_response(records[i]["completion"])
            logits = model(torch.tensor([prompt + answer]))[0]
            for t in range(1, len(prompt) + len(answer)):  # logits at t-1 score token t
                w = 1.0 if t >= len(prompt) else cfg.prompt_loss_weight
                nll = nll - w * (logits[t - 1, (prompt + answer)[t]] - torch.logsumexp(logits[t - 1], 0))
                n_tokens += w
        loss = nll / n_tokens
        loss.backward()
        lr = warmup_cosine(step, steps, cfg.lr, cfg.warmup_steps, cfg.min_lr)
        norm = clip_and_adamw(model.parameters(), lr, state, cfg.grad_clip, 1e-8, cfg.weight_decay)
        out.append({"loss": loss.item(), "grad_norm": norm, "lr": lr})
    return dict(model.named_parameters()), out


@pytest.mark.parametrize("prompt_loss_weight", [0.0, 0.3])
def test_sft_steps_equal_the_hand_written_reference(tiny_run, tmp_path, prompt_loss_weight):
    cfg = train_sft.Config(prompt_loss_weight=prompt_loss_weight, data_dir=str(tiny_run / "data"),
                           out_dir=str(tmp_path / "sft"), init_from=str(tiny_run / "init"), batch_size=6,
                           micro_batch_size=3, max_steps=3, warmup_steps=1, lr=1e-2, min_lr=1e-3, weight_decay=0.1,
                           grad_clip=0.5, log_interval=1, n_eval=0, seed=3)
    torch.set_default_dtype(torch.float64)  # the script's model and optimizer in float64, as the reference
    try:
        train_sft.main(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    records = read_jsonl(tiny_run / "data" / "sft.jsonl")
    expected, logged = reference_steps(cfg, tiny_run / "init", records, cfg.max_steps)
    got = load_file(tmp_path / "sft" / "model.safetensors")
    start = load_model(tiny_run / "init")[0].state_dict()
    # float64 both sides, only the order of sums differs (~1e-14 after the steps); a real bug moves weights by
    # lr-sized steps (1e-3 or more)
    for name, p in expected.items():
        torch.testing.assert_close(got[name].double(), p.detach(), atol=1e-9, rtol=1e-7)
    assert max((got[n] - start[n]).abs().max().item() for n in expected) > 1e-2  # three steps moved it
    log = [json.loads(l) for l in (tmp_path / "sft" / "log.jsonl").read_text().splitlines()]
    assert len(log) == cfg.max_steps
    for entry, want in zip(log, logged):
        assert {k: entry[k] for k in want} == pytest.approx(want, rel=1e-9)  # float64 scalars: summation order
