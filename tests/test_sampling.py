"""The shared sampler against a naive no-cache loop and against the distribution it claims to sample."""

import pytest
import torch

from nanoalign.model import GPT, GPTConfig
from nanoalign.sampling import filter_logits, sample

CFG = GPTConfig(block_size=48, vocab_size=23, n_layer=2, n_head=2, n_embd=32)
EOS, PAD = 1, 0


def tiny_model():
    torch.manual_seed(0)
    return GPT(CFG).eval()


def test_greedy_equals_naive_full_forward_loop():
    model = tiny_model()
    prompts = [[5, 6, 7, 8, 9], [3], [10, 11, 4]]
    out = sample(model, prompts, 12, eos_id=EOS, pad_id=PAD, temperature=0)
    for b, p in enumerate(prompts):
        seq = list(p)
        for t in range(out["response_ids"].shape[1]):
            if not out["response_mask"][b, t]:
                assert out["response_ids"][b, t] == PAD  # after EOS: PAD, masked
                continue
            with torch.no_grad():
                nxt = model(torch.tensor([seq]))[0, -1].argmax().item()
            assert out["response_ids"][b, t].item() == nxt
            seq.append(nxt)


def test_stops_at_eos_and_masks_the_rest():
    model = tiny_model()
    with torch.no_grad():  # make EOS likely so rows finish at different times
        model.lm_head.weight[EOS] += 0.3 * model.transformer.ln_f.weight.sign()
    out = sample(model, [[5, 6]] * 16, 20, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(0))
    ids, mask = out["response_ids"], out["response_mask"]
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 1
    for b in range(16):
        L = lengths[b].item()
        assert mask[b, :L].all() and not mask[b, L:].any()  # mask is a prefix
        if L < ids.shape[1]:
            assert ids[b, L - 1] == EOS and (ids[b, L:] == PAD).all()
        assert (ids[b, :L - 1] != EOS).all()  # the first EOS ends the answer


@pytest.mark.parametrize("per_row", [False, True])
def test_first_token_frequencies_match_softmax_at_temperature(per_row):
    """Exact sampling (N detail 3): the empirical first-token distribution matches softmax(z / T), chi-square;
    with one generator for the batch and with one generator per row."""
    model = tiny_model()
    temperature, n = 0.7, 20000
    with torch.no_grad():
        probs = (model(torch.tensor([[5, 6, 7]]))[0, -1] / temperature).softmax(-1)
    generator = ([torch.Generator().manual_seed(10 ** 6 + i) for i in range(n)] if per_row
                 else torch.Generator().manual_seed(1))
    out = sample(model, [[5, 6, 7]] * n, 1, eos_id=EOS, pad_id=PAD, temperature=temperature, generator=generator)
    counts = torch.bincount(out["response_ids"][:, 0], minlength=CFG.vocab_size).double()
    expected = probs.double() * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 50.0  # 22 degrees of freedom: P(chi2 > 50) < 0.001


def test_per_row_generators_make_a_row_independent_of_its_batch():
    """With one generator per row, a row samples the same answer alone as beside other prompts (which also
    changes its padding): a rollout split over ranks samples what one process would."""
    model = tiny_model()
    prompts = [[5, 6, 7], [9], [10, 11, 4, 8, 2], [3, 3], [12]]
    generators = lambda: [torch.Generator().manual_seed(100 + i) for i in range(len(prompts))]
    batched = sample(model, prompts, 12, eos_id=EOS, pad_id=PAD, generator=generators())
    lengths = batched["response_mask"].sum(1)
    assert len(set(batched["response_ids"][:, 0].tolist())) > 1  # rows draw different tokens
    for i, prompt in enumerate(prompts):
        alone = sample(model, [prompt], 12, eos_id=EOS, pad_id=PAD, generator=[generators()[i]])
        assert alone["response_mask"].sum() == lengths[i]
        assert torch.equal(alone["response_ids"][0, :lengths[i]], batched["response_ids"][i, :lengths[i]])


def test_filter_logits_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda out: torch.isfinite(out)[0].tolist()
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.6)) == [True, True, False, False, False]  # 0.5 < 0.6 needs the 2nd
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False, False]
    assert kept(filter_logits(logits, top_p=0.86)) == [True, True, True, True, False]
    assert kept(filter_logits(logits)) == [True] * 5


def test_model_logps_score_the_sampled_tokens_at_the_sampling_temperature():
    """Scoring the sampler's output with one full forward at temperature T gives the log-probs the sampler
    drew from: the per-step softmax(z/T) of a naive loop (N details 4 and 22: first PPO ratio exactly 1)."""
    from nanoalign.sampling import model_logps
    model = tiny_model()
    temperature = 0.7
    out = sample(model, [[5, 6, 7], [9]], 6, eos_id=EOS, pad_id=PAD, temperature=temperature,
                 generator=torch.Generator().manual_seed(3))
    ids = torch.cat([out["prompt_ids"], out["response_ids"]], 1)
    attn = torch.cat([out["prompt_mask"], out["response_mask"]], 1)
    loss_mask = torch.cat([torch.zeros_like(out["prompt_mask"]), out["response_mask"]], 1)
    with torch.no_grad():
        scored = model_logps(model, ids, attn, loss_mask, temperature)
    P = out["prompt_ids"].shape[1]
    for b, prompt in enumerate([[5, 6, 7], [9]]):
        seq = list(prompt)
        for t in range(out["response_ids"].shape[1]):
            if not out["response_mask"][b, t]:
                assert scored[b, P + t - 1] == 0
                continue
            y = out["response_ids"][b, t].item()
            with torch.no_grad():
                expected = (model(torch.tensor([seq]))[0, -1] / temperature).log_softmax(-1)[y]
            # fp32, a padded batch against one unpadded row: a few u of log-probs ~3, relative to their size
            assert abs(scored[b, P + t - 1].item() - expected.item()) < 1e-5 * max(1.0, abs(expected.item()))
            seq.append(y)


def test_join_gives_the_rows_every_scorer_reads():
    """`join`: prompt + response in one row, attention on the real tokens, the response mask aligned with
    ids[:, 1:]; with a tokenizer the answers decoded from the real response tokens and whether each has EOS."""
    from nanoalign.sampling import join

    class Tok:
        eos_id = EOS

        def decode(self, ids):
            return " ".join(map(str, ids))

    out = sample(tiny_model(), [[5, 6, 7], [9], [4, 4]], 10, eos_id=EOS, pad_id=PAD,
                 generator=torch.Generator().manual_seed(2))  # the seed gives both kinds of answer
    rows, plain = join(out, Tok()), join(out)
    P = out["prompt_ids"].shape[1]
    for b in range(3):
        real = [t for t, m in zip(out["response_ids"][b].tolist(), out["response_mask"][b].tolist()) if m]
        assert rows.ids[b].tolist() == out["prompt_ids"][b].tolist() + out["response_ids"][b].tolist()
        assert rows.attn[b].tolist() == out["prompt_mask"][b].tolist() + out["response_mask"][b].tolist()
        assert rows.mask[b].tolist() == [0.0] * (P - 1) + out["response_mask"][b].float().tolist()
        assert rows.answers[b] == " ".join(map(str, real)) and rows.has_eos[b].item() == (EOS in real)
    assert 0 < rows.has_eos.sum() < 3  # answers that stopped and answers cut at the limit
    assert plain.answers is None and plain.has_eos is None and torch.equal(plain.mask, rows.mask)
