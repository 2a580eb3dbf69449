"""A GPT-2-architecture language model with a KV cache, padding-aware positions and hidden-state output.

Module names follow GPT-2 (`wte`, `c_attn`, `c_proj`, ...) so Hugging Face weights map one to one
(the HF `Conv1D` weights are stored transposed). Shapes: B batch, T new tokens, S tokens attended to
(cache + new), V vocabulary, D width, H heads.

Padding. Prompts are left-padded and responses right-padded, so positions come from the attention mask,
`pos = clamp(cumsum(mask) - 1, min=0)` (N detail 3): a padded row then gives the same
log-probs on its real tokens as the row alone. Every query may attend to itself, so rows of pure padding
stay finite (their outputs are never used). A batch padded on the right only (training collate) needs no mask
at all: its padded keys follow every real query, so the plain causal kernel (flash attention) serves it.
"""

import json
import math
from dataclasses import dataclass, replace
from dataclasses import fields as fields_of
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from nanoalign.logprobs import linear_logps, token_logps

if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
    # ATen runs without vector kernels here (a CPU without AVX2 or NEON, or ATEN_CPU_CAPABILITY=default), yet
    # torch.compile's C++ reductions would still use at::vec and fail to build (torch 2.13): scalar code builds
    import torch._inductor.config
    torch._inductor.config.cpp.simdlen = 1


@dataclass
class GPTConfig:
    block_size: int = 256  # maximum sequence length (learned positions)
    vocab_size: int = 2048  # rows of the token embedding (tied to the LM head)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads
    n_embd: int = 128  # width D
    layer_norm_epsilon: float = 1e-5  # GPT-2's value
    scalar_head: bool = False  # a linear D -> 1 head on the final hidden states (reward model, value head)


