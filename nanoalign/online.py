"""Online DPO's plumbing (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", §3,
Algorithm 1): two answers per prompt from the current policy, a labeller's preference between them, and the pairs
it prefers as (prompt, chosen, rejected) records, which `train_dpo.dpo_step` trains on. train_dpo.py --online=True
runs the loop.

A labeller returns P(y1 ≻ y2) [N] float64 for each (prompt, y1, y2), ½ for no preference:

    ai     the feedback model of nanoalign.rlaif: one principle drawn per pair, both orders averaged
    rm     a reward model, each answer scored as PPO scores it (gain and bias applied): σ(r(y1) − r(y2))
    gold   the gold judge: 1, 0, or ½ on equal gold (an oracle labeller; elsewhere it only measures)

A pair with no preference (P = ½) is skipped. A tie says neither answer is better; kept as a half-weighted pair
(cDPO with ε = ½) it would pull the two answers' implicit rewards together, a target no labeller gave.
"""

import random

import torch

from nanoalign.world import gold_judge
from nanoalign.checkpoint import load_model, load_reward_model
from nanoalign.world.constitution import option_ids, read_constitution
from nanoalign.data import encode_example
from nanoalign.evaluate import sample_answers
from nanoalign.rlaif import agreement, ai_preferences, comparable, gold_scores, pair_rows
from nanoalign.sampling import by_length, reward_scores

LABELLERS = ("ai", "rm", "gold")


def two_answers(policy, tok, prompts: list, max_new_tokens: int, temperature: float,
                seed: int) -> tuple[list[tuple], int]:
    """Two answers to each prompt from the policy as it is now, by the shared sampler with one generator per answer
    (`evaluate.sample_answers`, seeded by (seed, its row)) -> (the pairs (prompt, y1, y2) worth a label
    (`rlaif.comparable`: equal or empty answers are left out and cost none), the response tokens sampled)."""
    answers, batches = sample_answers(policy, tok, [p for p in prompts for _ in range(2)], max_new_tokens,
                                      temperature, seed=seed)
    pairs = [(p, answers[2 * i], answers[2 * i + 1]) for i, p in enumerate(prompts)]
    tokens = sum(int(b["response_mask"].sum()) for b in batches)
    return [(p, y1, y2) for p, y1, y2 in pairs if comparable(y1, y2)], tokens


def gold_preferences(pairs: list[tuple]) -> torch.Tensor:
    """The gold judge as labeller: 1 where y1's gold is higher, 0 where lower, ½ where equal -> [N] float64."""
    g = gold_scores(pairs)
    return 0.5 * (1 + torch.sign(g[:, 0] - g[:, 1]))


def reward_preferences(rm, gain: float, bias: float, tok, pairs: list[tuple], max_len: int,
                       rows_per_forward: int = 64) -> torch.Tensor:
    """A reward model as labeller: σ(r(y1) − r(y2)) [N] float64, r the normalised score (`reward_scores`) of each
    answer encoded as the DPO step reads it (prompt through the chat template, answer, EOS)."""
    device = next(rm.parameters()).device
    rows = [encode_example(tok, p, y, max_len) for p, y1, y2 in pairs for y in (y1, y2)]
    with torch.no_grad():
        r = by_length(rows, tok.pad_id, device, rows_per_forward,
                      lambda b: reward_scores(rm, b["input_ids"], b["attention_mask"], gain, bias))
    r = r.double().view(-1, 2).cpu()
    return torch.sigmoid(r[:, 0] - r[:, 1])


def load_labeller(kind: str, path, tok, device, dtype, seed: int, max_len: int, batch_size: int = 16):
    """The labeller `kind` (LABELLERS), its model read from `path` (ai: the feedback model, rm: a reward model on
    the policy's tokenizer; gold: none) -> label(pairs, step) -> P(y1 ≻ y2) [N] float64. The ai labeller draws
    each step's principles from a generator seeded by (seed, step), so a resumed run asks what it would have."""
    if kind == "gold":
        return lambda pairs, step: gold_preferences(pairs)
    if kind == "rm":
        rm, _, gain, bias = load_reward_model(path, tok)
        rm.to(device, dtype).eval().requires_grad_(False)
        return lambda pairs, step: reward_preferences(rm, gain, bias, tok, pairs, max_len)
    if kind == "ai":
        judge, judge_tok = load_model(path)
        judge.to(device, dtype).eval().requires_grad_(False)
        option_ids(judge_tok, path)  # options its tokenizer splits differently: an error now, not at step 1
        principles = read_constitution()
        return lambda pairs, step: ai_preferences(judge, judge_tok, pairs, principles,
                                                  random.Random(f"{seed}/{step}/principles"), batch_size)
    raise ValueError(f"unknown labeller {kind!r}; expected one of {', '.join(LABELLERS)}")


def preferred(pairs: list[tuple], p: torch.Tensor) -> list[dict]:
    """The pairs a label prefers an answer of, as pairs records: chosen = the preferred answer, "p" = P(chosen is
    better) > ½ (`rlaif.pair_rows`); pairs labelled ½ are skipped (see the module's docstring)."""
    kept = [i for i, q in enumerate(p.tolist()) if q != 0.5]
    return pair_rows([pairs[i] for i in kept], p[kept])


def gold_agreement(pairs: list[tuple], p: torch.Tensor) -> tuple[float, int]:
    """(pairs on which the label's preferred answer is the gold-better one, pairs whose gold differs): the
    labeller measured against the gold judge, counted so that a run can sum them over its steps (measurement
    only: nothing trained reads it). A label of ½ counts half, as `rlaif.agreement` counts it."""
    if not pairs:
        return 0.0, 0
    g = gold_scores(pairs)
    compared = int((g[:, 0] != g[:, 1]).sum())
    return (agreement(p, g[:, 0], g[:, 1]) or 0.0) * compared, compared
