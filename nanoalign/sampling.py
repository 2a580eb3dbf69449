"""The one sampler (batched, KV-cached, temperature / top-k / top-p, stopping at EOS) and the scorers of what it
produced: per-token log-probs under a model at a temperature, and the normalised reward-model score.

It serves SFT samples, PPO rollouts, best-of-N, AI-feedback judging and evaluation. Prompts are left-padded
so that every row's next token sits in the last column; a row that has emitted EOS receives PAD (masked out)
until all rows are done. For exact sampling (PPO, KL) keep top_k = 0 and top_p = 1 (N detail 4): any
filtering makes the samples come from a distribution other than the one whose log-probs are scored.
"""

import torch

from nanoalign.data import left_pad
from nanoalign.losses import last_token_values, token_logps
from nanoalign.model import GPT, KVCache


def model_logps(model: GPT, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs of each row's own tokens, zero outside `loss_mask` (the response):
    input_ids, attention_mask, loss_mask [B, T] -> [B, T-1], aligned with `input_ids[:, 1:]`.
    The one log-prob path for DPO, PPO, KL and the AI judge; sum over the last dim for S(y|x)."""
    logits = model(input_ids, attention_mask=attention_mask)  # [B, T, V]
    return token_logps(logits[:, :-1], input_ids[:, 1:], temperature) * loss_mask[:, 1:]


def reward_scores(model: GPT, input_ids: torch.Tensor, attention_mask: torch.Tensor, gain: float = 1.0,
                  bias: float = 0.0) -> torch.Tensor:
    """The one reward read-out: gain * r + bias, r the scalar head at each row's last real token (the EOS
    of prompt + response + EOS, whether rows are left- or right-padded). input_ids, attention_mask [B, T]
    -> [B], in fp32 whatever the model's dtype. Every consumer (PPO, best-of-N, evaluation) applies the stored
    gain and bias: skipping them silently changes what the KL coefficient means (ALGORITHMS.md §3.6 pitfalls)."""
    values = model(input_ids, attention_mask=attention_mask, output="scalar").float()  # [B, T]
    return gain * last_token_values(values, attention_mask) + bias


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus top-p set to -inf. logits [B, V] -> [B, V]."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # tokens entirely beyond the nucleus; the first is kept
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample(model: GPT, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator=None) -> dict:
    """Sample responses to token-id prompts. temperature 0 = greedy.

    Returns prompt_ids [B, P] (left-padded), prompt_mask [B, P], response_ids [B, N] (PAD after EOS),
    response_mask [B, N] (1 on real response tokens, the EOS included), N <= max_new_tokens.
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts, pad_id))
    B, P = prompt_ids.shape
    max_new_tokens = min(max_new_tokens, model.config.block_size - P)
    cache = KVCache(model.config, B, P + max_new_tokens, device, dtype=next(model.parameters()).dtype)
    logits = model(prompt_ids, attention_mask=prompt_mask, kv_cache=cache)[:, -1]  # [B, V]
    mask = prompt_mask
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, alive = [], []
    for _ in range(max_new_tokens):
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]  # [B]
        nxt = nxt.masked_fill(done, pad_id)
        tokens.append(nxt)
        alive.append(~done)
        done = done | (nxt == eos_id)
        if done.all():
            break
        mask = torch.cat([mask, alive[-1][:, None].long()], dim=1)  # the new token is real iff its row was live
        logits = model(nxt[:, None], attention_mask=mask, kv_cache=cache)[:, -1]
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "response_ids": torch.stack(tokens, 1), "response_mask": torch.stack(alive, 1).long()}