class KVCache:
    """Preallocated keys and values for incremental decoding: per layer [B, H, max_len, D/H] each.

    Two ways to fill it. Dynamic: `length` (a Python int) counts the stored tokens and each forward attends
    to the first `length + T`; any T, eager-friendly. Static: after `make_static()`, one token per forward
    is written at the slot held in the tensor `slot` and every forward attends to all `max_len` slots under
    the caller's mask, so shapes never change and one compiled graph (or CUDA graph) serves every step.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype=torch.float32):
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        # one tensor per layer: a compiled step then updates each in place (a slice of one big buffer is copied whole)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # tokens already stored; the model advances it after the last layer
        self.static, self.slot = False, None

    def make_static(self) -> None:
        """Switch to static decoding from slot `length` on (after a dynamic prefill)."""
        if self.slot is None:
            self.slot = torch.tensor([self.length], device=self.k[0].device)
            if self.k[0].is_cuda:  # CUDA graphs may then update the buffers in place instead of copying them
                for t in self.k + self.v:
                    torch._dynamo.mark_static_address(t)
        self.static = True
        self.slot.fill_(self.length)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.static:
            self.k[layer].index_copy_(2, self.slot, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, self.slot, v.to(self.v[layer].dtype))
            return self.k[layer], self.v[layer]  # [B, H, max_len, D/H]
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # [B, H, S, D/H]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, attn_mask=None, kv_cache=None, layer=0):
        q, k, v = rearrange(self.c_attn(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # [B, H, S, D/H]
        if attn_mask is None:  # plain causal: lets SDPA pick its fastest kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.c_proj(rearrange(y, "b h t d -> b t (h d)"))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config = replace(config)  # a private copy: resize_vocab edits it
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied embeddings (GPT-2)
        self.checkpoint_blocks = False  # activation checkpointing, set by scaffold.wrap_model
        self.fused_head = False  # output="logps" through the chunked, recomputing LM head, set by scaffold.wrap_model
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 scales residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.scalar_head:
            self.scalar_head = nn.Linear(config.n_embd, 1)
            self.reset_scalar_head()

    def reset_scalar_head(self, std: float | None = None) -> None:
        """Reward-model head init: weight ~ N(0, 1/sqrt(D+1)), bias 0 (N detail 8); std=0 gives the
        zero-initialised value head (N detail 11)."""
        std = 1 / math.sqrt(self.config.n_embd + 1) if std is None else std
        nn.init.normal_(self.scalar_head.weight, std=std) if std > 0 else nn.init.zeros_(self.scalar_head.weight)
        nn.init.zeros_(self.scalar_head.bias)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, attention_mask=None, position_ids=None, kv_cache=None, output="logits", logits_at=None,
                labels=None, temperature=1.0):
        """idx [B, T] -> by `output`: "logits" [B, T, V]; "hidden" [B, T, D], the final hidden states after
        ln_f; "scalar" [B, T], the scalar head at every position; "both" (logits, scalar); "logps" [N], the
        log-probs log softmax(z / temperature)[labels] of `labels` [N] at the N `logits_at` positions (all B·T
        without it), with `fused_head` through `logprobs.linear_logps`, which never holds the [N, V] logits.
        One forward serves every head, so FSDP's hooks see each call. logits_at [B, T] bool: the LM head only at
        those positions, packed [N, V] in row-major order (it skips the prompt: less time and memory).

        attention_mask [B, S]: 1 on real tokens, covering the cached tokens and the new ones (S = past + T).
        kv_cache: a KVCache; the new keys/values are appended and its length advanced by T. A static cache
        takes one token, `attention_mask` over all its slots [B, max_len] and `position_ids` [B, 1].
        """
        static = kv_cache is not None and kv_cache.static
        if static:  # the caller's mask covers every slot; written slots only are 1
            attn_mask = attention_mask[:, None, None, :].bool()  # [B, 1, 1, max_len]
        else:
            position_ids, attn_mask, S = self._positions_and_mask(idx, attention_mask, position_ids, kv_cache)
        x = self.transformer.wte(idx) + self.transformer.wpe(position_ids)  # [B, T, D]
        for layer, block in enumerate(self.transformer.h):
            if self.checkpoint_blocks and torch.is_grad_enabled():  # keep only block inputs; recompute in backward
                x = checkpoint(block, x, attn_mask, kv_cache, layer, use_reentrant=False)
            else:
                x = block(x, attn_mask, kv_cache, layer)
        if kv_cache is not None and not static:
            kv_cache.length = S
        x = self.transformer.ln_f(x)
        if output == "logits":
            return self.lm_head(x if logits_at is None else x[logits_at])
        if output == "logps":
            x = x.flatten(0, 1) if logits_at is None else x[logits_at]  # [N, D]
            if self.fused_head:
                return linear_logps(x, self.lm_head.weight, labels, temperature)
            return token_logps(self.lm_head(x), labels, temperature)
        if output == "hidden":
            return x
        if output == "scalar":
            return self.scalar_head(x)[..., 0]
        assert output == "both", f"unknown output {output!r}"
        return self.lm_head(x if logits_at is None else x[logits_at]), self.scalar_head(x)[..., 0]

    def _positions_and_mask(self, idx, attention_mask, position_ids, kv_cache):
        """Positions from the mask and the [B|1, 1, T, S] boolean attention mask (None: plain causal)."""
        B, T = idx.shape
        past = kv_cache.length if kv_cache is not None else 0
        S = past + T
        assert S <= self.config.block_size, f"sequence of {S} tokens exceeds block_size {self.config.block_size}"
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, S, device=idx.device).expand(B, T)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # [B, T]
        right_padded = past == 0 and attention_mask is not None and \
            not (attention_mask[:, 1:] > attention_mask[:, :-1]).any()  # every row: real tokens, then padding
        attn_mask = None  # plain causal: for right padding too, as padded keys follow every real query
        if (attention_mask is not None and not right_padded) or past > 0:
            q_pos = torch.arange(past, S, device=idx.device)[:, None]  # [T, 1]
            k_pos = torch.arange(S, device=idx.device)[None, :]  # [1, S]
            attn_mask = (k_pos <= q_pos)[None, None]  # [1, 1, T, S] causal
            if attention_mask is not None:  # drop padded keys, but always keep the query's own slot
                attn_mask = attn_mask & (attention_mask[:, None, None, :].bool() | (k_pos == q_pos))
        return position_ids, attn_mask, S

    # ----- weights in and out ------------------------------------------------------------------------

    def resize_vocab(self, vocab_size: int) -> None:
        """Grow the (tied) embedding to `vocab_size` rows, new rows = mean embedding (e.g. for added special tokens)."""
        old = self.transformer.wte.weight.data
        if vocab_size <= old.shape[0]:
            return
        new = old.mean(0, keepdim=True).expand(vocab_size - old.shape[0], -1)
        self.transformer.wte = nn.Embedding(vocab_size, old.shape[1], device=old.device, dtype=old.dtype)
        self.transformer.wte.weight.data.copy_(torch.cat([old, new]))
        self.lm_head = nn.Linear(old.shape[1], vocab_size, bias=False, device=old.device, dtype=old.dtype)
        self.lm_head.weight = self.transformer.wte.weight
        self.config.vocab_size = vocab_size

    def save_hf(self, path) -> None:
        """Export as a Hugging Face GPT-2 directory (config.json + model.safetensors)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, t in self.state_dict().items():
            if name == "lm_head.weight" or name.startswith("scalar_head."):
                continue  # lm_head is tied to wte (HF re-ties on load); HF GPT-2 has no scalar head
            if name.endswith(_CONV1D):
                t = t.t()
            tensors[name] = t.detach().contiguous().cpu()
        c = self.config
        hf = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size,
                  n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                  layer_norm_epsilon=c.layer_norm_epsilon, activation_function="gelu_new",
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(hf, indent=2))

    @classmethod
    def from_pretrained(cls, path, scalar_head: bool | None = None) -> "GPT":
        """Load a nanoalign checkpoint directory or a local Hugging Face GPT-2 directory.
        scalar_head=True adds a freshly initialised head if the checkpoint has none (an SFT model becoming a
        reward model); False drops a stored one; None keeps what the checkpoint has."""
        path = Path(path)
        meta = read_meta(path)
        if "model_type" in meta:
            config, state = cls._hf_config_and_state(path, meta)
        elif "model" in meta:
            config, state = model_config(path, meta["model"]), read_tensors(path / "model.safetensors")
        else:
            raise ValueError(f"{path / 'config.json'}: missing field 'model' (nanoalign) or 'model_type' (HF)")
        if scalar_head is not None:
            config.scalar_head = scalar_head
        model = cls(config)
        state["lm_head.weight"] = state["transformer.wte.weight"]  # tied: dropped on save
        if not config.scalar_head:
            state = {k: v for k, v in state.items() if not k.startswith("scalar_head.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("scalar_head.") for k in missing):
            raise ValueError(f"{path}/model.safetensors: missing {missing}, unexpected {unexpected}")
        return model

    @staticmethod
    def _hf_config_and_state(path: Path, hf: dict) -> tuple[GPTConfig, dict]:
        """A local Hugging Face GPT-2 directory (config.json + model.safetensors) in nanoalign's names."""
        if hf.get("model_type") != "gpt2":
            raise ValueError(f"{path / 'config.json'}: field 'model_type' must be 'gpt2', got {hf.get('model_type')!r}")
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{path / 'config.json'}: field 'activation_function' must be gelu_new, "
                             f"got {hf['activation_function']!r}")
        missing = [k for k in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd") if k not in hf]
        if missing:
            raise ValueError(f"{path / 'config.json'}: missing field {missing[0]!r}; a GPT-2 config sets "
                             f"n_positions, vocab_size, n_layer, n_head and n_embd")
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"],
                           layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))  # HF GPT2Config's default
        state = {}
        for name, t in read_tensors(path / "model.safetensors").items():
            if not name.startswith(("transformer.", "lm_head.")):
                name = "transformer." + name  # the original GPT-2 upload has no prefix
            if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
                continue  # old HF checkpoints store the causal mask as a buffer
            state[name] = t.t() if name.endswith(_CONV1D) else t
        return config, state

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once


