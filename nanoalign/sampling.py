"""The one sampler (batched, KV-cached, temperature / top-k / top-p, stopping at EOS) and the scorers of what it
produced: per-token log-probs (and values) under a model at a temperature, and the normalised reward-model score;
`join` turns the sampler's output into the prompt + response rows they read.

It serves SFT samples, PPO rollouts, best-of-N, AI-feedback judging and evaluation. Prompts are left-padded
so that every row's next token sits in the last column; a row that has emitted EOS receives PAD (masked out)
until all rows are done. For exact sampling (PPO, KL) keep top_k = 0 and top_p = 1 (N detail 4): any
filtering makes the samples come from a distribution other than the one whose log-probs are scored.
"""

import hashlib
import inspect
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoalign.data import collate, left_pad
from nanoalign.logprobs import token_logps, widen
from nanoalign.losses import last_token_values, unpack
from nanoalign.model import GPT, KVCache


def scored_forward(model: GPT, input_ids: torch.Tensor, attention_mask: torch.Tensor, scored: torch.Tensor,
                   temperature: float = 1.0, values: bool = False) -> tuple:
    """Per-token log-probs of each row's own tokens where `scored` is set, zero elsewhere, with their logits (PPO's
    entropy) and values; `model_logps` is the same forward without them.
    input_ids, attention_mask [B, T], scored [B, T-1] (aligned with `input_ids[:, 1:]`, e.g. PPO's response
    mask) -> (log-probs [B, T-1]; their logits packed [N, V], for the entropy; with values=True the scalar head's
    values [B, T-1], else None). The LM head runs only where a token is scored, so no [B, T, V] logits exist at
    all; values[:, t] is read at the position whose logits score token t+1, so values and log-probs align
    (N detail 15), from the same forward."""
    scored = scored.bool()
    at = F.pad(scored, (0, 1))  # [B, T]: logits at t score token t+1
    if values:
        logits, vals = model(input_ids, attention_mask=attention_mask, output="both", logits_at=at)
        vals = vals[:, :-1]
    else:
        logits, vals = model(input_ids, attention_mask=attention_mask, logits_at=at), None  # [N, V]
    return unpack(token_logps(logits, input_ids[:, 1:][scored], temperature), scored), logits, vals


def model_logps(model: GPT, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """`scored_forward`'s log-probs with a loss mask [B, T] over the tokens themselves (`data.collate`'s):
    input_ids, attention_mask, loss_mask [B, T] -> [B, T-1], zero outside `loss_mask` (the response).
    For SFT, DPO and the AI judge; sum over the last dim for S(y|x). No logits come back, so a model with
    `fused_head` never holds them."""
    scored = loss_mask[:, 1:].bool()
    logps = model(input_ids, attention_mask=attention_mask, output="logps", logits_at=F.pad(scored, (0, 1)),
                  labels=input_ids[:, 1:][scored], temperature=temperature)  # [N]
    return unpack(logps, scored)


def token_values(model: GPT, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A value model's values [B, T-1], aligned as `scored_forward`'s (read where token t+1's logits are)."""
    return model(input_ids, attention_mask=attention_mask, output="scalar")[:, :-1]


def reward_scores(model: GPT, input_ids: torch.Tensor, attention_mask: torch.Tensor, gain: float = 1.0,
                  bias: float = 0.0) -> torch.Tensor:
    """The one reward read-out: gain * r + bias, r the scalar head at each row's last real token (the EOS
    of prompt + response + EOS, whether rows are left- or right-padded). input_ids, attention_mask [B, T]
    -> [B], in fp32 (float64 for a float64 model). Every consumer (PPO, best-of-N, evaluation) applies the stored
    gain and bias: skipping them silently changes what the KL coefficient means (Ziegler et al. 2019 §2)."""
    values = widen(model(input_ids, attention_mask=attention_mask, output="scalar"))  # [B, T]
    return gain * last_token_values(values, attention_mask) + bias


def by_length(rows: list, pad_id: int, device, rows_per_forward: int, score) -> torch.Tensor:
    """score(batch) -> [b] for each (ids, n_prompt) row -> [N], in the order given. The rows go through the model
    sorted by length, in chunks of `rows_per_forward`, so that each chunk pads to similar lengths: one forward of
    a random batch of helpdesk rankings or preference pairs reads about 2.1-2.2x their real tokens, sorted chunks
    of 16-32 rows about 1.2x. A row's score changes with its chunk in float rounding only."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    chunks = []
    for s in range(0, len(rows), rows_per_forward):
        batch = collate([rows[i] for i in order[s:s + rows_per_forward]], pad_id)
        chunks.append(score({k: v.to(device) for k, v in batch.items()}))
    return torch.cat(chunks)[torch.tensor(order, device=device).argsort()]  # back in the given order


def group_rewards(model, groups: list[dict], pad_id: int, device, rows_per_forward: int) -> torch.Tensor:
    """Rewards of N groups of K answers -> [N, K], the N*K rows length-sorted (`by_length`). The read-out ignores
    padding, so the chunking changes no reward beyond float rounding."""
    rows = [row for g in groups for row in g["rows"]]
    rewards = by_length(rows, pad_id, device, rows_per_forward,
                        lambda b: reward_scores(model, b["input_ids"], b["attention_mask"]))  # [N*K]
    return rewards.view(len(groups), -1)  # [N, K]


def summed_logps(model, rows: list, pad_id: int, device, rows_per_forward: int) -> torch.Tensor:
    """S(y|x) = Σ_t log π(y_t | x, y_<t) of each (ids, n_prompt) row, the response's tokens (EOS included) only
    -> [N] in the order given, length-sorted through the model (`by_length`); differentiable (DPO's policy)."""
    return by_length(rows, pad_id, device, rows_per_forward, lambda b: model_logps(model, **b).sum(-1))


def logps_code_version() -> str:
    """A hash of the source of everything `summed_logps` runs, and of torch's version: the model (nanoalign.model)
    and the log-prob functions (nanoalign.logprobs) whole, the scoring path here and the collation, as this module calls
    them. Part of the key of cached log-probs (train_dpo.py's reference cache), so that log-probs computed by
    other code are never read back: hashing the source, rather than a version number, cannot be forgotten."""
    parts = [inspect.getsource(sys.modules[f.__module__]) for f in (GPT, token_logps)]
    parts += [inspect.getsource(f) for f in (by_length, summed_logps, model_logps, collate, unpack)]
    return hashlib.sha256("\x00".join([*parts, torch.__version__]).encode()).hexdigest()[:16]


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


def draw(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """One token per row from probs [B, V] -> [B] by inverse-CDF sampling: one uniform u per row, the token
    whose interval of the cumulative distribution (float64) holds u. One random number per row rather than
    one per vocabulary entry (torch.multinomial's exponential race), which took 30% of a CPU rollout
    (bench/RESULTS.md). `generator` as in `sample`."""
    if isinstance(generator, (list, tuple)):
        assert len(generator) == len(probs), f"{len(generator)} generators for {len(probs)} rows"
        u = torch.stack([torch.rand(1, generator=g, device=probs.device, dtype=torch.float64) for g in generator])
    else:
        u = torch.rand(len(probs), 1, generator=generator, device=probs.device, dtype=torch.float64)  # [B, 1]
    cdf = probs.double().cumsum(-1)  # [B, V]
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0].clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample(model: GPT, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator=None,
           compile: bool = False) -> dict:
    """Sample responses to token-id prompts. temperature 0 = greedy.

    compile: decode with a static KV cache and one compiled single-token step (`decode_step`), CUDA graphs
    on a GPU. The cache length is rounded up to a multiple of 64 so that few distinct shapes compile.

    generator: None, one torch.Generator for the batch, or a list of B generators, one per row: then a row's
    answer does not depend on the rows beside it, so a rollout split over data-parallel ranks samples what one
    process would.
    Returns prompt_ids [B, P] (left-padded), prompt_mask [B, P], response_ids [B, N] (PAD after EOS),
    response_mask [B, N] (1 on real response tokens, the EOS included), N <= max_new_tokens, and
    response_logps [B, N] fp32, each token's log-probability under the distribution it was drawn from (after
    temperature and top-k / top-p; greedy: under softmax(logits); 0 after EOS).
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts, pad_id))
    B, P = prompt_ids.shape
    max_new_tokens = min(max_new_tokens, model.config.block_size - P)
    length = min(-(-(P + max_new_tokens) // 64) * 64, model.config.block_size) if compile else P + max_new_tokens
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else \
        next(model.parameters()).dtype
    cache = static_decoder(model).cache(model.config, B, length, device, dtype) if compile else \
        KVCache(model.config, B, length, device, dtype=dtype)
    eager = torch.compiler.set_stance("force_eager")  # compiled blocks would recompile for every length
    last = F.pad(torch.ones(B, 1, dtype=torch.bool, device=device), (P - 1, 0))  # [B, P]: the LM head only there
    with eager:
        logits = model(prompt_ids, attention_mask=prompt_mask, kv_cache=cache, logits_at=last)  # [B, V]
    mask = prompt_mask
    if compile:  # every slot in the mask from now on; positions advance by one on live rows
        cache.make_static()
        mask = torch.cat([prompt_mask, prompt_mask.new_zeros(B, length - P)], 1)  # [B, length]
        positions = prompt_mask.sum(-1, keepdim=True)  # [B, 1]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, alive, logps = [], [], []
    for _ in range(max_new_tokens):
        if temperature == 0:
            nxt = logits.argmax(-1)
            probs = logits.float().softmax(-1)
        else:
            probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
            nxt = draw(probs, generator)  # [B]
        logps.append(probs.gather(-1, nxt[:, None])[:, 0].log())  # of the distribution it was drawn from
        nxt = nxt.masked_fill(done, pad_id)
        tokens.append(nxt)
        alive.append(~done)
        done = done | (nxt == eos_id)
        if done.all() or len(tokens) == max_new_tokens:  # no forward whose logits nobody samples from
            break
        if compile:
            cache.slot.fill_(P + len(tokens) - 1)
            mask[:, P + len(tokens) - 1] = alive[-1]
            logits = decode_step(model, nxt[:, None], mask, positions, cache)
            positions = positions + alive[-1][:, None]
            continue
        mask = torch.cat([mask, alive[-1][:, None].long()], dim=1)  # the new token is real iff its row was live
        with eager:
            logits = model(nxt[:, None], attention_mask=mask, kv_cache=cache)[:, -1]
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "response_ids": torch.stack(tokens, 1), "response_mask": torch.stack(alive, 1).long(),
            "response_logps": torch.stack(logps, 1).masked_fill(~torch.stack(alive, 1), 0.0)}


@dataclass
class Sequences:
    """The sampler's prompts and responses joined into one row each (`join`)."""
    ids: torch.Tensor  # [B, P+N] prompt (left-padded) + response (PAD after EOS)
    attn: torch.Tensor  # [B, P+N] 1 on real tokens
    mask: torch.Tensor  # [B, P+N-1] float, 1 where ids[:, 1:] is a response token (its EOS included)
    answers: list | None  # [B] decoded responses (with a tokenizer)
    has_eos: torch.Tensor | None  # [B] bool, the answer stopped by itself (with a tokenizer)


def join(out: dict, tok=None) -> Sequences:
    """`sample`'s output -> prompt + response rows as every scorer reads them (`reward_scores`, `scored_forward`,
    the reference KL); with the tokenizer also the decoded answers and which of them ended with EOS."""
    ids = torch.cat([out["prompt_ids"], out["response_ids"]], 1)
    attn = torch.cat([out["prompt_mask"], out["response_mask"]], 1)
    mask = torch.cat([torch.zeros_like(out["prompt_mask"]), out["response_mask"]], 1)[:, 1:].float()
    if tok is None:
        return Sequences(ids, attn, mask, None, None)
    real = out["response_mask"].bool()
    answers = [tok.decode(r[m].tolist()) for r, m in zip(out["response_ids"], real)]
    return Sequences(ids, attn, mask, answers, ((out["response_ids"] == tok.eos_id) & real).any(-1))


def _decode(model, token, mask, positions, cache):
    return model(token, attention_mask=mask, position_ids=positions, kv_cache=cache)[:, -1]


class StaticDecoder:
    """What `sample(compile=True)` keeps between rollouts, held by the model it serves (`static_decoder`), so that
    it goes when the model goes: the compiled decode step, and one static KV cache per shape, reused by every
    rollout of that shape (a captured CUDA graph is bound to the addresses of the buffers it writes, so fresh
    buffers each call would mean a fresh capture each call)."""

    def __init__(self):
        self.step, self.caches = None, {}

    def cache(self, config, B: int, length: int, device, dtype) -> KVCache:
        key = (B, length, str(device), dtype)
        if key not in self.caches:
            self.caches[key] = KVCache(config, B, length, device, dtype=dtype)
        cache = self.caches[key]
        cache.length, cache.static = 0, False  # slots past the prompt are masked until written
        return cache


def static_decoder(model: GPT) -> StaticDecoder:
    """The model's StaticDecoder, made on first use (a plain attribute: not a parameter, buffer or submodule)."""
    if "_static_decoder" not in model.__dict__:
        model.__dict__["_static_decoder"] = StaticDecoder()
    return model.__dict__["_static_decoder"]


@torch.no_grad()
def decode_step(model: GPT, token: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                cache: KVCache) -> torch.Tensor:
    """One compiled decode step on a static cache: token, positions [B, 1], mask [B, max_len] -> logits [B, V].
    Shapes are fixed for a whole rollout, so it compiles once per (batch, cache length); on CUDA the graph
    is captured and replayed (mode "reduce-overhead"), removing the per-kernel launch cost."""
    decoder = static_decoder(model)
    if decoder.step is None:
        mode = "reduce-overhead" if token.device.type == "cuda" else None
        decoder.step = torch.compile(_decode, fullgraph=True, dynamic=False, mode=mode)
    if token.device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits have been consumed
    return decoder.step(model, token, mask, positions, cache)