def model_config(path, fields: dict) -> GPTConfig:
    """A checkpoint's GPTConfig from its config.json "model" fields, each of them required: a field left out
    would silently take its default (another number of heads reads the same weights as another model), an
    unknown one is a config from other code. Either is an error naming the file and the field."""
    file, known = Path(path) / "config.json", [f.name for f in fields_of(GPTConfig)]
    if not isinstance(fields, dict):
        raise ValueError(f"{file}: field 'model' must be an object of the model's settings, got {fields!r}")
    missing, unknown = [k for k in known if k not in fields], sorted(set(fields) - set(known))
    if missing or unknown:
        raise ValueError(f"{file}: field 'model.{(missing or unknown)[0]}' is "
                         f"{'missing' if missing else 'unknown'}; a nanoalign model's config sets exactly "
                         f"{', '.join(known)}")
    return GPTConfig(**fields)


def read_meta(path) -> dict:
    """config.json of a checkpoint (or a local HF GPT-2 directory); missing or damaged, an error naming it."""
    file = Path(path) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file}: not found; expected a nanoalign checkpoint or a local HF GPT-2 directory")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: damaged ({e}); the file was not written completely") from None


def read_tensors(file) -> dict[str, torch.Tensor]:
    """A safetensors file; missing or damaged (a truncated write), an error naming it."""
    if not Path(file).exists():
        raise FileNotFoundError(f"{file}: not found")
    try:
        return load_file(file)
    except Exception as e:  # safetensors raises its own error types for a bad header or a short file
        raise ValueError(f"{file}: damaged ({e}); the file was not written completely") from None


_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

